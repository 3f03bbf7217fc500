"""Small linear-algebra helpers shared by the probe, the decoders and the evaluation."""

from __future__ import annotations

import torch
from torch import Tensor


def cosine(a: Tensor, b: Tensor, eps: float = 1e-30) -> float:
    """Cosine similarity of two tensors taken as flat vectors (computed in float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(eps))


def singular_values_from_factors(x: Tensor, d: Tensor) -> Tensor:
    """Singular values of G = D^T X without forming G: with D^T = Q1 R1 and X^T = Q2 R2 (thin QR),
    G = Q1 (R1 R2^T) Q2^T, so G shares the singular values of the small T x T matrix R1 R2^T."""
    r1 = torch.linalg.qr(d.double().T, mode="r").R
    r2 = torch.linalg.qr(x.double().T, mode="r").R
    return torch.linalg.svdvals(r1 @ r2.T)


def rank_r_ceiling(singular_values: Tensor, r: int) -> float:
    """Cosine between G and its best rank-r approximation: ||G_r||_F / ||G||_F (Eckart-Young).

    No decoder whose output has rank <= r can reconstruct G better than this.
    """
    s2 = singular_values.double() ** 2
    total = s2.sum()
    return float((s2[:r].sum() / total).sqrt()) if total > 0 else 0.0
