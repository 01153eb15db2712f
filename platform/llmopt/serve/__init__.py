"""Serving: an iteration-level batching engine, the per-session KV-cache manager, quantized loading.

Testable without Ray; the Ray Serve application (serve_apps/) builds on these. This package never
imports llmopt.train or llmopt.tune.
"""

from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams, StepOutput
from llmopt.serve._http import (
    BatchGenerateRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateRequest,
    ServingSetupError,
    error_body,
    load_api_keys,
    owner_of,
    resolve_adapter,
    stream_interval,
)
from llmopt.serve._kv_cache import CacheStats, SessionCacheManager, SessionEntry, cache_nbytes, crop_cache
from llmopt.serve._precision import ServingPrecisionError, load_serving_model, serving_dtype

__all__ = [
    "BatchGenerateRequest",
    "CacheStats",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerateRequest",
    "GenerationEngine",
    "GenerationRequest",
    "SamplingParams",
    "ServingPrecisionError",
    "ServingSetupError",
    "SessionCacheManager",
    "SessionEntry",
    "StepOutput",
    "cache_nbytes",
    "crop_cache",
    "error_body",
    "load_api_keys",
    "load_serving_model",
    "owner_of",
    "resolve_adapter",
    "serving_dtype",
    "stream_interval",
]
