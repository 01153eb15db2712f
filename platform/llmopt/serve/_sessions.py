"""Per-session KV-cache manager: multi-turn reuse of a cached prefix under a byte budget.

A follow-up turn of a session reuses the KV cache of the previous turn when the previous token sequence is a
prefix of the new one, so only the new tokens are prefilled. Entries are keyed by ``(owner, session_id)``,
where ``owner`` is the caller's API key: no caller can reach another caller's cache, even with the same
session id. The manager keeps the total bytes under a budget with LRU eviction, expires idle entries after a
TTL and counts hits, misses, evictions, expirations, entries and bytes.

Transformers grows a ``DynamicCache`` in place during generation, so :meth:`SessionCacheManager.lookup`
checks an entry *out* (removes it); the caller stores it back with the grown token sequence when generation
is done. This module never imports ray, ``llmopt.train`` or ``llmopt.tune``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

__all__ = ["CacheStats", "SessionCacheManager", "SessionEntry", "cache_nbytes", "crop_cache"]


def _tensors(obj: Any):
    """Yield the tensors of a cache layer, a legacy tuple-of-tuples cache or a nested sequence."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif obj is not None and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            if isinstance(value, (torch.Tensor, tuple, list)):
                yield from _tensors(value)


def crop_cache(cache: Any, length: int) -> None:
    """Cut a ``DynamicCache`` in place to its first ``length`` positions (no-op when not longer).

    transformers 5.x ``DynamicCache.crop`` takes a negative count of positions to remove; a positive value
    raises, so callers should not pass absolute lengths to it directly.
    """
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a KV cache.

    Works for a transformers ``Cache`` (in 5.x a ``DynamicCache`` holds ``cache.layers``, each layer
    with ``keys`` and ``values`` tensors of shape ``(batch, kv_heads, seq, head_dim)``; other tensors a
    layer holds, e.g. recurrent states, are counted too) and for a legacy tuple of ``(key, value)`` tuples.
    Bytes are counted per underlying storage, once each: a cropped cache (a view) still pins its whole
    storage.

    Args:
        cache: The cache object, or ``None``.

    Returns:
        The number of bytes; 0 for ``None`` or an empty cache.
    """
    if cache is None:
        return 0
    source = cache.layers if hasattr(cache, "layers") else cache
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in _tensors(source):
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _crop(cache: Any, length: int) -> Any:
    """``cache`` cut to ``length`` positions: a ``Cache`` in place, a legacy tuple cache as a new tuple."""
    if hasattr(cache, "crop"):
        crop_cache(cache, length)
        return cache
    return tuple(tuple(t[:, :, :length] for t in layer) for layer in cache)


@dataclass
class SessionEntry:
    """One cached session.

    Attributes:
        owner: The caller's API key (or ``"anonymous"``).
        session_id: The caller's session id.
        token_ids: The full token sequence the cache covers (prompt + generated so far).
        cache: The KV cache, stored as given. It covers ``len(token_ids) - 1`` or ``len(token_ids)``
            positions; the caller owns that choice and must be consistent (compare
            ``cache.get_seq_length()`` with ``len(token_ids)`` before reuse).
        nbytes: Bytes the cache holds (see :func:`cache_nbytes`).
        last_used: Clock time of the last store.
        created: Clock time the session was first stored.
    """

    owner: str
    session_id: str
    token_ids: list[int]
    cache: Any
    nbytes: int
    last_used: float
    created: float


@dataclass
class CacheStats:
    """Counters of a :class:`SessionCacheManager`."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    expirations: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def to_dict(self) -> dict[str, float]:
        """The counters and ``hit_rate`` as a plain dict (for metrics export)."""
        return {**asdict(self), "hit_rate": self.hit_rate}


class SessionCacheManager:
    """Session KV caches under a byte budget, with LRU eviction and an idle TTL; thread-safe.

    Args:
        budget_bytes: The most bytes all entries may hold together.
        ttl_s: Entries idle for longer than this many seconds are removed.
        clock: Time source in seconds (injectable for tests).

    Raises:
        ValueError: If ``budget_bytes`` is negative or ``ttl_s`` is not positive.
    """

    def __init__(self, budget_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}; pass 0 to disable caching")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}; pass the idle time in seconds")
        self.budget_bytes = int(budget_bytes)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], SessionEntry] = OrderedDict()  # least recent first
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = CacheStats(budget_bytes=self.budget_bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _remove(self, key: tuple[str, str]) -> SessionEntry:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        return entry

    def _expire_locked(self, now: float) -> int:
        stale = [key for key, entry in self._entries.items() if now - entry.last_used > self.ttl_s]
        for key in stale:
            self._remove(key)
        self._stats.expirations += len(stale)
        return len(stale)

    def lookup(self, owner: str, session_id: str, token_ids: list[int]) -> SessionEntry | None:
        """Check out the cache of ``(owner, session_id)``, cut to the prefix it shares with ``token_ids``.

        A hit removes the entry from the manager, so a concurrent request of the same session cannot use a
        cache that generation is growing in place; :meth:`store` puts it back. The entry's cache and tokens
        are cut to the longest common prefix of its tokens and ``token_ids``: a client that re-sends the
        conversation as text may tokenize the previous reply differently at its edges, or edit history, and
        still reuses everything before the first difference. No common token, or no entry (or an expired one),
        is a miss. Entries of other owners are never returned.

        Args:
            owner: The caller's API key.
            session_id: The caller's session id.
            token_ids: The full token sequence of the new turn.

        Returns:
            The checked-out entry (``token_ids`` = the reusable prefix), or ``None`` on a miss.
        """
        key = (owner, session_id)
        with self._lock:
            self._expire_locked(self._clock())
            entry = self._entries.get(key)
            common = _common_prefix(entry.token_ids, token_ids) if entry is not None else 0
            if entry is not None:
                self._remove(key)
            if common == 0:
                self._stats.misses += 1
                return None
            self._stats.hits += 1
            if common < len(entry.token_ids):
                entry.cache = _crop(entry.cache, common)
                entry.token_ids = entry.token_ids[:common]
            return entry

    def store(self, owner: str, session_id: str, token_ids: list[int], cache: Any) -> None:
        """Insert or put back the cache of ``(owner, session_id)``, replacing any entry of that key.

        Least-recently-used entries of any owner are evicted until the budget holds. An entry larger than the
        whole budget is not stored and counts as an eviction.

        Args:
            owner: The caller's API key.
            session_id: The caller's session id.
            token_ids: The full token sequence the cache covers.
            cache: The KV cache (see :class:`SessionEntry` for what it must cover).
        """
        key = (owner, session_id)
        nbytes = cache_nbytes(cache)
        with self._lock:
            now = self._clock()
            self._expire_locked(now)
            old = self._remove(key) if key in self._entries else None
            if nbytes > self.budget_bytes:
                self._stats.evictions += 1
                return
            while self._entries and self._bytes + nbytes > self.budget_bytes:
                self._remove(next(iter(self._entries)))
                self._stats.evictions += 1
            created = old.created if old is not None else now
            self._entries[key] = SessionEntry(owner, session_id, list(token_ids), cache, nbytes, now, created)
            self._bytes += nbytes

    def drop(self, owner: str, session_id: str) -> bool:
        """Remove the entry of ``(owner, session_id)``; True if there was one."""
        with self._lock:
            if (owner, session_id) not in self._entries:
                return False
            self._remove((owner, session_id))
            return True

    def expire(self) -> int:
        """Remove entries idle for longer than ``ttl_s`` (also done lazily by lookup and store).

        Returns:
            The number of entries removed.
        """
        with self._lock:
            return self._expire_locked(self._clock())

    def stats(self) -> CacheStats:
        """A snapshot of the counters, with the current entries and bytes."""
        with self._lock:
            return replace(self._stats, entries=len(self._entries), bytes=self._bytes)
