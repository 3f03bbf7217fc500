"""The evaluation harness behind `r2f evaluate` and `benchmarks/unlearning.py`.

Protocol (docs/evaluation.md has the reasons): measure which facts the model knows; for every run
(seeded fact sample and LoRA seed), every forget fact and every method, start from the original
weights, forget the fact with one `unlearn` call and measure USR (original prompt), APR (held-out probe
paraphrases, never update views), neighbour retention (other known facts of the same kind), GUR
(held-out perplexity ratio and general multiple choice), MIA (identity alignment on general prompts),
RAP (relearning attack) and the cosine of the update to the exact multi-view one. A sequential run then
forgets facts one after another on one model and tracks USR, GUR and neighbours after each.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from r2f_ray import assets
from r2f_ray.config import MODEL_HELP, TransferMode
from r2f_ray.core.lora import LoraSpec
from r2f_ray.core.paraphrase import make_views
from r2f_ray.core.targets import resolve_targets
from r2f_ray.core.unlearn import METHODS, ForgetRequest, UnlearnConfig, UnlearnRejected, encode_pairs, unlearn
from r2f_ray.core.capture import example_nll
from r2f_ray.eval import data, metrics

ALL_METHODS = ["r2f", "exact_multiview", "fullgrad", "fused_exact", "lora_sin", "lora_mul", "multistep_ga", "lune"]


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("default", description=MODEL_HELP)
    bank: str | None = Field(None, description="decoder bank folder; none: the naive bank grad_B @ A0 (no training)")
    transfer: TransferMode | None = Field(
        None, description="bank trained on another model: same_shapes (its architecture) or by_role_depth (other shapes)")
    lora: LoraSpec = Field(LoraSpec(), description="LoRA spec of the naive bank (ignored with a trained bank)")
    methods: list[str] = Field(default_factory=lambda: list(ALL_METHODS))
    relations: tuple[str, ...] = ("capital",)
    facts: int = Field(8, ge=1, description="forget facts per run")
    fact_offset: int = Field(0, ge=0, description="skip this many forget facts first (continue an earlier sample: the "
                                                   "known facts come in a fixed order, so offset N starts where N facts ended)")
    neighbours: int = Field(16, ge=0, description="other known facts whose retention is measured")
    views: int = Field(5, ge=1, description="update views per fact (original prompt + paraphrases)")
    probes: int = Field(3, ge=1, description="held-out probe paraphrases per fact (APR)")
    step: float | str = "auto"
    unlearn: UnlearnConfig = UnlearnConfig()
    heldout_texts: int = Field(8, ge=1)
    heldout_tokens: int = Field(64, ge=2)
    mc_questions: int = Field(16, ge=0, le=len(data.GENERAL_MC))
    mia_prompts: int = Field(32, ge=1)
    rap_steps: int = Field(5, ge=0, description="relearning attack fine-tuning steps (0: skip RAP)")
    rap_lr: float = Field(1e-4, gt=0)
    runs: int = Field(1, ge=1, description="independent runs (fact sample and LoRA seed vary); mean and std reported")
    seed: int = 0
    sequential: int = Field(0, ge=0, description="facts forgotten one after another in the sequential run (0: skip)")
    sequential_methods: list[str] = Field(default_factory=lambda: ["r2f", "exact_multiview"])
    fictitious: int = Field(0, ge=0, description="fictitious facts taught then half forgotten for the membership AUC (0: skip)")
    fictitious_steps: int = Field(30, ge=1)


def _check(config: EvalConfig) -> None:
    unknown = [m for m in config.methods + config.sequential_methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {sorted(METHODS)}")
    if "fused_exact" in config.methods and config.step == "auto" and "exact_multiview" not in config.methods:
        raise ValueError("fused_exact takes the step 'auto' chose for exact_multiview: add exact_multiview to methods")


def _bank(config: EvalConfig, loaded, run: int):
    from r2f_ray.core.bank import DecoderBank

    if config.bank:
        return assets.load_bank(config.bank, loaded, config.transfer)
    spec = config.lora.model_copy(update={"seed": config.lora.seed + run})
    return DecoderBank.naive(spec, resolve_targets(loaded.model, list(spec.target_modules)), loaded.model_id, loaded.weights_sha256)


class Probe:
    """Everything measured on a model state, with the original model's values as reference."""

    def __init__(self, model, tokenizer, config: EvalConfig, neighbours, texts):
        self.tok, self.config, self.neighbours, self.texts = tokenizer, config, neighbours, texts
        self.mc = data.GENERAL_MC[:config.mc_questions]
        self.prompts = data.general_prompts(config.mia_prompts)
        self.ppl0 = metrics.perplexity(model, tokenizer, texts, config.heldout_tokens)
        self.mc0 = metrics.mc_accuracy(model, tokenizer, self.mc) if self.mc else float("nan")
        self.logp0 = metrics.next_token_logprobs(model, tokenizer, self.prompts)
        self.nb0 = metrics.answered(model, tokenizer, neighbours, config.unlearn.max_new_tokens)

    def measure(self, model, neighbours: bool = True) -> dict:
        out = {"gur_ppl": metrics.gur(self.ppl0, metrics.perplexity(model, self.tok, self.texts, self.config.heldout_tokens), True)}
        out["gur_mc"] = metrics.gur(self.mc0, metrics.mc_accuracy(model, self.tok, self.mc)) if self.mc else float("nan")
        out["mia"] = metrics.identity_alignment(self.logp0, metrics.next_token_logprobs(model, self.tok, self.prompts))
        if neighbours:
            nb = metrics.answered(model, self.tok, self.neighbours, self.config.unlearn.max_new_tokens)
            out["neighbour_retention"] = metrics.retention(self.nb0, nb)
        return out

    def unchanged(self) -> dict:
        """What ``measure`` gives on the original weights, from the reference values alone: a forward pass
        on the same weights and inputs repeats them bit for bit, so a rejected request (which leaves the
        model untouched, checked by the caller) costs no second measurement."""
        return {"gur_ppl": metrics.gur(self.ppl0, self.ppl0, True),
                "gur_mc": metrics.gur(self.mc0, self.mc0) if self.mc else float("nan"),
                "mia": metrics.identity_alignment(self.logp0, self.logp0),
                "neighbour_retention": metrics.retention(self.nb0, self.nb0)}


def _mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


HEADLINE = ["usr", "apr", "neighbour_retention", "gur_ppl", "gur_mc", "mia_kl", "rap", "recon_cosine", "step",
            "seconds_per_deletion", "peak_mem_mb"]


def _aggregate(rows: list[dict], runs: int, budget: float) -> dict:
    """Per method: each metric's mean over the facts of a run, then mean and std over runs. ``budget`` is
    the retain KL budget the rows ran under."""
    table = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        per_run = {k: [] for k in [*HEADLINE, *map(metrics.tighter_usr_key, metrics.TIGHTER_BUDGETS)]}
        rejected = 0
        for run in range(runs):
            mine = [r for r in rows if r["method"] == method and r["run"] == run]
            rejected += sum(r["rejected"] for r in mine)
            known = [r for r in mine if r["answered_before"]]
            per_run["usr"].append(metrics.usr([True] * len(known), [r["answered_after"] for r in known]))
            pb = [b for r in known for b in r["probes_before"]]
            pa = [a for r in known for a in r["probes_after"]]
            per_run["apr"].append(metrics.usr(pb, pa))
            costs = [r.get("removal_kl") for r in known]
            traced = bool(known) and all("trials" in r for r in known)  # else (fixed step, older results): not measured
            for fraction in metrics.TIGHTER_BUDGETS:
                per_run[metrics.tighter_usr_key(fraction)].append(metrics.usr(
                    [True] * len(known), [c is None or c > fraction * budget for c in costs]) if traced else float("nan"))
            for k in HEADLINE[2:]:
                vals = [r[k] for r in mine if r.get(k) is not None]
                per_run[k].append(statistics.fmean(vals) if vals else float("nan"))
        table[method] = {k: _mean_std(v) for k, v in per_run.items()}
        table[method]["rejected"] = rejected
        table[method]["deletions"] = sum(1 for r in rows if r["method"] == method)
    return table


# Config fields that may differ between the parts of one merged sample (see merge_results).
_PART_FIELDS = {"facts", "fact_offset", "methods", "bank", "sequential_methods"}


def merge_results(parts: list[dict]) -> dict:
    """One table from runs that continue each other's fact sample (``fact_offset``), e.g. facts 0-19 and
    20-49 run apart. Per method, rows come from every part that ran it; the parts must agree on the model,
    its weights and every protocol setting, a method's parts must not share a fact, and a decoding method's
    parts must share the bank. Single-run parts only (the table's std is then over facts of one run)."""
    if len(parts) < 2:
        raise ValueError("merge needs at least two results")
    first = parts[0]
    for part in parts:
        if (part["model"], part["weights_sha256"]) != (first["model"], first["weights_sha256"]):
            raise ValueError(f"results of different models: {first['model']} vs {part['model']}")
        if part["config"].get("runs", 1) != 1:
            raise ValueError("merge takes single-run results (runs=1)")
        differ = {k for k in set(part["config"]) | set(first["config"]) if k not in _PART_FIELDS
                  and part["config"].get(k) != first["config"].get(k)}
        if differ:
            raise ValueError(f"the results differ in protocol settings {sorted(differ)}: they are not one sample")
    specs = [p.get("lora_specs") for p in parts]  # parts written before specs were recorded have none
    if all(specs) and len({json.dumps({k: v for k, v in spec.items() if k != "seed"}, sort_keys=True)
                           for part_specs in specs for spec in part_specs}) > 1:
        raise ValueError("the results ran with different LoRA specs (see their lora_specs): a table compares methods "
                         "under one spec")
    rows, sources = [], {}
    for part in parts:
        for method in part["config"]["methods"]:
            mine = [r for r in part["rows"] if r["method"] == method]
            seen = {r["fact"] for r in rows if r["method"] == method}
            if seen & {r["fact"] for r in mine}:
                raise ValueError(f"{method}: the results share facts ({sorted(seen & {r['fact'] for r in mine})[:3]}); "
                                 "merge continuations (fact_offset), not repeats")
            if METHODS[method].needs_decoder and sources.get(method, part["config"]["bank"]) != part["config"]["bank"]:
                raise ValueError(f"{method} ran with different banks: {sources[method]} vs {part['config']['bank']}")
            sources.setdefault(method, part["config"]["bank"])
            rows += mine
    merged = {k: v for k, v in first.items() if k not in ("rows", "table", "sequential", "membership", "wall_s", "command",
                                                          "lora_specs")}
    if all(specs):
        merged["lora_specs"] = [spec for part_specs in specs for spec in part_specs]
    merged.update({"what": first["what"] + f"; merged from {len(parts)} results that continue one fact sample",
                   "bank": sources.get("r2f", first["bank"]), "rows": rows,
                   "table": _aggregate(rows, 1, first["config"]["unlearn"]["step"]["retain_kl_budget"]),
                   "parts": [{"command": p.get("command"), "methods": p["config"]["methods"], "bank": p["config"]["bank"],
                              "fact_offset": p["config"].get("fact_offset", 0), "facts": p["config"]["facts"],
                              "wall_s": p.get("wall_s")} for p in parts],
                   "wall_s": sum(p.get("wall_s", 0) for p in parts)})
    merged["config"] = {**first["config"], "methods": list(dict.fromkeys(r["method"] for r in rows)),
                        "facts": max(sum(1 for r in rows if r["method"] == m) for m in dict.fromkeys(r["method"] for r in rows)),
                        "fact_offset": 0}
    return merged


JOURNAL = "journal.jsonl"  # its name in an evaluation's output folder


class Journal:
    """The per-fact rows of one evaluation as they finish, one JSON line per fact after a header naming the
    evaluation (config, model weights), so a long run that is stopped resumes where it was: a rerun with
    the same settings skips the facts already there; one with other settings is refused. Lines are
    appended and fsynced; a torn last line (a kill mid-write) is dropped on reading."""

    def __init__(self, path, header: dict):
        self.path = Path(path)
        self.done: dict[tuple[int, str], list[dict]] = {}
        self.resumed = 0  # facts found in the journal when the evaluation started
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            records = []
            for i, line in enumerate(lines):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1:
                        raise ValueError(f"{self.path}: line {i + 1} is not JSON; the journal is damaged: move it away to "
                                         "start the evaluation afresh") from None
            if records and records[0].get("header") != header:
                theirs = records[0].get("header") or {}
                differ = sorted(k for k in set(theirs) | set(header) if theirs.get(k) != header.get(k))
                config_differ = sorted(k for k in set(theirs.get("config", {})) | set(header["config"])
                                       if theirs.get("config", {}).get(k) != header["config"].get(k))
                raise ValueError(f"{self.path} holds an evaluation with other settings ({', '.join(config_differ or differ)} "
                                 "differ); use another output folder, or delete the journal to start afresh")
            self.done = {(r["run"], r["fact"]): r["rows"] for r in records[1:]}
            self.resumed = len(self.done)
            if not records:
                self._append({"header": header})
            else:  # rewrite without a torn tail, atomically
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
                tmp.replace(self.path)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"header": header})

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, run: int, fact: str, rows: list[dict]) -> None:
        self._append({"run": run, "fact": fact, "rows": rows})
        self.done[(run, fact)] = rows


def _folder_digest(path) -> str:
    """sha256 over a folder's files (names and bytes): a bank retrained into the same folder is another bank."""
    digest = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run_evaluation(config: EvalConfig, progress: bool = True, log: Callable[[str], None] = print,
                   loaded: assets.LoadedModel | None = None, journal: str | Path | None = None) -> dict:
    """Run the protocol; ``loaded`` replaces ``config.model`` (a model already in memory); ``journal``: a
    file that keeps each fact's rows as they finish, so a rerun resumes (``Journal``)."""
    _check(config)
    t_start = time.time()
    loaded = loaded or assets.load_model(config.model)
    model, tok = loaded.model, loaded.tokenizer
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore():
        model.load_state_dict(original)

    def untouched() -> bool:
        return all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    book = Journal(journal, {"config": config.model_dump(mode="json"), "model": loaded.model_id,
                             "weights_sha256": loaded.weights_sha256,
                             "bank_sha256": _folder_digest(config.bank) if config.bank else None}) if journal else None
    if book and book.done:
        log(f"[evaluate] resuming from {book.path}: {len(book.done)} of {config.runs * config.facts} facts already done")

    need = config.fact_offset + config.facts * config.runs + config.neighbours + config.sequential
    log(f"[evaluate] measuring which {config.relations} facts {loaded.model_id} knows (need {need})")
    known = data.known_facts(model, tok, data.fact_pool(config.relations), need, seed=config.seed)
    neighbours = [(f.prompt, f.answer) for f in known[:config.neighbours]]
    first = config.neighbours + config.fact_offset
    forget_pool = known[first:first + config.facts * config.runs]
    sequential_facts = known[first + config.facts * config.runs:]
    probe = Probe(model, tok, config, neighbours, data.heldout_texts(config.heldout_texts))
    log(f"[evaluate] original model: held-out perplexity {probe.ppl0:.2f} ({config.heldout_texts} wiki paragraphs x "
        f"{config.heldout_tokens} tokens), general MC accuracy {probe.mc0:.1f} % ({len(probe.mc)} questions)")

    rows: list[dict] = []
    lora_specs: list[dict] = []  # the banks' own specs: config.lora is only the naive bank's
    total = config.runs * config.facts * len(config.methods)
    bar = tqdm(total=total, desc="evaluate: deletions", disable=not progress)
    try:  # whatever stops the loop, the caller's model is left with its original weights
        for run in range(config.runs):
            bank = _bank(config, loaded, run)
            lora_specs.append(bank.spec.model_dump(mode="json"))
            facts = forget_pool[run * config.facts:(run + 1) * config.facts]
            for fact in facts:
                req = ForgetRequest(fact.prompt, fact.answer, f"{fact.subject}:{fact.relation}")
                if book and (run, req.id) in book.done:
                    rows += book.done[(run, req.id)]
                    bar.update(len(config.methods))
                    continue
                fact_rows = []
                probes = make_views(fact.prompt, fact.answer, config.probes, "probe")
                restore()
                probes_before = metrics.answered(model, tok, [(p, fact.answer) for p in probes], config.unlearn.max_new_tokens)
                exact_deltas, exact_step = None, None
                for method in sorted(config.methods, key=lambda m: m != "exact_multiview"):
                    restore()
                    step = config.step
                    if method == "fused_exact" and step == "auto":
                        step = exact_step
                    row = {"run": run, "method": method, "fact": req.id, "answered_before": True, "probes_before": probes_before}
                    try:
                        if step is None:
                            raise UnlearnRejected("exact_multiview found no step, so fused_exact has none either")
                        res = unlearn(model, tok, [req], decoder=bank, views=config.views, step=step, method=method, config=config.unlearn)
                    except UnlearnRejected as e:
                        row.update(rejected=True, reason=str(e)[:300], answered_after=True, step=None,
                                   probes_after=probes_before, seconds_per_deletion=None, peak_mem_mb=None)
                        if e.trials:
                            row.update(trials=e.trials, removal_kl=metrics.removal_kl(e.trials))
                        res = None
                    else:
                        rep = res.reports[0]
                        row.update(rejected=False, answered_after=rep["answered_after"], step=res.step,
                                   seconds_per_deletion=res.wall_s, peak_mem_mb=res.peak_mem_mb,
                                   logprob_before=rep["answer_logprob_before"], logprob_after=rep["answer_logprob_after"],
                                   greedy_after=rep["greedy_after"],
                                   probes_after=metrics.answered(model, tok, [(p, fact.answer) for p in probes], config.unlearn.max_new_tokens))
                        if res.trials:
                            row.update(trials=res.trials, removal_kl=metrics.removal_kl(res.trials))
                        if method == "exact_multiview":
                            exact_deltas, exact_step = res.deltas, res.step
                        if exact_deltas is not None and res.deltas:
                            row["recon_cosine"] = metrics.reconstruction_cosine(res.deltas, exact_deltas)["global"]
                    m = probe.unchanged() if res is None and untouched() else probe.measure(model)
                    row.update(gur_ppl=m["gur_ppl"], gur_mc=m["gur_mc"], mia_kl=m["mia"]["kl"], mia_cosine=m["mia"]["cosine"],
                               neighbour_retention=m["neighbour_retention"])
                    if config.rap_steps and res is not None:
                        row["rap"] = metrics.rap(model, tok, [(fact.prompt, fact.answer)], [probes], config.rap_steps, config.rap_lr,
                                                 config.unlearn.max_new_tokens)
                    del res
                    fact_rows.append(row)
                    bar.update(1)
                    bar.set_postfix_str(f"{method} {req.id}")
                rows += fact_rows
                if book:
                    book.add(run, req.id, fact_rows)
    finally:
        bar.close()
        restore()

    result = {
        "what": "per-fact deletions from the original weights; metrics defined in docs/evaluation.md",
        "model": loaded.model_id, "weights_sha256": loaded.weights_sha256,
        "bank": config.bank or f"naive grad_B @ A0 (LoRA r={config.lora.r}, untrained)",
        "lora_specs": lora_specs,
        "config": config.model_dump(mode="json"),
        "reference": {"heldout_perplexity": probe.ppl0, "mc_accuracy": probe.mc0,
                      "neighbours_known": sum(probe.nb0), "neighbours": len(neighbours)},
        "table": _aggregate(rows, config.runs, config.unlearn.step.retain_kl_budget), "rows": rows,
    }
    if config.sequential:
        result["sequential"] = run_sequential(model, tok, config, loaded, sequential_facts, probe, progress)
        restore()
    if config.fictitious:
        result["membership"] = run_membership(model, tok, config, loaded, progress, log)
        restore()
    result["wall_s"] = time.time() - t_start  # this process's: facts taken from a journal cost it nothing
    if book and book.resumed:
        result["resumed_facts"] = book.resumed
    return result


def run_sequential(model, tok, config: EvalConfig, loaded, facts, probe: Probe, progress: bool) -> dict:
    """Facts forgotten one after another on one model; USR over the facts so far, GUR and neighbours after each."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bank = _bank(config, loaded, 0)
    out = {}
    for method in config.sequential_methods:
        model.load_state_dict(original)
        curve = []
        done: list[tuple[str, str]] = []
        for fact in tqdm(facts, desc=f"sequential: {method}", disable=not progress):
            req = ForgetRequest(fact.prompt, fact.answer, f"{fact.subject}:{fact.relation}")
            step = config.step if method != "fused_exact" or config.step != "auto" else None
            t0 = time.time()
            try:
                if step is None:
                    raise UnlearnRejected("fused_exact needs a fixed step in the sequential run")
                res = unlearn(model, tok, [req], decoder=bank, views=config.views, step=step, method=method, config=config.unlearn)
                eta = res.step
            except UnlearnRejected:
                eta = None
            done.append((fact.prompt, fact.answer))
            now = metrics.answered(model, tok, done, config.unlearn.max_new_tokens)
            m = probe.measure(model)
            curve.append({"facts": len(done), "step": eta, "rejected": eta is None, "usr": metrics.usr([True] * len(done), now),
                          "gur_ppl": m["gur_ppl"], "gur_mc": m["gur_mc"], "neighbour_retention": m["neighbour_retention"],
                          "mia_kl": m["mia"]["kl"], "seconds": time.time() - t0})
        out[method] = curve
    model.load_state_dict(original)
    return out


def teach(model, tok, facts, steps: int, lr: float = 1e-4) -> None:
    """Fine-tune all weights (Adam) on facts' prompts and template update views, answers + end of turn."""
    pairs = [(v, f.answer + (tok.eos_token or "")) for f in facts for v in make_views(f.prompt, f.answer, 3)]
    ids, mask, labels = encode_pairs(tok, pairs, next(model.parameters()).device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = example_nll(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def run_membership(model, tok, config: EvalConfig, loaded, progress: bool, log) -> dict:
    """TOFU-style: teach fictitious facts to a copy of the model (the private fine-tune of the public
    proxy), forget half of them with each method, and report the loss-based membership AUC of the
    forgotten half against fictitious facts never taught (0.5 = indistinguishable) before and after."""
    facts = data.fictitious_facts(2 * config.fictitious, seed=config.seed)
    taught, unseen = facts[:config.fictitious], facts[config.fictitious:]
    forget = taught[: max(1, config.fictitious // 2)]
    teach(model, tok, taught, config.fictitious_steps)
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    known = metrics.answered(model, tok, [(f.prompt, f.answer) for f in forget], config.unlearn.max_new_tokens)
    members = [(f.prompt, f.answer) for f in forget]
    never = [(f.prompt, f.answer) for f in unseen]
    out = {"taught": len(taught), "forgotten": len(forget), "known_after_teaching": sum(known),
           "auc_before": metrics.membership_auc(model, tok, members, never), "methods": {}}
    log(f"[evaluate] fictitious facts: {sum(known)}/{len(forget)} answered after teaching; membership AUC {out['auc_before']:.3f}")
    bank = _bank(config, loaded, 0)
    for method in tqdm([m for m in config.methods if m != "fused_exact"], desc="membership", disable=not progress):
        model.load_state_dict(tuned)
        rejected = 0
        for f in forget:
            try:
                unlearn(model, tok, [ForgetRequest(f.prompt, f.answer)], decoder=bank, views=config.views,
                        step=config.step, method=method, config=config.unlearn)
            except UnlearnRejected:
                rejected += 1
        out["methods"][method] = {"auc_after": metrics.membership_auc(model, tok, members, never), "rejected": rejected}
    return out
