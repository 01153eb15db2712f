"""The strategy search as a `ray job` on a two-node cluster: trials at once from the cluster's nodes, each
trial's workers on one node, and `--resume` after the search's driver was killed mid-search.

The cluster is a `ray start --head` node and a second `ray start --address` node on loopback (1 CPU each,
as two small worker pods would be), started from this virtual environment and stopped by killing exactly
their processes.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import join_node, start_head

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
NAME = "tiny-llama-reverse-search"


def _submit(head, repo, args: list[str], *, wait: bool, submission_id: str) -> subprocess.CompletedProcess:
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(repo),
        *([] if wait else ["--no-wait"]),
        "--",
        "python",
        "-m",
        "jobs.tune",
        *args,
    ]
    for _ in range(30):  # the job agent comes up a few seconds after `ray start` returns
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=repo, env=head.env)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            return done
        time.sleep(3)
    return done


def _nodes(head) -> dict[str, bool]:
    """Node id -> alive, from `ray list nodes` against the head."""
    out = subprocess.run(
        [str(BIN / "ray"), "list", "nodes", "--address", head.dashboard, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=head.env,
        check=True,
    ).stdout
    return {n["node_id"]: n["state"] == "ALIVE" for n in json.loads(out)}


def _outcomes(experiment: Path) -> dict[str, dict]:
    found = {}
    for path in experiment.glob("*/outcome.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written
        if record.get("done"):
            found[path.parent.name] = record
    return found


def test_search_on_two_nodes_resumes_after_its_driver_is_killed(repo, tmp_path):
    out = tmp_path / "search"
    experiment = out / "tune" / NAME
    common = [
        "--config",
        "jobs/configs/tiny-llama-reverse.yaml",
        "--space",
        "tune_spaces/strategy.yaml",
        "--trial-tokens",
        "2048",
        "--eval-samples",
        "8",
        "--seeds",
        "0",
        "--no-baseline",
        "--scheduler",
        "fifo",
        "--calibrate",
        "never",
        "--max-concurrent",
        "auto",
        "--out",
        str(out),
    ]
    with start_head(num_cpus=1) as head, join_node(head, num_cpus=1):
        nodes = _nodes(head)
        assert len(nodes) == 2 and all(nodes.values()), nodes
        first = _submit(head, repo, [*common, "--num-samples", "6"], wait=False, submission_id="search-1")
        assert first.returncode == 0, first.stdout + first.stderr
        # Kill the driver (SIGKILL: no clean-up of its own) once some trials finished and before all did.
        deadline = time.time() + 900
        while len(_outcomes(experiment)) < 2 and time.time() < deadline:
            time.sleep(2)
        before = _outcomes(experiment)
        assert len(before) >= 2, "no trial finished in 15 minutes"
        drivers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if "jobs.tune" in " ".join(p.info["cmdline"] or []) and str(out) in " ".join(p.info["cmdline"])
        ]
        assert drivers, "the search's driver process is not running"
        for proc in drivers:
            proc.kill()
        psutil.wait_procs(drivers, timeout=30)
        before = _outcomes(experiment)
        assert len(before) < 6, "every trial finished before the driver was killed"

        again = _submit(
            head,
            repo,
            [*common, "--num-samples", "6", "--resume", str(experiment)],
            wait=True,
            submission_id="search-2",
        )
        log = again.stdout + again.stderr
        (tmp_path / "resume.log").write_text(log)
        assert again.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "concurrent trials: 2 (one CPU trial per node" in log, log[-4000:]
        assert f"resuming the search in {experiment}" in log

        rows = json.loads((out / "trials.json").read_text())
        assert len(rows) == 6, [r.get("status") for r in rows]
        statuses = [(r["status"], r.get("reason")) for r in rows]
        assert all(r["status"] in ("ok", "infeasible", "pruned") for r in rows), statuses
        after = _outcomes(experiment)
        for trial, record in before.items():  # finished before the kill: restored, not run again
            assert after[trial]["seconds"] == record["seconds"], trial
            assert after[trial].get("node_id") == record.get("node_id"), trial
        ran = [r for r in after.values() if r["status"] != "pruned"]
        assert ran, after
        # Two trials at once need both nodes' CPU: trial actors hold none, so they do not crowd one node.
        assert {r["node_id"] for r in ran} == set(nodes), "the trials did not use both nodes"
        print(
            "trials per node:",
            {n[:8]: sum(r["node_id"] == n for r in ran) for n in nodes},
            "statuses:",
            [r["status"] for r in rows],
        )
