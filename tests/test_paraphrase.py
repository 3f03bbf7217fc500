"""Paraphrase registry and semantic filter: deterministic templates, disjoint update and probe pools,
the filter's rules, and the generative paraphrasers' fallback to templates."""

from __future__ import annotations

import pytest
import torch

from r2f_ray.core.paraphrase import (PARAPHRASERS, InstructParaphraser, SemanticFilter, Seq2SeqParaphraser,
                                     TemplateParaphraser, contains_answer, make_paraphraser, make_views,
                                     mean_pooled_embedder, normalize_text)

Q, A = "What is the capital of France?", "Paris"


def test_matching_rule_is_normalised_whole_word_containment():
    assert contains_answer("The capital is PARIS.", "Paris")
    assert contains_answer("It's São Paulo!", "Sao Paulo")
    assert not contains_answer("Parisian food", "Paris")
    assert not contains_answer("anything", "   ")
    assert normalize_text("  Héllo,   World! ") == "hello world"


def test_template_views_are_deterministic_start_with_the_prompt_and_never_leak():
    views = make_views(Q, A, 5)
    assert views == make_views(Q, A, 5)
    assert views[0] == Q and len(set(views)) == 5
    assert "Name the capital of France." in views
    assert not any(contains_answer(v, A) for v in views)


def test_probe_views_are_disjoint_from_update_views():
    update = make_views(Q, A, 10)
    probe = make_views(Q, A, 8, pool="probe")
    assert not set(update) & set(probe)
    assert Q not in probe
    # a question the x-of-y rules do not parse still gets generic rewordings in both pools
    other = "Who wrote Hamlet?"
    assert not set(make_views(other, "Shakespeare", 5)) & set(make_views(other, "Shakespeare", 4, pool="probe"))


def test_too_many_views_is_a_clear_error():
    with pytest.raises(ValueError, match="ask for fewer views"):
        make_views("Who wrote Hamlet?", "Shakespeare", 20)
    with pytest.raises(ValueError, match="pool"):
        make_views(Q, A, 3, pool="train")


def test_semantic_filter_rules():
    f = SemanticFilter()
    assert f.reasons(Q, A, "Is Paris the capital of France?") == ["leaks the answer"]
    assert "changes the question (content words lost)" in f.reasons(Q, A, "What is the capital of Spain?")
    assert f.reasons(Q, A, "Name the capital city of France.") == []
    kept = f.keep(Q, A, ["Name the capital of France.", "name the capital of france", "Is Paris the capital of France?",
                         "What is the capital of Spain?", Q])
    assert kept == ["Name the capital of France."]


def test_embedding_filter_drops_candidates_far_from_the_original():
    vecs = {Q: [1.0, 0.0], "Name the capital of France.": [0.9, 0.1], "Tell me, France capital?": [0.0, 1.0]}
    f = SemanticFilter(embed=lambda texts: torch.tensor([vecs[t] for t in texts]), min_cosine=0.8)
    assert f.keep(Q, A, ["Name the capital of France.", "Tell me, France capital?"]) == ["Name the capital of France."]


def test_registry_and_unknown_paraphraser():
    assert set(PARAPHRASERS) == {"templates", "instruct", "seq2seq"}
    assert isinstance(make_paraphraser("templates"), TemplateParaphraser)
    with pytest.raises(ValueError, match="unknown paraphraser"):
        make_paraphraser("magic")
    with pytest.raises(ValueError, match="not a local folder"):
        Seq2SeqParaphraser("/nonexistent/paraphraser")


def test_instruct_paraphraser_runs_and_is_topped_up_from_templates(tiny):
    model, tok = tiny
    para = InstructParaphraser(model, tok, samples=4, max_new_tokens=8, seed=1)
    a, b = para.candidates(Q, "update", 10), para.candidates(Q, "probe", 10)
    assert not set(a) & set(b)
    assert para.candidates(Q, "update", 10) == a  # cached and seeded
    # the random-weight model writes noise; the filter drops it and templates fill the views
    views = make_views(Q, A, 4, paraphraser=para, semantic_filter=SemanticFilter(embed=mean_pooled_embedder(model, tok), min_cosine=-1.0))
    assert views[0] == Q and len(views) == 4 and not any(contains_answer(v, A) for v in views)


def test_seq2seq_paraphraser_loads_a_local_checkpoint(tmp_path, tiny):
    from transformers import T5Config, T5ForConditionalGeneration

    _, tok = tiny
    config = T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2,
                      decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    para = Seq2SeqParaphraser(str(tmp_path), beams=4, max_new_tokens=6)
    up, probe = para.candidates(Q, "update", 5), para.candidates(Q, "probe", 5)
    assert not set(up) & set(probe)
    views = make_views(Q, A, 3, paraphraser=para)
    assert views[0] == Q and len(views) == 3
