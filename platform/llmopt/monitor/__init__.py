"""Monitoring: the Prometheus names llmopt exports and the alert and recording rules derived from a run
config's SLOs and ceilings (`llmopt monitor rules`), and a Grafana dashboard over them
(`llmopt monitor dashboard`)."""

from llmopt.monitor._dashboard import dashboard, render_dashboard
from llmopt.monitor._rules import METRICS, alert_rules, render_rules

__all__ = ["METRICS", "alert_rules", "dashboard", "render_dashboard", "render_rules"]
