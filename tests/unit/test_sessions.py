"""Unit tests of the per-session KV-cache manager (plain torch, no Ray)."""

import pytest
import torch

from llmopt.serve._sessions import CacheStats, SessionCacheManager, cache_nbytes


class FakeClock:
    """A settable clock for TTL tests."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def legacy_cache(seq: int, layers: int = 1) -> tuple:
    """A legacy tuple-of-tuples cache of `seq` positions; `nbytes_of(seq, layers)` bytes."""
    return tuple((torch.zeros(1, 2, seq, 16), torch.zeros(1, 2, seq, 16)) for _ in range(layers))


def nbytes_of(seq: int, layers: int = 1) -> int:
    return 2 * layers * 2 * seq * 16 * 4


@pytest.fixture(scope="module")
def model():
    from llmopt.models import load_model

    m = load_model("tiny-llama")
    m.eval()
    return m


def test_cache_nbytes_of_dynamic_cache(model):
    cfg = model.config
    batch, seq = 2, 7
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim) == (4, 2, 64)
    expected = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * seq * head_dim * 4
    assert cache_nbytes(out.past_key_values) == expected


def test_cache_nbytes_legacy_and_none():
    assert cache_nbytes(None) == 0
    assert cache_nbytes(legacy_cache(5, layers=3)) == nbytes_of(5, layers=3)
    k = torch.zeros(1, 2, 5, 16)
    assert cache_nbytes(((k, k),)) == k.nbytes  # the same storage is counted once


def test_prefix_hit_checks_out_and_store_puts_back():
    mgr = SessionCacheManager(budget_bytes=10**6, ttl_s=60)
    cache = legacy_cache(3)
    mgr.store("key-a", "s1", [1, 2, 3], cache)
    entry = mgr.lookup("key-a", "s1", [1, 2, 3, 4, 5])
    assert entry is not None and entry.cache is cache and entry.token_ids == [1, 2, 3]
    assert entry.nbytes == nbytes_of(3)
    # Checked out: a concurrent request of the same session misses.
    assert len(mgr) == 0
    assert mgr.lookup("key-a", "s1", [1, 2, 3, 4, 5]) is None
    mgr.store("key-a", "s1", [1, 2, 3, 4, 5, 6], legacy_cache(6))
    assert mgr.lookup("key-a", "s1", [1, 2, 3, 4, 5, 6, 7]).token_ids == [1, 2, 3, 4, 5, 6]
    s = mgr.stats()
    assert (s.hits, s.misses) == (2, 1)


def test_equal_tokens_is_a_hit():
    mgr = SessionCacheManager(budget_bytes=10**6, ttl_s=60)
    mgr.store("k", "s", [1, 2], legacy_cache(2))
    assert mgr.lookup("k", "s", [1, 2]) is not None


def test_diverging_history_reuses_the_common_prefix_only():
    mgr = SessionCacheManager(budget_bytes=10**6, ttl_s=60)
    mgr.store("k", "s", [1, 2, 3], legacy_cache(3))
    entry = mgr.lookup("k", "s", [1, 9, 3, 4])  # edited history: only token 1 is shared
    assert entry.token_ids == [1] and entry.cache[0][0].shape[2] == 1
    assert len(mgr) == 0 and mgr.stats().bytes == 0
    mgr.store("k", "s", [1, 2, 3], legacy_cache(3))
    entry = mgr.lookup("k", "s", [1, 2])  # shorter than the cached sequence
    assert entry.token_ids == [1, 2] and entry.cache[0][0].shape[2] == 2
    mgr.store("k", "s", [1, 2, 3], legacy_cache(3))
    assert mgr.lookup("k", "s", [7, 2, 3]) is None  # nothing in common: a miss that drops the entry
    assert len(mgr) == 0
    assert (mgr.stats().hits, mgr.stats().misses) == (2, 1)


def test_dynamic_cache_is_cropped_to_the_common_prefix(model):
    with torch.no_grad():
        cache = model(torch.tensor([[5, 6, 7, 8]]), use_cache=True).past_key_values
    mgr = SessionCacheManager(budget_bytes=10**8, ttl_s=60)
    mgr.store("k", "s", [5, 6, 7, 8], cache)
    entry = mgr.lookup("k", "s", [5, 6, 9])
    assert entry.token_ids == [5, 6] and entry.cache.get_seq_length() == 2


def test_other_owner_never_reaches_the_cache():
    mgr = SessionCacheManager(budget_bytes=10**6, ttl_s=60)
    mgr.store("alice", "shared-id", [1, 2], legacy_cache(2))
    assert mgr.lookup("mallory", "shared-id", [1, 2, 3]) is None
    assert not mgr.drop("mallory", "shared-id")
    assert len(mgr) == 1  # Alice's entry is untouched
    assert mgr.lookup("alice", "shared-id", [1, 2, 3]) is not None


def test_lru_eviction_keeps_budget_and_evicts_least_recent_first():
    unit = nbytes_of(4)
    mgr = SessionCacheManager(budget_bytes=3 * unit, ttl_s=60)
    for name in ("a", "b", "c"):
        mgr.store("k", name, [1], legacy_cache(4))
    # Use "a" (check out + put back) so "b" is now the least recently used.
    mgr.store("k", "a", [1, 2], mgr.lookup("k", "a", [1, 2]).cache)
    mgr.store("other-owner", "d", [1], legacy_cache(4))
    assert mgr.stats().bytes <= mgr.budget_bytes
    assert mgr.lookup("k", "b", [1]) is None
    assert mgr.lookup("k", "c", [1]) is not None  # checked out: "a" and "d" remain
    mgr.store("k", "big", [1], legacy_cache(12))  # needs the whole budget: evicts "a" then "d"
    s = mgr.stats()
    assert s.bytes <= s.budget_bytes and s.entries == 1 and s.evictions == 3


def test_oversize_entry_is_not_stored_and_replaces_nothing_else():
    mgr = SessionCacheManager(budget_bytes=nbytes_of(4), ttl_s=60)
    mgr.store("k", "small", [1], legacy_cache(4))
    mgr.store("k", "huge", [1], legacy_cache(5))
    s = mgr.stats()
    assert (s.entries, s.bytes, s.evictions) == (1, nbytes_of(4), 1)
    # Replacing an entry with an oversize cache drops the old one too (it is stale).
    mgr.store("k", "small", [1, 2], legacy_cache(5))
    assert len(mgr) == 0 and mgr.stats().bytes == 0


def test_ttl_expiry_with_fake_clock():
    clock = FakeClock()
    mgr = SessionCacheManager(budget_bytes=10**6, ttl_s=10, clock=clock)
    mgr.store("k", "old", [1], legacy_cache(2))
    clock.now = 6
    mgr.store("k", "new", [1], legacy_cache(2))
    clock.now = 10
    assert mgr.expire() == 0
    clock.now = 10.5
    assert mgr.expire() == 1 and len(mgr) == 1
    clock.now = 17
    assert mgr.lookup("k", "new", [1, 2]) is None  # lazily expired, then a miss
    s = mgr.stats()
    assert (s.expirations, s.misses, s.entries, s.bytes) == (2, 1, 0, 0)


def test_stats_counters_and_dict():
    mgr = SessionCacheManager(budget_bytes=10**6, ttl_s=60)
    assert mgr.stats().hit_rate == 0.0
    mgr.store("k", "s", [1], legacy_cache(2))
    mgr.lookup("k", "s", [1, 2])
    mgr.lookup("k", "s", [1, 2])
    mgr.lookup("k", "t", [1])
    mgr.store("k", "s", [1, 2], legacy_cache(3))
    s = mgr.stats()
    assert isinstance(s, CacheStats)
    assert (s.hits, s.misses, s.entries, s.bytes, s.budget_bytes) == (1, 2, 1, nbytes_of(3), 10**6)
    assert s.hit_rate == pytest.approx(1 / 3)
    d = s.to_dict()
    assert d["hit_rate"] == pytest.approx(1 / 3) and d["bytes"] == nbytes_of(3) and d["evictions"] == 0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="budget_bytes"):
        SessionCacheManager(budget_bytes=-1, ttl_s=1)
    with pytest.raises(ValueError, match="ttl_s"):
        SessionCacheManager(budget_bytes=1, ttl_s=0)


def test_reused_prefix_gives_the_logits_of_a_full_recompute(model):
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, model.config.vocab_size, (1, 6), generator=gen)
    b = torch.randint(0, model.config.vocab_size, (1, 4), generator=gen)
    mgr = SessionCacheManager(budget_bytes=10**8, ttl_s=60)
    with torch.no_grad():
        first = model(a, use_cache=True)
        mgr.store("k", "s", a[0].tolist(), first.past_key_values)
        full_ids = torch.cat([a, b], dim=1)
        entry = mgr.lookup("k", "s", full_ids[0].tolist())
        assert entry is not None
        past = len(entry.token_ids)
        assert entry.cache.get_seq_length() == past
        new = full_ids[:, past:]
        reused = model(
            new,
            past_key_values=entry.cache,
            attention_mask=torch.ones(1, full_ids.shape[1], dtype=torch.long),
            position_ids=torch.arange(past, full_ids.shape[1]).unsqueeze(0),
            use_cache=True,
        )
        full = model(full_ids, use_cache=False)
    torch.testing.assert_close(reused.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reused.logits, full.logits[:, past:], atol=1e-5, rtol=1e-5)
    # The cache grew in place: it now covers A + B and can be stored back for the next turn.
    assert entry.cache.get_seq_length() == full_ids.shape[1]
    mgr.store("k", "s", full_ids[0].tolist(), entry.cache)
    assert mgr.stats().bytes == cache_nbytes(entry.cache) > 0
