"""serve_apps.llm on the local Ray cluster: health, models, completions (whole, streamed, concurrent), errors.

The server tokenizes a prompt with ``llmopt.data.encode_prompt``; the reference generations here do the same.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests._serve import ENGINES, engine_overrides, llm_app
from tests._serve import VLLM_BLOCK as BLOCK

pytestmark = [pytest.mark.integration]

KEYS = ("key-alice", "key-bob")
OVERRIDES = [
    "model.max_seq_len=128",
    "serving.batching.max_batch_size=4",
    "serving.max_new_tokens=16",
    "resources.cpus_per_worker=1",
]
PROMPTS = ["Hello world", "The quick brown fox", "a b c", "Once upon a time", "reverse: abc", "42 is"]
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def _save_adapter(path) -> None:
    """A real peft LoRA adapter for tiny-llama with non-zero B, so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model

    from llmopt.models import load_model

    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]
    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # a trained-looking adapter: both factors non-zero and large
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)


# Both layouts of the app (serving.layout): `single` (one replica, the default here) serves HTTP and runs the
# engine in one process; `split` relays from an ingress replica to the model replica through a handle.
CASES = [
    *(pytest.param((engine.values[0], "single"), id=engine.id, marks=engine.marks) for engine in ENGINES),
    pytest.param(("native", "split"), id="native-split"),
]


@pytest.fixture(scope="module", params=CASES)
def case(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(scope="module")
def engine(case) -> str:
    return case[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, case):
    """The app's overrides: the engine and layout, API keys from a secret file and one LoRA adapter (as a
    run directory)."""
    engine, layout = case
    root = tmp_path_factory.mktemp("serve")
    (root / "keys").write_text("\n".join(KEYS) + "\n")
    _save_adapter(root / "run" / "adapter")
    return [
        *OVERRIDES,
        *engine_overrides(engine),
        f"serving.layout={layout}",
        f"serving.api_keys_file={root / 'keys'}",
        f"serving.adapters.demo={root / 'run'}",
    ]


@pytest.fixture(scope="module")
def server(ray_cluster, repo, setup):
    """Deploy the app (one replica) on a free port; yield its base URL; shut Serve down afterwards."""
    with llm_app(repo, setup) as url:
        yield url


@pytest.fixture(scope="module")
def reference(setup):
    """Greedy completions computed in-process with the same engine, model, adapter and tokenization."""
    from peft import PeftModel

    from llmopt.config import load_config
    from llmopt.data import encode_prompt
    from llmopt.models import load_model, load_tokenizer
    from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, resolve_adapter

    config = load_config(None, setup)
    tokenizer = load_tokenizer(config.model)
    base = GenerationEngine(load_model(config.model).eval(), tokenizer, max_batch_size=1)
    folder = resolve_adapter("demo", config.serving.adapters["demo"])
    tuned = PeftModel.from_pretrained(load_model(config.model), str(folder)).eval()
    adapted = GenerationEngine(tuned, tokenizer, max_batch_size=1)

    def generate(prompt: str, max_tokens: int, adapter: bool = False) -> tuple[str, int, int]:
        ids = encode_prompt(prompt, tokenizer)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        request = GenerationRequest("ref", ids, params, adapter="default" if adapter else None)
        outs = (adapted if adapter else base).generate([request])["ref"]
        return "".join(o.text for o in outs), len(ids), len(outs)

    return generate


def _complete(url: str, prompt: str, max_tokens: int = 8, headers=AUTH, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def test_health_and_models(server):
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models", headers=AUTH, timeout=30).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-llama", "tiny-llama:demo"]


def test_greedy_completion_matches_engine(server, reference):
    response = _complete(server, PROMPTS[0], model="tiny-llama")
    assert response.status_code == 200, response.text
    body = response.json()
    text, prompt_tokens, completion_tokens = reference(PROMPTS[0], 8)
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
    assert body["choices"][0]["text"] == text
    assert body["choices"][0]["finish_reason"] in {"length", "stop"}
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_openai_client_whole_and_streamed(server, reference):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS[0], timeout=60)
    whole = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert whole.choices[0].text == reference(PROMPTS[1], 8)[0]
    assert whole.usage.completion_tokens == reference(PROMPTS[1], 8)[2]
    stream = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    with_usage = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS[1],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    *text_chunks, last = list(with_usage)
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text


def test_chat_completions_use_the_chat_template(server, reference):
    import openai

    from llmopt.models import load_tokenizer

    messages = [{"role": "user", "content": "Reverse the digits: 1234"}]
    prompt = load_tokenizer("tiny-llama").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS[0], timeout=60)
    whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == reference(prompt, 8)[0]
    assert whole.usage.prompt_tokens == reference(prompt, 8)[1]
    stream = client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    robot = {"messages": [{"role": "robot", "content": "x"}]}
    bad = httpx.post(f"{server}/v1/chat/completions", json=robot, headers=AUTH)
    assert bad.status_code == 400 and "messages.0.role" in bad.json()["error"]["message"]
    empty = httpx.post(f"{server}/v1/chat/completions", json={"messages": []}, headers=AUTH)
    assert empty.status_code == 400


def test_raw_stream_is_sse(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["choices"][0]["index"] == 0


def test_concurrent_requests_match_sequential(server):
    sequential = [_complete(server, p).json()["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda p: _complete(server, p), PROMPTS))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == sequential


def _error(response: httpx.Response, statuses: set[int]) -> dict:
    assert response.status_code in statuses, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    return error


def test_errors_leave_the_replica_serving(server):
    error = _error(_complete(server, "hi", bogus_field=1), {400, 422})
    assert "bogus_field" in error["message"]
    _error(_complete(server, "hi", max_tokens=0), {400, 422})
    _error(_complete(server, "hi", max_tokens=10_000), {400})
    error = _error(_complete(server, "word " * 400), {400})
    assert "context" in error["message"]
    error = _error(_complete(server, "hi", model="no-such-model"), {404})
    assert "no-such-model" in error["message"]
    bad_json = httpx.post(
        f"{server}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json", **AUTH},
        timeout=30,
    )
    assert "JSON" in _error(bad_json, {400})["message"]
    _error(_complete(server, "hi", model="tiny-llama:nope"), {404})
    huge = httpx.post(f"{server}/v1/completions", content=b"x" * 2_000_000, headers=AUTH, timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    assert _complete(server, PROMPTS[0]).status_code == 200


def test_api_keys_are_required(server):
    assert httpx.get(f"{server}/health", timeout=30).status_code == 200  # probes need no key
    missing = _complete(server, PROMPTS[0], headers={})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "authentication_error"
    wrong = _complete(server, PROMPTS[0], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{server}/v1/models", timeout=30).status_code == 401
    assert _complete(server, PROMPTS[0], headers={"X-API-Key": KEYS[1]}).status_code == 200


def test_lora_adapter_by_model_name_in_mixed_batches(server, reference):
    adapted = reference(PROMPTS[3], 8, adapter=True)[0]
    assert adapted != reference(PROMPTS[3], 8)[0]  # the adapter really changes the output
    jobs = [(p, m) for p in PROMPTS[:3] for m in ("tiny-llama", "tiny-llama:demo", "demo")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: _complete(server, job[0], model=job[1]), jobs))
    for (prompt, model), response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        want = reference(prompt, 8, adapter=model != "tiny-llama")[0]
        assert response.json()["choices"][0]["text"] == want, (prompt, model)


def _generate(url: str, prompt: str, session: str | None, key: str = KEYS[0], **extra) -> tuple[str, dict]:
    headers = {"Authorization": f"Bearer {key}", **({"X-Session-ID": session} if session else {})}
    body = {"prompt": prompt, "max_tokens": 8, **extra}
    with httpx.stream("POST", f"{url}/api/v1/model/generate", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/plain")
        text = "".join(r.iter_text())
        return text, dict(r.headers)


def _cut(text: str, engine: str) -> str:
    """The text as ``engine`` ends it: where max_tokens cuts a character short, the native engine shows its
    bytes as U+FFFD, as decoding the tokens does, and vLLM's detokenizer leaves them out."""
    return text.rstrip("\ufffd") if engine == "vllm" else text


def test_seed_generate_reuses_the_session_cache_per_key(server, reference, engine):
    history = "The quick brown fox jumps over the lazy dog, again and again, " * 2
    first, headers = _generate(server, history, "conv-1")
    assert first == _cut(reference(history, 8)[0], engine)
    assert headers["x-cached-tokens"] == "0" and headers["x-session-id"] == "conv-1"
    follow = history + first + " and then?"
    second, headers = _generate(server, follow, "conv-1")
    cached = int(headers["x-cached-tokens"])
    assert 0 < cached < int(headers["x-prompt-tokens"])  # only the new tokens were prefilled
    assert second == _cut(reference(follow, 8)[0], engine)  # same output as a full recompute
    # Another caller using the same session id never reaches the first caller's cache.
    other, headers = _generate(server, follow, "conv-1", key=KEYS[1])
    assert headers["x-cached-tokens"] == "0" and other == second
    whole = httpx.post(
        f"{server}/api/v1/model/generate",
        json={"prompt": follow, "max_tokens": 8, "stream": False},
        headers={**AUTH, "X-Session-ID": "conv-1"},
        timeout=60,
    ).json()
    assert whole["text"] == second and whole["session_id"] == "conv-1"
    assert whole["usage"]["cached_tokens"] > 0


def test_openai_session_id_reuses_the_prefix(server, engine):
    story = "Reverse the digits: 98765 and tell me a story about a fox that jumps over a lazy dog"
    messages = [{"role": "user", "content": story}]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "session_id": "chat-7"}
    url = f"{server}/v1/chat/completions"
    first = httpx.post(url, json=body, headers=AUTH, timeout=60).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    messages += [first["choices"][0]["message"], {"role": "user", "content": "Again"}]
    second = httpx.post(url, json={**body, "messages": messages}, headers=AUTH, timeout=60).json()
    cached, earlier = (
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        first["usage"]["prompt_tokens"],
    )
    # The native engine keeps the whole first turn; vLLM's prefix cache keeps it in whole blocks.
    assert cached >= (earlier if engine == "native" else BLOCK * (earlier // BLOCK)) and cached > 0
    fresh = httpx.post(url, json={**body, "messages": messages, "session_id": None}, headers=AUTH, timeout=60)
    assert fresh.json()["choices"] == second["choices"]


def test_batch_generate_and_batching_under_concurrency(server, reference, engine, setup):
    body = {"prompts": PROMPTS[:4], "max_tokens": 8}
    response = httpx.post(f"{server}/api/v1/model/batch-generate", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["text"] for r in results] == [reference(p, 8)[0] for p in PROMPTS[:4]]
    stats = httpx.get(f"{server}/api/v1/stats", headers=AUTH, timeout=30).json()
    # A replica given no GPU computes on the CPU and reports the process's memory there.
    assert stats["device"] == "cpu" and stats["memory"]["device"] == "cpu"
    assert stats["memory"]["rss_bytes"] > 0
    assert stats["engine"]["name"] == engine and stats["engine"]["max_batch_size"] == 4
    if engine == "vllm":
        vllm = stats["engine"]
        assert vllm["arguments"]["max_num_seqs"] == 4 and vllm["arguments"]["enable_lora"] is True
        assert vllm["adapters"] == ["demo"] and vllm["requests"] >= 4 and vllm["running"] == 0
        return
    assert stats["engine"]["mode"] == "continuous"
    kernel = stats["engine"]["decode_kernel"]
    assert kernel.startswith("native") or kernel == "torch"  # torch's: no C compiler on this machine
    # This app loads a LoRA adapter, so its replicas decode through peft's model, not the lean Llama step.
    assert stats["engine"]["decode_path"] == "transformers (PeftModel is not LlamaForCausalLM)"
    # Decode steps on the replica's CPU share; prefills (`serving.prefill_threads: auto`, one replica) on
    # every CPU the process may use.
    from llmopt.config import load_config
    from llmopt.runtime import available_cpus, threads_for_cpus

    config = load_config(None, setup)
    assert config.serving.prefill_threads == "auto" and config.serving.autoscaling.max_replicas == 1
    decode = threads_for_cpus(config.resources.cpus_per_worker)
    assert stats["engine"]["threads"] == {"decode": decode, "prefill": max(decode, available_cpus())}
    assert stats["batch_size"]["max"] > 1  # requests really were decoded together
    assert stats["kv_cache"]["hits"] >= 1
    clock = stats["engine_thread"]
    assert clock["steps_s"] > 0
    if "on_cpu_s" in clock:  # Linux's per-thread scheduler counters
        assert 0 < clock["on_cpu_s"] <= clock["steps_s"] + 0.01
        assert clock["waiting_for_cpu_s"] >= 0 and clock["blocked_s"] >= 0


def test_metrics_reach_prometheus(server, ray_cluster, engine):
    import time

    node = ray_cluster._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    _complete(server, PROMPTS[0])
    assert _complete(server, PROMPTS[0], headers={}).status_code == 401  # counted by its status code
    wanted = [
        'code="401"',
        "ray_llmopt_requests_total",
        "ray_llmopt_errors_total",
        "ray_llmopt_time_to_first_token_seconds",
        "ray_llmopt_time_per_output_token_seconds",
        "ray_llmopt_batch_size",
        "ray_llmopt_queue_length",
        "ray_llmopt_kv_cache_bytes",
        "ray_llmopt_kv_cache_hit_rate",
    ]
    if engine == "vllm":  # vLLM's own series next to llmopt's (the same names as `vllm serve` exports)
        wanted += ["ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc"]
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:
        text = httpx.get(url, timeout=10).text
        missing = [name for name in wanted if name not in text]
        if missing:
            time.sleep(2)
    assert not missing, f"not exported on {url}: {missing}"


def test_overload_returns_503_with_retry_after(server, setup):
    from ray import serve

    from serve_apps.llm import app

    tight = [
        *setup,
        "serving.batching.max_batch_size=1",
        "serving.max_ongoing_requests=1",
        "serving.max_queued_requests=1",
        "resources.cpus_per_worker=0.5",
    ]
    serve.run(app({"overrides": tight}), name="tight", route_prefix="/tight")
    try:
        url = f"{server}/tight"
        slow = {"max_tokens": 100, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda p: _complete(url, p, **slow), PROMPTS + PROMPTS[:2]))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes, [r.text[-400:] for r in responses if r.status_code != 200][:1]
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers.get("retry-after") == "1", (rejected.headers, rejected.text)
        assert rejected.json()["error"]["code"] == "overloaded"
        assert _complete(url, PROMPTS[0]).status_code == 200  # still serving after the burst
    finally:
        serve.delete("tight")
