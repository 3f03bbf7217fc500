"""Per-token weighting of the activation decoder's prior, on real SmolLM2 gradients (no training).

The `activation` kind decodes each row of G from grad_B under the prior covariance X^T X of the request's
own inputs (at mixing weight beta = 0, which calibration picks, up to 0.04, for q, o and the MLP roles).
X^T X weights each token by |x_t|^2, whatever gradient the token carries. This script compares that with
other per-token weights w_t in X^T diag(w) X, closed form, on two kinds of gradients:

- ``text``: packaged Wikipedia paragraphs, loss on every token (what the proxy pairs hold);
- ``facts``: capital-city questions as chat turns, loss on the answer only (what the engine forgets).

Two oracle columns bound what any token weighting can buy: ``oracle |D_t|^2`` weights each token by its
true gradient energy (the best diagonal weights, which no forward pass knows), and ``oracle G^T G`` uses
the true row covariance of G itself (not a token weighting at all: the best prior of this form).

For the attention projections (q, k, v) three more columns use the attention pattern
(``core.attention``): ``attention model`` weights each token by its expected gradient energy under
isotropic gradients of the attention outputs, summed over heads (a forward-only token weighting);
``attention, per head`` decodes each head's rows of G under its own head's weights; ``oracle per head``
does that with each head's true |D_t|^2 (the best per-head diagonal weights). ``attention + output, per
head`` weights each query position of the attention model by the gradient its own prediction sends into the
residual stream (``core.attention.output_query_energy``), and ``output energy`` (every role) weights each token
by that alone.

With ``--init zero_offset`` grad_A = s B0^T G is observed too, and two more columns condition the best forward-only
decode (``attention + output, per head`` for q, k, v; ``output energy`` for the rest) on it, as the bank's
``activation`` decoders do (``ActivationGroup._output_side``): under the identity as output-side prior (an
orthogonal projection) and under the proxy's M_out = mean G G^T / ||G||^2, estimated on ``--prior-texts`` other
Wikipedia texts.

    python benchmarks/activation_prior.py [--examples 32] [--layers 5,15,25] [--init zero_offset] --out activation_prior.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from r2f_ray import assets
from r2f_ray.core.attention import ATTENTION_ROLES, AttentionRecorder, attention_gradient_energy, output_query_energy, per_kv_head
from r2f_ray.core.capture import capture_gradients
from r2f_ray.core.linalg import rank_r_ceiling
from r2f_ray.core.lora import LoraSpec, init_factors
from r2f_ray.core.targets import resolve_targets
from r2f_ray.core.unlearn import encode_pairs
from r2f_ray.io import write_json

WEIGHTS = {
    "|x|^2 (current)": lambda x: torch.ones(x.shape[0], dtype=x.dtype),
    "first token dropped": lambda x: torch.cat([torch.zeros(1, dtype=x.dtype), torch.ones(x.shape[0] - 1, dtype=x.dtype)]),
    "unit tokens": lambda x: 1 / x.pow(2).sum(1).clamp_min(1e-12),
    "|x| (square root)": lambda x: 1 / x.pow(2).sum(1).clamp_min(1e-12).sqrt(),
    "earlier tokens more": lambda x: torch.linspace(1, 0.05, x.shape[0], dtype=x.dtype) ** 2,
}


def lift(x: torch.Tensor, w: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
    """R [r, d_in] with G_hat = grad_B @ R: posterior mean of G's rows under the prior X^T diag(w) X."""
    return lift_from_covariance((x * w[:, None]).T @ x, a0)


def lift_from_covariance(c: torch.Tensor, a0: torch.Tensor) -> torch.Tensor:
    """R [r, d_in]: posterior mean of G's rows given grad_B under the prior covariance c [d_in, d_in]."""
    ac = a0 @ c
    gram = ac @ a0.T
    return torch.linalg.solve(gram + 1e-9 * torch.trace(gram) * torch.eye(len(gram), dtype=gram.dtype), ac)


ATTENTION_COLUMNS = ("attention model", "attention, per head", "attention + output, per head", "oracle per head")


def attention_lifts(x, d, grad_b, a0, role, energy, weighted_energy, kv_heads):
    """G_hat of an attention projection under the attention model's weights (summed and per head; per head
    with output-weighted queries) and under each head's true |D_t|^2, per head: {column: G_hat}."""
    def heads(e):
        return e[role[0]] if role == "q_proj" else per_kv_head(e[role[0]], kv_heads)

    head_energy = heads(energy)
    hd = d.shape[1] // head_energy.shape[0]
    blocks = [slice(h * hd, (h + 1) * hd) for h in range(head_energy.shape[0])]

    def per_head(weights):
        return torch.cat([grad_b[blk] @ lift(x, w, a0) for blk, w in zip(blocks, weights)])

    return {
        "attention model": grad_b @ lift(x, head_energy.sum(0), a0),
        "attention, per head": per_head(head_energy),
        "attention + output, per head": per_head(heads(weighted_energy)),
        "oracle per head": per_head([d[:, blk].pow(2).sum(1) for blk in blocks]),
    }


TWO_SIDED_COLUMNS = ("+ grad_A, identity", "+ grad_A, proxy M_out")


def output_priors(loaded, matrices, ids) -> dict[str, torch.Tensor]:
    """M_out [d_out, d_out] per matrix: mean over texts of G G^T / ||G||^2, scaled to mean diagonal 1."""
    total = {m.name: 0 for m in matrices}
    for start in range(0, len(ids), 8):
        cap = capture_gradients(loaded.model, ids[start:start + 8], targets=[m.name for m in matrices])
        for m in matrices:
            for b in range(cap.batch_size):
                g = cap.dense(m.name, b).double()
                total[m.name] = total[m.name] + g @ g.T / g.pow(2).sum()
    return {m.name: total[m.name] * (m.d_out / len(ids)) for m in matrices}


def with_grad_a(decoded: torch.Tensor, g: torch.Tensor, b0: torch.Tensor, m_out: torch.Tensor) -> torch.Tensor:
    """G_hat made to agree with B0^T G under the output-side prior m_out: L G + (I - L) G_hat."""
    seen = m_out @ b0 @ torch.linalg.solve(b0.T @ m_out @ b0, b0.T)
    return seen @ g + decoded - seen @ decoded


def batches(loaded, source: str, examples: int):
    tok = loaded.tokenizer
    if source == "text":
        ids = assets.tokenize_fixed_length(tok, assets.corpus_texts("wiki"), 48, examples)
        return ids, None, None
    facts = assets.country_facts()[:examples]
    return encode_pairs(tok, [(f.prompt, f.answer) for f in facts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=32, help="examples per source")
    p.add_argument("--layers", default="5,15,25")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--init", choices=["standard", "zero_offset"], default="standard",
                   help="LoRA init; zero_offset adds the columns that also use grad_A")
    p.add_argument("--prior-texts", type=int, default=32, help="texts for the output-side prior M_out (zero_offset)")
    p.add_argument("--out", default="activation_prior.json")
    args = p.parse_args()
    t0 = time.time()
    loaded = assets.load_default_model()
    spec = LoraSpec(r=args.rank, init=args.init)
    layers = {int(v) for v in args.layers.split(",")}
    matrices = [m for m in resolve_targets(loaded.model, list(spec.target_modules)) if m.layer in layers]
    attention = {m.layer: loaded.model.model.layers[m.layer].self_attn for m in matrices}
    kv_heads = loaded.model.config.num_key_value_heads
    two_sided = args.init == "zero_offset"
    if two_sided:
        prior_ids = assets.tokenize_fixed_length(loaded.tokenizer, assets.corpus_texts("wiki"), 48,
                                                 args.examples + args.prior_texts)[args.examples:]
        m_out = output_priors(loaded, matrices, prior_ids)
    result = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "date": time.strftime("%Y-%m-%d"),
              "model": loaded.model_id, "args": vars(args), "by_source": {}}
    for source in ("text", "facts"):
        ids, mask, labels = batches(loaded, source, args.examples)
        scores: dict[str, dict[str, list[float]]] = {}
        for start in range(0, len(ids), 8):
            sl = slice(start, start + 8)
            with AttentionRecorder(attention) as recorder:
                cap = capture_gradients(loaded.model, ids[sl], None if mask is None else mask[sl],
                                        None if labels is None else labels[sl], targets=[m.name for m in matrices],
                                        output_energy=True)
            energies, weighted, output = {}, {}, {}
            for b in range(ids[sl].shape[0]):
                output[b] = output_query_energy(cap.output_energy_tokens(b), cap.scored_tokens(b))
                for layer, module in attention.items():
                    probs, q, k, v = recorder.tensors(layer, b, cap.token_mask[b])
                    energies[layer, b] = attention_gradient_energy(probs, q, k, v, module.scaling)
                    weighted[layer, b] = attention_gradient_energy(probs, q, k, v, module.scaling, output[b])
            for m in matrices:
                a0, b0 = (t.double() for t in init_factors(spec, m))
                row = scores.setdefault(m.role, {})
                for b in range(ids[sl].shape[0]):
                    x, d = (t.double() for t in cap.factors(m.name, b))
                    g = d.T @ x
                    grad_b = g @ a0.T
                    lifts = {name: lift(x, weight(x), a0) for name, weight in WEIGHTS.items()}
                    lifts["output energy"] = lift(x, output[b], a0)
                    lifts["oracle |D_t|^2"] = lift(x, d.pow(2).sum(1), a0)
                    lifts["oracle G^T G"] = lift_from_covariance(g.T @ g, a0)
                    decoded = {name: grad_b @ r for name, r in lifts.items()}
                    if m.role in ("q_proj", "k_proj", "v_proj"):
                        decoded |= attention_lifts(x, d, grad_b, a0, m.role, energies[m.layer, b], weighted[m.layer, b],
                                                   kv_heads)
                    if two_sided:
                        best = decoded["attention + output, per head" if m.role in ATTENTION_ROLES else "output energy"]
                        eye = torch.eye(m.d_out, dtype=torch.float64)
                        decoded[TWO_SIDED_COLUMNS[0]] = with_grad_a(best, g, b0, eye)
                        decoded[TWO_SIDED_COLUMNS[1]] = with_grad_a(best, g, b0, m_out[m.name])
                    for name, gh in decoded.items():
                        row.setdefault(name, []).append(float((gh * g).sum() / (gh.norm() * g.norm())))
                    row.setdefault("naive", []).append(float((grad_b @ a0 * g).sum() / ((grad_b @ a0).norm() * g.norm())))
                    row.setdefault("ceiling", []).append(float(rank_r_ceiling(torch.linalg.svdvals(g), args.rank)))
        result["by_source"][source] = {role: {k: sum(v) / len(v) for k, v in cols.items()} for role, cols in scores.items()}
        result["by_source"][source]["examples"] = len(ids)
        cols = ["naive", *WEIGHTS, "output energy", *ATTENTION_COLUMNS, *(TWO_SIDED_COLUMNS if two_sided else ()),
                "oracle |D_t|^2", "oracle G^T G", "ceiling"]
        print(f"\n{source}: cosine to the true G, mean over layers {sorted(layers)} x {len(ids)} examples (beta = 0, closed form)")
        print(f"{'role':<10}" + "".join(f"{c[:19]:>21}" for c in cols))
        for role, vals in result["by_source"][source].items():
            if role != "examples":
                print(f"{role:<10}" + "".join(f"{vals[c]:>21.3f}" if c in vals else f"{'-':>21}" for c in cols))
    result["seconds"] = time.time() - t0
    write_json(args.out, result)
    print(f"\n{time.time() - t0:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
