"""Adaptive checkpointing: a fine-tune that peaks over `monitor.memory_ceiling` switches to denser gradient
checkpointing instead of dying, on the session's local cluster.

The ceiling is 1% of the machine's memory, below what any worker process holds, so every step is over
it. Sequences of 512 tokens, packed, make the saved activations (~300 MiB per micro-batch without
checkpointing) stand out from the rest of a worker's resident memory, so the peaks can show the switch.
"""

import json
import threading

import pytest

from llmopt.config import load_config
from llmopt.train import finetune, read_metrics
from tests._faults import kill_train_worker_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = [
    "model.max_seq_len=512",
    "data.packing=true",
    "lora.r=8",
    "parallelism.num_workers=2",
    "parallelism.zero_stage=2",
    "checkpointing.policy=none",
    "training.micro_batch_size=8",
    "training.max_steps=6",
    "training.seed=0",
    "data.max_eval_samples=8",
    "resources.cpus_per_worker=1",
    "monitor.memory_ceiling=0.01",
]
MIB = 2**20


def _run(tmp_path, name, *extra):
    config = load_config(None, [*BASE, f"name={name}", f"output_dir={tmp_path}", *extra])
    result = finetune(config, progress=False)
    assert result.ok, result.error
    return result


def _print_memory(name, records):
    for r in records:
        switch = r.get("checkpointing_switch")
        print(
            f"{name} step {r['step']}: checkpointed_layers={r['checkpointed_layers']} "
            f"window_peak={r['window_peak_memory_bytes'] / MIB:.0f} MiB "
            f"peak={r['peak_memory_bytes'] / MIB:.0f} MiB ceiling={r['memory_ceiling_bytes'] / MIB:.0f} MiB"
            + (f" switch={json.dumps(switch)}" if switch else "")
        )


@pytest.fixture(scope="module")
def fixed(ray_cluster, tmp_path_factory):
    """The same run with adaptive checkpointing off: over the ceiling at every step, on one plan."""
    result = _run(tmp_path_factory.mktemp("fixed"), "fixed", "monitor.adaptive_checkpointing=false")
    _print_memory("fixed", result.history)
    return result


@pytest.fixture(scope="module")
def adaptive(ray_cluster, tmp_path_factory):
    """No checkpoint schedule: the run decides at every logged step."""
    result = _run(tmp_path_factory.mktemp("adaptive"), "adaptive")
    _print_memory("adaptive", result.history)
    return result


def test_run_over_the_ceiling_switches_to_denser_checkpointing_and_finishes(adaptive):
    history = adaptive.history
    assert [r["step"] for r in history] == list(range(1, 7))
    assert adaptive.metrics.get("final") is True
    assert all(r["memory_ceiling_bytes"] > 0 for r in history)
    assert all(r["window_peak_memory_bytes"] > r["memory_ceiling_bytes"] for r in history)
    switches = [(r["step"], r["checkpointing_switch"]) for r in history if "checkpointing_switch" in r]
    # none -> every second layer -> every layer (tiny-llama has 4), then nothing denser exists.
    assert [(step, s["from_layers"], s["to_layers"]) for step, s in switches] == [(1, 0, 2), (2, 2, 4)]
    for step, switch in switches:
        record = history[step - 1]
        assert switch["ceiling_bytes"] == record["memory_ceiling_bytes"]
        assert switch["peak_memory_bytes"] == record["window_peak_memory_bytes"] > switch["ceiling_bytes"]
        assert "over the ceiling" in switch["reason"]
    # A record gives the plan its steps ran with: the switch shows from the next step on.
    assert [r["checkpointed_layers"] for r in history] == [0, 2, 4, 4, 4, 4]
    assert adaptive.metrics["checkpointed_layers"] == 4


def test_denser_checkpointing_lowers_the_measured_peak(adaptive, fixed):
    assert [r["checkpointed_layers"] for r in fixed.history] == [0] * 6
    assert not any("checkpointing_switch" in r for r in fixed.history)
    assert all(r["window_peak_memory_bytes"] > r["memory_ceiling_bytes"] for r in fixed.history)
    # Same data, same steps: from step 3 on the adaptive run checkpoints every layer and peaks lower, by much
    # of the ~300 MiB of activations that no longer stay resident through the backward pass.
    for ours, theirs in zip(adaptive.history[2:], fixed.history[2:], strict=True):
        assert ours["window_peak_memory_bytes"] < theirs["window_peak_memory_bytes"] - 100 * MIB
    after = max(r["window_peak_memory_bytes"] for r in adaptive.history[2:])
    assert after < adaptive.history[0]["window_peak_memory_bytes"] - 100 * MIB
    # Training itself is unchanged: checkpointing recomputes the same activations.
    assert [r["loss"] for r in adaptive.history] == pytest.approx(
        [r["loss"] for r in fixed.history], abs=1e-5
    )


def test_a_restored_run_keeps_the_denser_plan(ray_cluster, tmp_path):
    """Decisions wait for the checkpoint boundaries (every 2 steps); a killed worker's run resumes from a
    checkpoint on the plan it was saved with, not on the config's."""
    killed: list[int] = []
    killer = threading.Thread(target=kill_train_worker_at, args=(tmp_path, 5, killed), daemon=True)
    killer.start()
    result = _run(
        tmp_path,
        "restored",
        "training.max_steps=8",
        "training.checkpoint_every_steps=2",
        "parallelism.max_failures=2",
    )
    killer.join(timeout=1)
    assert killed, "no worker was killed: the run finished before step 5 was seen"
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    _print_memory("restored", lines)
    first = [r for r in lines if r["resumed_from_step"] == 0]
    switches = {r["step"]: r["checkpointing_switch"] for r in first if "checkpointing_switch" in r}
    assert 1 not in switches and 3 not in switches  # over the ceiling, but no checkpoint boundary
    assert (switches[2]["from_layers"], switches[2]["to_layers"]) == (0, 2)
    resumed = [r for r in lines if r["resumed_from_step"] > 0]
    assert resumed, "the run did not resume from a checkpoint"
    start = resumed[0]["resumed_from_step"]
    assert start in (2, 4)
    assert resumed[0]["checkpointed_layers"] == switches[start]["to_layers"] > 0
    assert read_metrics(result.run_dir)[-1]["checkpointed_layers"] == 4
    assert result.metrics["checkpointed_layers"] == 4 and result.metrics.get("final") is True
