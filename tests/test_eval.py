"""Evaluation metrics on hand-made cases with known answers, and the harness end to end on a tiny model
taught a few facts (JSON, Markdown and HTML reports)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from r2f_ray.assets import LoadedModel, tiny_llama, weights_hash
from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.lora import LoraSpec
from r2f_ray.core.targets import resolve_targets
from r2f_ray.core.unlearn import StepConfig, UnlearnConfig, chat_prompt, encode_pairs, example_nll
from r2f_ray.eval import data, metrics
from r2f_ray.eval.harness import EvalConfig, run_evaluation, teach
from r2f_ray.eval.report import html_report, markdown_table, write_reports


def test_usr_and_retention_count_only_items_known_before():
    before = [True, True, True, False]
    after = [False, True, False, True]
    assert metrics.usr(before, after) == pytest.approx(200 / 3)
    assert metrics.retention(before, after) == pytest.approx(100 / 3)
    assert math.isnan(metrics.usr([False], [False]))
    with pytest.raises(ValueError):
        metrics.usr([True], [True, False])


def test_gur_ratios():
    assert metrics.gur(10.0, 12.5, lower_is_better=True) == pytest.approx(80.0)
    assert metrics.gur(80.0, 60.0) == pytest.approx(75.0)
    assert math.isnan(metrics.gur(0.0, 50.0))


def test_auc_known_cases():
    assert metrics.auc([3, 4], [1, 2]) == 1.0
    assert metrics.auc([1, 2], [3, 4]) == 0.0
    assert metrics.auc([1, 1], [1, 1]) == 0.5
    assert metrics.auc([1, 3], [2]) == 0.5
    with pytest.raises(ValueError):
        metrics.auc([], [1.0])


def test_identity_alignment_known_cases():
    p = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), -1)
    same = metrics.identity_alignment(p, p)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 100.0
    q = torch.log(torch.tensor([[0.5, 0.5, 1e-9], [1 / 3, 1 / 3, 1 / 3]]))
    moved = metrics.identity_alignment(p, q)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert moved["kl"] == pytest.approx(expected) and moved["kl"] > 0 and moved["top1_agreement"] == 50.0


def test_reconstruction_cosine_global_and_by_role():
    exact = {"model.layers.0.self_attn.q_proj": torch.tensor([[1.0, 0.0]]), "model.layers.0.mlp.down_proj": torch.tensor([[0.0, 1.0]])}
    est = {"model.layers.0.self_attn.q_proj": torch.tensor([[2.0, 0.0]]), "model.layers.0.mlp.down_proj": torch.tensor([[1.0, 0.0]])}
    out = metrics.reconstruction_cosine(est, exact)
    assert out["by_role"] == pytest.approx({"q": 1.0, "down": 0.0})
    assert out["global"] == pytest.approx(2 / math.sqrt(5) / math.sqrt(2))
    with pytest.raises(ValueError):
        metrics.reconstruction_cosine({"a": torch.ones(1)}, {"b": torch.ones(1)})


def test_perplexity_equals_the_mean_token_nll(tiny):
    model, tok = tiny
    texts = ["hello world, this is a test", "another short text"]
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :10]
        logits = model(input_ids=ids).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").detach())
        n += ids.shape[1] - 1
    assert metrics.perplexity(model, tok, texts, tokens=10) == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.fixture(scope="module")
def taught():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: no OpenMP spin-waiting
    model, tok = tiny_llama(seed=0)
    facts = data.fact_pool()[:6]
    teach(model, tok, facts, steps=100, lr=3e-3)
    yield model, tok, facts
    torch.set_num_threads(threads)


def test_answered_rank_mc_and_membership_on_taught_facts(taught):
    model, tok, facts = taught
    pairs = [(f.prompt, f.answer) for f in facts]
    assert metrics.answered(model, tok, pairs) == [True] * len(facts)
    assert metrics.answered(model, tok, [(facts[0].prompt, "Atlantis")]) == [False]
    f = facts[0]
    assert metrics.answer_rank(model, tok, f.prompt, f.answer, [g.answer for g in facts[1:]]) == 1
    # multiple choice with the taught answer as the right option: the model must pick it
    assert metrics.mc_accuracy(model, tok, [(g.prompt, [facts[(i + 1) % 6].answer, g.answer], 1) for i, g in enumerate(facts)]) == 100.0
    never = [(g.prompt, g.answer) for g in data.fictitious_facts(6, seed=3)]
    assert metrics.membership_auc(model, tok, pairs, never) == 1.0  # taught facts have far lower loss


def test_relearning_attack_recovers_a_removed_fact(taught):
    model, tok, facts = taught
    f = facts[0]
    damaged = copy.deepcopy(model)
    teach_wrong = [(f.prompt, "Atlantis" + tok.eos_token)]
    ids, mask, labels = encode_pairs(tok, teach_wrong)
    opt = torch.optim.Adam(damaged.parameters(), lr=3e-3)
    for _ in range(15):
        loss = example_nll(damaged(input_ids=ids, attention_mask=mask).logits, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    damaged.eval()
    assert metrics.answered(damaged, tok, [(f.prompt, f.answer)]) == [False]
    assert metrics.rap(damaged, tok, [(f.prompt, f.answer)], [[f.prompt]], steps=0) == 0.0
    assert metrics.rap(damaged, tok, [(f.prompt, f.answer)], [[f.prompt]], steps=15, lr=3e-3) == 100.0


def test_fictitious_facts_are_deterministic_and_distinct():
    a, b = data.fictitious_facts(10, seed=1), data.fictitious_facts(10, seed=1)
    assert a == b and len({f.subject for f in a}) == 10
    assert data.fictitious_facts(3, seed=2) != a[:3]


@pytest.mark.slow
def test_harness_end_to_end_writes_json_markdown_and_html(taught, tmp_path):
    model, tok, _ = taught
    loaded = LoadedModel(copy.deepcopy(model), tok, "tiny-taught", weights_hash(model))
    config = EvalConfig(model="tiny", methods=["r2f", "exact_multiview", "fused_exact", "lora_mul"], facts=2, neighbours=2,
                        views=3, probes=2, mia_prompts=3, heldout_texts=2, mc_questions=2, rap_steps=1, sequential=1,
                        sequential_methods=["exact_multiview"], lora=LoraSpec(r=4),
                        unlearn=UnlearnConfig(step=StepConfig(retain_kl_budget=3.0, grid_max=10.24)))
    result = run_evaluation(config, progress=False, log=lambda m: None, loaded=loaded)
    assert weights_hash(loaded.model) == weights_hash(model)  # the harness restores the original weights
    table = result["table"]
    assert set(table) == {"r2f", "exact_multiview", "fused_exact", "lora_mul"}
    assert table["exact_multiview"]["deletions"] == 2
    # fused_exact takes exact_multiview's step and must land on the same weights
    rows = {(r["method"], r["fact"]): r for r in result["rows"]}
    for fact in {r["fact"] for r in result["rows"]}:
        if not rows[("exact_multiview", fact)]["rejected"]:
            assert rows[("fused_exact", fact)]["step"] == rows[("exact_multiview", fact)]["step"]
            assert rows[("fused_exact", fact)]["recon_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert len(result["sequential"]["exact_multiview"]) == 1
    # The auto rule's trials are kept per row, so the table can say what a stricter budget would forget.
    assert all(r["trials"] for r in result["rows"] if r["method"] == "exact_multiview")
    assert table["exact_multiview"]["usr_at_0.1x_kl"]["n"] == 1
    paths = write_reports(result, tmp_path / "out")
    assert json.loads(open(paths["json"]).read())["model"] == "tiny-taught"
    md = open(paths["markdown"]).read()
    assert "| exact_multiview |" in md and "USR" in md
    assert "data:image/png;base64," in open(paths["html"]).read()
    assert markdown_table(result).splitlines()[0].startswith("Model tiny-taught")
    # The LoRA spec in effect is the bank's (here the naive bank's), recorded and named in the table's header.
    assert result["lora_specs"] == [LoraSpec(r=4).model_dump(mode="json")]
    assert "LoRA r=4, standard init" in markdown_table(result).splitlines()[0]
    assert "<table>" in html_report(result)


def test_fact_offset_continues_the_fact_sample_and_the_banks_spec_is_recorded(taught, tmp_path):
    """Known facts come in a fixed order, so offset N forgets the facts a run of N more facts would have reached."""
    model, tok, _ = taught
    loaded = LoadedModel(copy.deepcopy(model), tok, "tiny-taught", weights_hash(model))
    known = data.known_facts(model, tok, data.fact_pool(), 4, seed=0)
    # A saved bank's spec is the one in effect, whatever config.lora (the naive bank's) says; the result records it.
    bank_spec = LoraSpec(r=4, init="zero_offset")
    DecoderBank.naive(bank_spec, resolve_targets(model, list(bank_spec.target_modules)), "tiny-taught",
                      weights_hash(model)).save(tmp_path / "bank")
    config = EvalConfig(model="tiny", methods=["exact_multiview"], facts=1, fact_offset=1, neighbours=2, views=2, probes=1,
                        mia_prompts=2, heldout_texts=1, mc_questions=1, rap_steps=0, lora=LoraSpec(r=4),
                        bank=str(tmp_path / "bank"),
                        unlearn=UnlearnConfig(step=StepConfig(retain_kl_budget=3.0, grid_max=10.24)))
    result = run_evaluation(config, progress=False, log=lambda m: None, loaded=loaded)
    assert [r["fact"] for r in result["rows"]] == [f"{known[3].subject}:{known[3].relation}"]
    assert result["lora_specs"] == [bank_spec.model_dump(mode="json")]


def _part(methods, facts, bank="bank-a", budget=0.1, forgotten=(), init=None):
    rows = [{"method": m, "run": 0, "fact": f, "rejected": f not in forgotten, "answered_before": True,
             "answered_after": f not in forgotten, "probes_before": [True], "probes_after": [f not in forgotten],
             "step": 0.1} for m in methods for f in facts]
    part = {"what": "test", "model": "m", "weights_sha256": "00", "bank": bank, "rows": rows, "table": {}, "wall_s": 1.0,
            "config": {"methods": methods, "bank": bank, "facts": len(facts), "fact_offset": 0, "runs": 1,
                       "unlearn": {"step": {"retain_kl_budget": budget}}, "step": "auto", "views": 5}}
    if init:
        part["lora_specs"] = [LoraSpec(r=4, init=init).model_dump(mode="json")]
    return part


def test_merge_results_builds_one_table_from_continuing_parts_and_refuses_the_rest():
    from r2f_ray.eval.harness import merge_results

    first = _part(["r2f", "exact_multiview"], ["a", "b"], forgotten={"a"})
    second = _part(["r2f", "exact_multiview"], ["c", "d"], forgotten={"c", "d"})
    merged = merge_results([first, second])
    assert merged["table"]["r2f"]["usr"]["mean"] == pytest.approx(75.0)  # 3 of 4 facts
    assert merged["table"]["r2f"]["deletions"] == 4 and merged["table"]["r2f"]["rejected"] == 1
    assert [p["facts"] for p in merged["parts"]] == [2, 2]
    assert "- r2f, exact_multiview: facts 1-2 (bank bank-a)" in markdown_table(merged)
    only_exact = _part(["exact_multiview"], ["c"])
    assert merge_results([first, only_exact])["table"]["exact_multiview"]["deletions"] == 3
    with pytest.raises(ValueError, match="share facts"):
        merge_results([first, first])
    with pytest.raises(ValueError, match="protocol settings"):
        merge_results([first, _part(["r2f"], ["c"], budget=0.2)])
    with pytest.raises(ValueError, match="different banks"):
        merge_results([first, _part(["r2f"], ["c"], bank="bank-b")])
    # LoRA_mul runs with the bank's spec too: parts under different inits are not one table.
    standard, zero_offset = _part(["lora_mul"], ["a"], init="standard"), _part(["lora_mul"], ["b"], init="zero_offset")
    with pytest.raises(ValueError, match="different LoRA specs"):
        merge_results([standard, zero_offset])
    assert [s["init"] for s in merge_results([standard, _part(["lora_mul"], ["c"], init="standard")])["lora_specs"]] == \
        ["standard", "standard"]
    assert "lora_specs" not in merge_results([standard, _part(["lora_mul"], ["c"])])  # one part never recorded its spec
    with pytest.raises(ValueError, match="at least two"):
        merge_results([first])


def test_usr_at_tighter_budgets_counts_facts_removed_within_them():
    from r2f_ray.eval.harness import _aggregate

    trials = [{"eta": 0.01, "removed": False, "retain_kl": 0.001}, {"eta": 0.02, "removed": True, "retain_kl": 0.03},
              {"eta": 0.015, "removed": True, "retain_kl": 0.02}, {"eta": 0.012, "removed": False, "retain_kl": 0.012}]
    assert metrics.removal_kl(trials) == pytest.approx(0.02)  # the cheapest step that removed the answer
    assert metrics.removal_kl(trials[:1]) is None
    costs = {"a": 0.005, "b": 0.02, "c": 0.08, "d": None}  # d: no step removed it within the budget
    rows = [{"method": "r2f", "run": 0, "fact": f, "rejected": c is None, "answered_before": True,
             "answered_after": c is None, "probes_before": [True], "probes_after": [c is None],
             "trials": [{"eta": 0.1, "removed": c is not None, "retain_kl": c if c is not None else 0.2}],
             "removal_kl": c} for f, c in costs.items()]
    table = _aggregate(rows, 1, budget=0.1)["r2f"]
    assert table["usr"]["mean"] == pytest.approx(75.0)
    assert table["usr_at_0.3x_kl"]["mean"] == pytest.approx(50.0)  # a and b within 0.03
    assert table["usr_at_0.1x_kl"]["mean"] == pytest.approx(25.0)  # a within 0.01
    # Rows without trials (a fixed step, or results from before trials were kept): not measured, shown as "-".
    untraced = _aggregate([{k: v for k, v in r.items() if k not in ("trials", "removal_kl")} for r in rows], 1, 0.1)
    assert untraced["r2f"]["usr_at_0.1x_kl"]["n"] == 0
    result = {"model": "m", "bank": "b", "config": {"facts": 4, "runs": 1, "step": "auto", "views": 5}, "table": untraced}
    assert "| r2f | 75.0 | – | – |" in markdown_table(result)


def test_batched_metrics_equal_one_example_at_a_time(taught):
    model, tok, facts = taught
    prompts = [f.prompt for f in facts] + ["Hi", "Describe the weather today in a few short words, please."]
    one_by_one = torch.cat([metrics.next_token_logprobs(model, tok, [p]) for p in prompts])
    with torch.no_grad():  # the reference: an unpadded forward per prompt, last position
        ref = torch.stack([torch.log_softmax(model(input_ids=tok(chat_prompt(tok, p), add_special_tokens=False,
                                                                 return_tensors="pt")["input_ids"]).logits[0, -1], -1)
                           for p in prompts])
    assert torch.allclose(one_by_one, ref, atol=1e-5)
    assert torch.allclose(metrics.next_token_logprobs(model, tok, prompts, batch_size=3), ref, atol=1e-5)
    texts = ["A short text.", "A somewhat longer text about rivers, mountains and the sea between them.", "Two words"]
    assert metrics.perplexity(model, tok, texts, 12) == pytest.approx(metrics.perplexity(model, tok, texts, 12, batch_size=1), rel=1e-5)


def test_probe_unchanged_is_what_measuring_the_original_weights_gives(taught):
    from r2f_ray.eval.harness import Probe

    model, tok, facts = taught
    config = EvalConfig(model="tiny", mia_prompts=3, heldout_texts=2, mc_questions=3)
    probe = Probe(model, tok, config, [(f.prompt, f.answer) for f in facts[:3]], data.heldout_texts(2))
    measured, derived = probe.measure(model), probe.unchanged()
    assert derived["gur_ppl"] == measured["gur_ppl"] == 100.0
    assert derived["gur_mc"] == pytest.approx(measured["gur_mc"], nan_ok=True)  # NaN where nothing was right before
    assert derived["neighbour_retention"] == measured["neighbour_retention"] == 100.0
    assert derived["mia"] == pytest.approx(measured["mia"], abs=1e-6)
    assert measured["mia"]["kl"] == pytest.approx(0.0, abs=1e-7)


def _journal_config(**kw):
    return EvalConfig(model="tiny", methods=["exact_multiview", "lora_mul"], facts=2, neighbours=2, views=2, probes=1,
                      mia_prompts=2, heldout_texts=1, mc_questions=1, rap_steps=0, lora=LoraSpec(r=4),
                      unlearn=UnlearnConfig(step=StepConfig(retain_kl_budget=3.0, grid_max=10.24)), **kw)


_TIMINGS = ("seconds_per_deletion", "peak_mem_mb")


def _comparable(rows):
    """Rows without their timings, as JSON (NaN equals NaN there)."""
    return [json.dumps({k: v for k, v in r.items() if k not in _TIMINGS}, sort_keys=True) for r in rows]


@pytest.mark.slow
def test_a_stopped_evaluation_resumes_from_its_journal(taught, tmp_path, monkeypatch):
    """Killed during its second fact, the evaluation keeps the first fact's rows; the rerun only does the
    second and ends with the rows of an uninterrupted run. Other settings are refused, a torn line dropped."""
    from r2f_ray.eval import harness

    model, tok, _ = taught
    loaded = LoadedModel(copy.deepcopy(model), tok, "tiny-taught", weights_hash(model))
    quiet = dict(progress=False, log=lambda m: None, loaded=loaded)
    clean = run_evaluation(_journal_config(), **quiet)

    journal = tmp_path / "out" / "journal.jsonl"
    real_unlearn, calls = harness.unlearn, []

    def dies_on_the_second_fact(model, tok, requests, **kw):
        calls.append(requests[0].id)
        if len(set(calls)) == 2:
            raise KeyboardInterrupt  # a kill mid-fact
        return real_unlearn(model, tok, requests, **kw)

    monkeypatch.setattr(harness, "unlearn", dies_on_the_second_fact)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(_journal_config(), journal=journal, **quiet)
    assert len(journal.read_text().splitlines()) == 2  # header + fact 1
    with open(journal, "a") as f:
        f.write('{"run": 0, "fact": "torn')  # a write cut short by the kill

    monkeypatch.setattr(harness, "unlearn", lambda model, tok, requests, **kw: calls.append(requests[0].id) or
                        real_unlearn(model, tok, requests, **kw))
    calls.clear()
    resumed = run_evaluation(_journal_config(), journal=journal, **quiet)
    first, second = clean["rows"][0]["fact"], clean["rows"][-1]["fact"]
    assert set(calls) == {second}, "the rerun redid a fact the journal already had"
    assert resumed["resumed_facts"] == 1 and "resumed_facts" not in clean
    assert first != second
    assert _comparable(resumed["rows"]) == _comparable(clean["rows"])
    assert resumed["table"]["exact_multiview"]["usr"] == clean["table"]["exact_multiview"]["usr"]
    assert len(journal.read_text().splitlines()) == 3  # header + both facts, the torn line gone

    with pytest.raises(ValueError, match="views"):
        run_evaluation(_journal_config().model_copy(update={"views": 3}), journal=journal, **quiet)
    # a bank retrained into the same folder is another bank
    DecoderBank.naive(LoraSpec(r=4), resolve_targets(model, ["q_proj"]), "tiny-taught", weights_hash(model)).save(tmp_path / "bank")
    banked = _journal_config(bank=str(tmp_path / "bank"))
    run_evaluation(banked.model_copy(update={"facts": 1, "methods": ["exact_multiview"]}), journal=tmp_path / "j2.jsonl", **quiet)
    DecoderBank.naive(LoraSpec(r=4), resolve_targets(model, ["v_proj"]), "tiny-taught", weights_hash(model)).save(
        tmp_path / "bank", overwrite=True)
    with pytest.raises(ValueError, match="bank_sha256"):
        run_evaluation(banked.model_copy(update={"facts": 1, "methods": ["exact_multiview"]}), journal=tmp_path / "j2.jsonl", **quiet)


def test_paired_forgetting_counts_facts_and_the_sign_test():
    def row(method, fact, forgot, before=True, run=0):
        return {"method": method, "run": run, "fact": fact, "answered_before": before, "answered_after": not forgot}

    rows = [row("a", f, True) for f in "pqrst"] + [row("b", f, f in "pq") for f in "pqrst"]
    rows += [row("a", "u", True, before=False), row("b", "u", False, before=False), row("a", "v", True)]  # not paired
    pair = metrics.paired_forgetting(rows, "a", "b")
    assert pair == {"facts": 5, "both": 2, "only_a": 3, "only_b": 0, "neither": 0, "sign_test_p": 0.25}
    assert metrics.paired_forgetting(rows, "b", "a")["only_a"] == 3
    same = metrics.paired_forgetting([row("a", "p", True), row("b", "p", True)], "a", "b")
    assert same["sign_test_p"] == 1.0 and same["both"] == 1
    # 10 discordant facts all one way: p = 2 / 2**10
    ten = [row("a", str(i), True) for i in range(10)] + [row("b", str(i), False) for i in range(10)]
    assert metrics.paired_forgetting(ten, "a", "b")["sign_test_p"] == pytest.approx(2 / 1024)


def test_cli_evaluate_refuses_an_output_folder_holding_another_evaluation(tmp_path, capsys):
    from r2f_ray.cli import main

    (tmp_path / "journal.jsonl").write_text(json.dumps({"header": {"config": {"facts": 99}, "model": "other"}}) + "\n")
    assert main(["evaluate", "--model", "tiny", "--facts", "1", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "facts" in err and "another output folder" in err
    assert json.loads((tmp_path / "journal.jsonl").read_text())["header"]["model"] == "other"  # left as it was
