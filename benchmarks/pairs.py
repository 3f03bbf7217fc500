"""Pair generation on SmolLM2-135M-Instruct: pairs/s with 1 and 2 actors, bytes per pair, peak actor memory,
and the relative error of stored gradients against plain autograd.

    .venv/bin/python benchmarks/pairs.py                 # default: 16 Lee texts x 64 tokens, ~5 min on 2 cores
    .venv/bin/python benchmarks/pairs.py --examples 4    # quick check

All 7 projection roles of all 30 layers are adapted (210 matrices, so one item gives 210 pairs), LoRA
r = 8, fp32 factors. Each Ray Data run starts its own actors; pairs/s is end to end (actor start-up and
model load included, the same for both actor counts). Peak memory is the largest resident set size of
each actor process, polled every 0.2 s. Bytes per pair: measured Parquet bytes of the committed files
divided by pairs, next to the exact tensor payload per pair for factors (shared inputs stored once, or
not) and for dense G (computed from the shapes: a dense SmolLM2 run would write 0.4 GB per item).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402
import torch  # noqa: E402

from r2f_ray import assets  # noqa: E402
from r2f_ray.core.capture import example_nll  # noqa: E402
from r2f_ray.core.lora import LoraProbe, LoraSpec  # noqa: E402
from r2f_ray.core.targets import find_module  # noqa: E402
from r2f_ray.io import write_json  # noqa: E402
from r2f_ray.pairdata import PairDataset, decode_tensor, encode_tensor, row_bytes  # noqa: E402
from r2f_ray.pipeline.pairs import PairsConfig, build_items, run_pairs, tokenize_batch  # noqa: E402


class ActorMemory:
    """Peak RSS of every PairGenerator actor process below this driver, polled in a thread."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    if "PairGenerator" in " ".join(p.cmdline()) or "PairGenerator" in p.name():
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(config: PairsConfig) -> dict:
    with ActorMemory() as mem:
        summary = run_pairs(config, progress=False)
    summary["actor_peak_rss_mib"] = sorted(round(v / 2**20) for v in mem.peak.values())
    summary["load_average_1min_after"] = round(os.getloadavg()[0], 1)  # the machine is shared: say how busy it was
    return summary


def autograd_errors(ds: PairDataset, config: PairsConfig, count: int) -> dict:
    """Relative Frobenius error of stored pairs against a fresh autograd computation on the same text."""
    rows = tokenize_batch({"text": list(assets.lee_texts())[: 4 * count + 8]}, config.model, config.tokens, config.packing)
    items = {it["pair_id"]: it for it in build_items(config.model_copy(update={"max_examples": None}),
                                                      [dict(zip(rows, v)) for v in zip(*rows.values())])}
    batch = next(ds.iter_batches(batch_size=count))
    model = assets.load_model("default").model
    probe = LoraProbe(assets.load_model("default").model, ds.spec)
    errs = {"full": [], "grad_b": [], "full_bf16": []}
    for b, pid in enumerate(batch[ds.matrices[0].name].pair_ids):
        ids = torch.tensor(items[pid]["input_ids"])
        model.zero_grad()
        example_nll(model(input_ids=ids).logits, ids).sum().backward()
        peft = probe.capture(ids)
        for info in ds.matrices:
            p = batch[info.name]
            want = find_module(model, info.name).weight.grad
            errs["full"].append(float((p.full[b] - want).norm() / want.norm()))
            gb = peft.extra_grads[info.name + ".B"]
            errs["grad_b"].append(float((p.grad_b[b] - gb).norm() / gb.norm()))
            # bf16 storage: the same factors rounded to bfloat16, G rebuilt from them
            x, d = peft.factors(info.name, 0)
            xb, db = (decode_tensor(encode_tensor(t, "bfloat16"), t.shape, "bfloat16") for t in (x, d))
            errs["full_bf16"].append(float((db.T @ xb - want).norm() / want.norm()))
    return {k: {"max": max(v), "mean": sum(v) / len(v), "pairs": len(v)} for k, v in errs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=16, help="Lee texts (one 64-token example each) per run")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default="benchmarks/results/pairs.json")
    args = ap.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assets.ensure_default_model()
    work = Path(tempfile.mkdtemp(prefix="r2f-bench-pairs-"))
    base = dict(model="default", source="lee", tokens=args.tokens, max_examples=args.examples, lora=LoraSpec(r=8),
                batch_size=2, rows_per_file=16, cpus_per_actor=1)
    results = {"machine": f"{os.cpu_count()}-core CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                          f"{'GPU' if torch.cuda.is_available() else 'no GPU'}",
               "date": time.strftime("%Y-%m-%d"), "examples": args.examples, "tokens": args.tokens, "runs": {}}
    try:
        for name, extra in (("1 actor", {"actors": 1}), ("2 actors", {"actors": 2}),
                            ("1 actor, inputs not shared", {"actors": 1, "share_inputs": False,
                                                            "max_examples": max(2, args.examples // 4)})):
            config = PairsConfig(output=str(work / name.replace(" ", "_").replace(",", "")), **{**base, **extra})
            s = run(config)
            ds = PairDataset(config.output)
            c = ds.manifest["counts"]
            s["file_bytes_per_pair"] = c["bytes"] / c["pairs"]
            s["payload_bytes_per_pair"] = sum(row_bytes(ds.manifest, args.tokens - 1).values()) / len(ds.matrices)
            results["runs"][name] = s
            print(f"{name}: {s['pairs_written']} pairs in {s['generate_s']:.1f} s, {s['pairs_per_s']:.1f} pairs/s, "
                  f"{s['file_bytes_per_pair'] / 1024:.1f} KiB/pair on disk, actor peak RSS {s['actor_peak_rss_mib']} MiB",
                  flush=True)
            if name == "1 actor":
                results["autograd_rel_error"] = autograd_errors(ds, config, count=2)
                dense = dict(ds.manifest, storage="dense", input_columns={},
                             matrices=[dict(m, input_column=None, grad_column=None, dense_column="g:" + m["name"])
                                       for m in ds.manifest["matrices"]])
                results["dense_payload_bytes_per_pair"] = sum(row_bytes(dense, args.tokens - 1).values()) / len(ds.matrices)
            shutil.rmtree(config.output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()

    r = results["runs"]
    shared, unshared = r["1 actor"]["payload_bytes_per_pair"], r["1 actor, inputs not shared"]["payload_bytes_per_pair"]
    dense = results["dense_payload_bytes_per_pair"]
    results["ratios"] = {"dense_over_factors_unshared": dense / unshared, "dense_over_factors_shared": dense / shared,
                         "speedup_2_over_1_actor": r["2 actors"]["pairs_per_s"] / r["1 actor"]["pairs_per_s"]}
    print(f"\nPair generation, SmolLM2-135M-Instruct, 210 matrices (7 roles x 30 layers), {args.tokens}-token Lee texts, "
          f"LoRA r=8, fp32; {results['machine']}")
    print(f"{'run':<30}{'pairs':>7}{'wall s':>8}{'pairs/s':>9}{'KiB/pair disk':>15}{'KiB/pair payload':>18}"
          f"{'actor peak RSS MiB':>20}{'load avg':>10}")
    for name, s in r.items():
        print(f"{name:<30}{s['pairs_written']:>7}{s['generate_s']:>8.1f}{s['pairs_per_s']:>9.1f}"
              f"{s['file_bytes_per_pair'] / 1024:>15.1f}{s['payload_bytes_per_pair'] / 1024:>18.1f}"
              f"{str(s['actor_peak_rss_mib']):>20}{s['load_average_1min_after']:>10}")
    print(f"{'dense G (from shapes)':<30}{'':>7}{'':>8}{'':>9}{'':>15}{dense / 1024:>18.1f}")
    q = results["ratios"]
    print(f"dense / factors: {q['dense_over_factors_unshared']:.2f}x (inputs per matrix), "
          f"{q['dense_over_factors_shared']:.2f}x (shared inputs stored once); 2 vs 1 actors: {q['speedup_2_over_1_actor']:.2f}x")
    e = results["autograd_rel_error"]
    print(f"relative error vs plain autograd ({e['full']['pairs']} pairs): full G max {e['full']['max']:.1e} "
          f"(mean {e['full']['mean']:.1e}); grad_B vs PEFT max {e['grad_b']['max']:.1e}; "
          f"G from bf16 factors max {e['full_bf16']['max']:.1e} (mean {e['full_bf16']['mean']:.1e})")
    write_json(args.json, results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
