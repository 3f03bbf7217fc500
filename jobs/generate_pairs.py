"""Pair generation as a Ray job, with the same config (YAML + --set + flags) as `r2f pairs`.

    ray job submit --working-dir . -- python jobs/generate_pairs.py --config pairs.yaml --output /shared/pairs
    ray job submit --working-dir . -- python jobs/generate_pairs.py --output s3://bucket/pairs --actors 8 --set gpus_per_actor=1

The driver joins the cluster the job runs on (``ray.init()`` picks up RAY_ADDRESS). Rerunning the same
job resumes: items already committed are skipped, complete files of a killed run are kept. Bad input
(empty corpus, spec mismatch on append, an output that is a file) fails the job with exit code 2.
"""

from __future__ import annotations

import sys

from r2f_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
