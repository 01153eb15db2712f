"""Session-cache churn through one replica: the byte budget holds, evictions add up, answers stay right.

    .venv/bin/python -m pytest tests/integration/test_session_churn.py -s

600 distinct sessions of ~200-token histories, 8 at a time, alternating the seed API (``X-Session-ID``) and
``/v1/completions`` (``session_id``), through one replica (tiny preset, fp32) whose session cache has a
2 MiB budget: about two entries fit, so nearly every session evicts another. The load is the benchmark's
(``benchmarks.churn.drive_churn``, the engine of ``python -m jobs.benchmark churn``), sampling
``/api/v1/stats`` every 0.25 s. Nothing here depends on speed; the RSS figures are the benchmark's.
"""

from __future__ import annotations

import asyncio

import pytest

from tests._serve import free_port as _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSIONS, HISTORY, MAX_TOKENS, CONCURRENCY, REVISIT = 600, 200, 2, 8, 4
BUDGET_MB = 2.0
BUDGET = int(BUDGET_MB * 2**20)


@pytest.fixture(scope="module")
def churn(ray_cluster):
    """Deploy the app, run the churn, shut Serve down; return the result and the sessions' texts."""
    from ray import serve

    from benchmarks._load import warm_up
    from benchmarks.churn import churn_overrides, drive_churn, histories
    from llmopt.models import build_preset, load_tokenizer
    from serve_apps.llm import app

    build_preset("tiny-llama")
    texts, _ = histories(load_tokenizer("tiny-llama"), HISTORY, pool=16)
    overrides = churn_overrides(BUDGET_MB, HISTORY, MAX_TOKENS, replica_cpus=1)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"overrides": overrides}), name="llm", route_prefix="/")
        warm_up(url, texts[0], MAX_TOKENS)
        result = asyncio.run(drive_churn(url, texts, SESSIONS, MAX_TOKENS, CONCURRENCY, 0.25, REVISIT))
    finally:
        serve.shutdown()
    return result, texts, overrides


def test_the_budget_holds_in_every_sample(churn):
    result, _, _ = churn
    assert not result.errors, result.errors[:3]
    assert len(result.sessions) == SESSIONS
    load = [s for s in result.samples if s["t_s"] <= result.load_s]
    assert len(load) >= 3  # the sampler ran throughout, not only at the end
    assert max(s["entries"] for s in load) > 0
    assert all(s["bytes"] <= BUDGET for s in result.samples), max(s["bytes"] for s in result.samples)
    # Each entry holds ~200 positions of 4 layers' keys and values: a handful fit, never more.
    entry = max(s["bytes"] / s["entries"] for s in result.samples if s["entries"])
    assert all(s["entries"] <= BUDGET // entry + 1 for s in result.samples)


def test_evictions_account_for_every_session(churn):
    result, _, _ = churn
    end = result.end["kv_cache"]
    assert end["expirations"] == 0  # the TTL is longer than the run: entries leave only by eviction
    # Every distinct session was stored once (plus the tail and the revisits of evicted sessions, stored
    # again); what is not in the cache at rest was evicted.
    stores = SESSIONS + 1 + REVISIT
    assert end["evictions"] > 0
    assert end["evictions"] == stores - end["entries"]
    assert end["misses"] == end["entries"] + end["evictions"] and end["hits"] == 1
    # During the load, misses - entries - evictions counts sessions looked up and not yet stored back.
    for s in result.samples:
        assert 0 <= s["misses"] - s["entries"] - s["evictions"] - s["expirations"] <= CONCURRENCY


def test_revisits_answer_like_a_full_prefill(churn):
    """The tail session (alone, the most recent entry) hits; the oldest, evicted ones miss and prefill in
    full. Both answer their first turn's text, which is also the in-process engine's greedy answer."""
    from benchmarks.churn import history
    from llmopt.config import load_config
    from llmopt.data import encode_prompt
    from llmopt.models import load_model, load_tokenizer
    from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams

    result, texts, overrides = churn
    assert [r["expect"] for r in result.revisits] == ["hit"] + ["miss"] * REVISIT
    config = load_config(None, overrides)
    tokenizer = load_tokenizer(config.model)
    engine = GenerationEngine(load_model(config.model).eval(), tokenizer, max_batch_size=1)
    for r in result.revisits:
        if r["expect"] == "hit":
            assert r["cached_tokens"] == r["prompt_tokens"] - 1  # all but the last prompt token reused
        else:
            assert r["cached_tokens"] == 0
        ids = encode_prompt(history(texts[r["index"] % len(texts)], r["index"]), tokenizer)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        outs = engine.generate([GenerationRequest("ref", ids, params)])["ref"]
        assert r["text"] == r["first_text"] == "".join(o.text for o in outs), r


def test_the_replica_trims_its_heap_while_evicting(churn):
    """On glibc the replica hands the heap's freed space back while the cache evicts (the RSS drift's fix)."""
    result, _, _ = churn
    heap = result.end.get("heap")
    if heap is None:
        pytest.skip("not glibc: no malloc_trim")
    assert heap["trims"] >= 1 and heap["in_use_bytes"] > 0
