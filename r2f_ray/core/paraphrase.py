"""Paraphrases of a forget prompt: a registry of paraphrasers and a semantic filter.

R2F averages the LoRA gradient over several rewordings of the target question, each labelled with the
original answer. Two disjoint pools exist for every prompt: **update views** (the original prompt plus
rewordings the update is computed on) and **probe views** (rewordings used only to evaluate whether the
fact generalises away, APR). The template paraphraser draws them from disjoint template lists, so a
probe is never an update view; the generative paraphrasers split their candidates in two.

The semantic filter drops candidates that leak the answer, lose the question's content words (the
subject), duplicate another view, or (optionally) fall below a cosine threshold in an embedding space.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

# Words that carry no content: ignored when checking that a paraphrase keeps the question's subject.
_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been what which who whom whose when "
    "where why how do does did can could would will shall should may might must tell me please name you your "
    "i it its this that these those there as into about s called".split()
)


def normalize_text(text: str) -> str:
    """Lower case, accents stripped, punctuation turned into spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = re.sub(r"[^0-9a-z]+", " ", text)
    return " ".join(text.split())


def contains_answer(text: str, answer: str) -> bool:
    """The matching rule: the normalised answer occurs in the normalised text as whole words."""
    a = normalize_text(answer)
    return bool(a) and f" {a} " in f" {normalize_text(text)} "


def content_words(text: str) -> set[str]:
    return {w for w in normalize_text(text).split() if w not in _STOPWORDS}


# ---------------------------------------------------------------------------------------------
# Templates. Each rule maps a question to a rewording, or None when it does not apply.

_WHAT_IS_THE_X_OF_Y = re.compile(r"^\s*what\s+is\s+the\s+(.+?)\s+of\s+(.+?)\s*\?\s*$", re.I)


def _x_of_y(template: str) -> Callable[[str], str | None]:
    def rule(q: str) -> str | None:
        m = _WHAT_IS_THE_X_OF_Y.match(q)
        return template.format(x=m.group(1), y=m.group(2)) if m else None

    return rule


def _wrap(template: str) -> Callable[[str], str | None]:
    def rule(q: str) -> str:
        q = q.strip()
        lower = q[0].lower() + q[1:] if q else q
        return template.format(q=q, ql=lower, bare=q.rstrip("?. ").strip())

    return rule


UPDATE_TEMPLATES: tuple[Callable[[str], str | None], ...] = (
    _x_of_y("Could you tell me the {x} of {y}?"),
    _x_of_y("Name the {x} of {y}."),
    _x_of_y("{y}'s {x} is?"),
    _x_of_y("Which is the {x} of {y}?"),
    _wrap("Could you tell me: {q}"),
    _wrap("Quick question: {q}"),
    _wrap("{q} Answer in a few words."),
    _wrap("Please answer this: {q}"),
    _wrap("I'd like to know: {q}"),
)
PROBE_TEMPLATES: tuple[Callable[[str], str | None], ...] = (
    _x_of_y("Do you know the {x} of {y}?"),
    _x_of_y("What's the {x} of {y}?"),
    _x_of_y("Tell me the {x} of {y}."),
    _x_of_y("What would you say is the {x} of {y}?"),
    _wrap("Here is a question for you. {q}"),
    _wrap("Answer briefly: {q}"),
    _wrap("Hey, {ql}"),
    _wrap("I was wondering: {ql}"),
)


def _apply(rules, prompt: str) -> list[str]:
    out = []
    for rule in rules:
        text = rule(prompt)
        if text and text not in out and text != prompt:
            out.append(text)
    return out


class Paraphraser(Protocol):
    name: str

    def candidates(self, prompt: str, pool: str, n: int) -> list[str]:
        """Up to n rewordings of ``prompt`` from the ``pool`` ("update" or "probe"), best first."""


class TemplateParaphraser:
    """Deterministic rewordings from two disjoint template lists (the default; used in tests)."""

    name = "templates"

    def candidates(self, prompt: str, pool: str, n: int) -> list[str]:
        return _apply(UPDATE_TEMPLATES if pool == "update" else PROBE_TEMPLATES, prompt)[:n]


_REPHRASE_INSTRUCTION = ("Rewrite the following question in other words. Keep its meaning, do not answer it, "
                         "and reply with the rewritten question only.\nQuestion: {q}")


def _first_line(text: str) -> str:
    line = text.strip().split("\n")[0].strip().strip('"').strip()
    return re.sub(r"^(rewritten question|question)\s*:\s*", "", line, flags=re.I)


class InstructParaphraser:
    """An instruct model (with a chat template) asked to rephrase; sampled with a fixed seed.

    Candidates are drawn once per prompt and split alternately into the update and probe pools, so the
    two never share a text.
    """

    name = "instruct"

    def __init__(self, model, tokenizer, samples: int = 12, temperature: float = 0.9, seed: int = 0, max_new_tokens: int = 40):
        self.model, self.tokenizer = model, tokenizer
        self.samples, self.temperature, self.seed, self.max_new_tokens = samples, temperature, seed, max_new_tokens
        self._cache: dict[str, list[str]] = {}

    def _generate(self, prompt: str) -> list[str]:
        if prompt not in self._cache:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": _REPHRASE_INSTRUCTION.format(q=prompt)}],
                                                      add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(self.model.parameters()).device)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(self.seed)
                out = self.model.generate(**ids, do_sample=True, temperature=self.temperature, top_p=0.95,
                                          max_new_tokens=self.max_new_tokens, num_return_sequences=self.samples,
                                          pad_token_id=self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            seen, unique = {normalize_text(prompt)}, []
            for t in map(_first_line, texts):
                if t and normalize_text(t) not in seen:
                    seen.add(normalize_text(t))
                    unique.append(t)
            self._cache[prompt] = unique
        return self._cache[prompt]

    def candidates(self, prompt: str, pool: str, n: int) -> list[str]:
        found = self._generate(prompt)
        return (found[0::2] if pool == "update" else found[1::2])[:n]


class Seq2SeqParaphraser:
    """A local seq2seq paraphrase checkpoint (T5/BART style folder), beam search with several returns."""

    name = "seq2seq"

    def __init__(self, path: str, prefix: str = "paraphrase: ", beams: int = 12, max_new_tokens: int = 40):
        from pathlib import Path

        if not Path(path).is_dir():
            raise ValueError(f"seq2seq paraphraser checkpoint {path!r} is not a local folder; give a saved T5/BART folder")
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.prefix, self.beams, self.max_new_tokens = prefix, beams, max_new_tokens
        self._cache: dict[str, list[str]] = {}

    def candidates(self, prompt: str, pool: str, n: int) -> list[str]:
        if prompt not in self._cache:
            ids = self.tokenizer(self.prefix + prompt, return_tensors="pt")
            with torch.no_grad():
                out = self.model.generate(**ids, num_beams=self.beams, num_return_sequences=self.beams,
                                          max_new_tokens=self.max_new_tokens, do_sample=False)
            texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
            self._cache[prompt] = list(dict.fromkeys(t for t in texts if t and normalize_text(t) != normalize_text(prompt)))
        found = self._cache[prompt]
        return (found[0::2] if pool == "update" else found[1::2])[:n]


PARAPHRASERS: dict[str, type] = {"templates": TemplateParaphraser, "instruct": InstructParaphraser, "seq2seq": Seq2SeqParaphraser}


def make_paraphraser(name: str, **kwargs) -> Paraphraser:
    if name not in PARAPHRASERS:
        raise ValueError(f"unknown paraphraser {name!r}; available: {sorted(PARAPHRASERS)}")
    return PARAPHRASERS[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Semantic filter


@dataclass
class SemanticFilter:
    """Keeps a paraphrase only if it does not leak the answer (introduce it when the original lacks it), keeps at least ``min_content_recall`` of
    the original's content words (so the subject survives), is not a duplicate, and, when an
    ``embed`` function (texts -> [n, d] tensor) is given, has cosine >= ``min_cosine`` to the original."""

    min_content_recall: float = 0.6
    embed: Callable[[list[str]], torch.Tensor] | None = None
    min_cosine: float = 0.8

    def reasons(self, original: str, answer: str, candidate: str) -> list[str]:
        """Why ``candidate`` is rejected (empty list: kept). The embedding test is done in ``keep``."""
        why = []
        if not candidate.strip():
            why.append("empty")
        if contains_answer(candidate, answer) and not contains_answer(original, answer):
            why.append("leaks the answer")
        want = content_words(original)
        if want and len(want & content_words(candidate)) / len(want) < self.min_content_recall:
            why.append("changes the question (content words lost)")
        return why

    def keep(self, original: str, answer: str, candidates: list[str]) -> list[str]:
        seen = {normalize_text(original)}
        kept = []
        for c in candidates:
            if self.reasons(original, answer, c) or normalize_text(c) in seen:
                continue
            seen.add(normalize_text(c))
            kept.append(c)
        if self.embed is not None and kept:
            e = self.embed([original] + kept).double()
            e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sims = e[1:] @ e[0]
            kept = [c for c, s in zip(kept, sims.tolist()) if s >= self.min_cosine]
        return kept


def mean_pooled_embedder(model, tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """Embeds texts as the mean of a causal LM's last hidden states (a cheap sentence embedding)."""

    def embed(texts: list[str]) -> torch.Tensor:
        rows = []
        with torch.no_grad():
            for t in texts:
                ids = tokenizer(t, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
                h = model(**ids, output_hidden_states=True).hidden_states[-1][0]
                rows.append(h.float().mean(0).cpu())
        return torch.stack(rows)

    return embed


def make_views(prompt: str, answer: str, n: int, pool: str = "update", paraphraser: Paraphraser | None = None,
               semantic_filter: SemanticFilter | None = None) -> list[str]:
    """``n`` prompts for one fact. The update pool starts with the original prompt; the probe pool never
    contains it nor any update view. Filtered generative candidates are topped up from the templates."""
    if pool not in ("update", "probe"):
        raise ValueError(f"pool must be 'update' or 'probe', got {pool!r}")
    paraphraser = paraphraser or TemplateParaphraser()
    filt = semantic_filter or SemanticFilter()
    head = [prompt] if pool == "update" else []
    want = n - len(head)
    found = filt.keep(prompt, answer, paraphraser.candidates(prompt, pool, 4 * n))
    if len(found) < want and not isinstance(paraphraser, TemplateParaphraser):
        found += [t for t in filt.keep(prompt, answer, TemplateParaphraser().candidates(prompt, pool, 4 * n)) if t not in found]
    views = head + found[:want]
    if len(views) < n:
        raise ValueError(f"only {len(views)} {pool} views survive the semantic filter for prompt {prompt!r}; "
                         f"ask for fewer views (at most {len(views)}) or use another paraphraser")
    return views
