"""A same-shapes target for transfer measurements: SmolLM2 fine-tuned (all weights, Adam) on invented facts.

The `same_shapes` transfer mode reuses the proxy's decoders on a model of the proxy's architecture, e.g.
a private fine-tune of it. This writes such a fine-tune as a Hugging Face folder and prints how far its
weights moved; then measure the mode with

    r2f pairs --model FOLDER --source wiki --tokens 48 --examples 48 --output TUNED_PAIRS
    r2f eval-decoders --pairs TUNED_PAIRS --bank BANK --transfer same_shapes --split all

    python benchmarks/finetune_target.py --facts 20 --steps 30 --out FOLDER
"""

from __future__ import annotations

import argparse
import time

import torch

from r2f_ray import assets
from r2f_ray.eval.data import fictitious_facts
from r2f_ray.eval.harness import teach
from r2f_ray.io import atomic_dir, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--facts", type=int, default=20, help="invented facts to teach")
    p.add_argument("--steps", type=int, default=30, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", required=True, help="folder for the fine-tuned model (must not exist)")
    args = p.parse_args()
    t0 = time.time()
    loaded = assets.load_default_model()
    base = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    print(f"fine-tuning {loaded.model_id} on {args.facts} invented facts for {args.steps} full-batch Adam steps ...", flush=True)
    teach(loaded.model, loaded.tokenizer, fictitious_facts(args.facts), args.steps, args.lr)
    moved = {k: float((v - base[k]).norm() / base[k].norm().clamp_min(1e-12)) for k, v in loaded.model.state_dict().items()
             if v.ndim == 2 and "layers." in k}
    with atomic_dir(args.out) as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        write_json(tmp / "finetune.json", {"from": loaded.model_id, "facts": args.facts, "steps": args.steps, "lr": args.lr,
                                            "relative_weight_change": {"mean": sum(moved.values()) / len(moved),
                                                                       "max": max(moved.values())}})
    print(f"fine-tuned {loaded.model_id} on {args.facts} invented facts for {args.steps} steps in {time.time() - t0:.0f} s; "
          f"layer weights moved by {100 * sum(moved.values()) / len(moved):.2f} % on average "
          f"(max {100 * max(moved.values()):.2f} %); wrote {args.out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
