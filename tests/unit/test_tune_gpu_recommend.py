"""`llmopt recommend --hardware`: strategies for a model on GPUs this machine does not have, from the
model's config.json and the GPU's profile, ranked in seconds; the library call and the command."""

import json
import random
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from llmopt.cli import app
from llmopt.config import load_config, validate_config
from llmopt.tune import (
    GIB,
    load_space,
    model_shape,
    recommend_for_hardware,
    shipped_model_configs,
    strategy_of,
)
from llmopt.tune._gpu_cost import predict_memory, predict_throughput
from llmopt.tune._gpu_recommend import gpu_space_path
from llmopt.tune._space import space_facts

runner = CliRunner()


@pytest.fixture(scope="module")
def llama8b_h100():
    return recommend_for_hardware("llama-3.1-8b", "8xH100")


@pytest.fixture(scope="module")
def moe30b_l4():
    return recommend_for_hardware("qwen3-30b-a3b", "4xL4")


def test_shipped_configs_read_without_weights():
    assert {"llama-3.1-8b", "qwen3-30b-a3b"} <= set(shipped_model_configs())
    dense = model_shape(str(shipped_model_configs()["llama-3.1-8b"]))
    assert 8.0e9 < dense.params < 8.1e9 and not dense.is_moe  # Llama-3.1-8B: 8.03B
    moe = model_shape(str(shipped_model_configs()["qwen3-30b-a3b"]))
    assert 30.0e9 < moe.params < 31.0e9 and (moe.num_experts, moe.top_k) == (128, 8)  # 30.5B, 3.3B active


def test_every_fitting_plan_is_under_the_limit_and_the_rest_say_why(llama8b_h100):
    result = llama8b_h100
    assert result.gpus == 8 and result.limit_bytes < result.gpu.usable_memory_bytes  # headroom kept
    assert result.fitting and result.rejected
    for plan in result.fitting:
        assert plan.memory.device <= result.limit_bytes
        assert plan.strategy.micro_batch * 8 <= result.global_batch
    for plan in result.rejected:
        assert plan.problems and all("per GPU" in p or "global batch" in p for p in plan.problems)
    speeds = [p.tokens_per_s for p in result.fitting]
    assert speeds[0] >= max(speeds) * 0.995  # ranked by tokens/s (ties within 0.5% go to the simpler)
    assert set(result.best_per_method()) == {"full", "lora", "qlora-nf4", "qlora-int8"}


def test_physics_decides_what_fits(moe30b_l4):
    # A 30.5B model's full fine-tune keeps 16 bytes a parameter (bf16 weights and gradients, fp32 master and
    # two Adam states): 488 GB over four 24 GB L4s only fits with the states and parameters on the host.
    best = moe30b_l4.best_per_method()
    full = best["full"]
    assert full is not None and full.strategy.offload_optimizer and full.strategy.offload_params
    # int8 weights of 30.5B parameters alone are 28 GiB: over an L4 at any ZeRO stage QLoRA can use.
    assert best["qlora-int8"] is None
    closest = moe30b_l4.closest_per_method()["qlora-int8"]
    assert "per GPU" in closest.problems[0] and "weights" in closest.breakdown()


def test_a_slow_network_moves_the_choice_off_parameter_gathering():
    fast = recommend_for_hardware("llama-3.1-8b", "8xH100", nodes=2, network_gbps=400)
    slow = recommend_for_hardware("llama-3.1-8b", "8xH100", nodes=2, network_gbps=1)
    assert fast.gpus == slow.gpus == 16
    assert slow.best.tokens_per_s < fast.best.tokens_per_s
    # ZeRO-3 all-gathers 16 GB of weights twice a micro-batch: over 1 Gbit/s it cannot be the best.
    assert slow.best.strategy.zero_stage < 3


def test_a_budget_or_a_smaller_gpu_fits_fewer():
    full = recommend_for_hardware("llama-3.1-8b", "8xH100")
    budget = recommend_for_hardware("llama-3.1-8b", "8xH100", memory_budget=20 * GIB)
    assert 0 < len(budget.fitting) < len(full.fitting)
    assert all(p.memory.device <= 20 * GIB for p in budget.fitting)
    t4 = recommend_for_hardware("tiny-llama", "T4")
    assert t4.best.config.precision == "fp16"  # a T4 has no bf16 matrix units


def test_the_written_config_is_the_strategy_that_was_predicted(llama8b_h100):
    result = llama8b_h100
    config = result.config()
    again = validate_config(yaml.safe_load(yaml.safe_dump(config.model_dump(mode="json"))))
    assert again.model.name_or_path == "meta-llama/Llama-3.1-8B"  # the hub id, not the shipped json
    assert again.parallelism.num_workers == 8 and again.resources.accelerator == "gpu"
    assert again.resources.gpus_per_worker == 1 and again.precision == "bf16"
    t = again.training
    assert t.micro_batch_size * t.gradient_accumulation_steps * 8 >= result.global_batch
    strategy = strategy_of(again, result.shape, 8)
    assert strategy == result.best.strategy
    assert predict_memory(result.shape, strategy).device == result.best.memory.device
    assert predict_throughput(result.shape, strategy, result.gpu) == result.best.tokens_per_s


def test_moe_adapters_on_experts_count_their_parameters(moe30b_l4):
    experts = [p for p in moe30b_l4.plans if p.strategy.lora_target_parameters]
    attention = [p for p in moe30b_l4.plans if p.method == "lora" and not p.strategy.lora_target_parameters]
    assert experts and attention
    assert min(p.memory.gradients for p in experts if p.strategy.zero_stage == 0) > max(
        p.memory.gradients for p in attention if p.strategy.zero_stage == 0
    )


def test_gpu_spaces_sample_valid_configs():
    for is_moe, model in ((False, "tiny-llama"), (True, "tiny-moe")):
        space = load_space(gpu_space_path(is_moe))
        facts = space_facts(model_shape(model))
        assert space.applies_to(facts)
        base = load_config(None, [f"model.name_or_path={model}"])
        rng = random.Random(0)
        for _ in range(30):
            space.to_config(space.sample(rng, base, facts), base, facts)


def test_bad_hardware_names_the_known_gpus():
    with pytest.raises(KeyError, match="H100"):
        recommend_for_hardware("tiny-llama", "8xH900")
    with pytest.raises(ValueError, match="at least 1"):
        recommend_for_hardware("tiny-llama", "0xH100")


def test_cli_ranks_writes_a_config_and_json_from_a_config_json(tmp_path):
    model_dir = tmp_path / "llama"
    model_dir.mkdir()
    shutil.copy(shipped_model_configs()["llama-3.1-8b"], model_dir / "config.json")
    out, ranking = tmp_path / "best.yaml", tmp_path / "ranking.json"
    args = ["recommend", "--model", str(model_dir), "--hardware", "4xL4", "-o", str(out)]
    result = runner.invoke(app, [*args, "--json", str(ranking)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "8.03B parameters" in text and "4x NVIDIA L4" in text and "host memory not checked" in text
    assert "Best of each method" in text and "tokens/s" in text
    config = load_config(out, [])
    assert config.model.name_or_path == str(model_dir) and config.parallelism.num_workers == 4
    summary = json.loads(ranking.read_text())
    assert summary["gpus"] == 4 and summary["fit"] > 0 and summary["best"]["fits"]
    assert summary["best"]["peak_bytes_per_gpu"] <= summary["limit_bytes_per_gpu"]


def test_host_memory_bounds_offload():
    # One T4 "fits" a 30B full fine-tune only by putting ~490 GB of states and weights on the host.
    unbounded = recommend_for_hardware("qwen3-30b-a3b", "T4")
    assert unbounded.best_per_method()["full"].memory.host_offloaded > 400e9
    bounded = recommend_for_hardware("qwen3-30b-a3b", "T4", host_memory=64 * GIB)
    assert bounded.best_per_method()["full"] is None
    assert all(p.memory.host_offloaded <= 64 * GIB for p in bounded.fitting)


def test_cli_says_when_nothing_fits_and_why():
    result = runner.invoke(
        app, ["recommend", "--model", "qwen3-30b-a3b", "--hardware", "T4", "--host-memory", "16GiB"]
    )
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "nothing fits" in text and "per GPU" in text and "no strategy is predicted to fit" in text
    bad = runner.invoke(app, ["recommend", "--model", "tiny-llama", "--hardware", "8xH900"])
    assert bad.exit_code == 2 and "Known GPUs" in bad.output
    missing = runner.invoke(app, ["recommend", "--model", "/nowhere/llama", "--hardware", "8xH100"])
    assert missing.exit_code == 1 and "llama-3.1-8b" in " ".join(missing.output.split())
