"""Fine-tuning on Ray Train with DeepSpeed workers, on the session's local cluster.

Each `finetune` call starts a worker group (~20 s of start-up and imports), so one run serves
several assertions. Golden losses were recorded with the command in `GOLDEN_COMMAND` on the 2-core
CPU machines this project runs on (fp32, one torch thread per worker).
"""

import json
import math
import threading

import pytest

from llmopt.config import load_config
from llmopt.train import finetune, read_metrics
from tests._faults import kill_train_worker_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = [
    "model.max_seq_len=64",
    "lora.r=8",
    "lora.alpha=16",
    "parallelism.num_workers=2",
    "parallelism.zero_stage=2",
    "training.lr=1e-3",
    "training.micro_batch_size=8",
    "training.warmup_steps=2",
    "training.max_steps=12",
    "training.checkpoint_every_steps=4",
    "training.seed=0",
    "data.max_eval_samples=32",
    "resources.cpus_per_worker=1",
]
GOLDEN_COMMAND = "python -m jobs.finetune " + " ".join(BASE)
# Training loss at steps 1..12 (mean over both workers' micro-batches).
GOLDEN_LOSSES = [
    7.008056, 6.867085, 6.600952, 6.325839, 6.165998, 6.06496,
    6.038254, 5.91154, 5.852187, 5.778208, 5.830964, 5.779792,
]  # fmt: skip


def _run(tmp_path, name, *extra):
    config = load_config(None, [*BASE, f"name={name}", f"output_dir={tmp_path}", *extra])
    result = finetune(config, progress=False)
    assert result.ok, result.error
    return result


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """The uninterrupted LoRA run: 2 workers, ZeRO-2, no gradient checkpointing."""
    return _run(
        tmp_path_factory.mktemp("ref"), "reference", "checkpointing.policy=none", "training.save_merged=true"
    )


def test_golden_losses_and_run_directory(reference):
    losses = [r["loss"] for r in reference.history]
    assert [r["step"] for r in reference.history] == list(range(1, 13))
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-4, abs=1e-4)
    assert losses[-1] < losses[0] - 0.5  # it learns
    run = reference.run_dir
    for name in ("config.yaml", "deepspeed.json", "metrics.jsonl", "summary.json", "loss.png"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert json.loads((run / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    m = reference.metrics
    assert m["world_size"] == 2 and m["trainable_parameters"] < 0.02 * m["total_parameters"]
    assert m["tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0
    assert 0.0 <= m["eval_exact_match"] <= 1.0 and math.isfinite(m["eval_loss"])
    kept = sorted(p.name for p in (run / "ray" / "train").glob("step-*"))
    assert kept[-1] == "step-000012" and len(kept) <= 2  # keep_checkpoints=2, latest always kept


def test_merged_model_equals_base_plus_adapter(reference):
    import torch
    from peft import PeftModel

    from llmopt.models import load_model

    batch = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(load_model("tiny-llama"), str(reference.run_dir / "adapter"))
        merged = load_model(str(reference.run_dir / "merged"))
        torch.testing.assert_close(merged(batch).logits, adapted(batch).logits, atol=1e-4, rtol=1e-4)
        base = load_model("tiny-llama")
        assert not torch.allclose(base(batch).logits, merged(batch).logits, atol=1e-3)


def test_gradient_checkpointing_gives_the_same_losses(reference, tmp_path):
    result = _run(tmp_path, "ckpt", "checkpointing.policy=uniform", "checkpointing.every_k_layers=1")
    assert result.metrics["checkpointed_layers"] == 4
    assert [r["loss"] for r in result.history] == pytest.approx(
        [r["loss"] for r in reference.history], abs=1e-5
    )


def test_killed_worker_is_replaced_and_the_run_resumes_the_same_curve(reference, tmp_path):
    killed: list[int] = []
    killer = threading.Thread(target=kill_train_worker_at, args=(tmp_path, 6, killed), daemon=True)
    killer.start()
    result = _run(tmp_path, "killed", "checkpointing.policy=none", "parallelism.max_failures=2")
    killer.join(timeout=1)
    assert killed, "no worker was killed: the run finished before step 6 was seen"
    assert result.metrics["resumed_from_step"] in (4, 8)  # the checkpoint before the kill
    # Every step's loss, the replayed ones included, equals the uninterrupted run's.
    assert [r["loss"] for r in read_metrics(result.run_dir)] == pytest.approx(
        [r["loss"] for r in reference.history], abs=1e-5
    )
    assert result.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], abs=1e-4)
