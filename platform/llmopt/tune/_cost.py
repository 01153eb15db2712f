"""The analytic cost model: per-worker peak memory and step time / tokens per second of a strategy.

Memory (per worker, in the sense of `llmopt.train`'s `peak_memory_bytes`; see `_hardware`):

    peak = runtime + fixed + weights + gradients + optimizer states + saved activations + transient

* weights: every parameter at the training dtype (4 bytes fp32, 2 bf16/fp16); under QLoRA the frozen
  linear weights at 1 byte (int8) or ~0.52 byte (nf4); ZeRO-3 partitions them over the N workers and
  keeps fetched parameters gathered up to DeepSpeed's `stage3_max_live_parameters` (1e9 by default,
  so a smaller model is held whole during forward and backward); `offload_params` moves the partition to
  the host.
* gradients and optimizer states of the *trainable* parameters T (all of them in a full fine-tune; the
  adapters and `modules_to_save` under LoRA). AdamW keeps m and v in fp32 (8 bytes); ZeRO >= 1 (and
  16-bit training) also keeps an fp32 master copy and an fp32 gradient partition (4 + 4 bytes). ZeRO-1
  partitions the optimizer states over N, ZeRO-2 also the 16-bit gradients, ZeRO-3 also the weights.
  For bf16 ZeRO-2 without offload this is 2P + 18P/N, exactly DeepSpeed's own
  `deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs` (2 = 16-bit params;
  18 = 16-bit grads 2 + fp32 grads 4 + fp32 params 4 + Adam 8); for ZeRO-3 we count 20P/N where
  DeepSpeed's `stage3.estimate_zero3_model_states_mem_needs` counts 18P/N (it leaves out the 16-bit
  parameter partition). DeepSpeed's ZeRO optimizers also allocate full-size flat gradient / all-gather
  buffers, `zero_buffer_bytes_per_param` (8) per trainable parameter on every worker (measured: ZeRO-1
  and -3 took 14-27 bytes per parameter more than ZeRO-0 on the tiny preset). `offload_optimizer` moves
  master copy, fp32 gradients and Adam states to the host. On a CPU-only machine host and device are the
  same memory, so offloading saves nothing there.
* saved activations: the per-token coefficients of `ModelShape.activation_elems` times the micro-batch's
  padded tokens, at the activation dtype; a checkpointed layer keeps only its input (hidden size per
  token). The checkpointed layers follow `llmopt.train.plan_checkpointing` exactly (`none`, `uniform`
  every k-th layer, `memory_budget` simulated with the same greedy rule).
* transient: what is alive at the peak beyond the saved tensors - the layer being recomputed, gradient
  buffers, logits and their gradient, allocator slack - modelled as `transient_scale` x tokens x (one
  layer's full activations + 2 x vocab) x 4 bytes (logits, loss, norms and kernel scratch stay fp32 in
  16-bit training). The scale is calibrated.
* runtime + fixed: the process's own memory (interpreter, torch, transformers, DeepSpeed, Ray worker) and
  per-run extras (data, tokenizer, engine buffers). Zero-ish on a GPU (allocator memory only).

Step time:

    step = accumulation x (FLOPs per micro-batch / rate + per-micro-batch overhead + dequantization
           + ZeRO-3 gathers) + optimizer step + step overhead + gradient all-reduce

FLOPs per token: forward = 2 x weights one token multiplies (top-k experts only) + attention
2 x q_dim x seq per layer (causal); a full fine-tune costs 3 x forward (backward = 2 x forward); a frozen
base (LoRA/QLoRA) ~ 2 x forward (input gradients only, no weight gradients) + adapters; checkpointing
recomputes the checkpointed layers' forward. The rate is the calibrated effective FLOP/s (per thread on
CPU, per GPU), at the run's precision. Tokens/s counts real (unpadded) tokens, as the training loop does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llmopt.config import PROMPT_METHODS, RunConfig, checkpoint_layers, format_bytes, resolve_precision
from llmopt.runtime import threads_for_cpus
from llmopt.tune._hardware import GIB, Hardware
from llmopt.tune._shape import LoraCount, ModelShape
from llmopt.tune._workload import Workload

MIB = 1024**2
# bitsandbytes storage per quantized weight: int8 one byte (+ a per-row scale); nf4 two values per byte
# plus one absmax per 64-value block (fp32, or 8-bit with double quantization + an fp32 per 256 blocks).
_QUANT_BYTES = {"int8": 1.0, "nf4": 0.5 + 4 / 64, "nf4-double": 0.5 + 1 / 64 + 4 / (64 * 256)}


@dataclass
class Coefficients:
    """The machine- and runtime-dependent constants of the cost model (calibrated by `calibrate`).

    Attributes:
        flops_per_s: Effective training FLOP/s by precision: per torch thread on CPU, per GPU on GPU.
        layer_overhead_s: Fixed time per micro-batch per (decoder layers + 2): dispatch, Python, hooks.
            A checkpointed layer counts `1 + recompute_overhead` times (it runs its forward again).
        step_overhead_s: Fixed time per optimizer step (DeepSpeed engine bookkeeping, clipping).
        optimizer_s_per_param: AdamW time per trainable parameter held by this worker.
        zero_step_s_per_param: Extra optimizer-step time of DeepSpeed's ZeRO optimizers per trainable
            parameter (flat-buffer copies, fp32 master update and parameter all-gather; not partitioned).
        zero3_layer_overhead_s: ZeRO-3 parameter fetch/release hooks, per micro-batch per (layers + 2).
        offload_s_per_param: Extra time per trainable parameter with optimizer offload (copies; on GPU
            the PCIe round trip and the CPU Adam).
        dequant_s_per_param: Time to de-quantize one quantized weight once (QLoRA), per pass.
        comm_bytes_per_s: Collective bandwidth between workers (gloo on CPU, NCCL on GPU).
        comm_latency_s: Per-collective latency.
        runtime_bytes: A worker process's own memory before any model (interpreter, libraries).
        fixed_bytes: Per-run extras (data, tokenizer, engine buffers).
        zero_buffer_bytes_per_param: DeepSpeed ZeRO (stage >= 1) flat gradient and all-gather buffers per
            trainable parameter, allocated at full size on every worker.
        zero3_live_params: Parameters ZeRO-3 keeps gathered (DeepSpeed's `stage3_max_live_parameters`).
        transient_scale: Transient activation memory, in units of tokens x (full layer + 2 x vocab).
        zero_grad_s_per_param: DeepSpeed ZeRO (stage >= 1) backward hooks per trainable parameter per
            micro-batch (gradient copies into the reduce buckets).
        recompute_overhead: A checkpointed layer's extra fixed cost per micro-batch, as a share of a layer's
            (its forward again and the checkpoint wrapper; ~0.6 measured on CPU, one-token passes).
        overhead_scale: The fixed costs (`layer_overhead_s`) of a precision against the calibration's
            reference precision (fp32 on CPU), where probes measured both: a CPU without native 16-bit
            arithmetic converts around every op, so a bf16 pass of two tokens took 2.7x an fp32 one with
            AVX2 alone, and 1.1x with AVX512-BF16. A precision not listed counts 1.
    """

    flops_per_s: dict[str, float]
    layer_overhead_s: float
    step_overhead_s: float
    optimizer_s_per_param: float
    zero_step_s_per_param: float
    zero3_layer_overhead_s: float
    offload_s_per_param: float
    dequant_s_per_param: float
    comm_bytes_per_s: float
    comm_latency_s: float
    runtime_bytes: int
    fixed_bytes: int
    transient_scale: float
    zero_buffer_bytes_per_param: float = 8.0
    zero3_live_params: int = 1_000_000_000
    zero_grad_s_per_param: float = 0.0
    recompute_overhead: float = 0.6
    overhead_scale: dict[str, float] = field(default_factory=dict)

    @classmethod
    def defaults(cls, hardware: Hardware) -> Coefficients:
        """Uncalibrated constants.

        CPU figures were measured on this project's 2-core AMD EPYC development machines (a Ray Train +
        DeepSpeed worker holds ~600 MiB before the model; fp32 training ran at ~50 GFLOP/s per thread).
        bf16 depends on the CPU: with AVX512-BF16 / AMX its matmuls ran ~2.4x faster than fp32 there;
        without them bf16 steps were ~30x slower. GPU figures are round numbers for an H100-class device
        at ~40% of peak. `calibrate` replaces the speed and memory constants with measured ones.
        """
        if hardware.accelerator == "gpu":
            return cls(
                flops_per_s={"fp32": 2.0e13, "bf16": 2.5e14, "fp16": 2.5e14},
                layer_overhead_s=4e-4,
                step_overhead_s=5e-3,
                optimizer_s_per_param=2e-11,
                zero_step_s_per_param=2e-11,
                zero3_layer_overhead_s=5e-4,
                offload_s_per_param=2e-9,
                dequant_s_per_param=2e-12,
                comm_bytes_per_s=5e10,
                comm_latency_s=5e-5,
                zero_grad_s_per_param=1e-12,
                runtime_bytes=0,  # max_memory_allocated excludes the CUDA context
                fixed_bytes=64 * MIB,
                transient_scale=2.0,
            )
        return cls(
            flops_per_s={"fp32": 5.0e10, "bf16": 1.0e11 if hardware.cpu_bf16 else 1.7e9, "fp16": 1.7e9},
            layer_overhead_s=2e-3,
            step_overhead_s=2e-3,
            optimizer_s_per_param=2e-9,  # the optimizer phase timed apart from forward and backward
            zero_step_s_per_param=6e-9,
            zero3_layer_overhead_s=1e-2,
            offload_s_per_param=2e-9,
            dequant_s_per_param=4e-9,
            comm_bytes_per_s=2e9,
            comm_latency_s=2e-4,
            zero_grad_s_per_param=3e-9,
            runtime_bytes=600 * MIB,
            fixed_bytes=48 * MIB,
            transient_scale=2.5,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Coefficients:
        return cls(**data)


@dataclass
class Prediction:
    """What the cost model predicts for one strategy, per worker.

    Attributes:
        peak_bytes: Peak memory of one worker (as `peak_memory_bytes` reports it).
        memory: Breakdown of `peak_bytes` (runtime, fixed, weights, gradients, optimizer, activations,
            transient).
        host_bytes: Offloaded bytes per worker held in host memory (already in `peak_bytes` on CPU).
        step_time_s: One optimizer step.
        tokens_per_s: Real (unpadded) training tokens per second over all workers.
        time: Breakdown of `step_time_s` (compute, overhead, dequant, optimizer, communication).
        trainable_params: Parameters that train.
        total_params: Parameters of the trained model (adapters included).
        checkpointed_layers: Decoder layers recomputed in backward.
        precision: The training dtype the config resolves to here.
        fits: False when a constraint is violated; `reasons` says which.
        reasons: Why it does not fit (empty when it fits).
    """

    peak_bytes: int
    memory: dict[str, int]
    host_bytes: int
    step_time_s: float
    tokens_per_s: float
    time: dict[str, float]
    trainable_params: int
    total_params: int
    checkpointed_layers: int
    precision: str
    fits: bool = True
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_precision_for(config: RunConfig, hardware: Hardware) -> str:
    """The dtype the training code will use on this hardware (`llmopt.config.resolve_precision`)."""
    return resolve_precision(config, hardware.accelerator == "gpu", strict=False)


def checkpointed_layers(
    config: RunConfig, per_layer: list[float], inputs: list[float], outside: float
) -> list[int]:
    """Which layers training checkpoints, from (predicted) byte figures (`llmopt.config.checkpoint_layers`).

    `per_layer`, `inputs` and `outside` are the saved bytes of the memory-budget policy's measuring
    forward (longest sequence x micro-batch, fp32), as `llmopt.train.plan_checkpointing` measures them.
    """
    return checkpoint_layers(config.checkpointing, len(per_layer), per_layer, inputs, outside)[0]


class CostModel:
    """Predict memory and speed of strategies for one model on one machine.

    Args:
        shape: The model's dimensions (`model_shape(name)`).
        hardware: The machine (`Hardware.detect()`).
        coefficients: Calibrated constants (default: `Coefficients.defaults(hardware)`).
    """

    def __init__(self, shape: ModelShape, hardware: Hardware, coefficients: Coefficients | None = None):
        self.shape = shape
        self.hardware = hardware
        self.coefficients = coefficients or Coefficients.defaults(hardware)
        self._lora_cache: dict[tuple, LoraCount | None] = {}

    # --- pieces --------------------------------------------------------------------------------------
    def shape_for(self, config: RunConfig) -> ModelShape:
        """The trained model's shape (upcycling turns a dense model into an MoE)."""
        if config.moe.mode == "upcycle" and not self.shape.is_moe:
            return self.shape.upcycled(config.moe.num_experts, config.moe.upcycle_top_k)
        if config.moe.mode == "finetune" and config.moe.top_k is not None and self.shape.is_moe:
            return replace(self.shape, top_k=config.moe.top_k)
        return self.shape

    def lora(self, config: RunConfig, shape: ModelShape) -> LoraCount | None:
        """The LoRA count of the config's strategy (None for a full fine-tune)."""
        if not config.lora.enabled:
            return None
        lora, moe = config.lora, config.moe
        key = (
            shape.model_type, shape.num_experts, lora.r, str(lora.target_modules),
            tuple(lora.target_parameters), tuple(lora.modules_to_save), moe.mode, tuple(moe.adapter_targets),
            lora.method, lora.num_virtual_tokens,
        )  # fmt: skip
        if key not in self._lora_cache:
            from llmopt.models import lora_targets

            self._lora_cache[key] = shape.lora_count(
                lora_targets(config, shape.model_type), lora.r, lora.method, lora.num_virtual_tokens
            )
        return self._lora_cache[key]

    def model_states(self, config: RunConfig) -> tuple[dict[str, int], int, int, int]:
        """Weights, gradients and optimizer states per worker.

        Returns:
            `({"weights", "gradients", "optimizer"} on the device, host bytes, trainable, total params)`.
        """
        shape = self.shape_for(config)
        par = config.parallelism
        n, stage = par.num_workers, par.zero_stage
        wb = 4 if resolve_precision_for(config, self.hardware) == "fp32" else 2
        mixed = wb == 2
        lora = self.lora(config, shape)
        base = shape.params
        total = base + (lora.adapter_params + lora.saved_params if lora else 0)
        trainable = lora.trainable if lora else base
        quant = config.quantization.mode
        quantized = shape.linear_params if quant != "none" else 0
        qbytes = 0.0
        if quant != "none":
            qbytes = _QUANT_BYTES[
                "nf4-double" if quant == "nf4" and config.quantization.double_quant else quant
            ]
        weights = quantized * qbytes + (total - quantized) * wb
        host = 0.0
        c = self.coefficients
        if stage == 3:
            # Fetched parameters stay gathered up to DeepSpeed's stage3_max_live_parameters (1e9 by
            # default), so a model smaller than that is held whole during forward and backward.
            gathered = min(total, c.zero3_live_params) * wb
            if par.offload_params != "none":
                host += weights / n
                weights = gathered
            else:
                weights = weights / n + gathered
        grads = trainable * wb / (n if stage >= 2 else 1)
        shard = n if stage >= 1 else 1
        # fp32 master copy and fp32 gradient partition: DeepSpeed's ZeRO optimizers (any dtype) and its
        # 16-bit optimizer keep them; plain fp32 ZeRO-0 steps the client AdamW on the weights directly.
        fp32_copies = trainable * 8 / shard if (mixed or stage >= 1) else 0.0
        adam = trainable * 8 / shard
        optimizer = fp32_copies + adam
        buffers = trainable * c.zero_buffer_bytes_per_param if stage >= 1 else 0.0
        if par.offload_optimizer != "none":
            host += optimizer
            optimizer = 0.0
        states = {"weights": int(weights), "gradients": int(grads + buffers), "optimizer": int(optimizer)}
        return states, int(host), trainable, total

    def activation_terms(self, config: RunConfig, workload: Workload) -> dict[str, float]:
        """Activation memory terms at the peak (bytes), before the transient scale is applied.

        Returns:
            `saved` (tensors kept for backward), `transient_units` (tokens x (full layer + 2 x vocab) x
            dtype bytes, multiplied by `transient_scale`), `recompute` (the recomputed layer's tensors when
            any layer is checkpointed) and `checkpointed` (layer count).
        """
        shape = self.shape_for(config)
        lora = self.lora(config, shape)
        router_loss = config.moe.mode != "none"  # llmopt.models switches output_router_logits on
        first, other, constant, outside = shape.activation_elems(
            lora is not None, lora, shape.top_k, router_loss
        )
        full_layer = shape.activation_elems(False, None, shape.top_k)[1]
        layers = shape.num_layers
        ab = 4 if resolve_precision_for(config, self.hardware) == "fp32" else 2
        if lora is not None and lora.method in ("lora", "dora") and config.lora.dropout > 0:
            # On CPU dropout keeps a noise tensor of the input's dtype; on CUDA a bool mask.
            mask = 1.0 if self.hardware.accelerator == "cpu" else 1 / ab
            first_extra, other_extra = shape.adapter_dropout_elems(lora, mask_elems=mask)
            first, other = first + first_extra, other + other_extra
        if ab == 2:
            first_up, other_up, outside_up = shape.upcast_elems(
                lora is not None, lora, shape.top_k, router_loss
            )
            first, other, outside = first + first_up, other + other_up, outside + outside_up
        per_layer = [first] + [other] * (layers - 1)
        micro = config.training.micro_batch_size
        seq = workload.padded_length(micro)
        if lora is not None and lora.method == "prompt_tuning":
            seq += lora.virtual_tokens  # every layer keeps the virtual tokens' activations too
        tokens = micro * seq
        # Per token and layer, eager attention keeps the (heads x seq) scores and probabilities; with a
        # mask (padding, or packed blocks) sdpa keeps the (seq x seq) mask: seq more elements per token.
        attn_extra = 2 * shape.heads * seq if config.model.attn_implementation == "eager" else 0.0
        attn_extra += seq if workload.masked else 0.0
        # The memory-budget plan is measured in fp32 before DeepSpeed casts the model, on the longest
        # sequence scaled by the micro-batch size (llmopt.train.prepare).
        plan_tokens = workload.longest * micro
        chosen = checkpointed_layers(
            config,
            [(e * workload.longest + constant) * 4 * micro for e in per_layer],
            [shape.hidden * plan_tokens * 4.0] * layers,
            outside * plan_tokens * 4,
        )
        saved = outside * tokens * ab
        for i, elems in enumerate(per_layer):
            if i in chosen:
                saved += shape.hidden * tokens * ab
            else:
                saved += (elems + attn_extra) * tokens * ab + constant * ab
        # While a checkpointed layer runs backward its saved tensors exist again.
        recompute = (other + attn_extra) * tokens * ab + constant * ab if chosen else 0.0
        return {
            "saved": saved,
            # Logits, loss, norms and kernel scratch run in fp32 whatever the training dtype.
            "transient_units": tokens * (full_layer + attn_extra + 2 * shape.vocab) * 4,
            "recompute": recompute,
            "checkpointed": float(len(chosen)),
        }

    def time_terms(
        self, config: RunConfig, workload: Workload, trainable: int, total: int, checkpointed: int
    ):
        """Step-time terms: FLOPs per micro-batch and the rate multiplier, overhead units, fixed seconds.

        Returns:
            A mapping with `flops` (per micro-batch), `threads` (multiplier of the per-thread rate on
            CPU, 1 on GPU), `overhead_units` (layers + 2, checkpointed layers weighted up), `grad_params`
            (trainable parameters under ZeRO's gradient hooks), `dequant`, `gather` (seconds per
            micro-batch), `optimizer` (AdamW and ZeRO's step), `offload`, `communication` (seconds per
            step), `accumulation` and `precision`.
        """
        c, hw, shape = self.coefficients, self.hardware, self.shape_for(config)
        par, train = config.parallelism, config.training
        n, stage = par.num_workers, par.zero_stage
        precision = resolve_precision_for(config, hw)
        threads = 1.0
        if hw.accelerator == "cpu":
            own = threads_for_cpus(config.resources.cpus_per_worker)
            threads = own * min(1.0, hw.cpus / (n * own))  # oversubscribed cores are shared
        micro = train.micro_batch_size
        seq = workload.padded_length(micro)
        head = shape.vocab * shape.hidden
        layers_linear = 2 * (shape.matmul_params_per_token() - head)
        lora = self.lora(config, shape)
        # Prefix tuning attends to its virtual keys; prompt tuning runs them through every layer as well.
        keys = seq + (lora.virtual_tokens if lora else 0)
        attention = 2 * shape.q_dim * keys * shape.num_layers
        if lora is None:
            per_token = 3 * (layers_linear + 2 * head + attention)
        else:
            per_token_adapters = lora.adapter_params - lora.expert_adapter_params
            adapters = 6 * per_token_adapters if lora.method not in PROMPT_METHODS else 0
            per_token = 2 * (layers_linear + 2 * head) + 3 * attention + adapters
            # LoHa / LoKr multiply by the built delta weight: forward, input and weight gradients.
            per_token += 6 * lora.delta_elems_per_layer * shape.num_layers
            if lora.saves_lm_head:
                per_token += 2 * head
        per_micro = 0.0
        if lora is not None:  # adapters on fused experts (zero without them)
            token_part, micro_part = lora.expert_flops(shape.top_k, shape.num_experts)
            per_token += token_part * shape.num_layers
            per_micro = micro_part * shape.num_layers
        per_token += (checkpointed / shape.num_layers) * (layers_linear + attention)
        per_token += self._expert_padding_flops(shape, lora, precision, micro * seq, checkpointed)
        if lora is not None and lora.method == "prompt_tuning":
            per_token *= keys / seq  # the virtual tokens are computed like real ones, but not counted
        dequant = 0.0
        if config.quantization.mode != "none":
            dequant = (2 + checkpointed / shape.num_layers) * shape.linear_params * c.dequant_s_per_param
        wb = 4 if precision == "fp32" else 2
        gather = 0.0
        if stage == 3 and n > 1:  # parameters all-gathered in forward and again in backward
            gather = (
                2 * (n - 1) / n * total * wb / c.comm_bytes_per_s + 2 * shape.num_layers * c.comm_latency_s
            )
        local = trainable / (n if stage >= 1 else 1)
        optimizer = local * c.optimizer_s_per_param + (
            trainable * c.zero_step_s_per_param if stage >= 1 else 0
        )
        offload = local * c.offload_s_per_param if par.offload_optimizer != "none" else 0.0
        comm = 0.0
        if n > 1:
            comm = 2 * (n - 1) / n * trainable * wb / c.comm_bytes_per_s + 2 * (n - 1) * c.comm_latency_s
        return {
            "flops": micro * seq * per_token + per_micro,
            "threads": threads,
            "overhead_units": (shape.num_layers + 2)
            * (1 + c.recompute_overhead * checkpointed / shape.num_layers),
            "grad_params": float(trainable) if stage >= 1 else 0.0,
            "zero3_units": float(shape.num_layers + 2) if stage == 3 else 0.0,
            "dequant": dequant,
            "gather": gather,
            "optimizer": optimizer,
            "offload": offload,
            "communication": comm,
            "accumulation": float(train.gradient_accumulation_steps),
            "precision": precision,
        }

    def _expert_padding_flops(
        self, shape: ModelShape, lora: LoraCount | None, precision: str, tokens: int, checkpointed: int
    ) -> float:
        """Per token: the experts' products on the zero rows `llmopt.models._experts` pads each expert's
        group with on CPU in 16-bit (on average half a granule a group)."""
        if not shape.is_moe or self.hardware.accelerator != "cpu" or precision not in ("bf16", "fp16"):
            return 0.0
        from llmopt.models._experts import granule

        rows = tokens * shape.top_k
        size = granule(rows, shape.num_experts)
        if size == 1:
            return 0.0
        share = shape.num_experts * (size - 1) / 2 / rows
        forward = 2.0 * shape.top_k * sum(a * b for a, b in shape.expert_shapes().values())
        passes = (3.0 if lora is None else 2.0) + checkpointed / shape.num_layers
        weight_grads = lora.expert_flops(shape.top_k, shape.num_experts)[0] if lora is not None else 0.0
        return share * (passes * forward + weight_grads) * shape.num_layers

    def step_time(self, terms: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """Seconds per optimizer step from `time_terms`, and its breakdown."""
        c = self.coefficients
        rate = c.flops_per_s.get(terms["precision"], c.flops_per_s["fp32"]) * terms["threads"]
        accum = terms["accumulation"]
        parts = {
            "compute": accum * terms["flops"] / rate,
            "overhead": accum
            * (
                c.layer_overhead_s * c.overhead_scale.get(terms["precision"], 1.0) * terms["overhead_units"]
                + c.zero_grad_s_per_param * terms["grad_params"]
                + c.zero3_layer_overhead_s * terms["zero3_units"]
            )
            + c.step_overhead_s,
            "dequant": accum * terms["dequant"],
            "optimizer": terms["optimizer"] + terms["offload"],
            "communication": terms["communication"] + accum * terms["gather"],
        }
        return sum(parts.values()), parts

    # --- the prediction ------------------------------------------------------------------------------
    def predict(
        self, config: RunConfig, workload: Workload | None = None, budget_bytes: int | None = None
    ) -> Prediction:
        """Predict one strategy's per-worker peak memory, step time and tokens/s, and whether it fits.

        Args:
            config: The run config (its strategy sections, micro-batch, workers and resources).
            workload: Sequence lengths (default: fixed `model.max_seq_len` sequences).
            budget_bytes: Peak memory allowed per worker (default: `resources.memory_budget_gb`).

        Returns:
            The prediction; `fits` is False with reasons when it exceeds the budget, the device's
            memory, the host's memory or CPUs, or asks for a precision this hardware cannot run.
        """
        workload = workload or Workload.fixed(config.model.max_seq_len)
        c, hw = self.coefficients, self.hardware
        states, host, trainable, total = self.model_states(config)
        acts = self.activation_terms(config, workload)
        ckpt = int(acts["checkpointed"])
        on_cpu = hw.accelerator == "cpu"
        memory = {
            "runtime": c.runtime_bytes,
            "fixed": c.fixed_bytes,
            **states,
            "offloaded": host if on_cpu else 0,  # host and device are one memory on a CPU-only machine
            "activations": int(acts["saved"]),
            "transient": int(c.transient_scale * acts["transient_units"] + acts["recompute"]),
        }
        peak = sum(memory.values())
        step, parts = self.step_time(self.time_terms(config, workload, trainable, total, ckpt))
        n = config.parallelism.num_workers
        micro, accum = config.training.micro_batch_size, config.training.gradient_accumulation_steps
        tokens_per_s = n * accum * micro * workload.mean_length / step
        precision = resolve_precision_for(config, hw)
        prediction = Prediction(
            peak_bytes=int(peak),
            memory=memory,
            host_bytes=host,
            step_time_s=step,
            tokens_per_s=tokens_per_s,
            time=parts,
            trainable_params=trainable,
            total_params=total,
            checkpointed_layers=ckpt,
            precision=precision,
        )
        budget = budget_bytes
        if budget is None and config.resources.memory_budget_gb:
            budget = int(config.resources.memory_budget_gb * GIB)
        prediction.reasons = self._violations(config, prediction, budget)
        prediction.fits = not prediction.reasons
        return prediction

    def _violations(self, config: RunConfig, p: Prediction, budget: int | None) -> list[str]:
        hw, n = self.hardware, config.parallelism.num_workers
        f = format_bytes
        reasons = []
        if budget is not None and p.peak_bytes > budget:
            reasons.append(f"memory: peak {format_bytes(p.peak_bytes)} > budget {format_bytes(budget)}")
        if hw.accelerator == "gpu":
            if p.peak_bytes > hw.gpu_memory_bytes:
                reasons.append(f"memory: peak {f(p.peak_bytes)} > GPU memory {f(hw.gpu_memory_bytes)}")
            host_total = n * (p.host_bytes + self.coefficients.fixed_bytes)
            if host_total > hw.memory_bytes:
                reasons.append(f"host memory: {n} workers offload {f(host_total)} > {f(hw.memory_bytes)}")
        elif n * p.peak_bytes > hw.memory_bytes:
            reasons.append(f"host memory: {n} workers x {f(p.peak_bytes)} > {f(hw.memory_bytes)} RAM")
        cpus = n * config.resources.cpus_per_worker
        if cpus > hw.cpus:
            reasons.append(
                f"cpus: {n} workers x {config.resources.cpus_per_worker:g} CPU = {cpus:g} > {hw.cpus} "
                "on this machine (Ray would wait forever to place them)"
            )
        if hw.accelerator == "gpu" and n > max(hw.gpus, 1):
            reasons.append(f"gpus: {n} workers > {hw.gpus} GPUs")
        if hw.accelerator == "cpu" and p.precision == "fp16":
            reasons.append("precision: fp16 does not run on CPU (DeepSpeed refuses it); use fp32 or bf16")
        return reasons
