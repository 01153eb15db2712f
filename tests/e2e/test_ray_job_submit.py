"""`ray job submit` of the fine-tune job against a `ray start --head` cluster of its own.

The cluster is started from this virtual environment with its own ports and temp dir, and stopped by
killing exactly its processes (`ray stop` would stop every Ray cluster on the machine). The job runs
the shipped demo config; its held-out exact match must beat the untrained base model's (0%).
"""

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_processes(temp_dir: str, gcs: str) -> list[psutil.Process]:
    """Every process of the cluster: those naming its temp dir or GCS address, and their descendants.

    Ray renames many of its processes (`ray::IDLE`, `ray::DashboardAgent`), so the tree matters.
    """
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if temp_dir in cmdline or gcs in cmdline:
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({c.pid: c for c in root.children(recursive=True)})
    return list(found.values())


@pytest.fixture(scope="module")
def head_node():
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = [_free_port() for _ in range(7)]
    # Token authentication on, as a real cluster should run, with a token of this test's own. The
    # job's `python` is the first on the cluster's PATH: make it this virtual environment's.
    env = {
        **os.environ,
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
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
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)
    try:
        yield f"http://127.0.0.1:{ports[1]}", env
    finally:
        procs = _cluster_processes(temp_dir, f":{ports[0]}")
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_finetune_job_submitted_to_a_head_node_learns_the_task(head_node, repo, tmp_path):
    out = tmp_path / "runs"
    address, env = head_node
    submit = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(repo),
        "--",
        "python",
        "-m",
        "jobs.finetune",
        "--config",
        "jobs/configs/tiny-llama-reverse.yaml",
        f"output_dir={out}",
    ]
    start = time.time()
    for _ in range(30):  # the job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(submit, capture_output=True, text=True, timeout=900, cwd=repo, env=env)
        log = done.stdout + done.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(3)
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log, log[-2000:]
    runs = list(out.glob("tiny-llama-reverse-*"))
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "finished"
    m = summary["metrics"]
    print(
        f"demo budget: {m['step']} steps in {time.time() - start:.0f} s, held-out exact match "
        f"{m['eval_exact_match']:.1%} (base 0.0%), held-out loss {m['eval_loss']:.3f}"
    )
    assert (
        m["eval_exact_match"] > 0.3
    )  # the untrained base scores 0.0 (tests/integration/test_evaluate_job.py)
    assert (runs[0] / "adapter" / "adapter_model.safetensors").is_file()
    assert (runs[0] / "loss.png").is_file()
