"""Per-layer gradient (activation) checkpointing: plan which decoder layers to recompute, then apply it.

`plan_checkpointing` turns a `CheckpointingConfig` into a `CheckpointingPlan` (`none`, `uniform` every k-th
layer, or `memory_budget`: the fewest layers whose saved activations fit a budget, measured on a sample
micro-batch by `measure_layer_activations`). `apply_checkpointing` switches transformers' per-layer
checkpointing on exactly for the planned layers (non-reentrant `torch.utils.checkpoint`).

`AdaptiveCheckpointing` moves a running model to a denser plan (`denser_plan`) when its memory peaks over
`monitor.memory_ceiling` of the worker's budget (`memory_budget_bytes`): recomputing more layers trades
step time for memory, which beats dying of an out-of-memory error.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmopt.config import CheckpointingConfig, ResourcesConfig, RunConfig, checkpoint_layers, format_bytes
from llmopt.config._resolve import GIB, saved_bytes

__all__ = [
    "AdaptiveCheckpointing",
    "CheckpointingPlan",
    "apply_checkpointing",
    "decoder_layers",
    "denser_plan",
    "measure_layer_activations",
    "memory_budget_bytes",
    "memory_ceiling_bytes",
    "plan_checkpointing",
]

logger = logging.getLogger(__name__)


@dataclass
class CheckpointingPlan:
    """Which decoder layers recompute their activations in backward, and what that is predicted to cost.

    Attributes:
        policy: The config policy the plan was made for.
        layers: Indices of the checkpointed decoder layers, ascending.
        num_layers: Decoder layers in the model.
        activation_bytes_per_layer: Bytes each layer saves for backward when not checkpointed (measured).
        input_bytes_per_layer: Bytes a checkpointed layer keeps instead (its input hidden state).
        predicted_activation_bytes: Total saved-for-backward bytes of one forward under this plan,
            including what is saved outside the layers (embeddings, final norm, LM head, loss).
        fits: False when even checkpointing every layer exceeds `memory_budget_gb`.
        budget_bytes: The `memory_budget` budget in bytes (GiB * 2**30), else None.
    """

    policy: str
    layers: list[int]
    num_layers: int
    activation_bytes_per_layer: list[int] | None = None
    input_bytes_per_layer: list[int] | None = None
    predicted_activation_bytes: int | None = None
    fits: bool = True
    budget_bytes: int | None = None

    def to_dict(self) -> dict:
        """Plain-JSON form of the plan (for logs and run records)."""
        return asdict(self)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated decoder blocks, in execution order; works through peft wrappers.

    Prefers the outermost instances of transformers' `GradientCheckpointingLayer`; falls back to the
    longest `layers` / `h` / `blocks` `ModuleList`.

    Raises:
        ValueError: if no decoder layers can be found.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(
            module in set(outer.modules()) for outer in found
        ):
            found.append(module)
    if found:
        return found
    lists = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks")
    ]
    if not lists:
        raise ValueError(f"found no decoder layers in {type(model).__name__}")
    return list(max(lists, key=len))


def _storage(t: torch.Tensor) -> tuple[tuple[str, int], int] | None:
    try:
        s = t.untyped_storage()
        return (str(t.device), s.data_ptr()), s.nbytes()
    except (RuntimeError, NotImplementedError):  # storage-less tensors (e.g. some tensor subclasses)
        return None


def _checkpointed(layer: nn.Module) -> bool:
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


def measure_layer_activations(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[list[int], list[int], int]:
    """Measure the bytes one forward of `batch` saves for backward, per decoder layer and outside them.

    Saved tensors are caught with `torch.autograd.graph.saved_tensors_hooks` and attributed to the layer
    running at the time (forward pre/post hooks on each layer). Tensors are deduplicated by storage, so
    a storage saved twice counts once; parameters and buffers are not activations and are skipped. A
    storage saved by several layers or outside them (rotary tables, masks) counts as outside. A
    checkpointed layer saves only what its checkpoint keeps (its inputs), counted as its activation
    bytes, so `sum(per_layer) + outside` is the total under the model's current setup. The forward runs
    with grad enabled, the batch moved to the model's device and the RNG state restored afterwards.

    Args:
        model: A causal LM (plain or peft-wrapped); its train/eval mode is used as is.
        batch: Keyword arguments of one forward (e.g. `input_ids`, `labels`).

    Returns:
        `(activation_bytes_per_layer, input_bytes_per_layer, outside_bytes)`.
    """
    layers = decoder_layers(model)
    weights = (_storage(t) for t in [*model.parameters(), *model.buffers()])
    skip = {info[0] for info in weights if info is not None}
    owners: dict[tuple[str, int], set[int]] = {}  # storage -> layers that saved it (-1: outside)
    sizes: dict[tuple[str, int], int] = {}
    held: list[torch.Tensor] = []  # keeps saved storages alive so their addresses are not reused
    inputs = [0] * len(layers)
    current: list[int] = []

    def record(t: object, owner: int) -> None:
        info = _storage(t) if isinstance(t, torch.Tensor) else None
        if info is not None and info[0] not in skip:
            owners.setdefault(info[0], set()).add(owner)
            sizes[info[0]] = info[1]
            held.append(t)

    def pack(t: torch.Tensor) -> torch.Tensor:
        record(t, current[-1] if current else -1)
        return t

    def pre_hook(idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        inputs[idx] = (_storage(hidden) or (None, 0))[1] if isinstance(hidden, torch.Tensor) else 0
        if _checkpointed(module):  # the checkpoint keeps the call's tensors until backward
            record(hidden, idx)
            for value in (*args[1:], *kwargs.values()):
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    record(t, idx if t is hidden else -1)
        current.append(idx)

    def post_hook(*_: object) -> None:  # must return None: a returned value replaces the output
        current.pop()

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(partial(pre_hook, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook))
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    per_layer = [0] * len(layers)
    outside = 0
    for key, who in owners.items():
        if len(who) == 1 and -1 not in who:
            per_layer[next(iter(who))] += sizes[key]
        else:
            outside += sizes[key]
    return per_layer, inputs, outside


def plan_checkpointing(
    model: nn.Module,
    config: CheckpointingConfig,
    sample_batch: dict[str, torch.Tensor] | None = None,
    batch_scale: float = 1.0,
) -> CheckpointingPlan:
    """Decide which decoder layers to checkpoint.

    Args:
        model: The (plain or peft-wrapped) causal LM.
        config: The run's `checkpointing` section.
        sample_batch: A representative micro-batch at the real sequence length; needed by
            `memory_budget` (one forward in train mode with checkpointing off). Other policies ignore it
            and run no forward: an un-checkpointed forward may not fit where they are meant to save memory.
        batch_scale: Multiply the measured bytes by this. Measuring one sequence and scaling by the
            micro-batch size keeps the measuring forward's own peak small (activations grow linearly
            with the batch), where a full micro-batch would spike memory as high as no checkpointing.

    Returns:
        The plan. With `memory_budget`, the fewest layers (largest saving first) whose total saved bytes
        fit the budget; if even all layers do not fit, all of them with `fits=False`.

    Raises:
        ValueError: `memory_budget` without a `sample_batch`.
    """
    n = len(decoder_layers(model))
    if config.policy != "memory_budget":
        layers, _ = checkpoint_layers(config, n)
        return CheckpointingPlan(policy=config.policy, layers=layers, num_layers=n)
    if sample_batch is None:
        raise ValueError("checkpointing.policy='memory_budget' needs a sample micro-batch to measure")

    # Measure every layer un-checkpointed, in train mode; restore the model afterwards.
    active = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
    was_training = model.training
    model.train()
    try:
        for layer in active:
            layer.gradient_checkpointing = False
        acts, inputs, outside = measure_layer_activations(model, sample_batch)
        acts = [int(a * batch_scale) for a in acts]
        inputs = [int(i * batch_scale) for i in inputs]
        outside = int(outside * batch_scale)
    finally:
        for layer in active:
            layer.gradient_checkpointing = True
        model.train(was_training)
    layers, fits = checkpoint_layers(config, n, acts, inputs, outside)
    return CheckpointingPlan(
        policy=config.policy,
        layers=layers,
        num_layers=n,
        activation_bytes_per_layer=acts,
        input_bytes_per_layer=inputs,
        predicted_activation_bytes=int(saved_bytes(acts, inputs, outside, layers)),
        fits=fits,
        budget_bytes=int(config.memory_budget_gb * GIB),
    )


def apply_checkpointing(model: nn.Module, plan: CheckpointingPlan) -> None:
    """Turn gradient checkpointing on for exactly the plan's layers (and off for the others).

    Mirrors `PreTrainedModel._set_gradient_checkpointing` per layer, with non-reentrant
    `torch.utils.checkpoint`: it needs no `enable_input_require_grads()`, so frozen embeddings (peft) are
    fine. Sets `config.use_cache = False` when any layer is checkpointed.

    Raises:
        ValueError: if the model's layer count differs from the plan's, or its layers cannot checkpoint.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = decoder_layers(model)
    if len(layers) != plan.num_layers:
        raise ValueError(f"plan is for {plan.num_layers} layers, the model has {len(layers)}")
    func = partial(checkpoint, use_reentrant=False)
    for i, layer in enumerate(layers):
        if isinstance(layer, GradientCheckpointingLayer):  # its forward checkpoints itself when flagged
            layer.gradient_checkpointing = i in plan.layers
            layer._gradient_checkpointing_func = func
        elif i in plan.layers:
            raise ValueError(f"{type(layer).__name__} is no GradientCheckpointingLayer; cannot checkpoint it")
    if plan.layers:
        config = getattr(model, "config", None)
        if config is not None:
            config.use_cache = False


def _uniform_stride(layers: list[int], num_layers: int) -> int | None:
    """k when `layers` is exactly every k-th layer from 0 (a lone layer 0 counts as k = num_layers)."""
    if layers == [0]:
        return num_layers
    if len(layers) < 2 or layers[0] != 0:
        return None
    k = layers[1] - layers[0]
    return k if layers == list(range(0, num_layers, k)) else None


def denser_plan(plan: CheckpointingPlan) -> CheckpointingPlan | None:
    """The next denser plan after `plan`, each step roughly halving what the decoder layers keep.

    A checkpointed layer keeps only its input, a small part of what it saves otherwise, so in a stack of
    similar layers the saved activations follow the share of layers not checkpointed: nothing goes to
    every second layer (`uniform` k=2), every k-th layer to every (k//2)-th, and an irregular choice
    (`memory_budget`) adds every second layer it leaves out. Uniform steps keep the plan one a config can
    state (`checkpointing.policy=uniform`, `every_k_layers`). Measured per-layer figures are carried
    over and the prediction redone, so a plan stays comparable with the one it replaced.

    Returns:
        The denser plan, or None when every layer is already checkpointed.
    """
    n = plan.num_layers
    current = sorted(set(plan.layers))
    if len(current) >= n:
        return None
    stride = 2
    if current:
        k = _uniform_stride(current, n)
        stride = None if k is None else max(1, k // 2)
    if stride is not None:
        policy, layers = "uniform", list(range(0, n, stride))
    else:
        left_out = [i for i in range(n) if i not in current]
        policy, layers = plan.policy, sorted([*current, *left_out[::2]])
    predicted, fits = None, True
    acts, inputs = plan.activation_bytes_per_layer, plan.input_bytes_per_layer
    if acts is not None and inputs is not None and plan.predicted_activation_bytes is not None:
        outside = plan.predicted_activation_bytes - saved_bytes(acts, inputs, 0.0, current)
        predicted = int(saved_bytes(acts, inputs, outside, layers))
        fits = plan.budget_bytes is None or predicted <= plan.budget_bytes
    return CheckpointingPlan(
        policy=policy,
        layers=layers,
        num_layers=n,
        activation_bytes_per_layer=acts,
        input_bytes_per_layer=inputs,
        predicted_activation_bytes=predicted,
        fits=fits,
        budget_bytes=plan.budget_bytes,
    )


def memory_budget_bytes(resources: ResourcesConfig, device: torch.device | str = "cpu") -> int:
    """Memory one training worker may peak at: the ceiling `monitor.memory_ceiling` is a share of it.

    `resources.memory_budget_gb` when set (the figure the strategy search prunes with); otherwise the
    whole GPU on CUDA, and on CPU the worker's Ray reservation (`resources.memory_gb_per_worker`) or,
    without one, the machine's memory: what the worker can take before the kernel or CUDA refuses.
    """
    if resources.memory_budget_gb:
        return int(resources.memory_budget_gb * GIB)
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if resources.memory_gb_per_worker:
        return int(resources.memory_gb_per_worker * GIB)
    import psutil

    return int(psutil.virtual_memory().total)


def memory_ceiling_bytes(config: RunConfig, device: torch.device | str = "cpu") -> int:
    """`monitor.memory_ceiling` x the worker's memory budget, in bytes."""
    return int(config.monitor.memory_ceiling * memory_budget_bytes(config.resources, device))


class AdaptiveCheckpointing:
    """Switches a training model to a denser checkpointing plan when its memory peaks over a ceiling.

    The caller decides when (at checkpoint boundaries, so a restored checkpoint carries the plan its steps
    ran with) and on which peak: every rank must pass the same figure (the maximum over ranks), so that
    all of them change together and their DeepSpeed engines keep running the same computation. The switch
    flips transformers' per-layer flag, which each layer reads on every forward; it takes effect on a model
    already wrapped by a DeepSpeed engine (`engine.module`), whose hooks sit outside the layers' forwards.

    Args:
        model: The model whose decoder layers are flagged (`engine.module` under DeepSpeed).
        plan: The plan the model runs with now.
        budget_bytes: The worker's memory budget (`memory_budget_bytes`).
        ceiling: Share of the budget a peak may reach (`monitor.memory_ceiling`).
        enabled: False: only report the ceiling, never switch (`monitor.adaptive_checkpointing`).
        rank: This worker's rank, for the log lines.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: CheckpointingPlan,
        budget_bytes: int,
        ceiling: float,
        enabled: bool = True,
        rank: int = 0,
    ):
        self.model, self.plan, self.enabled, self.rank = model, plan, enabled, rank
        self.budget_bytes, self.ceiling = int(budget_bytes), ceiling
        self.ceiling_bytes = int(ceiling * budget_bytes)
        self._said_densest = False

    def decide(self, peak_bytes: int) -> dict[str, Any] | None:
        """Switch to the next denser plan if `peak_bytes` is over the ceiling.

        Returns:
            The switch as metrics.jsonl records it (`from_layers`, `to_layers`, `peak_memory_bytes`,
            `ceiling_bytes`, `reason`), or None when nothing changed (under the ceiling, disabled, or every
            layer already checkpointed: said once in the log, and training goes on as it is).
        """
        if not self.enabled or peak_bytes <= self.ceiling_bytes:
            return None
        denser = denser_plan(self.plan)
        over = (
            f"peak memory {format_bytes(peak_bytes)} is over the ceiling {format_bytes(self.ceiling_bytes)} "
            f"(monitor.memory_ceiling={self.ceiling:g} of a {format_bytes(self.budget_bytes)} budget)"
        )
        if denser is None:
            if not self._said_densest:
                self._said_densest = True
                logger.warning(
                    "rank %d: %s, and all %d decoder layers are already checkpointed: no denser plan exists; "
                    "lower training.micro_batch_size or model.max_seq_len, or raise the budget",
                    self.rank,
                    over,
                    self.plan.num_layers,
                )
            return None
        apply_checkpointing(self.model, denser)
        reason = f"{over}; checkpointing layers {denser.layers} of {denser.num_layers}"
        switch = {
            "from_layers": len(self.plan.layers),
            "to_layers": len(denser.layers),
            "peak_memory_bytes": int(peak_bytes),
            "ceiling_bytes": self.ceiling_bytes,
            "reason": reason,
        }
        logger.warning(
            "rank %d: denser gradient checkpointing, %d -> %d layers: %s",
            self.rank,
            switch["from_layers"],
            switch["to_layers"],
            reason,
        )
        self.plan = denser
        return switch
