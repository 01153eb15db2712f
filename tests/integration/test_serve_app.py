"""serve_apps.llm on the local Ray cluster: health, models, completions (whole, streamed, concurrent), errors.

The server tokenizes a prompt with ``llmopt.data.encode_prompt``; the reference generations here do the same.
"""

from __future__ import annotations

import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = [pytest.mark.integration]

OVERRIDES = [
    "model.max_seq_len=128",
    "serving.batching.max_batch_size=4",
    "serving.max_new_tokens=16",
    "resources.cpus_per_worker=1",
]
PROMPTS = ["Hello world", "The quick brown fox", "a b c", "Once upon a time", "reverse: abc", "42 is"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster, repo):
    """Deploy the app (one replica) on a free port; yield its base URL; shut Serve down afterwards."""
    from ray import serve

    # `python -m pytest` (the Makefile) puts the repository on sys.path; a bare `pytest` does not.
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))

    from serve_apps.llm import app_builder

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({"overrides": OVERRIDES}), name="llm", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference():
    """Greedy completions computed in-process with the same engine, model and tokenization."""
    from llmopt.config import load_config
    from llmopt.data import encode_prompt
    from llmopt.models import load_model, load_tokenizer
    from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams

    config = load_config(None, OVERRIDES)
    tokenizer = load_tokenizer(config.model)
    engine = GenerationEngine(load_model(config.model).eval(), tokenizer, max_batch_size=1)

    def generate(prompt: str, max_tokens: int) -> tuple[str, int, int]:
        ids = encode_prompt(prompt, tokenizer)
        request = GenerationRequest("ref", ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        outs = engine.generate([request])["ref"]
        return "".join(o.text for o in outs), len(ids), len(outs)

    return generate


def _complete(url: str, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def test_health_and_models(server):
    assert httpx.get(f"{server}/health", timeout=30).json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models", timeout=30).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]


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
    }


def test_openai_client_whole_and_streamed(server, reference):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60)
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


def test_chat_completions_use_the_chat_template(server, reference):
    import openai

    from llmopt.models import load_tokenizer

    messages = [{"role": "user", "content": "Reverse the digits: 1234"}]
    prompt = load_tokenizer("tiny-llama").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=60)
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
    bad = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert bad.status_code == 400 and "messages.0.role" in bad.json()["error"]["message"]
    empty = httpx.post(f"{server}/v1/chat/completions", json={"messages": []})
    assert empty.status_code == 400


def test_raw_stream_is_sse(server):
    body = {"prompt": PROMPTS[2], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
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
        headers={"content-type": "application/json"},
        timeout=30,
    )
    _error(bad_json, {400, 422})
    assert _complete(server, PROMPTS[0]).status_code == 200
