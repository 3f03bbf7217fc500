"""`r2f eval-decoders` on real pair datasets of tiny models: the table's columns and the rank-r bound,
a bank on its own model's pairs, and the same bank transferred by role and depth to another family."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from r2f_ray.assets import tiny_gemma, tiny_llama, weights_hash
from r2f_ray.core.bank import DecoderBank
from r2f_ray.core.decoders import DecoderSet, fit_local
from r2f_ray.core.lora import LoraProbe, LoraSpec
from r2f_ray.decoder_eval import EvalConfig, run_eval
from r2f_ray.pairdata import (STAGING_DIR, PairDataset, build_manifest, commit_shard, encode_records, input_owners,
                              open_for_append, records_from_capture)

SPEC = LoraSpec(r=4)
KINDS = {"q_proj": "linear", "k_proj": "activation", "v_proj": "activation", "o_proj": "activation",
         "gate_proj": "activation", "up_proj": "activation", "down_proj": "linear"}


def write_pairs(path, model, model_id: str, n: int, seed: int) -> PairDataset:
    """A committed factor-storage dataset of n single-example pairs of ``model`` (no Ray: the stage's encoder)."""
    probe = LoraProbe(model, SPEC)
    cap = probe.capture(torch.randint(3, 250, (n, 16), generator=torch.Generator().manual_seed(seed)))
    owners = input_owners(cap)
    manifest = build_manifest(model_id=model_id, weights_sha256=weights_hash(model), spec=SPEC, matrices=probe.matrices,
                              input_owner=owners, mode="single", storage="factors", dtype="float32", tokens=16,
                              packing="truncate", heldout_fraction=0.3)
    meta = [{"pair_id": f"{model_id}-{i}", "example_ids": [str(i)], "text_sha256": [f"{i:064x}"], "split_key": f"t{seed}-{i}"}
            for i in range(n)]
    manifest = open_for_append(path, manifest)
    staged = path / STAGING_DIR / "s0"
    staged.mkdir(parents=True)
    pq.write_table(encode_records(records_from_capture(cap, [[i] for i in range(n)], meta, owners), manifest),
                   staged / "part-00000.parquet")
    commit_shard(path, manifest, "s0", staged)
    return PairDataset(path)


@pytest.fixture(scope="module")
def llama_bank(tmp_path_factory):
    """Pairs of tiny Llama and a bank fitted (closed form) on their train split."""
    root = tmp_path_factory.mktemp("llama")
    model, _ = tiny_llama(seed=0)
    pairs = write_pairs(root / "pairs", model, "tiny-llama", 24, seed=1)
    batches = [{n: p.as_tuple() for n, p in b.items()} for b in pairs.iter_batches(batch_size=8, split="train")]
    decoders = DecoderSet(pairs.matrices, SPEC, KINDS)
    fit_local(decoders, batches, steps=0)
    DecoderBank(decoders, "tiny-llama", weights_hash(model)).save(root / "bank")
    return pairs, root / "bank"


def test_bank_on_its_own_pairs_matches_the_kinds_fitted_alongside(llama_bank):
    pairs, bank = llama_bank
    result = run_eval(EvalConfig(pairs=str(pairs.path), bank=str(bank), fit_kinds=["linear", "activation"], fit_steps=0),
                      progress=False)
    assert result["columns"] == ["naive", "ceiling", "bank", "linear", "activation"]
    assert result["split"] == "heldout" and result["pairs_evaluated"] == len(pairs.pair_ids("heldout")) > 0
    assert result["bank_transfer"] is None and result["matrices"] == 14 and result["model"] == "tiny-llama"
    for role, cols in result["by_role"].items():
        assert cols["ceiling"] >= max(v for k, v in cols.items() if k != "ceiling") - 1e-4, (role, cols)
        assert cols["activation"] > cols["naive"] + 0.1, (role, cols)
        # The bank is the same closed-form fit on the same split, so its column reproduces the fitted kind's.
        assert cols["bank"] == pytest.approx(cols[KINDS[role]], abs=1e-4), (role, cols)


def test_bank_transferred_to_another_family_by_role_and_depth(llama_bank, tmp_path):
    _, bank = llama_bank
    gemma, _ = tiny_gemma(seed=0)
    target = write_pairs(tmp_path / "gemma", gemma, "tiny-gemma", 16, seed=2)
    with pytest.raises(ValueError, match="model mismatch"):
        run_eval(EvalConfig(pairs=str(target.path), bank=str(bank), fit_kinds=[]), progress=False)
    result = run_eval(EvalConfig(pairs=str(target.path), bank=str(bank), transfer="by_role_depth", fit_kinds=["activation"],
                                 fit_steps=0), progress=False)
    assert result["bank_transfer"] == "by_role_depth" and result["matrices"] == 3 * 7
    assert result["bank_calibration"] == {"pairs": str(target.path), "split": "train"}
    for role, cols in result["by_role"].items():
        if KINDS[role] == "activation":
            # Mapped from another family with forward statistics only, far above the naive lift; a decoder
            # fitted on the target's own gradients is the reference it is measured against.
            assert cols["bank"] > cols["naive"] + 0.2, (role, cols)
            assert cols["bank"] <= cols["ceiling"] + 1e-4


def test_cli_writes_json_and_plot_and_refuses_unknown_transfer(llama_bank, tmp_path):
    pairs, bank = llama_bank
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "r2f_ray.cli", "eval-decoders", "--pairs", str(pairs.path), "--bank", str(bank),
                           "--set", "fit_kinds=[linear]", "--set", "fit_steps=0", "--json", str(out), "--plot",
                           str(tmp_path / "eval.png"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ceiling" in proc.stdout and json.loads(out.read_text())["columns"] == ["naive", "ceiling", "bank", "linear"]
    assert (tmp_path / "eval.png").stat().st_size > 1000
    proc = subprocess.run([sys.executable, "-m", "r2f_ray.cli", "eval-decoders", "--pairs", str(pairs.path), "--bank", str(bank),
                           "--transfer", "by_shape"], capture_output=True, text=True)
    assert proc.returncode == 2 and "by_role_depth" in proc.stderr
