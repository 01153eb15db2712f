"""Serving: the iteration-level batching engine, session KV caches, model and adapter loading, the wire
protocol and API keys; `llmopt.serve.native` holds the optional CPU decode kernels.

Testable without Ray; the Ray Serve application (serve_apps/) builds on these. This package never
imports llmopt.train or llmopt.tune.
"""

from llmopt.serve._auth import load_api_keys, owner_of
from llmopt.serve._engine import (
    GenerationEngine,
    GenerationRequest,
    SamplingParams,
    StepOutput,
    copy_cache,
    expand_choices,
)
from llmopt.serve._loading import (
    ServingPrecisionError,
    check_adapters,
    check_models,
    check_native_setup,
    load_adapters,
    load_serving_model,
    load_virtual_prefixes,
    resolve_adapter,
    serving_dtype,
)
from llmopt.serve._openai import (
    InvalidRequest,
    Limits,
    LogprobFormatter,
    check_request,
    sampling_params,
)
from llmopt.serve._protocol import (
    SESSION_ID_PATTERN,
    BatchGenerateRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    ServingSetupError,
    SessionKey,
    TokenChunk,
    TokenizeRequest,
    error_body,
    stream_interval,
)
from llmopt.serve._response_cache import ResponseCache, cache_key, cacheable, replay_events, replay_whole
from llmopt.serve._routes import Router, RouteWeightsError
from llmopt.serve._sessions import CacheStats, SessionCacheManager, SessionEntry, cache_nbytes, crop_cache
from llmopt.serve._vllm import VllmEngine, merge_chunks, resolve_engine
from llmopt.serve._vllm import check_setup as check_vllm_setup
from llmopt.serve._vllm import setup_problems as vllm_setup_problems

__all__ = [
    "SESSION_ID_PATTERN",
    "BatchGenerateRequest",
    "CacheStats",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "GenerateRequest",
    "GenerationEngine",
    "GenerationRequest",
    "InvalidRequest",
    "Limits",
    "LogprobFormatter",
    "ResponseCache",
    "RouteWeightsError",
    "Router",
    "SamplingParams",
    "ServingPrecisionError",
    "ServingSetupError",
    "SessionCacheManager",
    "SessionEntry",
    "SessionKey",
    "StepOutput",
    "TokenChunk",
    "TokenizeRequest",
    "VllmEngine",
    "cache_key",
    "cache_nbytes",
    "cacheable",
    "check_adapters",
    "check_models",
    "check_native_setup",
    "check_request",
    "check_vllm_setup",
    "copy_cache",
    "crop_cache",
    "error_body",
    "expand_choices",
    "load_adapters",
    "load_api_keys",
    "load_serving_model",
    "load_virtual_prefixes",
    "merge_chunks",
    "owner_of",
    "replay_events",
    "replay_whole",
    "resolve_adapter",
    "resolve_engine",
    "sampling_params",
    "serving_dtype",
    "stream_interval",
    "vllm_setup_problems",
]
