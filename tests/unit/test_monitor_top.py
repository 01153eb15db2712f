"""`llmopt monitor top`: Prometheus text parsed as Ray exposes it, rates and percentiles between scrapes as
Prometheus computes them, the rendered snapshot, a run directory's progress, and the command's errors."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from llmopt.monitor import (
    METRICS,
    Scrape,
    View,
    bucket_delta,
    counter_rate,
    histogram_quantile,
    parse_exposition,
    read_training,
    render,
    serving_rows,
)
from llmopt.monitor._top import integer_histogram_mean

INF = math.inf

# Labels as Ray's metrics agent writes them (trimmed: it adds SessionName, Version and otel_scope_* too).
_INGRESS = 'Component="core_worker",WorkerId="w1",application="llm",deployment="LLMIngress",replica="ing1"'
_SERVER = 'Component="core_worker",WorkerId="w2",application="llm",deployment="LLMServer",replica="srv1"'
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


def _histogram(name: str, labels: str, cumulative: list[float], bounds=_LATENCY) -> str:
    lines = [f"# TYPE {name} histogram"]
    for le, count in zip([*map(str, map(float, bounds)), "+Inf"], cumulative, strict=True):
        lines.append(f'{name}_bucket{{{labels},le="{le}"}} {count}')
    lines.append(f"{name}_count{{{labels}}} {cumulative[-1]}")
    lines.append(f"{name}_sum{{{labels}}} 0.0")
    return "\n".join(lines)


def exposition(requests_ok: float, requests_500: float, tokens: float, ttft: list[float], batch: list[float],
               queue: float = 2.0, extra: str = "") -> str:  # fmt: skip
    """A node's endpoint with one ingress and one model replica, plus Ray series top must ignore."""
    return "\n".join(
        [
            "# HELP ray_node_mem_used Memory used on the node.",
            "# TYPE ray_node_mem_used gauge",
            'ray_node_mem_used{NodeAddress="10.0.0.1"} 1.5e+09',
            "# TYPE ray_llmopt_requests_total counter",
            f'ray_llmopt_requests_total{{{_INGRESS},code="200",route="completions"}} {requests_ok}',
            f'ray_llmopt_requests_total{{{_INGRESS},code="500",route="chat"}} {requests_500}',
            "# TYPE ray_llmopt_errors_total counter",
            f'ray_llmopt_errors_total{{{_INGRESS},code="500",route="chat"}} {requests_500}',
            "# TYPE ray_llmopt_output_tokens_total counter",
            f'ray_llmopt_output_tokens_total{{{_INGRESS},route="completions"}} {tokens}',
            _histogram("ray_llmopt_time_to_first_token_seconds", f'{_INGRESS},route="completions"', ttft),
            _histogram("ray_llmopt_batch_size", _SERVER, batch, bounds=(1, 2, 4, 8)),
            "# TYPE ray_llmopt_queue_length gauge",
            f"ray_llmopt_queue_length{{{_SERVER}}} {queue}",
            "# TYPE ray_llmopt_kv_cache_bytes gauge",
            f"ray_llmopt_kv_cache_bytes{{{_SERVER}}} {3 * 2**20}",
            "# TYPE ray_llmopt_kv_cache_hit_rate gauge",
            f"ray_llmopt_kv_cache_hit_rate{{{_SERVER}}} 0.75",
            extra,
            "",
        ]
    )


FIRST = exposition(10, 1, 80, [0, 0, 4, 8, 10, 10, 10], [5, 8, 10, 10, 10])
# 10 s later: 20 more requests (2 of them 500s), 160 more tokens, 20 more first tokens and 10 more steps.
SECOND = exposition(28, 3, 240, [0, 0, 4, 18, 28, 30, 30], [5, 8, 20, 20, 20], queue=0.0)
# An idle cluster's node: Ray's own series, none of llmopt's.
IDLE = "# TYPE ray_node_cpu_count gauge\nray_node_cpu_count 2\n"


def _scrape(text: str, at: float) -> Scrape:
    scrape = parse_exposition(text)
    scrape.at = at
    return scrape


def test_exposition_is_summed_per_replica_over_routes_and_codes():
    scrape = parse_exposition(FIRST)
    ingress, server = ("llm", "LLMIngress", "ing1"), ("llm", "LLMServer", "srv1")
    assert scrape.replicas() == [ingress, server]
    assert scrape.values["requests"] == {ingress: 11.0}  # 200s on one route and 500s on another
    assert scrape.values["errors"] == {ingress: 1.0}
    assert scrape.buckets["ttft"][ingress] == dict(
        zip([*_LATENCY, INF], [0, 0, 4, 8, 10, 10, 10], strict=True)
    )
    assert scrape.values["queue"] == {server: 2.0}
    assert scrape.values["kv_bytes"] == {server: 3 * 2**20}
    assert "ray_node_mem_used" not in str(scrape.values)  # Ray's own series are not llmopt's
    # Names are METRICS' names: the counter is exposed under the very name the rules use.
    assert f"{METRICS['requests']}{{" in FIRST


def test_a_counter_exposed_without_total_and_an_idle_endpoint():
    text = f'# TYPE ray_llmopt_requests counter\nray_llmopt_requests{{{_INGRESS},code="200"}} 4\n'
    assert parse_exposition(text).values["requests"] == {("llm", "LLMIngress", "ing1"): 4.0}
    assert parse_exposition(IDLE).replicas() == []
    with pytest.raises(ValueError):
        parse_exposition("ray_llmopt_queue_length{deployment=} x\n")


def test_training_gauges_keep_the_run_series_with_the_latest_step():
    text = (
        "# TYPE ray_llmopt_train_step gauge\n"
        'ray_llmopt_train_step{WorkerId="old",run="r1"} 40\n'
        'ray_llmopt_train_step{WorkerId="new",run="r1"} 60\n'
        "# TYPE ray_llmopt_train_last_step_timestamp_seconds gauge\n"
        'ray_llmopt_train_last_step_timestamp_seconds{WorkerId="old",run="r1"} 1000\n'
        'ray_llmopt_train_last_step_timestamp_seconds{WorkerId="new",run="r1"} 2000\n'
    )
    if "train_step" not in METRICS:
        pytest.skip("no training gauges in METRICS")
    assert parse_exposition(text).runs == {"r1": {"train_step": 60.0, "train_last_step": 2000.0}}


def test_counter_rate():
    assert counter_rate(30, 10, 10) == 2.0
    assert counter_rate(5, 100, 10) == 0.5  # reset: the process restarted and counted 5 since
    assert counter_rate(5, None, 10) is None
    assert counter_rate(None, 5, 10) is None
    assert counter_rate(5, 5, 0) is None


def test_histogram_quantile_interpolates_as_prometheus_does():
    buckets = {0.1: 10, 0.5: 30, 1.0: 40, INF: 40}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * 10 / 20)  # 0.3
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 9.6 / 10)
    assert histogram_quantile(0.5, {0.1: 10, INF: 10}) == pytest.approx(0.05)  # first bucket starts at 0
    assert histogram_quantile(0.99, {0.1: 1, INF: 10}) == 0.1  # in +Inf: the largest finite bound
    assert histogram_quantile(0.5, {0.1: 0, INF: 0}) is None
    assert histogram_quantile(0.5, {0.1: 3, 0.5: 4}) is None  # no +Inf bucket
    assert histogram_quantile(0.5, {}) is None
    # A scrape caught mid-update (a bucket below its predecessor) is evened out, not negative.
    assert histogram_quantile(0.5, {0.1: 10, 0.5: 8, INF: 20}) == pytest.approx(0.1)
    assert histogram_quantile(0.75, {0.1: 10, 0.5: 8, INF: 20}) == 0.5


def test_bucket_delta():
    now, before = {0.1: 5, INF: 9}, {0.1: 2, INF: 4}
    assert bucket_delta(now, before) == {0.1: 3, INF: 5}
    assert bucket_delta(now, None) == now
    assert bucket_delta(before, now) == before  # went down: reset, so what it holds is all new


def test_integer_histogram_mean_of_batch_sizes():
    # Ray's _sum would say 0.5 for batches of 1 (bucket (0, 1] at its midpoint); they are 1.
    assert integer_histogram_mean({1: 10, 2: 10, 4: 10, INF: 10}) == 1.0
    # 10 of 1, 10 of 2, 10 in (2, 4] (3 or 4: 3.5), 10 in (4, 8] (5..8: 6.5)
    assert integer_histogram_mean({1: 10, 2: 20, 4: 30, 8: 40, INF: 40}) == pytest.approx(
        (10 + 20 + 35 + 65) / 40
    )
    assert integer_histogram_mean({1: 0, INF: 0}) is None


def test_rows_take_rates_and_percentiles_over_the_window():
    first, second = _scrape(FIRST, 100.0), _scrape(SECOND, 110.0)
    ingress, server = serving_rows(second, first)
    assert (ingress.deployment, server.deployment) == ("LLMIngress", "LLMServer")
    assert ingress.requests_per_s == pytest.approx(2.0)
    assert ingress.errors_per_s == pytest.approx(0.2)
    assert ingress.tokens_per_s == pytest.approx(16.0)
    # The 20 new first tokens: 10 in (0.025, 0.05], 8 in (0.05, 0.1], 2 in (0.1, 0.25].
    assert ingress.ttft_p50 == pytest.approx(0.05)
    assert ingress.ttft_p99 == pytest.approx(0.1 + 0.15 * 1.8 / 2)
    assert not ingress.since_start
    assert ingress.queue is None and ingress.batch_mean is None  # not the ingress's to record
    assert server.batch_mean == pytest.approx(3.5)  # the 10 new steps all ran 3 or 4 requests
    assert server.queue == 0.0 and server.kv_hit_rate == 0.75
    assert server.requests_per_s is None and server.ttft_p50 is None

    # First scrape: no rates yet, percentiles over everything the replica recorded.
    (ingress,) = [r for r in serving_rows(first, None) if r.deployment == "LLMIngress"]
    assert ingress.requests_per_s is None and ingress.since_start
    assert ingress.ttft_p50 == pytest.approx(0.025 + 0.025 * 1 / 4)  # rank 5 of 10: 1 of 4 in (0.025, 0.05]

    # Nothing new within the window: the lifetime percentiles, marked as such; the rate is 0.
    (ingress, _) = serving_rows(_scrape(SECOND, 120.0), second)
    assert ingress.requests_per_s == 0 and ingress.since_start
    assert ingress.ttft_p50 == histogram_quantile(0.5, second.buckets["ttft"][("llm", "LLMIngress", "ing1")])


def _text(renderable) -> str:
    console = Console(record=True, width=200, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_render_a_snapshot():
    first, second = _scrape(FIRST, 100.0), _scrape(SECOND, 110.0)
    view = View(rows=serving_rows(second, first), endpoints=["http://n1:8080/metrics"], window_s=10.0)
    text = _text(render(view))
    assert "rates over the last 10 s" in text
    ingress = next(line for line in text.splitlines() if "LLMIngress" in line)
    server = next(line for line in text.splitlines() if "LLMServer" in line)
    cells = [c.strip() for c in ingress.split("│")[1:-1]]
    # app, deployment, replica, req/s, err/s, tokens/s, TTFT p50, TTFT p99, TPOT p50, TPOT p99, batch, ...
    assert cells[:9] == ["llm", "LLMIngress", "ing1", "2.00", "0.20", "16.0", "50.0 ms", "235 ms", "-"]
    assert cells[9:] == ["-"] * 6
    cells = [c.strip() for c in server.split("│")[1:-1]]
    assert cells[3:] == ["-"] * 7 + ["3.5 / -", "0", "-", "3.0 MiB", "75.0%"]

    idle = View(endpoints=["http://n1:8080/metrics", "http://n2:8080/metrics"])
    idle.errors = {"http://n2:8080/metrics": "Connection refused"}
    text = _text(render(idle))
    assert "no llmopt series on http://n1:8080/metrics" in text
    assert "cannot read http://n2:8080/metrics: Connection refused" in text


def _record(step: int, **extra) -> dict:
    """A step record as the training loop logs it (platform/llmopt/train/_loop.py)."""
    return {
        "step": step,
        "epoch": 0,
        "loss": 2.0 / step,
        "step_loss": 2.0 / step,
        "lr": 1e-4,
        "tokens_per_s": 1500.0 + step,
        "step_time_s": 0.5 if step < 30 else 2.0,
        "peak_memory_bytes": 700 * 2**20,
        "peak_memory_over_setup_bytes": 200 * 2**20,
        "window_peak_memory_bytes": 650 * 2**20,
        "checkpointed_layers": 0,
        "resumed_from_step": 0,
        "device": "cpu",
        "trainable_parameters": 1000,
        "total_parameters": 100000,
        "world_size": 2,
        "torch_threads": 1,
        "precision": "fp32",
        "memory_ceiling_bytes": 6 * 2**30,
        **extra,
    }


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "tiny-lora-20260101"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name_or_path: tiny-llama\ntraining:\n  max_steps: 100\n")
    lines = [json.dumps(_record(step)) for step in range(10, 50, 10)]  # steps 10..40, logged every 10
    # A worker restart reports step 40 again, and the sink is mid-write of the next line.
    lines += [json.dumps(_record(40, loss=0.04)), '{"step": 50, "loss": 0.0']
    (run / "metrics.jsonl").write_text("\n".join(lines))
    return run


def test_read_training(run_dir):
    mtime = (run_dir / "metrics.jsonl").stat().st_mtime
    view = read_training(run_dir, now=mtime + 7)
    assert (view.step, view.total_steps, view.records) == (40, 100, 4)
    assert view.loss == 0.04 and view.status == "running"
    assert view.step_time_s == pytest.approx((0.5 + 0.5 + 2.0 + 2.0) / 4)
    assert view.eta_s == pytest.approx(60 * view.step_time_s)
    assert view.since_last_record_s == pytest.approx(7)
    text = _text(render(View(training=view)))
    for expected in (
        "step",
        "40 / 100 (40%)",
        "0.0400",
        "1,540",
        "700.0 MiB",
        "ceiling 6.0 GiB",
        "1 min 15 s",
    ):
        assert expected in text

    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert read_training(run_dir).status == "completed" and read_training(run_dir).eta_s == 0


def _llmopt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    command = ["llmopt", "monitor", "top", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_once_on_a_run_directory(run_dir):
    # --run alone follows the run, with no cluster to find and no endpoint to read.
    result = _llmopt("--once", "--run", run_dir.name, "--output-dir", str(run_dir.parent))
    assert result.returncode == 0, result.stderr
    assert f"training: {run_dir.name}" in result.stdout
    assert "40 / 100 (40%)" in result.stdout and "ETA" in result.stdout

    result = _llmopt("--once", "--run", str(run_dir.parent / "nope"))
    assert result.returncode == 1 and "is not a run directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_unreachable_endpoint_is_a_clean_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    url = f"http://127.0.0.1:{port}/metrics"
    result = _llmopt("--once", "--interval", "0.1", "--metrics-url", url)
    assert result.returncode == 1
    assert f"error: cannot read {url}" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


class _Endpoint:
    """A metrics endpoint serving `texts` in turn (the last one from then on), as a node's would."""

    def __init__(self, *texts: str):
        self.texts = list(texts)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = (endpoint.texts.pop(0) if len(endpoint.texts) > 1 else endpoint.texts[0]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_cli_once_on_endpoints():
    busy, idle = _Endpoint(FIRST, SECOND), _Endpoint(IDLE)
    try:
        result = _llmopt("--once", "--interval", "0.5", "--metrics-url", busy.url, "--metrics-url", idle.url)
    finally:
        busy.close()
        idle.close()
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "LLMIngress" in line)
    # 20 requests and 2 errors in the half second (and the time a scrape takes) between the two scrapes.
    requests, errors = (float(c) for c in [c.strip() for c in row.split("│")[1:-1]][3:5])
    assert 30 < requests <= 40 and errors == pytest.approx(requests / 10)
    assert "LLMServer" in result.stdout

    idle = _Endpoint(IDLE)
    try:
        result = _llmopt("--once", "--interval", "0.1", "--metrics-url", idle.url)
    finally:
        idle.close()
    assert result.returncode == 0, result.stderr
    assert f"no llmopt series on {idle.url}" in result.stdout
