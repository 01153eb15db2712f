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
    """Fail fast, before a local cluster starts, when Serve could not listen on host:port."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _fail(f"cannot listen on {host}:{port} ({exc.strerror}); {fix}", 2) from None


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
        bool, typer.Option(help="Start the Ray dashboard with a local cluster (`serve status` needs it).")
    ] = True,
    throughput_optimized: Annotated[
        bool,
        typer.Option(
            help="Start the local cluster in Ray Serve's high-throughput mode: HAProxy instead of the "
            "Python proxy, ingress replicas listening directly, gRPC between deployments "
            "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1, RAY_SERVE_ENABLE_HA_PROXY=1). A joined cluster keeps the "
            "mode it was started with."
        ),
    ] = False,
) -> None:
    """Serve the config's model over HTTP on Ray Serve until Ctrl-C (the embedded cluster, or --address)."""
    import signal
    import time

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
    for variable, side_port in side_ports.items():
        _check_port_free("0.0.0.0", side_port, f"set {variable} to a free port")
    target = _import_app(app_path, app_dir)
    args = {"config": str(config_file.resolve()) if config_file else None, "overrides": list(overrides or [])}
    application = _build_app(target, args)

    import ray
    from ray import serve

    from llmopt.cluster import check_resources, init_ray

    if not joined:
        # Replicas import the app too; the workers of a local cluster inherit this environment. (A
        # joined cluster must import it already: start it from the repository, or with PYTHONPATH.)
        paths = [str(app_dir.resolve()), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    init_ray(address, **({} if joined else {"include_dashboard": dashboard}))
    try:  # replicas the cluster cannot place would leave Serve waiting for resources forever
        check_resources(config, "serving")
    except ConfigError as exc:
        ray.shutdown()
        raise _fail(str(exc), 2) from None

    def _interrupt(signum, frame):
        raise KeyboardInterrupt  # SIGTERM (docker stop, kill) stops the server as Ctrl-C does

    signal.signal(signal.SIGTERM, _interrupt)
    serve_ran = joined and bool(serve.status().proxies)
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name=name, route_prefix=route_prefix)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            _stop_serve(name, joined, serve_ran)
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
        _stop_serve(name, joined, serve_ran)
    finally:
        ray.shutdown()  # stops the embedded cluster; only disconnects from a joined one
    console.print("stopped.", highlight=False)
