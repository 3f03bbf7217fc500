"""Decoder training stage: Ray Train ``TorchTrainer`` + DeepSpeed, data from the Parquet pairs via Ray Data.

Every worker holds the whole ``DecoderSet`` (all decoders of the model, stacked per role and shape) in a
DeepSpeed engine (ZeRO stage from the config; bf16 on GPU only) and trains on its Ray Data shard of the
training split. Per epoch:

1. (first epoch of a fresh run) a pass over the shard collects ridge statistics, summed over workers,
   and gives every decoder with a closed-form fit its start;
2. one pass of DeepSpeed steps on the chosen loss;
3. a pass over the held-out shard: per-matrix cosine to the true gradient, summed over workers;
4. a checkpoint (DeepSpeed engine state on every rank, plus the best decoders so far and the training
   history from rank 0) through ``ray.train.report``; early stopping on the held-out mean cosine.

A rerun with the same output resumes from the latest checkpoint of the run (Ray Train restores it), so a
killed job loses at most one epoch. The driver writes the decoder bank from the best decoders at the end.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from r2f_ray.config import MIN_TOKEN_WEIGHT_FACTS
from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.decoders import DECODERS, LOSSES, DecoderSet, RidgeStats, baseline_cosines
from r2f_ray.pairdata import PairDataset, pairs_from_batch, split_of

STATE = "train_state.json"
BEST = "best_decoders.safetensors"
ENGINE_TAG = "engine"


class EarlyStopping(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patience: int = Field(3, ge=1, description="epochs without held-out improvement before stopping")
    min_delta: float = Field(1e-4, ge=0, description="smallest held-out mean-cosine gain that counts")


class TrainConfig(BaseModel):
    """Decoder training, from a pair dataset to a decoder bank."""

    model_config = ConfigDict(extra="forbid")

    pairs: str = Field(..., description="pair dataset folder (from `r2f pairs`)")
    output: str = Field(..., description="decoder bank folder to write")
    storage_path: str | None = Field(None, description="Ray Train run storage (checkpoints); default <output>.runs")
    kind: str = Field("auto", description="decoder kind for every role; auto: sketch for the zero-offset "
                                         "LoRA init, mlp for the standard one")
    kinds: dict[str, str] = Field(default_factory=dict, description="decoder kind per role, e.g. {down_proj: sketch}")
    options: dict[str, dict] = Field(default_factory=dict, description="options per kind, e.g. {mlp: {hidden: 64}}")
    matrices: list[str] | None = Field(None, description="roles or matrix names to train (default: all in the pairs)")
    loss: str = Field("cosine", description="cosine, mse or combined")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(8, ge=1, description="pairs per worker per step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ridge: float = Field(1e-3, ge=0, description="relative ridge of the closed-form start")
    early_stopping: EarlyStopping = EarlyStopping()
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float | None = Field(None, gt=0, description="default: leave one CPU of the cluster to Ray Data")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    bf16: bool | None = Field(None, description="bf16 training; default: on with GPUs, off on CPU")
    num_to_keep: int = Field(2, ge=1, description="Ray Train checkpoints kept")
    max_failures: int = Field(0, ge=0, description="worker failures Ray Train recovers from in one run")
    token_weight_model: str | None = Field(
        None, description="fit the activation decoders' token weights on answer gradients of this model, the pairs' "
                          "proxy (a model spec, e.g. default; see `r2f token-weights`), before training starts; None skips")
    token_weight_facts: int = Field(48, ge=MIN_TOKEN_WEIGHT_FACTS, description="packaged facts the token weights are fitted on")
    token_weight_texts: int = Field(48, ge=0, description="training-split packaged Wikipedia texts (loss on every token) "
                                                          "the token weights are also fitted on")
    seed: int = 0

    def resolved_kinds(self, spec_init: str, roles: list[str]) -> dict[str, str]:
        default = self.kind if self.kind != "auto" else ("sketch" if spec_init == "zero_offset" else "mlp")
        unknown = sorted(set(self.kinds) - set(roles))
        if unknown:
            raise ValueError(f"kinds names roles {unknown} that the chosen matrices do not have ({sorted(set(roles))})")
        return {role: self.kinds.get(role, default) for role in roles}


def select_matrices(dataset: PairDataset, wanted: list[str] | None):
    if wanted is None:
        return list(dataset.matrices)
    chosen = [m for m in dataset.matrices if m.role in wanted or m.name in wanted]
    missing = [w for w in wanted if not any(m.role == w or m.name == w for m in dataset.matrices)]
    if missing:
        raise ValueError(f"the pair dataset has no matrices {missing}; it has roles "
                         f"{sorted({m.role for m in dataset.matrices})} over {len(dataset.matrices)} matrices")
    return chosen


def _keep_split(table: pa.Table, split: str, fraction: float) -> pa.Table:
    mask = [split_of(k, fraction) == split for k in table.column("split_key").to_pylist()]
    return table.filter(pa.array(mask, type=pa.bool_()))


def _ds_config(cfg: dict, use_bf16: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg["batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg["zero_stage"]},
        "bf16": {"enabled": use_bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


class _Objective(torch.nn.Module):
    """The DeepSpeed module: the decoder set and its loss, so ``engine(batch)`` runs every group."""

    def __init__(self, decoders: DecoderSet, loss: str):
        super().__init__()
        self.decoders, self.loss = decoders, loss

    def forward(self, stacked: dict):
        return self.decoders.losses(stacked, self.loss)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _gathered_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 decoder parameters on every rank (ZeRO-3 partitions them: gather collectively)."""
    import deepspeed

    decoders = engine.module.decoders
    params = list(decoders.parameters())
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in decoders.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in decoders.state_dict().items()}


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed
    import ray.train
    from ray.train.torch import get_device

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    torch.manual_seed(cfg["seed"])
    dataset = PairDataset(cfg["pairs"])
    matrices = [m for m in dataset.matrices if m.name in set(cfg["names"])]
    names = [m.name for m in matrices]
    decoders = DecoderSet(matrices, dataset.spec, cfg["kinds"], cfg["options"])
    use_bf16 = bool(cfg["bf16"]) and device.type == "cuda"

    state = {"epoch": 0, "best_cosine": -math.inf, "best_epoch": 0, "since_best": 0, "history": [],
             "identity": cfg["identity"], "baselines": None, "resumed_at": []}
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    train_shard = ray.train.get_dataset_shard("train")
    heldout_shard = ray.train.get_dataset_shard("heldout")

    def batches(shard):
        for b in shard.iter_batches(batch_size=cfg["batch_size"], batch_format="pyarrow"):
            pairs = pairs_from_batch(b, dataset.manifest, names, device)
            stacked = decoders.stack({n: p.as_tuple() for n, p in pairs.items()})
            # Drop the per-matrix tensors before yielding: the generator frame would otherwise keep a
            # second copy of every dense G alive while the caller works on the stacked one.
            del pairs, b
            yield stacked

    if checkpoint is None:
        # Closed-form start: ridge statistics add up over examples, so sum them across workers.
        stats: dict[str, RidgeStats] = {}
        for stacked in batches(train_shard):
            for key, st in decoders.ridge_stats(stacked).items():
                stats[key] = stats[key] + st if key in stats else st
        for key in sorted(k for k, g in decoders.groups.items() if g.fits_ridge):
            group = decoders.groups[key]
            st = stats.get(key) or RidgeStats.zeros(len(group), group.r, group.d_in, group.d_out)
            stats[key] = RidgeStats(*(_all_reduce(t.to(device)).cpu() for t in st.tensors()))
        decoders.init_ridge(stats, cfg["ridge"])

        def summed_scores(score_fn, keys: list[str], grid_of) -> dict[str, torch.Tensor]:
            # One pass over this worker's shard, then summed over workers (zeros where a shard had no batch).
            scores: dict[str, torch.Tensor] = {}
            for stacked in batches(train_shard):
                for key, sc in score_fn(stacked).items():
                    scores[key] = scores[key] + sc if key in scores else sc
            empty = {k: torch.zeros(len(decoders.groups[k]), len(grid_of(decoders.groups[k])), dtype=torch.float64)
                     for k in keys}
            return {k: _all_reduce(scores.get(k, empty[k]).to(device)).cpu() for k in keys}

        # Then the kinds with a calibrated setting (a grid per matrix) score each value on a second pass.
        calibrated = sorted(k for k, g in decoders.groups.items() if g.calibration_grid)
        if calibrated:
            decoders.calibrate(summed_scores(decoders.calibration_scores, calibrated, lambda g: g.calibration_grid))
        # Activation decoders under the zero-offset init: a third pass picks the output-side mix given that one.
        output_side = sorted(k for k, g in decoders.groups.items() if g.output_side)
        if output_side:
            decoders.calibrate_output(summed_scores(decoders.output_scores, output_side, lambda g: g.output_grid))
    else:
        with checkpoint.as_directory() as d:
            saved = json.loads((Path(d) / STATE).read_text())
            if saved["identity"] != cfg["identity"]:
                raise ValueError("the run's checkpoint was made with different pairs, matrices, kinds or LoRA spec; "
                                 "use a new output (or storage_path) for a different training set-up")
            state.update(saved)
            best_state = load_file(str(Path(d) / BEST))
        state["resumed_at"].append(state["epoch"])

    objective = _Objective(decoders, cfg["loss"]).to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    engine = None
    if params:
        # A client torch AdamW rather than the config's "AdamW": DeepSpeed would JIT-compile its CPU Adam
        # (about two minutes of C++ on a fresh machine) for decoders whose optimizer step is negligible.
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                      fused=device.type == "cuda")
        engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=_ds_config(cfg, use_bf16))
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                engine.load_checkpoint(d, tag=ENGINE_TAG, load_module_strict=False)

    def evaluate() -> tuple[torch.Tensor, torch.Tensor, dict | None]:
        """Sums and counts of held-out cosines per matrix over all workers; baselines on the first call."""
        sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        counts = torch.zeros(len(names), dtype=torch.float64, device=device)
        base = torch.zeros(2, len(names), dtype=torch.float64, device=device) if state["baselines"] is None else None
        objective.eval()
        with torch.no_grad():
            for stacked in batches(heldout_shard):
                _, cosines = objective(stacked)
                for n, c in cosines.items():
                    sums[names.index(n)] += c.double().sum()
                    counts[names.index(n)] += c.numel()
                if base is not None:
                    for n, (naive, ceiling) in baseline_cosines(decoders, stacked).items():
                        base[0, names.index(n)] += naive.double().sum()
                        base[1, names.index(n)] += ceiling.double().sum()
        objective.train()
        _all_reduce(sums), _all_reduce(counts)
        baselines = None
        if base is not None:
            _all_reduce(base)
            mean = (base / counts.clamp_min(1)).cpu()
            baselines = {n: {"naive": float(mean[0, i]), "ceiling": float(mean[1, i])} for i, n in enumerate(names)}
        return sums.cpu(), counts.cpu(), baselines

    while state["epoch"] < cfg["epochs"]:
        epoch = state["epoch"] + 1
        t0 = time.time()
        loss_sum, steps = torch.zeros(2, dtype=torch.float64, device=device), 0
        if engine is not None:
            for stacked in batches(train_shard):
                loss, _ = engine(stacked)
                engine.backward(loss)
                engine.step()
                loss_sum += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64, device=device)
                steps += 1
        _all_reduce(loss_sum)
        sums, counts, baselines = evaluate()
        if counts.min() == 0:
            raise ValueError("the held-out split has no pairs for some matrices on this many workers: "
                             "generate more pairs or raise the dataset's held-out fraction")
        if baselines is not None:
            state["baselines"] = baselines
        per_matrix = {n: float(sums[i] / counts[i]) for i, n in enumerate(names)}
        heldout = sum(per_matrix.values()) / len(per_matrix)
        current = _gathered_state(engine, cfg["zero_stage"]) if engine is not None else {}
        improved = heldout > state["best_cosine"] + cfg["min_delta"]
        if improved or best_state is None:
            best_state = current
        if improved:
            state.update(best_cosine=heldout, best_epoch=epoch, since_best=0)
        else:
            state["since_best"] += 1
        by_role: dict[str, list[float]] = {}
        for m in matrices:
            by_role.setdefault(m.role, []).append(per_matrix[m.name])
        record = {"epoch": epoch, "train_loss": float(loss_sum[0] / loss_sum[1].clamp_min(1)),
                  "heldout_cosine": heldout, "heldout_by_role": {r: sum(v) / len(v) for r, v in by_role.items()},
                  "heldout_per_matrix": per_matrix, "epoch_seconds": time.time() - t0, "steps": steps,
                  "heldout_pairs": int(counts[0]), "rank0_pid": os.getpid(),
                  "peak_rss_mib_rank0": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        state["history"].append(record)
        state["epoch"] = epoch
        stop = state["since_best"] >= cfg["patience"]
        with tempfile.TemporaryDirectory() as tmp:
            if engine is not None:
                engine.save_checkpoint(tmp, tag=ENGINE_TAG)
            if rank == 0:
                save_file(best_state, str(Path(tmp) / BEST))
                (Path(tmp) / STATE).write_text(json.dumps(state))
            metrics = {k: v for k, v in record.items() if k != "heldout_per_matrix"}
            ray.train.report({**metrics, "stopped_early": stop}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")
        if rank == 0:
            roles = " ".join(f"{r}={v:.3f}" for r, v in record["heldout_by_role"].items())
            print(f"epoch {epoch}/{cfg['epochs']}: train loss {record['train_loss']:.4f}, held-out cosine "
                  f"{heldout:.4f} ({roles}), {record['epoch_seconds']:.1f} s, {steps} steps/worker x {world} workers",
                  flush=True)
        if stop:
            break


def _cpus_per_worker(config: TrainConfig) -> float:
    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    import ray

    total = ray.cluster_resources().get("CPU", 1.0)
    # Ray Data's read tasks need a CPU too, or streaming into the workers stalls.
    return max(0.25, min(1.0, (total - 1.0) / config.num_workers))


def check_config(config: TrainConfig, overwrite: bool = False):
    """Everything that can be wrong before Ray starts: (dataset, matrices, kinds per role) or a clear error."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}: choose one of {sorted(LOSSES)}")
    output = Path(config.output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists: choose another output or pass --overwrite")
    dataset = PairDataset(config.pairs)
    matrices = select_matrices(dataset, config.matrices)
    kinds = config.resolved_kinds(dataset.spec.init, sorted({m.role for m in matrices}))
    for role, kind in kinds.items():
        if kind not in DECODERS:
            raise ValueError(f"unknown decoder kind {kind!r} for {role}: choose one of {sorted(DECODERS)}")
    one_per_role = list({m.role: m for m in matrices}.values())
    probe = DecoderSet(one_per_role, dataset.spec, kinds, config.options)  # kinds vs the LoRA init, options
    if probe.needs_acts and dataset.manifest["storage"] == "dense":
        raise ValueError("the activation decoder kind reads the inputs X of each pair, which dense pairs do not store: "
                         "generate pairs with --storage factors (or both), or choose another kind")
    return dataset, matrices, kinds


def run_training(config: TrainConfig, overwrite: bool = False) -> dict:
    """Train a decoder bank with Ray Train + DeepSpeed (Ray must be initialised). Returns a summary."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dataset, matrices, kinds = check_config(config, overwrite)
    token_weight_model = _token_weight_model(config, dataset, matrices, kinds)
    output = Path(config.output).resolve()
    names = [m.name for m in matrices]
    fraction = dataset.manifest["split"]["heldout_fraction"]
    ray.data.DataContext.get_current().enable_progress_bars = False  # the epoch lines report progress
    source = ray.data.read_parquet(dataset.files(), columns=dataset.columns(names))
    splits = {s: source.map_batches(_keep_split, fn_kwargs={"split": s, "fraction": fraction}, batch_format="pyarrow")
              for s in ("train", "heldout")}
    identity = {"pairs": str(Path(config.pairs).resolve()), "pairs_counts": dataset.manifest["counts"],
                "lora": dataset.spec.fingerprint(), "names": names, "kinds": kinds, "options": config.options,
                "loss": config.loss}
    loop_config = {"pairs": str(Path(config.pairs).resolve()), "names": names, "kinds": kinds,
                   "options": config.options, "loss": config.loss, "epochs": config.epochs,
                   "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
                   "ridge": config.ridge, "patience": config.early_stopping.patience,
                   "min_delta": config.early_stopping.min_delta, "zero_stage": config.zero_stage,
                   "bf16": config.use_gpu if config.bf16 is None else config.bf16, "seed": config.seed,
                   "identity": identity}
    storage = Path(config.storage_path).resolve() if config.storage_path else output.with_name(output.name + ".runs")
    cpus = _cpus_per_worker(config)
    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config, datasets=splits,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.use_gpu else {})}),
        run_config=RunConfig(name="train", storage_path=str(storage),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.num_to_keep),
                             failure_config=FailureConfig(max_failures=config.max_failures)),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint (see the Ray Train logs under {storage})")
    with result.checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE).read_text())
        best = load_file(str(Path(d) / BEST))
    decoders = DecoderSet(matrices, dataset.spec, kinds, config.options)
    decoders.load_state_dict(best, strict=True)
    best_record = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), state["history"][-1])
    info = {
        "trained": True,
        "pairs": {"path": str(Path(config.pairs).resolve()), "counts": dataset.manifest["counts"],
                  "heldout_fraction": fraction, "mode": dataset.manifest["mode"], "tokens": dataset.manifest["tokens"]},
        "config": config.model_dump(mode="json"),
        "training": {"workers": config.num_workers, "zero_stage": config.zero_stage, "epochs_run": state["epoch"],
                     "best_epoch": state["best_epoch"], "wall_seconds_this_run": wall,
                     "history": [{k: v for k, v in h.items() if k != "heldout_per_matrix"} for h in state["history"]]},
        "heldout": {"per_matrix": best_record["heldout_per_matrix"], "baselines": state["baselines"]},
    }
    bank = DecoderBank(decoders, dataset.manifest["proxy"]["model_id"], dataset.manifest["proxy"]["weights_sha256"], info)
    if token_weight_model is not None:  # on the trained decoders: the request mix depends on their priors
        from r2f_ray.decoder_eval import fit_token_weights_on_facts

        fit_token_weights_on_facts(bank, token_weight_model, config.token_weight_facts, texts=config.token_weight_texts,
                                   progress=True)
    bank.save(output, overwrite=overwrite)
    return {"output": str(output), "storage": str(storage), "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
            "wall_seconds": wall, "history": info["training"]["history"],
            "per_matrix": best_record["heldout_per_matrix"], "baselines": state["baselines"],
            "matrices": [m.__dict__ for m in matrices], "kinds": kinds}


def _token_weight_model(config: TrainConfig, dataset: PairDataset, matrices, kinds):
    """The model token weights are fitted on after training (``assets.LoadedModel``), or None; loaded and
    checked against the pairs' proxy before training starts, so a wrong model fails fast."""
    from r2f_ray import assets
    from r2f_ray.decoder_eval import token_weight_facts, wiki_texts

    if not config.token_weight_model:
        return None
    if not DecoderSet(matrices, dataset.spec, kinds, config.options).needs_acts:
        raise ValueError(f"token_weight_model applies to activation decoders, and the kinds are {kinds}: "
                         "train with kind activation (or kinds for some roles), or drop token_weight_model")
    proxy = dataset.manifest["proxy"]
    loaded = assets.load_model(config.token_weight_model)
    if loaded.weights_sha256 != proxy["weights_sha256"]:
        raise ValueError(f"token_weight_model {config.token_weight_model!r} is not the pairs' proxy {proxy['model_id']!r} "
                         f"(weights sha256 {loaded.weights_sha256[:12]}... vs {proxy['weights_sha256'][:12]}...): "
                         "name the model the pairs were generated on")
    token_weight_facts(config.token_weight_facts)  # bad counts fail before training too
    if config.token_weight_texts:
        wiki_texts(loaded.tokenizer, config.token_weight_texts, 48, split="train")
    return loaded


def format_summary(summary: dict) -> str:
    """Per role: held-out cosine of the trained bank next to the naive lift and the rank-r ceiling."""
    roles: dict[str, list[tuple[float, float, float]]] = {}
    for m in summary["matrices"]:
        base = summary["baselines"][m["name"]]
        roles.setdefault(m["role"], []).append((base["naive"], summary["per_matrix"][m["name"]], base["ceiling"]))
    lines = [f"decoder bank {summary['output']}: best epoch {summary['best_epoch']} of {summary['epochs_run']}, "
             f"{summary['wall_seconds']:.0f} s wall (this run)",
             "held-out cosine to the true gradient, mean over matrices and held-out pairs:",
             f"{'role':<10} {'kind':<10} {'matrices':>8} {'naive':>7} {'trained':>8} {'ceiling':>8}"]
    for role, rows in roles.items():
        n = len(rows)
        naive, trained, ceiling = (sum(r[i] for r in rows) / n for i in range(3))
        lines.append(f"{role:<10} {summary['kinds'][role]:<10} {n:>8} {naive:>7.3f} {trained:>8.3f} {ceiling:>8.3f}")
    return "\n".join(lines)
