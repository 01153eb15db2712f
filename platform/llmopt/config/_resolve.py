"""Decisions derived from a config that training and the cost model must make identically.

Torch-free: the strategy search predicts what training will do with these same functions, on machines
(and for hardware) it has not run on.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmopt.config._schema import CheckpointingConfig, RunConfig

GIB = 2**30


class PrecisionError(ValueError):
    """The requested precision cannot run on the chosen device."""


def resolve_precision(
    config: RunConfig, use_gpu: bool, bf16_supported: bool = True, strict: bool = True
) -> str:
    """The training dtype actually used: `auto` is bf16 on a GPU that supports it, else fp32.

    fp32 is the CPU default: bf16 speed on a CPU depends on its bf16 units (AVX512-BF16 CPUs ran LoRA steps
    1.1-1.4x faster in bf16; CPUs without them many times slower), so the strategy search measures both.

    Args:
        config: The run config (its `precision`).
        use_gpu: Whether the workers train on GPUs.
        bf16_supported: Whether those GPUs have bf16 units.
        strict: Raise on a precision the device cannot run; with False it is returned as asked (the cost
            model reports such a strategy as infeasible itself).

    Raises:
        PrecisionError: `strict` and fp16 on CPU (DeepSpeed refuses it) or bf16 on a GPU without support.
    """
    precision = config.precision
    if precision == "auto":
        return "bf16" if use_gpu and bf16_supported else "fp32"
    if strict and precision == "fp16" and not use_gpu:
        raise PrecisionError("precision='fp16' on CPU: DeepSpeed refuses fp16 there; use precision=fp32")
    if strict and precision == "bf16" and use_gpu and not bf16_supported:
        raise PrecisionError("precision='bf16' on a GPU without bf16 support; use precision=fp16 or fp32")
    return precision


def checkpoint_layers(
    policy: CheckpointingConfig,
    num_layers: int,
    per_layer: Sequence[float] = (),
    inputs: Sequence[float] = (),
    outside: float = 0.0,
) -> tuple[list[int], bool]:
    """Which decoder layers gradient checkpointing covers, and whether the plan fits its budget.

    Args:
        policy: The `checkpointing` section.
        num_layers: Decoder layers of the model.
        per_layer: With `memory_budget`: bytes each layer saves for backward when not checkpointed.
        inputs: With `memory_budget`: bytes each layer keeps when checkpointed (its input).
        outside: With `memory_budget`: saved bytes outside the decoder layers.

    Returns:
        `(layers, fits)`: `none` checkpoints nothing, `uniform` every k-th layer; `memory_budget` the fewest
        layers, largest saving first, whose saved bytes fit the budget, or every layer with `fits=False`
        when even that does not fit.
    """
    if policy.policy == "none":
        return [], True
    if policy.policy == "uniform":
        return list(range(0, num_layers, policy.every_k_layers)), True
    budget = int((policy.memory_budget_gb or 0) * GIB)
    if len(per_layer) != num_layers or len(inputs) != num_layers:
        raise ValueError(
            f"checkpointing.policy='memory_budget' needs per-layer byte figures for all {num_layers} layers"
        )

    def saved(layers: list[int]) -> float:
        return saved_bytes(per_layer, inputs, outside, layers)

    if saved(list(range(num_layers))) > budget:
        return list(range(num_layers)), False
    by_saving = sorted(range(num_layers), key=lambda i: (inputs[i] - per_layer[i], i))
    layers: list[int] = []
    while saved(layers) > budget:  # ends by all layers, which fit
        layers = sorted([*layers, by_saving[len(layers)]])
    return layers, True


def saved_bytes(
    per_layer: Sequence[float], inputs: Sequence[float], outside: float, layers: Sequence[int]
) -> float:
    """Bytes saved for backward when exactly `layers` are checkpointed (see `checkpoint_layers`)."""
    chosen = set(layers)
    return outside + sum(inputs[i] if i in chosen else a for i, a in enumerate(per_layer))


def format_bytes(n: float) -> str:
    """Human-readable binary size (e.g. `1.5 GiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
