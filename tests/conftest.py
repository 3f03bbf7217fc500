"""Shared fixtures: one local Ray instance per test session, the tiny random-weight model, SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray stays on this machine and quiet in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance with fixed resources, shared by every test that needs Ray; shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 1024**2, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny():
    """A fresh random-weight 2-layer Llama (seeded) and its byte tokenizer."""
    from r2f_ray.assets import tiny_llama

    torch.manual_seed(0)
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def smollm2_path():
    """The packaged SmolLM2-135M-Instruct, converted into the cache on first use."""
    from r2f_ray.assets import ensure_default_model

    return ensure_default_model()


@pytest.fixture
def smollm2(smollm2_path):
    """A fresh copy of SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer."""
    from r2f_ray.assets import load_default_model

    loaded = load_default_model()
    return loaded.model, loaded.tokenizer
