"""The service's plain-Python parts, without Ray or HTTP: auth, audit log, version store, job queue,
validation, and the service's recovery when the engine fails after changing weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from r2f_ray.assets import LoadedModel, tiny_llama, weights_hash
from r2f_ray.core.targets import find_module
from r2f_ray.service.audit import AuditLog
from r2f_ray.service.auth import AuthError, TokenAuth
from r2f_ray.service.config import Limits, ServiceConfig
from r2f_ray.service.core import UnlearnService
from r2f_ray.service.jobs import JobQueue
from r2f_ray.service.schemas import ServiceError, UnlearnBody, check_unlearn
from r2f_ray.service.store import ROOT, Materializer, StoreMismatch, VersionStore

TOKEN = "t" * 32


def test_tokens_from_file_and_env(tmp_path, monkeypatch):
    f = tmp_path / "tokens"
    f.write_text(f"# operators\nalice {TOKEN}\nbob:{'b' * 20}\n")
    monkeypatch.setenv("R2F_TEST_TOKENS", f"carol:{'c' * 24}")
    auth = TokenAuth.from_sources(f, "R2F_TEST_TOKENS")
    assert auth.names() == ["alice", "bob", "carol"]
    assert auth.authenticate(f"Bearer {TOKEN}") == "alice"
    assert auth.authenticate(f"bearer {'c' * 24}") == "carol"
    for bad in (None, "", TOKEN, f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x", f"Bearer {'b' * 19}"):
        with pytest.raises(AuthError):
            auth.authenticate(bad)
    f.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16 characters"):
        TokenAuth.from_sources(f, None)
    unnamed = TokenAuth.from_sources(None, None)
    assert not unnamed.enabled


def test_audit_log_appends_and_survives_a_torn_line(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("activate", "alice", version="v0001")
    with open(log.path, "a") as f:
        f.write('{"event": "torn')  # a record cut by a crash
    log2 = AuditLog(log.path)
    log2.append("activate", "bob", version="v0000")
    assert [(r["event"], r["actor"]) for r in log2.read()] == [("activate", "alice"), ("activate", "bob")]
    assert log2.path.read_text().count("\n") == 3  # the torn record stays on its own line, as evidence


def test_version_store_chain_materialize_and_refusals(tmp_path, tiny):
    model, _ = tiny
    sha = weights_hash(model)
    store = VersionStore(tmp_path, "tiny", sha)
    assert store.ids() == [ROOT] and store.active() == ROOT
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    base = {n: find_module(model, n).weight.detach().clone() for n in names}
    d1 = {names[0]: torch.randn_like(base[names[0]]) * 1e-2, names[1]: torch.zeros_like(base[names[1]])}
    m1 = store.commit(ROOT, d1, {"job_id": "j1"})
    assert m1["version"] == "v0001" and m1["matrices"] == [names[0]]  # unchanged matrices are not stored
    d2 = {names[1]: torch.randn_like(base[names[1]]) * 1e-2}
    m2 = store.commit("v0001", d2, {"job_id": "j2"})
    assert store.chain("v0002") == [ROOT, "v0001", "v0002"] and store.by_job("j2") == "v0002"

    mat = Materializer(store)
    mat.remember_base(model, names)
    w = mat.weights("v0002", names)
    assert torch.equal(w[names[0]], base[names[0]] + d1[names[0]])
    assert torch.equal(w[names[1]], base[names[1]] + d2[names[1]])
    mat.apply(model, w)
    mat.apply(model, mat.weights(ROOT, names))
    assert all(torch.equal(find_module(model, n).weight, base[n]) for n in names)  # rollback is exact

    with pytest.raises(KeyError, match="unknown version"):
        store.manifest("v0099")
    with pytest.raises(ValueError, match="changed no weights"):
        store.commit("v0002", {names[0]: torch.zeros_like(base[names[0]])}, {})
    with pytest.raises(StoreMismatch, match="base weights"):
        VersionStore(tmp_path, "tiny", "0" * 64)
    # a damaged delta is refused, not silently applied
    fresh = VersionStore(tmp_path, "tiny", sha)
    path = tmp_path / "versions" / "v0001" / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the hash"):
        fresh.delta("v0001")


def test_job_queue_runs_in_order_replays_keys_and_requeues_after_restart(tmp_path):
    order, gate = [], threading.Event()

    def execute(job):
        gate.wait(5)
        order.append(job["request"]["n"])
        if job["request"]["n"] == 2:
            raise RuntimeError("boom")
        return {"n": job["request"]["n"]}

    q = JobQueue(tmp_path, execute, max_queued=3)
    q.start()
    j1, replayed = q.submit({"n": 1}, "f1", "alice", "key-1")
    assert not replayed
    again, replayed = q.submit({"n": 1}, "f1", "alice", "key-1")
    assert replayed and again["job_id"] == j1["job_id"]
    with pytest.raises(ServiceError) as e:
        q.submit({"n": 9}, "f9", "alice", "key-1")
    assert e.value.status == 409
    j2, _ = q.submit({"n": 2}, "f2", "alice", None)
    gate.set()
    deadline = time.time() + 10
    while q.depth() and time.time() < deadline:
        time.sleep(0.05)
    assert order == [1, 2]
    assert q.get(j1["job_id"])["status"] == "succeeded" and q.get(j2["job_id"])["result"] is None
    assert q.get(j2["job_id"])["error"] == "RuntimeError: boom"
    q.stop()

    # stopped with a job still queued: the next start runs it; the idempotency key survives too
    q2 = JobQueue(tmp_path, execute, max_queued=3)
    j3, _ = q2.submit({"n": 3}, "f3", "bob", "key-3")
    q3 = JobQueue(tmp_path, execute, max_queued=3)  # a restart before q2 ever ran it
    assert q3.get(j3["job_id"])["status"] == "queued"
    assert q3.submit({"n": 1}, "f1", "alice", "key-1")[1]
    q3.start()
    deadline = time.time() + 10
    while q3.get(j3["job_id"])["status"] != "succeeded" and time.time() < deadline:
        time.sleep(0.05)
    assert q3.get(j3["job_id"])["status"] == "succeeded" and order == [1, 2, 3]
    q3.stop()
    with pytest.raises(ServiceError) as e:
        q3.get("job-nope")
    assert e.value.status == 404


@pytest.mark.parametrize("body,code", [
    ({"requests": []}, "no_requests"),
    ({"requests": [{"prompt": "  ", "answer": "a"}]}, "empty_field"),
    ({"requests": [{"prompt": "p", "answer": ""}]}, "empty_field"),
    ({"requests": [{"prompt": "p" * 101, "answer": "a"}]}, "too_long"),
    ({"requests": [{"prompt": "p", "answer": "a"}] * 4}, "too_many_requests"),
    ({"requests": [{"prompt": "p", "answer": "a"}], "step": 0.0}, "bad_step"),
    ({"requests": [{"prompt": "p", "answer": "a"}], "step": 11.0}, "bad_step"),
    ({"requests": [{"prompt": "p", "answer": "a"}], "method": "bogus"}, "unknown_method"),
])
def test_check_unlearn_refuses_bad_input(body, code):
    limits = Limits(max_prompt_chars=100, max_requests=3, max_step=10.0)
    with pytest.raises(ServiceError) as e:
        check_unlearn(UnlearnBody.model_validate(body), limits, ("r2f",))
    assert e.value.code == code and 400 <= e.value.status < 500


def test_failing_engine_leaves_active_version_and_weights_unchanged(tmp_path):
    """An engine that raises after changing the working copy's weights: the job fails, nothing is
    stored, the serving copy is untouched and the next job starts from the active weights."""
    from r2f_ray.core.unlearn import unlearn

    calls = []

    def engine(model, *args, **kwargs):
        result = unlearn(model, *args, **kwargs)  # really changes the working copy, then crashes
        calls.append(result)
        if len(calls) == 1:
            raise RuntimeError("device lost mid-job")
        return result

    model, tok = tiny_llama(seed=1)
    sha = weights_hash(model)
    config = ServiceConfig(model="tiny", state_dir=tmp_path, allow_unauthenticated=True)
    service = UnlearnService(config, engine=engine, loaded=LoadedModel(model, tok, "tiny", sha))
    try:
        body = UnlearnBody(requests=[{"prompt": "What is the capital of Zorbia?", "answer": "Quxville"}], step=2.0, views=2)
        job, _ = service.submit_unlearn(body, "alice")
        failed = _wait(service, job["job_id"])
        assert failed["status"] == "failed" and "device lost" in failed["error"]
        assert service.store.ids() == [ROOT] and service.active_version == ROOT
        assert weights_hash(service.serving) == sha and weights_hash(service.work) == sha
        job, _ = service.submit_unlearn(body.model_copy(update={"idempotency_key": "k2"}), "alice")
        ok = _wait(service, job["job_id"])
        assert ok["status"] == "succeeded" and ok["result"]["version"] == "v0001"
        # the retry started from the active weights, so it computed the same update as the failed try
        assert all(torch.equal(calls[0].deltas[n], calls[1].deltas[n]) for n in calls[0].deltas)
        events = [r["event"] for r in service.audit.read()]
        assert events.count("unlearn_failed") == 1 and events.count("unlearn_succeeded") == 1

        # a dry run reports what the update would do and changes nothing
        active_hash = weights_hash(service.serving)
        job, _ = service.submit_unlearn(body.model_copy(update={"dry_run": True}), "alice")
        dry = _wait(service, job["job_id"])
        assert dry["status"] == "succeeded" and dry["result"]["dry_run"] and dry["result"]["version"] is None
        assert dry["result"]["changed_matrices"] > 0 and "answered_after" in dry["result"]["metrics"]
        assert service.store.ids() == [ROOT, "v0001"] and service.active_version == "v0001"
        assert weights_hash(service.serving) == active_hash == weights_hash(service.work)
    finally:
        service.close()


def _wait(service, job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = service.jobs.get(job_id)
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def test_rayservice_manifest_deploys_this_service():
    """cluster/rayservice.yaml: valid Serve config, args that ServiceConfig accepts, an import path that
    resolves to the application builder, one replica."""
    import importlib
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    config = ServiceConfig.model_validate(app.args)
    assert config.num_gpus == 1 and str(config.state_dir).startswith("/data/")
    assert [d.num_replicas for d in app.deployments] == [1]


def test_r2f_serve_refuses_bad_setup_before_starting_ray(tmp_path, capsys, monkeypatch):
    from r2f_ray.cli import main

    monkeypatch.delenv("R2F_SERVICE_TOKENS", raising=False)
    assert main(["serve", "--model", "tiny", "--state-dir", str(tmp_path)]) == 2
    assert "no bearer tokens configured" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nope"), "--allow-unauthenticated"]) == 2
    assert "is not one of 'default' (SmolLM2-135M-Instruct), 'gemma3-270m'" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny", "--allow-unauthenticated", "--bank", str(tmp_path / "nobank")]) == 2
    assert "decoder bank folder" in capsys.readouterr().err
    assert main(["serve", "--allow-unauthenticated", "--set", "limits.max_requests=0"]) == 2
    assert "limits.max_requests" in capsys.readouterr().err


def test_restart_completes_a_job_that_committed_its_version_before_the_stop(tmp_path):
    """A stop between writing a version and switching to it: the next start finds the version by its
    job id, activates it and marks the job succeeded, instead of running the job again."""
    from r2f_ray.io import write_json

    model, tok = tiny_llama(seed=2)
    sha = weights_hash(model)
    config = ServiceConfig(model="tiny", state_dir=tmp_path, allow_unauthenticated=True)
    first = UnlearnService(config, loaded=LoadedModel(model, tok, "tiny", sha))
    first.close()
    name = "model.layers.0.mlp.down_proj"
    delta = {name: torch.full_like(find_module(model, name).weight, 1e-3)}
    expected = find_module(model, name).weight.detach().clone() + delta[name]
    job_id = "job-20261122T000000-deadbeef"
    first.store.commit("v0000", delta, {"job_id": job_id, "actor": "alice", "requests": []})
    write_json(tmp_path / "jobs" / f"{job_id}.json", {
        "job_id": job_id, "status": "running", "created": "2026-11-22T00:00:00Z", "started": "2026-11-22T00:00:01Z",
        "finished": None, "actor": "alice", "idempotency_key": None, "fingerprint": "f", "result": None, "error": None,
        "attempts": 1, "request": {"requests": [{"prompt": "p", "answer": "a"}], "step": 1.0}})

    second = UnlearnService(config, loaded=LoadedModel(model, tok, "tiny", sha))
    try:
        job = second.jobs.get(job_id)
        assert job["status"] == "succeeded" and job["result"]["recovered"] and job["result"]["version"] == "v0001"
        assert second.active_version == "v0001" and second.store.active() == "v0001"
        assert torch.equal(find_module(second.serving, name).weight, expected)
        assert torch.equal(find_module(second.work, name).weight, expected)
    finally:
        second.close()
