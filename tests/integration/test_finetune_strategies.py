"""Strategies through the real Ray Train + DeepSpeed path: MoE LoRA, upcycling, QLoRA, ZeRO-3."""

import math

import pytest

from llmopt.config import load_config
from llmopt.models import load_model
from llmopt.train import finetune

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT = [
    "model.max_seq_len=64",
    "training.lr=1e-3",
    "training.micro_batch_size=8",
    "training.max_steps=6",
    "data.max_eval_samples=16",
    "resources.cpus_per_worker=1",
]


def _run(tmp_path, *extra, config_file=None):
    config = load_config(config_file, [*SHORT, f"output_dir={tmp_path}", *extra])
    result = finetune(config, progress=False)
    assert result.ok, result.error
    losses = [r["loss"] for r in result.history]
    assert losses and all(math.isfinite(x) for x in losses)
    assert result.history[-1]["step"] == config.training.max_steps
    return result


def test_shipped_moe_config_reports_expert_load_and_router_loss(ray_cluster, repo, tmp_path):
    result = _run(
        tmp_path,
        "moe.adapter_targets=[attention,experts,router]",
        "moe.router_aux_loss_coef=0.02",
        # Evaluations and checkpoints keep their own schedules when logging is sparser.
        "training.log_every_steps=5",
        "training.eval_every_steps=3",
        "training.checkpoint_every_steps=2",
        config_file=repo / "jobs" / "configs" / "tiny-moe-reverse.yaml",
    )
    assert result.run_dir.name.startswith("tiny-moe-reverse-")
    assert [r["step"] for r in result.history] == [2, 3, 4, 5, 6]
    assert [r["step"] for r in result.history if r.get("eval_step") == r["step"]] == [3, 6]
    assert (result.run_dir / "ray" / "train" / "step-000006").is_dir()
    m = result.metrics
    loads = [m[f"expert_load/{i}"] for i in range(4)]
    assert sum(loads) == pytest.approx(1.0) and all(x > 0 for x in loads)
    assert m["expert_imbalance"] >= 1.0 and m["router_aux_loss"] > 0
    from peft import PeftConfig

    adapter = PeftConfig.from_pretrained(str(result.run_dir / "adapter"))
    assert set(adapter.target_parameters) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}


def test_upcycled_dense_model_trains_as_moe_on_an_elastic_worker_group(ray_cluster, tmp_path):
    result = _run(
        tmp_path,
        "name=upcycle",
        "parallelism.min_workers=1",
        "parallelism.num_workers=3",  # elastic: the 2-CPU cluster fits 2 of at most 3 workers
        "moe.mode=upcycle",
        "moe.num_experts=4",
        "moe.top_k=2",
        "moe.adapter_targets=[attention,experts,router]",
    )
    assert sum(result.metrics[f"expert_load/{i}"] for i in range(4)) == pytest.approx(1.0)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.metrics["world_size"] == 2


def test_qlora_nf4_trains_on_cpu_in_bf16(ray_cluster, tmp_path):
    # bf16 training of an fp32-computing QLoRA model: the 4-bit weights are stored in the training dtype,
    # so DeepSpeed's bf16 cast leaves the packed bytes alone (it used to scramble them: a shape error).
    result = _run(
        tmp_path, "name=qlora", "quantization.mode=nf4", "quantization.compute_dtype=fp32", "precision=bf16"
    )
    assert result.metrics["precision"] == "bf16"
    m = result.metrics
    assert m["trainable_parameters"] < 0.02 * load_model_params()
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_full_finetune_under_zero3_offload_with_two_workers(ray_cluster, tmp_path):
    result = _run(
        tmp_path,
        "name=zero3",
        "lora.enabled=false",
        "parallelism.num_workers=2",
        "parallelism.zero_stage=3",
        "parallelism.offload_optimizer=cpu",  # ZeRO-Offload with our torch AdamW
        "training.lr=3e-4",
    )
    assert result.metrics["trainable_parameters"] == result.metrics["total_parameters"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    reloaded = load_model(str(result.run_dir / "model"))  # gathered from the ZeRO-3 shards
    assert sum(p.numel() for p in reloaded.parameters()) == result.metrics["total_parameters"]


def load_model_params() -> int:
    return sum(p.numel() for p in load_model("tiny-llama").parameters())


def test_every_peft_method_trains_saves_and_reports_its_share(ray_cluster, tmp_path):
    """Each peft method through Ray Train + DeepSpeed (2 workers, ZeRO-2): the loss falls, the run reports
    its trainable share, and the saved adapter reloads onto the base model with peft."""
    from peft import PeftConfig, PeftModel

    expected_type = {
        "dora": "LORA",
        "ia3": "IA3",
        "loha": "LOHA",
        "lokr": "LOKR",
        "prompt_tuning": "PROMPT_TUNING",
        "prefix_tuning": "PREFIX_TUNING",
    }
    for method, peft_type in expected_type.items():
        extra = ["training.save_merged=true"] if method in ("ia3", "loha", "lokr") else []
        result = _run(
            tmp_path,
            f"name={method}",
            f"lora.method={method}",
            "parallelism.num_workers=2",
            "parallelism.zero_stage=2",
            "training.lr=3e-3",
            *extra,
        )
        m = result.metrics
        assert m["peft_method"] == method
        assert 0 < m["trainable_fraction"] < 0.05 and m["trainable_parameters"] < m["total_parameters"]
        assert result.history[-1]["loss"] < result.history[0]["loss"], method
        adapter = result.run_dir / "adapter"
        config = PeftConfig.from_pretrained(str(adapter))
        assert config.peft_type == peft_type
        assert config.use_dora if method == "dora" else True
        reloaded = PeftModel.from_pretrained(load_model("tiny-llama"), str(adapter))
        assert sum(p.numel() for n, p in reloaded.named_parameters() if "lm_head" not in n) > 0
        if extra:  # the merged model is a plain model directory
            merged = load_model(str(result.run_dir / "merged"))
            assert sum(p.numel() for p in merged.parameters()) == load_model_params()


def test_pruning_with_lora_recovery_keeps_the_sparsity_pattern(ray_cluster, tmp_path):
    from llmopt.models._prune import prunable_layers
    from llmopt.train import prune_to_directory

    config = load_config(
        None, [*SHORT, f"output_dir={tmp_path}", "name=pr", "lora.modules_to_save=[lm_head]"]
    )
    target, report = prune_to_directory(config, 0.5, "2:4", recover_steps=4)
    assert target == tmp_path / "pr-pruned50-2of4"
    assert report["recovery"]["steps"] == 4 and math.isfinite(report["recovery"]["eval_loss"])
    recovered = load_model(str(target))
    for _, layer in prunable_layers(recovered):  # the merged LoRA update did not fill the pruned weights
        groups = layer.weight.reshape(layer.weight.shape[0], -1, 4)
        assert int((groups != 0).sum(-1).max()) <= 2
    # The output head trained in full during recovery and stays dense.
    assert not torch_equal(recovered.lm_head.weight, load_model("tiny-llama").lm_head.weight)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
