"""Prometheus rules from a run config, checked by Prometheus's own `promtool` (Debian's `prometheus`)."""

import subprocess

import pytest
import yaml

from llmopt.config import load_config
from llmopt.monitor import METRICS, alert_rules, render_rules
from tests._prometheus import prometheus_binary


@pytest.fixture(scope="module")
def promtool():
    return prometheus_binary("promtool")


def _rules(*overrides):
    return alert_rules(load_config(None, list(overrides)))


def _by_name(rules):
    return {r.get("alert") or r["record"]: r for g in rules["groups"] for r in g["rules"]}


def test_thresholds_come_from_the_config():
    rules = _by_name(
        _rules(
            "monitor.tpot_slo_s=0.05",
            "monitor.slo_percentile=0.95",
            "serving.max_queued_requests=100",
            "serving.autoscaling.max_replicas=3",
        )
    )
    assert rules["LlmoptTPOTOverSLO"]["expr"] == "llmopt:tpot_seconds:p95 > 0.05"
    assert "histogram_quantile(0.95," in rules["llmopt:tpot_seconds:p95"]["expr"]
    assert rules["LlmoptQueueNearLimit"]["expr"].endswith("> 80")
    assert rules["LlmoptReplicasAtMax"]["expr"].endswith(">= 3")
    # No queue bound, no fixed scale-out bound: no alert that could never mean anything.
    fixed = _by_name(_rules("serving.max_queued_requests=-1"))
    assert "LlmoptQueueNearLimit" not in fixed and "LlmoptReplicasAtMax" not in fixed


def test_training_thresholds_come_from_the_config():
    rules = _rules("monitor.throughput_drop=0.3", "monitor.stall_after_s=120", "monitor.window=10m")
    assert [g["name"] for g in rules["groups"]] == [
        "llmopt-serving-recording",
        "llmopt-serving",
        "llmopt-training",
        "llmopt-cluster",
    ]
    training = next(g for g in rules["groups"] if g["name"] == "llmopt-training")["rules"]
    assert training[0] == {
        "record": "llmopt:train_tokens_per_second",
        "expr": "max by (run) (ray_llmopt_train_tokens_per_second)",
    }
    by_name = _by_name(rules)
    assert by_name["LlmoptTrainingThroughputDrop"]["expr"] == (
        "llmopt:train_tokens_per_second < 0.3 * quantile_over_time(0.5, llmopt:train_tokens_per_second[1h])"
    )
    assert "> 120)" in by_name["LlmoptTrainingStalled"]["expr"]
    assert "ray_llmopt_train_restarts[10m]" in by_name["LlmoptTrainingWorkerRestarts"]["expr"]
    assert by_name["LlmoptTrainingMemoryHigh"]["expr"] == (
        "max by (run) (ray_llmopt_train_peak_memory_bytes) > "
        "max by (run) (ray_llmopt_train_memory_ceiling_bytes)"
    )
    # Each description names the config field its threshold comes from.
    for name, field in [
        ("LlmoptTrainingThroughputDrop", "monitor.throughput_drop=0.3"),
        ("LlmoptTrainingStalled", "monitor.stall_after_s=120"),
        ("LlmoptTrainingMemoryHigh", "monitor.memory_ceiling=0.9"),
        ("LlmoptTrainingWorkerRestarts", "monitor.window=10m"),
    ]:
        assert field in by_name[name]["annotations"]["description"], name


def test_cli_prints_rules_promtool_accepts(promtool, tmp_path):
    out = subprocess.run(
        ["llmopt", "monitor", "rules", "serving.autoscaling.max_replicas=2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert yaml.safe_load(out) == _rules("serving.autoscaling.max_replicas=2")
    path = tmp_path / "rules.yaml"
    path.write_text(out)
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    count = sum(len(g["rules"]) for g in yaml.safe_load(out)["groups"])
    assert f"SUCCESS: {count} rules found" in check.stdout


def _tpot_series(share_slow: int, slow_le: str) -> list[dict]:
    """TPOT histogram series: 10 observations a minute, `share_slow` of them in the bucket up to `slow_le`
    and the rest under 0.05 s."""
    route = 'route="/v1/chat/completions"'
    name = "ray_llmopt_time_per_output_token_seconds_bucket"
    return [
        {"series": f'{name}{{{route},le="0.05"}}', "values": f"0+{10 - share_slow}x20"},
        {"series": f'{name}{{{route},le="{slow_le}"}}', "values": "0+10x20"},
        {"series": f'{name}{{{route},le="+Inf"}}', "values": "0+10x20"},
    ]


def _firing(alert: str, labels: str = "") -> str:
    return f'ALERTS{{alertname="{alert}",alertstate="firing"{labels}}}'


@pytest.mark.parametrize("slow", [True, False], ids=["over-slo-fires", "under-slo-silent"])
def test_promtool_unit_tests_the_tpot_and_error_alerts(promtool, tmp_path, slow):
    (tmp_path / "rules.yaml").write_text(render_rules(load_config(None, ["monitor.tpot_slo_s=0.2"])))
    fired = [
        {
            "labels": _firing(
                "LlmoptTPOTOverSLO",
                ',route="/v1/chat/completions",severity="warning",service="llmopt"',
            ),
            "value": 1,
        }
    ]
    errors = "0+2x20" if slow else "0+0x20"  # 2 of 10 requests a minute answered 503
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # 2 of 10 slow are over the p99 either way; their bucket decides the SLO.
                    *_tpot_series(2, "0.5" if slow else "0.1"),
                    {
                        "series": 'ray_llmopt_requests_total{route="/v1/completions",code="200"}',
                        "values": "0+8x20",
                    },
                    {
                        "series": 'ray_llmopt_requests_total{route="/v1/completions",code="503"}',
                        "values": errors,
                    },
                    {
                        "series": 'ray_llmopt_errors_total{route="/v1/completions",code="503"}',
                        "values": errors,
                    },
                ],
                "promql_expr_test": [
                    # 2 minutes in the condition holds but `for: 2m` has not passed yet.
                    {"expr": _firing("LlmoptTPOTOverSLO"), "eval_time": "2m", "exp_samples": []},
                    {
                        "expr": _firing("LlmoptTPOTOverSLO"),
                        "eval_time": "10m",
                        "exp_samples": fired if slow else [],
                    },
                    {
                        "expr": _firing("LlmoptErrorRateHigh"),
                        "eval_time": "10m",
                        "exp_samples": [
                            {
                                "labels": _firing(
                                    "LlmoptErrorRateHigh", ',severity="critical",service="llmopt"'
                                ),
                                "value": 1,
                            }
                        ]
                        if slow
                        else [],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _promtool_test(promtool, tmp_path, overrides: list[str], series: list[dict], expr_tests: list[dict]):
    """Run `promtool test rules` on the rules of `overrides` with `series` (1-minute samples)."""
    (tmp_path / "rules.yaml").write_text(render_rules(load_config(None, overrides)))
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": expr_tests}],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(
        [promtool, "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Ray's own labels on the sink's series; the rules aggregate them away (`max by (run)`).
_RAY = 'Component="core_worker",WorkerId="w1"'


def _expect(alert: str, severity: str, eval_time: str, fires: bool) -> dict:
    labels = _firing(alert, f',run="r",severity="{severity}",service="llmopt"')
    return {
        "expr": _firing(alert),
        "eval_time": eval_time,
        "exp_samples": [{"labels": labels, "value": 1}] if fires else [],
    }


@pytest.mark.parametrize("fires", [True, False], ids=["drop-fires", "steady-silent"])
def test_promtool_training_throughput_drop(promtool, tmp_path, fires):
    # An hour at 1000 tokens/s, then 400 (under 0.5 of the median) or 600 (over it) from minute 61.
    after = "400x10" if fires else "600x10"
    series = [
        {"series": f'ray_llmopt_train_tokens_per_second{{{_RAY},run="r"}}', "values": f"1000x60 {after}"}
    ]
    checks = [
        {
            "expr": "llmopt:train_tokens_per_second",
            "eval_time": "30m",
            "exp_samples": [{"labels": 'llmopt:train_tokens_per_second{run="r"}', "value": 1000}],
        },
        _expect("LlmoptTrainingThroughputDrop", "warning", "62m", False),  # `for: 2m` not over yet
        _expect("LlmoptTrainingThroughputDrop", "warning", "65m", fires),
    ]
    _promtool_test(promtool, tmp_path, [], series, checks)


@pytest.mark.parametrize("fires", [True, False], ids=["over-ceiling-fires", "under-ceiling-silent"])
def test_promtool_training_memory_high(promtool, tmp_path, fires):
    peak = "5000000000x10" if fires else "3000000000x10"
    series = [
        {"series": f'ray_llmopt_train_peak_memory_bytes{{{_RAY},run="r"}}', "values": peak},
        {"series": f'ray_llmopt_train_memory_ceiling_bytes{{{_RAY},run="r"}}', "values": "4000000000x10"},
        # Another run, far under its own ceiling: the comparison is per run.
        {"series": 'ray_llmopt_train_peak_memory_bytes{run="other"}', "values": "1000x10"},
        {"series": 'ray_llmopt_train_memory_ceiling_bytes{run="other"}', "values": "2000000000x10"},
    ]
    checks = [_expect("LlmoptTrainingMemoryHigh", "warning", "10m", fires)]
    _promtool_test(promtool, tmp_path, [], series, checks)


@pytest.mark.parametrize("fires", [True, False], ids=["over-ceiling-fires", "under-ceiling-silent"])
def test_promtool_gpu_memory_high(promtool, tmp_path, fires):
    # Ray's per-GPU gauges as its reporter agent writes them (GPU memory in MiB: only the ratio matters).
    gpu = 'ip="10.0.0.1",GpuIndex="0",GpuDeviceName="NVIDIA H100 80GB HBM3"'
    used = "76000x10" if fires else "40000x10"
    series = [
        {"series": f"ray_node_gram_used{{{gpu}}}", "values": used},
        {"series": f"ray_node_gram_available{{{gpu}}}", "values": f"{80000 - int(used.split('x')[0])}x10"},
    ]
    labels = _firing("LlmoptGPUMemoryHigh", f',{gpu},severity="warning",service="llmopt"')
    checks = [
        {
            "expr": _firing("LlmoptGPUMemoryHigh"),
            "eval_time": "5m",
            "exp_samples": [{"labels": labels, "value": 1}] if fires else [],
        }
    ]
    _promtool_test(promtool, tmp_path, [], series, checks)


@pytest.mark.parametrize("case", ["stalled-fires", "progressing-silent", "finished-silent"])
def test_promtool_training_stalled(promtool, tmp_path, case):
    # The gauge holds the unix time of the last step; promtool's time() is the evaluation time (0 at the
    # start), so a sample's value equal to its own time is a step logged just now.
    stamps = "0+60x20" if case == "progressing-silent" else "0+60x5 300x15"  # steps stop at 5 min
    series = [{"series": f'ray_llmopt_train_last_step_timestamp_seconds{{{_RAY},run="r"}}', "values": stamps}]
    finished = "0x5 1x15" if case == "finished-silent" else "0x20"
    series.append({"series": f'ray_llmopt_train_finished{{{_RAY},run="r"}}', "values": finished})
    checks = [
        _expect("LlmoptTrainingStalled", "critical", "14m", False),  # 540 s since the last step
        _expect("LlmoptTrainingStalled", "critical", "16m", case == "stalled-fires"),  # 660 s > 600
    ]
    _promtool_test(promtool, tmp_path, [], series, checks)


@pytest.mark.parametrize("case", ["same-series-fires", "new-series-fires", "no-restart-silent"])
def test_promtool_training_worker_restarts(promtool, tmp_path, case):
    name = "ray_llmopt_train_restarts"
    if case == "same-series-fires":
        series = [{"series": f'{name}{{{_RAY},run="r"}}', "values": "0x10 1x10"}]  # a restart at 11 min
    elif case == "new-series-fires":  # the count comes back under other Ray labels (another process)
        series = [
            {"series": f'{name}{{Component="core_worker",WorkerId="w1",run="r"}}', "values": "0x10"},
            {"series": f'{name}{{Component="core_worker",WorkerId="w2",run="r"}}', "values": "_x11 1x10"},
        ]
    else:
        series = [{"series": f'{name}{{{_RAY},run="r"}}', "values": "0x20"}]
    fires = case != "no-restart-silent"
    checks = [
        _expect("LlmoptTrainingWorkerRestarts", "warning", "10m", False),
        _expect("LlmoptTrainingWorkerRestarts", "warning", "13m", fires),  # within monitor.window=5m
        _expect("LlmoptTrainingWorkerRestarts", "warning", "20m", False),  # the window has passed
    ]
    _promtool_test(promtool, tmp_path, [], series, checks)


def test_dashboard_is_a_grafana_model_with_valid_promql(promtool, tmp_path):
    """The dashboard's structure (what Grafana's import needs) and every panel query parsed by Prometheus's
    own PromQL parser (each written as a recording rule for `promtool check rules`)."""
    import json

    from llmopt.monitor import dashboard

    out = subprocess.run(
        ["llmopt", "monitor", "dashboard", "monitor.tpot_slo_s=0.05"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    board = json.loads(out)
    assert board == dashboard(load_config(None, ["monitor.tpot_slo_s=0.05"]))
    assert isinstance(board["schemaVersion"], int) and board["title"] and board["uid"]
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) >= 17
    rows = [panel for panel in board["panels"] if panel["type"] == "row"]
    assert [row["title"] for row in rows] == ["Training"] and rows[0]["gridPos"]["w"] == 24
    exprs = []
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["type"] == "timeseries" and panel["title"]
        assert (
            set(panel["gridPos"]) == {"h", "w", "x", "y"}
            and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        )
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        exprs += [t["expr"] for t in panel["targets"]]
    tpot = next(p for p in board["panels"] if p["title"] == "Time per output token")
    assert tpot["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 0.05  # the config's SLO
    training = [
        p
        for p in board["panels"]
        if p["type"] == "timeseries" and p["title"].startswith(("Training", "Seconds"))
    ]
    training_exprs = " ".join(t["expr"] for p in training for t in p["targets"])
    for name in (
        "train_loss",
        "train_tokens_per_s",
        "train_peak_memory",
        "train_memory_ceiling",
        "train_step",
        "train_restarts",
        "train_last_step",
    ):
        assert METRICS[name] in training_exprs, name
    assert all(p["gridPos"]["y"] > rows[0]["gridPos"]["y"] for p in training)  # under the row
    stall = next(p for p in training if p["title"] == "Seconds since the last training step")
    assert stall["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 600  # monitor.stall_after_s
    # Grafana's $__rate_interval is not PromQL; Prometheus sees a concrete range in its place.
    records = [
        {"record": f"dashboard:panel_{i}", "expr": e.replace("$__rate_interval", "1m")}
        for i, e in enumerate(exprs)
    ]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
