"""Serving: an iteration-level batching engine, the per-session KV-cache manager, quantized loading.

Testable without Ray; the Ray Serve application (serve_apps/) builds on these. This package never
imports llmopt.train or llmopt.tune.
"""

from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams, StepOutput
from llmopt.serve._kv_cache import CacheStats, SessionCacheManager, SessionEntry, cache_nbytes
from llmopt.serve._precision import ServingPrecisionError, load_serving_model, serving_dtype

__all__ = [
    "CacheStats",
    "GenerationEngine",
    "GenerationRequest",
    "SamplingParams",
    "ServingPrecisionError",
    "SessionCacheManager",
    "SessionEntry",
    "StepOutput",
    "cache_nbytes",
    "load_serving_model",
    "serving_dtype",
]
