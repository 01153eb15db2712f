"""A cache of whole responses to repeated deterministic requests (greedy, or sampled with a fixed seed).

The key is a digest of the caller (its API key's digest, so one caller never reads another's answers), the
endpoint, the served model (weights, adapters and the settings that change outputs) and every field of the
request body that can change the answer. The value is what was sent: the JSON body of a whole response, or
the server-sent events of a stream, replayed with a fresh id and timestamp.

Two stores: an in-process LRU bounded by bytes (the default), or Redis when `serving.response_cache.
redis_url` is set (shared by every ingress replica and kept across restarts; entries expire after
`ttl_s`, and Redis's own `maxmemory-policy` bounds it). A store that fails (Redis unreachable) is a miss
that is logged, never a failed request.

Ray- and torch-free.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

# Body fields that never change the generated answer (OpenAI's bookkeeping and routing hints).
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "safety_identifier", "service_tier", "prompt_cache_key", "store"}
)


def cacheable(body: dict[str, Any]) -> bool:
    """Whether a request's answer is a function of its body: greedy (temperature 0) or seeded sampling,
    and no session (a session's turn also grows the session's server-side cache)."""
    if body.get("session_id"):
        return False
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(owner: str, route: str, model: str, body: dict[str, Any]) -> str:
    """The key of a request: sha256 over the caller, the route, the served model and the body's fields."""
    fields = {k: v for k, v in body.items() if k not in IGNORED_FIELDS and v is not None}
    text = json.dumps({"owner": owner, "route": route, "model": model, "body": fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class LRUStore:
    """In-process entries under a byte budget, least recently used evicted first, each for `ttl_s`."""

    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + self.ttl_s, value)
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= len(value)

    @property
    def entries(self) -> int:
        return len(self._entries)


class RedisStore:
    """Entries in Redis (`SET key value EX ttl`), under `prefix`."""

    def __init__(self, url: str, ttl_s: float, prefix: str):
        import redis.asyncio as redis

        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.ttl_s = max(1, int(ttl_s))
        self.prefix = prefix
        # Redis keeps these (DBSIZE, INFO memory); counting a prefix's keys would need a SCAN per call.
        self.entries = None
        self.bytes = None

    async def get(self, key: str) -> bytes | None:
        return await self.client.get(self.prefix + key)

    async def put(self, key: str, value: bytes) -> None:
        await self.client.set(self.prefix + key, value, ex=self.ttl_s)


class ResponseCache:
    """Lookups and stores with hit/miss/error counts; a failing store is a logged miss."""

    def __init__(self, store: LRUStore | RedisStore, backend: str):
        self.store = store
        self.backend = backend
        self.counts = {"hit": 0, "miss": 0, "bypass": 0, "error": 0}
        self._last_warning = 0.0

    @classmethod
    def from_config(cls, cache) -> ResponseCache:
        """From `serving.response_cache`."""
        if cache.redis_url:
            return cls(RedisStore(cache.redis_url, cache.ttl_s, cache.key_prefix), "redis")
        return cls(LRUStore(int(cache.max_mb * 2**20), cache.ttl_s), "memory")

    async def get(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await asyncio.wait_for(self.store.get(key), timeout=5.0)
        except Exception as exc:  # the cache is an optimisation: never fail the request for it
            self._warn("read", exc)
            return None
        if raw is None:
            self.counts["miss"] += 1
            return None
        self.counts["hit"] += 1
        return json.loads(raw)

    async def put(self, key: str, entry: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(self.store.put(key, json.dumps(entry).encode()), timeout=5.0)
        except Exception as exc:
            self._warn("write", exc)

    def bypass(self) -> None:
        self.counts["bypass"] += 1

    def _warn(self, what: str, exc: Exception) -> None:
        self.counts["error"] += 1
        now = time.monotonic()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning("response cache (%s): %s failed, serving uncached: %s", self.backend, what, exc)

    def stats(self) -> dict[str, Any]:
        looked = self.counts["hit"] + self.counts["miss"]
        return {
            "backend": self.backend,
            **self.counts,
            "hit_rate": self.counts["hit"] / looked if looked else 0.0,
            "entries": self.store.entries,
            "bytes": self.store.bytes,
        }


def replay_whole(entry: dict[str, Any], response_id: str, created: int) -> dict[str, Any]:
    """A cached whole response with this request's id and time."""
    return {**entry["body"], "id": response_id, "created": created}


def replay_events(entry: dict[str, Any], response_id: str, created: int):
    """A cached stream's events with this request's id and time (``[DONE]`` as it was)."""
    for event in entry["events"]:
        payload = event[len("data: ") :].strip() if event.startswith("data: ") else ""
        if not payload or payload == "[DONE]":
            yield event
            continue
        data = json.loads(payload)
        if "id" in data:
            data["id"] = response_id
        if "created" in data:
            data["created"] = created
        yield f"data: {json.dumps(data)}\n\n"
