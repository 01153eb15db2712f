"""Serving on one GPU: the replica loads onto the GPU Ray assigned it (bf16 where the GPU has it), with its
LoRA adapter on the same device, answers OpenAI requests over Serve's HTTP proxy, and says so in its stats;
with serving.engine=vllm (where vLLM imports) the replica runs vLLM's engine on that GPU instead."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest
import torch

from tests._serve import free_port as _free_port

OVERRIDES = [
    "serving.engine=native",
    "model.max_seq_len=128",
    "serving.batching.max_batch_size=4",
    "resources.cpus_per_worker=1",
    "resources.gpus_per_worker=1",
]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from llmopt.models import load_model

    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(load_model("tiny-llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    return folder


def _app(repo, overrides: list[str]):
    from ray import serve

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from serve_apps.llm import app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"overrides": overrides}), name="llm-gpu")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def gpu_server(gpu_ray_cluster, repo, adapter):
    yield from _app(repo, [*OVERRIDES, f"serving.adapters.demo={adapter}"])


def test_the_replica_answers_openai_requests_on_the_gpu(gpu_server):
    body = {"model": "tiny-llama", "prompt": "reverse: 123", "max_tokens": 8, "temperature": 0}
    answer = _post(f"{gpu_server}/v1/completions", body)
    assert answer["object"] == "text_completion" and answer["usage"]["completion_tokens"] >= 1
    chat = _post(
        f"{gpu_server}/v1/chat/completions",
        {"model": "tiny-llama:demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat["choices"][0]["message"]["role"] == "assistant"
    stats = _get(f"{gpu_server}/api/v1/stats")
    print(f"\nanswer: {answer['choices'][0]['text']!r}; stats: {json.dumps(stats)}")
    assert stats["device"].startswith("cuda:0 (")
    memory = stats["memory"]
    assert memory["device"] == "cuda:0" and 0 < memory["allocated_bytes"] <= memory["total_bytes"]
    assert stats["engine"]["decode_kernel"] == "torch"  # the native CPU kernels stay off on a GPU
    assert stats["engine"]["decode_path"].startswith("transformers")


@pytest.mark.vllm
def test_the_vllm_engine_serves_on_the_gpu(gpu_ray_cluster, repo, adapter):
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    overrides = [
        *OVERRIDES,
        "serving.engine=vllm",
        "serving.vllm_engine_kwargs.gpu_memory_utilization=0.4",
        f"serving.adapters.demo={adapter}",
    ]
    for server in _app(repo, overrides):
        prompts = ["reverse: 123", "Once upon a time", "a b c"]
        body = {"model": "tiny-llama", "prompt": prompts, "max_tokens": 8, "temperature": 0}
        answer = _post(f"{server}/v1/completions", body)
        assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
        tuned = _post(f"{server}/v1/completions", {**body, "model": "tiny-llama:demo"})
        assert tuned["usage"]["completion_tokens"] >= 3
        stats = _get(f"{server}/api/v1/stats")
        print(f"\nvLLM on the GPU: {json.dumps(stats)}")
        assert stats["device"].startswith("cuda:0 (") and stats["engine"]["name"] == "vllm"
        assert stats["engine"]["adapters"] == ["demo"] and stats["engine"]["arguments"]["max_loras"] == 1
