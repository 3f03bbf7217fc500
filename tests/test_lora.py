"""The LoRA probe: real PEFT gradients against the sketch identities of the capture core."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from r2f_ray.core.capture import IGNORE_INDEX, capture_gradients
from r2f_ray.core.lora import LoraProbe, LoraSpec, init_factors, lora_grads_from_dense, lora_grads_from_factors
from r2f_ray.core.targets import resolve_targets


def assert_rel_close(got, want, tol=1e-5):
    """Relative Frobenius error: float rounding hits small entries hardest, so judge the whole matrix."""
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _batch(vocab: int, n: int = 3, t: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, t - 3:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    return ids, mask, labels


@pytest.mark.parametrize("init", ["standard", "zero_offset"])
def test_peft_lora_grads_equal_sketches_of_the_full_gradient(tiny, init):
    model, _ = tiny
    ids, mask, labels = _batch(model.config.vocab_size)
    full = capture_gradients(model, ids, mask, labels)  # the un-adapted model: the true G
    spec = LoraSpec(r=4, alpha=8, init=init, seed=3)
    probe = LoraProbe(model, spec)
    cap = probe.capture(ids, mask, labels)
    s = spec.scaling
    for info in probe.matrices:
        a0, b0 = probe.init[info.name]
        g = full.dense(info.name)
        grad_a, grad_b = cap.extra_grads[info.name + ".A"], cap.extra_grads[info.name + ".B"]
        assert_rel_close(grad_b, s * g @ a0.T)
        assert_rel_close(grad_a, s * b0.T @ g)
        if init == "standard":
            assert torch.count_nonzero(grad_a) == 0
        else:
            assert grad_a.abs().max() > 0  # the two-sided sketch: grad_A is informative
        # Per-example grads from factors add up to PEFT's batch grads.
        per_example = [lora_grads_from_factors(*cap.factors(info.name, b), a0, b0, s) for b in range(3)]
        assert_rel_close(sum(p[1] for p in per_example), grad_b)
        assert_rel_close(sum(p[0] for p in per_example), grad_a)


def test_one_sgd_step_from_standard_init_is_the_projected_gradient(tiny):
    model, _ = tiny
    ids, mask, labels = _batch(model.config.vocab_size, seed=1)
    full = capture_gradients(model, ids, mask, labels)
    spec = LoraSpec(r=4, alpha=4)
    probe = LoraProbe(model, spec)
    params = probe.lora_parameters()
    lr = 0.1
    opt = torch.optim.SGD(list(params.values()), lr=lr)
    logits = probe.model(input_ids=ids, attention_mask=mask).logits
    from r2f_ray.core.capture import example_nll

    example_nll(logits, labels).sum().backward()
    opt.step()
    for info in probe.matrices:
        a0, _ = probe.init[info.name]
        b1a1 = params[info.name + ".B"].detach() @ params[info.name + ".A"].detach()
        expected = -lr * spec.scaling * full.dense(info.name) @ a0.T @ a0
        assert_rel_close(b1a1, expected)
    probe.reset()
    for info in probe.matrices:
        a0, b0 = probe.init[info.name]
        assert torch.equal(params[info.name + ".A"].detach(), a0) and torch.equal(params[info.name + ".B"].detach(), b0)


def test_averaging_lora_grads_equals_lora_grad_of_averaged_gradient(tiny):
    model, _ = tiny
    ids, mask, labels = _batch(model.config.vocab_size, n=4, seed=2)
    spec = LoraSpec(r=4, init="zero_offset")
    probe = LoraProbe(model, spec)
    views = [probe.capture(ids[i:i + 1], mask[i:i + 1], labels[i:i + 1]) for i in range(4)]
    for info in probe.matrices:
        a0, b0 = probe.init[info.name]
        mean_g = sum(v.dense(info.name) for v in views) / 4
        want_a, want_b = lora_grads_from_dense(mean_g, a0, b0, spec.scaling)
        got_b = sum(v.extra_grads[info.name + ".B"] for v in views) / 4
        got_a = sum(v.extra_grads[info.name + ".A"] for v in views) / 4
        assert_rel_close(got_b, want_b)
        assert_rel_close(got_a, want_a)


def test_zero_offset_init_leaves_logits_unchanged(tiny):
    model, _ = tiny
    ids, mask, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    probe = LoraProbe(model, LoraSpec(init="zero_offset", seed=7))
    b0 = probe.init[probe.matrices[0].name][1]
    assert b0.abs().max() > 0
    with torch.no_grad():
        after = probe.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_spec_validation_and_fingerprint():
    assert LoraSpec().fingerprint() == LoraSpec().fingerprint()
    assert LoraSpec(seed=1).fingerprint() != LoraSpec().fingerprint()
    with pytest.raises(ValueError):
        LoraSpec(r=0)
    with pytest.raises(ValueError):
        LoraSpec(init="gaussian")


def test_init_does_not_depend_on_other_targets(tiny):
    model, _ = tiny
    spec_all, spec_q = LoraSpec(), LoraSpec(target_modules=("q_proj",))
    q = resolve_targets(model, ["q_proj"])[0]
    assert torch.equal(init_factors(spec_all, q)[0], init_factors(spec_q, q)[0])


_A0_SCRIPT = """
import json, sys, torch
from r2f_ray.assets import tiny_llama
from r2f_ray.core.lora import LoraProbe, LoraSpec
torch.manual_seed(int(sys.argv[1]))  # the global RNG must not matter
probe = LoraProbe(tiny_llama(seed=0)[0], LoraSpec(r=4, seed=11, init="zero_offset"))
params = probe.lora_parameters()
print(json.dumps({k: v.detach().flatten()[:16].tolist() + [float(v.double().sum())] for k, v in params.items()}))
"""


def test_same_spec_gives_same_init_in_two_processes():
    outs = [subprocess.run([sys.executable, "-c", _A0_SCRIPT, str(seed)], capture_output=True, text=True, check=True).stdout
            for seed in (1, 2)]
    first, second = (json.loads(o.strip().splitlines()[-1]) for o in outs)
    assert first == second and len(first) == 2 * 14
