"""Decoding residual-stream writers (o_proj, down_proj) from their neighbours' LoRA gradients."""

import pytest
import torch

from r2f_ray.core.decoders import WriterRequest, residual_writer_decode

S = 2.0  # LoRA scaling


def _writer(g: torch.Generator, d: torch.Tensor, d_in: int, r: int = 4, weights=None) -> tuple[WriterRequest, torch.Tensor]:
    """A writer with random inputs and init whose output gradient is ``d`` [T, d_out]; returns it and its G."""
    t, d_out = d.shape
    x, a0, b0 = torch.randn(t, d_in, generator=g), torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
    full = d.T @ x
    w = torch.ones(t) if weights is None else weights
    return WriterRequest(x, S * b0.T @ full, S * full @ a0.T, a0, b0, w), full


def _cos(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_one_writer_is_the_activation_posterior_with_the_grad_a_correction():
    """Alone, the token-space posterior equals the input-space one: g = (grad_B / s) (A0 C A0^T)^-1 A0 C with
    C = X^T diag(w) X, then corrected onto grad_A."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(10, generator=g) + 0.1
    writer, _ = _writer(g, torch.randn(10, 12, generator=g), d_in=30, weights=w)
    got = residual_writer_decode([writer], 0, correlation=0.0, scaling=S, ridge=0.0).double()
    x, a0, b0 = writer.x.double(), writer.a0.double(), writer.b0.double()
    c = x.T @ (w.double()[:, None] * x)
    want = (writer.grad_b.double() / S) @ torch.linalg.solve(a0 @ c @ a0.T, a0 @ c)
    want = want + b0 @ torch.linalg.solve(b0.T @ b0, writer.grad_a.double() / S - b0.T @ want)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    # the correction makes the decode agree with the writer's own grad_A
    assert torch.allclose(S * writer.b0.double().T @ got, writer.grad_a.double(), rtol=1e-3, atol=1e-4)


def test_neighbours_sharing_the_output_gradient_recover_it():
    """Eight writers see one D [12 tokens] through 4 token mixes each: together 32 >= 12 observations of every
    column, so the target's G is recovered almost exactly, where its own 4 mixes are not enough."""
    g = torch.Generator().manual_seed(1)
    d = torch.randn(12, 16, generator=g)
    writers, fulls = zip(*[_writer(g, d + 0.01 * torch.randn(12, 16, generator=g), d_in=40) for _ in range(8)])
    target = 3
    alone = residual_writer_decode([writers[target]], 0, correlation=0.0, scaling=S)
    together = residual_writer_decode(list(writers), target, correlation=0.99, scaling=S)
    assert _cos(together, fulls[target]) > 0.99
    assert _cos(alone, fulls[target]) < 0.8
    # zero correlation: the neighbours carry no information about the target
    independent = residual_writer_decode(list(writers), target, correlation=0.0, scaling=S)
    assert torch.allclose(independent, alone, rtol=1e-3, atol=1e-4)


def test_unrelated_neighbours_do_not_help_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(2)
    writers, fulls = zip(*[_writer(g, torch.randn(12, 16, generator=g), d_in=40) for _ in range(4)])
    alone = _cos(residual_writer_decode([writers[0]], 0, correlation=0.0, scaling=S), fulls[0])
    assumed = _cos(residual_writer_decode(list(writers), 0, correlation=0.9, scaling=S), fulls[0])
    assert assumed < alone  # a wrong prior costs: the correlation is a property of residual streams, not free
    with pytest.raises(ValueError, match="correlation"):
        residual_writer_decode(list(writers), 0, correlation=1.0, scaling=S)
    short, _ = _writer(g, torch.randn(5, 16, generator=g), d_in=40)
    with pytest.raises(ValueError, match="token counts"):
        residual_writer_decode([writers[0], short], 0, correlation=0.5, scaling=S)
