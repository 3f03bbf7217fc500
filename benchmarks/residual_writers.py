"""Residual-stream writers decoded with their neighbours: the closed form behind ``DecoderBank.decode_request``.

Exact gradients of held-out packaged Wikipedia texts (loss on every token) on the packaged model, zero-offset LoRA
init, every o_proj and down_proj (in residual order). Each writer is decoded by ``residual_writer_decode`` from
the writers up to ``k`` away on each side, for a grid of k and correlation rho; k = 0 is each writer from its own
gradient (the grad_A token weights, no proxy prior: a trained bank adds its output-side prior on top). Prints
mean cosine to the true G per role, and how alike adjacent writers' output gradients are; writes JSON.

    .venv/bin/python benchmarks/residual_writers.py --texts 8 --out benchmarks/results/residual_writers.json
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from r2f_ray import assets
from r2f_ray.core.capture import capture_gradients
from r2f_ray.core.decoders import RESIDUAL_WRITER_ROLES, WriterRequest, grad_a_token_energy, residual_writer_decode
from r2f_ray.core.lora import LoraSpec, init_factors, lora_grads_from_factors
from r2f_ray.core.targets import resolve_targets
from r2f_ray.decoder_eval import wiki_texts
from r2f_ray.io import write_json


def cosine(a, b) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=8, help="held-out packaged Wikipedia texts (default 8)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per text (default 48)")
    p.add_argument("--windows", default="0,1,2,3", help="writers on each side (comma-separated)")
    p.add_argument("--correlations", default="0.5,0.7,0.9,0.95", help="rho grid (comma-separated)")
    p.add_argument("--out", default="residual_writers.json", help="JSON output path")
    args = p.parse_args()
    windows = [int(k) for k in args.windows.split(",")]
    rhos = [float(r) for r in args.correlations.split(",")]

    t0 = time.time()
    loaded = assets.load_model("default")
    model = loaded.model
    spec = LoraSpec(r=8, init="zero_offset")
    writers = sorted((m for m in resolve_targets(model, None) if m.role in RESIDUAL_WRITER_ROLES),
                     key=lambda m: (m.layer, RESIDUAL_WRITER_ROLES.index(m.role)))
    names = [m.name for m in writers]
    inits = {m.name: init_factors(spec, m) for m in writers}
    ids = wiki_texts(loaded.tokenizer, args.texts, args.tokens)

    scores: dict[tuple[str, int, float], list[float]] = {}
    adjacent: dict[str, list[float]] = {}
    for b in range(len(ids)):
        cap = capture_gradients(model, ids[b:b + 1], targets=names)
        requests, truths, outputs = [], [], []
        for n in names:
            x, d = cap.factors(n, 0)
            a0, b0 = inits[n]
            grad_a, grad_b = lora_grads_from_factors(x, d, a0, b0, spec.scaling)  # as the engine computes them
            requests.append(WriterRequest(x, grad_a, grad_b, a0, b0, grad_a_token_energy(x, grad_a)))
            truths.append(d.double().T @ x.double())
            outputs.append(d.double())
        for i in range(1, len(names)):
            pair = f"{writers[i - 1].role} -> {writers[i].role}"
            adjacent.setdefault(pair, []).append(cosine(outputs[i - 1], outputs[i]))
        for k in windows:
            for rho in ([0.0] if k == 0 else rhos):
                for i, m in enumerate(writers):
                    lo = max(0, i - k)
                    g_hat = residual_writer_decode(requests[lo:i + k + 1], i - lo, rho, spec.scaling).double()
                    scores.setdefault((m.role, k, rho), []).append(cosine(g_hat, truths[i]))

    def mean(v):
        return sum(v) / len(v)

    rows = [{"role": role, "writers_each_side": k, "correlation": rho, "mean_cosine": mean(v), "n": len(v)}
            for (role, k, rho), v in sorted(scores.items())]
    print(f"residual writers decoded with their neighbours: {len(ids)} held-out Wikipedia texts x {args.tokens} tokens, "
          f"{len(writers)} writers of {loaded.model_id}, zero-offset r=8, closed form; mean cosine to the true G")
    print(f"{'role':<10} {'k':>2} " + " ".join(f"{'rho ' + str(r):>9}" for r in rhos) + f" {'alone':>7}")
    for role in RESIDUAL_WRITER_ROLES:
        alone = mean(scores[(role, 0, 0.0)])
        for k in (w for w in windows if w > 0):
            print(f"{role:<10} {k:>2} " + " ".join(f"{mean(scores[(role, k, r)]):>9.3f}" for r in rhos) + f" {alone:>7.3f}")
    print("adjacent writers' output gradient cosine: "
          + "; ".join(f"{pair} {mean(v):.3f} (min {min(v):.3f})" for pair, v in adjacent.items()))
    seconds = time.time() - t0
    print(f"{seconds:.0f} s")
    write_json(args.out, {
        "what": "closed-form residual-writer decode, mean cosine to the true gradient per role",
        "model": loaded.model_id, "texts": len(ids), "tokens": args.tokens, "lora": spec.model_dump(mode="json"),
        "rows": rows, "adjacent_output_cosine": {k: {"mean": mean(v), "min": min(v)} for k, v in adjacent.items()},
        "seconds": seconds, "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
