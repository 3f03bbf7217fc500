"""Evaluation as a Ray job: `ray job submit --working-dir . -- python jobs/evaluate.py --config eval.yaml
--bank /shared/banks/smollm2-r8 --out /shared/evaluation`.

Same config and flags as `r2f evaluate` (r2f_ray.eval.harness.EvalConfig): every method on the same
facts, USR, APR, GUR, neighbours, RAP, MIA, time and peak memory per deletion; JSON, Markdown and HTML.
The evaluation runs in the job's driver (one target model in one process); put the entrypoint on a GPU
with `ray job submit --entrypoint-num-gpus 1` for a large target.
"""

from __future__ import annotations

import sys

from r2f_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
