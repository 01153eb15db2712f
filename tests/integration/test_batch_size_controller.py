"""Adaptive batching in a live replica: concurrent requests over a TPOT SLO no batch size can meet move
max_batch_size down to its floor, through the same path as a user_config change; every change is in
/api/v1/stats, in the replica's log and counted on Ray's metrics endpoint."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests._serve import llm_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = [
    "model.max_seq_len=128",
    "resources.cpus_per_worker=1",
    "serving.batching.max_batch_size=8",
    "serving.max_queued_requests=-1",
    "monitor.tpot_slo_s=0.000001",  # a microsecond per token: every size breaks it
    "monitor.adaptive_batching.enabled=true",
    "monitor.adaptive_batching.min_batch_size=2",
    "monitor.adaptive_batching.interval_s=0.2",
    "monitor.adaptive_batching.min_requests=2",
]


@pytest.fixture(scope="module")
def app_url(ray_cluster, repo):
    with llm_app(repo, OVERRIDES) as url:
        yield url


async def _load(url: str, requests: int, concurrency: int) -> list[int]:
    semaphore = asyncio.Semaphore(concurrency)
    body = {"model": "tiny-llama", "prompt": "Hello world", "max_tokens": 12, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=120) as client:

        async def one() -> int:
            async with semaphore:
                return (await client.post(f"{url}/v1/completions", json=body)).status_code

        return await asyncio.gather(*(one() for _ in range(requests)))


def _metric_lines(ray_cluster, name: str) -> list[str]:
    node = ray_cluster._private.worker.global_worker.node
    endpoint = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    return [line for line in httpx.get(endpoint, timeout=10).text.splitlines() if line.startswith(name)]


def test_replica_moves_its_batch_size_to_the_floor_over_an_unmeetable_slo(app_url, ray_cluster):
    replica = httpx.get(f"{app_url}/api/v1/stats", timeout=30).json()  # one replica: it answers
    assert replica["adaptive_batching"]["max_batch_size"] == 8
    assert replica["adaptive_batching"]["bounds"] == [2, 8]

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        codes = asyncio.run(_load(app_url, 16, 8))
        assert set(codes) == {200}  # the controller never fails a request
        replica = httpx.get(f"{app_url}/api/v1/stats", timeout=30).json()
        if replica["adaptive_batching"]["max_batch_size"] == 2:
            break
    state = replica["adaptive_batching"]
    assert state["max_batch_size"] == 2, state
    assert replica["engine"]["max_batch_size"] == 2  # applied to @serve.batch and the engine
    changes = state["changes"]
    assert changes and all(c["direction"] == "down" and c["tpot_s"] > c["slo_s"] for c in changes)
    assert [c["old"] for c in changes] == [8, *(c["new"] for c in changes[:-1])]

    # Exported: the size now and the changes by direction, with the replica's Serve tags.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gauge = _metric_lines(ray_cluster, "ray_llmopt_max_batch_size{")
        counted = _metric_lines(ray_cluster, "ray_llmopt_batch_size_changes_total{")
        if gauge and counted and any(line.endswith(" 2.0") for line in gauge):
            break
        time.sleep(1)
    assert any('deployment="LLMServer"' in line and line.endswith(" 2.0") for line in gauge), gauge
    total = sum(float(line.rsplit(" ", 1)[1]) for line in counted if 'direction="down"' in line)
    assert total == len(changes), counted
