"""OpenAI conformance of serve_apps.llm over real Serve HTTP: the openai SDK with every parameter (sync,
async, streamed), LangChain's clients with their defaults, vLLM's extensions and endpoints, the OpenAPI
document, unsupported fields named, limits enforced, and hostile bodies answered with 4xx while the batch
goes on."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests._serve import ENGINES, engine_overrides, llm_app

pytestmark = [pytest.mark.integration]

OVERRIDES = [
    "model.max_seq_len=128",
    "serving.batching.max_batch_size=8",
    "serving.max_new_tokens=16",
    "serving.max_n=4",
    "serving.max_logprobs=5",
    "serving.max_stop=8",
    "serving.max_logit_bias=64",
    "resources.cpus_per_worker=1",
]
PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the digits: 1234"}]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(ray_cluster, repo, engine):
    """The app (one replica, no API keys, the engine under test) on a free loopback port; Serve shut down
    afterwards."""
    with llm_app(repo, OVERRIDES + engine_overrides(engine)) as url:
        yield url


@pytest.fixture(scope="module")
def local():
    """The served model and tokenizer, in-process, for reference log-probabilities."""
    from llmopt.models import load_model, load_tokenizer

    return load_model("tiny-llama").eval(), load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)


def _post(url: str, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=120)
    return httpx.post(url + path, json=body, timeout=120, **kw)


def _rejected(response: httpx.Response, *words: str, status: int = 400) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message, message
    assert "Traceback" not in response.text
    return message


# ---- the openai SDK --------------------------------------------------------------------------------------
def test_completions_with_every_openai_parameter(client):
    whole = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.8,
        top_p=0.95,
        n=2,
        best_of=3,
        logprobs=2,
        echo=True,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        logit_bias={"7": -100},
        seed=11,
        stop=["\n\n", "###"],
        user="user-1",
        suffix=None,
        extra_body={
            "top_k": 40,
            "min_p": 0.01,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "add_special_tokens": True,
            "skip_special_tokens": True,
            "include_stop_str_in_output": False,
            "ignore_eos": False,
        },
    )
    assert [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        assert choice.text.startswith(PROMPT)
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first prompt token
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) <= 2 for t in lp.top_logprobs[1:])
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert "".join(lp.tokens).endswith(choice.text[len(PROMPT) :])
    assert whole.usage.completion_tokens >= 3 * 2  # best_of=3 choices were generated, min_tokens=2 each
    # best_of keeps the n choices of highest total log-probability, best first
    prompt = whole.usage.prompt_tokens
    totals = [sum(c.logprobs.token_logprobs[prompt:]) for c in whole.choices]
    assert totals == sorted(totals, reverse=True)


def test_chat_with_every_openai_parameter(client):
    whole = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        max_completion_tokens=6,
        temperature=0.7,
        top_p=0.9,
        n=3,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"5": 2},
        seed=3,
        stop="\n\n",
        user="user-2",
        response_format={"type": "text"},
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        metadata={"team": "a"},
        service_tier="auto",
        extra_body={"repetition_penalty": 1.05, "min_tokens": 1, "top_k": -1},
    )
    assert whole.object == "chat.completion" and [c.index for c in whole.choices] == [0, 1, 2]
    for choice in whole.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        content = choice.logprobs.content
        assert len(content) >= 1 and all(len(t.top_logprobs) == 3 for t in content)
        assert all(t.bytes == list(t.token.encode()) for t in content)
    assert whole.usage.completion_tokens == sum(len(c.logprobs.content) for c in whole.choices)
    streamed = client.chat.completions.create(
        model="tiny-llama",
        messages=CHAT,
        max_tokens=6,
        temperature=0,
        n=2,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            assert choice.logprobs is not None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    greedy = client.chat.completions.create(model="tiny-llama", messages=CHAT, max_tokens=6, temperature=0)
    assert texts[0] == texts[1] == greedy.choices[0].message.content  # greedy choices agree


def test_async_streamed_completions_with_n_and_usage(server):
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)
        stream = await client.completions.create(
            model="tiny-llama",
            prompt=[PROMPT, "Once upon a time"],
            max_tokens=5,
            temperature=0,
            n=2,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
            usage = chunk.usage or usage
        whole = await client.completions.create(
            model="tiny-llama", prompt=[PROMPT, "Once upon a time"], max_tokens=5, temperature=0
        )
        return texts, usage, whole

    texts, usage, whole = asyncio.run(run())
    assert sorted(texts) == [0, 1, 2, 3]  # choice p * n + j
    assert texts[0] == texts[1] == whole.choices[0].text and texts[2] == texts[3] == whole.choices[1].text
    assert usage.completion_tokens == 2 * whole.usage.completion_tokens


def test_prompts_as_strings_token_ids_and_lists(server, client, local):
    from llmopt.data import encode_prompt

    _, tokenizer = local
    ids = encode_prompt(PROMPT, tokenizer)
    text = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    assert by_ids.usage.prompt_tokens == text.usage.prompt_tokens == len(ids)
    many = client.completions.create(model="tiny-llama", prompt=[ids, ids[:3]], max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text == text.choices[0].text
    _rejected(_post(server, "/v1/completions", {"prompt": []}), "prompt")
    _rejected(_post(server, "/v1/completions", {"prompt": [[]]}), "prompt")
    _rejected(_post(server, "/v1/completions", {"prompt": [10**9]}), "prompt", "vocabulary")


def test_logprobs_equal_a_direct_forward_pass(client, local):
    import torch

    from llmopt.data import encode_prompt

    model, tokenizer = local
    result = client.completions.create(
        model="tiny-llama",
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    lp = result.choices[0].logprobs
    prompt_ids = encode_prompt(PROMPT, tokenizer)
    # The greedy tokens the server generated, in-process; then every logprob against one forward pass.
    from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams

    with torch.no_grad():
        outs = GenerationEngine(model, tokenizer).generate(
            [GenerationRequest("r", prompt_ids, SamplingParams(max_tokens=5, ignore_eos=True))]
        )["r"]
        ids = prompt_ids + [o.token_id for o in outs]
        reference = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    assert len(lp.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-3)
        best = reference[i - 1].topk(3).values.tolist()
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(best, abs=1e-3)


def test_choices_with_seeds(client):
    def texts(seed):
        result = client.completions.create(
            model="tiny-llama",
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            n=4,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return [c.text for c in result.choices]

    first, again = texts(5), texts(5)
    assert first == again  # the same seed gives the same choices
    assert len(set(first)) > 1  # choices of one request have distinct seeds
    assert texts(6) != first


# ---- LangChain with its defaults -------------------------------------------------------------------------
def test_langchain_clients_unchanged(server):
    from langchain_openai import ChatOpenAI, OpenAI

    chat = ChatOpenAI(base_url=f"{server}/v1", api_key="unused", model="tiny-llama", max_tokens=8)
    reply = chat.invoke("Reverse the digits: 1234")
    assert isinstance(reply.content, str) and reply.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.content for chunk in chat.stream("Hello")) is not None
    llm = OpenAI(base_url=f"{server}/v1", api_key="unused", model="tiny-llama", max_tokens=8)
    assert isinstance(llm.invoke(PROMPT), str)
    assert len(llm.batch([PROMPT, "Once upon a time"])) == 2


# ---- vLLM's endpoints, the OpenAPI document, metrics ----------------------------------------------------
def test_tokenize_and_detokenize(server, local):
    from llmopt.data import encode_prompt

    _, tokenizer = local
    tokens = _post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokens["tokens"] == encode_prompt(PROMPT, tokenizer) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == 128 and len(tokens["token_strs"]) == tokens["count"]
    text = _post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.strip().endswith(PROMPT)
    chat = _post(server, "/tokenize", {"messages": CHAT}).json()
    assert chat["count"] > tokens["count"]
    _rejected(_post(server, "/tokenize", {"prompt": "a", "messages": CHAT}), "exactly one")
    _rejected(_post(server, "/detokenize", {"tokens": [10**9]}), "vocabulary")


def test_openapi_declares_every_request_body(server):
    document = httpx.get(f"{server}/openapi.json", timeout=30).json()
    components = document["components"]["schemas"]
    for path, item in document["paths"].items():
        if "post" in item:
            body = item["post"]["requestBody"]["content"]["application/json"]["schema"]
            assert body["$ref"].split("/")[-1] in components, path
    fields = components["CompletionRequest"]["properties"]
    assert {"n", "best_of", "logprobs", "echo", "logit_bias", "min_tokens", "repetition_penalty"} <= set(
        fields
    )
    temperature = next(t for t in fields["temperature"]["anyOf"] if t.get("type") == "number")
    assert temperature["maximum"] == 2.0 and temperature["minimum"] == 0.0
    assert "max_completion_tokens" in components["ChatCompletionRequest"]["properties"]


def test_metrics_pass_through_ray(server, client):
    client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=2)
    response = httpx.get(f"{server}/metrics", timeout=60)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "ray_" in response.text


# ---- what is refused, and how ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/v1/completions", {"prompt": "a", "suffix": "b"}, ["suffix", "not supported"]),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "tools": [{"type": "function"}]},
            ["tools", "not supported"],
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "json_object"}},
            ["response_format", "not supported"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            ["messages.0.content.0", "not supported"],
        ),
        ("/v1/completions", {"prompt": "a", "n": 5}, ["serving.max_n"]),
        ("/v1/completions", {"prompt": "a", "best_of": 2, "n": 3}, ["best_of"]),
        ("/v1/completions", {"prompt": "a", "best_of": 3, "n": 1, "stream": True}, ["best_of", "stream"]),
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, ["serving.max_logprobs"]),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, ["top_logprobs", "logprobs"]),
        ("/v1/completions", {"prompt": "a", "stop": ["x"] * 10_000}, ["serving.max_stop"]),
        (
            "/v1/completions",
            {"prompt": "a", "logit_bias": {str(i): 1 for i in range(65)}},
            ["serving.max_logit_bias"],
        ),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, ["logit_bias"]),
        ("/v1/completions", {"prompt": "a", "n": 10_000}, ["serving.max_n"]),
        ("/v1/completions", {"prompt": "a", "seed": 18446744073709551616}, ["seed"]),
        ("/v1/completions", {"prompt": "a", "temperature": "hot"}, ["temperature"]),
        ("/v1/completions", {"prompt": {"nested": [[{"x": None}]]}}, ["prompt"]),
        (
            "/v1/completions",
            {"prompt": "a", "max_completion_tokens": 3},
            ["max_completion_tokens", "unknown"],
        ),
        ("/v1/completions", {"prompt": ["a"] * 100}, ["serving.max_prompts"]),
        ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}}, ["stream"]),
    ],
)
def test_refusals_name_the_field(server, path, body, words):
    _rejected(_post(server, path, body), *words)


def test_malformed_bytes_get_400(server):
    _rejected(_post(server, "/v1/completions", b'{"prompt": "a", "temperature": NaN}'), "JSON")
    _rejected(_post(server, "/v1/completions", b'{"prompt": "\xff\xfe"}'), "JSON")
    _rejected(_post(server, "/v1/completions", b"[" * 100_000), "JSON")
    _rejected(_post(server, "/v1/completions", b'{"prompt": "a", "top_p": 1e999}'), "top_p")


def test_an_unsamplable_request_fails_nothing_batched_with_it(server, client):
    """The fuzzing finds of the issue: top_p=1e-300 and a seed past 2^63 beside greedy requests and a
    seed-API stream; every one answers 200 with its whole text, the greedy ones their solo outputs."""
    prompts = [PROMPT, "Once upon a time", "a b c"]
    alone = [
        client.completions.create(model="tiny-llama", prompt=p, max_tokens=8, temperature=0).choices[0].text
        for p in prompts
    ]

    def greedy(p):
        return _post(server, "/v1/completions", {"prompt": p, "max_tokens": 8, "temperature": 0})

    def hostile(_):
        return _post(
            server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 1, "top_p": 1e-300}
        )

    def seeded(_):
        return _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "seed": 2**64 - 1})

    def seed_stream(_):
        body = {"prompt": PROMPT, "max_tokens": 8}
        with httpx.stream("POST", f"{server}/api/v1/model/generate", json=body, timeout=120) as response:
            return response.status_code, "".join(response.iter_text())

    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(greedy, p) for p in prompts] + [pool.submit(f, None) for f in (hostile, seeded)]
        stream = pool.submit(seed_stream, None)
        responses = [j.result() for j in jobs]
        status, text = stream.result()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses[:3]] == alone
    assert status == 200 and "[llmopt error]" not in text
    stats = httpx.get(f"{server}/api/v1/stats", timeout=30).json()
    assert stats["engine"]["running"] == 0
