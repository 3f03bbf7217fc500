"""`r2f demo`: the whole system end to end on one machine, on the packaged SmolLM2-135M-Instruct.

1. Ray Data generates (LoRA gradient, full gradient) pairs on the proxy from packaged Wikipedia text.
2. Ray Train + DeepSpeed trains the per-matrix decoders from those pairs into a decoder bank.
3. Ray Serve runs the unlearning service with the bank; facts the model is measured to know are
   forgotten through HTTP, and the service's answers before and after are shown.
4. The evaluation harness compares R2F with the exact multi-view gradient and LoRA_mul on held-out facts.
Outputs (pairs, bank, service state, reports) go under one folder; a rerun resumes the pair dataset and
reuses a finished bank.
"""

from __future__ import annotations

import html
import json
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from r2f_ray.config import MIN_TOKEN_WEIGHT_FACTS
from r2f_ray.io import write_json


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: str = Field("runs/demo", description="folder for every output of the demo")
    pair_examples: int = Field(32, ge=4, description="proxy examples for the decoders (Wikipedia excerpt)")
    pair_tokens: int = Field(48, ge=8, description="tokens per proxy example")
    pair_actors: int = Field(2, ge=1, description="Ray Data PairGenerator actors")
    heldout_fraction: float = Field(0.25, gt=0, lt=1, description="share of proxy examples held out to score the decoders")
    # zero_offset: grad_A also observes r directions of each gradient's columns, which the activation decoders
    # use (docs/BENCHMARKS.md, Zero-offset LoRA: held-out text cosine k .84 -> .94, q .90 -> .94).
    lora_init: Literal["standard", "zero_offset"] = Field("zero_offset", description="LoRA init of the proxy pairs, "
                                                          "and so of the bank, the service and the evaluation")
    # activation: the proxy prior of the ridge lift mixed with each request's own input activations
    # (docs/BENCHMARKS.md, Decoders); one extra closed-form pass over the pairs. The mlp kind costs ~64x
    # the flops per step, too slow for a 15-minute demo on two CPU cores.
    decoder_kind: str = Field("activation", description="decoder kind (see `r2f train`)")
    train_epochs: int = Field(1, ge=1)
    token_weight_facts: int = Field(48, ge=0, description="facts whose answer gradients fit the activation bank's token "
                                                          "weights before training (activation kind only); 0 skips")
    train_batch_size: int = Field(2, ge=1, description="pairs per worker step; each holds every matrix's dense gradient")
    train_workers: int = Field(2, ge=1, description="Ray Train workers (DeepSpeed data parallel)")
    zero_stage: int = Field(2, ge=0, le=3)
    forget_facts: int = Field(2, ge=1, description="facts forgotten through the service, one job each")
    # The evaluation is the slow part on CPU (each deletion runs the step search and every metric);
    # benchmarks/unlearning.py is the full-size table.
    eval_facts: int = Field(1, ge=1, description="facts per method in the evaluation table")
    eval_methods: list[str] = Field(default_factory=lambda: ["r2f", "exact_multiview", "lora_mul"])
    neighbours: int = Field(4, ge=0, description="other known facts whose retention is measured")
    mia_prompts: int = Field(8, ge=1, description="general prompts for the model-identity KL")
    rap_steps: int = Field(2, ge=0, description="relearning-attack fine-tuning steps (0: skip RAP)")

    @model_validator(mode="after")
    def _enough_heldout(self):
        # The split is by text hash, so ask for a margin: every training worker must see held-out pairs.
        if self.pair_examples * self.heldout_fraction < 2 * self.train_workers:
            raise ValueError(f"pair_examples x heldout_fraction = {self.pair_examples * self.heldout_fraction:g} held-out "
                             f"examples is too few for {self.train_workers} training workers: raise pair_examples "
                             f"or heldout_fraction (need >= {2 * self.train_workers})")
        if 0 < self.token_weight_facts < MIN_TOKEN_WEIGHT_FACTS:
            raise ValueError(f"token_weight_facts={self.token_weight_facts}: fit on at least {MIN_TOKEN_WEIGHT_FACTS} facts "
                             "(5 coefficients per matrix), or 0 to skip token weights")
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stages:
    """Wall time per stage, printed as the closing table."""

    def __init__(self):
        self.rows: list[dict] = []

    def run(self, name: str, fn):
        print(f"\n=== {name} ===", flush=True)
        t0 = time.time()
        result = fn()
        self.rows.append({"stage": name, "wall_s": round(time.time() - t0, 1)})
        return result


def run_demo(config: DemoConfig, progress: bool = True) -> dict:
    import ray
    from ray import serve

    from r2f_ray import assets
    from r2f_ray.eval.data import fact_pool, known_facts

    out = Path(config.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages()
    t_start = time.time()
    assets.ensure_default_model()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    try:
        pairs = stages.run("1. pairs: Ray Data on the proxy", lambda: _pairs(config, out, progress))
        bank = stages.run("2. decoders: Ray Train + DeepSpeed", lambda: _train(config, out))
        loaded = assets.load_default_model()
        facts = stages.run("   measure which facts the model knows",
                           lambda: known_facts(loaded.model, loaded.tokenizer, fact_pool(),
                                               config.forget_facts + config.eval_facts, seed=0))
        service = stages.run("3. service: forget through HTTP (Ray Serve)",
                             lambda: _serve(config, out, bank["output"], facts[:config.forget_facts]))
        serve.shutdown()  # its versions and audit log stay in service_state; free the CPU for the evaluation
        evaluation = stages.run("4. evaluation: R2F vs baselines", lambda: _evaluate(config, out, bank["output"], loaded, progress))
    finally:
        serve.shutdown()
    summary = {"what": "r2f demo on SmolLM2-135M-Instruct (CPU), every stage run in this process's local Ray",
               "output": str(out), "stages": stages.rows, "wall_s": round(time.time() - t_start, 1),
               "pairs": pairs, "bank": bank, "service": service, "evaluation": evaluation}
    write_json(out / "demo_summary.json", summary)
    (out / "index.html").write_text(_html(summary))
    return summary


def pairs_config(config: DemoConfig, out: Path):
    """The demo's pair stage as a `r2f pairs` config (the LoRA spec it fixes is the bank's, hence everyone's)."""
    from r2f_ray.core.lora import LoraSpec
    from r2f_ray.pipeline.pairs import PairsConfig

    return PairsConfig(output=str(out / "pairs"), source="wiki", tokens=config.pair_tokens, max_examples=config.pair_examples,
                       actors=config.pair_actors, heldout_fraction=config.heldout_fraction, lora=LoraSpec(init=config.lora_init))


def _pairs(config: DemoConfig, out: Path, progress: bool) -> dict:
    from r2f_ray.pipeline.pairs import format_summary, run_pairs

    summary = run_pairs(pairs_config(config, out), progress=progress)
    print(format_summary(summary))
    return {"path": str(out / "pairs"), "summary": summary}


def _train(config: DemoConfig, out: Path) -> dict:
    from r2f_ray.core.bank import DecoderBank
    from r2f_ray.pipeline.train import TrainConfig, format_summary, run_training

    bank_dir = out / "bank"
    if (bank_dir / "manifest.json").is_file():
        DecoderBank.load(bank_dir)  # a finished bank from an earlier run: reuse it
        print(f"reusing the decoder bank in {bank_dir}")
        return {"output": str(bank_dir), "reused": True}
    token_weights = {"token_weight_model": "default", "token_weight_facts": config.token_weight_facts}
    if not config.token_weight_facts or config.decoder_kind != "activation":
        token_weights = {}  # token weights belong to activation decoders
    summary = run_training(TrainConfig(pairs=str(out / "pairs"), output=str(bank_dir), kind=config.decoder_kind,
                                       epochs=config.train_epochs, batch_size=config.train_batch_size, num_workers=config.train_workers,
                                       zero_stage=config.zero_stage, **token_weights))
    print(format_summary(summary))
    return {**summary, "reused": False}


def _serve(config: DemoConfig, out: Path, bank: str, facts) -> dict:
    from r2f_ray.client import R2FClient
    from r2f_ray.core.paraphrase import contains_answer
    from r2f_ray.service.config import ServiceConfig
    from r2f_ray.service.deployment import run

    token = secrets.token_hex(16)
    tokens_file = out / "service_tokens"
    tokens_file.write_text(f"demo {token}\n")
    tokens_file.chmod(0o600)
    state_dir = out / "service_state"
    if state_dir.exists():  # the demo's own scratch: each demo starts the service from the original model
        print(f"removing the previous demo's service state in {state_dir}")
        shutil.rmtree(state_dir)
    port = _free_port()
    run(ServiceConfig(model="default", bank=bank, state_dir=state_dir, tokens_file=tokens_file), port=port,
        access_log=False)
    rows = []
    with R2FClient(f"http://127.0.0.1:{port}", token=token, timeout=600) as client:
        deadline = time.time() + 300
        while not client.ready():
            if time.time() > deadline:
                raise TimeoutError("the service did not become ready within 300 s")
            time.sleep(1)
        before = [client.generate(f.prompt, max_new_tokens=16)["text"] for f in facts]
        # One job per fact: each applied job is a new version (the service's single writer runs them in turn).
        jobs = [client.unlearn([{"id": f.subject, "prompt": f.prompt, "answer": f.answer}], method="r2f", step="auto",
                               idempotency_key=f"demo-{f.subject}", wait=True) for f in facts]
        after = [client.generate(f.prompt, max_new_tokens=16)["text"] for f in facts]
        models = client.models()
    for f, b, a, job in zip(facts, before, after, jobs):
        rows.append({"prompt": f.prompt, "answer": f.answer, "before": b, "after": a, "job_status": job["status"],
                     "version": (job.get("result") or {}).get("version"), "error": job.get("error"),
                     "forgotten": not contains_answer(a, f.answer)})
    print(f"{'fact':<40} {'job':<10} {'version':<8} {'before':<28} after")
    for r in rows:
        print(f"{r['prompt'][:40]:<40} {r['job_status']:<10} {str(r['version']):<8} {r['before'][:28]!r:<28} {r['after'][:40]!r}")
    for r in rows:
        if r["error"]:
            print(f"  {r['prompt']}: {r['error'][:300]}")
    return {"url": f"http://127.0.0.1:{port}", "jobs": jobs, "facts": rows, "models": models,
            "forgotten": sum(r["forgotten"] for r in rows), "of": len(rows)}


def _evaluate(config: DemoConfig, out: Path, bank: str, loaded, progress: bool) -> dict:
    from r2f_ray.eval.harness import EvalConfig, run_evaluation
    from r2f_ray.eval.report import markdown_table, write_reports

    cfg = EvalConfig(bank=bank, methods=config.eval_methods, facts=config.eval_facts, neighbours=config.neighbours,
                     mia_prompts=config.mia_prompts, rap_steps=config.rap_steps, heldout_texts=4, mc_questions=8,
                     runs=1, seed=1)
    result = run_evaluation(cfg, progress=progress, loaded=loaded)
    paths = write_reports(result, out / "evaluation")
    print(markdown_table(result))
    return {"reports": paths}


def format_demo(summary: dict) -> str:
    lines = ["", "r2f demo: summary (wall time per stage, measured on this machine)",
             f"{'stage':<48} {'wall s':>8}"]
    for row in summary["stages"]:
        lines.append(f"{row['stage']:<48} {row['wall_s']:>8.1f}")
    lines.append(f"{'total':<48} {summary['wall_s']:>8.1f}")
    svc = summary["service"]
    lines.append(f"forgotten through HTTP: {svc['forgotten']}/{svc['of']} facts (answer no longer in the greedy reply)")
    if any(f["job_status"] == "failed" for f in svc["facts"]):
        lines.append("  a failed job left the served model unchanged; 'UnlearnRejected' means no step removed the answer "
                     "from every update view within the retain-KL budget (docs/evaluation.md, 'The step')")
    lines += [f"outputs: {summary['output']}",
              f"  report:    {summary['output']}/index.html (evaluation: {summary['evaluation']['reports']['html']})",
              f"  pairs:     {summary['pairs']['path']}", f"  bank:      {summary['bank']['output']}",
              f"  service:   {summary['output']}/service_state (versions, audit log)"]
    return "\n".join(lines)


def _html(summary: dict) -> str:
    esc = html.escape
    stage_rows = "".join(f"<tr><td>{esc(r['stage'])}</td><td>{r['wall_s']:.1f}</td></tr>" for r in summary["stages"])
    fact_rows = "".join(
        f"<tr><td>{esc(f['prompt'])}</td><td>{esc(f['answer'])}</td><td>{esc(f['before'])}</td><td>{esc(f['after'])}</td>"
        f"<td>{'yes' if f['forgotten'] else 'no'}</td><td>{esc(f['job_status'])} {esc(f['version'] or '')}</td>"
        f"<td>{esc((f['error'] or '')[:200])}</td></tr>" for f in summary["service"]["facts"])
    report = Path(summary["evaluation"]["reports"]["html"]).relative_to(summary["output"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>r2f demo</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse;margin:1em 0}}</style></head><body>
<h1>r2f demo</h1><p>{esc(summary['what'])}. Total wall time {summary['wall_s']:.0f} s.</p>
<h2>Stages</h2><table><tr><th>stage</th><th>wall s</th></tr>{stage_rows}</table>
<h2>Forgotten through the service (HTTP, method r2f, auto step)</h2>
<table><tr><th>prompt</th><th>answer</th><th>before</th><th>after</th><th>forgotten</th><th>job, version</th><th>why not applied</th></tr>
{fact_rows}</table>
<h2>Evaluation</h2><p><a href="{esc(str(report))}">Evaluation report with plots</a></p>
<h2>Model versions kept by the service</h2><pre>{esc(json.dumps(summary['service']['models'], indent=1)[:4000])}</pre></body></html>"""
