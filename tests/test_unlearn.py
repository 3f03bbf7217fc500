"""The unlearning engine on a tiny model that was taught a few facts: exactness of the gradients it
uses, what it changes, what it refuses, and the auto step's retain budget."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from r2f_ray.assets import tiny_llama, weights_hash
from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.linalg import cosine
from r2f_ray.core.lora import LoraProbe, LoraSpec, init_factors
from r2f_ray.core.paraphrase import make_views
from r2f_ray.core.targets import resolve_targets
from r2f_ray.core.capture import IGNORE_INDEX
from r2f_ray.core.paraphrase import contains_answer
from r2f_ray.core.unlearn import (DEFAULT_RETAIN, METHODS, Context, ForgetRequest, StepConfig, UnlearnConfig,
                                  UnlearnRejected, _AnswerSettled, _per_request_dense, _per_request_lora, answer_logits,
                                  answer_logprobs, any_answered, encode_pairs, example_nll, greedy_answers, mean_kl,
                                  revert, search_step, unlearn)

FACTS = [ForgetRequest("What is the capital of France?", "Paris", "france"),
         ForgetRequest("What is the capital of Peru?", "Lima", "peru"),
         ForgetRequest("What is the capital of Japan?", "Tokyo", "japan")]
SPEC = LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
EOS = "<|im_end|>"


def teach(model, tok, facts, steps: int = 120):
    """Fine-tune the tiny model until it answers the facts (on their update views) and the retain set."""
    pairs = [(v, f.answer + EOS) for f in facts for v in make_views(f.prompt, f.answer, 5)]
    pairs += [(r.prompt, r.answer + EOS) for r in DEFAULT_RETAIN]
    ids, mask, labels = encode_pairs(tok, pairs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = example_nll(model(input_ids=ids, attention_mask=mask).logits, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def taught():
    # The cores are shared: one thread keeps OpenMP from spin-waiting on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = tiny_llama(seed=0)
    teach(model, tok, FACTS)
    answers = greedy_answers(model, tok, [f.prompt for f in FACTS])
    assert answers == [f.answer for f in FACTS], answers
    yield model, tok
    torch.set_num_threads(threads)


@pytest.fixture
def fresh(taught):
    model, tok = taught
    return copy.deepcopy(model), tok


def naive_bank(model, spec=SPEC):
    return DecoderBank.naive(spec, resolve_targets(model, list(spec.target_modules)), "tiny", weights_hash(model))


def activation_bank(model, tok, spec=SPEC) -> DecoderBank:
    """An activation bank whose prior is the covariance of one sentence's inputs (forward passes only)."""
    from r2f_ray.core.decoders import DecoderSet, input_covariance

    ids = tok(["The weather today is mild and the market opens at nine."], return_tensors="pt").input_ids
    decoders = DecoderSet(resolve_targets(model, list(spec.target_modules)), spec, "activation")
    for group in decoders.groups.values():
        cov = input_covariance(model, group.names, ids)
        group.init_covariance(torch.stack([cov[n] for n in group.names]))
    return DecoderBank(decoders, "tiny", weights_hash(model))


def context(model, tok, requests, views=3, spec=SPEC):
    view_lists = [make_views(r.prompt, r.answer, views) for r in requests]
    return Context(model, tok, requests, view_lists, resolve_targets(model, list(spec.target_modules)), spec, None, UnlearnConfig())


@pytest.mark.parametrize("init", ["standard", "zero_offset"])
def test_lora_gradients_equal_a_real_peft_backward(fresh, init):
    model, tok = fresh
    spec = SPEC.model_copy(update={"init": init})
    ctx = context(model, tok, FACTS[:2], spec=spec)
    cap, owner = ctx.capture()
    ours = _per_request_lora(cap, owner, 2, ctx.matrices, spec, ctx.device)
    probe = LoraProbe(copy.deepcopy(model), spec)
    for i in range(2):
        ids, mask, labels, own = ctx.batch()
        rows = [b for b, o in enumerate(own) if o == i]
        peft = probe.capture(ids[rows], mask[rows], labels[rows]).extra_grads
        for m in ctx.matrices:
            ga, gb = ours[i][m.name]
            torch.testing.assert_close(ga, peft[m.name + ".A"] / len(rows), atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(gb, peft[m.name + ".B"] / len(rows), atol=1e-6, rtol=1e-4)


def test_exact_direction_equals_autograd_of_the_view_mean_loss(fresh):
    model, tok = fresh
    ctx = context(model, tok, FACTS[:1])
    cap, owner = ctx.capture()
    dense = _per_request_dense(cap, owner, 1, [m.name for m in ctx.matrices])[0]
    ids, mask, labels, _ = ctx.batch()
    loss = example_nll(model(input_ids=ids, attention_mask=mask).logits, labels).mean()
    weights = [ctx.weight(m.name) for m in ctx.matrices]
    grads = torch.autograd.grad(loss, weights)
    for m, g in zip(ctx.matrices, grads):
        torch.testing.assert_close(dense[m.name], g, atol=1e-6, rtol=1e-4)


def test_r2f_changes_only_decoded_matrices_and_reports(fresh):
    model, tok = fresh
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = naive_bank(model)
    res = unlearn(model, tok, FACTS[:1], decoder=bank, views=3, step=0.5)
    decoded = {m.name + ".weight" for m in bank.matrices}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == decoded
    assert set(res.deltas) == {m.name for m in bank.matrices}
    for name, d in res.deltas.items():
        torch.testing.assert_close(d, model.state_dict()[name + ".weight"] - before[name + ".weight"], atol=0, rtol=0)
    total = math.sqrt(sum(float(d.double().pow(2).sum()) for d in res.deltas.values()))
    assert total == pytest.approx(0.5, rel=1e-4)  # unit-norm direction times the step
    rep = res.reports[0]
    assert rep["answer_logprob_after"] < rep["answer_logprob_before"]
    assert rep["greedy_before"] == "Paris" and rep["answered_before"]
    assert len(rep["views"]) == 3 and rep["views"][0] == FACTS[0].prompt
    assert rep["grad_norms"]["lora_norm"] > 0 and rep["grad_norms"]["decoded_norm"] > 0
    assert rep["wall_s"] > 0 and rep["step"] == 0.5
    revert(model, res.deltas)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


def test_r2f_with_the_naive_bank_equals_lora_mul(fresh, taught):
    # At the standard init grad_A = 0, so LoRA_mul's merged update s * (eta gB/|g|) A0 is the naive
    # decoder's gB A0 times one global constant: the two updates differ only in size.
    model, tok = fresh
    other = copy.deepcopy(taught[0])
    r2f = unlearn(model, tok, FACTS[:1], decoder=naive_bank(model), views=3, step=0.4)
    mul = unlearn(other, tok, FACTS[:1], decoder=naive_bank(other), views=3, step=0.4, method="lora_mul")
    a = torch.cat([r2f.deltas[n].flatten() for n in sorted(r2f.deltas)])
    b = torch.cat([mul.deltas[n].flatten() for n in sorted(r2f.deltas)])
    assert cosine(a, b) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("token_weights", [False, True])
def test_r2f_feeds_an_activation_bank_the_request_inputs(fresh, taught, token_weights):
    # The activation kind reads forward statistics of the request's own views: its update lies closer to
    # the exact multi-view gradient than the naive lift's (and it could not decode at all without them).
    # Fitted token weights also read the output energies and attention pattern of the request's forward
    # pass; the engine records both (request_stats refuses to decode without them).
    model, tok = fresh
    names = [m.name for m in resolve_targets(model, list(SPEC.target_modules))]
    bank = activation_bank(model, tok)
    assert bank.needs_acts
    if token_weights:
        bank.fit_token_weights(model, *encode_pairs(tok, [(r.prompt, r.answer) for r in DEFAULT_RETAIN]), data="retain set")
        assert bank.needs_output_energy and bank.decoders.attention_weighted
    copies = [copy.deepcopy(taught[0]) for _ in range(2)]
    act = unlearn(model, tok, FACTS[:1], decoder=bank, views=3, step=0.4)
    naive = unlearn(copies[0], tok, FACTS[:1], decoder=naive_bank(copies[0]), views=3, step=0.4)
    exact = unlearn(copies[1], tok, FACTS[:1], views=3, step=0.4, method="exact_multiview")

    def flat(res):
        return torch.cat([res.deltas[n].flatten() for n in names])

    assert cosine(flat(act), flat(exact)) > cosine(flat(naive), flat(exact)) + 0.1


def test_r2f_with_a_zero_offset_activation_bank_reproduces_grad_a(fresh):
    # Under the zero-offset init grad_A = s B0^T G is observed too, and the activation decoders make the decoded
    # gradient agree with it (here under the identity output-side prior, a fresh bank's): so does the one-shot
    # update, up to its one global scale, in every decoded matrix.
    model, tok = fresh
    spec = SPEC.model_copy(update={"init": "zero_offset"})
    bank = activation_bank(model, tok, spec)
    ctx = context(model, tok, FACTS[:1], spec=spec)
    (grads,) = _per_request_lora(*ctx.capture(), 1, ctx.matrices, spec, ctx.device)
    res = unlearn(model, tok, FACTS[:1], decoder=bank, views=3, step=0.4)
    seen = {m.name: init_factors(spec, m)[1].T @ res.deltas[m.name] for m in ctx.matrices}
    wanted = {m.name: grads[m.name][0] / spec.scaling for m in ctx.matrices}
    first = ctx.matrices[0].name
    scale = float((seen[first] * wanted[first]).sum() / wanted[first].pow(2).sum())
    assert scale > 0  # ascent: the update follows the gradient
    for m in ctx.matrices:
        torch.testing.assert_close(seen[m.name], scale * wanted[m.name], rtol=1e-3, atol=1e-3 * float(seen[m.name].abs().max()))


def test_fused_exact_equals_exact_multiview_without_keeping_gradients(fresh, taught):
    model, tok = fresh
    other = copy.deepcopy(taught[0])
    bank = naive_bank(model)
    exact = unlearn(model, tok, FACTS[:2], decoder=bank, views=3, step=0.3, method="exact_multiview")
    fused = unlearn(other, tok, FACTS[:2], decoder=bank, views=3, step=0.3, method="fused_exact")
    for name in exact.deltas:
        torch.testing.assert_close(other.state_dict()[name + ".weight"], model.state_dict()[name + ".weight"], atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in other.parameters())
    assert [p.requires_grad for p in other.parameters()] == [p.requires_grad for p in model.parameters()]
    lean = unlearn(copy.deepcopy(taught[0]), tok, FACTS[:1], decoder=bank, views=3, step=0.3, method="fused_exact",
                   config=UnlearnConfig(keep_deltas=False))
    assert lean.deltas == {}


def test_fullgrad_and_lora_sin_use_the_original_prompt_only(fresh, taught):
    model, tok = fresh
    bank = naive_bank(model)
    full = unlearn(model, tok, FACTS[:1], decoder=bank, views=5, step=0.3, method="fullgrad")
    single = unlearn(copy.deepcopy(taught[0]), tok, FACTS[:1], decoder=bank, views=1, step=0.3, method="exact_multiview")
    for name in full.deltas:
        torch.testing.assert_close(full.deltas[name], single.deltas[name], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("method", ["r2f", "exact_multiview", "lora_sin", "multistep_ga", "lune"])
def test_auto_step_never_exceeds_its_retain_budget(fresh, method):
    # Either the chosen update removes the answer with the retain KL within budget, or the request is
    # rejected and the model is untouched; the exact gradient must succeed on this model.
    model, tok = fresh
    h = weights_hash(model)
    retain = [(r.prompt, r.answer) for r in DEFAULT_RETAIN]
    ref = answer_logits(model, tok, retain)
    budget = 0.3
    config = UnlearnConfig(step=StepConfig(retain_kl_budget=budget, grid_max=10.24), multistep_lr=0.1, lune_lr=0.01)
    try:
        res = unlearn(model, tok, FACTS[:1], decoder=naive_bank(model), views=3, method=method, config=config)
    except UnlearnRejected:
        assert method != "exact_multiview"
        assert weights_hash(model) == h
        return
    assert mean_kl(ref, answer_logits(model, tok, retain)) <= budget
    assert res.trials and all(t["retain_kl"] <= budget for t in res.trials if t.get("eta", res.step) == res.step and t["removed"])
    assert not res.reports[0]["answered_after"]


def test_auto_step_rejects_when_the_budget_is_too_small_and_leaves_the_model_unchanged(fresh):
    model, tok = fresh
    h = weights_hash(model)
    config = UnlearnConfig(step=StepConfig(retain_kl_budget=1e-9))
    with pytest.raises(UnlearnRejected, match="retain KL"):
        unlearn(model, tok, FACTS[:1], decoder=naive_bank(model), views=3, config=config)
    assert weights_hash(model) == h
    with pytest.raises(UnlearnRejected):
        unlearn(model, tok, FACTS[:1], decoder=naive_bank(model), views=3, method="lune", config=config)
    assert weights_hash(model) == h
    assert all(type(m).__name__ != "LoraLayer" and not hasattr(m, "lora_A") for m in model.modules())


def test_a_failure_in_the_middle_leaves_the_model_bit_for_bit_unchanged(fresh):
    model, tok = fresh
    h = weights_hash(model)
    bank = naive_bank(model)
    calls = {"n": 0}

    class Broken:
        spec, matrices = bank.spec, bank.matrices

        def decode(self, grads):
            calls["n"] += 1
            raise RuntimeError("decoder crashed")

    with pytest.raises(RuntimeError, match="decoder crashed"):
        unlearn(model, tok, FACTS[:1], decoder=Broken(), views=3, step=0.5)
    assert calls["n"] == 1 and weights_hash(model) == h


def _tiny_other_shape():
    model, _ = tiny_llama(seed=1, hidden=32, intermediate=64)
    return model


@pytest.mark.parametrize("kwargs, match", [
    ({"requests": [ForgetRequest("", "Paris")]}, "empty prompt"),
    ({"requests": [ForgetRequest("   ", "Paris")]}, "empty prompt"),
    ({"requests": [ForgetRequest("What is the capital of France?", "")]}, "empty answer"),
    ({"requests": [ForgetRequest("What is the capital of France?", "x" * 200)]}, "more than the limit"),
    ({"requests": []}, "non-empty list"),
    ({"requests": [("What is the capital of France?", "Paris")]}, "ForgetRequest"),
    ({"method": "sgd_magic"}, "unknown method"),
    ({"step": -1.0}, "positive"),
    ({"step": float("nan")}, "positive"),
    ({"step": "fast"}, "'auto'"),
    ({"views": 0}, "views"),
    ({"method": "fused_exact", "step": "auto"}, "fixed"),
    ({"method": "r2f", "decoder": None}, "needs a decoder"),
    ({"decoder": "bank"}, "decoder must be"),
    ({"retain": []}, "retain"),
    ({"decoder": "other-shape"}, "expects a"),
])
def test_bad_requests_raise_clear_errors_before_touching_the_model(fresh, kwargs, match):
    model, tok = fresh
    h = weights_hash(model)
    args = {"requests": FACTS[:1], "decoder": naive_bank(model), "step": "auto", "method": "r2f"}
    args.update(kwargs)
    if args["decoder"] == "other-shape":
        other = _tiny_other_shape()
        args["decoder"] = naive_bank(other)
    with pytest.raises(ValueError, match=match):
        unlearn(model, tok, **args)
    assert weights_hash(model) == h


def test_several_facts_in_one_update_and_updates_in_sequence(fresh):
    model, tok = fresh
    bank = naive_bank(model)
    config = UnlearnConfig(step=StepConfig(retain_kl_budget=3.0, grid_max=10.24))
    both = unlearn(model, tok, FACTS[:2], decoder=bank, views=3, config=config, method="exact_multiview")
    assert [r["id"] for r in both.reports] == ["france", "peru"]
    assert not any(r["answered_after"] for r in both.reports)
    assert both.reports[0]["requests_in_update"] == 2
    third = unlearn(model, tok, FACTS[2:], decoder=bank, views=3, config=config, method="exact_multiview")
    assert not third.reports[0]["answered_after"]


def test_iterative_methods_change_only_target_matrices_and_unwrap(fresh, taught):
    model, tok = fresh
    bank = naive_bank(model)
    decoded = {m.name + ".weight" for m in bank.matrices}
    for method in ("multistep_ga", "lune"):
        m = copy.deepcopy(taught[0])
        before = {k: v.clone() for k, v in m.state_dict().items()}
        res = unlearn(m, tok, FACTS[:1], decoder=bank, views=3, step=0.01, method=method,
                      config=UnlearnConfig(iterative_max_steps=3))
        changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == decoded, method
        assert set(m.state_dict()) == set(before)  # PEFT removed again
        assert res.reports[0]["grad_norms"]["iterations"] == 3


def test_registry_lists_every_method():
    assert set(METHODS) == {"r2f", "fullgrad", "exact_multiview", "fused_exact", "lora_sin", "lora_mul", "multistep_ga", "lune"}


def test_search_step_finds_the_smallest_passing_step():
    rule = StepConfig(grid_start=0.01, grid_factor=2.0, grid_max=1.0, bisections=6, retain_kl_budget=1.0)
    # removal from eta >= 0.1, KL = eta^2: the grid passes at 0.16, bisection closes in on 0.1.
    evaluate = lambda eta: {"removed": eta >= 0.1, "retain_kl": eta ** 2}
    trials = []
    eta = search_step(evaluate, rule, trials)
    assert 0.1 <= eta < 0.105
    # KL budget 0.005: the first removing step (0.1) already costs KL 0.01 -> nothing qualifies.
    assert search_step(evaluate, rule.model_copy(update={"retain_kl_budget": 0.005}), []) is None
    # never removed within the grid
    assert search_step(lambda e: {"removed": False, "retain_kl": 0.0}, rule, []) is None


def test_cli_unlearn_reports_and_refuses_bad_input(tmp_path, capsys):
    from r2f_ray.cli import main

    assert main(["unlearn", "--model", "tiny", "--prompt", "", "--answer", "Paris"]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["unlearn", "--model", "tiny", "--prompt", FACTS[0].prompt, "--answer", "Paris", "--step", "big"]) == 2
    out = tmp_path / "report.json"
    assert main(["unlearn", "--model", "tiny", "--prompt", FACTS[0].prompt, "--answer", "Paris", "--step", "0.2",
                 "--views", "2", "--method", "exact_multiview", "--set", "lora.r=4", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["method"] == "exact_multiview" and summary["step"] == 0.2 and len(summary["reports"]) == 1


def test_peak_memory_sees_each_update_not_only_the_first():
    """Memory freed by an earlier measurement must not hide the next one's allocations (CPU, glibc)."""
    from r2f_ray.core.unlearn import peak_memory

    for _ in range(2):
        for shape in ((1000, 1000), (100, 1000)):  # 4 MB and 400 KB chunks, 400 MB in all
            with peak_memory(torch.device("cpu")) as peak:
                chunks = [torch.ones(shape) for _ in range(400_000_000 // 4 // (shape[0] * shape[1]))]
                del chunks
            assert 300 < peak["mb"] < 600, (shape, peak)


def test_answer_logprobs_and_logits_equal_the_full_vocabulary_projection(fresh):
    """Projecting only the answer-predicting positions onto the vocabulary changes nothing."""
    model, tok = fresh
    pairs = [(f.prompt, f.answer) for f in FACTS] + [("Name a colour, please, any colour at all.", "Dark blue")]
    ids, mask, labels = encode_pairs(tok, pairs)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    want_sum = (-example_nll(logits, labels, reduction="sum")).tolist()
    assert answer_logprobs(model, tok, pairs) == pytest.approx(want_sum, rel=1e-5, abs=1e-5)
    assert answer_logprobs(model, tok, pairs, batch_size=1) == pytest.approx(want_sum, rel=1e-5, abs=1e-5)
    want = torch.log_softmax(logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].float(), -1)
    got = answer_logits(model, tok, pairs)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)


def test_any_answered_agrees_with_full_completions(fresh):
    model, tok = fresh
    right = [(f.prompt, f.answer) for f in FACTS]
    wrong = [(f.prompt, "Atlantis") for f in FACTS]
    for pairs in (right, wrong, wrong[:2] + right[2:], right[:1] + wrong[1:]):
        full = [contains_answer(t, a) for t, (_, a) in zip(greedy_answers(model, tok, [p for p, _ in pairs]), pairs)]
        assert any_answered(model, tok, pairs) == any(full)
        assert any_answered(model, tok, pairs, batch_size=1) == any(full)


@pytest.mark.parametrize("completion, drop_last_byte, settled", [
    ("The capital is Paris", False, False),       # the word may go on ("Parisian")
    ("The capital is Parisian", False, False),
    ("The capital is Paris.", False, True),
    ("The capital is paris and", False, True),
    ("The capital is Pari", False, False),
    ("Parisé", True, False),                      # half of a UTF-8 character decodes as U+FFFD: no word's end yet
    ("Lyon, not Paris!", False, True),
])
def test_generation_stops_only_once_the_answer_is_settled(completion, drop_last_byte, settled):
    """The early stop of ``any_answered`` fires only when no later token can undo the match, so it never
    changes what ``contains_answer`` says of the whole completion."""
    _, tok = tiny_llama(seed=0)
    prompt = tok("<prompt>", add_special_tokens=False)["input_ids"]
    new = tok(completion, add_special_tokens=False)["input_ids"]  # byte-level: "é" is two tokens
    new = new[:-1] if drop_last_byte else new
    other = (tok(" nothing to see here at all", add_special_tokens=False)["input_ids"] * 2)[:len(new)]
    ids = torch.tensor([prompt + new, prompt + other])
    stop = _AnswerSettled(tok, ["Paris", "Paris"], len(prompt))(ids, None)
    assert stop.tolist() == [settled, settled]  # the whole batch stops, or none of it
