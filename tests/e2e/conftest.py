"""A `ray start --head` cluster of a test module's own, as a user runs one, and free ports.

The cluster is started from this virtual environment, from the repository root with the repository on
PYTHONPATH (as serve_apps/configs/llm.yaml asks), with its own ports and temp dir, and stopped by
killing exactly its processes (`ray stop` would stop every Ray cluster on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests._serve import free_port as _free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function returning a port that is free now."""
    return _free_port


@dataclass(frozen=True)
class Head:
    """A running head node: its addresses and the environment every Ray CLI call against it needs."""

    dashboard: str  # http://127.0.0.1:PORT: `ray job submit`, `serve deploy` and `serve status` --address
    gcs: str  # 127.0.0.1:PORT: ray.init / `serve run` --address
    env: dict[str, str] = field(repr=False)  # holds the cluster's token
    temp_dir: str


def _cluster_processes(temp_dir: str, gcs: str) -> list[psutil.Process]:
    """Every process of the cluster: those naming its temp dir or GCS address, and their descendants.

    Ray renames many of its processes (`ray::IDLE`, `ray::DashboardAgent`), so the tree matters.
    """
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if temp_dir in cmdline or gcs in cmdline:
                roots.append(proc)
    found = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in root.children(recursive=True)})
    return [p for p in found.values() if p.pid != os.getpid()]


@contextlib.contextmanager
def start_head(num_cpus: int = 2) -> Iterator[Head]:
    """Start a head node with token authentication and every port explicit; kill its processes after."""
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = [_free_port() for _ in range(7)]
    # Token authentication on, as a real cluster should run, with a token of this test's own. The
    # job's `python` is the first on the cluster's PATH: make it this virtual environment's. Serve
    # applications deployed from a config file are imported by the cluster: the repository is on its
    # PYTHONPATH.
    env = {
        **os.environ,
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    # Every port explicit: the defaults (client server 10001, agent 52365) would collide with any
    # other Ray instance on the machine, such as the test session's own cluster.
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={ports[0]}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports[1]}",
        f"--ray-client-server-port={ports[2]}",
        f"--dashboard-agent-listen-port={ports[3]}",
        f"--dashboard-agent-grpc-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--metrics-export-port={ports[6]}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    gcs = f"127.0.0.1:{ports[0]}"
    try:
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO, timeout=120)
        yield Head(f"http://127.0.0.1:{ports[1]}", gcs, env, temp_dir)
    finally:
        _kill(temp_dir, f":{ports[0]}")


def _kill(temp_dir: str, marker: str) -> None:
    procs = _cluster_processes(temp_dir, marker)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def join_node(head: Head, num_cpus: int = 1) -> Iterator[str]:
    """Start a second node of `head`'s cluster on this machine (`ray start --address`, its own ports and
    temp dir), as a worker pod joins a KubeRay head; yields its temp dir and kills its processes after."""
    temp_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    ports = [_free_port() for _ in range(6)]
    cmd = [
        str(BIN / "ray"),
        "start",
        f"--address={head.gcs}",
        "--node-ip-address=127.0.0.1",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--runtime-env-agent-port={ports[4]}",
        f"--metrics-export-port={ports[5]}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, env=head.env, cwd=REPO, timeout=120)
        yield temp_dir
    finally:
        _kill(temp_dir, temp_dir)


@pytest.fixture(scope="module")
def head_node() -> Iterator[Head]:
    """A head node shared by one test module."""
    with start_head() as head:
        yield head
