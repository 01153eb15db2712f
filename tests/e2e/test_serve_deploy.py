"""The completion server deployed the three ways a user deploys it, each answering HTTP.

`serve deploy serve_apps/configs/llm.yaml`, `llmopt serve --address` and `serve run serve_apps.llm:app`
(in that order: `serve run`'s Ctrl-C shuts Serve down) against one `ray start --head` cluster (the
`head_node` fixture of conftest.py), whose Serve instance this module starts on a free port; then
`llmopt serve` with an embedded cluster of its own. Plus the `llmopt serve` errors that must stop
before any Ray starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from typer.testing import CliRunner

from llmopt.cli import app as cli_app

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "serve_apps" / "configs" / "llm.yaml"
DEMO_CONFIG = "jobs/configs/tiny-llama-reverse.yaml"
BODY = {"prompt": "reverse: 123", "max_tokens": 4, "temperature": 0}


def _run(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start `cmd` with its output in `log`, SIGINT (Ctrl-C) at its default even where this run ignores it.

    A shell's background job (`make test &`) ignores SIGINT, its children too, and Python keeps it ignored.
    """
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _wait_serving(url: str, proc: subprocess.Popen, log: Path, ready: str, timeout: float = 300) -> None:
    """Wait until `proc` logged `ready` and GET url/health answers 200; fail early if `proc` exits.

    The log line matters: the ingress answers /health before `serve run`/`llmopt serve` has returned
    from serve.run, and a signal before then would interrupt the start-up, not the serving.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before serving:\n{log.read_text()[-4000:]}")
        if ready in log.read_text():
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return
        time.sleep(1)
    pytest.fail(f"not serving at {url} within {timeout} s:\n{log.read_text()[-4000:]}")


def _complete(url: str) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
    assert isinstance(body["choices"][0]["text"], str)
    assert 1 <= body["usage"]["completion_tokens"] <= BODY["max_tokens"]
    return body


@pytest.fixture(scope="module")
def serve_port(head_node, free_port):
    """Serve started on the head node, its HTTP proxy on a free port (8000 may be taken)."""
    port = free_port()
    started = _run(
        str(BIN / "serve"),
        "start",
        "--address",
        head_node.gcs,
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(port),
        env=head_node.env,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    return port


def _applications(head_node) -> dict[str, dict]:
    """`serve status`'s applications, by name."""
    done = _run(str(BIN / "serve"), "status", "--address", head_node.dashboard, env=head_node.env)
    assert done.returncode == 0, done.stdout + done.stderr
    return (yaml.safe_load(done.stdout) or {}).get("applications") or {}


@pytest.mark.slow
def test_serve_deploy_of_the_shipped_config(head_node, serve_port, tmp_path):
    config = yaml.safe_load(SHIPPED.read_text())
    config["http_options"]["port"] = serve_port  # the one change: the relative config path stays
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    deploy = [str(BIN / "serve"), "deploy", str(path), "--address", head_node.dashboard]
    done = _run(*deploy, env=head_node.env)
    assert done.returncode == 0, done.stdout + done.stderr

    deadline, status = time.monotonic() + 300, {}
    while time.monotonic() < deadline:
        status = _applications(head_node).get("llm", {})
        assert status.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        if status.get("status") == "RUNNING":
            break
        time.sleep(2)
    assert status.get("status") == "RUNNING", status
    assert "LLMServer" in status["deployments"], status

    url = f"http://127.0.0.1:{serve_port}"
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    _complete(url)
    deployed = _run(str(BIN / "serve"), "config", "--address", head_node.dashboard, env=head_node.env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    app = next(a for a in yaml.safe_load_all(deployed.stdout) if a and a["name"] == "llm")
    server = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert server["user_config"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.0}
    before = httpx.get(f"{url}/api/v1/stats", timeout=30).json()
    assert before["engine"]["max_batch_size"] == 8
    if before["engine"]["decode_kernel"].startswith("native"):  # the shipped config, no adapters: lean step
        assert before["engine"]["decode_path"] == "lean Llama step"
    else:  # no C compiler here: torch's kernels and transformers' forward
        assert before["engine"]["decode_path"].startswith("transformers (not every projection")

    # A new user_config reaches the running replica through reconfigure: same process, new batch size.
    config["applications"][0]["deployments"][0]["user_config"] = {
        "max_batch_size": 3,
        "batch_wait_timeout_s": 0.005,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = _run(*deploy, env=head_node.env)
    assert done.returncode == 0, done.stdout + done.stderr
    deadline, after = time.monotonic() + 120, before
    while time.monotonic() < deadline and after["engine"]["max_batch_size"] != 3:
        time.sleep(1)
        after = httpx.get(f"{url}/api/v1/stats", timeout=30).json()
    assert after["engine"] == {**before["engine"], "max_batch_size": 3, "batch_wait_timeout_s": 0.005}
    assert after["replica"] == before["replica"]
    _complete(url)


@pytest.mark.slow
def test_llmopt_serve_joins_a_cluster_and_deletes_only_its_app(head_node, serve_port, tmp_path):
    before = set(_applications(head_node))  # (a)'s "llm" when the module runs in order
    log = tmp_path / "llmopt-serve-address.log"
    cmd = [
        str(BIN / "llmopt"),
        "serve",
        "--address",
        head_node.gcs,
        "--config",
        DEMO_CONFIG,
        "--port",
        str(serve_port),  # Serve runs already: its proxy keeps its port
        "--name",
        "llm-cli",
        "--route-prefix",
        "/cli",
        "resources.cpus_per_worker=0.5",
    ]
    url = f"http://127.0.0.1:{serve_port}/cli"
    proc = _start(cmd, head_node.env, log)
    try:
        _wait_serving(url, proc, log, "Press Ctrl-C to stop.")
        _complete(url)
        assert set(_applications(head_node)) == before | {"llm-cli"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert set(_applications(head_node)) == before, log.read_text()[-4000:]


@pytest.mark.slow
def test_serve_run_of_the_import_path_until_ctrl_c(head_node, serve_port, tmp_path):
    # `serve run --address` takes what ray.init takes: the GCS address (a ray:// address would go
    # through the Ray client server instead). Another name and route prefix: (a)'s app holds "/".
    log = tmp_path / "serve-run.log"
    cmd = [
        str(BIN / "serve"),
        "run",
        "--address",
        head_node.gcs,
        "--name",
        "llm-run",
        "--route-prefix",
        "/run",
        "serve_apps.llm:app",
        f"config={DEMO_CONFIG}",
        "serving.batching.max_batch_size=2",
        "resources.cpus_per_worker=0.5",  # next to (a)'s replica (1 CPU) on the 2-CPU head node
    ]
    url = f"http://127.0.0.1:{serve_port}/run"
    proc = _start(cmd, head_node.env, log)
    try:
        _wait_serving(url, proc, log, "Application 'llm-run' is ready")
        _complete(url)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # Ray 2.60's `serve run` answers Ctrl-C with serve.shutdown(): every application on the cluster
    # goes, not only its own (a reason `llmopt serve --address` deletes only its own application).
    assert "shutting down" in log.read_text()


def _no_ray_address_env() -> dict[str, str]:
    """This environment without a cluster to join: `llmopt serve` starts its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
@pytest.mark.parametrize("throughput_optimized", [False, True], ids=["python-proxy", "haproxy"])
def test_llmopt_serve_embedded_until_ctrl_c(free_port, tmp_path, throughput_optimized):
    """`llmopt serve` on a cluster of its own, answering until Ctrl-C; then nothing of it is left.

    With --throughput-optimized, Serve's HAProxy (a process of the cluster) takes the port instead of the
    Python proxy and the ingress replica answers it directly: the same API, streams and errors.
    """
    port = free_port()
    log = tmp_path / "llmopt-serve.log"
    cmd = [
        str(BIN / "llmopt"),
        "serve",
        "--config",
        DEMO_CONFIG,
        "--port",
        str(port),
        "--no-dashboard",
        *(["--throughput-optimized"] if throughput_optimized else []),
        "serving.batching.max_batch_size=2",
    ]
    env = _no_ray_address_env()
    if throughput_optimized:  # HAProxy's stats and metrics listeners: free ports, not Ray's fixed defaults
        env |= {
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        }
    url = f"http://127.0.0.1:{port}"
    proc = _start(cmd, env, log)
    cluster: list[psutil.Process] = []
    try:
        _wait_serving(url, proc, log, "Press Ctrl-C to stop.")
        _complete(url)
        # The embedded cluster (GCS, raylet, workers, Serve's actors) is this process's tree.
        cluster = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in cluster)
        listener = next(c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and not c.raddr)
        assert ("haproxy" in psutil.Process(listener).name()) == throughput_optimized
        if throughput_optimized:
            cluster = psutil.Process(proc.pid).children(recursive=True)  # HAProxy included
            with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "stream": True}) as events:
                assert events.headers["content-type"].startswith("text/event-stream")
                lines = [line for line in events.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" and len(lines) >= 2
            missing = httpx.post(f"{url}/v1/completions", json={**BODY, "model": "nope"}, timeout=60)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
        _, alive = psutil.wait_procs(cluster, timeout=30)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in cluster:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
    output = log.read_text()
    assert f"served at {url}/" in output
    assert f"POST   {url}/v1/completions" in output
    assert "stopped." in output


def test_llmopt_serve_throughput_optimized_needs_its_own_cluster(no_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    result = CliRunner().invoke(cli_app, ["serve", "--throughput-optimized", "--app-dir", str(REPO)])
    assert result.exit_code == 2, result.output
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in result.output


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if `llmopt serve` gets as far as starting or joining Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("llmopt.cluster.init_ray", refuse)


def test_llmopt_serve_config_error_exits_2_before_ray(no_ray, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("serving:\n  batching:\n    max_batch_sise: 4\n")
    result = CliRunner().invoke(cli_app, ["serve", "--config", str(bad), "serving.max_new_tokens=0"])
    assert result.exit_code == 2, result.output
    assert "serving.batching.max_batch_sise" in result.output
    assert "serving.max_new_tokens" in result.output


def test_llmopt_serve_unknown_app_exits_2_before_ray(no_ray):
    result = CliRunner().invoke(cli_app, ["serve", "--app", "serve_apps.nope:app", "--app-dir", str(REPO)])
    assert result.exit_code == 2, result.output
    assert "serve_apps.nope:app" in result.output


def test_llmopt_serve_port_in_use_exits_2_before_ray(no_ray, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--port", str(port), "--app-dir", str(REPO)])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert f"127.0.0.1:{port}" in output and "--port" in output
    assert f"held by {psutil.Process().name()} (pid {os.getpid()})" in output  # the holder, by name


def test_llmopt_serve_refuses_gpu_replicas_on_a_cluster_without_gpus(head_node, serve_port):
    """Before Serve starts anything: otherwise replicas would wait forever for a GPU no node has."""
    for override, message in [
        ("resources.gpus_per_worker=1", "asks for GPUs, but the Ray cluster has none"),
        ("resources.cpus_per_worker=64", "resources.cpus_per_worker=64, but the largest node has"),
    ]:
        cmd = [
            "serve",
            "--address",
            head_node.gcs,
            "--config",
            DEMO_CONFIG,
            "--port",
            str(serve_port),
            override,
        ]
        done = _run(str(BIN / "llmopt"), *cmd, env=head_node.env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
