"""The unlearning service: a Ray Serve application that holds a target model and a decoder bank,
applies forget requests one after another, and keeps every applied update as a recoverable version.

Layers, bottom up (everything except ``deployment`` runs and is tested without Ray):

- ``config``: ``ServiceConfig`` (YAML + overrides) with the limits every request is checked against;
- ``auth``: bearer tokens from a file or the environment, compared in constant time, never logged;
- ``audit``: the append-only JSON-lines audit log (fsync per record);
- ``store``: versions as safetensors deltas + manifests, the active pointer, base + chain of deltas;
- ``schemas``: request and response bodies and the validation that turns bad input into 4xx errors;
- ``jobs``: persisted job records and the single writer thread that applies them in order;
- ``core``: ``UnlearnService``, the model holder (serving copy + working copy, swap under a lock);
- ``app``: the FastAPI ingress; ``deployment``: the thin Ray Serve shell (``@serve.batch`` generate).
"""
