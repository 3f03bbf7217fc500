"""Pair datasets without Ray: schema round trip against fresh autograd, storage kinds, manifest safety."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from r2f_ray.assets import tiny_llama
from r2f_ray.core.capture import example_nll
from r2f_ray.core.lora import LoraProbe, LoraSpec, lora_grads_from_factors
from r2f_ray.core.targets import find_module
from r2f_ray.pairdata import (
    STAGING_DIR,
    PairDataError,
    PairDataset,
    SpecMismatchError,
    build_manifest,
    commit_shard,
    encode_records,
    input_owners,
    open_for_append,
    pairs_from_batch,
    records_after_steps,
    records_from_capture,
    split_of,
)


def assert_rel_close(got, want, tol=1e-5):
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def _ids(vocab: int, n: int, t: int = 12, seed: int = 0):
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _meta(n: int, offset: int = 0):
    return [{"pair_id": f"ex{i}", "example_ids": [f"ex{i}"], "text_sha256": [f"{i:064x}"], "split_key": f"text{i}"}
            for i in range(offset, offset + n)]


def _write(path, manifest, records, shard="s0", rows_per_file=2):
    manifest = open_for_append(path, manifest)
    staged = path / STAGING_DIR / shard
    staged.mkdir(parents=True)
    for k in range(0, len(records), rows_per_file):
        pq.write_table(encode_records(records[k:k + rows_per_file], manifest), staged / f"part-{k:05d}.parquet")
    return commit_shard(path, manifest, shard, staged)


def _dataset(tmp_path, spec, storage="factors", dtype="float32", n=3, share=True, mode="single"):
    model, _ = tiny_llama(seed=0)
    probe = LoraProbe(model, spec)
    ids = _ids(model.config.vocab_size, n)
    cap = probe.capture(ids)
    owners = input_owners(cap) if share else {m.name: m.name for m in cap.matrices}
    manifest = build_manifest(model_id="tiny", weights_sha256="w" * 64, spec=spec, matrices=probe.matrices,
                              input_owner=owners, mode=mode, storage=storage, dtype=dtype, tokens=ids.shape[1],
                              packing="truncate")
    records = records_from_capture(cap, [[i] for i in range(n)], _meta(n), owners)
    _write(tmp_path, manifest, records)
    return PairDataset(tmp_path), ids, cap, probe


def _autograd_weight_grads(ids_row):
    """Plain autograd on an un-adapted copy of the same model: weight.grad of every linear, one example."""
    model, _ = tiny_llama(seed=0)
    loss = example_nll(model(input_ids=ids_row[None]).logits, ids_row[None]).sum()
    loss.backward()
    return model


@pytest.mark.parametrize("init", ["standard", "zero_offset"])
def test_round_trip_equals_fresh_autograd(tmp_path, init):
    spec = LoraSpec(r=4, alpha=8, seed=5, init=init)
    ds, ids, batch_cap, probe = _dataset(tmp_path, spec)
    assert len(ds) == 3 and ds.manifest["counts"]["pairs"] == 3 * len(ds.matrices) == 3 * 14
    assert ds.spec == spec and ds.manifest["proxy"]["model_id"] == "tiny"
    (batch,) = ds.iter_batches(batch_size=8)
    assert batch[ds.matrices[0].name].pair_ids == ["ex0", "ex1", "ex2"]
    for b in range(3):
        plain = _autograd_weight_grads(ids[b])
        single = probe.capture(ids[b:b + 1])  # real PEFT LoRA grads of this example alone
        for info in ds.matrices:
            p = batch[info.name]
            assert_rel_close(p.full[b], find_module(plain, info.name).weight.grad)
            assert_rel_close(p.grad_b[b], single.extra_grads[info.name + ".B"])
            if init == "zero_offset":
                assert_rel_close(p.grad_a[b], single.extra_grads[info.name + ".A"])
            else:
                assert torch.count_nonzero(p.grad_a[b]) == 0
    # Per-example LoRA grads from the stored factors add up to PEFT's real batch grad.
    for info in ds.matrices:
        assert_rel_close(batch[info.name].grad_b.sum(0), batch_cap.extra_grads[info.name + ".B"])
        a0, b0 = probe.init[info.name]
        per_example = sum(lora_grads_from_factors(*batch_cap.factors(info.name, b), a0, b0, spec.scaling)[1] for b in range(3))
        assert_rel_close(per_example, batch_cap.extra_grads[info.name + ".B"])


def test_shared_inputs_are_stored_once(tmp_path):
    ds, *_ = _dataset(tmp_path, LoraSpec(r=2))
    cols = [c for c in pq.read_schema(ds.files()[0]).names if c.startswith("x:")]
    assert len(cols) == 2 * 4  # per layer: q/k/v input, o input, gate/up input, down input
    q = ds.manifest["input_columns"]["x:model.layers.0.self_attn.q_proj"]["shared_by"]
    assert [n.rsplit(".", 1)[1] for n in q] == ["q_proj", "k_proj", "v_proj"]
    # Each file describes its tensor columns itself (field metadata), not only the manifest.
    schema = pq.read_schema(ds.files()[0])
    x_meta = json.loads(schema.field("x:model.layers.0.self_attn.q_proj").metadata[b"r2f"])
    assert x_meta["kind"] == "factor X" and [m["role"] for m in x_meta["matrices"]] == ["q_proj", "k_proj", "v_proj"]
    d_meta = json.loads(schema.field("d:model.layers.1.mlp.down_proj").metadata[b"r2f"])
    assert d_meta == {"kind": "factor D", "shape": ["R", 64], "dtype": "float32",
                      "matrices": [{"name": "model.layers.1.mlp.down_proj", "layer": 1, "role": "down_proj"}]}


def test_input_covariance_is_the_mean_outer_product_of_stored_inputs(tmp_path):
    ds, ids, cap, _ = _dataset(tmp_path, LoraSpec(r=2), n=4)
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    for split in (None, "train"):
        keep = [b for b in range(4) if split is None or split_of(f"text{b}", ds.manifest["split"]["heldout_fraction"]) == split]
        cov = ds.input_covariance(names, split)
        for n in names:
            xs = [cap.factors(n, b)[0].double() for b in keep]
            want = sum(x.T @ x for x in xs) / sum(x.shape[0] for x in xs)
            assert cov[n].dtype == torch.float64
            torch.testing.assert_close(cov[n], want)
    dense, *_ = _dataset(tmp_path / "dense", LoraSpec(r=2), storage="dense", n=1)
    with pytest.raises(PairDataError, match="factor storage"):
        dense.input_covariance(names)


def test_unshared_dense_and_bf16_storage_agree_with_factors(tmp_path):
    spec = LoraSpec(r=4, init="zero_offset")
    ref, *_ = _dataset(tmp_path / "ref", spec)
    want = next(ref.iter_batches())
    for kw, tol in (({"share": False}, 1e-6), ({"storage": "dense"}, 1e-5), ({"storage": "both"}, 1e-6),
                    ({"dtype": "bfloat16"}, 2e-2)):
        ds, *_ = _dataset(tmp_path / "_".join(map(str, kw.values())), spec, **kw)
        got = next(ds.iter_batches())
        for name, p in want.items():
            for part in ("full", "grad_a", "grad_b"):
                assert_rel_close(getattr(got[name], part), getattr(p, part), tol)
    dense_bytes = PairDataset(tmp_path / "dense").manifest["counts"]["bytes"]
    assert dense_bytes > ref.manifest["counts"]["bytes"]


def test_ray_style_numpy_batches_and_splits(tmp_path):
    ds, *_ = _dataset(tmp_path, LoraSpec(r=2), n=6)
    names = [m.name for m in ds.matrices[:3]]
    table = pq.read_table(ds.files()[0], columns=ds.columns(names))
    numpy_batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    from_numpy = pairs_from_batch(numpy_batch, ds.manifest, names)
    from_arrow = pairs_from_batch(table, ds.manifest, names)
    for n in names:
        assert torch.equal(from_numpy[n].full, from_arrow[n].full)
    assert set(from_numpy) == set(names)
    train, held = ds.pair_ids("train"), ds.pair_ids("heldout")
    assert sorted(train + held) == sorted(ds.pair_ids()) and len(ds.pair_ids()) == 6
    assert all(split_of(f"text{i}") == ("heldout" if f"ex{i}" in held else "train") for i in range(6))
    got = [pid for b in ds.iter_batches(names[:1], batch_size=4, split="train") for pid in b[names[0]].pair_ids]
    assert got == train
    with pytest.raises(PairDataError, match="no pairs for"):
        next(ds.iter_batches(["model.layers.9.mlp.up_proj"]))
    with pytest.raises(PairDataError, match="split"):
        next(ds.iter_batches(split="test"))


def test_split_is_deterministic_and_near_fraction():
    keys = [f"k{i}" for i in range(4000)]
    held = sum(split_of(k, 0.1) == "heldout" for k in keys) / len(keys)
    assert 0.08 < held < 0.12
    assert [split_of(k) for k in keys[:50]] == [split_of(k) for k in keys[:50]]


def test_minibatch_record_is_the_sum_of_its_examples(tmp_path):
    model, _ = tiny_llama(seed=0)
    probe = LoraProbe(model, LoraSpec(r=4))
    ids = _ids(model.config.vocab_size, 4, seed=1)
    cap = probe.capture(ids)
    owners = input_owners(cap)
    meta = [{"pair_id": "mb:a", "example_ids": ["e0", "e1"], "text_sha256": ["0", "1"], "split_key": "mb:a"},
            {"pair_id": "mb:b", "example_ids": ["e2", "e3"], "text_sha256": ["2", "3"], "split_key": "mb:b"}]
    recs = records_from_capture(cap, [[0, 1], [2, 3]], meta, owners)
    manifest = build_manifest(model_id="tiny", weights_sha256="w", spec=probe.spec, matrices=probe.matrices,
                              input_owner=owners, mode="minibatch", storage="factors", dtype="float32", tokens=12,
                              packing="truncate", examples_per_pair=2)
    _write(tmp_path, manifest, recs)
    ds = PairDataset(tmp_path)
    assert ds.manifest["counts"] == {**ds.manifest["counts"], "items": 2, "examples": 4}
    batch = next(ds.iter_batches())
    for info in ds.matrices:
        assert_rel_close(batch[info.name].full[0], cap.dense(info.name, 0) + cap.dense(info.name, 1))
        assert_rel_close(batch[info.name].grad_b.sum(0), cap.extra_grads[info.name + ".B"])


@pytest.mark.parametrize("steps", [1, 3])
def test_step_modes_record_real_sgd_adapters(tmp_path, steps):
    model, _ = tiny_llama(seed=0)
    spec = LoraSpec(r=4, alpha=4)
    probe = LoraProbe(model, spec)
    ids = _ids(model.config.vocab_size, 2, seed=2)
    mask = torch.ones_like(ids)
    owners = input_owners(probe.capture(ids[:1]))
    lr = 0.5
    recs = records_after_steps(probe, ids, mask, _meta(2), steps, lr, owners)
    mode = "single_step" if steps == 1 else "multi_step"
    manifest = build_manifest(model_id="tiny", weights_sha256="w", spec=spec, matrices=probe.matrices, input_owner=owners,
                              mode=mode, storage="factors", dtype="float32", tokens=12, packing="truncate",
                              steps=steps, step_lr=lr)
    _write(tmp_path, manifest, recs)
    batch = next(PairDataset(tmp_path).iter_batches())
    # Independent reference: the same T steps by hand with plain autograd on PEFT's parameters.
    params = probe.lora_parameters()
    for b in range(2):
        probe.reset()
        mean_g = {}
        for _ in range(steps):
            cap = probe.capture(ids[b:b + 1])
            for info in probe.matrices:
                mean_g[info.name] = mean_g.get(info.name, 0) + cap.dense(info.name) / steps
            with torch.no_grad():
                for key, p in params.items():
                    p -= lr * cap.extra_grads[key]
        for info in probe.matrices:
            p = batch[info.name]
            assert_rel_close(p.full[b], mean_g[info.name])
            assert_rel_close(p.adapter_a[b], params[info.name + ".A"].detach())
            assert_rel_close(p.adapter_b[b], params[info.name + ".B"].detach())
            if steps == 1:  # the single-step view: B1 A1 = -lr s G A0^T A0
                a0, _ = probe.init[info.name]
                assert_rel_close(p.adapter_b[b] @ p.adapter_a[b], -lr * spec.scaling * mean_g[info.name] @ a0.T @ a0)
    probe.reset()
    a0, b0 = probe.init[probe.matrices[0].name]
    assert torch.equal(params[probe.matrices[0].name + ".A"].detach(), a0)


def test_manifest_safety(tmp_path):
    spec = LoraSpec(r=2)
    ds, *_ = _dataset(tmp_path / "d", spec)
    other = dict(ds.manifest, lora=LoraSpec(r=2, seed=1).model_dump(mode="json"))
    with pytest.raises(SpecMismatchError, match="lora"):
        open_for_append(tmp_path / "d", other)
    with pytest.raises(SpecMismatchError, match="proxy"):
        open_for_append(tmp_path / "d", dict(ds.manifest, proxy={"model_id": "tiny", "weights_sha256": "x"}))
    assert open_for_append(tmp_path / "d", ds.manifest)["counts"]["items"] == 3  # same settings: append allowed
    (tmp_path / "f").write_text("x")
    with pytest.raises(PairDataError, match="is a file"):
        open_for_append(tmp_path / "f", ds.manifest)
    with pytest.raises(PairDataError, match="is a file"):
        PairDataset(tmp_path / "f")
    with pytest.raises(PairDataError, match="no manifest.json"):
        PairDataset(tmp_path)
    # A shard folder that is not in the manifest (a crash before the commit) is invisible to readers.
    (tmp_path / "d" / "data" / "shard-ghost").mkdir()
    pq.write_table(pq.read_table(ds.files()[0]), tmp_path / "d" / "data" / "shard-ghost" / "x.parquet")
    assert len(PairDataset(tmp_path / "d").pair_ids()) == 3
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["counts"]["shards"] == 1
