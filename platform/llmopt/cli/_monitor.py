"""`llmopt monitor ...`: Prometheus rules and a Grafana dashboard from a run config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._app import Overrides, _load, app

monitor_app = typer.Typer(no_args_is_help=True, help="Alert rules and a dashboard from a config's SLOs.")
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("rules")
def monitor_rules(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config YAML (default: defaults).")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Print Prometheus alert and recording rules for the config's `monitor.*` SLOs and serving limits.

    Load the output with Prometheus's `rule_files:`; check it with `promtool check rules FILE`.
    """
    from llmopt.monitor import render_rules

    print(render_rules(_load(config, overrides)), end="")


@monitor_app.command("dashboard")
def monitor_dashboard(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config YAML (default: defaults).")
    ] = None,
    overrides: Overrides = None,
) -> None:
    """Print a Grafana dashboard (JSON) over llmopt's Prometheus series, the config's SLOs as thresholds.

    Import it in Grafana (Dashboards > Import) and pick the Prometheus data source that scrapes Ray.
    """
    from llmopt.monitor import render_dashboard

    print(render_dashboard(_load(config, overrides)))
