"""The Ray Data pair stage end to end on the tiny model: read back vs autograd, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from r2f_ray import assets
from r2f_ray.cli import main as cli_main
from r2f_ray.core.capture import example_nll
from r2f_ray.core.lora import LoraProbe, LoraSpec
from r2f_ray.core.targets import find_module
from r2f_ray.pairdata import STAGING_DIR, PairDataError, PairDataset, SpecMismatchError, pairs_from_batch
from r2f_ray.pipeline import pairs as stage
from r2f_ray.pipeline.pairs import PairsConfig, build_items, run_pairs, tokenize_batch

pytestmark = pytest.mark.slow
TINY = {"model": "tiny", "tokens": 16, "lora": {"r": 4, "seed": 2}, "batch_size": 2}


def rel_err(got, want) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _items_by_id(config: PairsConfig, texts) -> dict:
    rows = tokenize_batch({"text": list(texts)}, config.model, config.tokens, config.packing)
    rows = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
    return {it["pair_id"]: it for it in build_items(config, rows)}


@pytest.fixture(scope="module")
def generated(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "ds"
    config = PairsConfig(output=str(out), max_examples=5, rows_per_file=2, **TINY)
    return config, run_pairs(config, progress=False)


def test_stored_pairs_equal_fresh_autograd(generated, ray_session):
    config, summary = generated
    assert summary["items_written"] == 5 and summary["pairs_written"] == 5 * 14
    ds = PairDataset(config.output)
    assert ds.manifest["counts"]["items"] == 5 and len(ds.files()) == 3  # rows per file bounded to 2
    field = pq.read_schema(ds.files()[0]).field("d:model.layers.0.self_attn.k_proj")  # survives write_parquet
    assert json.loads(field.metadata[b"r2f"])["matrices"][0]["role"] == "k_proj"
    items = _items_by_id(config, assets.lee_texts())
    batch = next(ds.iter_batches(batch_size=5))
    model, _ = assets.tiny_llama(seed=0)
    probe = LoraProbe(assets.tiny_llama(seed=0)[0], LoraSpec(r=4, seed=2))
    for b in (0, 3):
        pid = batch[ds.matrices[0].name].pair_ids[b]
        ids = torch.tensor(items[pid]["input_ids"])
        model.zero_grad()
        example_nll(model(input_ids=ids).logits, ids).sum().backward()  # plain autograd, full weights
        peft = probe.capture(ids)  # real PEFT LoRA grads on the same text
        for info in ds.matrices:
            p = batch[info.name]
            assert rel_err(p.full[b], find_module(model, info.name).weight.grad) < 1e-5
            assert rel_err(p.grad_b[b], peft.extra_grads[info.name + ".B"]) < 1e-5
    # The trainer's path: Ray Data reads the committed files, pairs_from_batch rebuilds the same tensors.
    names = [m.name for m in ds.matrices[:4]]
    rds = ray_session.data.read_parquet(ds.files()).select_columns(ds.columns(names))
    got = {}
    for rb in rds.iter_batches(batch_size=5, batch_format="numpy"):
        for name, p in pairs_from_batch(rb, ds.manifest, names).items():
            for pid, g in zip(p.pair_ids, p.full):
                got[(name, pid)] = g
    for name in names:
        for pid, g in zip(batch[name].pair_ids, batch[name].full):
            assert torch.equal(got[(name, pid)], g)


def test_resume_after_interrupted_job(ray_session, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    config = PairsConfig(output=str(out), max_examples=6, rows_per_file=2, **TINY)

    def killed(*args, **kwargs):  # the job dies after its workers wrote their files, before the commit
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "commit_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pairs(config, progress=False)
    monkeypatch.undo()
    staged = sorted((out / STAGING_DIR).rglob("*.parquet"))
    assert len(staged) == 3 and PairDataset(out).pair_ids() == []  # nothing committed: readers see no rows
    half = staged[1]  # and one file was still being written when the job died
    lost = pq.read_table(half, columns=["pair_id"]).column("pair_id").to_pylist()
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])

    summary = run_pairs(config, progress=False)
    assert summary["items_salvaged"] == 4 and summary["items_written"] == 2
    ids = PairDataset(out).pair_ids()
    assert len(ids) == len(set(ids)) == 6 and set(lost) <= set(ids)
    assert not (out / STAGING_DIR).exists()

    again = run_pairs(config, progress=False)  # the same job once more: nothing to do
    assert again["items_written"] == 0 and again["items_skipped_already_committed"] == 6
    more = run_pairs(config.model_copy(update={"max_examples": 8}), progress=False)  # a larger source appends
    assert more["items_written"] == 2
    ids = PairDataset(out).pair_ids()
    assert len(ids) == len(set(ids)) == 8


def test_step_mode_from_jsonl_through_the_cli(ray_session, tmp_path, capsys):
    src = tmp_path / "texts.jsonl"
    texts = [t for t in assets.lee_texts()][:3]
    src.write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
    out = tmp_path / "ds"
    rc = cli_main(["pairs", "--model", "tiny", "--source", str(src), "--output", str(out), "--tokens", "12",
                   "--mode", "multi_step", "--steps", "2", "--rank", "4", "--quiet", "--set", "text_column=body",
                   "--set", "step_lr=0.5", "--set", "lora.init=zero_offset"])
    assert rc == 0, capsys.readouterr().err
    assert "pairs (item x matrix)" in capsys.readouterr().out
    ds = PairDataset(out)
    assert ds.manifest["mode"] == "multi_step" and ds.manifest["steps"] == 2 and len(ds) == 3
    p = next(ds.iter_batches(batch_size=3))[ds.matrices[0].name]
    a0, b0 = LoraProbe(assets.tiny_llama(seed=0)[0], ds.spec).init[ds.matrices[0].name]
    assert p.adapter_a.shape == (3, 4, a0.shape[1]) and float((p.adapter_a[0] - a0).norm()) > 0  # A moved
    assert p.full.shape[0] == 3 and float(p.full.norm()) > 0


def test_clear_errors(generated, ray_session, tmp_path, capsys):
    config, _ = generated
    with pytest.raises(SpecMismatchError, match="lora"):
        run_pairs(config.model_copy(update={"lora": LoraSpec(r=4, seed=3)}), progress=False)
    with pytest.raises(SpecMismatchError, match="tokens"):
        run_pairs(config.model_copy(update={"tokens": 20}), progress=False)
    with pytest.raises(ValueError, match="unknown target module 'nope_proj'"):
        run_pairs(config.model_copy(update={"output": str(tmp_path / "x"), "lora": LoraSpec(target_modules=("nope_proj",))}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PairDataError, match="is a file"):
        run_pairs(config.model_copy(update={"output": str(tmp_path / "file")}))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="has no texts"):
        run_pairs(config.model_copy(update={"output": str(tmp_path / "e"), "source": str(tmp_path / "empty.txt")}), progress=False)
    (tmp_path / "short.txt").write_text("tiny text\nanother one\n")
    with pytest.raises(ValueError, match="minimum of tokens=16 tokens"):
        run_pairs(config.model_copy(update={"output": str(tmp_path / "s"), "source": str(tmp_path / "short.txt")}), progress=False)
    with pytest.raises(PairDataError, match="reserve all 2 CPUs"):  # would hang: nothing left to read or write
        run_pairs(config.model_copy(update={"output": str(tmp_path / "c"), "actors": 2, "cpus_per_actor": 1.0}), progress=False)
    with pytest.raises(ValueError, match="neither a packaged corpus"):
        run_pairs(config.model_copy(update={"output": str(tmp_path / "n"), "source": str(tmp_path / "missing")}))
    assert cli_main(["pairs", "--model", "tiny", "--output", str(tmp_path / "file"), "--quiet"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli_main(["pairs", "--model", "tiny", "--output", str(tmp_path / "y"), "--set", "mode=minibatch"]) == 2
    assert "examples_per_pair >= 2" in capsys.readouterr().err
    assert not Path(tmp_path / "x").exists() or not any(Path(tmp_path / "x").iterdir())
