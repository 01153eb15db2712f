"""Monitoring: the Prometheus names llmopt exports and the alert and recording rules derived from a run
config's SLOs and ceilings (`llmopt monitor rules`)."""

from llmopt.monitor._rules import METRICS, alert_rules, render_rules

__all__ = ["METRICS", "alert_rules", "render_rules"]
