"""Prometheus rules from a run config, checked by Prometheus's own `promtool` (Debian's `prometheus`)."""

import subprocess

import pytest
import yaml

from llmopt.config import load_config
from llmopt.monitor import alert_rules, render_rules
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
    assert len(ids) == len(set(ids)) >= 10
    exprs = []
    for panel in board["panels"]:
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
