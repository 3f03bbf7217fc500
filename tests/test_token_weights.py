"""Token weights of the activation prior: features, the weighted statistics, the fit, the bank and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from r2f_ray.assets import tiny_llama, weights_hash
from r2f_ray.core.attention import OUTPUT_FLOOR
from r2f_ray.core.bank import WEIGHTS, DecoderBank, RequestView
from r2f_ray.core.capture import IGNORE_INDEX
from r2f_ray.core.decoders import (RESIDUAL_WRITER_ROLES, TOKEN_FEATURES, DecoderSet, WriterRequest, activation_stats,
                                   fit_local, fit_token_coefficients, grad_a_token_energy, pair_cosine,
                                   residual_writer_decode, token_features)
from r2f_ray.core.lora import LoraProbe, LoraSpec, init_factors, lora_grads_from_dense, lora_grads_from_factors
from r2f_ray.core.targets import MatrixInfo

D_OUT, D_IN, R, T = 12, 20, 4, 12
SCORED = torch.tensor([False] * 7 + [True] * 4 + [False])  # a prompt, a 4-token answer, the last token
THETA = torch.tensor([0.5, -2.0, 3.0, 1.0, -1.0, 0.0, 0.0])


def test_weighted_activation_stats_are_the_weighted_input_covariance():
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    a0 = torch.randn(R, D_IN, dtype=torch.float64)
    w = torch.rand(2, 5, dtype=torch.float64)
    gram, cross = activation_stats(x, a0, w)
    for i in range(2):
        c = x[i].T @ torch.diag(w[i]) @ x[i]
        c = c / c.trace()
        torch.testing.assert_close(gram[i].double(), a0 @ c @ a0.T, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cross[i].double(), a0 @ c, rtol=1e-5, atol=1e-7)
    # Unit weights are the unweighted statistics.
    for a, b in zip(activation_stats(x, a0, torch.ones(2, 5)), activation_stats(x, a0)):
        torch.testing.assert_close(a, b)


def test_token_features_count_from_the_scored_span():
    x = torch.randn(T, D_IN)
    f = token_features(x, SCORED)
    assert f.shape == (T, len(TOKEN_FEATURES))
    torch.testing.assert_close(f[:, 0], x.double().pow(2).sum(-1).log())
    assert f[:, 1].tolist() == [1.0] + [0.0] * (T - 1)
    assert f[:, 2].tolist() == SCORED.double().tolist()
    after = [4] * 8 + [3, 2, 1, 0]
    torch.testing.assert_close(f[:, 3], torch.tensor(after, dtype=torch.float64).log1p())
    to_first = [7, 6, 5, 4, 3, 2, 1] + [0] * 5
    torch.testing.assert_close(f[:, 4], torch.tensor(to_first, dtype=torch.float64).log1p())
    # A longer chat template in front changes nothing relative to the answer.
    g = token_features(torch.randn(T + 3, D_IN), torch.cat([torch.zeros(3, dtype=torch.bool), SCORED]))
    torch.testing.assert_close(g[3:, 2:4], f[:, 2:4])
    torch.testing.assert_close(g[-5:, 4], f[-5:, 4])


def synthetic_sequences(n: int, seed: int):
    """Sequences whose per-token gradient energy is exactly exp(THETA . phi_t) (up to a per-sequence
    scale): (x [T, d_in], d [T, d_out]) pairs."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64)
        u = torch.randn(T, D_OUT, generator=gen, dtype=torch.float64)
        energy = (token_features(x, SCORED) @ THETA.double()).exp()
        scale = torch.exp(torch.randn(1, generator=gen, dtype=torch.float64) * 2)
        out.append((x, u / u.norm(dim=1, keepdim=True) * (energy * scale).sqrt()[:, None]))
    return out


def test_fit_recovers_the_coefficients_of_the_gradient_energy():
    data = synthetic_sequences(16, seed=0)
    theta = fit_token_coefficients([token_features(x, SCORED) for x, _ in data], [d.pow(2).sum(1) for _, d in data],
                                   ridge=1e-9)
    torch.testing.assert_close(theta, THETA, rtol=0, atol=1e-3)


def test_fitted_token_weights_decode_closer_than_unweighted_statistics():
    spec = LoraSpec(r=R)
    info = MatrixInfo("model.layers.0.mlp.down_proj", 0, "down_proj", D_OUT, D_IN)
    decoders = DecoderSet([info], spec, "activation")
    train = synthetic_sequences(16, seed=1)
    decoders.set_token_coefficients({info.name: fit_token_coefficients(
        [token_features(x, SCORED) for x, _ in train], [d.pow(2).sum(1) for _, d in train])})
    a0, b0 = init_factors(spec, info)
    cos = {"weighted": [], "unweighted": []}
    for x, d in synthetic_sequences(8, seed=2):
        x, d = x.float(), d.float()
        g = d.T @ x
        grad_a, grad_b = lora_grads_from_dense(g, a0, b0, spec.scaling)
        weights = decoders.token_weights(info.name, token_features(x, SCORED))
        for name, acts in (("weighted", activation_stats(x, a0, weights)), ("unweighted", activation_stats(x, a0))):
            pred = decoders({info.name: (grad_a[None], grad_b[None], None, (acts[0][None], acts[1][None]))})[info.name]
            cos[name].append(float(pair_cosine(pred[None], g[None, None])))
    mean = {k: sum(v) / len(v) for k, v in cos.items()}
    assert mean["weighted"] > mean["unweighted"] + 0.05, mean


def test_per_head_statistics_decode_each_heads_rows_under_its_own_prior():
    # Two heads of 6 output rows each: with per-head stats [H, r, ...], head h's rows of grad_B go through the
    # lift of head h's weighted covariance alone (at the calibrated mix, with the proxy prior).
    torch.manual_seed(0)
    spec = LoraSpec(r=R)
    info = MatrixInfo("model.layers.0.self_attn.k_proj", 0, "k_proj", D_OUT, D_IN)
    decoders = DecoderSet([info], spec, "activation")
    group = decoders.groups[decoders.where[info.name][0]]
    group.init_covariance(torch.eye(D_IN)[None] + 0.1)
    a0 = init_factors(spec, info)[0]
    x, grad_b = torch.randn(T, D_IN), torch.randn(D_OUT, R)
    w = torch.rand(2, T)
    gram, cross = activation_stats(x, a0, w)
    assert gram.shape == (2, R, R) and cross.shape == (2, R, D_IN)
    out = decoders({info.name: (torch.zeros(1, R, D_IN), grad_b[None], None, (gram[None], cross[None]))})[info.name][0]
    for h in range(2):
        alone = decoders({info.name: (torch.zeros(1, R, D_IN), grad_b[None, 6 * h:6 * (h + 1)].repeat(1, 2, 1), None,
                                      (gram[h][None], cross[h][None]))})[info.name][0]
        torch.testing.assert_close(out[6 * h:6 * (h + 1)], alone[:6])


def test_per_head_calibration_scores_are_the_decoded_cosines():
    # calibration_scores computes cos(grad_B L, G) from r-sized products; with per-head statistics it must
    # equal decoding each grid value for real and comparing with G.
    torch.manual_seed(1)
    spec = LoraSpec(r=R)
    infos = [MatrixInfo(f"model.layers.{i}.self_attn.q_proj", i, "q_proj", D_OUT, D_IN) for i in range(2)]
    decoders = DecoderSet(infos, spec, "activation")
    group = decoders.groups[decoders.where[infos[0].name][0]]
    group.init_covariance(torch.eye(D_IN).expand(2, -1, -1) + 0.2)
    n, heads = 3, 3
    x = torch.randn(2, n, T, D_IN)
    a0 = group.a0
    stats = [activation_stats(x[k], a0[k], torch.rand(n, heads, T)) for k in range(2)]
    acts = (torch.stack([g for g, _ in stats]), torch.stack([c for _, c in stats]))  # [K, N, H, r, ...]
    grad_b, full = torch.randn(2, n, D_OUT, R), torch.randn(2, n, D_OUT, D_IN)
    scores = group.calibration_scores(None, grad_b, full, acts)
    for j, value in enumerate(group.calibration_grid):
        group.set_calibration(torch.full((2,), j))
        decoded = group(None, grad_b, None, acts)
        torch.testing.assert_close(scores[:, j], pair_cosine(decoded, full).sum(-1).double(), rtol=1e-4, atol=1e-5)


def test_attention_features_are_per_head_and_the_shared_ones_unchanged():
    x = torch.randn(T, D_IN)
    energy = torch.rand(3, T) + 0.1
    energy[1, 4] = 0.0  # a token no query reaches: floored, not -inf
    f = token_features(x, SCORED, energy)
    assert f.shape == (3, T, len(TOKEN_FEATURES)) and torch.isfinite(f).all()
    col = TOKEN_FEATURES.index("log_attention")
    torch.testing.assert_close(f[..., :col], token_features(x, SCORED)[None, :, :col].expand(3, -1, -1))
    torch.testing.assert_close(f[..., col], (energy / energy.amax(-1, keepdim=True)).clamp_min(1e-8).log().double())
    assert float(token_features(x, SCORED)[:, col].abs().sum()) == 0  # other matrices: no attention feature


def test_output_feature_is_the_tokens_output_energy_relative_to_the_scored_mean():
    x = torch.randn(T, D_IN)
    output = torch.where(SCORED, torch.rand(T) + 0.5, torch.zeros(T))  # unscored tokens predict nothing in the loss
    col = TOKEN_FEATURES.index("log_output")
    f = token_features(x, SCORED, output=output)
    expected = (output.double() / output[SCORED].double().mean() + OUTPUT_FLOOR).log()
    torch.testing.assert_close(f[:, col], expected)
    assert float(f[~SCORED, col].max()) == pytest.approx(math.log(OUTPUT_FLOOR))  # only what later tokens send
    torch.testing.assert_close(f[:, :col], token_features(x, SCORED)[:, :col])
    assert float(token_features(x, SCORED)[:, col].abs().sum()) == 0
    # With attention as well: the output column is shared by every head.
    f_heads = token_features(x, SCORED, torch.rand(2, T) + 0.1, output)
    torch.testing.assert_close(f_heads[..., col], expected[None].expand(2, -1))


def test_only_activation_decoders_take_token_weights():
    spec = LoraSpec(r=R)
    info = MatrixInfo("model.layers.0.mlp.down_proj", 0, "down_proj", D_OUT, D_IN)
    linear = DecoderSet([info], spec, "linear")
    assert linear.token_weights(info.name, torch.zeros(3, len(TOKEN_FEATURES))) is None
    with pytest.raises(ValueError, match="no token weights"):
        linear.set_token_coefficients({info.name: THETA})


# ---- on a real (tiny, random-weight) model ----

SPEC = LoraSpec(r=4)


def qa_batch(n: int, seed: int):
    """Random 16-token sequences with the loss on their last 4 tokens (an answer after a prompt)."""
    ids = torch.randint(3, 250, (n, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX
    return ids, torch.ones_like(ids), labels


def build_bank(spec: LoraSpec, path):
    """A closed-form activation bank of tiny Llama (seed 0, the CLI's `--model tiny`), fitted on text gradients."""
    model, _ = tiny_llama(seed=0)
    sha = weights_hash(model)  # before the probe wraps the model
    probe = LoraProbe(model, spec)
    cap = probe.capture(torch.randint(3, 250, (16, 16), generator=torch.Generator().manual_seed(1)))
    batch = {}
    for m in probe.matrices:
        a0 = probe.init[m.name][0]
        xs = [cap.factors(m.name, b)[0] for b in range(16)]
        gram, cross = zip(*(activation_stats(x, a0) for x in xs))
        dense = torch.stack([cap.dense(m.name, b) for b in range(16)])
        grads = [lora_grads_from_dense(g, a0, probe.init[m.name][1], spec.scaling) for g in dense]
        batch[m.name] = (torch.stack([g[0] for g in grads]), torch.stack([g[1] for g in grads]), dense,
                         (torch.stack(gram), torch.stack(cross)))
    decoders = DecoderSet(probe.matrices, spec, "activation")
    fit_local(decoders, [batch], steps=0)
    DecoderBank(decoders, "tiny-llama-seed0", sha).save(path)
    return path


@pytest.fixture(scope="module")
def activation_bank(tmp_path_factory):
    return build_bank(SPEC, tmp_path_factory.mktemp("bank") / "bank")


def request_cosines(bank: DecoderBank, weighted: bool) -> float:
    """Mean cosine to the exact gradient over held-out answer sequences, decoded as the engine does."""
    model = tiny_llama(seed=0)[0]
    probe = LoraProbe(model, bank.spec)
    ids, mask, labels = qa_batch(8, seed=5)
    with bank.attention_recorder(model) as recorder:
        cap = probe.capture(ids, mask, labels, output_energy=bank.needs_output_energy)
    out = []
    for b in range(8):
        # Per-example LoRA gradients from the factors, as the engine computes them.
        grads = {m.name: lora_grads_from_factors(*cap.factors(m.name, b), *probe.init[m.name], bank.spec.scaling)
                 for m in probe.matrices}
        views = bank.request_views(cap, recorder, b, [m.name for m in probe.matrices])
        acts = {m.name: bank.request_stats(m.name, [views[m.name]])
                if weighted
                else activation_stats(cap.factors(m.name, b)[0], probe.init[m.name][0]) for m in probe.matrices}
        decoded = bank.decode(grads, acts=acts, request=weighted)
        out += [float(pair_cosine(decoded[m.name][None, None], cap.dense(m.name, b)[None, None])) for m in probe.matrices]
    return sum(out) / len(out)


def test_bank_fits_token_weights_on_answer_gradients_and_keeps_them(activation_bank, tmp_path):
    bank = DecoderBank.load(activation_bank)
    assert not bank.decoders.has_token_weights
    before = request_cosines(bank, weighted=True)
    assert before == pytest.approx(request_cosines(bank, weighted=False), abs=1e-6)  # nothing fitted yet
    coefficients = bank.fit_token_weights(tiny_llama(seed=0)[0], *qa_batch(24, seed=4), data="random answers")
    assert set(coefficients) == {m.name for m in bank.matrices} and bank.decoders.has_token_weights
    assert bank.info["token_weights"]["sequences"] == 24 and bank.info["token_weights"]["features"] == list(TOKEN_FEATURES)
    after = request_cosines(bank, weighted=True)
    assert after > before + 0.02, (before, after)
    # The request mix is picked apart from the pairs' one: the bank as trained decodes exactly as before.
    assert request_cosines(bank, weighted=False) == pytest.approx(before, abs=1e-6)
    assert any(not torch.isnan(g.request_mix_logit).all() for g in bank.decoders.groups.values() if g.needs_acts)
    bank.save(tmp_path / "weighted")
    loaded = DecoderBank.load(tmp_path / "weighted")
    assert loaded.info["token_weights"]["data"] == "random answers"
    assert request_cosines(loaded, weighted=True) == pytest.approx(after, abs=1e-6)


def test_zero_offset_bank_decodes_requests_that_match_grad_a(tmp_path):
    spec = LoraSpec(r=4, init="zero_offset")
    bank = DecoderBank.load(build_bank(spec, tmp_path / "zero_offset"))
    groups = [g for g in bank.decoders.groups.values() if g.needs_acts]
    picked = [g.out_mix.clone() for g in groups]  # on the pairs, by the closed-form fit
    assert all(float(v) in {float(torch.tensor(x)) for x in g.output_grid} for g in groups for v in g.out_mix)
    bank.fit_token_weights(tiny_llama(seed=0)[0], *qa_batch(24, seed=4), data="random answers")
    assert all(torch.equal(g.out_mix, p) for g, p in zip(groups, picked))  # requests use the pairs' pick
    both = request_cosines(bank, weighted=True)
    for g in groups:  # the same decoders, grad_A ignored
        g.output_side = False
    assert both > request_cosines(bank, weighted=True)
    for g in groups:
        g.output_side = True
    # The decoded request reproduces the observed grad_A = s B0^T G exactly.
    m = bank.matrices[0]
    model = tiny_llama(seed=0)[0]
    probe = LoraProbe(model, spec)
    ids, mask, labels = qa_batch(1, seed=6)
    with bank.attention_recorder(model) as recorder:
        cap = probe.capture(ids, mask, labels, output_energy=bank.needs_output_energy)
    grad_a, grad_b = lora_grads_from_factors(*cap.factors(m.name, 0), *probe.init[m.name], spec.scaling)
    view = bank.request_views(cap, recorder, 0, [m.name])[m.name]
    decoded = bank.decode({m.name: (grad_a, grad_b)}, acts={m.name: bank.request_stats(m.name, [view])})[m.name]
    torch.testing.assert_close(spec.scaling * probe.init[m.name][1].T @ decoded, grad_a, rtol=1e-3,
                               atol=1e-4 * float(grad_a.abs().max()))
    bank.save(tmp_path / "weighted")
    assert request_cosines(DecoderBank.load(tmp_path / "weighted"), weighted=True) == pytest.approx(both, abs=1e-6)


def test_zero_offset_bank_decodes_residual_writers_with_their_neighbours(tmp_path):
    """decode_request: every matrix but the residual-stream writers decodes as ``decode`` with the request's
    statistics; each writer is ``residual_writer_decode`` over the writers up to writer_neighbours away in
    residual order (o_proj before down_proj in a layer); writer_neighbours = 0 is the plain decode."""
    spec = LoraSpec(r=4, init="zero_offset")
    bank = DecoderBank.load(build_bank(spec, tmp_path / "zero_offset"))
    assert bank.writer_neighbours == 2
    model = tiny_llama(seed=0)[0]
    probe = LoraProbe(model, spec)
    ids, mask, labels = qa_batch(2, seed=6)
    with bank.attention_recorder(model) as recorder:
        cap = probe.capture(ids, mask, labels, output_energy=bank.needs_output_energy)
    names = [m.name for m in bank.matrices]
    # a request of two views: LoRA gradients averaged over them, statistics over both
    grads = {}
    for n in names:
        per_view = [lora_grads_from_factors(*cap.factors(n, b), *probe.init[n], spec.scaling) for b in range(2)]
        grads[n] = tuple((a + b) / 2 for a, b in zip(*per_view))
    views = {n: [bank.request_views(cap, recorder, b, names)[n] for b in range(2)] for n in names}
    joint = bank.decode_request(grads, views)
    plain = bank.decode(grads, acts={n: bank.request_stats(n, views[n], grads[n][0]) for n in names})
    writers = sorted((m for m in bank.matrices if m.role in RESIDUAL_WRITER_ROLES),
                     key=lambda m: (m.layer, RESIDUAL_WRITER_ROLES.index(m.role)))
    assert [m.role for m in writers[:2]] == ["o_proj", "down_proj"] and len(writers) >= 4
    for m in bank.matrices:
        if m not in writers:
            torch.testing.assert_close(joint[m.name], plain[m.name])
    requests = []
    for m in writers:
        x = torch.cat([v.x for v in views[m.name]])
        requests.append(WriterRequest(x, *grads[m.name], *probe.init[m.name], grad_a_token_energy(x, grads[m.name][0])))
    for i, m in enumerate(writers):
        lo = max(0, i - 2)
        want = residual_writer_decode(requests[lo:i + 3], i - lo, bank.writer_correlation, spec.scaling)
        torch.testing.assert_close(joint[m.name], want)
        assert not torch.allclose(joint[m.name], plain[m.name], rtol=1e-2)
        # the decoded writer still reproduces its own grad_A
        torch.testing.assert_close(spec.scaling * probe.init[m.name][1].T @ joint[m.name], grads[m.name][0],
                                   rtol=1e-3, atol=1e-4 * float(grads[m.name][0].abs().max()))
    bank.writer_neighbours = 0
    alone = bank.decode_request(grads, views)
    for n in names:
        torch.testing.assert_close(alone[n], plain[n])


def test_attention_weighted_matrices_need_the_attention_energy(activation_bank):
    bank = DecoderBank.load(activation_bank)
    bank.fit_token_weights(tiny_llama(seed=0)[0], *qa_batch(8, seed=4), data="random answers")
    weighted = bank.decoders.attention_weighted
    assert weighted and {n.rsplit(".", 1)[1] for n in weighted} <= {"q_proj", "k_proj", "v_proj"}
    name = sorted(weighted)[0]
    x = torch.randn(16, next(m.d_in for m in bank.matrices if m.name == name))
    with pytest.raises(ValueError, match="attention_recorder"):
        bank.request_stats(name, [RequestView(x, torch.ones(16, dtype=torch.bool), None, torch.ones(16))])
    # The fit also uses the output energies, so requests must be captured with them.
    assert bank.needs_output_energy and name in bank.decoders.output_weighted
    with pytest.raises(ValueError, match="output_energy=True"):
        bank.request_stats(name, [RequestView(x, torch.ones(16, dtype=torch.bool), torch.ones(2, 16), None)])


def test_a_bank_saved_before_the_attention_feature_keeps_its_weights(activation_bank, tmp_path):
    bank = DecoderBank.load(activation_bank)
    col = TOKEN_FEATURES.index("log_attention")
    bank.decoders.set_token_coefficients({m.name: THETA for m in bank.matrices})
    bank.save(tmp_path / "five")
    state = load_file(str(tmp_path / "five" / WEIGHTS))
    save_file({k: (v[..., :col].contiguous() if k.endswith("token_coef") else v) for k, v in state.items()},
              str(tmp_path / "five" / WEIGHTS))
    old = DecoderBank.load(tmp_path / "five")
    assert not old.decoders.attention_weighted
    features = token_features(torch.randn(6, bank.matrices[0].d_in), SCORED[:6])
    for m in bank.matrices:
        torch.testing.assert_close(old.decoders.token_weights(m.name, features), bank.decoders.token_weights(m.name, features))


def test_a_bank_saved_before_token_weights_loads_unweighted(activation_bank, tmp_path):
    bank = DecoderBank.load(activation_bank)
    bank.fit_token_weights(tiny_llama(seed=0)[0], *qa_batch(8, seed=4), data="random answers")
    bank.save(tmp_path / "old")
    state = load_file(str(tmp_path / "old" / WEIGHTS))
    save_file({k: v for k, v in state.items() if not k.endswith("token_coef")}, str(tmp_path / "old" / WEIGHTS))
    old = DecoderBank.load(tmp_path / "old")
    assert all(float(g.token_coef.abs().sum()) == 0 for g in old.decoders.groups.values())
    name = old.matrices[0].name
    x = torch.randn(6, old.matrices[0].d_in)
    for a, b in zip(old.request_stats(name, [RequestView(x, torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool))]),
                    activation_stats(x, init_factors(SPEC, old.matrices[0])[0])):
        torch.testing.assert_close(a, b)


def r2f(*args):
    return subprocess.run([sys.executable, "-m", "r2f_ray.cli", *args], capture_output=True, text=True)


def test_cli_fits_token_weights_and_evaluates_on_forget_facts(activation_bank, tmp_path):
    path = activation_bank
    out = tmp_path / "weighted"
    proc = r2f("token-weights", "--bank", str(path), "--model", "tiny", "--facts", "8", "--texts", "4", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "log_attention" in proc.stdout and "wrote" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["token_weights"]["sequences"] == 12
    assert "region" in manifest["info"]["token_weights"]["data"] and "Wikipedia" in manifest["info"]["token_weights"]["data"]
    proc = r2f("token-weights", "--bank", str(path), "--model", "tiny", "--facts", "8", "--output", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    report = tmp_path / "facts.json"
    proc = r2f("eval-decoders", "--facts", "2", "--model", "tiny", "--bank", str(out), "--json", str(report), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["columns"] == ["naive", "bank", "bank, unweighted", "ceiling"] and result["split"] == "facts"
    for role, cols in result["by_role"].items():
        assert cols["ceiling"] >= max(cols.values()) - 1e-4, (role, cols)
    proc = r2f("eval-decoders", "--texts", "2", "--model", "tiny", "--bank", str(out), "--json", str(report), "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["split"] == "texts" and result["pairs_evaluated"] == 2 and "held-out" in result["pairs"]


def test_wiki_texts_follow_the_pair_split():
    import hashlib

    from r2f_ray import assets
    from r2f_ray.decoder_eval import wiki_texts
    from r2f_ray.pairdata import split_of

    tok = assets.byte_tokenizer()
    heldout, train = wiki_texts(tok, 3, 32), wiki_texts(tok, 3, 32, split="train")
    assert heldout.shape == train.shape == (3, 32)
    expected = {"heldout": [], "train": []}
    for text in assets.corpus_texts("wiki"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= 32:
            expected[split_of(hashlib.sha256(text.encode()).hexdigest()[:16])].append(ids[:32])
    assert heldout.tolist() == expected["heldout"][:3] and train.tolist() == expected["train"][:3]
    with pytest.raises(ValueError, match="texts have >= 32 tokens"):
        wiki_texts(tok, 10**6, 32)


@pytest.mark.parametrize("args, message", [
    (["token-weights", "--bank", "nowhere", "--facts", "4"], "at least 8 facts"),
    (["eval-decoders", "--facts", "2", "--pairs", "somewhere", "--bank", "b"], "drop --pairs"),
    (["eval-decoders", "--facts", "2"], "needs --bank"),
    (["eval-decoders", "--pairs", "somewhere", "--model", "tiny"], "--model applies to --facts"),
    (["eval-decoders", "--facts", "2", "--texts", "2", "--bank", "b"], "give one"),
    (["token-weights", "--bank", "nowhere", "--texts", "-1"], "--texts must be >= 0"),
])
def test_cli_usage_errors(args, message):
    proc = r2f(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_grad_a_reveals_each_tokens_output_projections_exactly():
    """grad_A = s (D B0)^T X: with fewer tokens than inputs, it gives P = D B0 row by row, so the token
    energies read from it are |P_t|^2 (plus the floor), for every token; tokens sharing an input share it."""
    from r2f_ray.core.decoders import grad_a_token_energy

    g = torch.Generator().manual_seed(0)
    x, d, b0 = torch.randn(12, 40, generator=g), torch.randn(12, 24, generator=g), torch.randn(24, 4, generator=g)
    d[3] *= 10  # one token carries most of the gradient
    grad_a = 2.0 * b0.T @ (d.T @ x)
    want = (d @ b0).pow(2).sum(-1).double() * 4.0
    got = grad_a_token_energy(x, grad_a, floor=0.0, ridge=1e-12)
    assert torch.allclose(got, want, rtol=1e-5)
    assert int(got.argmax()) == 3
    floored = grad_a_token_energy(x, grad_a, floor=0.5, ridge=1e-12)
    assert torch.allclose(floored, want + 0.5 * want.mean(), rtol=1e-5)
    # the same input twice (a shared prompt prefix): only the sum of their gradients is observable
    x2 = torch.cat([x, x[:1]])
    d2 = torch.cat([d, d[:1]])
    shared = grad_a_token_energy(x2, 2.0 * b0.T @ (d2.T @ x2), floor=0.0, ridge=1e-9)
    assert torch.allclose(shared[0], shared[-1], rtol=1e-4)
    assert torch.allclose(shared[0], (2 * d[0] @ b0).pow(2).sum().double() * 4.0 / 4, rtol=1e-3)
