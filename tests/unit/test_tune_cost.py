"""The cost model (llmopt.tune): formulas against hand-computed numbers and against real measurements."""

from dataclasses import replace

import pytest
import torch

from llmopt.config import load_config, validate_config
from llmopt.tune import (
    GIB,
    Candidate,
    Coefficients,
    CostModel,
    Hardware,
    ModelShape,
    Workload,
    format_bytes,
    model_shape,
    parse_memory,
    prune,
    rank,
)

MIB = 1024**2
CPU = Hardware(accelerator="cpu", cpus=2, memory_bytes=24 * GIB, cpu_name="test")
GPU = Hardware(accelerator="gpu", cpus=16, memory_bytes=128 * GIB, gpus=8, gpu_memory_bytes=80 * GIB)

# tiny-llama's dimensions (llmopt.models.PRESETS), written out so the hand computations below are visible.
H, FF, L, V, KV, HEADS, D = 256, 688, 4, 1024, 128, 4, 64


def config(*overrides: str, model: str = "tiny-llama"):
    return load_config(None, [f"model.name_or_path={model}", *overrides])


def test_parse_memory_units_and_errors():
    assert parse_memory("4GiB") == 4 * 2**30
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5Gi") == int(1.5 * 2**30)
    assert parse_memory("2") == 2 * 2**30 and parse_memory(0.5) == 2**29
    assert parse_memory("64 kib") == 64 * 1024
    for bad in ("4 parsecs", "GiB", "-1GiB", "0"):
        with pytest.raises(ValueError, match="memory size"):
            parse_memory(bad)
    assert format_bytes(1536 * MIB) == "1.5 GiB"


def test_shape_counts_match_the_models():
    for name in ("tiny-llama", "tiny-moe", "base-100m"):
        shape = model_shape(name)
        assert replace(shape, total_params=None).params == shape.params, name  # analytic == meta count
    llama = model_shape("tiny-llama")
    assert (llama.hidden, llama.intermediate, llama.num_layers, llama.kv_dim) == (H, FF, L, KV)
    per_layer = H * H + 2 * H * KV + H * H + 3 * H * FF + 2 * H
    assert llama.params == V * H + L * per_layer + H + V * H == 3_426_560
    moe = model_shape("tiny-moe")
    assert moe.is_moe and (moe.num_experts, moe.top_k) == (4, 2)
    # A token multiplies the attention weights, top-2 of 4 experts, the router and the head.
    attention = 128 * 128 * 2 + 2 * 128 * 64
    assert moe.matmul_params_per_token() == 4 * (attention + 128 * 4 + 2 * 3 * 128 * 256) + 1024 * 128


def test_lora_counts_by_hand_and_against_peft():
    from llmopt.models import apply_strategy, load_model, lora_targets

    shape = model_shape("tiny-llama")
    attention = lora_targets(config(), "llama")
    count = shape.lora_count(attention, r=8)
    # r x (in + out) for q (256->256), k and v (256->128), o (256->256), in each of 4 layers.
    assert count.adapter_params == 4 * 8 * (512 + 384 + 384 + 512) == 57_344
    assert count.targeted == {"q_proj", "k_proj", "v_proj", "o_proj"} and count.saved_params == 0
    wide = config("lora.target_modules=all-linear", "lora.modules_to_save=[lm_head]")
    count = shape.lora_count(lora_targets(wide, "llama"), r=8)
    assert count.adapter_params == 4 * 8 * (1792 + 2 * (H + FF) + (FF + H))
    assert count.saved_params == V * H and count.saves_lm_head
    _, report = apply_strategy(load_model("tiny-llama"), wide)
    assert report.trainable_parameters == count.trainable
    # Fused experts: peft's target_parameters adapts each (E, out, in) tensor with r * E rows.
    experts = config("moe.mode=finetune", "moe.adapter_targets=[attention,experts]", model="tiny-moe")
    moe = model_shape("tiny-moe")
    count = moe.lora_count(lora_targets(experts, "mixtral"), r=8)
    assert count.adapter_params == 4 * 8 * 4 * (2 * 128 + 3 * 256) + 4 * 8 * (256 + 192 + 192 + 256)
    _, report = apply_strategy(load_model("tiny-moe"), experts)
    assert report.trainable_parameters == count.trainable == 159_744


def test_model_states_per_zero_stage_by_hand():
    n, p = 4, 3_426_560
    coefficients = replace(Coefficients.defaults(GPU), zero_buffer_bytes_per_param=0.0)
    model = CostModel(model_shape("tiny-llama"), GPU, coefficients)
    full = ["lora.enabled=false", f"parallelism.num_workers={n}", "precision=bf16"]
    expected = {  # bf16 full fine-tune: weights 2P, grads 2P, fp32 master + grads 8P, Adam 8P
        0: (2 * p, 2 * p, 16 * p),
        1: (2 * p, 2 * p, 16 * p / n),
        2: (2 * p, 2 * p / n, 16 * p / n),
        3: (2 * p / n + 2 * p, 2 * p / n, 16 * p / n),  # + the gathered parameters (the whole model)
    }
    for stage, (weights, grads, optimizer) in expected.items():
        states, host, trainable, total = model.model_states(config(*full, f"parallelism.zero_stage={stage}"))
        assert (states["weights"], states["gradients"], states["optimizer"]) == (
            int(weights),
            int(grads),
            int(optimizer),
        ), stage
        assert host == 0 and trainable == total == p
    offload = config(*full, "parallelism.zero_stage=2", "parallelism.offload_optimizer=cpu")
    states, host, _, _ = model.model_states(offload)
    assert states["optimizer"] == 0 and host == int(16 * p / n)
    # fp32 ZeRO-0 steps the client AdamW on the weights: 4 + 4 + 8 bytes per parameter.
    states, _, _, _ = model.model_states(config("lora.enabled=false", "precision=fp32"))
    assert sum(states.values()) == 16 * p
    # QLoRA nf4 (double quant): quantized linear weights at ~0.516 byte, the rest and adapters at 4 bytes.
    cpu = CostModel(model_shape("tiny-llama"), CPU)
    states, _, trainable, total = cpu.model_states(config("quantization.mode=nf4"))
    linear = L * (H * H + 2 * H * KV + H * H + 3 * H * FF)
    assert states["weights"] == int(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (total - linear) * 4)
    assert trainable == 57_344


def test_zero2_matches_deepspeeds_own_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    coefficients = replace(Coefficients.defaults(GPU), zero_buffer_bytes_per_param=0.0)
    model = CostModel(model_shape("base-100m"), GPU, coefficients)
    for n in (1, 2, 8):
        cfg = config(
            "lora.enabled=false",
            "parallelism.zero_stage=2",
            f"parallelism.num_workers={n}",
            model="base-100m",
        )
        states, _, _, total = model.model_states(cfg)
        _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=n, cpu_offload=False)
        assert sum(states.values()) == pytest.approx(gpu, rel=1e-6), n


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr", "prompt_tuning", "prefix_tuning"])
def test_every_peft_method_counts_what_peft_builds(method):
    from llmopt.models import apply_strategy, load_model

    for name, extra in (
        ("tiny-llama", ["lora.modules_to_save=[lm_head]"]),
        ("tiny-moe", ["moe.mode=finetune"]),
    ):
        cfg = config(f"lora.method={method}", "lora.r=4", *extra, model=name)
        cost = CostModel(model_shape(name), CPU)
        count = cost.lora(cfg, cost.shape)
        _, report = apply_strategy(load_model(name), cfg)
        assert report.peft_method == method
        assert report.trainable_parameters == count.trainable, (name, method)
    if method == "ia3":  # k and v scale their 128 outputs, down_proj its 688 inputs, in 4 layers
        llama = CostModel(model_shape("tiny-llama"), CPU)
        assert llama.lora(config("lora.method=ia3"), llama.shape).adapter_params == 4 * (KV + KV + FF)


def test_peft_methods_cost_what_they_compute():
    cost = CostModel(model_shape("tiny-llama"), CPU)
    work = Workload.fixed(64)

    def flops(*overrides):
        return cost.time_terms(config(*overrides), work, 1, 1, 0)["flops"]

    wide = {
        m: flops(f"lora.method={m}", "lora.target_modules=all-linear")
        for m in ("lora", "loha", "lokr", "ia3")
    }
    # LoHa and LoKr multiply by a full delta weight per adapted linear: far more than LoRA's rank-r path.
    assert wide["loha"] > 1.5 * wide["lora"] and wide["lokr"] > 1.5 * wide["lora"]
    assert wide["ia3"] < wide["lora"]
    # Prompt tuning runs 16 more positions through every layer; prefix tuning only attends to 16 more keys.
    base = flops("lora.method=prefix_tuning", "lora.num_virtual_tokens=1")
    prompt = flops("lora.method=prompt_tuning", "lora.num_virtual_tokens=16")
    prefix = flops("lora.method=prefix_tuning", "lora.num_virtual_tokens=16")
    assert prompt > 1.2 * base and base < prefix < prompt


def _counted_training_flops(model, ids) -> float:
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode; grouped products (MoE
    experts), which it does not count here, are counted as 2 x rows x in x out."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    grouped = []

    class Grouped(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._grouped_mm.default:
                a, b = args[0], args[1]
                grouped.append(2 * a.shape[0] * a.shape[1] * b.shape[-1])
            return func(*args, **(kwargs or {}))

    with FlopCounterMode(display=False) as counter, Grouped():
        model(input_ids=ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    assert all("grouped" not in str(op) for op in counts), "counted twice: drop the Grouped mode"
    return counter.get_total_flops() + sum(grouped)


def test_lora_on_fused_experts_costs_what_it_computes():
    """peft folds B @ A into the fused expert weights, so the grouped products compute the experts' full
    weight gradients and every forward builds the fold: the FLOPs the cost model adds for adapters on the
    experts are those torch counts in a real step (the rest of the step is the same in both)."""
    from llmopt.models import apply_strategy, load_model

    cost = CostModel(model_shape("tiny-moe"), CPU)
    ids = torch.randint(3, 200, (4, 64), generator=torch.Generator().manual_seed(0))
    counted, modelled = {}, {}
    for targets in ("[attention]", "[attention,experts]"):
        cfg = config(
            "moe.mode=finetune", f"moe.adapter_targets={targets}", "lora.r=8", "lora.dropout=0",
            "training.micro_batch_size=4", model="tiny-moe",
        )  # fmt: skip
        model, _ = apply_strategy(load_model("tiny-moe"), cfg)
        counted[targets] = _counted_training_flops(model.train(), ids)
        modelled[targets] = cost.time_terms(cfg, Workload.fixed(64), 1, 1, 0)["flops"]
    extra = counted["[attention,experts]"] - counted["[attention]"]
    assert extra > 0.25 * counted["[attention]"]  # over 40% more here: worth modelling
    assert modelled["[attention,experts]"] - modelled["[attention]"] == pytest.approx(extra, rel=1e-9)


def test_activation_formulas_match_measured_saved_tensors():
    """Per-token saved bytes per layer and outside equal what autograd really keeps (sdpa, no mask)."""
    from llmopt.models import apply_strategy, load_model
    from llmopt.train._checkpointing import measure_layer_activations

    cases = [
        ("tiny-llama", ["lora.enabled=false"]),
        ("tiny-llama", []),
        ("tiny-llama", ["lora.target_modules=all-linear"]),
        ("tiny-moe", ["lora.enabled=false", "moe.mode=finetune"]),
        ("tiny-moe", ["moe.mode=finetune"]),
    ]
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for name, overrides in cases:
        cfg = config(*overrides, model=name)
        cost = CostModel(model_shape(name), CPU)
        lora = cost.lora(cfg, cost.shape)
        router_loss = cfg.moe.mode != "none"
        first, other, constant, outside = cost.shape.activation_elems(
            lora is not None, lora, None, router_loss
        )
        model, _ = apply_strategy(load_model(name), cfg)
        model.train()
        per_layer, inputs, measured_outside = measure_layer_activations(model, batch)
        tokens = ids.numel()
        # Exact per token; a few bytes per batch (scalars, RNG state) do not scale with tokens.
        expected = [4 * tokens * e for e in [first] + [other] * 3]
        assert per_layer == pytest.approx(expected, rel=2e-3), (name, overrides)
        assert measured_outside == pytest.approx(4 * tokens * outside, rel=2e-3) and constant == 0
        assert inputs == [4 * tokens * cost.shape.hidden] * 4  # what a checkpointed layer keeps


@pytest.mark.parametrize(
    "targets",
    ["auto", "all-linear", "[o_proj]", "[gate_proj]", "[down_proj]", "[q_proj,k_proj]", "[v_proj,up_proj]"],
)
def test_adapter_dropout_adds_what_autograd_keeps(targets):
    """peft's lora_dropout above 0, against autograd's saved tensors layer by layer: each adapter keeps its
    dropped copy, dropout its noise where the input requires grad, and the inputs only adapters kept go.
    (A tiny-llama all-linear fine-tune at micro-batch 16 peaked 22.4 MiB higher with dropout 0.05.)"""
    from llmopt.models import apply_strategy, load_model
    from llmopt.train._checkpointing import measure_layer_activations

    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cost = CostModel(model_shape("tiny-llama"), CPU)
    measured = {}
    for dropout in (0.0, 0.05):
        cfg = config(f"lora.target_modules={targets}", f"lora.dropout={dropout}")
        model, _ = apply_strategy(load_model("tiny-llama"), cfg)
        model.train()
        measured[dropout] = measure_layer_activations(model, batch)[0]
    lora = cost.lora(config(f"lora.target_modules={targets}"), cost.shape)
    first, other = cost.shape.adapter_dropout_elems(lora)  # CPU: a noise tensor of the input's dtype
    extra = [b - a for a, b in zip(measured[0.0], measured[0.05], strict=True)]
    assert extra == pytest.approx([4 * ids.numel() * e for e in (first, other, other, other)], abs=64)
    # The cost model's activation terms carry the same bytes.
    workload = Workload.fixed(64)
    sized = (f"lora.target_modules={targets}", "training.micro_batch_size=8")
    plain = cost.activation_terms(config(*sized), workload)
    dropped = cost.activation_terms(config(*sized, "lora.dropout=0.05"), workload)
    assert dropped["saved"] - plain["saved"] == pytest.approx(4 * 8 * 64 * (first + 3 * other))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("tiny-llama", ["lora.enabled=false"]),
        ("tiny-llama", []),
        ("tiny-llama", ["lora.target_modules=all-linear"]),
        ("tiny-llama", ["lora.target_modules=[gate_proj,down_proj]"]),
        ("tiny-moe", ["moe.mode=finetune"]),
        ("tiny-moe", ["lora.enabled=false", "moe.mode=finetune"]),
    ],
)
def test_16bit_training_keeps_the_fp32_upcasts(name, overrides):
    """bf16 against fp32, autograd's saved tensors layer by layer: what bf16 keeps beyond the fp32 count at
    2 bytes an element is each recorded RMSNorm's fp32 copy of its input, the router's fp32 softmax and
    indices, and the loss's fp32 logits (within 2 elements a token of thousands)."""
    from llmopt.models import apply_strategy, load_model
    from llmopt.train._checkpointing import measure_layer_activations

    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 24))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cfg = config(*overrides, model=name)
    cost = CostModel(model_shape(name), CPU)
    lora = cost.lora(cfg, cost.shape)
    saved = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = apply_strategy(load_model(name), cfg)
        model.to(dtype).train()
        saved[dtype] = measure_layer_activations(model, batch)
    tokens = ids.numel()
    fp32, bf16 = saved[torch.float32], saved[torch.bfloat16]
    extra = [(b / 2 - f / 4) / tokens for f, b in zip(fp32[0], bf16[0], strict=True)]
    first, other, outside = cost.shape.upcast_elems(lora is not None, lora, None, cfg.moe.mode != "none")
    assert extra == pytest.approx([first] + [other] * 3, abs=2.1)
    assert (bf16[2] / 2 - fp32[2] / 4) / tokens == pytest.approx(outside, abs=2.2)


def test_activations_with_and_without_checkpointing_by_hand():
    model = CostModel(model_shape("tiny-llama"), CPU)
    workload = Workload.fixed(64)  # unmasked 64-token sequences
    tokens = 8 * 64
    full_layer = 8 * H + 2 * KV + 4 * FF + HEADS + 2  # a full fine-tune's elements per token per layer
    outside = V + 3 * H + D + 5
    none = model.activation_terms(config("lora.enabled=false", "training.micro_batch_size=8"), workload)
    assert none["saved"] == 4 * tokens * (L * full_layer + outside)
    assert none["recompute"] == 0 and none["checkpointed"] == 0
    assert none["transient_units"] == 4 * tokens * (full_layer + 2 * V)
    every = model.activation_terms(
        config("lora.enabled=false", "training.micro_batch_size=8", "checkpointing.policy=uniform"), workload
    )
    assert every["saved"] == 4 * tokens * (L * H + outside)  # each layer keeps only its input
    assert every["recompute"] == 4 * tokens * full_layer and every["checkpointed"] == L
    half = model.activation_terms(
        config(
            "lora.enabled=false",
            "training.micro_batch_size=8",
            "checkpointing.policy=uniform",
            "checkpointing.every_k_layers=2",
        ),
        workload,
    )
    assert half["saved"] == 4 * tokens * (2 * H + 2 * full_layer + outside) and half["checkpointed"] == 2


def test_memory_budget_plan_matches_the_training_code():
    """The simulated `memory_budget` policy checkpoints as many layers as plan_checkpointing does."""
    from llmopt.train import prepare

    cost = CostModel(model_shape("tiny-llama"), CPU)
    for budget in (0.0001, 0.004, 0.006, 1.0):
        cfg = config(
            "model.max_seq_len=64",
            "data.max_train_samples=64",
            "training.micro_batch_size=8",
            "checkpointing.policy=memory_budget",
            f"checkpointing.memory_budget_gb={budget}",
        )
        _, _, _, examples, plan = prepare(cfg, 8)
        workload = Workload.from_lengths([len(e["input_ids"]) for e in examples])
        assert cost.activation_terms(cfg, workload)["checkpointed"] == len(plan.layers), budget


def test_step_time_flops_by_hand():
    model = CostModel(model_shape("tiny-llama"), CPU)
    workload = Workload.fixed(32)
    head = V * H
    layers = 2 * L * (H * H + 2 * H * KV + H * H + 3 * H * FF)  # forward FLOPs per token in the layers
    attention = 2 * H * 32 * L
    full = model.time_terms(config("lora.enabled=false", "training.micro_batch_size=4"), workload, 1, 1, 0)
    assert full["flops"] == 4 * 32 * 3 * (layers + 2 * head + attention)
    lora = model.time_terms(config("training.micro_batch_size=4"), workload, 1, 1, 0)
    assert lora["flops"] == 4 * 32 * (2 * (layers + 2 * head) + 3 * attention + 6 * 57_344)
    recompute = model.time_terms(config("training.micro_batch_size=4"), workload, 1, 1, 2)
    assert recompute["flops"] - lora["flops"] == 4 * 32 * 0.5 * (layers + attention)
    # Twice the accumulation: twice the compute, one optimizer step; tokens/s rises slightly.
    one = model.predict(config("training.micro_batch_size=4"), workload)
    two = model.predict(
        config("training.micro_batch_size=4", "training.gradient_accumulation_steps=2"), workload
    )
    assert two.time["compute"] == pytest.approx(2 * one.time["compute"])
    assert two.tokens_per_s > one.tokens_per_s


def test_workload_padding_expectation():
    workload = Workload.from_lengths([10, 20])
    assert workload.padded_length(1) == 15 and workload.padded_length(2) == 17.5  # E[max of 2 draws]
    assert workload.mean_length == 15 and workload.longest == 20 and workload.masked
    assert not Workload.fixed(64).masked and Workload.fixed(64).padded_length(8) == 64


def test_prune_counts_and_reasons():
    model = CostModel(model_shape("tiny-llama"), CPU)
    workload = Workload.fixed(64)
    cases = {
        "small": config("training.micro_batch_size=4"),
        "big": config("training.micro_batch_size=32", "lora.enabled=false"),
        "four workers": config("parallelism.num_workers=4"),
        "fp16 on cpu": config("precision=fp16"),
    }
    small = model.predict(cases["small"], workload)
    budget = small.peak_bytes + 1 * MIB
    fits, pruned = prune(model, [({"case": k}, c) for k, c in cases.items()], budget, workload)
    assert [c.values["case"] for c in fits] == ["small"]
    reasons = {c.values["case"]: c.prediction.reasons for c in pruned}
    assert reasons["big"][0].startswith("memory: peak")
    assert any(r.startswith("cpus: 4 workers") for r in reasons["four workers"])
    assert any(r.startswith("precision: fp16") for r in reasons["fp16 on cpu"])
    ranking = rank(model, [({"case": k}, c) for k, c in cases.items()], None, workload)
    assert ranking.counts()["pruned"] == 2 and ranking.counts()["pruned_cpus"] == 1
    assert all(isinstance(c, Candidate) for c in ranking.ranked)
    speeds = [c.prediction.tokens_per_s for c in ranking.ranked]
    assert speeds == sorted(speeds, reverse=True)


def test_offload_saves_gpu_memory_but_not_cpu_memory():
    cfg = config("lora.enabled=false", "parallelism.zero_stage=2", "parallelism.offload_optimizer=cpu")
    base = config("lora.enabled=false", "parallelism.zero_stage=2")
    gpu = CostModel(model_shape("base-100m"), GPU)
    assert gpu.predict(cfg).peak_bytes < gpu.predict(base).peak_bytes
    assert gpu.predict(cfg).host_bytes > 0
    cpu = CostModel(model_shape("base-100m"), CPU)
    assert cpu.predict(cfg).peak_bytes == cpu.predict(base).peak_bytes


def test_upcycling_and_shape_of_a_config_only_model():
    shape = ModelShape(
        name="x", model_type="llama", num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=4,
        head_dim=16, vocab=100,
    )  # fmt: skip
    moe = shape.upcycled(num_experts=4, top_k=2)
    assert moe.is_moe and moe.params > shape.params
    model = CostModel(shape, CPU)
    up = validate_config(
        {"moe": {"mode": "upcycle", "num_experts": 4, "top_k": 2}, "lora": {"enabled": False}}
    )
    assert model.shape_for(up).num_experts == 4


@pytest.mark.slow
def test_calibrated_peak_memory_within_25_percent_of_measured():
    """Calibrate on a few steps of each tiny preset, then predict strategies it did not measure (ZeRO
    stages, checkpointing policies, QLoRA, accumulation): peak memory within 25% of the measured peak."""
    from llmopt.tune import calibrate, measure, probe_config, workload_for

    full = ["lora.enabled=false", "training.micro_batch_size=8", "data.packing=true"]
    held_out = {
        "tiny-llama": [
            [*full, "parallelism.zero_stage=0"],
            [*full, "parallelism.zero_stage=1"],
            [*full, "parallelism.zero_stage=3"],
            [
                "parallelism.zero_stage=2",
                "checkpointing.policy=uniform",
                "checkpointing.every_k_layers=2",
                "training.micro_batch_size=16",
                "data.packing=true",
            ],
            [
                "checkpointing.policy=memory_budget",
                "checkpointing.memory_budget_gb=0.01",
                "training.micro_batch_size=16",
                "data.packing=true",
            ],
            ["quantization.mode=nf4", "training.gradient_accumulation_steps=2"],
        ],
        "tiny-moe": [
            ["moe.adapter_targets=[attention,experts]", "parallelism.zero_stage=2", "data.packing=true"],
            ["lora.enabled=false", "parallelism.zero_stage=3", "checkpointing.policy=uniform"],
        ],
    }  # fmt: skip
    hardware = Hardware.detect()
    for name, strategies in held_out.items():
        base = config(
            "model.max_seq_len=64", *(["moe.mode=finetune"] if name == "tiny-moe" else []), model=name
        )
        calibration = calibrate(base, steps=3, hardware=hardware, save=False)
        for probe in calibration.probes:
            assert abs(probe.memory_error) < 0.25, (name, probe)
        model = CostModel(model_shape(name), hardware, calibration.coefficients)
        for overrides in strategies:
            cfg = probe_config(base, overrides, 3)
            measured = measure(cfg, 3)
            predicted = model.predict(cfg, workload_for(cfg))
            # In this process, its own baseline stands in for a worker's runtime memory.
            peak = measured.base_bytes + predicted.peak_bytes - predicted.memory["runtime"]
            error = (peak - measured.peak_bytes) / measured.peak_bytes
            assert abs(error) < 0.25, (name, overrides, format_bytes(peak), format_bytes(measured.peak_bytes))


def test_calibration_fit_recovers_known_constants_from_the_split_step():
    """Probes timed the way `measure` times them (pass floor, forward + backward, optimizer phase) by a
    cost model with known constants: the fit recovers every constant it claims to fit, keeps the
    defaults of those the probes cannot see, and predicts a probe it did not see exactly."""
    from llmopt.tune import DEFAULT_PROBES, probe_config, workload_for
    from llmopt.tune._calibrate import _fit, _with_fit
    from llmopt.tune._profile import Measurement

    shape, hw = model_shape("tiny-llama"), replace(CPU, cpu_bf16=True)
    defaults = Coefficients.defaults(hw)
    truth = replace(
        defaults,
        flops_per_s={**defaults.flops_per_s, "fp32": 7e10, "bf16": 9e10},
        layer_overhead_s=2.5e-3,
        overhead_scale={"bf16": 1.8},
        zero_grad_s_per_param=4e-9,
        step_overhead_s=1.5e-3,
        optimizer_s_per_param=defaults.optimizer_s_per_param * 0.6,
        zero_step_s_per_param=defaults.zero_step_s_per_param * 0.6,
        fixed_bytes=30 * MIB,
        transient_scale=2.0,
    )
    true_model = CostModel(shape, hw, truth)
    base = config("model.max_seq_len=64", "data.dataset=reverse")
    configs = [probe_config(base, overrides, 8) for _, overrides in DEFAULT_PROBES]

    def timed(cfg):
        workload = workload_for(cfg)
        _, _, trainable, total = true_model.model_states(cfg)
        acts = true_model.activation_terms(cfg, workload)
        terms = true_model.time_terms(cfg, workload, trainable, total, int(acts["checkpointed"]))
        step, parts = true_model.step_time(terms)
        own = true_model.predict(cfg, workload).peak_bytes - truth.runtime_bytes
        floor = (
            truth.layer_overhead_s
            * truth.overhead_scale.get(terms["precision"], 1.0)
            * terms["overhead_units"]
        )
        floor += truth.zero_grad_s_per_param * terms["grad_params"]
        return Measurement(
            label="", overrides=[], peak_bytes=400 * MIB + own, base_bytes=400 * MIB, setup_bytes=0,
            step_time_s=step, tokens_per_s=0.0, losses=[], checkpointed_layers=0, trainable_parameters=0,
            optimizer_time_s=parts["optimizer"] + truth.step_overhead_s, pass_floor_s=floor,
        )  # fmt: skip

    measured = [timed(c) for c in configs]
    model = CostModel(shape, hw, defaults)
    fit = _fit(model, configs, measured, defaults)
    assert fit["flops_per_s"] == pytest.approx({"fp32": 7e10, "bf16": 9e10}, rel=1e-6)
    for key in ("layer_overhead_s", "zero_grad_s_per_param", "step_overhead_s", "optimizer_s_per_param"):
        assert fit[key] == pytest.approx(getattr(truth, key), rel=1e-6), key
    # bf16's slower fixed costs come out as its own scale and leave fp32's overhead where it is.
    assert fit["overhead_scale"] == pytest.approx({"bf16": 1.8}, rel=1e-6)
    assert fit["transient_scale"] == pytest.approx(2.0, rel=1e-6)
    assert fit["fixed_bytes"] == pytest.approx(30 * MIB, rel=1e-3)
    # Leave the full fine-tune out: the LoRA probes cannot see ZeRO's hooks or the per-parameter step
    # cost, which then keep their defaults; the rates and the layer overhead still come out exact.
    loo = _fit(model, configs[:-1], measured[:-1], defaults)
    assert loo["flops_per_s"]["fp32"] == pytest.approx(7e10, rel=1e-6)
    assert loo["layer_overhead_s"] == pytest.approx(2.5e-3, rel=1e-6)
    assert loo["zero_grad_s_per_param"] == defaults.zero_grad_s_per_param
    # A probe left out of the fit is predicted exactly when the constants it depends on were seen.
    fitted = CostModel(shape, hw, _with_fit(defaults, _fit(model, configs[1:], measured[1:], defaults), 0))
    assert fitted.predict(configs[0], workload_for(configs[0])).step_time_s == pytest.approx(
        measured[0].step_time_s, rel=1e-6
    )
