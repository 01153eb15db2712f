"""Serving: an iteration-level batching generation engine and the per-session KV-cache manager.

Testable without Ray; the Ray Serve application (serve_apps/) builds on these. This package never
imports llmopt.train or llmopt.tune.
"""

from llmopt.serve._engine import GenerationEngine, GenerationRequest, SamplingParams, StepOutput
from llmopt.serve._kv_cache import CacheStats, SessionCacheManager, SessionEntry, cache_nbytes

__all__ = [
    "CacheStats",
    "GenerationEngine",
    "GenerationRequest",
    "SamplingParams",
    "SessionCacheManager",
    "SessionEntry",
    "StepOutput",
    "cache_nbytes",
]
