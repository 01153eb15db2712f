"""Fault injection shared by the CPU and GPU fine-tuning tiers: kill a Ray Train worker mid-run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil


def checkpoint_registered(run_dir: Path) -> bool:
    """Whether Ray Train's controller has registered a checkpoint of this run.

    A worker's checkpointed report reaches the controller at its next poll, so a kill right after the report
    loses it and the run restarts from step 0; the killer waits for the controller's snapshot to name a
    checkpoint first.
    """
    snapshot = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "step-0000" in snapshot.read_text()


def kill_train_worker_at(run_root: Path, step: int, killed: list[int], timeout_s: float = 300) -> None:
    """SIGKILL one RayTrainWorker process once a run under `run_root` has reported `step` and a checkpoint
    is kept; the killed pid goes into `killed` (empty when the run ended first)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and not killed:
        for metrics in run_root.glob("*/metrics.jsonl"):
            lines = metrics.read_text().splitlines()
            if checkpoint_registered(metrics.parent) and any(
                json.loads(line)["step"] >= step for line in lines if line
            ):
                for proc in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.pid)
                        return
        time.sleep(0.05)
