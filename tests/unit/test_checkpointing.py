"""Per-layer gradient checkpointing: plans, unchanged maths, measured memory savings, memory budgets, peft."""

import ctypes
import gc
import json
import os

import pytest
import torch

from llmopt.config import CheckpointingConfig
from llmopt.models import load_model
from llmopt.train._checkpointing import (
    CheckpointingPlan,
    apply_checkpointing,
    decoder_layers,
    measure_layer_activations,
    plan_checkpointing,
)

GIB = 1024**3


def _batch(seed: int = 0, seq: int = 512) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    ids = torch.randint(0, 1000, (2, seq))
    return {"input_ids": ids, "labels": ids}


def _cfg(policy: str = "none", **kwargs) -> CheckpointingConfig:
    return CheckpointingConfig(policy=policy, **kwargs)


def _reset(model) -> None:
    apply_checkpointing(model, CheckpointingPlan("none", [], len(decoder_layers(model))))
    model.zero_grad(set_to_none=True)
    model.train()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return load_model("tiny-moe")


def _raw_saved_bytes(model, batch) -> int:
    """Independent counter: unique non-weight storages saved for backward by one forward."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, torch.Tensor] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(t.untyped_storage().nbytes() for t in seen.values())


def _malloc_growth(model, batch) -> int | None:
    """Allocator-level cross-check (glibc only): bytes in use grown by a forward whose graph is kept."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fields = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks"]

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in [*fields, "keepcost"]]

    mallinfo2.restype = Mallinfo2

    def in_use() -> int:
        gc.collect()
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    for _ in range(2):  # the first pass warms lazily built caches
        before = in_use()
        loss = model(**batch).loss  # the logits are dropped, the graph is kept through the loss
        growth = in_use() - before
        loss.backward()
        del loss
    model.zero_grad(set_to_none=True)
    return growth


def test_uniform_and_none_plans(llama):
    _reset(llama)
    assert plan_checkpointing(llama, _cfg("uniform", every_k_layers=2)).layers == [0, 2]
    assert plan_checkpointing(llama, _cfg("uniform", every_k_layers=3)).layers == [0, 3]
    assert plan_checkpointing(llama, _cfg("uniform", every_k_layers=1)).layers == [0, 1, 2, 3]
    none = plan_checkpointing(llama, _cfg("none"), _batch())  # other policies than memory_budget: no forward
    assert none.layers == [] and none.num_layers == 4 and none.predicted_activation_bytes is None
    json.dumps(none.to_dict())

    llama.config.use_cache = True
    apply_checkpointing(llama, plan_checkpointing(llama, _cfg("uniform", every_k_layers=2)))
    assert [layer.gradient_checkpointing for layer in decoder_layers(llama)] == [True, False, True, False]
    assert llama.config.use_cache is False
    _reset(llama)
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(llama))
    with pytest.raises(ValueError, match="sample micro-batch"):
        plan_checkpointing(llama, _cfg("memory_budget", memory_budget_gb=1.0))
    with pytest.raises(ValueError, match="layers"):
        apply_checkpointing(llama, CheckpointingPlan("uniform", [0], 6))


@pytest.mark.parametrize("name", ["llama", "moe"])
def test_checkpointing_keeps_loss_and_gradients(name, request):
    model = request.getfixturevalue(name)
    batch = _batch(1)
    results = []
    for policy in ("none", "uniform"):
        _reset(model)
        apply_checkpointing(model, plan_checkpointing(model, _cfg(policy, every_k_layers=1)))
        flags = {layer.gradient_checkpointing for layer in decoder_layers(model)}
        assert flags == {policy == "uniform"}
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    _reset(model)
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert grads0.keys() == grads1.keys() and len(grads0) == len(list(model.parameters()))
    for key, grad in grads0.items():
        torch.testing.assert_close(grads1[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_checkpointing_all_layers_saves_memory(llama):
    _reset(llama)
    batch = _batch()
    acts, inputs, outside = measure_layer_activations(llama, batch)
    full = sum(acts) + outside
    assert full == _raw_saved_bytes(llama, batch)  # attribution neither loses nor double counts bytes
    assert inputs == [2 * 512 * 256 * 4] * 4  # fp32 hidden states of the micro-batch
    assert all(a > 4 * i for a, i in zip(acts, inputs, strict=True))

    apply_checkpointing(llama, plan_checkpointing(llama, _cfg("uniform", every_k_layers=1)))
    ckpt_acts, ckpt_inputs, ckpt_outside = measure_layer_activations(llama, batch)
    checkpointed = sum(ckpt_acts) + ckpt_outside
    assert ckpt_acts == ckpt_inputs  # a checkpointed layer keeps only its input
    # Hooks see nothing inside a checkpointed layer, only its saved input; the measured total adds just
    # the tensors the checkpoint keeps in its closure (rotary tables, position ids).
    raw = _raw_saved_bytes(llama, batch)
    assert raw <= checkpointed < raw + 0.05 * checkpointed
    print(f"saved for backward: none={full} B, all checkpointed={checkpointed} B")
    assert checkpointed < 0.5 * full
    _reset(llama)


def test_memory_budget(llama):
    _reset(llama)
    batch = _batch(2)
    acts, inputs, outside = measure_layer_activations(llama, batch)
    high = sum(acts) + outside  # nothing checkpointed
    low = sum(inputs) + outside  # everything checkpointed
    assert low < high

    budget = low + 0.4 * (high - low)
    plan = plan_checkpointing(llama, _cfg("memory_budget", memory_budget_gb=budget / GIB), batch)
    assert 0 < len(plan.layers) < plan.num_layers and plan.fits
    assert plan.predicted_activation_bytes <= budget
    assert plan.budget_bytes == int(budget)
    for layer in plan.layers:  # the fewest layers: un-checkpointing any one of them breaks the budget
        saving = plan.activation_bytes_per_layer[layer] - plan.input_bytes_per_layer[layer]
        assert plan.predicted_activation_bytes + saving > budget

    apply_checkpointing(llama, plan)
    again = plan_checkpointing(llama, _cfg("memory_budget", memory_budget_gb=budget / GIB), batch)
    assert again == plan  # planning measures with checkpointing off ...
    flags = [layer.gradient_checkpointing for layer in decoder_layers(llama)]
    assert flags == [i in plan.layers for i in range(4)]  # ... and restores the flags
    acts, _, outside = measure_layer_activations(llama, batch)
    measured = sum(acts) + outside
    print(f"budget={int(budget)} B, layers={plan.layers}, predicted={plan.predicted_activation_bytes} B,")
    print(f"measured after apply_checkpointing={measured} B")
    assert abs(measured - plan.predicted_activation_bytes) <= 0.1 * plan.predicted_activation_bytes
    growth = _malloc_growth(llama, batch)
    print(f"allocator growth holding the graph={growth} B")
    if growth is not None:
        assert abs(growth - plan.predicted_activation_bytes) <= 0.1 * plan.predicted_activation_bytes
    _reset(llama)

    roomy = plan_checkpointing(llama, _cfg("memory_budget", memory_budget_gb=2 * high / GIB), batch)
    assert roomy.layers == [] and roomy.fits and roomy.predicted_activation_bytes == high
    tight = plan_checkpointing(llama, _cfg("memory_budget", memory_budget_gb=0.5 * low / GIB), batch)
    assert tight.layers == [0, 1, 2, 3] and tight.fits is False
    assert tight.predicted_activation_bytes == low


def test_lora_gradients_flow_with_checkpointing():
    peft = pytest.importorskip("peft")
    batch = _batch(3, seq=256)
    grads = []
    for policy in ("none", "uniform"):
        torch.manual_seed(0)
        lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = peft.get_peft_model(load_model("tiny-llama"), lora)
        plan = plan_checkpointing(model, _cfg(policy, every_k_layers=1))
        apply_checkpointing(model, plan)  # non-reentrant: no enable_input_require_grads() needed
        assert sum(layer.gradient_checkpointing for layer in decoder_layers(model)) == len(plan.layers)
        model.train()
        model(**batch).loss.backward()
        trainable = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert all(g is not None and g.abs().sum() > 0 for g in trainable.values())
        grads.append(trainable)
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_checkpoint_layer_choice_is_one_function_for_training_and_the_cost_model():
    from llmopt.config import checkpoint_layers, load_config
    from llmopt.tune import checkpointed_layers

    per_layer, inputs = [400.0, 300.0, 200.0, 100.0], [10.0, 10.0, 10.0, 10.0]
    gib = 2**30

    def policy(*overrides):
        return load_config(None, list(overrides)).checkpointing

    assert checkpoint_layers(policy(), 4) == ([], True)
    assert checkpoint_layers(policy("checkpointing.policy=uniform", "checkpointing.every_k_layers=2"), 4) == (
        [0, 2],
        True,
    )
    # A budget of 500 bytes: layer 0 (saves 390) leaves 610, layer 1 too (saves 290) 320.
    budget = policy("checkpointing.policy=memory_budget", f"checkpointing.memory_budget_gb={500 / gib}")
    assert checkpoint_layers(budget, 4, per_layer, inputs, 0.0) == ([0, 1], True)
    tight = policy("checkpointing.policy=memory_budget", f"checkpointing.memory_budget_gb={30 / gib}")
    assert checkpoint_layers(tight, 4, per_layer, inputs, 0.0) == ([0, 1, 2, 3], False)
    config = load_config(
        None, ["checkpointing.policy=memory_budget", f"checkpointing.memory_budget_gb={500 / gib}"]
    )
    assert checkpointed_layers(config, per_layer, inputs, 0.0) == [0, 1]
    with pytest.raises(ValueError, match="per-layer byte figures for all 4 layers"):
        checkpoint_layers(budget, 4, per_layer[:2], inputs[:2])


def test_denser_plans_halve_what_is_left_until_every_layer():
    from llmopt.train._checkpointing import denser_plan

    def chain(layers: list[int], n: int, policy: str = "uniform") -> list[list[int]]:
        plans, plan = [], CheckpointingPlan(policy, layers, n)
        while (plan := denser_plan(plan)) is not None:
            plans.append(plan.layers)
        return plans

    assert chain([], 4, "none") == [[0, 2], [0, 1, 2, 3]]
    assert chain([0, 4], 8) == [[0, 2, 4, 6], list(range(8))]  # every 4th -> every 2nd -> every layer
    assert chain([0, 3], 4) == [[0, 1, 2, 3]]  # k=3 -> k//2=1
    assert chain([0], 6) == [[0, 3], [0, 1, 2, 3, 4, 5]]  # a lone layer 0 is every 6th
    assert chain([], 1, "none") == [[0]]
    assert chain([0, 1, 2, 3], 4) == []
    # An irregular (memory_budget) choice gains every second layer it leaves out.
    assert chain([1, 2], 6, "memory_budget") == [[0, 1, 2, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert denser_plan(CheckpointingPlan("none", [], 4)).policy == "uniform"
    assert denser_plan(CheckpointingPlan("memory_budget", [1, 2], 6)).policy == "memory_budget"


def test_denser_plan_keeps_the_measured_figures_and_predicts_less(llama):
    from llmopt.train._checkpointing import denser_plan

    _reset(llama)
    batch = _batch(4)
    acts, inputs, outside = measure_layer_activations(llama, batch)
    roomy = plan_checkpointing(llama, _cfg("memory_budget", memory_budget_gb=2 * sum(acts) / GIB), batch)
    assert roomy.layers == []
    plans = [roomy]
    while (plan := denser_plan(plans[-1])) is not None:
        plans.append(plan)
    assert [p.layers for p in plans] == [[], [0, 2], [0, 1, 2, 3]]
    predicted = [p.predicted_activation_bytes for p in plans]
    assert predicted[0] == sum(acts) + outside and predicted[-1] == sum(inputs) + outside
    assert predicted[0] > predicted[1] > predicted[2]
    # Every layer saves about the same, so every second layer checkpointed roughly halves the layers' part.
    layers_part = [p - outside for p in predicted]
    assert 0.4 < layers_part[1] / layers_part[0] < 0.6
    for p in plans:
        assert p.activation_bytes_per_layer == acts and p.budget_bytes == roomy.budget_bytes and p.fits
        apply_checkpointing(llama, p)
        a, _, o = measure_layer_activations(llama, batch)
        assert abs(sum(a) + o - p.predicted_activation_bytes) <= 0.1 * p.predicted_activation_bytes
    _reset(llama)


def test_memory_budget_and_ceiling_arithmetic():
    import psutil

    from llmopt.config import load_config
    from llmopt.train._checkpointing import memory_budget_bytes, memory_ceiling_bytes

    def config(*overrides):
        return load_config(None, list(overrides))

    both = config("resources.memory_budget_gb=2", "resources.memory_gb_per_worker=3")
    assert memory_budget_bytes(both.resources) == 2 * GIB  # the budget wins over the reservation
    assert memory_budget_bytes(config("resources.memory_gb_per_worker=3").resources) == 3 * GIB
    assert memory_budget_bytes(config().resources) == psutil.virtual_memory().total
    assert memory_ceiling_bytes(both) == int(0.9 * 2 * GIB)  # monitor.memory_ceiling defaults to 0.9
    low = config("resources.memory_budget_gb=2", "monitor.memory_ceiling=0.25")
    assert memory_ceiling_bytes(low, "cpu") == GIB // 2
    if torch.cuda.is_available():  # a GPU worker's budget is its device, not the host's memory
        total = torch.cuda.get_device_properties(0).total_memory
        assert memory_budget_bytes(config("resources.memory_gb_per_worker=3").resources, "cuda:0") == total
        assert memory_budget_bytes(both.resources, "cuda:0") == 2 * GIB


def test_adaptive_checkpointing_switches_over_the_ceiling_only(llama, caplog):
    from llmopt.train._checkpointing import AdaptiveCheckpointing

    _reset(llama)
    batch = _batch(5, seq=256)
    plan = plan_checkpointing(llama, _cfg("none"))
    off = AdaptiveCheckpointing(llama, plan, budget_bytes=1000, ceiling=0.5, enabled=False)
    assert off.ceiling_bytes == 500 and off.decide(10**12) is None and off.plan is plan

    adaptive = AdaptiveCheckpointing(llama, plan, budget_bytes=1000, ceiling=0.5)
    assert adaptive.decide(500) is None  # at the ceiling is not over it
    saved = [sum(measure_layer_activations(llama, batch)[0])]
    switches = []
    with caplog.at_level("WARNING", logger="llmopt.train._checkpointing"):
        for _ in range(4):
            switch = adaptive.decide(501)
            if switch is not None:
                switches.append(switch)
                saved.append(sum(measure_layer_activations(llama, batch)[0]))
    assert [(s["from_layers"], s["to_layers"]) for s in switches] == [(0, 2), (2, 4)]
    assert all(s["peak_memory_bytes"] == 501 and s["ceiling_bytes"] == 500 for s in switches)
    assert "over the ceiling" in switches[0]["reason"] and "[0, 2]" in switches[0]["reason"]
    json.dumps(switches)
    assert [layer.gradient_checkpointing for layer in decoder_layers(llama)] == [True] * 4
    assert saved[0] > saved[1] > saved[2]  # the layers really keep less for backward
    messages = [r.getMessage() for r in caplog.records]
    assert sum("denser gradient checkpointing" in m for m in messages) == 2
    assert sum("no denser plan exists" in m for m in messages) == 1  # said once, not at every decision
    _reset(llama)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's clear_refs")
def test_peak_memory_window_falls_after_a_restart():
    from llmopt.train._metrics import PeakMemoryWindow, peak_memory_since_reset

    memory = PeakMemoryWindow("cpu", pressure_bytes=0)  # always under pressure: every reset trims
    assert memory.resettable
    size = 256 * 2**20
    big = torch.ones(size // 4)
    del big
    high = memory.measure()
    assert memory.lifetime >= high >= size
    memory.restart()
    assert memory.window == 0
    low = memory.measure()
    assert low < high - size // 2  # the freed tensor is no longer in the new window's peak
    assert memory.lifetime >= high  # ... but stays in the lifetime peak
    again = torch.ones(size // 4)
    del again
    memory.exclude()  # left out of the window, not out of the lifetime
    assert memory.measure() < high - size // 2 and peak_memory_since_reset() < high - size // 2
    assert memory.lifetime >= high
