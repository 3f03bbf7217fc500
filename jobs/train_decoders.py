"""Train a decoder bank on a Ray cluster: `ray job submit --working-dir . -- python jobs/train_decoders.py
--config train.yaml --set pairs=/shared/pairs --set output=/shared/banks/smollm2-r8 --set num_workers=8 --set use_gpu=true`.

Same config as `r2f train` (r2f_ray.pipeline.train.TrainConfig). Connects to the cluster the job runs on
(``ray.init()`` picks up RAY_ADDRESS); a rerun with the same output resumes from the latest checkpoint.
"""

from __future__ import annotations

import sys

from r2f_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
