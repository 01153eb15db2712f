"""`llmopt recommend --hardware 8xH100`: fine-tuning strategies for a model on GPUs, ranked without a GPU.

Every strategy of a GPU search space (`data/space-gpu.yaml`, `data/space-gpu-moe.yaml`; `--space` for
another) becomes a RunConfig through the same `SearchSpace` the Tune search samples, then a `GpuStrategy`
(the cost model's view of that config: method, quantization, adapter targets as `lora_targets` resolves
them, ZeRO stage and offload, checkpointing, batch), then a predicted peak memory per GPU and tokens/s
(`_gpu_cost`). Nothing loads weights: the model's shape comes from its config.json and a meta-device
instantiation. A strategy does not fit when its predicted device memory (what nvidia-smi would show) is
over the GPU's memory or the given budget, or when one micro-batch per GPU is already more sequences than
a step should hold; the rest are ranked by tokens/s. The best one is written as a config that
`jobs.finetune` runs on those GPUs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.config import RunConfig, format_bytes, validate_config
from llmopt.tune._catalog import GpuProfile, parse_hardware
from llmopt.tune._gpu_cost import GpuStrategy, MemoryBreakdown, StepTime, predict_memory, predict_step
from llmopt.tune._shape import ModelShape
from llmopt.tune._space import SearchSpace, load_space, space_facts

DEFAULT_SEQ_LEN = 2048
DEFAULT_GLOBAL_BATCH = 64  # sequences per optimizer step over all GPUs
DEFAULT_NETWORK_GBPS = 400.0  # one-way network bandwidth per node (an InfiniBand NDR / EFA-class link)
# Share of the limit a plan may not use: the cost model's memory is within ~10% on the published table, and
# a plan that fits by a few hundred MiB on paper is the one that dies of OOM on the cluster.
DEFAULT_HEADROOM = 0.05
_DATA = Path(__file__).with_name("data")
# What the GPU cost model reads; lora.r (and alpha) are held at their defaults: rank barely moves memory
# or speed at these sizes, and the search tunes it against the loss.
_ENUMERATED = (
    "parallelism.zero_stage",
    "parallelism.offload_optimizer",
    "parallelism.offload_params",
    "lora.enabled",
    "lora.target_modules",
    "moe.adapter_targets",
    "quantization.mode",
    "checkpointing.policy",
    "training.micro_batch_size",
)
_PARTS = ("weights", "gradients", "optimizer", "activations", "loss", "comm_buffers")


def shipped_model_configs() -> dict[str, Path]:
    """config.json files of well-known models shipped for instant answers (`--model llama-3.1-8b`)."""
    return {p.stem: p for p in sorted((_DATA / "model_configs").glob("*.json"))}


def resolve_model(model: str) -> tuple[str, str]:
    """(what to read the shape from, what the written config loads): a shipped name gives its config.json
    and the model's hub id; anything else (preset, directory, config.json, hub id) is both."""
    path = shipped_model_configs().get(model) if not Path(model).exists() else None
    if path is None:
        return model, model
    return str(path), json.loads(path.read_text())["_llmopt_hub_id"]


def gpu_space_path(is_moe: bool) -> Path:
    """The shipped GPU strategy space for a dense or an MoE model."""
    return _DATA / ("space-gpu-moe.yaml" if is_moe else "space-gpu.yaml")


def strategy_of(
    config: RunConfig,
    shape: ModelShape,
    gpus_per_node: int,
    nodes: int = 1,
    inter_node_bytes_per_s: float | None = None,
) -> GpuStrategy:
    """The cost model's view of a run config on `gpus_per_node` x `nodes` GPUs.

    Raises:
        llmopt.models.StrategyError: the config's adapter targets do not resolve for this architecture.
        ValueError: the config asks for something the GPU cost model does not model (e.g. a checkpointing
            policy other than every layer or none).
    """
    from llmopt.models import lora_targets

    lora, quant = config.lora, config.quantization.mode
    method = "full" if not lora.enabled else ("qlora" if quant != "none" else "lora")
    quantization = {"none": "none", "int8": "int8", "nf4": "nf4"}[quant]
    if quant == "nf4" and config.quantization.double_quant:
        quantization = "nf4-double"
    targets: dict[str, Any] = lora_targets(config, shape.model_type) if lora.enabled else {}
    modules = targets.get("target_modules") or ()
    ckpt = config.checkpointing
    if ckpt.policy == "memory_budget" or (ckpt.policy == "uniform" and ckpt.every_k_layers != 1):
        raise ValueError(
            "the GPU cost model knows checkpointing.policy=none or uniform with every_k_layers=1; "
            f"got {ckpt.policy} (k={ckpt.every_k_layers})"
        )
    dtype = config.precision if config.precision in ("bf16", "fp16", "fp32") else "bf16"
    return GpuStrategy(
        method=method,
        lora_rank=lora.r,
        lora_targets=modules if isinstance(modules, str) else tuple(modules),
        lora_target_parameters=tuple(targets.get("target_parameters") or ()),
        modules_to_save=tuple(targets.get("modules_to_save") or ()),
        lora_dropout=lora.dropout if method != "full" else 0.0,
        dtype=dtype,
        quantization=quantization,
        deepspeed=True,  # parallelism.backend is DeepSpeed: fp32 master and gradient partitions, buckets
        zero_stage=config.parallelism.zero_stage,
        offload_optimizer=config.parallelism.offload_optimizer == "cpu",
        offload_params=config.parallelism.offload_params == "cpu",
        gradient_checkpointing=ckpt.policy == "uniform",
        flash_attention=config.model.attn_implementation != "eager",
        micro_batch=config.training.micro_batch_size,
        seq_len=config.model.max_seq_len,
        grad_accum=config.training.gradient_accumulation_steps,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        inter_node_bytes_per_s=inter_node_bytes_per_s if nodes > 1 else None,
    )


@dataclass(frozen=True)
class GpuPlan:
    """One strategy with its prediction: the config, peak memory per GPU, step time, and why it cannot run."""

    config: RunConfig
    strategy: GpuStrategy
    memory: MemoryBreakdown
    step: StepTime
    problems: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second over all GPUs."""
        return self.step.tokens_per_s

    @property
    def step_s(self) -> float:
        """Seconds per optimizer step."""
        return self.step.seconds_per_micro * self.strategy.grad_accum

    @property
    def method(self) -> str:
        s = self.strategy
        return f"qlora-{s.quantization.split('-')[0]}" if s.method == "qlora" else s.method

    @property
    def label(self) -> str:
        s = self.strategy
        parts = [self.method]
        if s.method != "full":
            targets = "all-linear" if s.lora_targets == "all-linear" else "attention"
            if s.lora_target_parameters:
                targets += "+experts"
            parts.append(f"r{s.lora_rank} {targets}")
        zero = f"ZeRO-{s.zero_stage}"
        offload = [name for name, on in (("opt", s.offload_optimizer), ("params", s.offload_params)) if on]
        parts.append(zero + (f" offload {'+'.join(offload)}" if offload else ""))
        if s.gradient_checkpointing:
            parts.append("ckpt")
        parts.append(f"mb {s.micro_batch} x ga {s.grad_accum}")
        return ", ".join(parts)

    def breakdown(self, top: int = 3) -> str:
        """The largest parts of the per-GPU peak, e.g. `optimizer 45.1 GiB, weights 15.0 GiB, ...`."""
        parts = sorted(((getattr(self.memory, p), p) for p in _PARTS), reverse=True)[:top]
        return ", ".join(f"{name.replace('_', ' ')} {format_bytes(size)}" for size, name in parts if size > 0)

    def row(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "strategy": self.label,
            "method": self.method,
            "fits": self.fits,
            "problems": list(self.problems),
            "peak_bytes_per_gpu": self.memory.device,
            "memory": self.memory.as_dict(),
            "tokens_per_s": self.tokens_per_s,
            "step_s": self.step_s,
        }


@dataclass
class GpuRecommendation:
    """Every strategy of the space for one model on one set of GPUs, the fitting ones ranked by tokens/s."""

    model: str
    shape: ModelShape
    gpu: GpuProfile
    gpus_per_node: int
    nodes: int
    limit_bytes: float
    limit_reason: str
    host_memory: float | None
    seq_len: int
    global_batch: int
    space: str
    plans: list[GpuPlan] = field(default_factory=list)
    invalid: int = 0  # space points the config schema rejected

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def fitting(self) -> list[GpuPlan]:
        return [p for p in self.plans if p.fits]

    @property
    def rejected(self) -> list[GpuPlan]:
        return [p for p in self.plans if not p.fits]

    @property
    def best(self) -> GpuPlan | None:
        fitting = self.fitting
        return fitting[0] if fitting else None

    def best_per_method(self) -> dict[str, GpuPlan | None]:
        """The fastest fitting plan of each method (`full`, `lora`, `qlora-nf4`, `qlora-int8`), or None
        with the reason in `closest_per_method`."""
        out: dict[str, GpuPlan | None] = {}
        for plan in self.plans:
            if plan.fits and out.get(plan.method) is None:
                out[plan.method] = plan
            out.setdefault(plan.method, None)
        return out

    def closest_per_method(self) -> dict[str, GpuPlan]:
        """For each method, its plan with the smallest predicted memory (to say why nothing fits)."""
        out: dict[str, GpuPlan] = {}
        for plan in self.plans:
            if plan.method not in out or plan.memory.device < out[plan.method].memory.device:
                out[plan.method] = plan
        return out

    def hardware(self) -> str:
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus_per_node}x {self.gpu.name}{nodes}"

    def config(self, plan: GpuPlan | None = None) -> RunConfig:
        """A validated run config of `plan` (default: the best), ready for `python -m jobs.finetune`."""
        plan = plan or self.best
        if plan is None:
            raise ValueError("no strategy fits; nothing to write")
        return validate_config(plan.config.model_dump(mode="json"))

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: the setting, counts, the best per method and the ranking."""
        best = self.best_per_method()
        return {
            "model": self.model,
            "parameters": self.shape.params,
            "hardware": self.hardware(),
            "gpu": self.gpu.key,
            "gpus": self.gpus,
            "limit_bytes_per_gpu": self.limit_bytes,
            "host_memory_bytes_per_node": self.host_memory,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "space": self.space,
            "candidates": len(self.plans),
            "fit": len(self.fitting),
            "invalid": self.invalid,
            "best": self.best.row() if self.best else None,
            "best_per_method": {m: (p.row() if p else None) for m, p in best.items()},
            "closest_per_method": {m: p.row() for m, p in self.closest_per_method().items()},
        }


def _dtype_for(gpu: GpuProfile) -> str:
    """bf16 where the GPU has bf16 matrix units, else fp16 (T4)."""
    return "bf16" if gpu.bf16_supported else "fp16"


def recommend_for_hardware(
    model: str,
    hardware: str,
    *,
    nodes: int = 1,
    memory_budget: float | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    global_batch: int = DEFAULT_GLOBAL_BATCH,
    network_gbps: float = DEFAULT_NETWORK_GBPS,
    headroom: float = DEFAULT_HEADROOM,
    host_memory: float | None = None,
    space: str | Path | SearchSpace | None = None,
    base: RunConfig | Mapping[str, Any] | None = None,
    shape: ModelShape | None = None,
) -> GpuRecommendation:
    """Rank the fine-tuning strategies of a model on GPUs, in seconds and without a GPU.

    Args:
        model: A preset, a local model directory, a config.json (only the config is read), or the name of
            a shipped config (`shipped_model_configs`; the written config then loads its hub id).
        hardware: GPUs per node, e.g. `8xH100`, `4xL4`, `H200` (one).
        nodes: Nodes of that kind.
        memory_budget: Bytes per GPU to stay under (default: the GPU's memory).
        seq_len: Tokens per sequence (`model.max_seq_len`).
        global_batch: Sequences per optimizer step over all GPUs; sets gradient accumulation.
        network_gbps: One-way network bandwidth per node in Gbit/s (with nodes > 1).
        headroom: Share of the limit left free (a plan fits under ``(1 - headroom) * limit``).
        host_memory: Bytes of host memory per node for offloaded states and parameters (None: not checked;
            the plans still say how much they put there).
        space: A search space (path or loaded); default the shipped GPU space for the model.
        base: Run config (or mapping) the strategies start from (data, learning rate, ...).
        shape: The model's shape when already known (else read from `model`).

    Raises:
        ValueError / KeyError: hardware not understood, or an unknown GPU.
        llmopt.models.ModelLoadError: the model's config cannot be read.
    """
    from llmopt.models import StrategyError
    from llmopt.tune._shape import model_shape

    count, gpu = parse_hardware(hardware)
    source, load_as = resolve_model(str(model))
    if nodes < 1:
        raise ValueError(f"nodes must be at least 1, got {nodes}")
    if global_batch < 1 or seq_len < 1:
        raise ValueError("global_batch and seq_len must be at least 1")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom is a share of the memory limit in [0, 1), got {headroom}")
    shape = shape or model_shape(source)
    if isinstance(space, SearchSpace):
        loaded, space_name = space, space.source or space.name
    else:
        path = Path(space) if space is not None else gpu_space_path(shape.is_moe)
        loaded, space_name = load_space(path), str(path)
    gpus = count * nodes
    limit = float(gpu.usable_memory_bytes)
    limit_reason = f"the {gpu.name}'s {format_bytes(limit)}"
    if memory_budget is not None and memory_budget < limit:
        limit, limit_reason = float(memory_budget), f"the budget of {format_bytes(memory_budget)}"
    if headroom:
        limit_reason += f" less {headroom:.0%} headroom"
        limit *= 1 - headroom
    base_data = base.model_dump(mode="json") if isinstance(base, RunConfig) else dict(base or {})
    fixed = {
        "model": {**base_data.get("model", {}), "name_or_path": load_as, "max_seq_len": seq_len},
        "precision": _dtype_for(gpu),
        "resources": {**base_data.get("resources", {}), "accelerator": "gpu", "gpus_per_worker": 1.0},
        "parallelism": {**base_data.get("parallelism", {}), "num_workers": gpus},
    }
    base_config = validate_config({**base_data, **fixed})
    facts = space_facts(shape)
    facts.update({"hardware.accelerator": "gpu", "hardware.gpus": gpus})
    link = network_gbps * 1e9 / 8
    result = GpuRecommendation(
        model=str(model),
        shape=shape,
        gpu=gpu,
        gpus_per_node=count,
        nodes=nodes,
        limit_bytes=limit,
        limit_reason=limit_reason,
        host_memory=host_memory,
        seq_len=seq_len,
        global_batch=global_batch,
        space=space_name,
    )
    seen: set[str] = set()
    for values in loaded.grid(base_config, facts, enumerate_paths=_ENUMERATED):
        try:
            config = loaded.config_unvalidated(loaded.active(values, base_config, facts), base_config)
            micro = config.training.micro_batch_size
            accum = max(1, math.ceil(global_batch / (micro * gpus)))
            config = config.model_copy(
                update={"training": config.training.model_copy(update={"gradient_accumulation_steps": accum})}
            )
            strategy = strategy_of(config, shape, count, nodes, link)
        except (StrategyError, ValueError):
            result.invalid += 1
            continue
        memory = predict_memory(shape, strategy)
        step = predict_step(shape, strategy, gpu)
        problems = []
        if memory.device > limit:
            problems.append(
                f"needs {format_bytes(memory.device)} per GPU, over {format_bytes(limit)} ({limit_reason})"
            )
        if micro * gpus > global_batch:
            problems.append(
                f"one micro-batch of {micro} on {gpus} GPUs is {micro * gpus} sequences a step, over the "
                f"global batch of {global_batch}"
            )
        host = memory.host_offloaded * count
        if host_memory is not None and host > host_memory * (1 - headroom):
            problems.append(
                f"offloads {format_bytes(host)} per node, over its {format_bytes(host_memory)} of host memory"
            )
        plan = GpuPlan(config, strategy, memory, step, tuple(problems))
        if plan.label in seen:  # e.g. ZeRO stages that differ in nothing the model sees on one GPU
            continue
        seen.add(plan.label)
        result.plans.append(plan)
    result.plans.sort(key=_rank_key)
    return result


def _rank_key(plan: GpuPlan) -> tuple:
    """Fitting plans first, fastest first; within 0.5% of tokens/s (the model cannot tell them apart) the
    simpler and smaller: lower ZeRO stage, no offload, less memory. Plans that do not fit: smallest first."""
    if not plan.fits:
        return (1, plan.memory.device)
    s = plan.strategy
    speed = round(math.log(max(plan.tokens_per_s, 1e-9)) / 0.005)
    return (0, -speed, s.zero_stage, s.offload_optimizer + s.offload_params, plan.memory.device)


def format_recommendation(result: GpuRecommendation, top: int = 8) -> list[str]:
    """Plain-text lines: the setting, the best per method, and what does not fit and why."""
    lines = [
        f"{result.model}: {result.shape.params / 1e9:.2f}B parameters"
        + (f" ({result.shape.num_experts} experts, top-{result.shape.top_k})" if result.shape.is_moe else "")
        + f" on {result.hardware()}; seq {result.seq_len}, {result.global_batch} sequences a step; "
        f"limit {result.limit_reason}",
    ]
    for method, plan in result.best_per_method().items():
        if plan is not None:
            lines.append(
                f"  best {method}: {plan.label}: {format_bytes(plan.memory.device)} per GPU, "
                f"{plan.tokens_per_s:,.0f} tokens/s"
            )
        else:
            closest = result.closest_per_method()[method]
            lines.append(
                f"  {method}: nothing fits; the smallest ({closest.label}) {'; '.join(closest.problems)} "
                f"({closest.breakdown()})"
            )
    return lines
