"""`ray job submit` of the fine-tune job against a `ray start --head` cluster of its own.

The cluster (the `head_node` fixture of tests/e2e/conftest.py) is started from this virtual environment
with its own ports and temp dir, and stopped by killing exactly its processes (`ray stop` would stop
every Ray cluster on the machine). The job runs the shipped demo config; its held-out exact match must
beat the untrained base model's (0%).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent


def test_finetune_job_submitted_to_a_head_node_learns_the_task(head_node, repo, tmp_path):
    out = tmp_path / "runs"
    address, env = head_node.dashboard, head_node.env
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
