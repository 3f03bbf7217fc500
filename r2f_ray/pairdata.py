"""Gradient-pair datasets: schema, pair math from captures, Parquet encoding, manifest and reader.

A *pair* is (item, adapted matrix): the LoRA gradient (grad_A, grad_B) and the full gradient G of one
weight matrix for one item, an item being one example, a mini-batch of examples, or an example after
T real LoRA SGD steps (see ``MODES``). This module is Ray-free; ``r2f_ray.pipeline.pairs`` writes the
datasets with Ray Data and the decoder trainer reads them with the API below.

Reading (all you need as a consumer)::

    ds = PairDataset("pairs/")                    # reads manifest.json, lists committed files only
    ds.spec, ds.matrices, ds.manifest["proxy"]    # LoraSpec, [MatrixInfo], {"model_id", "weights_sha256"}
    for batch in ds.iter_batches(["model.layers.5.self_attn.q_proj"], batch_size=16, split="train"):
        p = batch["model.layers.5.self_attn.q_proj"]
        p.grad_a [N, r, d_in], p.grad_b [N, d_out, r], p.full [N, d_out, d_in]    # fp32, on `device`

With Ray Data / Ray Train shards, read only the needed columns and convert each batch::

    cols = ds.columns(matrices)
    rds = ray.data.read_parquet(ds.files()).select_columns(cols)   # or get_dataset_shard("train")
    for b in rds.iter_batches(batch_size=16, batch_format="numpy"):  # "pyarrow" works too
        pairs = pairs_from_batch(b, ds.manifest, matrices, device="cuda", split="train")

Storage layout (schema version 1). A dataset is a folder::

    manifest.json                     # identity + committed shards (rewritten atomically at each commit)
    data/shard-<run>/<part>.parquet   # the files of one committed run; they count only once listed
    _staging/<run>/                   # files of a running (or killed) run: never read; the next run
                                      # commits the complete ones and deletes the rest

One Parquet row per item, one binary column per tensor (raw little-endian bytes, row-major, in the
dataset's dtype, float32 or bfloat16):

=========================  ===========================================================================
column                     content
=========================  ===========================================================================
pair_id                    item id: the example id, or ``mb:<hash>`` for a mini-batch
example_ids, text_sha256   list<string>: the examples of the item and the SHA-256 of their source text
split_key                  string hashed by ``split_of`` (the text id, so chunks of a text never straddle)
n_rows                     int32: factor rows R (supervised tokens, summed over examples and steps)
loss                       float32: the item's loss at the LoRA init (sum of its examples' mean NLL)
mode, steps                the generation mode and the number of LoRA SGD steps (0 without steps)
proxy_sha256, lora_fingerprint, dtype, schema_version   provenance, constant within a dataset
``x:<owner>``              factor X [R, d_in] of the input read by module ``<owner>`` (storage factors/both)
``d:<matrix>``             factor D [R, d_out]; G = D^T X (storage factors/both)
``g:<matrix>``             dense G [d_out, d_in] (storage dense/both)
``a:<matrix>``/``b:<m>``   the adapter A_T [r, d_in] / B_T [d_out, r] after the steps (step modes)
=========================  ===========================================================================

Each tensor column's Parquet field metadata (key ``r2f``, JSON; see ``column_descriptions``) names
its kind, shape, dtype and the matrices (module name, layer, role) it belongs to, so a file describes
itself; the manifest holds the same. Inputs read by several modules (q/k/v read the same normed
hidden states, gate/up too) are stored once per (item, layer, input): every matrix names its input
column in the manifest (``matrices[i]["input_column"]``), and ``input_columns[col]["shared_by"]`` lists who reads it.
Rows per file are bounded so that no binary column chunk nears Arrow's 2 GiB limit.

The LoRA gradients are not stored: they are rebuilt exactly from G (or its factors) and the recorded
init (A0, B0) of the spec, ``grad_A = s B0^T G``, ``grad_B = s G A0^T``. For multi-step items G is
the mean full gradient over the T steps and grad_A/grad_B its sketch at the init; the adapter the
steps produced is in ``PairTensors.adapter_a/adapter_b``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from r2f_ray.core.capture import Capture
from r2f_ray.core.decoders import activation_stats
from r2f_ray.core.lora import LoraSpec, init_factors
from r2f_ray.core.targets import MatrixInfo
from r2f_ray.io import write_json

SCHEMA_VERSION = 1
FORMAT = "r2f-pairs"
MANIFEST = "manifest.json"
DATA_DIR = "data"
STAGING_DIR = "_staging"
MODES = ("single", "minibatch", "single_step", "multi_step")
STORAGE_KINDS = ("factors", "dense", "both")
DTYPES = {"float32": (torch.float32, np.float32, 4), "bfloat16": (torch.bfloat16, np.int16, 2)}
DEFAULT_HELDOUT_FRACTION = 0.1
# Largest binary column chunk a file may hold; Arrow's binary arrays stop at 2 GiB.
MAX_COLUMN_BYTES_PER_FILE = 1 << 30

META_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("example_ids", pa.list_(pa.string())), ("text_sha256", pa.list_(pa.string())),
    ("split_key", pa.string()), ("n_rows", pa.int32()), ("loss", pa.float32()), ("mode", pa.string()),
    ("steps", pa.int32()), ("proxy_sha256", pa.string()), ("lora_fingerprint", pa.string()),
    ("dtype", pa.string()), ("schema_version", pa.int32()),
])


class PairDataError(ValueError):
    """A pair dataset is missing, malformed, or incompatible with what was asked; the message says why."""


class SpecMismatchError(PairDataError):
    """Appending to a dataset made with another proxy, LoRA spec or layout."""


def x_column(owner: str) -> str:
    return f"x:{owner}"


def d_column(name: str) -> str:
    return f"d:{name}"


def g_column(name: str) -> str:
    return f"g:{name}"


def a_column(name: str) -> str:
    return f"a:{name}"


def b_column(name: str) -> str:
    return f"b:{name}"


# ---------------------------------------------------------------------------------------------
# Split


def split_of(key: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str:
    """'heldout' or 'train' for a split key, from a hash: the same on every machine and in every run."""
    u = int.from_bytes(hashlib.sha256(f"r2f-split:{key}".encode()).digest()[:8], "little") / 2**64
    return "heldout" if u < heldout_fraction else "train"


def _check_split(split: str | None) -> None:
    if split not in (None, "train", "heldout"):
        raise PairDataError(f"split must be 'train', 'heldout' or None (both), got {split!r}")


# ---------------------------------------------------------------------------------------------
# Manifest


def build_manifest(*, model_id: str, weights_sha256: str, spec: LoraSpec, matrices: Sequence[MatrixInfo],
                   input_owner: Mapping[str, str], mode: str, storage: str, dtype: str, tokens: int,
                   packing: str, examples_per_pair: int = 1, steps: int = 0, step_lr: float = 0.0,
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict:
    """A new, empty manifest. ``input_owner[name]`` is the module whose row column holds ``name``'s X."""
    if mode not in MODES:
        raise PairDataError(f"unknown mode {mode!r}; choose one of {MODES}")
    if storage not in STORAGE_KINDS:
        raise PairDataError(f"unknown storage {storage!r}; choose one of {STORAGE_KINDS}")
    if dtype not in DTYPES:
        raise PairDataError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    stepped = mode in ("single_step", "multi_step")
    rows, inputs = [], {}
    for m in matrices:
        col = x_column(input_owner[m.name])
        inputs.setdefault(col, {"d_in": m.d_in, "shared_by": []})["shared_by"].append(m.name)
        rows.append({"name": m.name, "layer": m.layer, "role": m.role, "d_out": m.d_out, "d_in": m.d_in,
                     "input_column": col if storage != "dense" else None,
                     "grad_column": d_column(m.name) if storage != "dense" else None,
                     "dense_column": g_column(m.name) if storage != "factors" else None,
                     "adapter_columns": [a_column(m.name), b_column(m.name)] if stepped else None})
    return {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "proxy": {"model_id": model_id, "weights_sha256": weights_sha256},
        "lora": spec.model_dump(mode="json"), "lora_fingerprint": spec.fingerprint(),
        "mode": mode, "examples_per_pair": examples_per_pair, "steps": steps, "step_lr": step_lr,
        "storage": storage, "dtype": dtype, "tokens": tokens, "packing": packing,
        "loss": "per example: mean NLL over its labelled tokens (labels = input ids); per item: the sum",
        "matrices": rows,
        "input_columns": inputs if storage != "dense" else {},
        "split": {"key_column": "split_key", "heldout_fraction": heldout_fraction,
                  "rule": "heldout iff sha256('r2f-split:' + key)[:8] as little-endian / 2^64 < fraction"},
        "shards": [],
        "counts": {"items": 0, "examples": 0, "pairs": 0, "shards": 0, "bytes": 0},
    }


_IDENTITY_KEYS = ("format", "schema_version", "proxy", "lora", "mode", "examples_per_pair", "steps", "step_lr",
                  "storage", "dtype", "tokens", "packing", "matrices", "input_columns", "split")


def check_compatible(existing: dict, new: dict) -> None:
    """Raise ``SpecMismatchError`` unless ``new`` describes the same kind of pairs as ``existing``."""
    diffs = [k for k in _IDENTITY_KEYS if existing.get(k) != new.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: dataset has {_short(existing.get(k))}, this job has {_short(new.get(k))}" for k in diffs)
        raise SpecMismatchError(f"refusing to append: the dataset was made with different settings ({detail}). "
                                "Write to a new output folder, or rerun with the dataset's settings")


def _short(v: Any) -> str:
    if isinstance(v, list) and len(v) > 2:
        return f"[{len(v)} entries, first {json.dumps(v[0])}]"
    text = json.dumps(v)
    return text if len(text) < 200 else text[:200] + "..."


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_file():
        raise PairDataError(f"{path} is a file, not a pair dataset folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise PairDataError(f"{path} is not a pair dataset: it has no {MANIFEST} (generate one with `r2f pairs`)")
    manifest = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT:
        raise PairDataError(f"{mpath} is not an {FORMAT} manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PairDataError(f"{mpath} has schema version {manifest.get('schema_version')}; this code reads {SCHEMA_VERSION}")
    return manifest


def open_for_append(path: str | Path, manifest: dict) -> dict:
    """Create the dataset folder holding ``manifest``, or return the existing manifest after checking
    that ``manifest`` describes the same kind of pairs (else ``SpecMismatchError``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PairDataError(f"output path {path} is a file; give a folder (new or holding a pair dataset)")
    if (path / MANIFEST).exists():
        existing = read_manifest(path)
        check_compatible(existing, manifest)
        return existing
    if path.exists() and any(p.name != STAGING_DIR for p in path.iterdir()):
        raise PairDataError(f"output folder {path} is not empty and holds no {MANIFEST}: choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / MANIFEST, manifest)
    return manifest


def commit_shard(path: str | Path, manifest: dict, shard_id: str, staged: str | Path) -> dict:
    """Move a fully written shard folder into ``data/`` and record it in the manifest (atomically).

    Until the manifest lists it a shard does not exist for readers, so a crash at any point leaves either
    the old dataset or the new one. A ``data/shard-<id>`` left by a crash before the manifest write is
    replaced. Returns the updated manifest.
    """
    path, staged = Path(path), Path(staged)
    if any(s["id"] == shard_id for s in manifest["shards"]):
        raise PairDataError(f"shard {shard_id} is already committed")
    files = sorted(staged.glob("*.parquet"))
    if not files:
        raise PairDataError(f"shard {shard_id} has no Parquet files in {staged}")
    target = path / DATA_DIR / f"shard-{shard_id}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)
    names = [f"{DATA_DIR}/{target.name}/{f.name}" for f in files]
    items = examples = 0
    for f in names:
        ids = pq.read_table(path / f, columns=["example_ids"]).column("example_ids").to_pylist()
        items += len(ids)
        examples += sum(len(i) for i in ids)
    nbytes = sum((path / f).stat().st_size for f in names)
    manifest = json.loads(json.dumps(manifest))
    manifest["shards"].append({"id": shard_id, "files": names, "items": items, "examples": examples, "bytes": nbytes})
    c = manifest["counts"]
    c["items"] += items
    c["examples"] += examples
    c["pairs"] += items * len(manifest["matrices"])
    c["shards"] += 1
    c["bytes"] += nbytes
    write_json(path / MANIFEST, manifest)
    return manifest


def matrices_of(manifest: dict) -> list[MatrixInfo]:
    return [MatrixInfo(m["name"], m["layer"], m["role"], m["d_out"], m["d_in"]) for m in manifest["matrices"]]


def columns_for(manifest: dict, matrices: Sequence[str] | None = None) -> list[str]:
    """The Parquet columns needed to rebuild the pairs of ``matrices`` (all when None), metadata first."""
    rows = _select(manifest, matrices)
    cols = ["pair_id", "split_key", "n_rows"]
    for m in rows:
        for c in (m["input_column"], m["grad_column"], m["dense_column"], *(m["adapter_columns"] or [])):
            if c and c not in cols:
                cols.append(c)
    return cols


def _select(manifest: dict, matrices: Sequence[str] | None) -> list[dict]:
    by_name = {m["name"]: m for m in manifest["matrices"]}
    if matrices is None:
        return list(by_name.values())
    if isinstance(matrices, str):
        matrices = [matrices]
    unknown = [n for n in matrices if n not in by_name]
    if unknown:
        raise PairDataError(f"the dataset has no pairs for {unknown[:3]}; it holds {len(by_name)} matrices, "
                            f"e.g. {next(iter(by_name))!r} (see PairDataset.matrices)")
    return [by_name[n] for n in matrices]


# ---------------------------------------------------------------------------------------------
# Pair math from captures (writer side)


@dataclass
class PairRecord:
    """One item before encoding: factors per input column / matrix, and the adapters after steps."""

    pair_id: str
    example_ids: list[str]
    text_sha256: list[str]
    split_key: str
    loss: float
    inputs: dict[str, Tensor]  # input owner name -> X [R, d_in]
    output_grads: dict[str, Tensor]  # matrix name -> D [R, d_out]
    owners: dict[str, str]  # matrix name -> input owner name (key of ``inputs``)
    adapters: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (A_T, B_T)

    @property
    def n_rows(self) -> int:
        return next(iter(self.output_grads.values())).shape[0]


def input_owners(cap: Capture) -> dict[str, str]:
    """Matrix name -> the first captured matrix that reads the very same input tensor (itself if none)."""
    owners, seen = {}, {}
    for m in cap.matrices:
        owners[m.name] = seen.setdefault(id(cap.inputs[m.name]), m.name)
    return owners


def records_from_capture(cap: Capture, groups: Sequence[Sequence[int]], meta: Sequence[dict],
                         owners: Mapping[str, str]) -> list[PairRecord]:
    """One record per group of batch rows: the factors of the group's gradient (the sum of its examples'
    gradients) are its examples' factors stacked, X = [X_1; X_2; ...] and D = [D_1; D_2; ...].

    ``meta[i]`` holds pair_id, example_ids, text_sha256 and split_key of group i; ``owners`` maps each
    matrix to the module whose input column holds its X (``input_owners`` or each matrix itself).
    """
    records = []
    for group, info in zip(groups, meta):
        inputs, grads = {}, {}
        for m in cap.matrices:
            parts = [cap.factors(m.name, b) for b in group]
            grads[m.name] = torch.cat([d for _, d in parts])
            owner = owners[m.name]
            if owner not in inputs:
                inputs[owner] = torch.cat([x for x, _ in parts])
        records.append(PairRecord(info["pair_id"], list(info["example_ids"]), list(info["text_sha256"]),
                                  info["split_key"], float(cap.loss[list(group)].sum()), inputs, grads, dict(owners)))
    return records


def records_after_steps(probe, input_ids: Tensor, attention_mask: Tensor, meta: Sequence[dict], steps: int,
                        lr: float, owners: Mapping[str, str]) -> list[PairRecord]:
    """Per example: T real SGD steps of its PEFT LoRA adapters on its own loss, from the recorded init.

    Records the adapters (A_T, B_T) and the mean full gradient over the T steps, whose factors are the
    steps' factors stacked, X = [X_1; ...; X_T] and D = [D_1; ...; D_T] / T (step t's gradient is taken
    at the adapted weights W + s B_t A_t). ``loss`` is the loss at the init. The probe is reset after
    each example, so every record starts from the same A0, B0. ``probe`` is a ``LoraProbe``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 for step modes, got {steps}")
    params = probe.lora_parameters()
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    records = []
    for b, info in enumerate(meta):
        probe.reset()
        xs: dict[str, list[Tensor]] = {}
        ds: dict[str, list[Tensor]] = {}
        loss0 = None
        for _ in range(steps):
            cap = probe.capture(input_ids[b:b + 1], attention_mask[b:b + 1])
            loss0 = float(cap.loss[0]) if loss0 is None else loss0
            for m in cap.matrices:
                x, d = cap.factors(m.name, 0)
                ds.setdefault(m.name, []).append(d / steps)
                if owners[m.name] == m.name:  # an owner comes before the modules that share its input
                    xs.setdefault(m.name, []).append(x)
            for key, p in params.items():
                p.grad = cap.extra_grads[key].detach().clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
        adapters = {m.name: (params[m.name + ".A"].detach().clone(), params[m.name + ".B"].detach().clone())
                    for m in probe.matrices}
        records.append(PairRecord(info["pair_id"], list(info["example_ids"]), list(info["text_sha256"]),
                                  info["split_key"], loss0, {k: torch.cat(v) for k, v in xs.items()},
                                  {k: torch.cat(v) for k, v in ds.items()}, dict(owners), adapters))
    probe.reset()
    return records


# ---------------------------------------------------------------------------------------------
# Row encoding / decoding


def encode_tensor(t: Tensor, dtype: str) -> bytes:
    torch_dtype, np_dtype, _ = DTYPES[dtype]
    t = t.detach().to("cpu", torch_dtype).contiguous()
    return (t.view(torch.int16) if torch_dtype == torch.bfloat16 else t).numpy().tobytes()


def decode_tensor(buf: bytes, shape: Sequence[int], dtype: str, device: str | torch.device = "cpu") -> Tensor:
    """One stored tensor back as fp32 (inverse of ``encode_tensor``)."""
    return _decode_stack([buf], dtype, [tuple(shape)], device)[0]


def _decode_stack(bufs: Sequence[bytes], dtype: str, row_shape: Sequence[tuple[int, ...]], device) -> Tensor:
    """Stack decoded tensors [N, *shape] in fp32; rows of unequal first dims are zero-padded at the end
    (zero factor rows add nothing to G = D^T X)."""
    torch_dtype, _, itemsize = DTYPES[dtype]
    for b, shape in zip(bufs, row_shape):
        if len(b) != itemsize * int(np.prod(shape)):
            raise PairDataError(f"a stored tensor has {len(b)} bytes, expected shape {tuple(shape)} in {dtype}: corrupt file?")
    lead = max(s[0] for s in row_shape)
    rest = tuple(row_shape[0][1:])
    if all(s[0] == lead for s in row_shape):
        flat = torch.frombuffer(bytearray().join(bufs), dtype=torch.int16 if torch_dtype == torch.bfloat16 else torch.float32)
        out = flat.view(torch_dtype).reshape(len(bufs), lead, *rest)
    else:
        out = torch.zeros(len(bufs), lead, *rest, dtype=torch_dtype)
        for i, (b, s) in enumerate(zip(bufs, row_shape)):
            flat = torch.frombuffer(bytearray(b), dtype=torch.int16 if torch_dtype == torch.bfloat16 else torch.float32)
            out[i, : s[0]] = flat.view(torch_dtype).reshape(s)
    return out.to(device=device, dtype=torch.float32)


def encode_records(records: Sequence[PairRecord], manifest: dict, shard: str | None = None) -> pa.Table:
    """Encode records into one Arrow table with the dataset's schema (see the module docstring)."""
    dtype, storage = manifest["dtype"], manifest["storage"]
    mode, steps = manifest["mode"], manifest["steps"]
    cols: dict[str, list] = {f.name: [] for f in META_SCHEMA}
    tensor_cols: dict[str, list[bytes]] = {}
    for rec in records:
        for k, v in (("pair_id", rec.pair_id), ("example_ids", rec.example_ids), ("text_sha256", rec.text_sha256),
                     ("split_key", rec.split_key), ("n_rows", rec.n_rows), ("loss", rec.loss), ("mode", mode),
                     ("steps", steps), ("proxy_sha256", manifest["proxy"]["weights_sha256"]),
                     ("lora_fingerprint", manifest["lora_fingerprint"]), ("dtype", dtype),
                     ("schema_version", SCHEMA_VERSION)):
            cols[k].append(v)
        written = set()
        for m in manifest["matrices"]:
            name = m["name"]
            d, x = rec.output_grads[name], rec.inputs[rec.owners[name]]
            if storage != "dense":
                if m["input_column"] not in written:
                    written.add(m["input_column"])
                    tensor_cols.setdefault(m["input_column"], []).append(encode_tensor(x, dtype))
                tensor_cols.setdefault(m["grad_column"], []).append(encode_tensor(d, dtype))
            if storage != "factors":
                g = d.double().T @ x.double()  # fp64 accumulation: the dense copy is as exact as the factors
                tensor_cols.setdefault(m["dense_column"], []).append(encode_tensor(g, dtype))
            if m["adapter_columns"]:
                a, b = rec.adapters[name]
                tensor_cols.setdefault(m["adapter_columns"][0], []).append(encode_tensor(a, dtype))
                tensor_cols.setdefault(m["adapter_columns"][1], []).append(encode_tensor(b, dtype))
    arrays = [pa.array(cols[f.name], type=f.type) for f in META_SCHEMA]
    fields = list(META_SCHEMA)
    described = column_descriptions(manifest)
    for name, bufs in tensor_cols.items():
        if len(bufs) != len(records):
            raise AssertionError(f"column {name} has {len(bufs)} values for {len(records)} records")
        arrays.append(pa.array(bufs, type=pa.binary()))
        fields.append(pa.field(name, pa.binary(), metadata={"r2f": json.dumps(described[name])}))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def column_descriptions(manifest: dict) -> dict[str, dict]:
    """What each tensor column holds: kind, shape ('R' = the row's n_rows), dtype, and the matrices it
    belongs to (module name, layer, role). Written into each Parquet field's metadata under 'r2f'."""
    out: dict[str, dict] = {}
    r, dtype = manifest["lora"]["r"], manifest["dtype"]
    by_name = {m["name"]: m for m in manifest["matrices"]}
    for col, info in manifest["input_columns"].items():
        out[col] = {"kind": "factor X", "shape": ["R", info["d_in"]], "dtype": dtype,
                    "matrices": [{"name": n, "layer": by_name[n]["layer"], "role": by_name[n]["role"]} for n in info["shared_by"]]}
    for m in manifest["matrices"]:
        who = [{"name": m["name"], "layer": m["layer"], "role": m["role"]}]
        if m["grad_column"]:
            out[m["grad_column"]] = {"kind": "factor D", "shape": ["R", m["d_out"]], "dtype": dtype, "matrices": who}
        if m["dense_column"]:
            out[m["dense_column"]] = {"kind": "dense G", "shape": [m["d_out"], m["d_in"]], "dtype": dtype, "matrices": who}
        if m["adapter_columns"]:
            out[m["adapter_columns"][0]] = {"kind": "adapter A_T", "shape": [r, m["d_in"]], "dtype": dtype, "matrices": who}
            out[m["adapter_columns"][1]] = {"kind": "adapter B_T", "shape": [m["d_out"], r], "dtype": dtype, "matrices": who}
    return out


def row_bytes(manifest: dict, n_rows: int) -> dict[str, int]:
    """Bytes one row stores per tensor column, for ``n_rows`` factor rows (for sizing files and reports)."""
    item = DTYPES[manifest["dtype"]][2]
    r = manifest["lora"]["r"]
    out: dict[str, int] = {}
    for col, info in manifest["input_columns"].items():
        out[col] = n_rows * info["d_in"] * item
    for m in manifest["matrices"]:
        if m["grad_column"]:
            out[m["grad_column"]] = n_rows * m["d_out"] * item
        if m["dense_column"]:
            out[m["dense_column"]] = m["d_out"] * m["d_in"] * item
        if m["adapter_columns"]:
            out[m["adapter_columns"][0]] = r * m["d_in"] * item
            out[m["adapter_columns"][1]] = m["d_out"] * r * item
    return out


def max_rows_per_file(manifest: dict, n_rows: int, requested: int) -> int:
    """``requested`` capped so that no column chunk of a file exceeds ``MAX_COLUMN_BYTES_PER_FILE``."""
    biggest = max(row_bytes(manifest, n_rows).values())
    return max(1, min(requested, MAX_COLUMN_BYTES_PER_FILE // biggest))


# ---------------------------------------------------------------------------------------------
# Reader


@dataclass
class PairTensors:
    """The pairs of one matrix for N items, fp32.

    ``full`` is G [N, d_out, d_in]; ``grad_a`` [N, r, d_in] and ``grad_b`` [N, d_out, r] are the LoRA
    gradients at the recorded init (A0, B0). ``adapter_a`` [N, r, d_in] / ``adapter_b`` [N, d_out, r]
    hold A_T / B_T after the LoRA steps in step modes (else None). ``pair_ids`` name the items.
    """

    grad_a: Tensor
    grad_b: Tensor
    full: Tensor
    adapter_a: Tensor | None = None
    adapter_b: Tensor | None = None
    pair_ids: list[str] = field(default_factory=list)
    acts: tuple[Tensor, Tensor] | None = None  # activation_stats of the inputs (factor storage only)

    def as_tuple(self) -> tuple:
        """``(grad_a, grad_b, full, acts)``, the per-matrix batch entry ``DecoderSet.stack`` reads."""
        return self.grad_a, self.grad_b, self.full, self.acts


@functools.lru_cache(maxsize=4096)
def _init_cached(spec_json: str, name: str, layer: int, role: str, d_out: int, d_in: int, device: str):
    a0, b0 = init_factors(LoraSpec.model_validate_json(spec_json), MatrixInfo(name, layer, role, d_out, d_in))
    return a0.to(device), b0.to(device)


def _column(batch: Any, name: str) -> list:
    if isinstance(batch, pa.Table):
        if name not in batch.column_names:
            raise PairDataError(f"the batch has no column {name!r}: read it with columns=PairDataset.columns(...)")
        return batch.column(name).to_pylist()
    if name not in batch:
        raise PairDataError(f"the batch has no column {name!r}: read it with columns=PairDataset.columns(...)")
    col = batch[name]
    return col.tolist() if isinstance(col, np.ndarray) else list(col)


def pairs_from_batch(batch: Any, manifest: dict, matrices: Sequence[str] | None = None, device: str | torch.device = "cpu",
                     split: str | None = None, heldout_fraction: float | None = None) -> dict[str, PairTensors]:
    """Rebuild the pairs of one batch of rows: a pyarrow Table, or a dict of columns (numpy arrays or lists),
    as ``ray.data.Dataset.iter_batches`` yields them. Returns ``{matrix_name: PairTensors}``.

    ``split`` keeps only 'train' or 'heldout' rows (by ``split_of`` on ``split_key`` with the manifest's
    fraction unless ``heldout_fraction`` is given); a batch can come back with N = 0 rows.
    G and the LoRA gradients are computed on ``device`` (batched matmuls; use "cuda" on a GPU worker).
    """
    _check_split(split)
    chosen = _select(manifest, matrices)
    device = torch.device(device)
    n_rows = [int(v) for v in _column(batch, "n_rows")]
    pair_ids = [str(v) for v in _column(batch, "pair_id")]
    keep = list(range(len(n_rows)))
    if split is not None:
        frac = manifest["split"]["heldout_fraction"] if heldout_fraction is None else heldout_fraction
        keys = _column(batch, "split_key")
        keep = [i for i in keep if split_of(str(keys[i]), frac) == split]
    dtype, s = manifest["dtype"], LoraSpec.model_validate(manifest["lora"]).scaling
    r = manifest["lora"]["r"]
    spec_json = json.dumps(manifest["lora"], sort_keys=True)
    decoded: dict[str, Tensor] = {}

    def tensor(col: str, shape_of) -> Tensor:
        if col not in decoded:
            values = _column(batch, col)
            decoded[col] = _decode_stack([values[i] for i in keep], dtype, [shape_of(n_rows[i]) for i in keep], device)
        return decoded[col]

    out = {}
    for m in chosen:
        a0, b0 = _init_cached(spec_json, m["name"], m["layer"], m["role"], m["d_out"], m["d_in"], str(device))
        if not keep:
            empty = torch.zeros(0, device=device)
            out[m["name"]] = PairTensors(empty.reshape(0, r, m["d_in"]), empty.reshape(0, m["d_out"], r),
                                         empty.reshape(0, m["d_out"], m["d_in"]), pair_ids=[],
                                         acts=(empty.reshape(0, r, r), empty.reshape(0, r, m["d_in"])) if m["grad_column"] else None)
            continue
        if m["grad_column"]:
            x = tensor(m["input_column"], lambda n, m=m: (n, m["d_in"]))
            d = tensor(m["grad_column"], lambda n, m=m: (n, m["d_out"]))
            full = d.transpose(1, 2) @ x
            grad_b = s * d.transpose(1, 2) @ (x @ a0.T)
            grad_a = s * (d @ b0).transpose(1, 2) @ x
            acts = activation_stats(x, a0)
        else:
            full = tensor(m["dense_column"], lambda n, m=m: (m["d_out"], m["d_in"]))
            grad_b = s * full @ a0.T
            grad_a = s * b0.T @ full
            acts = None
        adapter_a = adapter_b = None
        if m["adapter_columns"]:
            adapter_a = tensor(m["adapter_columns"][0], lambda n, m=m: (r, m["d_in"]))
            adapter_b = tensor(m["adapter_columns"][1], lambda n, m=m: (m["d_out"], r))
        out[m["name"]] = PairTensors(grad_a, grad_b, full, adapter_a, adapter_b, [pair_ids[i] for i in keep], acts)
    return out


class PairDataset:
    """A committed pair dataset on disk (see the module docstring). Reads stream; nothing loads it whole.

    ``.manifest`` (dict): proxy {model_id, weights_sha256}, lora (spec dict), lora_fingerprint, mode,
    steps, storage ("factors" | "dense" | "both"), dtype, tokens, matrices [{name, layer, role, d_out,
    d_in, input_column, grad_column, dense_column, adapter_columns}], input_columns, split, shards,
    counts {items, examples, pairs, shards, bytes}, schema_version.
    ``.spec`` is the LoraSpec, ``.matrices`` the [MatrixInfo] of the adapted matrices.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.spec = LoraSpec.model_validate(self.manifest["lora"])
        self.matrices = matrices_of(self.manifest)

    def __len__(self) -> int:
        return self.manifest["counts"]["items"]

    def files(self) -> list[str]:
        """Paths of the committed Parquet files, in shard order (pass them to ``ray.data.read_parquet``)."""
        return [str(self.path / f) for shard in self.manifest["shards"] for f in shard["files"]]

    def columns(self, matrices: Sequence[str] | None = None) -> list[str]:
        """Columns to read for ``matrices`` (all when None); feed ``pairs_from_batch`` with batches of them."""
        return columns_for(self.manifest, matrices)

    def pair_ids(self, split: str | None = None) -> list[str]:
        """Ids of the stored items (optionally of one split), reading only two small columns."""
        _check_split(split)
        frac = self.manifest["split"]["heldout_fraction"]
        ids = []
        for f in self.files():
            t = pq.read_table(f, columns=["pair_id", "split_key"])
            for pid, key in zip(t.column("pair_id").to_pylist(), t.column("split_key").to_pylist()):
                if split is None or split_of(key, frac) == split:
                    ids.append(pid)
        return ids

    def input_covariance(self, matrices: Sequence[str] | None = None, split: str | None = None) -> dict[str, Tensor]:
        """E[x x^T] [d_in, d_in] (fp64) of each matrix's stored inputs over the tokens of ``split``'s items:
        the model's forward activations, which calibrate decoders transferred to it (factor storage only;
        matrices that share an input share one covariance)."""
        _check_split(split)
        chosen = _select(self.manifest, matrices)
        if any(not m["input_column"] for m in chosen):
            raise PairDataError(f"{self.path} stores dense gradients only (storage {self.manifest['storage']!r}): "
                                "input covariances need factor storage")
        width = {m["input_column"]: m["d_in"] for m in chosen}
        frac = self.manifest["split"]["heldout_fraction"]
        sums: dict[str, Tensor] = {c: torch.zeros(d, d, dtype=torch.float64) for c, d in width.items()}
        tokens = 0
        for f in self.files():
            table = pq.read_table(f, columns=["n_rows", "split_key", *width])
            keep = [i for i, k in enumerate(table.column("split_key").to_pylist()) if split is None or split_of(k, frac) == split]
            n_rows = table.column("n_rows").to_pylist()
            tokens += sum(n_rows[i] for i in keep)
            if not keep:
                continue
            for col, d in width.items():
                values = table.column(col).to_pylist()
                # Zero-padded rows of shorter items add nothing to X^T X.
                x = _decode_stack([values[i] for i in keep], self.manifest["dtype"], [(n_rows[i], d) for i in keep], "cpu")
                sums[col] += (x.double().transpose(1, 2) @ x.double()).sum(0)
        if not tokens:
            raise PairDataError(f"{self.path} has no items in split {split!r}")
        return {m["name"]: sums[m["input_column"]] / tokens for m in chosen}

    def iter_batches(self, matrices: Sequence[str] | None = None, batch_size: int = 32, device: str | torch.device = "cpu",
                     split: str | None = None, heldout_fraction: float | None = None) -> Iterator[dict[str, PairTensors]]:
        """Stream ``{matrix_name: PairTensors}`` batches of ``batch_size`` items (the last may be smaller),
        reading only the columns of ``matrices`` (all when None), file by file, and rebuilding G and the
        LoRA gradients on ``device``. ``split``: 'train', 'heldout' or None (all)."""
        if batch_size < 1:
            raise PairDataError(f"batch_size must be >= 1, got {batch_size}")
        _check_split(split)
        cols = self.columns(matrices)
        frac = self.manifest["split"]["heldout_fraction"] if heldout_fraction is None else heldout_fraction
        pending: list[pa.Table] = []
        count = 0
        for f in self.files():
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=cols):
                table = pa.Table.from_batches([rb])
                if split is not None:
                    mask = [split_of(k, frac) == split for k in table.column("split_key").to_pylist()]
                    table = table.filter(pa.array(mask, type=pa.bool_()))
                if table.num_rows == 0:
                    continue
                pending.append(table)
                count += table.num_rows
                while count >= batch_size:
                    whole = pa.concat_tables(pending)
                    yield pairs_from_batch(whole.slice(0, batch_size), self.manifest, matrices, device)
                    rest = whole.slice(batch_size)
                    pending, count = ([rest] if rest.num_rows else []), rest.num_rows
        if count:
            yield pairs_from_batch(pa.concat_tables(pending), self.manifest, matrices, device)
