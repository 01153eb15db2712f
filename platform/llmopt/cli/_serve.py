"""`llmopt serve`: the Serve application on the embedded cluster or a joined one, until a stop signal."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmopt.cli._app import (
    Overrides,
    _fail,
    _load,
    app,
    console,
)
from llmopt.config import (
    ConfigError,
)

DEFAULT_APP = "serve_apps.llm:app"


def _import_app(app_path: str, app_dir: Path):
    """The object at `module:attr`, imported at run time as `serve run` does.

    The library must never import `serve_apps` (an import-linter contract keeps `llmopt` below the
    applications built on it), so the application is named by an import path and resolved here with
    Ray's own helper, the one `serve run` uses, after putting `app_dir` first on `sys.path`.
    """
    try:
        from ray._common.utils import import_attr
    except ImportError:  # Ray < 2.47 kept it in ray._private.utils
        from ray._private.utils import import_attr

    sys.path.insert(0, str(app_dir.resolve()))
    try:
        return import_attr(app_path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise _fail(
            f"cannot import --app {app_path!r}: {exc}; give `module:attribute` importable from "
            f"--app-dir {str(app_dir)!r} (or pass --app-dir)",
            2,
        ) from None


def _build_app(target, args: dict):
    """An Application as is, or an application builder called with the `serve run`-style args dict."""
    from ray.serve import Application

    if isinstance(target, Application):
        return target
    if not callable(target):
        raise _fail(f"--app must name a Serve Application or a builder function, got {type(target)}", 2)
    try:
        built = target(args)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if not isinstance(built, Application):
        raise _fail(f"the --app builder returned {type(built).__name__}, not a Serve Application", 2)
    return built


def _endpoints(url: str) -> list[str]:
    """`METHOD /path` of each route the running app documents (FastAPI's /openapi.json), if any."""
    from urllib.error import URLError
    from urllib.request import urlopen

    try:
        with urlopen(f"{url}/openapi.json", timeout=10) as response:
            paths = json.load(response)["paths"]
    except (URLError, OSError, ValueError, KeyError, TypeError):
        return []
    return [f"{method.upper():6} {url}{path}" for path, methods in paths.items() for method in methods]


def _stop_serve(name: str, joined: bool, serve_ran: bool) -> None:
    """Shut Serve down; on a joined cluster, leave Serve as it was found.

    There, if Serve ran before or now runs other applications, only this application is deleted
    (unlike `serve run`, whose Ctrl-C shuts Serve down with every application on the cluster).
    """
    from ray import serve

    if joined and (serve_ran or set(serve.status().applications) - {name}):
        serve.delete(name)
    else:
        serve.shutdown()


def _check_port_free(host: str, port: int, fix: str = "pass a free --port") -> None:
    """Fail fast, before a local cluster starts, when Serve could not listen on host:port; name the holder."""
    from llmopt.processes import port_problem

    problem = port_problem(host, port)
    if problem:
        raise _fail(f"{problem}; {fix}", 2)


@app.command("serve")
def serve_command(
    config_file: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML.")] = None,
    overrides: Overrides = None,
    app_path: Annotated[
        str, typer.Option("--app", help="Serve application or builder, as `module:attribute`.")
    ] = DEFAULT_APP,
    app_dir: Annotated[
        Path, typer.Option(help="Directory put first on sys.path to import --app (as `serve run -d`).")
    ] = Path("."),
    address: Annotated[
        str | None,
        typer.Option(
            help="Join this Ray cluster (`auto`, `host:port`, `ray://...`); default RAY_ADDRESS "
            "or a local cluster started in-process."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="HTTP host the Serve proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port the Serve proxy listens on.")] = 8000,
    name: Annotated[str, typer.Option(help="Serve application name.")] = "llm",
    route_prefix: Annotated[str, typer.Option(help="Route prefix of the application.")] = "/",
    dashboard: Annotated[
        bool,
        typer.Option(
            help="Start the Ray dashboard (127.0.0.1:8265) with a local cluster (`serve status` needs it)."
        ),
    ] = True,
    throughput_optimized: Annotated[
        bool,
        typer.Option(
            help="Start the local cluster in Ray Serve's high-throughput mode: HAProxy instead of the "
            "Python proxy, ingress replicas listening directly, gRPC between deployments "
            "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1). HAProxy's stats page and "
            "Prometheus exporter listen on --host, ports 8404 and 9101 (RAY_SERVE_HAPROXY_STATS_PORT, "
            "RAY_SERVE_HAPROXY_METRICS_PORT). A joined cluster keeps the mode it was started with."
        ),
    ] = False,
) -> None:
    """Serve the config's model over HTTP on Ray Serve until Ctrl-C or SIGTERM (the embedded cluster, or
    --address). Listens on --host:--port only; a busy port fails the start, naming its holder."""
    from llmopt.cluster import use_serve_throughput_mode

    # Every check that can fail runs before Ray starts: config, ports, import path, application builder.
    config = _load(config_file, overrides)
    joined = bool(address or os.environ.get("RAY_ADDRESS"))
    side_ports: dict[str, int] = {}
    if throughput_optimized:
        # Before the app's import below: the driver reads Serve's settings when it imports ray.serve.
        try:
            side_ports = use_serve_throughput_mode(joined)
        except ValueError as exc:
            raise _fail(str(exc), 2) from None
    if not joined:
        _check_port_free(host, port)
    for variable, side_port in side_ports.items():  # HAProxy's stats and metrics, on the HTTP host
        _check_port_free(host, side_port, f"set {variable} to a free port")
    target = _import_app(app_path, app_dir)
    args = {"config": str(config_file.resolve()) if config_file else None, "overrides": list(overrides or [])}
    application = _build_app(target, args)

    from llmopt.cluster import check_resources
    from llmopt.processes import ray_session

    if not joined:
        # Replicas import the app too; the workers of a local cluster inherit this environment. (A
        # joined cluster must import it already: start it from the repository, or with PYTHONPATH.)
        paths = [str(app_dir.resolve()), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    # Any stop (Ctrl-C, SIGTERM to this process or its whole group, a second signal, the embedded cluster
    # dying) ends the command within seconds, with no process of its own left behind (llmopt.processes).
    with ray_session(
        "llmopt serve", address, **({} if joined else {"include_dashboard": dashboard})
    ) as guard:
        try:  # replicas the cluster cannot place would leave Serve waiting for resources forever
            check_resources(config, "serving")
        except ConfigError as exc:
            raise _fail(str(exc), 2) from None
        _serve_until_stopped(guard, application, app_path, config, name, route_prefix, host, port, joined)
    if guard is not None and guard.cluster_died:
        guard.leave(_fail("the Ray cluster stopped underneath the server (its GCS or raylet died)").exit_code)
    console.print("stopped.", highlight=False)
    if guard is not None:
        guard.leave(0)


def _serve_until_stopped(
    guard, application, app_path, config, name, route_prefix, host, port, joined
) -> None:
    """Start Serve and the app, print where it answers, and wait for a stop; then stop Serve, bounded."""
    import time

    from ray import serve

    from llmopt.processes import run_bounded

    def bounded(step, timeout_s: float) -> None:
        if guard is None:  # Ray was running in this process already: its owner handles stops
            run_bounded(step, timeout_s)
        else:
            guard.bounded(step, timeout_s)

    serve_ran = joined and bool(serve.status().proxies)
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name=name, route_prefix=route_prefix)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            bounded(lambda: _stop_serve(name, joined, serve_ran), 6)
            # Ray has logged the whole traceback already: its last line says what went wrong.
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise _fail(f"Serve failed to start or deploy {app_path}: {reason}") from None
        url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
        console.print(f"[bold]{config.model.name_or_path}[/] is served at {url}/", highlight=False)
        for endpoint in _endpoints(url):
            console.print(f"  {endpoint}", highlight=False)
        console.print("Press Ctrl-C to stop.", highlight=False)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("shutting down...", highlight=False)
        # Skipped when the embedded cluster is gone (SIGTERM to the process group reaches Ray's processes
        # first): Serve's shutdown would wait for a controller that no longer answers.
        bounded(lambda: _stop_serve(name, joined, serve_ran), 6)
