"""`r2f eval-decoders`: how close each decoder gets to the true full gradient, per matrix role.

Two sources of true gradients: pairs, and requests (``facts_eval``: exact gradients taken on a model here
and decoded as the engine decodes a request, with the bank's token weights): forget facts (chat questions
with the loss on the answer) or held-out packaged Wikipedia texts (loss on every token, the form of the
text pairs, held out by the pairs' split rule).

On the pairs of an evaluation dataset (held-out split by default; use a dataset made from another
corpus, or from the target's own forget facts, to measure transfer) it reports per matrix and per role
the mean cosine to the true G of: the naive lift ``grad_B @ A0``, a trained bank (if given), decoder
kinds fitted here in plain torch on a fitting dataset (the training split of the evaluation dataset
unless ``fit_pairs`` names another), and the rank-r ceiling (truncated SVD), which no rank-r decoder
can beat.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from r2f_ray import assets
from r2f_ray.config import MIN_TOKEN_WEIGHT_FACTS, MODEL_HELP, TransferMode
from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.capture import IGNORE_INDEX, capture_gradients
from r2f_ray.core.decoders import TOKEN_FEATURES, DecoderSet, activation_stats, baseline_cosines, fit_local, pair_cosine
from r2f_ray.core.lora import init_factors, lora_grads_from_factors
from r2f_ray.core.unlearn import encode_pairs
from r2f_ray.pairdata import DEFAULT_HELDOUT_FRACTION, PairDataset, split_of


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: str = Field(..., description="pair dataset to evaluate on")
    split: str = Field("heldout", description="train, heldout or all")
    bank: str | None = Field(None, description="trained decoder bank to evaluate")
    transfer: TransferMode | None = Field(
        None, description="load a bank trained on another model with this transfer mode; by_role_depth calibrates on "
                          "the input covariances stored in `pairs` (train split when evaluating held-out pairs)")
    fit_kinds: list[str] = Field(default_factory=lambda: ["linear"], description="kinds fitted here for comparison")
    fit_options: dict[str, dict] = Field(default_factory=dict, description="options per kind, e.g. {sketch: {keep: 2}}")
    fit_pairs: str | None = Field(None, description="dataset to fit them on (default: the train split of `pairs`)")
    fit_steps: int = Field(100, ge=0, description="Adam steps after the closed-form start (0: closed form only)")
    fit_lr: float = Field(1e-3, gt=0)
    matrices: list[str] | None = Field(None, description="roles or matrix names (default: all)")
    max_pairs: int = Field(64, ge=1, description="evaluate on at most this many pairs")
    batch_size: int = Field(8, ge=1)


def _select(dataset: PairDataset, wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return [m.name for m in dataset.matrices]
    names = [m.name for m in dataset.matrices if m.role in wanted or m.name in wanted]
    if not names:
        raise ValueError(f"no matrices match {wanted}; the dataset has roles {sorted({m.role for m in dataset.matrices})}")
    return names


def _batches(dataset: PairDataset, names: list[str], split: str | None, limit: int, batch_size: int) -> list[dict]:
    out, count = [], 0
    for batch in dataset.iter_batches(names, batch_size=batch_size, split=split):
        out.append({n: p.as_tuple() for n, p in batch.items()})
        count += len(next(iter(batch.values())).pair_ids)
        if count >= limit:
            break
    if not out:
        raise ValueError(f"{dataset.path} has no pairs in split {split!r}")
    return out


def run_eval(config: EvalConfig, progress: bool = True) -> dict:
    t0 = time.time()
    if config.split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {config.split!r}")
    dataset = PairDataset(config.pairs)
    names = _select(dataset, config.matrices)
    infos = [m for m in dataset.matrices if m.name in set(names)]
    split = None if config.split == "all" else config.split
    evaluation = _batches(dataset, names, split, config.max_pairs, config.batch_size)
    columns: dict[str, dict[str, list[float]]] = {"naive": {}, "ceiling": {}}

    bank, calibration = None, None
    if config.bank:
        target = None
        if config.transfer == "by_role_depth":
            # Forward activations only: the stored inputs X, never the stored gradients.
            calibration = {"pairs": str(dataset.path), "split": "train" if split == "heldout" else split}
            target = (infos, dataset.input_covariance(names, calibration["split"]))
        bank = DecoderBank.load(config.bank, dataset.manifest["proxy"]["model_id"],
                                dataset.manifest["proxy"]["weights_sha256"], dataset.spec, config.transfer, target=target)
        columns["bank"] = {}
    fitted = {}
    if config.fit_kinds:
        fit_source = PairDataset(config.fit_pairs) if config.fit_pairs else dataset
        if fit_source.spec != dataset.spec:
            raise ValueError("fit_pairs was made with another LoRA spec than pairs: decoders invert one spec's A0")
        fit_data = _batches(fit_source, names, "train" if not config.fit_pairs else None, 10**9, config.batch_size)
        for kind in tqdm(config.fit_kinds, desc="eval-decoders: fitting kinds", disable=not progress):
            decoders = DecoderSet(infos, dataset.spec, kind, config.fit_options)
            fit_local(decoders, fit_data, steps=config.fit_steps, lr=config.fit_lr)
            fitted[kind] = decoders
            columns[kind] = {}
    reference = DecoderSet(infos, dataset.spec, "naive")
    pairs = 0
    for batch in tqdm(evaluation, desc="eval-decoders: evaluating", disable=not progress):
        stacked = reference.stack(batch)
        pairs += next(iter(batch.values()))[0].shape[0]
        for n, (naive, ceiling) in baseline_cosines(reference, stacked).items():
            columns["naive"].setdefault(n, []).extend(naive.tolist())
            columns["ceiling"].setdefault(n, []).extend(ceiling.tolist())
        with torch.no_grad():
            for kind, decoders in fitted.items():
                _, cos = decoders.losses(stacked)
                for n, c in cos.items():
                    columns[kind].setdefault(n, []).extend(c.tolist())
            if bank is not None:
                pred = bank.decoders({n: (ga, gb, None, acts) for n, (ga, gb, _, acts) in batch.items()})
                for n, g in pred.items():
                    columns["bank"].setdefault(n, []).extend(pair_cosine(g[None], batch[n][2][None].float())[0].tolist())
    summary = _summarise(columns, infos)
    return {"pairs": str(dataset.path), "model": dataset.manifest["proxy"]["model_id"], "split": config.split,
            "pairs_evaluated": pairs, "matrices": len(infos),
            "bank": config.bank, "bank_kinds": bank.kinds if bank else None, "bank_transfer": bank.transfer if bank else None,
            "bank_calibration": calibration, **summary, "seconds": time.time() - t0,
            "config": config.model_dump(mode="json")}


TOKEN_WEIGHT_RELATIONS = ("region", "subregion", "demonym")


def qa_sequences(tokenizer, facts: list[assets.Fact], device=None) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) of chat questions with the loss on the answer, as in a request."""
    return encode_pairs(tokenizer, [(f.prompt, f.answer) for f in facts], device)


def token_weight_facts(count: int, relations: tuple[str, ...] = TOKEN_WEIGHT_RELATIONS) -> list[assets.Fact]:
    """``count`` packaged country facts of ``relations`` (by default not capitals, the forget set), spread
    evenly over countries and relations: the data token weights are fitted on."""
    if count < MIN_TOKEN_WEIGHT_FACTS:
        raise ValueError(f"fit token weights on at least {MIN_TOKEN_WEIGHT_FACTS} facts ({len(TOKEN_FEATURES)} coefficients per matrix), "
                         f"got {count}")
    facts = assets.country_facts(relations)
    if count > len(facts):
        raise ValueError(f"only {len(facts)} facts of relations {list(relations)} are packaged; ask for at most that many")
    stride = len(facts) / count
    return [facts[int(i * stride)] for i in range(count)]


def fit_token_weights_on_facts(bank: DecoderBank, loaded: assets.LoadedModel, count: int = 48,
                               relations: tuple[str, ...] = TOKEN_WEIGHT_RELATIONS, texts: int = 0,
                               text_tokens: int = 48, progress: bool = False) -> dict[str, Tensor]:
    """Fit ``bank``'s token weights on exact gradients of its proxy ``loaded`` over ``count`` packaged facts
    (``token_weight_facts``) asked as chat questions, the loss on the answer, and ``texts`` training-split
    packaged Wikipedia texts with the loss on every token (requests of both forms); returns the coefficients."""
    facts = token_weight_facts(count, relations)
    ids, mask, labels = qa_sequences(loaded.tokenizer, facts)
    data = f"{len(facts)} packaged country facts ({', '.join(relations)}), chat, loss on the answer"
    if texts:
        text_ids = wiki_texts(loaded.tokenizer, texts, text_tokens, split="train")
        width = max(ids.shape[1], text_tokens)
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        # Right-padded like qa_sequences: padding is masked out and carries no label.
        ids = torch.cat([F.pad(ids, (0, width - ids.shape[1]), value=pad), F.pad(text_ids, (0, width - text_tokens), value=pad)])
        mask = torch.cat([F.pad(mask, (0, width - mask.shape[1])), F.pad(torch.ones_like(text_ids), (0, width - text_tokens))])
        labels = torch.cat([F.pad(labels, (0, width - labels.shape[1]), value=IGNORE_INDEX),
                            F.pad(text_ids, (0, width - text_tokens), value=IGNORE_INDEX)])
        data += f"; {texts} training-split packaged Wikipedia texts x {text_tokens} tokens, loss on every token"
    return bank.fit_token_weights(loaded.model, ids, mask, labels, data=data, progress=progress)


class FactEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bank: str = Field(..., description="decoder bank to evaluate")
    model: str = Field("default", description=MODEL_HELP)
    transfer: TransferMode | None = Field(None, description="load a bank trained on another model with this mode")
    facts: int = Field(16, ge=1, description="capital-city facts (the forget set) whose exact gradients are compared")
    texts: int | None = Field(None, ge=1, description="instead of facts: this many held-out packaged Wikipedia texts, "
                                                      "loss on every token")
    text_tokens: int = Field(48, ge=2, description="tokens per text (the first ones), as the text pairs take them")
    batch_size: int = Field(8, ge=1)


def wiki_texts(tokenizer, count: int, tokens: int, split: str = "heldout",
               heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> Tensor:
    """[count, tokens] ids: the first ``tokens`` tokens of the first ``count`` packaged Wikipedia texts in
    ``split`` ('heldout' or 'train') of any pair dataset of this corpus (split key: the text's sha256
    prefix, ``pairdata.split_of``)."""
    import hashlib

    texts = (t for t in assets.corpus_texts("wiki")
             if split_of(hashlib.sha256(t.encode()).hexdigest()[:16], heldout_fraction) == split)
    return assets.tokenize_fixed_length(tokenizer, texts, tokens, count)


def facts_eval(config: FactEvalConfig, progress: bool = True) -> dict:
    """Cosine to the exact gradient of each request (a forget fact: one chat question, loss on the answer;
    or a held-out text, loss on every token) of the naive lift, the bank as the engine decodes a request,
    the same with each residual-stream writer decoded from its own gradient only (where the engine uses its
    neighbours'), with the modelled token weights (where the engine reads them from grad_A), the bank with
    every token weighted as is (where it has token weights), and the rank-r ceiling; per matrix and per role."""
    t0 = time.time()
    loaded = assets.load_model(config.model)
    bank = assets.load_bank(config.bank, loaded, transfer=config.transfer)
    if config.texts:
        ids = wiki_texts(loaded.tokenizer, config.texts, config.text_tokens)
        mask, labels = torch.ones_like(ids), ids.clone()
        what, split = f"held-out packaged Wikipedia texts x {config.text_tokens} tokens (loss on every token)", "texts"
    else:
        ids, mask, labels = qa_sequences(loaded.tokenizer, assets.country_facts()[: config.facts])
        what, split = "capital facts (chat, loss on the answer)", "facts"
    names = [m.name for m in bank.matrices]
    weighted = bank.decoders.has_token_weights
    from_grad_a = bank.needs_acts and bank.request_weighting == "grad_a"  # also decode with the modelled weights
    with_writers = bank.needs_acts and bank.writer_neighbours > 0  # also decode each writer from its own gradient
    columns: dict[str, dict[str, list[float]]] = {c: {} for c in [
        "naive", "bank", *(["bank, writers alone"] if with_writers else []),
        *(["bank, modelled weights"] if from_grad_a else []), *(["bank, unweighted"] if weighted else []), "ceiling"]}
    plain = DecoderSet(bank.matrices, bank.spec, "naive")
    inits = {m.name: init_factors(bank.spec, m) for m in bank.matrices}
    for start in tqdm(range(0, len(ids), config.batch_size), desc=f"eval-decoders: {split}", disable=not progress):
        part = slice(start, start + config.batch_size)
        with bank.attention_recorder(loaded.model) as recorder:
            cap = capture_gradients(loaded.model, ids[part], mask[part], labels[part], targets=names,
                                    output_energy=bank.needs_output_energy)
        for b in range(cap.batch_size):
            lora, acts, modelled, unweighted, full = {}, {}, {}, {}, {}
            views = bank.request_views(cap, recorder, b, names)
            for m in bank.matrices:
                x, d = cap.factors(m.name, b)
                a0, b0 = inits[m.name]
                lora[m.name] = lora_grads_from_factors(x, d, a0, b0, bank.spec.scaling)
                full[m.name] = d.T.float() @ x.float()
                if bank.needs_acts:
                    acts[m.name] = bank.request_stats(m.name, [views[m.name]], lora[m.name][0])
                    if from_grad_a:  # only then does the modelled decode differ from the bank's
                        modelled[m.name] = bank.request_stats(m.name, [views[m.name]])
                    unweighted[m.name] = activation_stats(x, a0)
            decoded = {"bank": bank.decode_request(lora, {n: [v] for n, v in views.items()})
                       if bank.needs_acts else bank.decode(lora)}
            if with_writers:
                decoded["bank, writers alone"] = bank.decode(lora, acts=acts)
            if from_grad_a:
                decoded["bank, modelled weights"] = bank.decode(lora, acts=modelled)
            if weighted:
                decoded["bank, unweighted"] = bank.decode(lora, acts=unweighted, request=False)
            stacked = plain.stack({n: (lora[n][0][None], lora[n][1][None], full[n][None]) for n in names})
            for n, (naive, ceiling) in baseline_cosines(plain, stacked).items():
                columns["naive"].setdefault(n, []).extend(naive.tolist())
                columns["ceiling"].setdefault(n, []).extend(ceiling.tolist())
            for col, pred in decoded.items():
                for n in names:
                    columns[col].setdefault(n, []).append(float(pair_cosine(pred[n][None, None], full[n][None, None])))
    result = _summarise(columns, bank.matrices)
    return {"pairs": f"{len(ids)} {what}", "model": loaded.model_id, "split": split,
            "pairs_evaluated": len(ids), "matrices": len(names), "bank": config.bank, "bank_kinds": bank.kinds,
            "bank_transfer": bank.transfer, "token_weights": bank.info.get("token_weights"), **result,
            "seconds": time.time() - t0, "config": config.model_dump(mode="json")}


def _summarise(columns: dict[str, dict[str, list[float]]], infos) -> dict:
    per_matrix = {col: {n: sum(v) / len(v) for n, v in vals.items()} for col, vals in columns.items()}
    order = list(columns)
    by_role: dict[str, dict[str, list[float]]] = {}
    for m in infos:
        for col in order:
            by_role.setdefault(m.role, {}).setdefault(col, []).append(per_matrix[col][m.name])
    by_role = {role: {col: sum(v) / len(v) for col, v in cols.items()} for role, cols in by_role.items()}
    return {"columns": order, "by_role": by_role, "per_matrix": per_matrix}


def format_eval(result: dict) -> str:
    cols = result["columns"]
    request = result["split"] in ("facts", "texts")
    what = {"facts": "forget-fact", "texts": "held-out text request"}.get(result["split"], "held-out")
    lines = [f"{what} cosine to the true full gradient, mean over {result['matrices']} matrices x "
             f"{'' if request else str(result['pairs_evaluated']) + ' pairs of '}{result['pairs']} "
             f"(split {result['split']}); ceiling = best rank-r (truncated SVD)",
             f"{'role':<10}" + "".join(f"{c:>{_width(c)}}" for c in cols)]
    for role, vals in result["by_role"].items():
        lines.append(f"{role:<10}" + "".join(f"{vals[c]:>{_width(c)}.3f}" for c in cols))
    return "\n".join(lines)


def _width(column: str) -> int:
    return max(11, len(column) + 2)


def plot_eval(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles, cols = list(result["by_role"]), result["columns"]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(roles), 3.6))
    width = 0.8 / len(cols)
    for i, col in enumerate(cols):
        ax.bar([r + i * width for r in range(len(roles))], [result["by_role"][ro][col] for ro in roles], width, label=col)
    ax.set_xticks([r + 0.4 - width / 2 for r in range(len(roles))], [ro.removesuffix("_proj") for ro in roles])
    ax.set_ylim(0, 1)
    ax.set_ylabel("cosine to true gradient")
    model = f" of {result['model']}" if result.get("model") else ""
    bank = f"; bank loaded with transfer={result['bank_transfer']}" if result.get("bank_transfer") else ""
    what = {"facts": "forget facts", "texts": "held-out text requests"}.get(result["split"], f"{result['split']} pairs")
    ax.set_title(f"decoders on {result['pairs_evaluated']} {what}{model}{bank}", fontsize=10)
    ax.legend(fontsize=8, ncol=len(cols), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
