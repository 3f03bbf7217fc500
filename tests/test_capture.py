"""Exact gradient capture against plain autograd."""

from __future__ import annotations

import pytest
import torch

from r2f_ray.core.capture import IGNORE_INDEX, capture_gradients, example_nll
from r2f_ray.core.targets import find_module, resolve_targets


def _autograd_weight_grads(model, input_ids, attention_mask, labels, names):
    """Reference: weight.grad of the summed per-example mean NLL, from an ordinary backward."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    example_nll(logits, labels).sum().backward()
    grads = {n: find_module(model, n).weight.grad.detach().clone() for n in names}
    model.zero_grad(set_to_none=True)
    return grads


def _padded_batch(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1  # right padding
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return ids, mask, labels


def test_factors_equal_autograd_with_padding_and_answer_masks(tiny):
    model, _ = tiny
    ids, mask, labels = _padded_batch(model.config.vocab_size, [12, 9, 5])
    labels[:, :4] = IGNORE_INDEX  # prompt tokens carry no loss: only the "answer" is supervised
    cap = capture_gradients(model, ids, mask, labels)
    names = [m.name for m in cap.matrices]
    assert len(names) == 2 * 7
    ref = _autograd_weight_grads(model, ids, mask, labels, names)
    for n in names:
        torch.testing.assert_close(cap.dense(n), ref[n], rtol=1e-5, atol=1e-7)


def test_per_example_factors_are_each_examples_own_gradient(tiny):
    model, _ = tiny
    ids, mask, labels = _padded_batch(model.config.vocab_size, [10, 7, 10], seed=1)
    cap = capture_gradients(model, ids, mask, labels, targets=["q_proj", "down_proj"])
    for b in range(3):
        ref = _autograd_weight_grads(model, ids[b:b + 1, :int(mask[b].sum())], None, labels[b:b + 1, :int(mask[b].sum())],
                                     [m.name for m in cap.matrices])
        for m in cap.matrices:
            x, d = cap.factors(m.name, b)
            assert x.shape[0] == d.shape[0] <= int(mask[b].sum())
            torch.testing.assert_close(d.T @ x, ref[m.name], rtol=1e-5, atol=1e-7)


def test_padding_and_unsupervised_tail_are_dropped_from_factors(tiny):
    model, _ = tiny
    ids, mask, labels = _padded_batch(model.config.vocab_size, [10, 6])
    labels[0, 7:] = IGNORE_INDEX  # last labelled token at 6: positions 0..5 predict labels
    cap = capture_gradients(model, ids, mask, labels, targets=["v_proj"])
    name = cap.matrices[0].name
    assert cap.factors(name, 0)[0].shape[0] == 6
    assert cap.factors(name, 1)[0].shape[0] == 5  # 6 real tokens, the last predicts nothing


def test_shared_inputs_are_held_once_and_weights_get_no_grad(tiny):
    model, _ = tiny
    ids, mask, labels = _padded_batch(model.config.vocab_size, [8, 8])
    for p in model.parameters():
        p.requires_grad_(False)  # frozen model: capture still works, and no .grad is materialised
    cap = capture_gradients(model, ids, mask, labels)
    q, k, v = (f"model.layers.0.self_attn.{r}_proj" for r in "qkv")
    assert cap.inputs[q] is cap.inputs[k] is cap.inputs[v]
    assert cap.inputs["model.layers.0.mlp.gate_proj"] is cap.inputs["model.layers.0.mlp.up_proj"]
    assert all(p.grad is None for p in model.parameters())
    assert not any(t.requires_grad for t in cap.inputs.values())


def test_sum_reduction_and_bad_input(tiny):
    model, _ = tiny
    ids, mask, labels = _padded_batch(model.config.vocab_size, [8])
    with pytest.raises(ValueError, match="no labelled tokens"):
        capture_gradients(model, ids, mask, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="unknown target module 'qq_proj'"):
        capture_gradients(model, ids, mask, labels, targets=["qq_proj"])
    with pytest.raises(ValueError, match="reduction"):
        capture_gradients(model, ids, mask, labels, reduction="max")
    mean = capture_gradients(model, ids, mask, labels, targets=["o_proj"])
    total = capture_gradients(model, ids, mask, labels, targets=["o_proj"], reduction="sum")
    n = mean.matrices[0].name
    torch.testing.assert_close(total.dense(n), mean.dense(n) * 7, rtol=1e-4, atol=1e-6)


def test_target_resolution_by_suffix_and_regex(tiny):
    model, _ = tiny
    assert [m.name for m in resolve_targets(model, ["layers.1.mlp.down_proj"])] == ["model.layers.1.mlp.down_proj"]
    by_regex = resolve_targets(model, r".*layers\.0\.self_attn\.[qk]_proj")
    assert [m.short_role for m in by_regex] == ["q", "k"]
    assert [(m.d_out, m.d_in) for m in by_regex] == [(64, 64), (32, 64)]


@pytest.mark.slow
def test_smollm2_matrices_equal_autograd(smollm2):
    model, tok = smollm2
    texts = ["The capital of France is Paris, a city on the Seine.", "Kangaroos live in Australia."]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    targets = ["layers.3.self_attn.q_proj", "layers.17.self_attn.v_proj", "layers.29.mlp.down_proj"]
    cap = capture_gradients(model, enc["input_ids"], enc["attention_mask"], labels, targets=targets)
    ref = _autograd_weight_grads(model, enc["input_ids"], enc["attention_mask"], labels, [m.name for m in cap.matrices])
    for m in cap.matrices:
        torch.testing.assert_close(cap.dense(m.name), ref[m.name], rtol=1e-4, atol=1e-6)


def test_another_family_equals_autograd():
    """Gemma 3 (q/k norms, head_dim > hidden / heads, sliding attention): capture is exact there too."""
    from r2f_ray.assets import tiny_gemma

    model, _ = tiny_gemma()
    ids, mask, labels = _padded_batch(model.config.vocab_size, [12, 7])
    cap = capture_gradients(model, ids, mask, labels)
    shapes = {m.role: (m.d_out, m.d_in) for m in cap.matrices}
    assert len(cap.matrices) == 3 * 7 and shapes["q_proj"] == (64, 48) and shapes["o_proj"] == (48, 64)
    ref = _autograd_weight_grads(model, ids, mask, labels, [m.name for m in cap.matrices])
    for m in cap.matrices:
        torch.testing.assert_close(cap.dense(m.name), ref[m.name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_output_energy_is_the_local_gradient_of_each_tokens_own_prediction(tiny, family):
    # |dL/dh_t|^2 at the final norm's input, from the capture's backward, equals a backward through the final
    # norm and the LM head alone: no position mixes after the last layer, so it is a forward-only quantity.
    from r2f_ray import assets

    model = tiny[0] if family == "llama" else assets.tiny_gemma(seed=0)[0]
    ids, mask, labels = _padded_batch(model.config.vocab_size, [9, 6], seed=2)
    labels[:, :3] = IGNORE_INDEX
    hidden = {}
    handle = model.model.norm.register_forward_pre_hook(lambda mod, args: hidden.__setitem__("h", args[0].detach()))
    try:
        cap = capture_gradients(model, ids, mask, labels, targets=["q_proj"], output_energy=True)
    finally:
        handle.remove()
    h = hidden["h"].clone().requires_grad_(True)
    local = torch.autograd.grad(example_nll(model.lm_head(model.model.norm(h)), labels).sum(), h)[0]
    torch.testing.assert_close(cap.output_energy, local.double().pow(2).sum(-1), rtol=1e-5, atol=1e-12)
    scored = cap.scored_tokens(0)
    energy = cap.output_energy_tokens(0)
    assert float(energy[~scored].abs().max()) == 0 and bool((energy[scored] > 0).all())
    assert capture_gradients(model, ids, mask, labels, targets=["q_proj"]).output_energy is None
