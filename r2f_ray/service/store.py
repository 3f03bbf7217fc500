"""Model versions on disk: the root (the base weights, identified by their hash) and one folder per
applied unlearning holding only the changed matrices as a delta.

    state_dir/versions/v0000/manifest.json            root: model id and base weights hash
    state_dir/versions/v0001/delta.safetensors        {matrix name: W_after - W_before}
    state_dir/versions/v0001/manifest.json            parent, requests, metrics, delta hash, time
    state_dir/active.json                             the version generate answers from

A version's weights are the base plus the deltas along its chain from the root, added in order; every
path that sets weights (apply, activate, restart) goes through that one rule, so a version always has
the same bits. Version folders are written with ``atomic_dir`` and never change afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r2f_ray.core.targets import find_module
from r2f_ray.io import atomic_dir, write_json

ROOT = "v0000"
_VERSION = re.compile(r"^v\d{4,}$")
DELTA_FILE = "delta.safetensors"
MANIFEST = "manifest.json"


class UnknownVersion(KeyError):
    pass


class StoreMismatch(ValueError):
    """The state folder belongs to other base weights than the loaded model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class VersionStore:
    def __init__(self, state_dir: str | Path, model_id: str, weights_sha256: str):
        self.dir = Path(state_dir)
        self.versions_dir = self.dir / "versions"
        self._lock = threading.Lock()
        self._delta_cache: dict[str, dict[str, torch.Tensor]] = {}
        root = self.versions_dir / ROOT / MANIFEST
        if root.exists():
            manifest = json.loads(root.read_text())
            if manifest["weights_sha256"] != weights_sha256:
                raise StoreMismatch(
                    f"state folder {self.dir} was made for base weights {manifest['weights_sha256'][:12]}... "
                    f"({manifest['model_id']}), but the loaded model has {weights_sha256[:12]}... ({model_id}); "
                    "start with the model it was made for or choose another state_dir")
        else:
            with atomic_dir(self.versions_dir / ROOT) as tmp:
                write_json(tmp / MANIFEST, {"version": ROOT, "parent": None, "created": _now(), "model_id": model_id,
                                            "weights_sha256": weights_sha256, "requests": [], "matrices": []})
        if not (self.dir / "active.json").exists():
            write_json(self.dir / "active.json", {"version": ROOT, "updated": _now()})

    # --- reading

    def ids(self) -> list[str]:
        return sorted((p.name for p in self.versions_dir.iterdir() if _VERSION.match(p.name) and (p / MANIFEST).exists()),
                      key=lambda v: int(v[1:]))

    def manifest(self, version: str) -> dict:
        path = self.versions_dir / version / MANIFEST
        if not _VERSION.match(version) or not path.exists():
            raise UnknownVersion(f"unknown version {version!r}; GET /v1/models lists the versions")
        return json.loads(path.read_text())

    def manifests(self) -> list[dict]:
        return [self.manifest(v) for v in self.ids()]

    def active(self) -> str:
        return json.loads((self.dir / "active.json").read_text())["version"]

    def chain(self, version: str) -> list[str]:
        """Versions from the root to ``version``, both included."""
        out = []
        v: str | None = version
        while v is not None:
            out.append(v)
            v = self.manifest(v)["parent"]
        return out[::-1]

    def delta(self, version: str) -> dict[str, torch.Tensor]:
        """The stored delta of one version (hash-checked once, then cached: versions never change)."""
        if version == ROOT:
            return {}
        with self._lock:
            if version not in self._delta_cache:
                manifest = self.manifest(version)
                path = self.versions_dir / version / DELTA_FILE
                if _sha256(path) != manifest["delta_sha256"]:
                    raise ValueError(f"{path} does not match the hash in its manifest: the file was changed or damaged")
                self._delta_cache[version] = load_file(path)
            return self._delta_cache[version]

    def by_job(self, job_id: str) -> str | None:
        for m in self.manifests():
            if m.get("job_id") == job_id:
                return m["version"]
        return None

    # --- writing

    def next_id(self) -> str:
        return f"v{int(self.ids()[-1][1:]) + 1:04d}"

    def commit(self, parent: str, deltas: dict[str, torch.Tensor], info: dict) -> dict:
        """Write a new version (child of ``parent``) holding only the matrices that changed."""
        changed = {name: d.detach().to("cpu", torch.float32).contiguous() for name, d in deltas.items() if bool(d.ne(0).any())}
        if not changed:
            raise ValueError("the update changed no weights (step 0 or a zero gradient): nothing to store")
        self.manifest(parent)
        version = self.next_id()
        with atomic_dir(self.versions_dir / version) as tmp:
            save_file(changed, tmp / DELTA_FILE, metadata={"version": version, "parent": parent})
            manifest = {"version": version, "parent": parent, "created": _now(), **info,
                        "matrices": sorted(changed), "delta_sha256": _sha256(tmp / DELTA_FILE),
                        "delta_bytes": (tmp / DELTA_FILE).stat().st_size}
            write_json(tmp / MANIFEST, manifest)
        with self._lock:
            self._delta_cache[version] = changed
        return manifest

    def set_active(self, version: str) -> None:
        self.manifest(version)
        write_json(self.dir / "active.json", {"version": version, "updated": _now()})


class Materializer:
    """Sets a model's weights to a version's: base + the chain's deltas, for the matrices any version touched.

    The base value of a matrix is copied (to CPU) the first time a version touches it; until then the
    model still holds it, since only versions ever change weights.
    """

    def __init__(self, store: VersionStore):
        self.store = store
        self.base: dict[str, torch.Tensor] = {}

    def remember_base(self, model: nn.Module, names) -> None:
        for name in names:
            if name not in self.base:
                self.base[name] = find_module(model, name).weight.detach().to("cpu", torch.float32).clone()

    def weights(self, version: str, names) -> dict[str, torch.Tensor]:
        chain = [self.store.delta(v) for v in self.store.chain(version)]
        out = {}
        for name in names:
            w = self.base[name].clone()
            for delta in chain:
                if name in delta:
                    w += delta[name]
            out[name] = w
        return out

    def touched(self, *versions: str) -> set[str]:
        names: set[str] = set()
        for version in versions:
            for v in self.store.chain(version):
                names.update(self.store.manifest(v)["matrices"])
        return names

    @torch.no_grad()
    def apply(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        for name, w in weights.items():
            param = find_module(model, name).weight
            param.copy_(w.to(device=param.device, dtype=param.dtype))
