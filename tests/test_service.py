"""The unlearning service end to end: real HTTP against `serve.run` on the local Ray instance, a tiny
Llama that was really taught a fact by fine-tuning, and the naive decoder bank (no training needed)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import torch

from r2f_ray.client import R2FClient, R2FClientError

TOKEN = "s3cret-token-" + "x" * 20
PROMPT, ANSWER = "What is the capital of Zorbia?", "Quxville"
pytestmark = pytest.mark.slow  # deploys with Ray Serve and runs real unlearning jobs

FORGET = {"requests": [{"id": "zorbia", "prompt": PROMPT, "answer": ANSWER}], "step": 2.0, "views": 2}


@pytest.fixture(scope="module")
def taught_model(tmp_path_factory):
    """The tiny random Llama after a few real fine-tuning steps on one fictitious fact, saved as a folder."""
    from r2f_ray.assets import tiny_llama
    from r2f_ray.core.unlearn import encode_pairs, greedy_answers

    model, tok = tiny_llama(seed=0)
    ids, mask, labels = encode_pairs(tok, [(PROMPT, ANSWER + tok.eos_token)])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(40):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert greedy_answers(model, tok, [PROMPT], 12) == [ANSWER], "the fixture failed to teach the fact"
    folder = tmp_path_factory.mktemp("taught")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(ray_session, taught_model, tmp_path_factory):
    """The service deployed with `serve.run` on a free local port; yields (base_url, config, redeploy)."""
    from ray import serve

    from r2f_ray.service.config import ServiceConfig
    from r2f_ray.service.deployment import APP_NAME, run

    root = tmp_path_factory.mktemp("service")
    tokens = root / "tokens"
    tokens.write_text(f"operator {TOKEN}\n")
    config = ServiceConfig(model=str(taught_model), bank="naive", state_dir=root / "state", tokens_file=tokens,
                           num_cpus=1, activate_wait_s=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    def deploy():
        run(config, port=port)
        with R2FClient(url) as c:
            deadline = time.time() + 120
            while not c.ready():
                assert time.time() < deadline, "service not ready after 120 s"
                time.sleep(0.5)

    def redeploy():
        serve.delete(APP_NAME)
        deploy()

    deploy()
    yield url, config, redeploy
    serve.shutdown()


@pytest.fixture
def client(served):
    with R2FClient(served[0], token=TOKEN, timeout=120) as c:
        yield c


def _text(client) -> dict:
    return client.generate(PROMPT, max_new_tokens=12)


def test_unlearn_removes_the_fact_and_activating_the_parent_restores_it(client):
    before = _text(client)
    assert ANSWER in before["text"] and before["version"] == "v0000"
    accepted = client.unlearn(**FORGET)
    assert accepted["status"] == "queued" and accepted["job_id"].startswith("job-")
    job = client.wait(accepted["job_id"], 300)
    assert job["status"] == "succeeded", job["error"]
    version = job["result"]["version"]
    assert version == "v0001" and job["result"]["metrics"]["answered_before"] == 1
    after = _text(client)
    assert after["version"] == version and ANSWER not in after["text"]

    models = client.models()
    assert models["active"] == version
    v1 = models["versions"][-1]
    assert v1["parent"] == "v0000" and v1["requests"][0]["answer"] == ANSWER and v1["matrices"] > 0
    assert v1["metrics"]["answered_after"] == 0

    assert client.activate("v0000") == {"active": "v0000", "previous": version}
    assert _text(client) == before  # bit-identical weights: the same greedy answer
    client.activate(version)
    assert _text(client) == after


def test_missing_or_wrong_token_is_refused(served):
    url = served[0]
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path, body in (("POST", "/v1/unlearn", FORGET), ("POST", "/v1/models/v0000/activate", None),
                                   ("GET", "/v1/models", None), ("GET", "/v1/jobs/job-x", None)):
            r = httpx.request(method, url + path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path,body,status,code", [
    ("/v1/unlearn", {"requests": [{"prompt": "", "answer": ANSWER}]}, 422, "empty_field"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": "   "}]}, 422, "empty_field"),
    ("/v1/unlearn", {"requests": [{"prompt": "p" * 2001, "answer": ANSWER}]}, 422, "too_long"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": "a" * 40}]}, 422, "too_long"),  # > 32 answer tokens
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": ANSWER}] * 17}, 422, "too_many_requests"),
    ("/v1/unlearn", {"requests": []}, 422, "no_requests"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": ANSWER}], "method": "bogus"}, 422, "unknown_method"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": ANSWER}], "step": -1}, 422, "bad_step"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": ANSWER}], "step": "fast"}, 422, "invalid_request"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": ANSWER}], "views": 0}, 422, "bad_views"),
    ("/v1/unlearn", {"requests": [{"prompt": PROMPT, "answer": ANSWER}], "colour": "red"}, 422, "invalid_request"),
    ("/v1/unlearn", {"requests": [{"prompt": "p" * 70000, "answer": ANSWER}]}, 413, "body_too_large"),
    ("/v1/models/v0042/activate", None, 404, "unknown_version"),
    ("/v1/models/latest/activate", None, 404, "unknown_version"),
    ("/v1/generate", {"prompt": PROMPT, "max_new_tokens": 100000}, 422, "bad_max_new_tokens"),
    ("/v1/generate", {"prompt": ""}, 422, "empty_field"),
])
def test_bad_input_gets_its_4xx(served, path, body, status, code):
    url = served[0]
    r = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    r = httpx.post(url + "/v1/unlearn", content=b"{not json", headers={"Authorization": f"Bearer {TOKEN}",
                                                                       "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert httpx.get(url + "/v1/jobs/job-unknown", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_generate_keeps_answering_during_an_unlearn_job(client, served):
    """Generate requests sent while a job runs all succeed; each answer comes whole from the parent or
    from the new version, never from a mix, and the new version appears once and stays."""
    parent = client.models()["active"]
    expected = {parent: _text(client)["text"]}
    # three facts, five views each: a job long enough that generate calls land while it runs
    facts = [{"prompt": p, "answer": a} for p, a in (("Who rules Zorbia?", "Queen Ama"), ("What does Zorbia export?", "tin"),
                                                     ("What is Zorbia's currency?", "the zorb"))]
    job = client.unlearn(**{**FORGET, "requests": facts, "views": 5})
    results, errors = [], []

    def hammer():
        with R2FClient(served[0], timeout=120) as c:
            while len(results) < 200:
                try:
                    results.append((time.monotonic(), c.generate(PROMPT, max_new_tokens=12)))
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    errors.append(repr(e))
                if client.job(job["job_id"])["status"] in ("succeeded", "failed"):
                    return

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done = client.wait(job["job_id"], 60)
    assert done["status"] == "succeeded", done["error"]
    new = done["result"]["version"]
    expected[new] = _text(client)["text"]
    assert not errors and len(results) >= 3
    results.sort(key=lambda r: r[0])
    versions = [r["version"] for _, r in results]
    assert set(versions) <= {parent, new} and versions[0] == parent
    assert versions == sorted(versions, key=lambda v: v == new)  # parent answers, then new ones only
    assert all(r["text"] == expected[r["version"]] for _, r in results)


def test_same_idempotency_key_applies_once(client):
    n_versions = len(client.models()["versions"])
    body = {**FORGET, "requests": [{"prompt": "Which river crosses Zorbia?", "answer": "the Vell"}],
            "idempotency_key": "forget-vell-1"}
    first = client.unlearn(**body)
    second = client.unlearn(**body)
    assert second["job_id"] == first["job_id"] and second["replayed"] and not first["replayed"]
    assert client.wait(first["job_id"], 300)["status"] == "succeeded"
    third = client.unlearn(**body)
    assert third["job_id"] == first["job_id"] and third["replayed"]
    assert len(client.models()["versions"]) == n_versions + 1
    with pytest.raises(R2FClientError) as e:
        client.unlearn(**{**body, "step": 1.0})
    assert e.value.status == 409 and e.value.code == "idempotency_conflict"


def test_failing_job_leaves_active_version_unchanged(client, served):
    """A job that fails after the engine changed the working copy (its version folder cannot be
    written): the active version, its answers and the version list stay as they were."""
    config = served[1]
    models = client.models()
    active, before = models["active"], _text(client)
    next_id = f"v{len(models['versions']):04d}"
    blocker = config.state_dir / "versions" / next_id
    blocker.write_text("in the way")
    try:
        job = client.unlearn(**{**FORGET, "requests": [{"prompt": PROMPT, "answer": "Qux"}]}, wait=True, wait_timeout=300)
    finally:
        blocker.unlink()
    assert job["status"] == "failed" and "already exists" in job["error"]
    assert client.models() == models and _text(client) == before
    # the next job starts from the active weights and succeeds
    job = client.unlearn(**{**FORGET, "requests": [{"prompt": PROMPT, "answer": "Qux"}]}, wait=True, wait_timeout=300)
    assert job["status"] == "succeeded" and job["result"]["parent"] == active
    assert job["result"]["metrics"]["requests"][0]["greedy_before"].startswith(before["text"])


def test_openapi_health_and_metrics(served, client):
    url = served[0]
    spec = httpx.get(url + "/openapi.json").json()
    assert set(spec["paths"]) == {"/v1/unlearn", "/v1/jobs/{job_id}", "/v1/generate", "/v1/models",
                                  "/v1/models/{version}/activate", "/healthz", "/readyz", "/metrics"}
    assert "202" in spec["paths"]["/v1/unlearn"]["post"]["responses"]
    for path, method in (("/v1/unlearn", "post"), ("/v1/models/{version}/activate", "post"), ("/v1/models", "get")):
        assert spec["paths"][path][method]["security"] == [{"HTTPBearer": []}]
    assert httpx.get(url + "/healthz").json() == {"ok": True}
    assert httpx.get(url + "/readyz").json()["ready"] is True
    _text(client)
    text = client.metrics()
    assert "r2f_unlearn_job_seconds_count" in text and "r2f_generate_batch_seconds_count" in text
    assert "r2f_unlearn_jobs_pending" in text and "r2f_active_version" in text
    assert 'r2f_http_requests_total{route="/v1/generate",status="200"}' in text


def test_restart_restores_latest_version_with_nothing_lost(client, served):
    url, config, redeploy = served
    models, answer = client.models(), _text(client)
    jobs = [r["job_id"] for r in models["versions"] if r["job_id"]]
    audit_before = (config.state_dir / "audit.jsonl").read_text()
    redeploy()
    assert client.models() == models
    assert _text(client) == answer
    assert all(client.job(j)["status"] == "succeeded" for j in jobs)
    audit_after = (config.state_dir / "audit.jsonl").read_text()
    assert audit_after.startswith(audit_before) and audit_after.count("service_started") == 2
    assert TOKEN not in audit_after  # the audit log names token holders, never tokens
