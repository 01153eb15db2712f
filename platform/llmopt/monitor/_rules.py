"""Prometheus recording and alert rules generated from a run config.

The thresholds are the config's (`monitor.*`, `serving.max_queued_requests`, `serving.kv_cache.budget_mb`,
`serving.autoscaling.max_replicas`), written into the expressions as numbers, so the rule file is the
config's SLOs as Prometheus evaluates them. Names are as Ray's metrics agent exports them: every
`ray.util.metrics` series gets a `ray_` prefix; Serve's and the node's own series are Ray's.
"""

from __future__ import annotations

from typing import Any

import yaml

from llmopt.config import RunConfig

# llmopt's series on Ray's metrics endpoint (serve_apps/_metrics.py creates them; Ray adds `ray_`).
METRICS = {
    "requests": "ray_llmopt_requests_total",
    "errors": "ray_llmopt_errors_total",
    "ttft": "ray_llmopt_time_to_first_token_seconds",
    "tpot": "ray_llmopt_time_per_output_token_seconds",
    "output_tokens": "ray_llmopt_output_tokens_total",
    "batch_size": "ray_llmopt_batch_size",
    "queue": "ray_llmopt_queue_length",
    "running": "ray_llmopt_running_requests",
    "kv_bytes": "ray_llmopt_kv_cache_bytes",
    "kv_sessions": "ray_llmopt_kv_cache_sessions",
    "kv_hit_rate": "ray_llmopt_kv_cache_hit_rate",
    "max_batch_size": "ray_llmopt_max_batch_size",
    "batch_size_changes": "ray_llmopt_batch_size_changes_total",
    # Training, per run (llmopt/train/_metrics.py's MetricsSink sets them from every logged step's record).
    "train_step": "ray_llmopt_train_step",
    "train_loss": "ray_llmopt_train_loss",
    "train_tokens_per_s": "ray_llmopt_train_tokens_per_second",
    "train_peak_memory": "ray_llmopt_train_peak_memory_bytes",
    "train_memory_ceiling": "ray_llmopt_train_memory_ceiling_bytes",
    "train_last_step": "ray_llmopt_train_last_step_timestamp_seconds",
    "train_restarts": "ray_llmopt_train_restarts",
    "train_finished": "ray_llmopt_train_finished",
    # Ray's own: Serve's healthy replicas, and the node's memory.
    "replicas": "ray_serve_deployment_replica_healthy",
    "node_mem_used": "ray_node_mem_used",
    "node_mem_total": "ray_node_mem_total",
    # Ray's per-GPU series (tags ip, GpuIndex, GpuDeviceName): utilisation in percent, memory used/free.
    "gpu_utilization": "ray_node_gpus_utilization",
    "gpu_mem_used": "ray_node_gram_used",
    "gpu_mem_available": "ray_node_gram_available",
}


def _pct(q: float) -> str:
    """`0.99` -> `p99`, `0.995` -> `p99_5` (a valid part of a recording rule's name)."""
    return "p" + f"{100 * q:g}".replace(".", "_")


def quantile_expr(metric: str, q: str, window: str) -> str:
    """The `q` quantile of histogram `metric` over `window`, per route (rules and dashboard alike)."""
    return f"histogram_quantile({q}, sum by (le, route) (rate({metric}_bucket[{window}])))"


def error_ratio_expr(window: str) -> str:
    """Share of requests answered with 5xx over `window`; no 5xx at all is 0, not an absent series."""
    return (
        f'(sum(rate({METRICS["errors"]}{{code=~"5.."}}[{window}])) or vector(0)) / '
        f"sum(rate({METRICS['requests']}[{window}]))"
    )


def _alert(name: str, expr: str, for_: str, severity: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, "service": "llmopt"},
        "annotations": {"summary": summary, "description": description},
    }


TRAIN_TOKENS_PER_S = "llmopt:train_tokens_per_second"


def training_rules(config: RunConfig) -> list[dict[str, Any]]:
    """The ``llmopt-training`` group: a recording rule, then the alerts, all per run (the `run` label).

    Every expression takes ``max by (run)`` first, so the other labels Ray puts on a series (the worker,
    the node) may change, as they do when the sink's process changes, without splitting a run in two.
    The recording rule comes first in the group: the alert reads what it recorded in the same evaluation.
    """
    mon, par = config.monitor, config.parallelism
    m, w, for_ = METRICS, mon.window, mon.alert_for

    def per_run(name: str) -> str:
        return f"max by (run) ({m[name]})"

    allowed = (
        "parallelism.max_failures=-1 restarts them without end"
        if par.max_failures < 0
        else f"parallelism.max_failures={par.max_failures} restarts are allowed before the run fails"
    )
    running = f"unless on (run) ({per_run('train_finished')} > 0)"
    return [
        {"record": TRAIN_TOKENS_PER_S, "expr": per_run("train_tokens_per_s")},
        _alert(
            "LlmoptTrainingThroughputDrop",
            f"{TRAIN_TOKENS_PER_S} < {mon.throughput_drop:g} * "
            f"quantile_over_time(0.5, {TRAIN_TOKENS_PER_S}[1h])",
            for_,
            "warning",
            "A training run's tokens/s fell under monitor.throughput_drop of its median over the last hour",
            f"Run {{{{ $labels.run }}}} trains at {{{{ $value | humanize }}}} tokens/s, under "
            f"{mon.throughput_drop:g} of its median over the last hour (monitor.throughput_drop="
            f"{mon.throughput_drop:g}).",
        ),
        _alert(
            "LlmoptTrainingMemoryHigh",
            f"{per_run('train_peak_memory')} > {per_run('train_memory_ceiling')}",
            for_,
            "warning",
            "A training run's peak memory is over monitor.memory_ceiling of its memory budget",
            f"Run {{{{ $labels.run }}}} peaks at {{{{ $value | humanize1024 }}}}B, over "
            f"monitor.memory_ceiling={mon.memory_ceiling:g} of a worker's memory budget; adaptive "
            "checkpointing did not bring it under (or is off): an out-of-memory error may follow.",
        ),
        _alert(
            "LlmoptTrainingStalled",
            f"(time() - {per_run('train_last_step')} > {mon.stall_after_s:g}) {running}",
            "0s",  # the condition is a duration already
            "critical",
            "A training run has logged no step for monitor.stall_after_s",
            f"Run {{{{ $labels.run }}}} logged its last step {{{{ $value | humanizeDuration }}}} ago "
            f"(monitor.stall_after_s={mon.stall_after_s:g}): its workers hang, wait for resources or "
            "restart over and over.",
        ),
        _alert(
            "LlmoptTrainingWorkerRestarts",
            f"min by (run) (min_over_time({m['train_restarts']}[{w}])) < "
            f"max by (run) (max_over_time({m['train_restarts']}[{w}]))",
            "0s",  # true for `window` after each restart
            "warning",
            "A training run's worker group restarted",
            f"Run {{{{ $labels.run }}}}'s workers restarted within {w} (monitor.window={w}); {allowed}.",
        ),
    ]


def alert_rules(config: RunConfig) -> dict[str, Any]:
    """The rule file (``{"groups": [...]}``) for `config`'s SLOs and ceilings.

    Groups: ``llmopt-serving-recording`` (latency percentiles, error ratio, tokens/s), ``llmopt-serving``
    (TTFT/TPOT over SLO, error ratio over its ceiling, queue near ``max_queued_requests``, session KV cache
    near its budget or hit rate under its floor, replicas at ``max_replicas``), ``llmopt-training`` (tokens/s
    per run, recorded; then throughput under ``monitor.throughput_drop`` of its hour's median, peak memory
    over the ``monitor.memory_ceiling`` bytes, no step for ``monitor.stall_after_s``, workers restarted
    within ``monitor.window``) and ``llmopt-cluster`` (a node's memory over ``monitor.memory_ceiling``).
    """
    mon, serving = config.monitor, config.serving
    m, w, for_ = METRICS, mon.window, mon.alert_for
    p = _pct(mon.slo_percentile)
    ttft_rec, tpot_rec = f"llmopt:ttft_seconds:{p}", f"llmopt:tpot_seconds:{p}"
    recording = [
        {"record": ttft_rec, "expr": quantile_expr(m["ttft"], f"{mon.slo_percentile:g}", w)},
        {"record": tpot_rec, "expr": quantile_expr(m["tpot"], f"{mon.slo_percentile:g}", w)},
        {"record": "llmopt:error_ratio", "expr": error_ratio_expr(w)},
        {"record": "llmopt:output_tokens_per_second", "expr": f"sum(rate({m['output_tokens']}[{w}]))"},
    ]
    alerts = [
        _alert(
            "LlmoptTTFTOverSLO",
            f"{ttft_rec} > {mon.ttft_slo_s:g}",
            for_,
            "warning",
            f"Time to first token {p} over its SLO of {mon.ttft_slo_s:g} s",
            f"{p} TTFT on route {{{{ $labels.route }}}} is {{{{ $value | humanizeDuration }}}} over {w} "
            f"(monitor.ttft_slo_s={mon.ttft_slo_s:g}).",
        ),
        _alert(
            "LlmoptTPOTOverSLO",
            f"{tpot_rec} > {mon.tpot_slo_s:g}",
            for_,
            "warning",
            f"Time per output token {p} over its SLO of {mon.tpot_slo_s:g} s",
            f"{p} TPOT on route {{{{ $labels.route }}}} is {{{{ $value | humanizeDuration }}}} over {w} "
            f"(monitor.tpot_slo_s={mon.tpot_slo_s:g}).",
        ),
        _alert(
            "LlmoptErrorRateHigh",
            f"llmopt:error_ratio > {mon.error_rate_ceiling:g}",
            for_,
            "critical",
            "Share of requests answered with HTTP 5xx over its ceiling",
            f"{{{{ $value | humanizePercentage }}}} of requests failed with 5xx over {w} "
            f"(monitor.error_rate_ceiling={mon.error_rate_ceiling:g}).",
        ),
        _alert(
            "LlmoptKVCacheNearBudget",
            f"max({m['kv_bytes']}) > {mon.kv_cache_ceiling * serving.kv_cache.budget_mb * 2**20:.0f}",
            for_,
            "info",
            "Session KV caches near their budget: older sessions are being evicted",
            f"A replica holds {{{{ $value | humanize1024 }}}}B of session caches, over "
            f"{mon.kv_cache_ceiling:g} of serving.kv_cache.budget_mb={serving.kv_cache.budget_mb:g}.",
        ),
        _alert(
            "LlmoptKVHitRateLow",
            f"(min({m['kv_hit_rate']}) < {mon.kv_hit_rate_floor:g}) and on() (sum({m['kv_sessions']}) > 0)",
            for_,
            "info",
            "Session KV-cache hit rate under its floor",
            f"Hit rate {{{{ $value | humanizePercentage }}}} with sessions in use "
            f"(monitor.kv_hit_rate_floor={mon.kv_hit_rate_floor:g}): sessions miss their replica or expire.",
        ),
    ]
    if serving.max_queued_requests > 0:
        limit = mon.queue_ceiling * serving.max_queued_requests
        alerts.append(
            _alert(
                "LlmoptQueueNearLimit",
                f"max({m['queue']}) > {limit:g}",
                for_,
                "warning",
                "Requests queue near serving.max_queued_requests; new ones will get HTTP 503",
                f"A replica queues {{{{ $value }}}} requests, over {mon.queue_ceiling:g} of "
                f"serving.max_queued_requests={serving.max_queued_requests}.",
            )
        )
    scaling = serving.autoscaling
    if scaling.max_replicas > scaling.min_replicas:
        alerts.append(
            _alert(
                "LlmoptReplicasAtMax",
                f'sum({m["replicas"]}{{deployment="LLMServer"}}) >= {scaling.max_replicas}',
                for_,
                "warning",
                "The model deployment runs at serving.autoscaling.max_replicas",
                f"{{{{ $value }}}} healthy LLMServer replicas, the most allowed "
                f"(serving.autoscaling.max_replicas={scaling.max_replicas}); more load queues.",
            )
        )
    training = training_rules(config)
    cluster = [
        _alert(
            "LlmoptNodeMemoryHigh",
            f"{m['node_mem_used']} / {m['node_mem_total']} > {mon.memory_ceiling:g}",
            for_,
            "warning",
            "A Ray node's memory is over monitor.memory_ceiling",
            f"Node {{{{ $labels.ip }}}} uses {{{{ $value | humanizePercentage }}}} of its memory "
            f"(monitor.memory_ceiling={mon.memory_ceiling:g}).",
        ),
        _alert(
            "LlmoptGPUMemoryHigh",
            f"{m['gpu_mem_used']} / ({m['gpu_mem_used']} + {m['gpu_mem_available']}) "
            f"> {mon.memory_ceiling:g}",
            for_,
            "warning",
            "A GPU's memory is over monitor.memory_ceiling",
            f"GPU {{{{ $labels.GpuIndex }}}} of node {{{{ $labels.ip }}}} uses "
            f"{{{{ $value | humanizePercentage }}}} of its memory "
            f"(monitor.memory_ceiling={mon.memory_ceiling:g}).",
        ),
    ]
    return {
        "groups": [
            {"name": "llmopt-serving-recording", "rules": recording},
            {"name": "llmopt-serving", "rules": alerts},
            {"name": "llmopt-training", "rules": training},
            {"name": "llmopt-cluster", "rules": cluster},
        ]
    }


def render_rules(config: RunConfig) -> str:
    """`alert_rules` as the YAML rule file Prometheus loads (`rule_files:`)."""
    return yaml.safe_dump(alert_rules(config), sort_keys=False, width=1000)
