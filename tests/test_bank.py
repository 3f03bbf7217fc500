"""The decoder bank artifact: decode, save/load round trip, refusal of a mismatched model or LoRA spec."""

from __future__ import annotations

import json

import pytest
import torch

from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.decoders import TOKEN_FEATURES, DecoderSet
from r2f_ray.core.lora import LoraProbe, LoraSpec, init_factors, naive_lift


def tiny_bank(tiny, spec, kinds="linear"):
    model, _ = tiny
    probe = LoraProbe(model, spec)
    decoders = DecoderSet(probe.matrices, spec, kinds)
    with torch.no_grad():
        for p in decoders.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return probe, DecoderBank(decoders, "tiny-llama", "ab" * 32, {"note": "test"})


def lora_grads(probe, ids):
    cap = probe.capture(ids)
    return {m.name: (cap.extra_grads[m.name + ".A"], cap.extra_grads[m.name + ".B"]) for m in probe.matrices}, cap


def real_examples(probe, n, seed=2):
    """n single-example (LoRA grads, activation statistics, true G) triples from the probe's model."""
    from r2f_ray.core.decoders import activation_stats

    out = []
    for row in torch.randint(3, 250, (n, 16), generator=torch.Generator().manual_seed(seed)):
        grads, cap = lora_grads(probe, row[None])
        acts = {m.name: activation_stats(cap.factors(m.name, 0)[0], probe.init[m.name][0]) for m in probe.matrices}
        out.append((grads, acts, {m.name: cap.dense(m.name, 0) for m in probe.matrices}))
    return out


def example_batch(probe, items):
    """Stack ``real_examples`` into the per-matrix batch ``fit_local`` reads."""
    return {m.name: (torch.stack([g[m.name][0] for g, _, _ in items]), torch.stack([g[m.name][1] for g, _, _ in items]),
                     torch.stack([d[m.name] for _, _, d in items]),
                     tuple(torch.stack([a[m.name][i] for _, a, _ in items]) for i in range(2)))
            for m in probe.matrices}


def test_naive_bank_decodes_real_peft_lora_grads(tiny):
    spec = LoraSpec(r=4)
    model, _ = tiny
    probe = LoraProbe(model, spec)
    bank = DecoderBank.naive(spec, probe.matrices, "tiny-llama", "00" * 32)
    grads, _ = lora_grads(probe, torch.randint(3, 200, (1, 12)))
    out = bank.decode(grads)
    assert set(out) == {m.name for m in probe.matrices}
    for m in probe.matrices:
        assert out[m.name].shape == (m.d_out, m.d_in) and out[m.name].dtype == torch.float32
        torch.testing.assert_close(out[m.name], naive_lift(grads[m.name][1], probe.init[m.name][0]))


def test_save_load_round_trip_decodes_the_same(tiny, tmp_path):
    spec = LoraSpec(r=4, init="zero_offset")
    probe, bank = tiny_bank(tiny, spec, {"q_proj": "sketch", "down_proj": "mlp"})
    grads, _ = lora_grads(probe, torch.randint(3, 200, (1, 12)))
    subset = dict(list(grads.items())[:5])  # a caller may decode only some matrices
    before = bank.decode(subset)
    bank.save(tmp_path / "bank")
    manifest = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert manifest["model_id"] == "tiny-llama" and manifest["lora_spec"]["init"] == "zero_offset"
    assert manifest["kinds"]["q_proj"] == "sketch" and manifest["info"] == {"note": "test"}
    loaded = DecoderBank.load(tmp_path / "bank", model_id="tiny-llama", weights_sha256="ab" * 32, spec=spec)
    after = loaded.decode(subset)
    for name in subset:
        torch.testing.assert_close(after[name], before[name])
    with pytest.raises(FileExistsError):
        bank.save(tmp_path / "bank")


def test_bank_refuses_a_mismatched_model_unless_transfer_is_named(tiny, tmp_path):
    spec = LoraSpec(r=4)
    _, bank = tiny_bank(tiny, spec)
    bank.save(tmp_path / "bank")
    with pytest.raises(ValueError, match=r"model mismatch.*'tiny-llama' \(bank\) vs 'other' \(requested\).*same_shapes"):
        DecoderBank.load(tmp_path / "bank", model_id="other")
    with pytest.raises(ValueError, match="weights sha256"):
        DecoderBank.load(tmp_path / "bank", weights_sha256="cd" * 32)
    loaded = DecoderBank.load(tmp_path / "bank", model_id="other", transfer="same_shapes")
    assert loaded.transfer == "same_shapes" and loaded.model_id == "tiny-llama"
    with pytest.raises(ValueError, match="unknown transfer mode"):
        DecoderBank.load(tmp_path / "bank", transfer="magic")


@pytest.mark.parametrize("change", [{"r": 8}, {"seed": 1}, {"init": "zero_offset"}, {"alpha": 16.0}])
def test_bank_refuses_a_mismatched_lora_spec_even_with_transfer(tiny, tmp_path, change):
    spec = LoraSpec(r=4)
    _, bank = tiny_bank(tiny, spec)
    bank.save(tmp_path / "bank")
    other = spec.model_copy(update=change)
    with pytest.raises(ValueError, match=f"LoRA spec mismatch.*{spec.fingerprint()}.*{other.fingerprint()}"):
        DecoderBank.load(tmp_path / "bank", spec=other, transfer="same_shapes")


def test_decode_names_bad_input(tiny):
    spec = LoraSpec(r=4)
    probe, bank = tiny_bank(tiny, spec)
    m = probe.matrices[0]
    with pytest.raises(ValueError, match="no decoder for 'nope'"):
        bank.decode({"nope": (torch.zeros(4, m.d_in), torch.zeros(m.d_out, 4))})
    with pytest.raises(ValueError, match=f"expected grad_A \\[4, {m.d_in}\\]"):
        bank.decode({m.name: (torch.zeros(8, m.d_in), torch.zeros(m.d_out, 8))})


def test_load_refuses_a_folder_that_is_not_a_bank(tmp_path):
    with pytest.raises(ValueError, match="is not a decoder bank"):
        DecoderBank.load(tmp_path)


def test_lora_init_is_recomputed_not_stored(tiny, tmp_path):
    spec = LoraSpec(r=4)
    probe, bank = tiny_bank(tiny, spec, "naive")
    bank.save(tmp_path / "bank")
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "bank" / "decoders.safetensors")) == {}
    loaded = DecoderBank.load(tmp_path / "bank")
    m = probe.matrices[0]
    key = next(k for k, g in loaded.decoders.groups.items() if m.name in g.names)
    group = loaded.decoders.groups[key]
    torch.testing.assert_close(group.a0[group.names.index(m.name)], init_factors(spec, m)[0])


def test_covariance_calibrated_lift_beats_naive_on_real_gradients(tiny):
    """Forward passes only: the lift from input covariances recovers more of G than grad_B @ A0 (little
    here: a random-weight model's activations are nearly isotropic; see the synthetic exactness test)."""
    from r2f_ray.core.decoders import input_covariance, pair_cosine

    spec = LoraSpec(r=4)
    model, _ = tiny
    ids = torch.randint(3, 250, (16, 24), generator=torch.Generator().manual_seed(1))
    probe = LoraProbe(model, spec)
    names = [m.name for m in probe.matrices]
    cov = input_covariance(probe.model, names, ids[:8])
    bank = DecoderBank.calibrated(spec, probe.matrices, "tiny-llama", "00" * 32, cov)
    naive = DecoderBank.naive(spec, probe.matrices, "tiny-llama", "00" * 32)
    gains = []
    for row in ids[8:]:
        grads, cap = lora_grads(probe, row[None])
        fitted, floor = bank.decode(grads), naive.decode(grads)
        for n in names:
            g = cap.dense(n, 0)
            gains.append(float(pair_cosine(fitted[n][None, None], g[None, None]) - pair_cosine(floor[n][None, None], g[None, None])))
    assert sum(gains) / len(gains) > 0.01


def test_activation_bank_decodes_real_gradients_with_request_statistics(tiny, tmp_path):
    """Fitted on pairs from the model itself, the activation kind beats the ridge lift on held-out real
    gradients, survives a save/load round trip, and refuses to decode without the statistics."""
    from r2f_ray.core.decoders import fit_local, pair_cosine

    spec = LoraSpec(r=4)
    model, _ = tiny
    probe = LoraProbe(model, spec)
    examples = real_examples(probe, 28)
    train = [example_batch(probe, examples[i:i + 4]) for i in range(0, 20, 4)]
    banks = {}
    for kind in ("linear", "activation"):
        decoders = DecoderSet(probe.matrices, spec, kind)
        fit_local(decoders, train, steps=0)
        banks[kind] = DecoderBank(decoders, "tiny-llama", "00" * 32)
    banks["activation"].save(tmp_path / "bank")
    loaded = DecoderBank.load(tmp_path / "bank")
    assert loaded.needs_acts and not banks["linear"].needs_acts
    cos = {"linear": [], "activation": []}
    for grads, acts, dense in examples[20:]:
        for kind, out in (("linear", banks["linear"].decode(grads)), ("activation", loaded.decode(grads, acts=acts))):
            cos[kind] += [float(pair_cosine(out[n][None, None], dense[n][None, None])) for n in dense]
    mean = {k: sum(v) / len(v) for k, v in cos.items()}
    assert mean["activation"] > mean["linear"] + 0.05, mean
    with pytest.raises(ValueError, match="activation statistics"):
        loaded.decode(examples[20][0])


def test_map_by_role_depth_to_other_shapes(tiny):
    from r2f_ray.assets import tiny_llama
    from r2f_ray.core.decoders import input_covariance

    spec = LoraSpec(r=4, init="zero_offset")
    probe, bank = tiny_bank(tiny, spec, {"q_proj": "sketch", "down_proj": "mlp", "v_proj": "activation"})
    target_model, _ = tiny_llama(seed=3, hidden=96, layers=3, intermediate=160, heads=4, kv_heads=2)
    target_probe = LoraProbe(target_model, spec)
    ids = torch.randint(3, 250, (2, 16))
    names = [m.name for m in target_probe.matrices]
    with pytest.raises(ValueError, match="needs their input covariances"):
        bank.map_by_role_depth(target_probe.matrices, spec, "tiny-96", "11" * 32)
    with pytest.raises(ValueError, match="keeps the LoRA settings"):
        bank.map_by_role_depth(target_probe.matrices, spec.model_copy(update={"seed": 5}), "tiny-96", "11" * 32)
    cov = input_covariance(target_probe.model, names, ids)
    unweighted = bank.map_by_role_depth(target_probe.matrices, spec, "tiny-96", "11" * 32, cov)
    assert not unweighted.decoders.has_token_weights and "token_weights" not in unweighted.info
    v_names = [m.name for m in bank.matrices if m.role == "v_proj"]
    bank.decoders.set_token_coefficients({n: torch.tensor([0.5, -1.0, 2.0, 1.0, -0.5, 0.7, 0.4]) * (i + 1) for i, n in enumerate(v_names)})
    bank.info["token_weights"] = {"data": "test"}
    mapped = bank.map_by_role_depth(target_probe.matrices, spec, "tiny-96", "11" * 32, cov)
    assert mapped.kinds["q_proj"] == "sketch" and mapped.kinds["down_proj"] == "linear"
    assert mapped.kinds["v_proj"] == "activation"
    assert mapped.info["transfer"]["mapping"]["model.layers.2.self_attn.q_proj"] == "model.layers.1.self_attn.q_proj"
    # Token weights travel with the activation decoders they belong to.
    assert mapped.decoders.has_token_weights and mapped.info["token_weights"] == {"data": "test"}
    for name, source in mapped.info["transfer"]["mapping"].items():
        if "v_proj" in name:
            features = torch.randn(5, len(TOKEN_FEATURES))
            torch.testing.assert_close(mapped.decoders.token_weights(name, features), bank.decoders.token_weights(source, features))
    grads, cap = lora_grads(target_probe, ids[:1])
    from r2f_ray.core.decoders import activation_stats

    acts = {m.name: activation_stats(cap.factors(m.name, 0)[0], target_probe.init[m.name][0]) for m in target_probe.matrices}
    out = mapped.decode(grads, acts=acts)
    m = target_probe.matrices[-1]
    assert out[m.name].shape == (m.d_out, m.d_in) and torch.isfinite(out[m.name]).all()


def test_bank_loads_onto_another_family_by_role_and_depth(tiny, tmp_path):
    """A bank fitted on tiny Llama, loaded for a tiny Gemma 3 (other shapes and depth) with
    ``by_role_depth``: mapped by role/depth, calibrated with forward passes only, and on Gemma's own real
    gradients its activation decoders beat the naive lift."""
    from r2f_ray.assets import byte_tokenizer, calibration_ids, tiny_gemma
    from r2f_ray.core.decoders import fit_local, input_covariance, pair_cosine

    spec = LoraSpec(r=4)
    model, _ = tiny
    probe = LoraProbe(model, spec)
    fitting = real_examples(probe, 8)
    train = [example_batch(probe, fitting[:4]), example_batch(probe, fitting[4:])]
    decoders = DecoderSet(probe.matrices, spec, {"v_proj": "activation", "o_proj": "activation", "q_proj": "linear"} |
                          {r: "activation" for r in ("k_proj", "gate_proj", "up_proj", "down_proj")})
    fit_local(decoders, train, steps=0)
    DecoderBank(decoders, "tiny-llama", "00" * 32).save(tmp_path / "bank")

    gemma, _ = tiny_gemma()
    with pytest.raises(ValueError, match="model mismatch"):
        DecoderBank.load(tmp_path / "bank", "tiny-gemma", "11" * 32)
    with pytest.raises(ValueError, match="load_for_model"):
        DecoderBank.load(tmp_path / "bank", "tiny-gemma", "11" * 32, transfer="by_role_depth")
    with pytest.raises(ValueError, match="calibration_ids"):
        DecoderBank.load_for_model(tmp_path / "bank", gemma, "tiny-gemma", "11" * 32, "by_role_depth")
    own = DecoderBank.load_for_model(tmp_path / "bank", model, "tiny-llama", "00" * 32, "by_role_depth")
    assert own.transfer is None and own.matrices == probe.matrices  # its own model: nothing to map or calibrate
    with pytest.raises(ValueError, match="LoRA spec mismatch"):  # no mapping, so the spec must match exactly
        DecoderBank.load(tmp_path / "bank", "tiny-llama", "00" * 32, spec.model_copy(update={"seed": 5}), "by_role_depth")
    ids = calibration_ids(byte_tokenizer(), tokens=32, count=4)
    mapped = DecoderBank.load_for_model(tmp_path / "bank", gemma, "tiny-gemma", "11" * 32, "by_role_depth", ids)
    target = LoraProbe(gemma, spec)
    assert mapped.transfer == "by_role_depth" and mapped.model_id == "tiny-gemma"
    assert [m.name for m in mapped.matrices] == [m.name for m in target.matrices]
    assert mapped.info["transfer"]["mapping"]["model.layers.2.mlp.down_proj"] == "model.layers.1.mlp.down_proj"
    # The linear role is the ridge lift of Gemma's own input covariance (forward passes only).
    q = [m for m in target.matrices if m.role == "q_proj"]
    calibrated = DecoderBank.calibrated(spec, q, "tiny-gemma", "11" * 32, input_covariance(gemma, [m.name for m in q], ids))
    examples = real_examples(target, 6, seed=7)
    grads, acts, dense = examples[0]
    torch.testing.assert_close(mapped.decode({m.name: grads[m.name] for m in q}),
                               calibrated.decode({m.name: grads[m.name] for m in q}))
    naive = DecoderBank.naive(spec, target.matrices, "tiny-gemma", "11" * 32)
    gain = []
    for grads, acts, dense in examples:
        out, floor = mapped.decode(grads, acts=acts), naive.decode(grads)
        gain += [float(pair_cosine(out[n][None, None], dense[n][None, None]) - pair_cosine(floor[n][None, None], dense[n][None, None]))
                 for n in dense if mapped.kinds[n.rsplit(".", 1)[1]] == "activation"]
    assert sum(gain) / len(gain) > 0.3, sum(gain) / len(gain)


def test_engine_runs_r2f_on_another_family_with_a_transferred_bank(tiny, tmp_path):
    """`assets.load_bank` (what unlearn, evaluate and the service call) maps a Llama bank onto Gemma; the
    engine's R2F update with it lies closer to Gemma's exact multi-view gradient than the naive lift's."""
    import copy

    from r2f_ray.assets import LoadedModel, byte_tokenizer, load_bank, tiny_gemma
    from r2f_ray.core.decoders import fit_local
    from r2f_ray.core.linalg import cosine
    from r2f_ray.core.unlearn import ForgetRequest, unlearn

    spec = LoraSpec(r=4)
    probe = LoraProbe(tiny[0], spec)
    fitting = real_examples(probe, 8)
    decoders = DecoderSet(probe.matrices, spec, "activation")
    fit_local(decoders, [example_batch(probe, fitting[:4]), example_batch(probe, fitting[4:])], steps=0)
    DecoderBank(decoders, "tiny-llama", "00" * 32).save(tmp_path / "bank")
    gemma, tok = tiny_gemma()
    bank = load_bank(tmp_path / "bank", LoadedModel(gemma, tok, "tiny-gemma", "11" * 32), "by_role_depth")
    assert bank.transfer == "by_role_depth" and bank.needs_acts
    fact = [ForgetRequest("What is the capital of France?", "Paris", "france")]
    copies = [copy.deepcopy(gemma) for _ in range(2)]
    r2f = unlearn(gemma, tok, fact, decoder=bank, views=3, step=0.4)
    naive = unlearn(copies[0], tok, fact, decoder=DecoderBank.naive(spec, bank.matrices, "tiny-gemma", "11" * 32),
                    views=3, step=0.4)
    exact = unlearn(copies[1], tok, fact, views=3, step=0.4, method="exact_multiview")

    def flat(res):
        return torch.cat([res.deltas[m.name].flatten() for m in bank.matrices])

    assert cosine(flat(r2f), flat(exact)) > cosine(flat(naive), flat(exact)) + 0.3
