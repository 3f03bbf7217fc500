"""Decoder math on synthetic low-rank gradients with a known answer (plain torch, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from r2f_ray.core.decoders import DECODERS, LOSSES, DecoderSet, RidgeStats, activation_stats, fit_local, pair_cosine
from r2f_ray.core.lora import LoraSpec, init_factors, lora_grads_from_dense, naive_lift
from r2f_ray.core.targets import MatrixInfo

D_OUT, D_IN, R = 12, 20, 4


def matrices(k=3, role="down_proj", d_out=D_OUT, d_in=D_IN):
    return [MatrixInfo(f"model.layers.{i}.mlp.{role}", i, role, d_out, d_in) for i in range(k)]


def synthetic(spec, infos, n, fixed_rows: bool, seed=0, tokens=3):
    """Per-example gradients G = D^T X of rank <= tokens. ``fixed_rows``: X lies in one r-dim subspace per
    matrix (a linear lift is exact); otherwise in a fresh random subspace per example."""
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for j, info in enumerate(infos):
        basis = torch.randn(spec.r, info.d_in, generator=torch.Generator().manual_seed(100 + j))
        a0, b0 = init_factors(spec, info)
        ga, gb, full, acts = [], [], [], []
        for _ in range(n):
            d = torch.randn(tokens, info.d_out, generator=gen) * torch.exp(torch.randn(1, generator=gen) * 2)
            if fixed_rows:
                x = torch.randn(tokens, spec.r, generator=gen) @ basis
            else:
                x = torch.randn(tokens, info.d_in, generator=gen)
            g = d.T @ x
            grad_a, grad_b = lora_grads_from_dense(g, a0, b0, spec.scaling)
            ga.append(grad_a), gb.append(grad_b), full.append(g), acts.append(activation_stats(x, a0))
        batch[info.name] = (torch.stack(ga), torch.stack(gb), torch.stack(full),
                            (torch.stack([a[0] for a in acts]), torch.stack([a[1] for a in acts])))
    return batch


def mean_cos(decoders, batch):
    with torch.no_grad():
        pred = decoders({n: (v[0], v[1], None, v[3]) for n, v in batch.items()})
    return min(float(pair_cosine(pred[n][None], batch[n][2][None].float()).mean()) for n in batch)


def test_naive_is_grad_b_times_a0():
    spec = LoraSpec(r=R)
    infos = matrices()
    batch = synthetic(spec, infos, 4, fixed_rows=True)
    out = DecoderSet(infos, spec, "naive")(batch)
    for info in infos:
        a0, _ = init_factors(spec, info)
        torch.testing.assert_close(out[info.name], naive_lift(batch[info.name][1], a0))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_one_sided_kinds_learn_a_fixed_row_space(kind):
    spec = LoraSpec(r=R)
    infos = matrices()
    train = [synthetic(spec, infos, 16, fixed_rows=True, seed=s) for s in range(4)]
    held_out = synthetic(spec, infos, 16, fixed_rows=True, seed=99)
    naive = mean_cos(DecoderSet(infos, spec, "naive"), held_out)
    decoders = DecoderSet(infos, spec, kind)
    history = fit_local(decoders, train, steps=60, lr=1e-3)
    assert mean_cos(decoders, held_out) > 0.99 > naive + 0.3
    assert history[-1] <= history[0] + 1e-6


def test_linear_learns_by_gradient_descent_without_ridge_init():
    spec = LoraSpec(r=R)
    infos = matrices(k=2)
    train = [synthetic(spec, infos, 16, fixed_rows=True, seed=s) for s in range(4)]
    decoders = DecoderSet(infos, spec, "linear")
    before = mean_cos(decoders, train[0])
    fit_local(decoders, train, steps=600, lr=3e-2, ridge=None)
    assert mean_cos(decoders, synthetic(spec, infos, 16, fixed_rows=True, seed=99)) > max(0.95, before + 0.2)


@pytest.mark.parametrize("kind,floor", [("two_sided", 0.55), ("sketch", 0.95)])
def test_two_sided_kinds_recover_gradients_with_varying_row_spaces(kind, floor):
    spec = LoraSpec(r=R, init="zero_offset")
    infos = matrices()
    # rank(G) = 2 <= keep (r/2 range directions): the two sketches hold all of G.
    train = [synthetic(spec, infos, 16, fixed_rows=False, seed=s, tokens=2) for s in range(4)]
    held_out = synthetic(spec, infos, 16, fixed_rows=False, seed=99, tokens=2)
    linear = DecoderSet(infos, spec, "linear")
    fit_local(linear, train, steps=0)
    decoders = DecoderSet(infos, spec, kind)
    fit_local(decoders, train, steps=200, lr=1e-2)
    # The sketch reconstruction recovers G; a one-sided lift sees only the range side; a linear
    # two-sided map gets part of the way.
    assert mean_cos(decoders, held_out) > floor
    assert mean_cos(decoders, held_out) > mean_cos(linear, held_out) + 0.15


def test_activation_stats_are_the_input_covariance_seen_through_a0():
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    a0 = torch.randn(R, D_IN, dtype=torch.float64)
    gram, cross = activation_stats(x, a0)
    for i in range(2):
        c = x[i].T @ x[i] / x[i].pow(2).sum()
        torch.testing.assert_close(gram[i].double(), a0 @ c @ a0.T, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cross[i].double(), a0 @ c, rtol=1e-5, atol=1e-7)


def test_activation_kind_recovers_gradients_whose_row_space_changes_per_example():
    # Standard init: grad_A is zero, so no one-sided lift can follow a row space that moves from example
    # to example; the request's own activations say where the rows of G = D^T X lie.
    spec = LoraSpec(r=R)
    infos = matrices()
    train = [synthetic(spec, infos, 16, fixed_rows=False, seed=s, tokens=2) for s in range(4)]
    held_out = synthetic(spec, infos, 16, fixed_rows=False, seed=99, tokens=2)
    linear = DecoderSet(infos, spec, "linear")
    fit_local(linear, train, steps=0)
    decoders = DecoderSet(infos, spec, "activation")
    fit_local(decoders, train, steps=0)
    # Calibration picks the smallest weight on the (useless here) proxy prior for every matrix.
    mix = torch.sigmoid(next(iter(decoders.groups.values())).mix_logit)
    torch.testing.assert_close(mix, torch.full_like(mix, 0.01))
    assert mean_cos(decoders, held_out) > 0.99 > mean_cos(linear, held_out) + 0.3
    with pytest.raises(ValueError, match="activation statistics"):
        decoders({n: v[:2] for n, v in held_out.items()})


def test_activation_kind_at_full_mix_is_the_ridge_lift():
    spec = LoraSpec(r=R)
    infos = matrices()
    train = [synthetic(spec, infos, 16, fixed_rows=True, seed=s) for s in range(4)]
    linear, activation = DecoderSet(infos, spec, "linear"), DecoderSet(infos, spec, "activation", {"activation": {"ridge": 1e-9}})
    fit_local(linear, train, steps=0, ridge=1e-9)
    fit_local(activation, train, steps=0)
    group = next(iter(activation.groups.values()))
    with torch.no_grad():
        group.mix_logit.fill_(30.0)  # sigmoid = 1: the proxy prior alone
    held_out = synthetic(spec, infos, 4, fixed_rows=True, seed=7)
    with torch.no_grad():
        a = activation({n: (v[0], v[1], None, v[3]) for n, v in held_out.items()})
        b = linear({n: v[:2] for n, v in held_out.items()})
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-3, atol=1e-5 * float(b[n].detach().abs().max()))


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_batched_equals_one_at_a_time(kind):
    spec = LoraSpec(r=R, init="zero_offset")
    infos = matrices(k=4)
    batch = synthetic(spec, infos, 3, fixed_rows=False)
    decoders = DecoderSet(infos, spec, kind)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in decoders.parameters():  # perturb so every member differs
            p.add_(torch.randn_like(p) * 0.1 * p.abs().mean().clamp_min(0.1))
        together = decoders(batch)
        for info in infos:
            alone = decoders({info.name: batch[info.name]})[info.name]
            torch.testing.assert_close(alone, together[info.name], rtol=1e-4, atol=1e-6)


def test_groups_by_role_and_shape_and_kind_per_role():
    spec = LoraSpec(r=R)
    infos = matrices(k=2, role="q_proj", d_out=8, d_in=8) + matrices(k=2, role="k_proj", d_out=4, d_in=8)
    decoders = DecoderSet(infos, spec, {"q_proj": "mlp"}, default_kind="linear")
    assert sorted(decoders.groups) == ["k_proj-4x8", "q_proj-8x8"]
    assert decoders.groups["q_proj-8x8"].kind == "mlp" and decoders.groups["k_proj-4x8"].kind == "linear"


def test_two_sided_kinds_refuse_the_standard_init():
    with pytest.raises(ValueError, match="zero_offset"):
        DecoderSet(matrices(), LoraSpec(r=R), "sketch")


def test_unknown_kind_and_matrix_are_clear_errors():
    with pytest.raises(ValueError, match="unknown decoder kind"):
        DecoderSet(matrices(), LoraSpec(r=R), "resnet")
    decoders = DecoderSet(matrices(), LoraSpec(r=R), "naive")
    with pytest.raises(ValueError, match="no decoder for matrices"):
        decoders({"model.layers.9.mlp.up_proj": (torch.zeros(1, R, D_IN), torch.zeros(1, D_OUT, R))})


def test_ridge_stats_add_up_and_solve_least_squares():
    spec = LoraSpec(r=R)
    infos = matrices(k=1)
    batch = synthetic(spec, infos, 8, fixed_rows=True)
    _, gb, full, _ = batch[infos[0].name]
    whole = RidgeStats.from_batch(gb[None], full[None])
    parts = RidgeStats.from_batch(gb[None, :3], full[None, :3]) + RidgeStats.from_batch(gb[None, 3:], full[None, 3:])
    for a, b in zip(whole.tensors(), parts.tensors()):  # products in fp32, sums in fp64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert whole.count.tolist() == [8.0]
    w = 1 / full.pow(2).sum(dim=(1, 2)).sqrt()
    x = (gb * w[:, None, None]).reshape(-1, R).double()
    y = (full * w[:, None, None]).reshape(-1, D_IN).double()
    torch.testing.assert_close(whole.solve(0.0)[0].double(), torch.linalg.lstsq(x, y).solution, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_losses_are_zero_at_the_truth_and_scale_free(loss):
    g = torch.randn(2, 3, D_OUT, D_IN)
    assert float(LOSSES[loss](g, g).abs().max()) < 1e-5
    other = torch.randn_like(g)
    torch.testing.assert_close(LOSSES[loss](other * 1e3, g * 1e3), LOSSES[loss](other, g), rtol=1e-4, atol=1e-5)


def test_covariance_start_is_exact_when_inputs_span_r_dims():
    """Inputs in a fixed r-dim subspace: the forward-only lift from E[x x^T] recovers G exactly."""
    spec = LoraSpec(r=R)
    infos = matrices(k=2)
    held_out = synthetic(spec, infos, 8, fixed_rows=True, seed=5)
    covs = []
    for j, _ in enumerate(infos):
        basis = torch.randn(spec.r, D_IN, generator=torch.Generator().manual_seed(100 + j))
        x = torch.randn(500, spec.r) @ basis
        covs.append(x.T @ x / 500)
    decoders = DecoderSet(infos, spec, "linear")
    decoders.groups["down_proj-12x20"].init_covariance(torch.stack(covs), ridge=1e-9)
    assert mean_cos(decoders, held_out) > 0.999


def test_activation_calibration_scores_equal_the_decoded_cosines():
    spec = LoraSpec(r=R)
    infos = matrices()
    batch = synthetic(spec, infos, 5, fixed_rows=False, seed=3)
    decoders = DecoderSet(infos, spec, "activation")
    fit_local(decoders, [batch], steps=0)
    key, part = next(iter(decoders.stack(batch).items()))
    group = decoders.groups[key]
    scores = group.calibration_scores(part.grad_a, part.grad_b, part.full, part.acts)
    for j, value in enumerate(group.calibration_grid):
        with torch.no_grad():
            group.mix_logit.fill_(math.log(value / (1 - value)))
            pred = group(part.grad_a, part.grad_b, None, part.acts)
        torch.testing.assert_close(scores[:, j].float(), pair_cosine(pred, part.full).sum(-1), rtol=1e-4, atol=1e-5)


def test_zero_offset_activation_decoding_is_the_posterior_mean_given_both_sketches():
    # Zero-offset init: grad_A = s B0^T G adds r directions of G's columns. For every output-side mix the
    # decoded G_hat must reproduce grad_A exactly and equal L G + (I - L) G_lift, L = M B0 (B0^T M B0)^-1 B0^T,
    # M = (1 - mix) M_out + mix I with M_out the proxy's mean G G^T / ||G||^2 scaled to mean diagonal 1.
    spec = LoraSpec(r=R, init="zero_offset")
    infos = matrices(k=2)
    train = synthetic(spec, infos, 12, fixed_rows=False, seed=1, tokens=6)
    held_out = synthetic(spec, infos, 4, fixed_rows=False, seed=2, tokens=6)
    decoders = DecoderSet(infos, spec, "activation")
    fit_local(decoders, [train], steps=0)
    key, part = next(iter(decoders.stack(held_out).items()))
    group = decoders.groups[key]
    with torch.no_grad():
        lifted = group(None, part.grad_b, None, part.acts).double()
    for i, name in enumerate(group.names):
        g_train = train[name][2].double()
        m_out = (g_train @ g_train.transpose(-1, -2) / g_train.pow(2).sum((-2, -1))[:, None, None]).mean(0) * D_OUT
        b0 = group.b0[i].double()
        for mix in group.output_grid:
            with torch.no_grad():
                group.out_mix.fill_(mix)
                decoded = group(part.grad_a, part.grad_b, None, part.acts)[i].double()
            m = (1 - mix) * m_out + mix * torch.eye(D_OUT, dtype=torch.float64)
            seen = m @ b0 @ torch.linalg.solve(b0.T @ m @ b0, b0.T)
            g = part.full[i].double()
            expected = seen @ g + (torch.eye(D_OUT, dtype=torch.float64) - seen) @ lifted[i]
            torch.testing.assert_close(decoded, expected, rtol=1e-3, atol=1e-4 * float(g.abs().max()))
            torch.testing.assert_close(spec.scaling * b0.T @ decoded, part.grad_a[i].double(), rtol=1e-3,
                                       atol=1e-4 * float(part.grad_a[i].abs().max()))


def test_output_side_prior_is_picked_where_gradients_leave_through_few_directions():
    # Every G's columns lie in one 3-dim subspace per matrix (as the heads of q and k favour a few output
    # directions): B0^T G (r = 4) then pins G down under the proxy's output-side prior, but not under the
    # identity, and the inputs (6 random tokens) are more than the lift from grad_B alone can follow.
    spec = LoraSpec(r=R, init="zero_offset")
    infos = matrices(k=2)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        out = {}
        for j, info in enumerate(infos):
            basis = torch.randn(3, D_OUT, generator=torch.Generator().manual_seed(50 + j))
            a0, b0 = init_factors(spec, info)
            rows = []
            for _ in range(n):
                d, x = torch.randn(6, 3, generator=gen) @ basis, torch.randn(6, D_IN, generator=gen)
                g = d.T @ x
                rows.append((*lora_grads_from_dense(g, a0, b0, spec.scaling), g, activation_stats(x, a0)))
            ga, gb, full, acts = zip(*rows)
            out[info.name] = (torch.stack(ga), torch.stack(gb), torch.stack(full),
                              (torch.stack([a[0] for a in acts]), torch.stack([a[1] for a in acts])))
        return out

    train, held_out = batch(16), batch(8)
    decoders = DecoderSet(infos, spec, "activation")
    fit_local(decoders, [train], steps=0)  # picks the output-side mix after the input-side one
    group = next(iter(decoders.groups.values()))
    torch.testing.assert_close(group.out_mix, torch.full((len(infos),), group.output_grid[0]))
    picked = mean_cos(decoders, held_out)
    _, held = next(iter(decoders.stack(held_out).items()))
    with torch.no_grad():
        one_sided = float(pair_cosine(group(None, held.grad_b, None, held.acts), held.full).mean(-1).min())
        group.out_mix.fill_(1.0)
    identity = mean_cos(decoders, held_out)
    assert picked > 0.99 > identity + 0.05
    assert identity > one_sided


def test_output_scores_equal_the_decoded_cosines():
    spec = LoraSpec(r=R, init="zero_offset")
    infos = matrices()
    batch = synthetic(spec, infos, 5, fixed_rows=False, seed=3, tokens=6)
    decoders = DecoderSet(infos, spec, "activation")
    fit_local(decoders, [synthetic(spec, infos, 8, fixed_rows=False, seed=4, tokens=6)], steps=0)
    key, part = next(iter(decoders.stack(batch).items()))
    group = decoders.groups[key]
    scores = group.output_scores(part.grad_a, part.grad_b, part.full, part.acts)
    for j, value in enumerate(group.output_grid):
        with torch.no_grad():
            group.out_mix.fill_(value)
            pred = group(part.grad_a, part.grad_b, None, part.acts)
        torch.testing.assert_close(scores[:, j].float(), pair_cosine(pred, part.full).sum(-1), rtol=1e-4, atol=1e-5)
