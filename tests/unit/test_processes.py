"""Stop handling and listeners (llmopt.processes, llmopt.haproxy) without a Ray cluster.

The whole stop, signals to a command and to its process group with a Ray cluster and HAProxy under it,
is tested end to end in tests/e2e/test_stops.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from llmopt.haproxy import _rewrite_config, loopback_config
from llmopt.processes import port_problem, run_bounded


def _ray_haproxy_config(frontend_host: str) -> str:
    """HAProxy's config as Ray Serve renders it, from its own template and config class."""
    from jinja2 import Environment
    from ray.serve._private.haproxy import HAProxyConfig, _haproxy_fmt_literal
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE
    from ray.serve.config import HTTPOptions

    env = Environment()
    env.filters["haproxy_fmt"] = _haproxy_fmt_literal  # as Ray's HAProxyApi renders it
    config = HAProxyConfig(
        http_options=HTTPOptions(host=frontend_host, port=8000), stats_port=8404, metrics_port=9101
    )
    return env.from_string(HAPROXY_CONFIG_TEMPLATE).render(
        config=config,
        backends=[],
        grpc_backends=[],
        backends_with_health_config=[],
        grpc_backends_with_health_config=[],
        healthz_rules="",
        grpc_healthz_rules="",
        route_info=config.build_health_route_info([]),
    )


def _binds(text: str) -> list[str]:
    return [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]


def test_ray_template_binds_stats_and_metrics_on_every_interface():
    # What the wrapper exists for: if Ray's template ever binds them on the frontend host itself, the
    # rewrite is moot (and this test says so).
    binds = _binds(_ray_haproxy_config("127.0.0.1"))
    assert "*:8404" in binds and ":9101" in binds
    assert "127.0.0.1:8000" in binds


def test_loopback_config_moves_every_listener_to_the_frontend_host():
    rewritten = loopback_config(_ray_haproxy_config("127.0.0.1"))
    binds = _binds(rewritten)
    assert binds and all(bind.startswith("127.0.0.1:") for bind in binds), binds
    assert {"127.0.0.1:8404", "127.0.0.1:9101", "127.0.0.1:8000"} <= set(binds)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_loopback_config_leaves_an_every_interface_server_alone(host):
    text = _ray_haproxy_config(host)
    assert loopback_config(text) == text


def test_rewrite_config_writes_a_copy_and_keeps_ray_s_file(tmp_path):
    original = tmp_path / "haproxy.cfg"
    original.write_text(_ray_haproxy_config("127.0.0.1"))
    before = original.read_text()
    args = _rewrite_config(["-f", str(original), "-db"])
    assert args[0] == "-f" and args[1] == f"{original}.llmopt" and args[2] == "-db"
    assert original.read_text() == before  # Ray rewrites its own file on reloads
    assert "*:8404" not in (tmp_path / "haproxy.cfg.llmopt").read_text()
    assert _rewrite_config(["-v"]) == ["-v"]


def test_port_problem_names_the_holder():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        problem = port_problem("127.0.0.1", port)
        assert problem is not None
        assert f"127.0.0.1:{port}" in problem
        assert f"pid {os.getpid()}" in problem  # the holder is this test's process
    assert port_problem("127.0.0.1", port) is None


def test_run_bounded_gives_up_on_a_stuck_call_and_on_a_useless_one():
    assert run_bounded(lambda: None, 5)
    assert run_bounded(lambda: 1 / 0, 5)  # a failing step has ended too
    started = time.monotonic()
    assert not run_bounded(lambda: time.sleep(30), 0.5)
    assert not run_bounded(lambda: time.sleep(30), 30, still_useful=lambda: False)
    assert time.monotonic() - started < 10


def test_kill_descendants_takes_grandchildren_and_stubborn_ones():
    # In a process of its own: kill_descendants stops every descendant of its caller, and this test's
    # process may own others (a Ray cluster of the session). The tree: a child that ignores SIGTERM with a
    # child of its own, as a raylet with its workers.
    script = textwrap.dedent(
        """
        import json, subprocess, sys, time
        import psutil
        from llmopt.processes import kill_descendants
        stubborn = (
            "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
        )
        subprocess.Popen([sys.executable, "-c", stubborn])
        deadline = time.monotonic() + 30
        while len(psutil.Process().children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = psutil.Process().children(recursive=True)
        stopped = kill_descendants(timeout_s=0.5)
        gone, alive = psutil.wait_procs(tree, timeout=5)
        left = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        print(json.dumps({"tree": len(tree), "stopped": len(stopped), "left": left}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["tree"] == 2
    assert report["stopped"] >= 2
    assert report["left"] == []


def test_the_reaper_ends_a_dead_command_s_tree_and_its_ray_session(tmp_path):
    """As when Ray's core worker exits the command at once: its children, and processes of its Ray session
    that are not its descendants (workers a raylet started), are stopped; another session's are not."""
    session = tmp_path / "session_2026-12-05_1"
    sleeper = [sys.executable, "-c", "import sys, time; time.sleep(120)"]
    decoy = subprocess.Popen([*sleeper, f"{session}0/sockets/raylet"])  # another session: _10
    outsider = subprocess.Popen([*sleeper, f"--store={session}/sockets/plasma_store"])
    # A renamed Ray worker: the session is not in its command line, only in where its output goes.
    (session / "logs").mkdir(parents=True)
    with (session / "logs" / "worker-1.out").open("w") as worker_log:
        worker = subprocess.Popen(sleeper, stdout=worker_log)
    command = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        child = subprocess.Popen({sleeper!r})
        subprocess.Popen([sys.executable, "-m", "llmopt.processes", str(os.getpid()), {str(session)!r}])
        print(child.pid, flush=True)
        time.sleep(2)  # the reaper takes its first look at the tree
        os._exit(1)
        """
    )
    try:
        out = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=60)
        child = int(out.stdout.split()[0])
        assert outsider.wait(timeout=30) == -signal.SIGTERM
        assert worker.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.2)
        assert not _alive(child)
        assert decoy.poll() is None  # a session whose name merely starts the same is not ours
    finally:
        for proc in (decoy, outsider, worker):
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False
