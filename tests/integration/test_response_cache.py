"""The response cache through the Serve app, in process and in a real redis-server started by the test:
repeated greedy or seeded requests are answered from it (streams replayed as streams), per API key, and
everything else passes by it; a Redis that goes away costs the cache, never a request."""

from __future__ import annotations

import json

import httpx
import pytest

from tests._redis import redis_server
from tests._serve import llm_app

pytestmark = [pytest.mark.integration]

KEYS = ("key-a", "key-b")
OVERRIDES = [
    "model.max_seq_len=128",
    "serving.engine=native",
    "serving.batching.max_batch_size=4",
    "serving.max_new_tokens=16",
    "serving.response_cache.enabled=true",
    "resources.cpus_per_worker=1",
]


@pytest.fixture(scope="module", params=["memory", "redis"])
def backend(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    (root / "keys").write_text("\n".join(KEYS))
    overrides = [*OVERRIDES, f"serving.api_keys_file={root / 'keys'}"]
    if request.param == "memory":
        yield request.param, overrides, None
        return
    with redis_server(root) as (url, proc):
        yield request.param, [*overrides, f"serving.response_cache.redis_url={url}"], (url, proc)


@pytest.fixture(scope="module")
def server(ray_cluster, repo, backend):
    with llm_app(repo, backend[1], name="cache") as url:
        yield url


def _post(url: str, route: str, key: str = KEYS[0], **body):
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}{route}", json={"max_tokens": 8, **body}, headers=headers, timeout=60)


def test_a_repeated_greedy_request_is_a_hit_with_the_same_answer(server, backend):
    body = {"prompt": f"cache {backend[0]} one", "temperature": 0, "logprobs": 2}
    first = _post(server, "/v1/completions", **body)
    again = _post(server, "/v1/completions", **body)
    assert first.status_code == again.status_code == 200
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    a, b = first.json(), again.json()
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"] and a["id"] != b["id"]
    # Another caller, another sampling field or another prompt is another entry.
    assert _post(server, "/v1/completions", key=KEYS[1], **body).headers["x-cache"] == "miss"
    assert _post(server, "/v1/completions", **{**body, "max_tokens": 7}).headers["x-cache"] == "miss"
    assert _post(server, "/v1/completions", **{**body, "prompt": "other"}).headers["x-cache"] == "miss"
    # OpenAI's bookkeeping fields do not change the answer, so they do not change the key.
    assert _post(server, "/v1/completions", **{**body, "user": "u1"}).headers["x-cache"] == "hit"


def test_seeded_sampling_is_cached_and_unseeded_sampling_is_not(server, backend):
    seeded = {"prompt": f"cache {backend[0]} two", "temperature": 0.9, "seed": 7}
    first, again = (_post(server, "/v1/completions", **seeded) for _ in range(2))
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert first.json()["choices"] == again.json()["choices"]
    free = _post(server, "/v1/completions", prompt="cache free", temperature=0.9)
    assert free.status_code == 200 and free.headers["x-cache"] == "bypass"
    session = _post(server, "/v1/completions", prompt="cache s", temperature=0, session_id="s1")
    assert session.headers["x-cache"] == "bypass"  # a session's turn also grows its server-side cache


def test_a_stream_is_replayed_as_a_stream(server, backend):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEYS[0], max_retries=0)
    messages = [{"role": "user", "content": f"cache {backend[0]} three"}]

    def streamed():
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-llama", messages=messages, temperature=0, max_tokens=8, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(raw.parse())
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return raw.headers["x-cache"], text, chunks[-1].usage, {c.id for c in chunks}

    miss, hit = streamed(), streamed()
    assert (miss[0], hit[0]) == ("miss", "hit")
    assert miss[1] == hit[1] and miss[1] and miss[2] == hit[2]
    assert len(hit[3]) == 1 and hit[3] != miss[3]  # one fresh id for the whole replay
    whole = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=messages, temperature=0, max_tokens=8
    )
    assert whole.headers["x-cache"] == "miss"  # a whole answer is another entry than a stream
    assert whole.parse().choices[0].message.content == miss[1]


def test_counts_and_the_store_then_redis_going_away_costs_no_request(server, backend):
    stats = httpx.get(f"{server}/api/v1/stats", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30)
    cache = stats.json()["response_cache"]
    assert cache["backend"] == backend[0] and cache["hit"] >= 4 and cache["miss"] >= 6
    assert cache["bypass"] >= 2 and cache["error"] == 0
    if backend[2] is None:
        assert cache["entries"] >= 6 and cache["bytes"] > 0
        return
    import redis

    url, proc = backend[2]
    keys = redis.Redis.from_url(url).keys("llmopt:response:*")
    assert len(keys) >= 6 and all(json.loads(redis.Redis.from_url(url).get(k))["kind"] for k in keys)
    proc.terminate()
    proc.wait(timeout=10)
    body = {"prompt": f"cache {backend[0]} one", "temperature": 0, "logprobs": 2}
    after = _post(server, "/v1/completions", **body)  # was a hit; Redis is gone: generated again
    assert after.status_code == 200 and after.headers["x-cache"] == "miss" and after.json()["choices"]
