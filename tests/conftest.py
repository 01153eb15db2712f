"""Shared fixtures: the repository root and one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Quiet, deterministic test processes; one torch thread each (2-core machines).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_configure(config):
    import torch

    # One thread: with Ray workers (or other jobs) on the same 2 cores, two threads ran 5-10x slower.
    torch.set_num_threads(1)


def pytest_ignore_collect(collection_path, config):
    """The GPU tier (`-m gpu`) collects tests/gpu alone: a GPU host without a package index may lack what the
    CPU tiers' modules import (httpx, openai, cel-python), and their collection errors would fail the run."""
    if config.getoption("markexpr", "") != "gpu":
        return None
    path = Path(collection_path)
    if path.parent == REPO / "tests" and path.is_dir() and path.name != "gpu":
        return True
    return None


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every integration test; stopped when the session ends."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    # The repository is the job's working_dir, as with `ray job submit --working-dir .`.
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", ".venv-vllm", ".git", "outputs", "runs", ".cache"],
    }
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env=runtime_env,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
