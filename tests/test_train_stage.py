"""The decoder training stage: config checks (no Ray), and a two-worker Ray Train + DeepSpeed run on
pairs from the tiny model that is killed after its first checkpoint and resumes from it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from r2f_ray.cli import main
from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.lora import LoraProbe, LoraSpec
from r2f_ray.io import write_json
from r2f_ray.pairdata import build_manifest, encode_records, input_owners, records_from_capture
from r2f_ray.pipeline.train import STATE, TrainConfig, check_config, run_training


def write_tiny_pairs(path: Path, spec: LoraSpec, n: int = 24, tokens: int = 16, heldout_fraction: float = 0.25,
                     weights_sha256: str | None = None) -> Path:
    """A committed pair dataset (the layout `r2f pairs` writes) from real captures on the tiny model (`--model tiny`);
    ``weights_sha256`` overrides the recorded proxy hash."""
    from r2f_ray.assets import tiny_llama, weights_hash

    model, _ = tiny_llama(0)
    sha = weights_sha256 or weights_hash(model)  # before the probe wraps the model
    probe = LoraProbe(model, spec)
    ids = torch.randint(3, 250, (n, tokens), generator=torch.Generator().manual_seed(0))
    cap = probe.capture(ids)
    owners = input_owners(cap)
    meta = [{"pair_id": f"ex{i}", "example_ids": [f"ex{i}"], "split_key": f"ex{i}",
             "text_sha256": [hashlib.sha256(bytes(ids[i].tolist())).hexdigest()]} for i in range(n)]
    records = records_from_capture(cap, [[i] for i in range(n)], meta, owners)
    manifest = build_manifest(model_id="tiny-llama", weights_sha256=sha, spec=spec, matrices=probe.matrices,
                              input_owner=owners, mode="single", storage="factors", dtype="float32", tokens=tokens,
                              packing="truncate", heldout_fraction=heldout_fraction)
    (path / "data" / "shard-0").mkdir(parents=True)
    pq.write_table(encode_records(records, manifest), path / "data" / "shard-0" / "part-0.parquet")
    manifest["shards"] = [{"id": "0", "files": ["data/shard-0/part-0.parquet"]}]
    manifest["counts"].update(items=n, examples=n, pairs=n * len(probe.matrices), shards=1)
    write_json(path / "manifest.json", manifest)
    return path


@pytest.fixture(scope="module")
def pairs_zero_offset(tmp_path_factory):
    return write_tiny_pairs(tmp_path_factory.mktemp("pairs") / "zo", LoraSpec(r=4, init="zero_offset"))


def test_config_errors_are_caught_before_ray_starts(pairs_zero_offset, tmp_path):
    base = {"pairs": str(pairs_zero_offset), "output": str(tmp_path / "bank")}
    with pytest.raises(ValueError, match="unknown loss"):
        check_config(TrainConfig(**base, loss="l1"))
    with pytest.raises(ValueError, match="no matrices \\['attn_proj'\\]"):
        check_config(TrainConfig(**base, matrices=["attn_proj"]))
    with pytest.raises(ValueError, match="unknown decoder kind 'resnet'"):
        check_config(TrainConfig(**base, kinds={"q_proj": "resnet"}))
    with pytest.raises(ValueError, match="kinds names roles \\['w_proj'\\]"):
        check_config(TrainConfig(**base, kinds={"w_proj": "mlp"}))
    dataset, matrices, kinds = check_config(TrainConfig(**base))
    assert set(kinds.values()) == {"sketch"} and len(matrices) == 14
    (tmp_path / "bank").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        check_config(TrainConfig(**base))


def test_token_weights_on_another_model_than_the_proxy_are_refused_before_training(tmp_path):
    pairs = write_tiny_pairs(tmp_path / "std", LoraSpec(r=4), n=6, weights_sha256="0" * 64)
    config = TrainConfig(pairs=str(pairs), output=str(tmp_path / "bank"), kind="activation", token_weight_model="tiny")
    with pytest.raises(ValueError, match="is not the pairs' proxy"):
        run_training(config)
    with pytest.raises(ValueError, match="applies to activation decoders"):
        run_training(config.model_copy(update={"kind": "linear"}))
    assert not (tmp_path / "bank").exists() and not (tmp_path / "bank.runs").exists()


def test_two_sided_kind_on_standard_pairs_is_refused(tmp_path):
    pairs = write_tiny_pairs(tmp_path / "std", LoraSpec(r=4), n=6)
    with pytest.raises(ValueError, match="zero_offset"):
        check_config(TrainConfig(pairs=str(pairs), output=str(tmp_path / "bank"), kind="sketch"))
    assert check_config(TrainConfig(pairs=str(pairs), output=str(tmp_path / "bank")))[2]["q_proj"] == "mlp"


def test_cli_train_bad_input_exits_2(tmp_path, capsys):
    assert main(["train", "--pairs", str(tmp_path / "missing"), "--output", str(tmp_path / "bank")]) == 2
    assert "not a pair dataset" in capsys.readouterr().err


def _read_state(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / STATE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.slow
def test_two_worker_deepspeed_run_survives_a_killed_worker_and_resumes(ray_session, pairs_zero_offset, tmp_path):
    output = tmp_path / "bank"
    # sketch for most roles, the activation kind for v_proj: its calibration pass is summed over workers.
    config = TrainConfig(pairs=str(pairs_zero_offset), output=str(output), epochs=3, batch_size=4, lr=1e-2,
                         num_workers=2, zero_stage=2, max_failures=1, early_stopping={"patience": 10},
                         kinds={"v_proj": "activation"})
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_training(config)))
    thread.start()
    # The second checkpoint on disk means the first is registered with Ray Train: kill during epoch 3.
    first = output.with_name("bank.runs") / "train" / "checkpoint_epoch_0002"
    deadline = time.time() + 600
    state = None
    while state is None and time.time() < deadline and thread.is_alive():
        time.sleep(0.5)
        state = _read_state(first)
    assert state is not None, "no second checkpoint"
    # Kill the rank-0 worker process (it belongs to this test's Ray); Ray Train restarts the group.
    os.kill(state["history"][0]["rank0_pid"], signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive() and "summary" in result

    with (output / "manifest.json").open() as f:
        info = json.load(f)["info"]
    history = info["training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["heldout_cosine"] == state["history"][0]["heldout_cosine"]  # kept, not retrained
    final = _read_state(output.with_name("bank.runs") / "train" / "checkpoint_epoch_0003")
    assert history[2]["rank0_pid"] != history[0]["rank0_pid"]  # epoch 3 ran in a new worker group
    assert final["resumed_at"] and final["resumed_at"][0] >= 1  # restarted from a checkpoint, not from scratch

    bank = DecoderBank.load(output, model_id="tiny-llama", spec=LoraSpec(r=4, init="zero_offset"))
    assert bank.kinds["v_proj"] == "activation" and bank.kinds["q_proj"] == "sketch"
    v_group = next(g for g in bank.decoders.groups.values() if g.kind == "activation")
    assert float(v_group.prior_gram.abs().sum()) > 0  # the closed-form prior was fitted and saved
    # and, under the zero-offset init, the output-side prior and its mix, picked on pairs summed over workers
    assert float(v_group.out_cross.abs().sum()) > 0
    assert set(v_group.out_mix.tolist()) <= {float(torch.tensor(x)) for x in v_group.output_grid}
    mix = torch.sigmoid(v_group.mix_logit.detach())
    assert ((mix > 0.005) & (mix < 0.995)).all()
    per_matrix, baselines = info["heldout"]["per_matrix"], info["heldout"]["baselines"]
    assert set(per_matrix) == {m.name for m in bank.matrices}
    mean = lambda key: sum(baselines[n][key] for n in per_matrix) / len(per_matrix)  # noqa: E731
    assert mean("naive") + 0.1 < sum(per_matrix.values()) / len(per_matrix) < mean("ceiling")

    # A rerun with more epochs resumes from the run's latest checkpoint (epoch 3) instead of starting over;
    # this time the activation decoders get token weights, fitted on answer gradients of the pairs' proxy.
    more = run_training(config.model_copy(update={"epochs": 4, "token_weight_model": "tiny", "token_weight_facts": 8,
                                                  "token_weight_texts": 4}), overwrite=True)
    assert [h["epoch"] for h in more["history"]] == [1, 2, 3, 4]
    weighted = DecoderBank.load(output, model_id="tiny-llama", spec=LoraSpec(r=4, init="zero_offset"))
    assert weighted.info["token_weights"]["sequences"] == 12 and weighted.info["token_weights"]["matrices"] == 2
    v_group = next(g for g in weighted.decoders.groups.values() if g.kind == "activation")
    assert float(v_group.token_coef.abs().sum()) > 0
    assert not torch.isnan(v_group.request_mix_logit).any()  # picked on the trained decoders' priors
    assert _read_state(output.with_name("bank.runs") / "train" / "checkpoint_epoch_0004")["resumed_at"][-1] == 3
