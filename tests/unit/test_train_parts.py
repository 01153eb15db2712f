"""Training pieces that need no Ray: DeepSpeed config, schedules, strategies, metrics, run files."""

import json

import pytest
import torch

from llmopt.config import load_config, validate_config
from llmopt.models import StrategyError, apply_strategy, load_model, lora_targets
from llmopt.train import (
    PrecisionError,
    build_deepspeed_config,
    expert_load_metrics,
    expert_token_counts,
    list_runs,
    lr_lambda,
    plot_loss,
    read_metrics,
    resolve_precision,
    show_run,
)


def test_deepspeed_config_follows_the_schema():
    config = load_config(
        None,
        [
            "parallelism.zero_stage=3",
            "parallelism.offload_optimizer=cpu",
            "parallelism.offload_params=cpu",
            "training.micro_batch_size=4",
            "training.gradient_accumulation_steps=2",
            "training.max_grad_norm=0.5",
        ],
    )
    ds = build_deepspeed_config(config, world_size=2, precision="fp32")
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_allow_untested_optimizer"] is True and "optimizer" not in ds
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert build_deepspeed_config(config, 1, "bf16")["bf16"]["enabled"]


def test_raw_deepspeed_json_overrides_generated_keys(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    config = load_config(None, ["parallelism.zero_stage=2", f"parallelism.deepspeed_config={raw}"])
    ds = build_deepspeed_config(config, 1, "fp32")
    assert ds["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 1000,
    }
    assert ds["steps_per_print"] == 5
    missing = load_config(None, ["parallelism.deepspeed_config=/no/such.json"])
    with pytest.raises(FileNotFoundError, match=r"parallelism\.deepspeed_config"):
        build_deepspeed_config(missing, 1, "fp32")


def test_precision_resolution():
    assert resolve_precision(load_config(), use_gpu=False) == "fp32"
    assert resolve_precision(load_config(), use_gpu=True) == "bf16"
    assert resolve_precision(load_config(), use_gpu=True, bf16_supported=False) == "fp32"
    with pytest.raises(PrecisionError, match="DeepSpeed refuses fp16"):
        resolve_precision(load_config(None, ["precision=fp16"]), use_gpu=False)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_warms_up_then_decays(kind):
    f = lr_lambda(kind, warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    end = f(20)
    assert end == pytest.approx(1.0 if kind == "constant" else 0.0, abs=1e-9)


def test_lora_targets_per_architecture():
    dense = validate_config({})
    assert lora_targets(dense, "llama")["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    moe = validate_config(
        {"moe": {"mode": "finetune", "adapter_targets": ["attention", "experts", "router"]}}
    )
    t = lora_targets(moe, "mixtral")
    assert t["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert t["modules_to_save"] == ["mlp.gate"]
    experts_only = validate_config({"moe": {"mode": "finetune", "adapter_targets": ["experts"]}})
    assert lora_targets(experts_only, "mixtral")["target_modules"] == []
    with pytest.raises(StrategyError, match="not a supported MoE"):
        lora_targets(moe, "llama")
    with pytest.raises(StrategyError, match="shared_expert"):
        lora_targets(
            validate_config({"moe": {"mode": "finetune", "adapter_targets": ["shared_expert"]}}), "mixtral"
        )
    with pytest.raises(StrategyError, match="no preset for model_type 'bert'"):
        lora_targets(dense, "bert")


def test_lora_trains_under_two_percent_of_the_tiny_dense_model():
    model, report = apply_strategy(load_model("tiny-llama"), validate_config({"template": "small_model"}))
    assert report.method == "lora"
    assert report.trainable_fraction < 0.02
    assert report.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_moe_strategy_adapts_experts_and_trains_the_router():
    config = validate_config(
        {
            "model": {"name_or_path": "tiny-moe"},
            "moe": {"mode": "finetune", "adapter_targets": ["attention", "experts", "router"]},
        }
    )
    model, report = apply_strategy(load_model("tiny-moe"), config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora" in n for n in names)
    assert any("mlp.gate" in n and "modules_to_save" in n for n in names)
    assert model.config.output_router_logits and report.moe["top_k"] == 2
    batch = torch.randint(0, 1000, (2, 16))
    out = model(input_ids=batch, labels=batch)
    assert out.aux_loss is not None and torch.isfinite(out.loss)
    counts = expert_token_counts(out.router_logits, 2, torch.ones_like(batch))
    assert counts.sum() == 2 * 16 * 2 * model.config.num_hidden_layers  # tokens x top-k x layers


def test_full_finetune_trains_everything():
    _, report = apply_strategy(load_model("tiny-llama"), validate_config({"lora": {"enabled": False}}))
    assert report.method == "full" and report.trainable_parameters == report.total_parameters


def test_expert_load_metrics():
    metrics = expert_load_metrics(torch.tensor([30.0, 10.0, 0.0, 0.0]))
    assert metrics["expert_load/0"] == pytest.approx(0.75)
    assert metrics["expert_imbalance"] == pytest.approx(3.0)
    assert expert_load_metrics(torch.zeros(4)) == {}


def test_expert_counts_skip_padding():
    logits = [torch.tensor([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [9.0, 0.0, 0.0]])]
    counts = expert_token_counts(logits, top_k=1, attention_mask=torch.tensor([[1, 1, 0]]))
    assert counts.tolist() == [1.0, 1.0, 0.0]


def test_metrics_history_keeps_the_replayed_steps_last_record(tmp_path):
    rows = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.5},
        {"step": 2, "loss": 2.4},
        {"step": 3, "loss": 2.0, "eval_loss": 2.1, "eval_exact_match": 0.1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = read_metrics(tmp_path)
    assert [r["loss"] for r in history] == [3.0, 2.4, 2.0]
    png = plot_loss(history, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_list_and_show(tmp_path):
    from llmopt.config import dump_config

    run = tmp_path / "demo-1"
    run.mkdir()
    dump_config(validate_config({"name": "demo"}), run / "config.yaml")
    (run / "summary.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "seconds": 3.0,
                "metrics": {"step": 5, "loss": 1.5, "eval_exact_match": 0.5},
            }
        )
    )
    (run / "adapter").mkdir()
    info = show_run(run)
    assert info["status"] == "finished" and info["steps"] == 5 and info["artifacts"] == ["adapter"]
    assert [r["run"] for r in list_runs(tmp_path)] == ["demo-1"]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        show_run(tmp_path)
