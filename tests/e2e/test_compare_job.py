"""`python -m jobs.benchmark compare`: each server started through its own command line, driven, and stopped
before the next; JSON and PNG written. Only counts are checked, never speed."""

from __future__ import annotations

import json
import sys

import pytest

from tests._serve import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _compare(tmp_path, *extra: str) -> dict:
    from jobs.benchmark import main

    args = ["compare", "--presets", "tiny-llama", "--concurrency", "1", "4", "--prompts", "2"]
    report = main([*args, "--port", str(free_port()), "--out", str(tmp_path), *extra])
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    return report


def test_llmopt_alone_on_both_http_paths_with_its_own_client(tmp_path):
    report = _compare(tmp_path, "--without-vllm")
    assert report["client"] == "llmopt load generator"
    cells = [(r["server"], r["concurrency"], r["completed"], r["failed"]) for r in report["results"]]
    assert cells == [(server, c, 16, 0) for server in ("llmopt", "llmopt-fast") for c in (1, 4)]
    assert all(
        r["output_tokens_per_s"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0 for r in report["results"]
    )


@pytest.mark.vllm
def test_three_servers_with_vllms_client(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed here; `make test-vllm` runs this")
    servers = ("llmopt", "llmopt-vllm", "vllm")
    report = _compare(tmp_path, "--vllm-python", sys.executable, "--servers", *servers)
    assert report["client"] == "vllm bench serve"
    cells = [(r["server"], r["concurrency"], r.get("completed"), r.get("failed")) for r in report["results"]]
    assert cells == [(server, c, 16, 0) for server in servers for c in (1, 4)], report["results"]
    assert all(r["output_tokens_per_s"] > 0 for r in report["results"])
