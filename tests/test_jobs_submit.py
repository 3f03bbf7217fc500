"""The cluster path for real: a local Ray head, `ray job submit` for the batch stages, outputs checked.

A local head (`ray start --head`) accepts the same submissions as a remote cluster. It gets its own
temp dir, free ports and a fresh auth token, and is stopped by killing only its own processes, so other
Ray instances on the machine (the test session's, say) are left alone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_using(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="r2fhead.", dir="/tmp")  # short: Ray puts Unix sockets in it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--port", "0", "--dashboard-port", str(dashboard),
                    "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
                    "--temp-dir", temp_dir, "--include-dashboard", "true", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)
    yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _processes_using(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


def submit(head: dict, *entrypoint: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = ["ray", "job", "submit", "--address", head["address"], "--working-dir", ".",
           "--runtime-env", "jobs/runtime_env.yaml", "--", "python", *entrypoint]
    out = subprocess.run(cmd, cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=timeout)
    print(out.stdout[-3000:], out.stderr[-3000:])
    return out


@pytest.fixture(scope="module")
def pairs_job(ray_head, tmp_path_factory):
    """The pair-generation job's output: 12 tiny-model examples, half held out for the decoder job."""
    pairs = tmp_path_factory.mktemp("jobs") / "pairs"
    out = submit(ray_head, "jobs/generate_pairs.py", "--output", str(pairs), "--model", "tiny",
                 "--set", "max_examples=12", "--set", "tokens=16", "--set", "heldout_fraction=0.5", "--quiet")
    return pairs, out


def test_pair_generation_job_through_ray_job_submit(ray_head, pairs_job):
    pairs, out = pairs_job
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr
    from r2f_ray.pairdata import PairDataset

    dataset = PairDataset(pairs)
    assert len(dataset) == 12
    assert json.loads((pairs / "manifest.json").read_text())["lora"]["r"] == 8
    batch = next(dataset.iter_batches(batch_size=12))
    first = next(iter(batch.values()))
    assert first.full.shape[0] == 12 and first.grad_b.shape[-1] == 8

    # A bad submission fails as a job, with the usage message in its log.
    bad = submit(ray_head, "jobs/generate_pairs.py", "--output", str(pairs), "--model", "tiny", "--set", "lora.r=4",
                 "--set", "max_examples=2", "--set", "tokens=16", "--quiet")
    assert bad.returncode != 0
    assert "lora" in (bad.stdout + bad.stderr).lower()


def test_decoder_training_job_through_ray_job_submit(ray_head, pairs_job, tmp_path):
    pairs, made = pairs_job
    assert made.returncode == 0
    bank_dir = tmp_path / "bank"
    out = submit(ray_head, "jobs/train_decoders.py", "--pairs", str(pairs), "--output", str(bank_dir),
                 "--workers", "2", "--zero-stage", "2", "--epochs", "2", "--set", "matrices=[q_proj,down_proj]")
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr
    from r2f_ray import assets
    from r2f_ray.core.bank import DecoderBank

    tiny = assets.load_model("tiny")
    bank = DecoderBank.load(bank_dir, tiny.model_id, tiny.weights_sha256)
    info = json.loads((bank_dir / "manifest.json").read_text())
    history = info["info"]["training"]["history"]
    assert info["info"]["training"]["workers"] == 2 and 1 <= len(history) <= 2
    roles = {m.split(".")[-1] for m in info["info"]["heldout"]["per_matrix"]}
    assert roles == {"q_proj", "down_proj"} and len(bank.spec.target_modules) > 0


def test_deploy_service_job_leaves_a_ready_service(ray_head, tmp_path):
    port = _free_port()
    tokens = tmp_path / "tokens"
    tokens.write_text("ci secret-token-0123456789\n")
    out = submit(ray_head, "jobs/deploy_service.py", "--set", "model=tiny", "--set", f"state_dir={tmp_path / 'state'}",
                 "--set", f"tokens_file={tokens}", "--host", "127.0.0.1", "--port", str(port), "--ready-timeout", "300")
    assert out.returncode == 0 and "is ready at" in out.stdout + out.stderr
    # The job has ended; the application it deployed keeps answering.
    import httpx

    r = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "Hello", "max_new_tokens": 2}, timeout=120)
    assert r.status_code == 200 and "text" in r.json()
    refused = httpx.post(f"http://127.0.0.1:{port}/v1/unlearn", json={"requests": [{"prompt": "a", "answer": "b"}]}, timeout=60)
    assert refused.status_code == 401
