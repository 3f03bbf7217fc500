"""Decoder quality and training cost on real proxy pairs.

1. Quality (plain torch, no Ray): per matrix role, the held-out cosine to the true full gradient of the
   naive lift, each decoder kind fitted on the training split (closed-form start + Adam steps), and the
   rank-r ceiling; optionally on a second dataset from another corpus (transfer across text).
2. Training (``--train``): `r2f train`'s stage (Ray Train, 2 workers, DeepSpeed) with ZeRO-2 and ZeRO-3:
   wall time, the held-out curve per epoch, and peak resident memory of the rank-0 worker.

    python benchmarks/decoders.py --pairs PAIRS [--test-pairs OTHER] [--train] --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

from r2f_ray.decoder_eval import EvalConfig, format_eval, run_eval
from r2f_ray.io import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True, help="pair dataset (fit on its train split, evaluate on its held-out split)")
    p.add_argument("--test-pairs", help="a dataset from another corpus, evaluated with decoders fitted on --pairs")
    p.add_argument("--kinds", default="linear,activation,mlp", help="kinds to fit (two_sided, sketch: zero-offset pairs only)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps after the closed-form start")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train", action="store_true", help="also time the Ray Train + DeepSpeed stage (ZeRO-2 and ZeRO-3)")
    p.add_argument("--train-kind", default="sketch")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per worker per step in --train")
    p.add_argument("--matrices", help="comma-separated roles or matrix names (default: every matrix in the pairs)")
    p.add_argument("--out", default="decoders_benchmark.json")
    args = p.parse_args()

    kinds = args.kinds.split(",")
    matrices = args.matrices.split(",") if args.matrices else None
    results: dict = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
                     "args": vars(args)}
    base = dict(fit_kinds=kinds, fit_steps=args.steps, fit_lr=args.lr, max_pairs=10**6, matrices=matrices)
    quality = run_eval(EvalConfig(pairs=args.pairs, split="heldout", **base), progress=True)
    print(format_eval(quality))
    results["quality"] = quality
    if args.test_pairs:
        transfer = run_eval(EvalConfig(pairs=args.test_pairs, split="all", fit_pairs=args.pairs, **base), progress=True)
        print("decoders fitted on", args.pairs)
        print(format_eval(transfer))
        results["transfer"] = transfer
    if args.train:
        import ray

        from r2f_ray.pipeline.train import TrainConfig, format_summary, run_training

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
        results["train"] = {}
        for stage in (2, 3):
            out = tempfile.mkdtemp(prefix=f"bank-zero{stage}-")
            shutil.rmtree(out)
            config = TrainConfig(pairs=args.pairs, output=out, kind=args.train_kind, epochs=args.epochs, num_workers=2,
                                 zero_stage=stage, batch_size=args.batch_size, lr=args.lr * 10, matrices=matrices,
                                 early_stopping={"patience": args.epochs})
            t0 = time.time()
            summary = run_training(config)
            print(f"ZeRO-{stage}:")
            print(format_summary(summary))
            results["train"][f"zero{stage}"] = {
                "wall_seconds": time.time() - t0,
                "history": summary["history"],
                "peak_rss_mib_rank0": max(h["peak_rss_mib_rank0"] for h in summary["history"]),
                "heldout_by_role_best": next(h for h in summary["history"] if h["epoch"] == summary["best_epoch"])["heldout_by_role"],
            }
        print(f"{'ZeRO':<6} {'wall s':>8} {'peak RSS MiB (rank 0)':>22} {'best held-out cosine':>21}")
        for k, v in results["train"].items():
            print(f"{k:<6} {v['wall_seconds']:>8.0f} {v['peak_rss_mib_rank0']:>22.0f} "
                  f"{max(h['heldout_cosine'] for h in v['history']):>21.3f}")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
