"""A Serve application on loopback for integration tests: started by the test's fixture, stopped by it."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llm_app(repo: Path, overrides: list[str], name: str = "llm") -> Iterator[str]:
    """``serve_apps.llm`` with ``overrides`` on Serve's HTTP proxy at a free loopback port; yields its URL and
    shuts Serve down afterwards (needs a running Ray: the ``ray_cluster`` fixture)."""
    from ray import serve

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"overrides": overrides}), name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
