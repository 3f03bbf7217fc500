"""`r2f probe`: how much of the true full gradient the LoRA gradient carries, per matrix role.

For a few proxy texts, one real PEFT backward per text gives the LoRA gradients and (through the
capture hooks) the exact full gradient G of every adapted matrix. Per matrix it reports the cosine of
the naive lift ``grad_B @ A0`` to G and the best any rank-r decoder could do (the truncated-SVD ceiling).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from r2f_ray import assets
from r2f_ray.config import MODEL_HELP
from r2f_ray.core.linalg import cosine, rank_r_ceiling, singular_values_from_factors
from r2f_ray.core.lora import LoraProbe, LoraSpec, naive_lift


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description=MODEL_HELP)
    corpus: str = Field("lee", description="packaged proxy corpus: lee or wiki")
    texts: int = Field(16, ge=1, description="number of texts")
    tokens: int = Field(48, ge=2, description="tokens per text (texts shorter than this are skipped)")
    lora: LoraSpec = LoraSpec()


def run_probe(config: ProbeConfig, progress: bool = True) -> dict:
    t0 = time.time()
    loaded = assets.load_model(config.model)
    ids = assets.tokenize_fixed_length(loaded.tokenizer, assets.corpus_texts(config.corpus), config.tokens, config.texts)
    probe = LoraProbe(loaded.model, config.lora)
    per_matrix: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"naive": [], "ceiling": []})
    for row in tqdm(ids, desc="probe: texts", disable=not progress):
        cap = probe.capture(row[None])
        for info in probe.matrices:
            x, d = cap.factors(info.name, 0)
            g = d.float().T @ x.float()
            a0, _ = probe.init[info.name]
            lift = naive_lift(cap.extra_grads[info.name + ".B"], a0)
            per_matrix[info.name]["naive"].append(cosine(lift, g))
            per_matrix[info.name]["ceiling"].append(rank_r_ceiling(singular_values_from_factors(x, d), config.lora.r))
    by_role: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"naive": [], "ceiling": []})
    matrices = []
    for info in probe.matrices:
        naive = sum(per_matrix[info.name]["naive"]) / config.texts
        ceiling = sum(per_matrix[info.name]["ceiling"]) / config.texts
        by_role[info.short_role]["naive"].append(naive)
        by_role[info.short_role]["ceiling"].append(ceiling)
        matrices.append({"name": info.name, "layer": info.layer, "role": info.short_role,
                         "shape": [info.d_out, info.d_in], "naive_cosine": naive, "ceiling_cosine": ceiling})
    roles = {role: {"matrices": len(v["naive"]), "naive_cosine": sum(v["naive"]) / len(v["naive"]),
                    "ceiling_cosine": sum(v["ceiling"]) / len(v["ceiling"])} for role, v in by_role.items()}
    return {
        "what": "cosine to the exact per-example full gradient G, mean over texts and over the matrices of each role",
        "model": loaded.model_id, "weights_sha256": loaded.weights_sha256, "corpus": config.corpus,
        "texts": config.texts, "tokens_per_text": config.tokens, "lora": config.lora.model_dump(mode="json"),
        "roles": roles, "matrices": matrices, "wall_s": round(time.time() - t0, 2),
    }


def format_probe(result: dict) -> str:
    lines = [f"r2f probe: {result['model']}, {result['texts']} {result['corpus']} texts x {result['tokens_per_text']} tokens, "
             f"LoRA r={result['lora']['r']} ({result['lora']['init']} init, seed {result['lora']['seed']})",
             "cosine to the exact full gradient G (mean over texts and matrices of the role)",
             f"{'role':<6} {'matrices':>8} {'naive grad_B@A0':>16} {'rank-r ceiling':>15}"]
    for role, v in result["roles"].items():
        lines.append(f"{role:<6} {v['matrices']:>8} {v['naive_cosine']:>16.3f} {v['ceiling_cosine']:>15.3f}")
    lines.append(f"wall time {result['wall_s']:.1f} s")
    return "\n".join(lines)
