"""The response cache's keys, LRU store and replay, without a server."""

import asyncio
import json

from llmopt.config import load_config
from llmopt.serve import ResponseCache, cache_key, cacheable, replay_events, replay_whole
from llmopt.serve._response_cache import LRUStore


def test_what_is_cacheable_and_what_the_key_reads():
    assert cacheable({"temperature": 0}) and cacheable({"temperature": 1.0, "seed": 3})
    assert not cacheable({}) and not cacheable({"temperature": 0.5})
    assert not cacheable({"temperature": 0, "session_id": "s"})
    body = {"prompt": "p", "temperature": 0, "max_tokens": 4}
    key = cache_key("owner", "completions", "m", body)
    assert key == cache_key("owner", "completions", "m", {**body, "user": "x", "metadata": {"a": "b"}})
    for other in (
        cache_key("someone", "completions", "m", body),
        cache_key("owner", "chat", "m", body),
        cache_key("owner", "completions", "m2", body),
        cache_key("owner", "completions", "m", {**body, "max_tokens": 5}),
        cache_key("owner", "completions", "m", {**body, "stop": ["x"]}),
    ):
        assert other != key


def test_lru_keeps_the_byte_budget_and_evicts_the_least_recently_used():
    async def run():
        store = LRUStore(max_bytes=100, ttl_s=60)
        await store.put("a", b"x" * 40)
        await store.put("b", b"y" * 40)
        assert await store.get("a") == b"x" * 40  # a is now the most recent
        await store.put("c", b"z" * 40)  # over 100: b goes
        assert await store.get("b") is None and await store.get("a") and await store.get("c")
        assert store.bytes == 80 and store.entries == 2
        await store.put("huge", b"h" * 101)  # bigger than the budget: not kept, nothing evicted
        assert await store.get("huge") is None and store.entries == 2
        expired = LRUStore(max_bytes=100, ttl_s=-1)
        await expired.put("a", b"x")
        assert await expired.get("a") is None and expired.bytes == 0

    asyncio.run(run())


def test_a_failing_store_is_a_counted_miss_and_replay_renews_ids():
    class Broken:
        bytes = entries = None

        async def get(self, key):
            raise ConnectionError("down")

        async def put(self, key, value):
            raise ConnectionError("down")

    cache = ResponseCache(Broken(), "redis")
    assert asyncio.run(cache.get("k")) is None
    asyncio.run(cache.put("k", {"kind": "whole", "body": {}}))
    assert cache.stats()["error"] == 2 and cache.stats()["miss"] == 0
    entry = {"kind": "whole", "body": {"id": "cmpl-old", "created": 1, "choices": [{"text": "t"}]}}
    assert replay_whole(entry, "cmpl-new", 5) == {"id": "cmpl-new", "created": 5, "choices": [{"text": "t"}]}
    events = ['data: {"id": "old", "created": 1, "choices": []}\n\n', "data: [DONE]\n\n"]
    replayed = list(replay_events({"kind": "stream", "events": events}, "new", 9))
    assert json.loads(replayed[0][6:]) == {"id": "new", "created": 9, "choices": []}
    assert replayed[1] == "data: [DONE]\n\n"


def test_config_names_the_fix():
    import pytest

    from llmopt.config import ConfigError

    with pytest.raises(ConfigError, match=r"set serving\.response_cache\.enabled=true"):
        load_config(None, ["serving.response_cache.redis_url=redis://127.0.0.1:6379/0"])
    with pytest.raises(ConfigError, match="is not a Redis URL"):
        load_config(
            None, ["serving.response_cache.enabled=true", "serving.response_cache.redis_url=http://x"]
        )
    cache = ResponseCache.from_config(
        load_config(None, ["serving.response_cache.enabled=true"]).serving.response_cache
    )
    assert cache.backend == "memory" and cache.store.max_bytes == 64 * 2**20
