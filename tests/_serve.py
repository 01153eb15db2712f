"""A Serve application on loopback for integration tests: started by the test's fixture, stopped by it."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suites that run against a live app run once per engine behind it: llmopt's own, and vLLM's (its
# `vllm` marker selects it in `make test-vllm`, whose venv has vLLM; elsewhere it is skipped).
ENGINES = [pytest.param("native", id="native"), pytest.param("vllm", id="vllm", marks=pytest.mark.vllm)]
# vLLM's CPU backend caches prefixes in whole blocks, of 128 tokens unless told: the tests' first turns are
# 30-60 tokens, so they take the smallest blocks its attention accepts (a multiple of 32).
VLLM_BLOCK = 32


def engine_overrides(engine: str) -> list[str]:
    """The overrides that put ``engine`` behind the app (skips the test where vLLM does not import)."""
    if engine == "native":
        return ["serving.engine=native"]
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs this")
    return ["serving.engine=vllm", f"serving.vllm_engine_kwargs.block_size={VLLM_BLOCK}"]


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_on_loopback(repo: Path) -> Iterator[None]:
    """Serve started on a free loopback port, the repository importable by its replicas' code; shut down
    afterwards (needs a running Ray: the ``ray_cluster`` fixture)."""
    from ray import serve

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield
    finally:
        serve.shutdown()


@contextlib.contextmanager
def llm_app(repo: Path, overrides: list[str], name: str = "llm") -> Iterator[str]:
    """``serve_apps.llm`` with ``overrides`` on Serve's HTTP proxy at a free loopback port; yields its URL and
    shuts Serve down afterwards (needs a running Ray: the ``ray_cluster`` fixture)."""
    from ray import serve

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"overrides": overrides}), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
