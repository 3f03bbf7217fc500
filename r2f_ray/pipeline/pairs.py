"""The pair-generation stage: proxy text -> (LoRA gradient, full gradient) pairs, with Ray Data.

Flow (the same code on this machine and on a GPU cluster; only ``actors`` / ``gpus_per_actor`` change):

1. Source: the packaged corpora through ``ray.data.from_items``, or Parquet / JSONL / text files through
   ``ray.data.read_parquet`` / ``read_json`` / ``read_text``. Tokenised in Ray tasks (``map_batches``),
   truncated to ``tokens`` tokens (one example per text) or packed (every full ``tokens``-long chunk of
   a text is an example; chunks never cross texts). Texts shorter than ``tokens`` are skipped.
2. Items: examples, or mini-batches of ``examples_per_pair`` consecutive examples. The item list is
   gathered on the driver (token ids only, small) so that resuming can drop finished items.
3. One streaming pipeline over the items still to do: ``ray.data.from_items(items).map_batches(
   PairGenerator, compute=ActorPoolStrategy(size=actors), num_gpus=..., batch_size=...)
   .write_parquet(_staging/<run>/, max_rows_per_file=...)``. ``PairGenerator`` holds the proxy with
   PEFT LoRA adapters (``LoraProbe``) and turns a batch of items into Arrow rows with one real batched
   backward. The actors live for the whole run (loading a model costs seconds).
4. Commit: the run's staging folder is renamed into ``data/shard-<run>`` and the manifest, rewritten
   atomically, lists its files. Readers read only the files the manifest lists.

Resume and safety. Every item has a content-derived id (``pair_id``). A run starts by salvaging what a
killed run left under ``_staging/``: a Parquet file whose footer and ``pair_id`` column read back and
whose provenance columns match is complete (Parquet writes its footer last), so it is committed; any
other file there (half-written at the kill) is deleted. The run then drops every item already
committed before generating, so finished files are never redone and no row is written twice;
appending a larger source only adds the new items. A run killed between the rename and the manifest
write leaves an unlisted ``data/shard-*`` folder, which no reader sees and the commit replaces.
Appending with another proxy, LoRA spec or layout raises ``SpecMismatchError``. One job per output
folder at a time; the folder must be on a filesystem every node sees (workers write, the driver
renames).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from r2f_ray import assets
from r2f_ray.config import MODEL_HELP
from r2f_ray.core.lora import LoraProbe, LoraSpec
from r2f_ray.pairdata import (
    MANIFEST,
    STAGING_DIR,
    PairDataError,
    PairDataset,
    build_manifest,
    commit_shard,
    encode_records,
    input_owners,
    max_rows_per_file,
    open_for_append,
    records_after_steps,
    records_from_capture,
)

SOURCE_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


class PairsConfig(BaseModel):
    """Settings of one pair-generation job (YAML file and/or ``--set key=value``)."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(..., description="dataset folder (created, or appended to when it holds the same kind of pairs)")
    model: str = Field("default", description="proxy: " + MODEL_HELP)
    source: str = Field("lee", description="packaged corpus ('lee', 'wiki') or a Parquet/JSONL/text file or folder")
    text_column: str = Field("text", description="column holding the text in Parquet/JSONL sources")
    max_texts: int | None = Field(None, ge=1, description="read at most this many texts from the source")
    max_examples: int | None = Field(None, ge=1, description="use at most this many examples")
    tokens: int = Field(64, ge=2, description="tokens per example")
    packing: Literal["truncate", "pack"] = Field("truncate", description="one example per text, or every full chunk")
    mode: Literal["single", "minibatch", "single_step", "multi_step"] = "single"
    examples_per_pair: int = Field(1, ge=1, description="examples per mini-batch item (mode minibatch)")
    steps: int = Field(0, ge=0, description="LoRA SGD steps per item: 1 for single_step, T >= 1 for multi_step")
    step_lr: float = Field(0.01, gt=0, description="SGD learning rate of the LoRA steps (step modes)")
    storage: Literal["factors", "dense", "both"] = "factors"
    dtype: Literal["float32", "bfloat16"] = "float32"
    share_inputs: bool = Field(True, description="store an input read by several modules (q/k/v, gate/up) once")
    lora: LoraSpec = LoraSpec()
    heldout_fraction: float = Field(0.1, ge=0, le=1, description="share of split keys held out (recorded in the manifest)")
    actors: int = Field(1, ge=1, description="PairGenerator actors (one per GPU on a cluster)")
    cpus_per_actor: float | None = Field(None, gt=0, description="CPUs reserved per actor (its torch threads: at least "
                                         "1); None: 1, or less where that would leave Ray Data under one CPU")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor; None: 1 when the cluster has GPUs")
    batch_size: int = Field(4, ge=1, description="items per actor call (one batched backward)")
    rows_per_file: int = Field(64, ge=1, description="rows per Parquet file (capped further by bytes per column)")

    @model_validator(mode="after")
    def _mode_settings(self) -> "PairsConfig":
        if self.mode == "minibatch" and self.examples_per_pair < 2:
            raise ValueError("mode minibatch needs examples_per_pair >= 2 (use mode single for one example per pair)")
        if self.mode != "minibatch" and self.examples_per_pair != 1:
            raise ValueError(f"examples_per_pair applies to mode minibatch only (mode is {self.mode})")
        if self.mode == "single_step" and self.steps not in (0, 1):
            raise ValueError("mode single_step takes exactly one step; use mode multi_step for steps > 1")
        if self.mode == "multi_step" and self.steps < 1:
            raise ValueError("mode multi_step needs steps >= 1 (the number T of LoRA SGD steps)")
        if self.mode in ("single", "minibatch") and self.steps:
            raise ValueError(f"steps applies to step modes only (mode is {self.mode})")
        return self

    @property
    def num_steps(self) -> int:
        return {"single_step": 1, "multi_step": self.steps}.get(self.mode, 0)


# ---------------------------------------------------------------------------------------------
# Source and tokenisation


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    if model == "tiny":
        return assets.byte_tokenizer()
    from transformers import AutoTokenizer

    folder = assets.model_folder(model, progress=False)
    return AutoTokenizer.from_pretrained(folder)


def tokenize_batch(batch: dict, model: str, tokens: int, packing: str) -> dict:
    """Ray Data UDF: one output row per input text with its examples (possibly none when it is short)."""
    tok = _tokenizer(model)
    out: dict[str, list] = {"text_sha256": [], "n_tokens": [], "chunks": []}
    for text in batch["text"]:
        text = text if isinstance(text, str) else ""
        ids = tok(text, add_special_tokens=False)["input_ids"] if text.strip() else []
        n = min(1, len(ids) // tokens) if packing == "truncate" else len(ids) // tokens
        out["text_sha256"].append(hashlib.sha256(text.encode()).hexdigest())
        out["n_tokens"].append(len(ids))
        out["chunks"].append([ids[k * tokens:(k + 1) * tokens] for k in range(n)])
    return out


def read_source(config: PairsConfig):
    """The source texts as a Ray Dataset with one column ``text``, in a deterministic order."""
    import ray

    if config.source in assets.CORPORA:
        texts = []
        for t in assets.corpus_texts(config.source):
            texts.append(t)
            if config.max_texts and len(texts) >= config.max_texts:
                break
        return ray.data.from_items([{"text": t} for t in texts])
    path = Path(config.source)
    if not path.exists():
        raise ValueError(f"source {config.source!r} is neither a packaged corpus {sorted(assets.CORPORA)} nor an existing "
                         "file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES)
    kinds = {SOURCE_SUFFIXES.get(p.suffix) for p in files}
    if not files or None in kinds:
        raise ValueError(f"source {path} holds no readable text files: use .parquet, .jsonl/.json (one object per "
                         f"line) or .txt (one text per line)")
    if len(kinds) > 1:
        raise ValueError(f"source {path} mixes file kinds {sorted(kinds)}; point it at one kind")
    kind = kinds.pop()
    names = [str(p) for p in files]
    if kind == "text":
        ds = ray.data.read_text(names)
    else:
        ds = ray.data.read_parquet(names) if kind == "parquet" else ray.data.read_json(names, lines=True)
        columns = ds.columns()
        if config.text_column not in columns:
            raise ValueError(f"source {path} has no column {config.text_column!r} (it has {columns}); "
                             "set text_column to the column holding the text")
        ds = ds.select_columns([config.text_column]).rename_columns({config.text_column: "text"}) \
            if config.text_column != "text" else ds.select_columns(["text"])
    return ds.limit(config.max_texts) if config.max_texts else ds


def build_items(config: PairsConfig, texts: list[dict]) -> list[dict]:
    """Items (examples, or mini-batches of consecutive examples) from the tokenised texts, in order."""
    if not texts:
        raise ValueError(f"source {config.source!r} has no texts (empty corpus or files)")
    examples, seen = [], set()
    for row in texts:
        sha = row["text_sha256"]
        if sha in seen:  # the same text twice would give duplicate example ids
            continue
        seen.add(sha)
        for k, chunk in enumerate(row["chunks"]):
            examples.append({"example_id": f"{sha[:16]}#{k}", "text_sha256": sha, "input_ids": [int(t) for t in chunk]})
    if not examples:
        longest = max(int(r["n_tokens"]) for r in texts)
        raise ValueError(f"no text of source {config.source!r} has the minimum of tokens={config.tokens} tokens "
                         f"({len(texts)} texts, the longest has {longest}); lower tokens or use longer texts")
    if config.max_examples:
        examples = examples[:config.max_examples]
    k = config.examples_per_pair
    items = []
    for start in range(0, len(examples) - k + 1, k):
        group = examples[start:start + k]
        ids = [e["example_id"] for e in group]
        pair_id = ids[0] if k == 1 else "mb:" + hashlib.sha256("|".join(ids).encode()).hexdigest()[:16]
        items.append({"pair_id": pair_id, "example_ids": ids, "text_sha256": [e["text_sha256"] for e in group],
                      "split_key": group[0]["text_sha256"][:16] if k == 1 else pair_id,
                      "input_ids": [e["input_ids"] for e in group]})
    if not items:
        raise ValueError(f"{len(examples)} examples make no mini-batch of examples_per_pair={k}")
    return items


# ---------------------------------------------------------------------------------------------
# The actor


def _load_probe(config: PairsConfig, device: str) -> tuple[assets.LoadedModel, LoraProbe]:
    loaded = assets.load_model(config.model, device=device)
    return loaded, LoraProbe(loaded.model, config.lora)


def _layout(probe: LoraProbe, share_inputs: bool) -> dict[str, str]:
    """Which module's input column holds each matrix's X (from one tiny capture: sharing is by identity)."""
    if not share_inputs:
        return {m.name: m.name for m in probe.matrices}
    device = next(probe.model.parameters()).device
    return input_owners(probe.capture(torch.tensor([[1, 2, 3]], device=device)))


class PairGenerator:
    """Ray Data actor: holds the proxy with seeded PEFT LoRA adapters; batch of items -> Arrow rows."""

    def __init__(self, config: dict, manifest: dict):
        self.config = PairsConfig.model_validate(config)
        self.manifest = manifest
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, round(self.config.cpus_per_actor)))
        loaded, self.probe = _load_probe(self.config, self.device)
        if loaded.weights_sha256 != manifest["proxy"]["weights_sha256"]:
            raise RuntimeError(f"the actor loaded other weights for {self.config.model!r} than the dataset's proxy "
                               f"({loaded.weights_sha256[:12]} != {manifest['proxy']['weights_sha256'][:12]})")
        self.owners = _layout(self.probe, self.config.share_inputs)

    def __call__(self, batch: dict):
        meta = [{"pair_id": str(p), "example_ids": [str(e) for e in ex], "text_sha256": [str(s) for s in sha],
                 "split_key": str(k)}
                for p, ex, sha, k in zip(batch["pair_id"], batch["example_ids"], batch["text_sha256"], batch["split_key"])]
        rows = [[int(t) for t in ids] for item in batch["input_ids"] for ids in item]
        input_ids = torch.tensor(rows, device=self.device)
        mask = torch.ones_like(input_ids)
        if self.config.num_steps:
            records = records_after_steps(self.probe, input_ids, mask, meta, self.config.num_steps, self.config.step_lr,
                                          self.owners)
        else:
            k = self.config.examples_per_pair
            cap = self.probe.capture(input_ids, mask)
            records = records_from_capture(cap, [range(i * k, (i + 1) * k) for i in range(len(meta))], meta, self.owners)
        return encode_records(records, self.manifest)


# ---------------------------------------------------------------------------------------------
# The job


def _manifest_for(config: PairsConfig) -> dict:
    loaded, probe = _load_probe(config, "cpu")
    return build_manifest(model_id=loaded.model_id, weights_sha256=loaded.weights_sha256, spec=config.lora,
                          matrices=probe.matrices, input_owner=_layout(probe, config.share_inputs), mode=config.mode,
                          storage=config.storage, dtype=config.dtype, tokens=config.tokens, packing=config.packing,
                          examples_per_pair=config.examples_per_pair, steps=config.num_steps,
                          step_lr=config.step_lr if config.num_steps else 0.0, heldout_fraction=config.heldout_fraction)


def salvage(out: Path, manifest: dict) -> tuple[dict, int]:
    """Commit the complete files a killed run left in ``_staging/`` and delete the rest (see the module
    docstring). Returns the manifest and the number of items salvaged."""
    staging = out / STAGING_DIR
    if not staging.is_dir():
        return manifest, 0
    committed = set(PairDataset(out).pair_ids()) if manifest["shards"] else set()
    salvaged = 0
    for run_dir in sorted(p for p in staging.iterdir() if p.is_dir()):
        kept = 0
        for f in sorted(run_dir.iterdir()):
            try:
                t = pq.read_table(f, columns=["pair_id", "proxy_sha256", "lora_fingerprint"])
                ids = t.column("pair_id").to_pylist()
                ok = (f.suffix == ".parquet" and set(t.column("proxy_sha256").to_pylist()) == {manifest["proxy"]["weights_sha256"]}
                      and set(t.column("lora_fingerprint").to_pylist()) == {manifest["lora_fingerprint"]}
                      and len(set(ids)) == len(ids) and not committed.intersection(ids))
            except Exception:  # no footer: the file was being written when the run died
                ok = False
            if ok:
                committed.update(ids)
                kept += len(ids)
            else:
                f.unlink()
        if kept:
            manifest = commit_shard(out, manifest, run_dir.name, run_dir)
            salvaged += kept
    shutil.rmtree(staging, ignore_errors=True)
    return manifest, salvaged


def run_pairs(config: PairsConfig, progress: bool = True) -> dict:
    """Generate (or resume) a pair dataset; returns a summary of what this run did and the dataset totals."""
    import ray

    t0 = time.time()
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise PairDataError(f"output path {out} is a file; give a folder (new or holding a pair dataset)")
    manifest = open_for_append(out, _manifest_for(config))  # refuses a different proxy / spec before any work
    manifest, salvaged = salvage(out, manifest)
    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    ctx.execution_options.preserve_order = True  # deterministic item order: the same job makes the same items
    ctx.enable_progress_bars, ctx.print_on_execution_start = progress, False
    try:
        summary = _generate(config, out, manifest)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved
    summary.update(items_salvaged=salvaged, wall_s=round(time.time() - t0, 2))
    return summary


def _cpus_per_actor(config: PairsConfig, num_gpus: float, cluster_cpus: float) -> float:
    """CPU actors that reserve every CPU leave none for Ray Data's read and write tasks: once the object
    store fills, the job waits forever. The default leaves one CPU (at least a quarter per actor); an
    explicit value that leaves none is refused."""
    if config.cpus_per_actor is None:
        return 1.0 if num_gpus else min(1.0, max(0.25, (cluster_cpus - 1) / config.actors))
    if not num_gpus and config.actors * config.cpus_per_actor >= cluster_cpus:
        fit = max(0.25, (cluster_cpus - 1) / config.actors)
        raise PairDataError(f"{config.actors} actor(s) x cpus_per_actor={config.cpus_per_actor:g} reserve all "
                            f"{cluster_cpus:g} CPUs of the Ray cluster, leaving none for Ray Data's read and write "
                            f"tasks (the job would hang): use fewer actors or --set cpus_per_actor={fit:g}")
    return config.cpus_per_actor


def _generate(config: PairsConfig, out: Path, manifest: dict) -> dict:
    import ray

    num_gpus = config.gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    config = config.model_copy(update={"cpus_per_actor": _cpus_per_actor(config, num_gpus,
                                                                          ray.cluster_resources().get("CPU", 0.0))})
    texts = read_source(config).map_batches(tokenize_batch, batch_size=64, fn_kwargs={
        "model": config.model, "tokens": config.tokens, "packing": config.packing}).take_all()
    items = build_items(config, texts)
    done = set(PairDataset(out).pair_ids()) if manifest["shards"] else set()
    todo = [it for it in items if it["pair_id"] not in done]
    n_rows = config.examples_per_pair * (config.tokens - 1) * max(1, config.num_steps)
    rows_per_file = max_rows_per_file(manifest, n_rows, config.rows_per_file)

    gen_s = 0.0
    if todo:
        run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        staged = out / STAGING_DIR / run_id
        t = time.time()
        ray.data.from_items(todo).map_batches(
            PairGenerator, fn_constructor_kwargs={"config": config.model_dump(mode="json"), "manifest": manifest},
            compute=ray.data.ActorPoolStrategy(size=config.actors), batch_size=config.batch_size,
            num_cpus=config.cpus_per_actor, **({"num_gpus": num_gpus} if num_gpus else {}),
        ).write_parquet(str(staged), max_rows_per_file=rows_per_file)
        gen_s = time.time() - t
        manifest = commit_shard(out, manifest, run_id, staged)
        shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    pairs = len(todo) * len(manifest["matrices"])
    return {
        "output": str(out), "manifest": str(out / MANIFEST), "proxy": manifest["proxy"]["model_id"],
        "mode": config.mode, "storage": config.storage, "dtype": config.dtype,
        "matrices": len(manifest["matrices"]), "texts_read": len(texts), "items_available": len(items),
        "items_skipped_already_committed": len(items) - len(todo),
        "items_written": len(todo), "pairs_written": pairs, "actors": config.actors, "gpus_per_actor": num_gpus,
        "cpus_per_actor": config.cpus_per_actor,
        "rows_per_file": rows_per_file, "generate_s": round(gen_s, 2),
        "pairs_per_s": round(pairs / gen_s, 2) if gen_s else None,
        "dataset": dict(manifest["counts"]),
    }


def format_summary(s: dict) -> str:
    c = s["dataset"]
    rate = f"{s['pairs_per_s']:.1f}" if s["pairs_per_s"] else "-"
    return "\n".join([
        f"r2f pairs: {s['proxy']}, mode {s['mode']}, {s['storage']} in {s['dtype']}, {s['matrices']} matrices, "
        f"{s['actors']} actor(s) x {s['gpus_per_actor']:g} GPU",
        f"{'':<26}{'this run':>12}{'dataset':>12}",
        f"{'items (rows)':<26}{s['items_written']:>12}{c['items']:>12}",
        f"{'pairs (item x matrix)':<26}{s['pairs_written']:>12}{c['pairs']:>12}",
        f"{'committed runs (shards)':<26}{int(bool(s['items_written'])):>12}{c['shards']:>12}",
        f"salvaged {s['items_salvaged']} items of a killed run; skipped {s['items_skipped_already_committed']} items "
        f"already committed (salvaged ones included); dataset size {c['bytes'] / 2**20:.1f} MiB",
        f"generation {s['generate_s']:.1f} s wall ({rate} pairs/s incl. actor start-up), total {s['wall_s']:.1f} s",
        f"manifest: {s['manifest']}",
    ])
