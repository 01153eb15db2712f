"""Monitoring: the Prometheus names llmopt exports; the alert and recording rules derived from a run config's
SLOs and ceilings (`llmopt monitor rules`) and a Grafana dashboard over them (`llmopt monitor dashboard`);
what `llmopt monitor top` shows without Prometheus (rates and percentiles computed from scrapes of Ray's
metrics endpoints, and a run directory's progress); and the adaptive batching controller each replica runs
(`monitor.adaptive_batching`)."""

from llmopt.monitor._adaptive import BatchSizeChange, BatchSizeController
from llmopt.monitor._dashboard import dashboard, render_dashboard
from llmopt.monitor._rules import METRICS, alert_rules, render_rules
from llmopt.monitor._top import (
    ReplicaRow,
    Scrape,
    Top,
    TopError,
    TrainingView,
    View,
    bucket_delta,
    counter_rate,
    discover_endpoints,
    histogram_quantile,
    parse_exposition,
    read_training,
    render,
    serving_rows,
)

__all__ = [
    "METRICS",
    "BatchSizeChange",
    "BatchSizeController",
    "ReplicaRow",
    "Scrape",
    "Top",
    "TopError",
    "TrainingView",
    "View",
    "alert_rules",
    "bucket_delta",
    "counter_rate",
    "dashboard",
    "discover_endpoints",
    "histogram_quantile",
    "parse_exposition",
    "read_training",
    "render",
    "render_dashboard",
    "render_rules",
    "serving_rows",
]
