"""A Grafana dashboard (JSON model, schemaVersion 39) over the series of `METRICS` and the recording rules:
the panels a person opens first, with the config's SLOs and ceilings drawn as thresholds."""

from __future__ import annotations

import json
from typing import Any

from llmopt.config import RunConfig
from llmopt.monitor._rules import METRICS, _pct, error_ratio_expr, quantile_expr

_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel(pid: int, title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int,
           threshold: float | None = None) -> dict[str, Any]:  # fmt: skip
    defaults: dict[str, Any] = {"unit": unit}
    if threshold is not None:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": threshold}],
        }
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": _DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": _DATASOURCE}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(config: RunConfig) -> dict[str, Any]:
    """The dashboard for `config`: latency against the SLOs, throughput, errors, batching, queue, session
    KV cache and node memory, then a "Training" row (per run: loss, tokens/s, memory against its ceiling,
    step, restarts, time since the last step); the thresholds are the config's."""
    m, mon, w = METRICS, config.monitor, "$__rate_interval"
    p = _pct(mon.slo_percentile)
    q = f"{mon.slo_percentile:g}"

    def quantile(metric: str, level: str) -> str:
        return quantile_expr(metric, level, w)

    queued = config.serving.max_queued_requests
    queue_limit = mon.queue_ceiling * queued if queued > 0 else None
    specs = [
        ("Time to first token", [(quantile(m["ttft"], "0.5"), "p50 {{route}}"),
                                 (quantile(m["ttft"], q), f"{p} {{{{route}}}}")], "s", mon.ttft_slo_s),
        ("Time per output token", [(quantile(m["tpot"], "0.5"), "p50 {{route}}"),
                                   (quantile(m["tpot"], q), f"{p} {{{{route}}}}")], "s", mon.tpot_slo_s),
        ("Requests/s by status", [(f"sum by (code) (rate({m['requests']}[{w}]))", "{{code}}")], "reqps",
         None),
        ("Output tokens/s", [(f"sum(rate({m['output_tokens']}[{w}]))", "tokens/s")], "short", None),
        ("5xx share of requests", [(error_ratio_expr(w), "5xx")], "percentunit", mon.error_rate_ceiling),
        ("Batch size (mean per step)", [(f"sum(rate({m['batch_size']}_sum[{w}])) / "
                                         f"sum(rate({m['batch_size']}_count[{w}]))", "mean")], "short", None),
        ("Queue and running", [(f"sum({m['queue']})", "queued"), (f"sum({m['running']})", "running")],
         "short", queue_limit),
        ("Session KV cache", [(f"sum({m['kv_bytes']})", "bytes")], "bytes",
         mon.kv_cache_ceiling * config.serving.kv_cache.budget_mb * 2**20),
        ("Session KV-cache hit rate", [(f"min({m['kv_hit_rate']})", "hit rate")], "percentunit", None),
        ("Node memory", [(f"{m['node_mem_used']} / {m['node_mem_total']}", "{{ip}}")], "percentunit",
         mon.memory_ceiling),
        ("GPU utilisation", [(f"{m['gpu_utilization']} / 100", "{{ip}} GPU {{GpuIndex}}")], "percentunit",
         None),
        ("GPU memory", [(f"{m['gpu_mem_used']} / ({m['gpu_mem_used']} + {m['gpu_mem_available']})",
                         "{{ip}} GPU {{GpuIndex}}")], "percentunit", mon.memory_ceiling),
    ]  # fmt: skip
    panels = [
        _panel(i + 1, title, targets, unit, x=12 * (i % 2), y=8 * (i // 2), threshold=threshold)
        for i, (title, targets, unit, threshold) in enumerate(specs)
    ]
    panels += _training_panels(config, first_id=len(panels) + 1, y=8 * ((len(specs) + 1) // 2))
    return {
        "title": f"llmopt: {config.name}",
        "uid": f"llmopt-{config.name}"[:40],
        "tags": ["llmopt", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
            ]
        },
        "panels": panels,
    }


def _training_panels(config: RunConfig, first_id: int, y: int) -> list[dict[str, Any]]:
    """A "Training" row and its panels, one line per run: loss, tokens/s, peak memory against the ceiling,
    step, worker restarts and the time since the last step (against `monitor.stall_after_s`)."""
    m, mon = METRICS, config.monitor

    def per_run(name: str) -> str:
        return f"max by (run) ({m[name]})"

    specs = [
        ("Training loss", [(per_run("train_loss"), "{{run}}")], "short", None),
        ("Training tokens/s", [(per_run("train_tokens_per_s"), "{{run}}")], "short", None),
        ("Training peak memory and ceiling", [(per_run("train_peak_memory"), "peak {{run}}"),
                                              (per_run("train_memory_ceiling"), "ceiling {{run}}")], "bytes",
         None),
        ("Training step", [(per_run("train_step"), "{{run}}")], "short", None),
        ("Training worker restarts", [(per_run("train_restarts"), "{{run}}")], "short", None),
        ("Seconds since the last training step", [(f"time() - {per_run('train_last_step')}", "{{run}}")],
         "s", mon.stall_after_s),
    ]  # fmt: skip
    row = {
        "id": first_id,
        "type": "row",
        "title": "Training",
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        "panels": [],
    }
    panels = [row]
    for i, (title, targets, unit, threshold) in enumerate(specs):
        x, top = 12 * (i % 2), y + 1 + 8 * (i // 2)
        panels.append(_panel(first_id + 1 + i, title, targets, unit, x=x, y=top, threshold=threshold))
    return panels


def render_dashboard(config: RunConfig) -> str:
    """`dashboard` as the JSON Grafana imports."""
    return json.dumps(dashboard(config), indent=2)
