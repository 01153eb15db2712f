"""Serving: the iteration-level batching engine, session KV caches, model and adapter loading, the wire
protocol and API keys; `llmopt.serve.native` holds the optional CPU decode kernels.

Testable without Ray; the Ray Serve application (serve_apps/) builds on these. This package never
imports llmopt.train or llmopt.tune.
"""

from llmopt.serve._auth import load_api_keys, owner_of
from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams, StepOutput
from llmopt.serve._loading import (
    ServingPrecisionError,
    load_adapters,
    load_serving_model,
    resolve_adapter,
    serving_dtype,
)
from llmopt.serve._protocol import (
    BatchGenerateRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerateRequest,
    ServingSetupError,
    SessionKey,
    TokenChunk,
    error_body,
    stream_interval,
)
from llmopt.serve._sessions import CacheStats, SessionCacheManager, SessionEntry, cache_nbytes, crop_cache

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
    "SessionKey",
    "StepOutput",
    "TokenChunk",
    "cache_nbytes",
    "crop_cache",
    "error_body",
    "load_adapters",
    "load_api_keys",
    "load_serving_model",
    "owner_of",
    "resolve_adapter",
    "serving_dtype",
    "stream_interval",
]
