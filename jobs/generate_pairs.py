"""Pair generation as a Ray job, with the same config (YAML + --set + flags) as `r2f pairs`.

    ray job submit --working-dir . -- python jobs/generate_pairs.py --config pairs.yaml --output /shared/pairs
    ray job submit --working-dir . -- python jobs/generate_pairs.py --output /shared/pairs --actors 8 --set gpus_per_actor=1

The driver joins the cluster the job runs on (``ray.init()`` picks up RAY_ADDRESS). Rerunning the same
job resumes: items already committed are skipped, complete files of a killed run are kept.
"""

from __future__ import annotations

import argparse
import sys

from r2f_ray.cli import EXIT_USAGE, ConfigError, UsageError, add_pairs_args, pairs_config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate_pairs", description=__doc__.split("\n")[0])
    add_pairs_args(parser)
    args = parser.parse_args(argv)
    try:
        config = pairs_config_from_args(args)
    except (UsageError, ConfigError) as e:
        print(f"generate_pairs: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import ray

    from r2f_ray.pipeline.pairs import format_summary, run_pairs

    if not ray.is_initialized():  # under `ray job submit` this joins the job's cluster (RAY_ADDRESS)
        ray.init()
    try:
        summary = run_pairs(config, progress=not args.quiet)
    except ValueError as e:  # bad input data: empty corpus, spec mismatch, output is a file, ...
        print(f"generate_pairs: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(summary))
    if args.json:
        from r2f_ray.io import write_json

        write_json(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
