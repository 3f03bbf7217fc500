"""The `r2f` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def r2f(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r2f_ray.cli", *args], capture_output=True, text=True, timeout=600)


def test_info_json():
    out = r2f("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["versions"]["ray"] and info["versions"]["deepspeed"] and info["versions"]["peft"]
    assert info["models"]["default"]["id"] == "SmolLM2-135M-Instruct" and info["models"]["default"]["installed"]
    assert set(info["models"]) == {"default", "gemma3-270m"}


def test_probe_on_tiny_model_writes_json(tmp_path):
    out = r2f("probe", "--model", "tiny", "--texts", "2", "--tokens", "16", "--rank", "4", "--quiet",
              "--json", str(tmp_path / "probe.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "probe.json").read_text())
    assert set(result["roles"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    for role in result["roles"].values():
        # A rank-4 sketch of a 16-token gradient: the naive lift is far below the SVD ceiling.
        assert 0 < role["naive_cosine"] < role["ceiling_cosine"] <= 1.0 + 1e-9
    assert "naive grad_B@A0" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["probe", "--rank", "0", "--model", "tiny"], "lora.r"),
    (["probe", "--set", "bogus=1", "--model", "tiny"], "bogus"),
    (["probe", "--config", "/nonexistent.yaml"], "does not exist"),
    (["probe", "--model", "tiny", "--texts", "100000", "--quiet"], "ask for fewer texts"),
    (["probe", "--model", "/no/such/folder"], "is not one of 'default' (SmolLM2-135M-Instruct), 'gemma3-270m'"),
    (["probe", "--corpus", "imdb"], "invalid choice"),
    (["demo", "--set", "pair_examples=8"], "too few for 2 training workers"),
    (["demo", "--set", "zero_stage=4"], "zero_stage"),
    (["demo", "--set", "token_weight_facts=4"], "at least 8 facts"),
    (["demo", "--set", "lora_init=orthogonal"], "lora_init"),
    (["train", "--pairs", "/no/such/pairs", "--output", "/no/such/bank"], "pairs"),
])
def test_usage_errors_exit_2_with_a_clear_message(args, message):
    out = r2f(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_demo_pairs_take_the_configured_lora_init(tmp_path):
    # The pairs' spec becomes the bank's, and the service and evaluation take theirs from the bank.
    from r2f_ray.demo import DemoConfig, pairs_config

    assert pairs_config(DemoConfig(), tmp_path).lora.init == "zero_offset"
    assert pairs_config(DemoConfig(lora_init="standard"), tmp_path).lora.init == "standard"


@pytest.mark.slow
def test_probe_on_smollm2_matches_the_design_figures(tmp_path):
    out = r2f("probe", "--texts", "2", "--quiet", "--json", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    roles = json.loads((tmp_path / "p.json").read_text())["roles"]
    # DESIGN.md section 3: naive lift ~0.07-0.15, rank-8 ceiling ~0.87-1.0 on SmolLM2 at 48 tokens.
    for name, role in roles.items():
        assert 0.02 < role["naive_cosine"] < 0.25, name
        assert role["ceiling_cosine"] > 0.8, name
