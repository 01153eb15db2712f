"""The generated rules on a real Prometheus (Debian's package, on loopback) scraping a running llmopt app
through Ray's metrics endpoint: no alert while the app is idle, the TTFT alert firing once requests take
longer than the SLO to their first token."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import yaml

from llmopt.config import load_config
from llmopt.monitor import render_rules
from tests._prometheus import prometheus_binary
from tests._serve import free_port as _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A 1 ms SLO on time to first token: every request of the tiny preset on a CPU breaks it, an idle app cannot.
OVERRIDES = [
    "model.max_seq_len=128",
    "serving.max_new_tokens=8",
    "resources.cpus_per_worker=1",
    "monitor.ttft_slo_s=0.001",
    "monitor.window=1m",
    "monitor.alert_for=0s",
]


@pytest.fixture(scope="module")
def app_url(ray_cluster, repo):
    from ray import serve

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"overrides": OVERRIDES}), name="llm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def prometheus(ray_cluster, tmp_path_factory):
    """Prometheus scraping this node's Ray metrics endpoint every second with the generated rules."""
    binary = prometheus_binary("prometheus")
    node = ray_cluster._private.worker.global_worker.node
    root = tmp_path_factory.mktemp("prometheus")
    (root / "rules.yaml").write_text(render_rules(load_config(None, OVERRIDES)))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(root / "rules.yaml")],
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [{"targets": [f"{node.node_ip_address}:{node.metrics_export_port}"]}],
            }
        ],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (root / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _alerts(prometheus: str) -> dict[str, str]:
    """Alert name -> state (pending or firing) as Prometheus holds them now."""
    body = httpx.get(f"{prometheus}/api/v1/alerts", timeout=5).json()
    return {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}


def test_ttft_alert_fires_when_latency_crosses_the_slo(app_url, prometheus):
    # The target is scraped and the rules load before any request: nothing fires on an idle app.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        if targets and targets[0]["health"] == "up":
            break
        time.sleep(1)
    assert targets and targets[0]["health"] == "up", targets
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
    assert {g["name"] for g in rules} == {
        "llmopt-serving-recording",
        "llmopt-serving",
        "llmopt-training",
        "llmopt-cluster",
    }
    assert "LlmoptTTFTOverSLO" not in _alerts(prometheus)

    body = {"model": "tiny-llama", "prompt": "Hello world", "max_tokens": 8}
    started = time.monotonic()
    fired_after = None
    while time.monotonic() - started < 180:
        response = httpx.post(f"{app_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        if _alerts(prometheus).get("LlmoptTTFTOverSLO") == "firing":
            fired_after = time.monotonic() - started
            break
        time.sleep(1)
    assert fired_after is not None, f"LlmoptTTFTOverSLO never fired; alerts: {_alerts(prometheus)}"
    print(f"LlmoptTTFTOverSLO firing {fired_after:.1f} s after the first request over the SLO")
    # Requests were answered, not failed: the error alert stays quiet.
    assert "LlmoptErrorRateHigh" not in _alerts(prometheus)


def _table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first table rich printed into `text` (box-drawing borders)."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("┃")).split("┃")[1:-1]
    rows = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    return [c.strip() for c in header], [[c.strip() for c in row] for row in rows]


def test_monitor_top_reads_the_apps_replicas_from_rays_endpoint(app_url, ray_cluster):
    """`llmopt monitor top --once` on this node's metrics endpoint alone (no Prometheus): a row per replica,
    with its request rate, first-token latency and batch size."""
    import os

    from llmopt.monitor import METRICS

    node = ray_cluster._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 8}
    for _ in range(3):
        response = httpx.post(f"{app_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    # Ray's agent exposes what the replicas recorded some seconds later (its export interval).
    wanted = (f"{METRICS['ttft']}_bucket{{", f"{METRICS['batch_size']}_bucket{{", f"{METRICS['requests']}{{")
    deadline = time.monotonic() + 60
    while not all(name in httpx.get(url, timeout=5).text for name in wanted):
        assert time.monotonic() < deadline, f"llmopt's series not on {url} after 60 s"
        time.sleep(1)

    out = subprocess.run(
        ["llmopt", "monitor", "top", "--once", "--metrics-url", url, "--interval", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    header, rows = _table_rows(out.stdout)
    assert {"req/s", "tokens/s", "TTFT p50", "TTFT p99", "batch mean/max", "queue", "KV cache"} <= set(header)
    # One model on one replica: the single layout, whose replica both times requests and decodes (the split
    # layout's two rows are in tests/unit/test_monitor_top.py). Replicas of earlier tests' apps on this
    # cluster may be listed too: this app's is the LLMServer row with a first-token latency and a batch size.
    named = [dict(zip(header, row, strict=True)) for row in rows]
    ours = [r for r in named if r["deployment"] == "LLMServer" and r["TTFT p50"] != "-"]
    assert ours, out.stdout
    for server in ours:
        float(server["req/s"].replace(",", ""))  # a rate (0 if the agent exported nothing new this second)
        assert server["TTFT p99"] != "-" and server["TTFT p50"].rstrip("*").endswith(("ms", " s")), out.stdout
        assert server["replica"] != "-" and server["batch mean/max"] != "-", out.stdout
