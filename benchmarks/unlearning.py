"""Every unlearning method side by side on SmolLM2-135M-Instruct, in one run, plus a sequential run.

Per method (one deletion per fact, each from the original weights): USR, APR, neighbour retention,
GUR (held-out perplexity ratio, general multiple choice), MIA (identity alignment, KL on general
prompts), RAP (relearning attack), cosine of the update to the exact multi-view one, step, wall time
and peak memory per deletion. Then facts forgotten one after another (USR, GUR, neighbours after each).

    .venv/bin/python benchmarks/unlearning.py                 # the small default (~10 min on 2 cores)
    .venv/bin/python benchmarks/unlearning.py --facts 50 --runs 3 --sequential 20   # the full table

Without --bank, R2F uses the naive decoder (grad_B @ A0, no training); a trained bank comes from the
decoder stage (`--bank PATH`).

A sample too long for one sitting is run in parts (`--fact-offset N` continues after N facts) and merged
into one table; `:METHODS` takes only those methods from a part:

    .venv/bin/python benchmarks/unlearning.py --merge A/result.json:exact_multiview B/result.json --out C
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r2f_ray.core.unlearn import StepConfig, UnlearnConfig  # noqa: E402
from r2f_ray.eval.harness import ALL_METHODS, JOURNAL, EvalConfig, merge_results, run_evaluation  # noqa: E402
from r2f_ray.eval.report import markdown_table, write_reports  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--bank", help="trained decoder bank folder (default: the naive bank)")
    p.add_argument("--transfer", choices=["same_shapes", "by_role_depth"], help="bank trained on another model")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--facts", type=int, default=4, help="forget facts per run")
    p.add_argument("--fact-offset", type=int, default=0, help="skip this many forget facts (continue an earlier sample)")
    p.add_argument("--neighbours", type=int, default=16)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--sequential", type=int, default=5, help="facts in the sequential run (0: skip)")
    p.add_argument("--views", type=int, default=5)
    p.add_argument("--rap-steps", type=int, default=5)
    p.add_argument("--mia-prompts", type=int, default=32)
    p.add_argument("--kl-budget", type=float, default=StepConfig().retain_kl_budget)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/results/unlearning", help="folder for result.json, report.md, report.html")
    p.add_argument("--merge", nargs="+", metavar="RESULT[:METHODS]",
                   help="merge the result.json files of runs that continue one fact sample (no new deletions)")
    args = p.parse_args(argv)
    if args.merge:
        result = merge_results([read_part(spec) for spec in args.merge])
        result["command"] = "python benchmarks/unlearning.py " + " ".join(argv if argv is not None else sys.argv[1:])
        paths = write_reports(result, args.out)
        print(markdown_table(result))
        print(f"\nmerged {len(args.merge)} results; wrote {json.dumps(paths)}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EvalConfig(model=args.model, bank=args.bank, transfer=args.transfer, methods=args.methods.split(","),
                        facts=args.facts, fact_offset=args.fact_offset, neighbours=args.neighbours, runs=args.runs, sequential=args.sequential,
                        views=args.views, rap_steps=args.rap_steps, mia_prompts=args.mia_prompts,
                        unlearn=UnlearnConfig(step=StepConfig(retain_kl_budget=args.kl_budget)))
    t0 = time.time()
    result = run_evaluation(config, journal=Path(args.out) / JOURNAL)  # a stopped run resumes
    result["machine"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                         "python": platform.python_version(), "torch": torch.__version__}
    result["command"] = "python benchmarks/unlearning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = write_reports(result, args.out)
    print(markdown_table(result))
    print(f"\nwall time {time.time() - t0:.0f} s; wrote {json.dumps(paths)}")
    return 0


def read_part(spec: str) -> dict:
    """A result.json, optionally narrowed to some of its methods (``PATH:m1,m2``)."""
    path, _, methods = spec.partition(":")
    result = json.loads(Path(path).read_text())
    if methods:
        keep = methods.split(",")
        missing = [m for m in keep if m not in result["config"]["methods"]]
        if missing:
            raise SystemExit(f"{path} has no rows of {missing} (it ran {result['config']['methods']})")
        result["config"] = {**result["config"], "methods": keep}
        result["rows"] = [r for r in result["rows"] if r["method"] in keep]
    return result


if __name__ == "__main__":
    sys.exit(main())
