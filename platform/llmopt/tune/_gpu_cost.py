"""A GPU cost model from a model's config.json and a GPU profile: peak memory per GPU and tokens per second.

Pure arithmetic (no torch): parameter counts and saved-activation elements come from `ModelShape`
(`_shape.py`); GPU figures (memory bandwidth, dense peak FLOP/s, NVLink/PCIe bandwidth) from `gpus.yaml`
through `GpuProfile`. `compare_published()` holds the predictions against `published_finetuning.yaml`.

Memory per GPU (bytes), the sum of

* weights: 16-bit (or fp32) parameters; QLoRA's frozen linear weights at the storage size of the format
  (nf4: half a byte + an fp32 absmax per 64 values; int8: one byte; GPTQ int4: half a byte + fp16 scale and
  packed zero per group of 128). ZeRO-3 / FSDP full-shard keeps 1/N of them plus the gathered units
  (the current and the prefetched decoder layer, or a layer and the output head at the loss); parameter
  offload keeps only the gathered units.
* gradients of the trainable parameters (all of them in a full fine-tune; adapters and `modules_to_save`
  under LoRA) at the training dtype, 1/N under ZeRO-2/3.
* optimizer states: AdamW's m and v, fp32 (8 bytes) in mixed precision, at the dtype in pure 16-bit
  training (LitGPT `bf16-true`, torchtune `dtype: bf16`), 2 bytes for 8-bit AdamW; mixed precision adds an
  fp32 master copy (4) for 16-bit trainables, and DeepSpeed's ZeRO optimizers an fp32 gradient partition
  (4). ZeRO >= 1 divides them by N; optimizer offload moves them (and the master copy) to the host.
* activations: `ModelShape.activation_elems` (what autograd saves per token, sdpa/flash attention) times
  the micro-batch's tokens at the activation dtype, plus in 16-bit training the fp32 copies its norms and
  router keep (`ModelShape.upcast_elems`). bitsandbytes / GPTQ quantized linears save their input
  for the backward whether or not the layer carries an adapter, so QLoRA adds those inputs. An adapter's
  input dropout (`lora_dropout` above 0) keeps a one-byte mask, and its output in place of the input
  the adapter kept (`ModelShape.adapter_dropout_elems`). With gradient
  checkpointing every decoder layer keeps only its input, and one layer is alive again while it is
  recomputed. Eager (non-flash) attention adds the (heads x seq) probabilities per token and layer.
* the loss: `loss_bytes_per_logit` x tokens x vocab, what the output head and cross-entropy hold at once
  (framework-dependent, see `LOSS_BYTES`).
* communication buffers: DeepSpeed's reduce / all-gather buckets; DDP's gradient buckets (a full copy of
  the gradients unless `gradient_as_bucket_view`).
* the CUDA context and the caching allocator's slack (`MemoryBreakdown.reading`): `max_memory_allocated`
  sees neither; `max_memory_reserved` adds the allocator's fragmentation; nvidia-smi also the context.

Step time per GPU (seconds per micro-batch, then tokens/s over all GPUs):

    compute = tokens x FLOPs per token / (peak FLOP/s x MFU)
    FLOPs per token: forward F = 2 x (weights a token multiplies, head included) + 2 x q_dim x seq per layer
    (causal attention); full fine-tune 3F, frozen base (LoRA / QLoRA) 2F + 6 x adapter params
    (input gradients only, plus the adapters' weight gradients); adapters on fused experts (peft's
    `target_parameters`) add the experts' full weight gradients and the building of B @ A
    (`LoraCount.expert_flops`); gradient checkpointing adds one F.
    dequant (QLoRA) = passes x quantized weights x (packed bytes + 2 x 2 bytes) / (memory bandwidth x eff)
    collectives = ring all-gather / reduce-scatter / all-reduce bytes x (n-1)/n / link bandwidth,
    overlapped with compute inside a micro-batch, exposed at the optimizer step
    optimizer = AdamW memory traffic / memory bandwidth, or, offloaded, PCIe copies + CPU Adam
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Literal

from llmopt.tune._catalog import GpuProfile, PublishedMeasurement, published_measurements
from llmopt.tune._shape import LoraCount, ModelShape

GB = 10**9
GIB = 2**30

# --- constants (each with its reason) ------------------------------------------------------------------
# Storage bytes per quantized weight. nf4: 4 bits + one fp32 absmax per 64-value block (bitsandbytes
# default blocksize 64); nf4 with double quantization: 8-bit absmax + an fp32 per 256 blocks. int8
# (LLM.int8): one byte + an fp32 row scale (negligible). GPTQ int4: 4 bits + an fp16 scale and a packed
# 4-bit zero point per group of 128 (AutoGPTQ's default group size).
QUANT_BYTES = {
    "nf4": 0.5 + 4 / 64,
    "nf4-double": 0.5 + 1 / 64 + 4 / (64 * 256),
    "int8": 1.0,
    "int4-gptq": 0.5 + (2 + 0.5) / 128,
    "none": None,
}
# Bytes per logit element alive at the loss, by how the framework computes cross-entropy:
# * hf-fp32: transformers' Llama (>= 4.36) upcasts logits: 16-bit logits 2 + fp32 copy 4 + shifted
#   contiguous fp32 copy 4 + fp32 log-softmax saved for backward 4 = 14.
# * hf-16bit: a remote-code model that does not upcast (Qwen v1): logits 2 + shifted copy 2 + log-softmax 2
#   + its gradient 2 at the start of backward = 8.
# * chunked: LitGPT's `chunked_cross_entropy` / torchtune's `CEWithChunkedOutputLoss` upcast one chunk at a
#   time: the 16-bit logits 2 and their gradient 2 = 4 (the fp32 chunk is small).
LOSS_BYTES = {"hf-fp32": 14.0, "hf-16bit": 8.0, "chunked": 4.0}
# Model FLOPs utilization of the matrix units: a single figure for eager PyTorch training of 7B-72B
# decoders at >= 512 tokens per micro-batch on A100-class GPUs. Chosen once from the best-specified
# throughput rows (Qwen-7B LoRA at 2048 tokens: ~0.45 of peak; the Qwen full / 512-token rows ~0.35-0.4).
MFU = 0.42
# bitsandbytes' / AutoGPTQ's dequantize kernels move (packed + 2 + 2) bytes per weight (read packed, write
# 16-bit, read it back in the matmul); they reach about half of peak bandwidth on small tiles.
DEQUANT_BANDWIDTH_EFFICIENCY = 0.5
# Elementwise / memory-bound kernels (AdamW step) reach ~80% of peak memory bandwidth.
MEMORY_BANDWIDTH_EFFICIENCY = 0.8
# NCCL ring collectives reach ~80% of the link's one-way bandwidth on large messages.
LINK_EFFICIENCY = 0.8
# DeepSpeed's CPUAdam / torch's fused CPU AdamW: ~1e9 parameters per second per process (AVX2/AVX512 on a
# few cores per GPU process; the ZeRO-Offload paper reports seconds for billions of parameters).
CPU_ADAM_PARAMS_PER_S = 1.0e9
# The CUDA context (kernels of torch, cuBLAS, NCCL) on Ampere/Hopper with CUDA 11-12: ~0.5 GiB that
# nvidia-smi shows and torch's allocator statistics do not.
CUDA_CONTEXT_BYTES = 0.5 * GIB
# The caching allocator reserves more than it allocates (block rounding to 2 MiB segments, fragmentation
# between differently sized activations): ~5% of the peak allocated in steady training.
ALLOCATOR_FRAGMENTATION = 0.05
# DeepSpeed's default reduce / all-gather bucket (elements); HF's "auto" sets hidden_size**2.
DEEPSPEED_BUCKET_ELEMS = 500_000_000
# PyTorch DDP bucket size (25 MiB) - small; DDP's gradient copy is counted separately.
DDP_BUCKET_BYTES = 25 * 2**20

Method = Literal["full", "lora", "qlora"]


@dataclass(frozen=True)
class GpuStrategy:
    """How one run trains: method, precision, sharding, batch and the GPUs it spans.

    Attributes:
        method: `full`, `lora` or `qlora` (frozen quantized base + adapters).
        lora_rank, lora_targets: Adapter rank and target modules (llama names; `all-linear`).
        modules_to_save: Modules trained in full beside the adapters (`lm_head`, `embed_tokens`).
        dtype: Compute / weight dtype: `bf16`, `fp16` or `fp32`.
        pure_16bit: Weights, gradients and AdamW states all at `dtype` (LitGPT `bf16-true`, torchtune);
            False = mixed precision (fp32 states; trainable 16-bit params get an fp32 master copy, peft
            adapters are fp32 under HF Trainer's autocast).
        quantization: Frozen-base format under QLoRA: `nf4`, `nf4-double`, `int8`, `int4-gptq`, `none`.
        optimizer: `adamw` (two states), `adamw-8bit` (two 1-byte states), `sgd` (none).
        deepspeed: DeepSpeed's engine (fp32 master + fp32 gradient partition, buckets) vs FSDP / DDP.
        zero_stage: 0 (replicated), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters;
            FSDP full-shard is stage 3).
        offload_optimizer, offload_params: ZeRO / FSDP CPU offload.
        gradient_checkpointing: Every decoder layer recomputed in backward.
        flash_attention: sdpa / flash (no seq x seq tensors); False = eager attention.
        micro_batch, seq_len: Sequences per GPU per micro-batch and their (padded) length.
        grad_accum: Micro-batches per optimizer step.
        gpus_per_node, nodes: The GPUs the run spans.
        inter_node_bytes_per_s: One-way network bandwidth per node (needed when nodes > 1).
        loss: Cross-entropy implementation, a key of `LOSS_BYTES`.
        bucket_elems: DeepSpeed's reduce/all-gather bucket size in elements.
        fused_qkv: Adapters on a fused q/k/v projection (Qwen v1 `c_attn`): one (h, q + 2 kv) adapter.
        lora_dropout: Dropout on the adapters' inputs. Above 0, each dropout keeps a one-byte mask per
            element, and each adapter its dropped copy (at 0 the adapters share the input).
        shared_qkv_input: The q/k/v adapters read one dropout of their shared input (LitGPT's
            LoRAQKVLinear; implied by `fused_qkv`), not one each (peft).
        lora_target_parameters: Fused 3-D expert parameters with adapters (peft `target_parameters`).
    """

    method: Method = "full"
    lora_rank: int = 8
    lora_targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    modules_to_save: tuple[str, ...] = ()
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    pure_16bit: bool = False
    quantization: str = "none"
    optimizer: Literal["adamw", "adamw-8bit", "sgd"] = "adamw"
    deepspeed: bool = False
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    flash_attention: bool = True
    micro_batch: int = 1
    seq_len: int = 2048
    grad_accum: int = 1
    gpus_per_node: int = 1
    nodes: int = 1
    inter_node_bytes_per_s: float | None = None
    loss: str = "hf-fp32"
    bucket_elems: int = DEEPSPEED_BUCKET_ELEMS
    fused_qkv: bool = False
    lora_target_parameters: tuple[str, ...] = ()
    lora_dropout: float = 0.0
    shared_qkv_input: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora", "qlora"):
            raise ValueError(f"method must be full, lora or qlora, got {self.method!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage!r}")
        if self.quantization not in QUANT_BYTES:
            raise ValueError(f"quantization must be one of {sorted(QUANT_BYTES)}, got {self.quantization!r}")
        if self.method == "qlora" and self.quantization == "none":
            raise ValueError("a qlora strategy needs a quantization format (nf4, int8, int4-gptq)")
        if self.loss not in LOSS_BYTES:
            raise ValueError(f"loss must be one of {sorted(LOSS_BYTES)}, got {self.loss!r}")
        if min(self.micro_batch, self.seq_len, self.grad_accum, self.gpus_per_node, self.nodes) < 1:
            raise ValueError("micro_batch, seq_len, grad_accum, gpus_per_node and nodes must be >= 1")

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @property
    def tokens(self) -> int:
        """Tokens one GPU processes per micro-batch."""
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak memory of one GPU, in bytes, by component (`allocated` is torch's max_memory_allocated)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    loss: float
    comm_buffers: float
    host_offloaded: float = 0.0

    @property
    def allocated(self) -> float:
        return (
            self.weights + self.gradients + self.optimizer + self.activations + self.loss + self.comm_buffers
        )

    @property
    def reserved(self) -> float:
        """torch.cuda.max_memory_reserved: allocated plus the caching allocator's slack."""
        return self.allocated * (1 + ALLOCATOR_FRAGMENTATION)

    @property
    def device(self) -> float:
        """What nvidia-smi shows: reserved plus the CUDA context."""
        return self.reserved + CUDA_CONTEXT_BYTES

    def reading(self, metric: str) -> float:
        """The figure a given measurement method reports (`allocated`, `reserved`, `nvidia-smi`).

        An unknown method is read as `reserved`, the middle of the three (allocated and nvidia-smi are
        each within ~5% + 0.5 GiB of it).
        """
        m = metric.lower()
        if "allocated" in m:
            return self.allocated
        if "smi" in m or "device" in m:
            return self.device
        return self.reserved

    def as_dict(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "loss": self.loss,
            "comm_buffers": self.comm_buffers,
            "allocated": self.allocated,
            "reserved": self.reserved,
            "device": self.device,
            "host_offloaded": self.host_offloaded,
        }


@dataclass(frozen=True)
class StepTime:
    """Seconds per micro-batch on one GPU by component, and the resulting throughput."""

    compute: float
    dequant: float
    overlapped_comm: float
    exposed_comm_per_step: float
    optimizer_per_step: float
    offload_per_micro: float
    tokens_per_micro: int
    grad_accum: int
    gpus: int

    @property
    def seconds_per_micro(self) -> float:
        busy = max(self.compute + self.dequant, self.overlapped_comm) + self.offload_per_micro
        return busy + (self.exposed_comm_per_step + self.optimizer_per_step) / self.grad_accum

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second over all GPUs."""
        return self.tokens_per_micro * self.gpus / self.seconds_per_micro


# --- model shape from a config.json dict -----------------------------------------------------------------
def shape_of(model_config: dict[str, Any] | Any) -> ModelShape:
    """`ModelShape` of a config.json mapping (or a config-like object, or a `ModelShape` as it is)."""
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, dict):
        defaults = {"tie_word_embeddings": False}
        model_config = SimpleNamespace(**{**defaults, **model_config})
    return ModelShape.from_hf_config(model_config)


def _targets(strategy: GpuStrategy) -> dict[str, Any]:
    mods = strategy.lora_targets
    return {
        "target_modules": "all-linear" if mods == "all-linear" else list(mods),
        "target_parameters": list(strategy.lora_target_parameters),
        "modules_to_save": list(strategy.modules_to_save),
    }


def lora_count(shape: ModelShape, strategy: GpuStrategy) -> LoraCount | None:
    """The adapters of a LoRA / QLoRA strategy (None for a full fine-tune).

    With `fused_qkv` the q/k/v adapters are one (hidden -> q + 2 kv) adapter (Qwen v1's `c_attn`): r x
    (h + q + 2 kv) instead of three separate r x (h + out), i.e. 2 r h fewer per layer.
    """
    if strategy.method == "full":
        return None
    count = shape.lora_count(_targets(strategy), strategy.lora_rank)
    qkv = count.targeted & {"q_proj", "k_proj", "v_proj"}
    if strategy.fused_qkv and len(qkv) == 3:
        fewer = shape.num_layers * strategy.lora_rank * 2 * shape.hidden
        count = replace(
            count,
            adapter_params=count.adapter_params - fewer,
            rank_elems_per_token=count.rank_elems_per_token - 2 * strategy.lora_rank,
        )
    return count


def trainable_params(shape: ModelShape, strategy: GpuStrategy) -> int:
    lora = lora_count(shape, strategy)
    return shape.params if lora is None else lora.trainable


# --- memory ---------------------------------------------------------------------------------------------
def _quantized_input_elems(shape: ModelShape, lora: LoraCount | None) -> float:
    """Per token and layer: inputs quantized linears save for backward that a 16-bit frozen linear would not.

    bitsandbytes' MatMul4Bit / MatMul8bitLt and GPTQ's autograd functions keep their input A whenever it
    requires grad; a 16-bit frozen linear keeps nothing (its weight is the only operand needed for the
    input gradient). `activation_elems` already counts the inputs that adapters keep.
    """
    t = lora.targeted if lora else frozenset()
    extra = 0.0
    if not t & {"q_proj", "k_proj", "v_proj"}:
        extra += shape.hidden
    if "o_proj" not in t:
        extra += shape.q_dim
    if not shape.is_moe:
        if not t & {"gate_proj", "up_proj"}:
            extra += shape.hidden
        if "down_proj" not in t:
            extra += shape.intermediate
    return extra


def _dropout_elems(shape: ModelShape, lora: LoraCount | None, strategy: GpuStrategy) -> tuple[float, float]:
    """Per token, first and other layers: what the adapters' input dropouts add to the saved tensors, in
    elements of the activation dtype (CUDA's fused dropout keeps a one-byte bool mask)."""
    if lora is None or strategy.lora_dropout <= 0:
        return 0.0, 0.0
    shared = strategy.fused_qkv or strategy.shared_qkv_input
    return shape.adapter_dropout_elems(lora, shared, mask_elems=1 / strategy.dtype_bytes)


def _gathered_params(shape: ModelShape) -> float:
    """Parameters a ZeRO-3 / FSDP worker holds gathered at once: the layer running and the one prefetched
    (or, at the loss, the last layer and the output head)."""
    return shape.layer_params + max(shape.layer_params, shape.head_params, shape.embedding_params)


def predict_memory(
    model_config: dict[str, Any] | Any, strategy: GpuStrategy, gpu: GpuProfile | None = None
) -> MemoryBreakdown:
    """Peak memory of one GPU for `strategy` on a model given by its config.json (see the module doc).

    `gpu` is accepted for symmetry with `predict_throughput`; the memory does not depend on it (the CUDA
    context constant is the same on the GPUs in the catalog).
    """
    del gpu
    s, shape = strategy, shape_of(model_config)
    n = s.gpus
    lora = lora_count(shape, s)
    wb = s.dtype_bytes
    trainable = shape.params if lora is None else lora.trainable

    # weights
    if s.method == "qlora":
        qb = QUANT_BYTES[s.quantization] or wb
        weights = shape.linear_params * qb + (shape.params - shape.linear_params) * wb
    else:
        weights = shape.params * wb
    if lora is not None:
        # 16-bit adapters in pure 16-bit training / under DeepSpeed (which casts the module); fp32 under
        # HF Trainer's autocast (peft creates them in fp32).
        adapter_b = wb if (s.pure_16bit or s.deepspeed) else 4
        weights += lora.trainable * adapter_b
    host = 0.0
    if s.zero_stage == 3:
        gathered = _gathered_params(shape) * wb
        if s.offload_params:
            host += weights / n
            weights = gathered
        else:
            weights = weights / n + gathered

    # gradients and optimizer states of the trainable parameters
    train_b = wb if (lora is None or s.pure_16bit or s.deepspeed) else 4
    grads = trainable * train_b / (n if s.zero_stage >= 2 else 1)
    state_b = {"adamw": 2 * (wb if s.pure_16bit else 4), "adamw-8bit": 2.0, "sgd": 0.0}[s.optimizer]
    master = 4 if (train_b < 4 and not s.pure_16bit) else 0
    fp32_grad = 4 if s.deepspeed and not s.pure_16bit and s.zero_stage >= 1 else 0
    shard = n if s.zero_stage >= 1 else 1
    optimizer = trainable * (state_b + master + fp32_grad) / shard
    if s.offload_optimizer:
        host += optimizer + grads
        optimizer, grads = 0.0, 0.0

    # activations
    first, other, constant, outside = shape.activation_elems(lora is not None, lora)
    if s.method == "qlora":
        first += _quantized_input_elems(shape, lora)
        other += _quantized_input_elems(shape, lora)
    first_drop, other_drop = _dropout_elems(shape, lora, s)
    first, other = first + first_drop, other + other_drop
    if wb == 2:  # fp32 upcasts in 16-bit training (norms, router); the logits' are the loss term's
        first_up, other_up, outside_up = shape.upcast_elems(lora is not None, lora)
        first, other, outside = first + first_up, other + other_up, outside + outside_up - shape.vocab
    attn = 0.0 if s.flash_attention else 2.0 * shape.heads * s.seq_len
    t = s.tokens
    ab = wb
    if s.gradient_checkpointing:
        saved = shape.num_layers * shape.hidden * t * ab
        saved += (other + attn) * t * ab + constant * ab  # the layer being recomputed
    else:
        saved = (first + (shape.num_layers - 1) * other + shape.num_layers * attn) * t * ab
        saved += shape.num_layers * constant * ab
    saved += (outside - shape.vocab) * t * ab  # embedding output, final norm (logits under `loss`)
    loss = LOSS_BYTES[s.loss] * t * shape.vocab

    # communication buffers
    if s.deepspeed and s.zero_stage >= 1:
        comm = 2 * min(s.bucket_elems, trainable) * wb  # reduce bucket, double-buffered (overlap_comm)
    elif not s.deepspeed and s.zero_stage == 0 and n > 1:
        comm = trainable * train_b + DDP_BUCKET_BYTES  # DDP's bucketed copy of the gradients
    else:
        comm = 0.0
    return MemoryBreakdown(
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        activations=saved,
        loss=loss,
        comm_buffers=comm,
        host_offloaded=host,
    )


# --- throughput -----------------------------------------------------------------------------------------
def flops_per_token(shape: ModelShape, strategy: GpuStrategy) -> float:
    """Training FLOPs per token (see the module doc)."""
    fwd = 2.0 * shape.matmul_params_per_token() + 2.0 * shape.num_layers * shape.q_dim * strategy.seq_len
    lora = lora_count(shape, strategy)
    total = 3 * fwd if lora is None else 2 * fwd + 6.0 * (lora.trainable - lora.expert_adapter_params)
    if lora is not None:  # adapters on fused experts (zero without them)
        per_token, per_micro = lora.expert_flops(shape.top_k, shape.num_experts)
        total += shape.num_layers * (per_token + per_micro / strategy.tokens)
    return total + (fwd if strategy.gradient_checkpointing else 0.0)


def _link_bytes_per_s(strategy: GpuStrategy, gpu: GpuProfile) -> float:
    """One-way bandwidth of the slowest hop of a ring over the run's GPUs."""
    intra = gpu.intra_node.unidirectional_bytes_per_s
    if strategy.nodes == 1:
        return intra * LINK_EFFICIENCY
    if strategy.inter_node_bytes_per_s is None:
        raise ValueError(
            "a multi-node strategy needs inter_node_bytes_per_s (one-way network bandwidth per node)"
        )
    return min(intra, strategy.inter_node_bytes_per_s) * LINK_EFFICIENCY


def predict_step(model_config: dict[str, Any] | Any, strategy: GpuStrategy, gpu: GpuProfile) -> StepTime:
    """Step time components of one GPU (see the module doc)."""
    s, shape = strategy, shape_of(model_config)
    n, t = s.gpus, s.tokens
    lora = lora_count(shape, s)
    trainable = shape.params if lora is None else lora.trainable
    wb = s.dtype_bytes
    peak = gpu.peak_flops_for(s.dtype)
    bw = gpu.memory_bandwidth_bytes_per_s
    compute = t * flops_per_token(shape, s) / (peak * MFU)

    passes = 2 + (1 if s.gradient_checkpointing else 0)  # forward, backward (+ recompute)
    dequant = 0.0
    if s.method == "qlora":
        qb = QUANT_BYTES[s.quantization] or wb
        dequant = passes * shape.linear_params * (qb + 2 * wb) / (bw * DEQUANT_BANDWIDTH_EFFICIENCY)

    ring = (n - 1) / n if n > 1 else 0.0
    link = _link_bytes_per_s(s, gpu) if n > 1 else math.inf
    grad_bytes = trainable * (wb if (lora is None or s.deepspeed or s.pure_16bit) else 4)
    overlapped, exposed = 0.0, 0.0
    if s.zero_stage == 3:
        # all-gather the (16-bit) weights in forward and again in backward; reduce-scatter the gradients
        overlapped = (2 * shape.params * wb + grad_bytes) * ring / link
    elif s.zero_stage == 2:
        overlapped = grad_bytes * ring / link  # reduce-scatter every micro-batch
        exposed = trainable * wb * ring / link  # all-gather the updated 16-bit params after the step
    elif s.zero_stage == 1:
        exposed = (grad_bytes + trainable * wb) * ring / link
    else:
        exposed = 2 * grad_bytes * ring / link  # all-reduce at the accumulation boundary

    shard = n if s.zero_stage >= 1 else 1
    host_link = gpu.host_link.unidirectional_bytes_per_s
    offload = 0.0
    if s.offload_optimizer:
        # gradients down, updated 16-bit params up over PCIe; the CPU Adam on this GPU's partition
        optimizer = trainable / shard * (2 * wb) / host_link + trainable / shard / CPU_ADAM_PARAMS_PER_S
    else:
        # AdamW reads p, g, m, v and writes p, m, v (+ the 16-bit copy in mixed precision)
        per_param = 7 * wb if s.pure_16bit else 7 * 4 + wb
        optimizer = trainable / shard * per_param / (bw * MEMORY_BANDWIDTH_EFFICIENCY)
    if s.offload_params:
        offload = passes * shape.params / n * wb / host_link  # this GPU's partition, every pass
    return StepTime(
        compute=compute,
        dequant=dequant,
        overlapped_comm=overlapped,
        exposed_comm_per_step=exposed,
        optimizer_per_step=optimizer,
        offload_per_micro=offload,
        tokens_per_micro=t,
        grad_accum=s.grad_accum,
        gpus=n,
    )


def predict_throughput(model_config: dict[str, Any] | Any, strategy: GpuStrategy, gpu: GpuProfile) -> float:
    """Training tokens per second over all GPUs of the run."""
    return predict_step(model_config, strategy, gpu).tokens_per_s


# --- published measurements ------------------------------------------------------------------------------
# Framework conventions of the sources in published_finetuning.yaml, keyed by measurement-id prefix:
# precision mode and cross-entropy implementation. These are properties of the software named by the
# source (LitGPT `bf16-true` + chunked CE; Qwen v1's remote code under HF Trainer + peft; torchtune's
# bf16 recipes with chunked CE; transformers Llama under Accelerate + DeepSpeed).
_FRAMEWORKS: dict[str, dict[str, Any]] = {
    "litgpt-": {"pure_16bit": True, "loss": "chunked", "shared_qkv_input": True},
    "qwen-": {"pure_16bit": False, "loss": "hf-16bit", "fused_qkv": True},
    "torchtune-": {"pure_16bit": True, "loss": "chunked"},
    "ray-template-": {"pure_16bit": False, "loss": "hf-fp32"},
}
_QWEN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_QWEN_SAVE = {"wte": "embed_tokens", "lm_head": "lm_head"}


def model_config_of(row: PublishedMeasurement) -> dict[str, Any]:
    """The config.json mapping of a published row's model."""
    return vars(row.model.hf_config())


def strategy_for(row: PublishedMeasurement) -> tuple[GpuStrategy | None, str]:
    """The `GpuStrategy` a published row ran, or None and why it cannot be reconstructed."""
    framework = next((v for k, v in _FRAMEWORKS.items() if row.id.startswith(k)), None)
    if framework is None:
        return None, "framework conventions not known (precision mode, loss implementation)"
    if row.model.model_type == "bloom":
        return None, "BLOOM's ungated MLP and ALiBi are not modelled by ModelShape"
    if row.seq_len is None or row.micro_batch_size is None:
        return None, "sequence length or micro-batch size not stated"
    if row.gradient_checkpointing is None:
        return None, "gradient checkpointing not stated"
    kwargs: dict[str, Any] = {
        "method": row.method,
        "pure_16bit": framework["pure_16bit"],
        "loss": framework["loss"],
        "fused_qkv": framework.get("fused_qkv", False),
        "shared_qkv_input": framework.get("shared_qkv_input", False),
        "dtype": "fp16" if (row.precision or "").startswith("fp16") else "bf16",
        "gradient_checkpointing": row.gradient_checkpointing,
        "flash_attention": row.flash_attention is not False,
        "micro_batch": row.micro_batch_size,
        "seq_len": row.seq_len,
        "grad_accum": row.gradient_accumulation_steps or 1,
        "gpus_per_node": min(row.gpus_per_node, row.gpu_count),
        "nodes": max(1, row.gpu_count // row.gpus_per_node),
    }
    if row.method != "full":
        lora = row.lora
        if lora is None or lora.rank is None or not lora.targets:
            return None, "LoRA rank / target modules not stated"
        targets = _QWEN_TARGETS if row.id.startswith("qwen-") else lora.targets
        kwargs.update(lora_rank=lora.rank, lora_targets=tuple(targets), lora_dropout=lora.dropout or 0.0)
        kwargs["modules_to_save"] = tuple(_QWEN_SAVE.get(m, m) for m in lora.modules_to_save)
    if row.method == "qlora":
        q = (row.quantization or "").lower()
        # torchao's NF4Tensor (torchtune) always quantizes its block scales (scaler blocks of 256)
        double = row.id.startswith("torchtune-") or "with double quantization" in q
        kwargs["quantization"] = "int4-gptq" if "gptq" in q else ("nf4-double" if double else "nf4")
    if row.parallelism == "deepspeed":
        kwargs.update(deepspeed=True, zero_stage=row.zero_stage or 0)
        if row.id.startswith("qwen-"):
            kwargs["bucket_elems"] = row.model.hidden_size**2  # ds_config "auto" -> hidden_size ** 2
    elif row.parallelism == "fsdp":
        kwargs["zero_stage"] = 3
    offload = (row.offload or "").lower()
    if offload and not offload.startswith("none") and "paged" not in offload:
        kwargs["offload_optimizer"] = "optimizer" in offload or "fsdp_cpu_offload" in offload
        kwargs["offload_params"] = "param" in offload
    if kwargs["nodes"] > 1:
        return None, "multi-node run: the network bandwidth between nodes is not stated in the source"
    return GpuStrategy(**kwargs), ""


@dataclass(frozen=True)
class ComparisonRow:
    """One figure of one published row: predicted against published (error = predicted / published - 1)."""

    id: str
    model: str
    method: str
    gpus: str
    quantity: Literal["memory_gb", "tokens_per_s"]
    published: float | None
    predicted: float | None
    skipped: str = ""
    note: str = ""
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def error(self) -> float | None:
        if self.published is None or self.predicted is None:
            return None
        return self.predicted / self.published - 1


def compare_published() -> list[ComparisonRow]:
    """Predicted against published, for every figure of published_finetuning.yaml (skips say why)."""
    rows: list[ComparisonRow] = []
    for m in published_measurements():
        strategy, reason = strategy_for(m)
        gpu = m.gpu_profile_or_none()
        base = {
            "id": m.id,
            "model": m.model.name.split(" ")[0],
            "method": m.method,
            "gpus": f"{m.gpu_count}x{m.gpu_profile or m.gpu}",
        }
        if m.peak_memory is not None:
            if strategy is None:
                rows.append(
                    ComparisonRow(
                        **base, quantity="memory_gb", published=None, predicted=None, skipped=reason
                    )
                )
            elif m.peak_memory.bound == "upper_bound":
                rows.append(
                    ComparisonRow(
                        **base,
                        quantity="memory_gb",
                        published=None,
                        predicted=None,
                        skipped="only an upper bound",
                    )
                )
            else:
                mem = predict_memory(model_config_of(m), strategy, gpu)
                rows.append(
                    ComparisonRow(
                        **base,
                        quantity="memory_gb",
                        published=m.peak_memory_bytes_per_gpu / GB,
                        predicted=mem.reading(m.peak_memory.metric) / GB,
                        note=f"metric {m.peak_memory.metric}",
                        breakdown={k: v / GB for k, v in mem.as_dict().items()},
                    )
                )
        if m.throughput is not None:
            published = m.tokens_per_s_all_gpus
            why = reason
            if not why and gpu is None:
                why = "GPU not in gpus.yaml"
            if not why and published is None:
                why = "tokens per step not published (variable-length samples)"
            if why:
                rows.append(
                    ComparisonRow(
                        **base, quantity="tokens_per_s", published=None, predicted=None, skipped=why
                    )
                )
            else:
                assert strategy is not None and gpu is not None
                step = predict_step(model_config_of(m), strategy, gpu)
                rows.append(
                    ComparisonRow(
                        **base,
                        quantity="tokens_per_s",
                        published=published,
                        predicted=step.tokens_per_s,
                        breakdown={
                            "compute_s": step.compute,
                            "dequant_s": step.dequant,
                            "overlapped_comm_s": step.overlapped_comm,
                            "exposed_comm_s_per_step": step.exposed_comm_per_step,
                            "optimizer_s_per_step": step.optimizer_per_step,
                            "offload_s": step.offload_per_micro,
                        },
                    )
                )
    return rows


def format_comparison(rows: list[ComparisonRow]) -> str:
    """A plain-text table of `compare_published()`."""
    lines = [f"{'id':52} {'quantity':12} {'published':>10} {'predicted':>10} {'error':>8}"]
    for r in rows:
        if r.skipped:
            lines.append(f"{r.id:52} {r.quantity:12} {'-':>10} {'-':>10} {'skip':>8}  ({r.skipped})")
        else:
            assert r.published is not None and r.predicted is not None and r.error is not None
            lines.append(
                f"{r.id:52} {r.quantity:12} {r.published:10.1f} {r.predicted:10.1f} {100 * r.error:+7.1f}%"
            )
    return "\n".join(lines)
