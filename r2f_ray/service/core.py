"""``UnlearnService``: the model holder behind the HTTP API, plain Python (no Ray).

Two copies of the target: the *serving* copy answers generate; the *working* copy is where the engine
computes and applies an update. A finished update is stored as a version first, then copied into the
serving copy under the write side of a readers-writer lock, so a generate call sees either the old or
the new version, never a mix. Jobs and activations take one writer lock, so they apply one at a time.
Any failure restores both copies to the active version.
"""

from __future__ import annotations

import copy
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from r2f_ray.config import MODEL_HELP
from r2f_ray.core.unlearn import METHODS, ForgetRequest, chat_prompt, unlearn
from r2f_ray.service.audit import AuditLog
from r2f_ray.service.auth import TokenAuth
from r2f_ray.service.config import ServiceConfig
from r2f_ray.service.jobs import JobQueue
from r2f_ray.service.metrics import ServiceMetrics
from r2f_ray.service.schemas import GenerateBody, ServiceError, UnlearnBody, check_generate, check_unlearn
from r2f_ray.service.store import Materializer, UnknownVersion, VersionStore
from r2f_ray.storage import is_uri, local_copy, remote_exists



class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _load_target(config: ServiceConfig):
    from r2f_ray.assets import LoadedModel, load_model, weights_hash

    dtype = getattr(torch, config.dtype)
    if config.num_gpus > 1 and Path(config.model).is_dir():
        # A target too large for one GPU is spread over the replica's GPUs layer by layer.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, device_map="auto").eval()
        return LoadedModel(model, AutoTokenizer.from_pretrained(config.model), str(config.model), weights_hash(model))
    device = "cuda" if config.num_gpus >= 1 and torch.cuda.is_available() else "cpu"
    return load_model(config.model, dtype=dtype, device=device)


def _load_bank(config: ServiceConfig, model, tokenizer, model_id: str, weights_sha256: str):
    from r2f_ray.core.bank import DecoderBank
    from r2f_ray.core.targets import resolve_targets

    if config.bank == "naive":
        bank = DecoderBank.naive(config.lora, resolve_targets(model, list(config.lora.target_modules)), model_id, weights_sha256)
    else:
        from r2f_ray.assets import LoadedModel, load_bank

        bank = load_bank(local_copy(config.bank), LoadedModel(model, tokenizer, model_id, weights_sha256), config.bank_transfer)
    return bank.to(next(model.parameters()).device)


def preflight(config: ServiceConfig) -> None:
    """Checks that need no model: tokens, methods, model and bank locations. ValueError names the fix."""
    auth = TokenAuth.from_sources(config.tokens_file, config.tokens_env)
    if not auth.enabled and not config.allow_unauthenticated:
        raise ValueError(f"no bearer tokens configured: set tokens_file (one 'name token' per line) or "
                         f"${config.tokens_env}='name:token', or allow_unauthenticated=true for local use")
    unknown = [m for m in config.methods or () if m not in METHODS]
    if unknown:
        raise ValueError(f"methods {unknown} are not offered by the engine (it offers {sorted(METHODS)}); fix `methods`")
    from r2f_ray.assets import is_model_spec

    if not is_model_spec(config.model):
        raise ValueError(f"model {config.model!r} is not one of {MODEL_HELP}")
    if config.bank != "naive" and not (remote_exists(config.bank) if is_uri(config.bank) else Path(config.bank).is_dir()):
        raise ValueError(f"bank {config.bank!r} is neither 'naive' nor a decoder bank folder (train one with `r2f train`)")


def _version_number(version: str) -> int:
    return int(version[1:])


class UnlearnService:
    """Everything the API does, callable without HTTP or Ray.

    ``engine`` (default ``r2f_ray.core.unlearn.unlearn``) and ``loaded`` (a ``LoadedModel``) can be
    given to run the service on another engine or an already-loaded model.
    """

    def __init__(self, config: ServiceConfig, engine: Callable | None = None, loaded=None, bank=None):
        self.config = config
        self.limits = config.limits
        preflight(config)
        self.auth = TokenAuth.from_sources(config.tokens_file, config.tokens_env)
        self.methods = tuple(config.methods or METHODS)
        # The service stores every update as a delta, so the engine must always return them.
        self.engine_config = config.engine.model_copy(update={"keep_deltas": True})
        self.metrics = ServiceMetrics()
        self.ready = False
        t0 = time.time()
        loaded = loaded or _load_target(config)
        self.model_id, self.weights_sha256 = loaded.model_id, loaded.weights_sha256
        self.serving, self.tokenizer = loaded.model.eval(), loaded.tokenizer
        self._gen_tokenizer = copy.deepcopy(self.tokenizer)
        self._gen_tokenizer.padding_side = "left"  # batched greedy decoding continues every row at its end
        if self._gen_tokenizer.pad_token is None:
            self._gen_tokenizer.pad_token = self._gen_tokenizer.eos_token

        self.store = VersionStore(config.state_dir, self.model_id, self.weights_sha256)
        self.materializer = Materializer(self.store)
        self.active_version = self.store.active()
        names = self.materializer.touched(self.active_version)
        self.materializer.remember_base(self.serving, names)
        self.materializer.apply(self.serving, self.materializer.weights(self.active_version, names))

        self.bank = bank if bank is not None else _load_bank(config, self.serving, self.tokenizer, self.model_id, self.weights_sha256)
        self._engine = engine or unlearn
        self.work = copy.deepcopy(self.serving)
        self._rw = RWLock()
        self._writer = threading.Lock()
        self.audit = AuditLog(config.state_dir / "audit.jsonl")
        self.jobs = JobQueue(config.state_dir / "jobs", self._execute, config.limits.max_queued_jobs, self._job_finished)
        self._update_gauges()
        self.jobs.start(recover=self._recover)
        self.audit.append("service_started", "service", model_id=self.model_id, active=self.active_version,
                          versions=len(self.store.ids()), load_s=round(time.time() - t0, 2))
        self.ready = True

    def close(self) -> None:
        self.ready = False
        self.jobs.stop()

    # --- auth

    def authenticate(self, authorization: str | None) -> str:
        if not self.auth.enabled:
            return "anonymous"
        return self.auth.authenticate(authorization)

    # --- generate

    def _format(self, prompt: str, chat: bool) -> str:
        if chat and self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def check_generate(self, body: GenerateBody) -> None:
        check_generate(body, self.limits)

    @torch.no_grad()
    def _greedy(self, model, tokenizer, texts: list[str], max_new: list[int]) -> list[tuple[str, int]]:
        device = next(model.parameters()).device
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, max_new_tokens=max(max_new), do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
        results = []
        for row, k in zip(new.tolist(), max_new):
            row = row[:k]
            for i, t in enumerate(row):
                if t in stop:
                    row = row[:i]
                    break
            results.append((tokenizer.decode(row, skip_special_tokens=True), len(row)))
        return results

    def generate_batch(self, items: list[GenerateBody]) -> list[dict]:
        """Greedy answers from the active version, one forward pass for the whole batch."""
        t0 = time.time()
        texts = [self._format(i.prompt, i.chat) for i in items]
        with self._rw.read():
            version = self.active_version
            answers = self._greedy(self.serving, self._gen_tokenizer, texts, [i.max_new_tokens for i in items])
        self.metrics.generate_seconds.observe(time.time() - t0)
        self.metrics.generate_batch_size.observe(len(items))
        return [{"text": text, "version": version, "new_tokens": n} for text, n in answers]

    # --- unlearn jobs

    def submit_unlearn(self, body: UnlearnBody, actor: str) -> tuple[dict, bool]:
        check_unlearn(body, self.limits, self.methods)
        self._check_engine_limits(body)
        job, replayed = self.jobs.submit(body.model_dump(mode="json"), body.fingerprint(), actor, body.idempotency_key)
        if not replayed:
            self.audit.append("unlearn_requested", actor, job_id=job["job_id"], request=job["request"])
        self._update_gauges()
        return job, replayed

    @staticmethod
    def _fact_metrics(reports: list[dict]) -> dict:
        """Before/after figures of each forget request, from the engine's reports (measured on the
        original prompt: greedy chat answer and the answer's log-prob)."""
        keys = ("id", "answered_before", "answered_after", "answer_logprob_before", "answer_logprob_after",
                "greedy_before", "greedy_after")
        return {"answered_before": sum(bool(r["answered_before"]) for r in reports),
                "answered_after": sum(bool(r["answered_after"]) for r in reports),
                "requests": [{k: r.get(k) for k in keys} for r in reports]}

    def _check_engine_limits(self, body: UnlearnBody) -> None:
        """The engine's limits (tokens, views), checked at the door so the caller gets a 422, not a failed job."""
        cfg = self.engine_config
        for i, r in enumerate(body.requests):
            n = len(self.tokenizer(r.answer, add_special_tokens=False)["input_ids"])
            if n > cfg.max_answer_tokens:
                raise ServiceError(422, "too_long", f"requests[{i}].answer has {n} tokens; the limit is {cfg.max_answer_tokens}",
                                   f"requests[{i}].answer")
            n = len(self.tokenizer(chat_prompt(self.tokenizer, r.prompt), add_special_tokens=False)["input_ids"])
            if n > cfg.max_prompt_tokens:
                raise ServiceError(422, "too_long", f"requests[{i}].prompt has {n} tokens in chat form; the limit is "
                                   f"{cfg.max_prompt_tokens}", f"requests[{i}].prompt")
        if body.views is not None and not 1 <= body.views <= cfg.max_views:
            raise ServiceError(422, "bad_views", f"views must be between 1 and {cfg.max_views}, got {body.views}", "views")

    def _execute(self, job: dict) -> dict:
        body = UnlearnBody.model_validate(job["request"])
        requests = [ForgetRequest(prompt=r.prompt, answer=r.answer, id=r.id) for r in body.requests]
        views = body.views or self.config.default_views
        t0 = time.time()
        try:
            return self._apply(job, body, requests, views)
        finally:
            self.metrics.job_seconds.observe(time.time() - t0)

    def _apply(self, job: dict, body: UnlearnBody, requests: list, views: int) -> dict:
        with self._writer:
            parent = self.active_version
            try:
                result = self._engine(self.work, self.tokenizer, requests, decoder=self.bank, views=views,
                                      step=body.step, method=body.method, config=self.engine_config)
                metrics = self._fact_metrics(result.reports)
                summary = {"method": result.method, "step": float(result.step), "views": views,
                           "engine_wall_s": round(float(result.wall_s), 3), "metrics": metrics,
                           "trials": result.trials, "parent": parent}
                if body.dry_run:
                    self._set_weights(self.work, parent, set(result.deltas))
                    return {**summary, "dry_run": True, "version": None, "changed_matrices": len(result.deltas)}
                manifest = self.store.commit(parent, result.deltas, {
                    "job_id": job["job_id"], "actor": job["actor"], "requests": job["request"]["requests"],
                    "method": result.method, "step": float(result.step), "views": views, "metrics": metrics})
                self._switch(manifest["version"])
            except BaseException:
                self._resync_work()
                raise
        return {**summary, "dry_run": False, "version": manifest["version"], "changed_matrices": len(manifest["matrices"])}

    def _job_finished(self, job: dict) -> None:
        result = job.get("result") or {}
        self.audit.append(f"unlearn_{job['status']}", job["actor"], job_id=job["job_id"], request=job["request"],
                          version=result.get("version"), parent=result.get("parent"), dry_run=result.get("dry_run"),
                          step=result.get("step"), metrics=result.get("metrics"), error=job.get("error"))
        self.metrics.jobs.labels(job["status"]).inc()
        self._update_gauges()

    def _recover(self, job: dict) -> dict | None:
        """A job that committed its version before a stop: finish its switch and report it done."""
        version = self.store.by_job(job["job_id"])
        if version is None:
            return None
        manifest = self.store.manifest(version)
        if self.active_version == manifest["parent"]:
            with self._writer:
                self._switch(version)
        return {"version": version, "parent": manifest["parent"], "dry_run": False, "step": manifest.get("step"),
                "method": manifest.get("method"), "metrics": manifest.get("metrics"),
                "changed_matrices": len(manifest["matrices"]), "recovered": True}

    # --- versions

    def _set_weights(self, model, version: str, names: set[str]) -> None:
        self.materializer.remember_base(self.serving, names)
        self.materializer.apply(model, self.materializer.weights(version, names))

    def _switch(self, version: str) -> None:
        """Make ``version`` active: serving copy (under the write lock), working copy, then the pointer.
        Caller holds the writer lock."""
        previous = self.active_version
        names = self.materializer.touched(previous, version)
        # Matrices only ``version`` touches still hold their base values in the serving copy.
        self.materializer.remember_base(self.serving, names)
        new = self.materializer.weights(version, names)
        try:
            with self._rw.write():
                self.materializer.apply(self.serving, new)
                self.active_version = version
            self.store.set_active(version)
        except BaseException:
            with self._rw.write():
                self.materializer.apply(self.serving, self.materializer.weights(previous, names))
                self.active_version = previous
            raise
        self.materializer.apply(self.work, new)
        self._update_gauges()

    def _resync_work(self) -> None:
        """After a failure the working copy may hold anything: copy it again from the serving copy."""
        with self._rw.read():
            self.work = copy.deepcopy(self.serving)

    def activate(self, version: str, actor: str) -> dict:
        try:
            self.store.manifest(version)
        except UnknownVersion as e:
            raise ServiceError(404, "unknown_version", str(e.args[0]), "version") from None
        if not self._writer.acquire(timeout=self.config.activate_wait_s):
            raise ServiceError(409, "busy", f"an unlearn job has held the model for over {self.config.activate_wait_s:.0f} s; retry later")
        try:
            previous = self.active_version
            if version != previous:
                try:
                    self._switch(version)
                except BaseException:
                    self._resync_work()
                    raise
        finally:
            self._writer.release()
        self.audit.append("activate", actor, previous=previous, version=version)
        return {"active": version, "previous": previous}

    def models(self) -> dict:
        active = self.active_version
        versions = []
        for m in self.store.manifests():
            versions.append({"version": m["version"], "parent": m["parent"], "created": m["created"],
                             "active": m["version"] == active, "requests": m.get("requests", []),
                             "matrices": len(m.get("matrices", [])), "method": m.get("method"), "step": m.get("step"),
                             "metrics": m.get("metrics"), "job_id": m.get("job_id")})
        return {"model_id": self.model_id, "active": active, "versions": versions}

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.jobs.depth() if hasattr(self, "jobs") else 0)
        self.metrics.versions.set(len(self.store.ids()))
        self.metrics.active.set(_version_number(self.active_version))
