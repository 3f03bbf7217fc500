"""The attention gradient-energy model against exact Jacobians, and the recomputed attention against the model's."""

import pytest
import torch

from r2f_ray.core.attention import AttentionRecorder, attention_gradient_energy, per_kv_head


def attend(q, k, v, scale, groups):
    """Causal softmax attention per query head; k, v [KV, T, hd] shared by ``groups`` query heads."""
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = scale * q @ k.transpose(-1, -2)
    t = scores.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("heads,kv_heads,isotropic", [(1, 1, True), (4, 2, True), (4, 2, False)])
def test_energy_equals_expected_gradient_norm_under_independent_output_gradients(heads, kv_heads, isotropic):
    # For dL/do_s = sigma_s u_s with u ~ N(0, I), E|dL/dx_j|^2 = sum_(s,i) sigma_s^2 J_(s,i),j^2: the squared
    # Jacobian summed over outputs, each query position weighted by its output-gradient variance.
    torch.manual_seed(0)
    tokens, hd, scale = 6, 4, 0.7
    q = torch.randn(heads, tokens, hd, dtype=torch.float64)
    k = torch.randn(kv_heads, tokens, hd, dtype=torch.float64)
    v = torch.randn(kv_heads, tokens, hd, dtype=torch.float64)
    jq, jk, jv = torch.autograd.functional.jacobian(lambda a, b, c: attend(a, b, c, scale, heads // kv_heads), (q, k, v))
    sigma2 = torch.ones(tokens, dtype=torch.float64) if isotropic else torch.rand(tokens, dtype=torch.float64) * 3
    weight = sigma2[None, :, None, None, None, None]
    exact = {name: (j.pow(2) * weight).sum(dim=(0, 1, 2)).sum(-1) for name, j in (("q", jq), ("k", jk), ("v", jv))}

    groups = heads // kv_heads
    kr, vr = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = (scale * q @ kr.transpose(-1, -2)).masked_fill(~causal, float("-inf")).softmax(-1)
    model = attention_gradient_energy(probs, q, kr, vr, scale, None if isotropic else sigma2)

    torch.testing.assert_close(model["q"], exact["q"])
    torch.testing.assert_close(per_kv_head(model["k"], kv_heads), exact["k"])
    torch.testing.assert_close(per_kv_head(model["v"], kv_heads), exact["v"])


def test_first_token_keys_get_no_gradient_from_the_first_query_alone():
    # A query that sees one key has P = 1 there: its softmax has no slope, so it sends no gradient to that key,
    # and with a single token nothing at all reaches k or q (a check of the v~ = v - mean term).
    probs = torch.ones(1, 1, 1, dtype=torch.float64)
    x = torch.randn(1, 1, 3, dtype=torch.float64)
    energy = attention_gradient_energy(probs, x, x, x, 1.0)
    assert float(energy["k"].abs().max()) < 1e-12 and float(energy["q"].abs().max()) < 1e-12
    assert float(energy["v"][0, 0]) == pytest.approx(3.0)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_recomputed_attention_equals_the_models_own(family):
    from r2f_ray import assets

    model, _ = (assets.tiny_llama if family == "llama" else assets.tiny_gemma)(seed=1)
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on the second example
    layers = model.model.layers
    modules = {f"layer{i}": layer.self_attn for i, layer in enumerate(layers)}
    with AttentionRecorder(modules) as rec, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for i in range(len(layers)):
        for b in range(2):
            keep = mask[b].bool()
            probs, q, k, v = rec.tensors(f"layer{i}", b, keep)
            want = out.attentions[i][b][:, keep][:, :, keep].double()
            torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-4)
            assert q.shape == k.shape == v.shape == (probs.shape[0], int(keep.sum()), model.config.head_dim)
