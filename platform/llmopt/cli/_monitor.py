"""`llmopt monitor ...`: Prometheus rules and a Grafana dashboard from a run config, and a live terminal
view of serving and training that needs no Prometheus."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._app import Overrides, _fail, _load, app, console

monitor_app = typer.Typer(
    no_args_is_help=True,
    help="Alert rules and a dashboard from a config's SLOs; a live view of serving and training (top).",
)
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


@monitor_app.command("top")
def monitor_top(
    metrics_url: Annotated[
        list[str] | None,
        typer.Option(
            "--metrics-url",
            help="A node's Ray metrics endpoint, http://HOST:PORT/metrics (repeat for several nodes), or "
            "`auto`: every alive node of the running Ray cluster. Default: auto, unless --run is given.",
        ),
    ] = None,
    run: Annotated[
        str | None,
        typer.Option(
            "--run", help="A training run to follow: its directory, or its name under --output-dir."
        ),
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where run directories live.")] = Path("runs"),
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes (scrapes).")] = 2.0,
    window: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="Seconds that rates and percentiles are over. Ray updates its endpoint about every 10 s, "
            "so a shorter window reads 0 and then a spike.",
        ),
    ] = 30.0,
    once: Annotated[
        bool, typer.Option("--once", help="Print one snapshot (two scrapes --interval apart) and exit.")
    ] = False,
) -> None:
    """A live view of serving and training, read from Ray's metrics endpoints and a run directory.

    Serving, per replica: requests/s, errors/s, tokens/s, TTFT and TPOT p50/p99, batch size, queue, KV cache.

    Training (--run): step, loss, tokens/s, memory, ETA and the time since the last record. Ctrl-C quits.
    """
    import time

    from rich.console import Console

    from llmopt.monitor import Top, TopError, discover_endpoints, render

    urls = list(metrics_url or ([] if run else ["auto"]))
    run_dir = None if run is None else (Path(run) if Path(run).is_dir() else output_dir / run)
    # Piped (a snapshot into a file or a test) rich assumes 80 columns and would fold the table's headers.
    out = console if console.is_terminal or "COLUMNS" in os.environ else Console(width=180)
    try:
        if "auto" in urls:
            urls = [u for u in urls if u != "auto"] + discover_endpoints()
        top = Top(urls, run_dir, window_s=interval if once else max(window, interval))
        view = top.refresh()
        if urls and len(view.errors) == len(urls) and run_dir is None:
            raise TopError("; ".join(f"cannot read {u}: {why}" for u, why in view.errors.items()))
        if once:
            if urls:
                time.sleep(interval)
                view = top.refresh()
            out.print(render(view))
            return
    except TopError as exc:
        raise _fail(str(exc)) from None

    from rich.live import Live

    with Live(render(view), console=out, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    live.update(render(top.refresh()), refresh=True)
                except TopError as exc:  # the run directory went away: say so and keep watching
                    from rich.text import Text

                    live.update(Text(f"error: {exc}", style="red"), refresh=True)
        except KeyboardInterrupt:
            pass
