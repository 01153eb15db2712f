"""Fine-tuning on one GPU through `jobs.finetune`: Ray Train + DeepSpeed + nccl, each strategy family once.

Each run reports its device (the CUDA allocator's peak memory, bf16 where the GPU has it) and must learn:
the loss of its last steps is below that of its first.
"""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from jobs.finetune import main as finetune_job
from tests._faults import kill_train_worker_at

SHORT = [
    "model.max_seq_len=64",
    "training.lr=1e-3",
    "training.micro_batch_size=16",
    "training.warmup_steps=2",
    "training.max_steps=20",
    "data.max_eval_samples=32",
    "resources.cpus_per_worker=2",
    "resources.gpus_per_worker=1",
    "parallelism.num_workers=1",
]


def _run(tmp_path, *extra, config=None):
    argv = ([] if config is None else ["--config", str(config)]) + [*SHORT, f"output_dir={tmp_path}", *extra]
    result = finetune_job(argv)
    assert result.ok, result.error
    return result


def _check(result, steps: int = 20) -> dict:
    m = result.metrics
    losses = [r["loss"] for r in result.history]
    assert result.history[-1]["step"] == steps and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns on the GPU
    assert m["device"].startswith("cuda:0 ("), m["device"]
    assert m["precision"] == ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32")
    # The CUDA allocator's peak, not the host's RSS: well under the GPU's memory, and reported every step.
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < m["peak_memory_bytes"] < total
    assert all(r["peak_memory_bytes"] > 0 for r in result.history)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert (
        summary["status"] == "finished" and summary["metrics"]["peak_memory_bytes"] == m["peak_memory_bytes"]
    )
    print(
        f"\n{result.run_dir.name}: {m['throughput_tokens_per_s']:.0f} tokens/s, peak "
        f"{m['peak_memory_bytes'] / 2**20:.0f} MiB on {m['device']}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return m


def test_lora_bf16_on_nccl_resumes_on_the_gpu_after_a_worker_dies(gpu_ray_cluster, tmp_path):
    killed: list[int] = []
    killer = threading.Thread(target=kill_train_worker_at, args=(tmp_path, 15, killed), daemon=True)
    killer.start()
    # Enough steps that the killer sees step 15 before the end: tiny GPU steps take milliseconds.
    result = _run(
        tmp_path,
        "name=lora-gpu",
        "training.max_steps=120",
        "parallelism.zero_stage=2",
        "training.checkpoint_every_steps=10",
        "parallelism.max_failures=1",
        # The budget policy measures activations with a forward pass on the GPU; a tiny budget checkpoints.
        "checkpointing.policy=memory_budget",
        "checkpointing.memory_budget_gb=0.0001",
    )
    killer.join(timeout=1)
    m = _check(result, steps=120)
    assert killed, "no worker was killed: the run finished before step 15 was seen"
    # DeepSpeed state (saved from the GPU) reloaded onto the GPU from a checkpoint before the kill.
    assert m["resumed_from_step"] in range(10, 120, 10)
    assert m["checkpointed_layers"] > 0
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()


def test_qlora_nf4_on_the_gpu(gpu_ray_cluster, tmp_path):
    m = _check(_run(tmp_path, "name=qlora-nf4-gpu", "quantization.mode=nf4", "parallelism.zero_stage=2"))
    assert m["trainable_parameters"] < 0.05 * m["total_parameters"]


def test_moe_lora_on_the_gpu_reports_expert_load(gpu_ray_cluster, repo, tmp_path):
    m = _check(
        _run(
            tmp_path,
            "name=moe-gpu",
            "moe.adapter_targets=[attention,experts,router]",
            "checkpointing.policy=uniform",
            config=repo / "jobs" / "configs" / "tiny-moe-reverse.yaml",
        )
    )
    assert sum(m[f"expert_load/{i}"] for i in range(4)) == pytest.approx(1.0)
    assert m["router_aux_loss"] > 0


def test_full_finetune_of_an_upcycled_moe_under_zero3_offload(gpu_ray_cluster, tmp_path):
    m = _check(
        _run(
            tmp_path,
            "name=zero3-gpu",
            "lora.enabled=false",
            "training.lr=3e-4",
            "moe.mode=upcycle",
            "moe.num_experts=4",
            "moe.top_k=2",
            "parallelism.zero_stage=3",
            "parallelism.offload_optimizer=cpu",
            "parallelism.offload_params=cpu",
        )
    )
    assert m["trainable_parameters"] == m["total_parameters"]
    assert (m.get("final") is True) and math.isfinite(m["eval_loss"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_workers_one_gpu_each_on_nccl(gpu_ray_cluster, tmp_path):
    m = _check(_run(tmp_path, "name=nccl-2", "parallelism.num_workers=2", "parallelism.zero_stage=2"))
    assert m["world_size"] == 2


def test_the_recommended_strategy_for_this_gpu_runs_and_its_memory_holds(gpu_ray_cluster, tmp_path):
    """`recommend --hardware` for the GPU at hand, the written config run through jobs.finetune: it learns,
    and the cost model's allocated peak is near the allocator's (printed; within a loose bound on a
    100M-parameter model, where DeepSpeed's and the allocator's fixed costs weigh more than at 7B)."""
    from llmopt.config import dump_config
    from llmopt.tune import recommend_for_hardware

    name = torch.cuda.get_device_name(0)
    try:
        result = recommend_for_hardware("base-100m", f"1x{name}", seq_len=64, global_batch=16)
    except KeyError:
        pytest.skip(f"{name} has no profile in gpus.yaml")
    best = result.best
    assert best is not None
    path = tmp_path / "recommended.yaml"
    dump_config(result.config(best), path)
    run = finetune_job(
        ["--config", str(path), "training.max_steps=20", "training.lr=1e-3", "data.max_eval_samples=32",
         "resources.cpus_per_worker=2", f"output_dir={tmp_path}", "name=recommended-gpu"]
    )  # fmt: skip
    assert run.ok, run.error
    m = _check(run)
    predicted = best.memory.allocated
    print(
        f"recommended on {name}: {best.label}; peak predicted {predicted / 2**20:.0f} MiB, measured "
        f"{m['peak_memory_bytes'] / 2**20:.0f} MiB; tokens/s predicted {best.tokens_per_s:,.0f}, measured "
        f"{m['throughput_tokens_per_s']:,.0f}"
    )
    assert 0.5 < m["peak_memory_bytes"] / predicted < 2.0
