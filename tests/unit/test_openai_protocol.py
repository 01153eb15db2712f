"""OpenAI's rules without a server: every field OpenAI and vLLM define is accepted, what cannot be honoured
is refused by name, limits hold, parameters map to the engine's, and response shapes (logprobs, merged
streams, a failing choice's error event) are OpenAI's."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from llmopt.serve import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidRequest,
    Limits,
    LogprobFormatter,
    TokenChunk,
    check_request,
    sampling_params,
)

MESSAGES = [{"role": "user", "content": "hi"}]
LIMITS = Limits(max_n=4, max_logprobs=5, max_prompts=8, max_stop=3, max_logit_bias=2, vocab_size=100)

# What the issue lists as turned away before: each must now validate (null included).
COMPLETION_FIELDS = {
    "n": 2,
    "best_of": 3,
    "logprobs": None,
    "echo": True,
    "suffix": None,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"5": 10},
    "user": "u",
    "repetition_penalty": 1.2,
    "min_tokens": 1,
    "min_p": 0.1,
    "add_special_tokens": False,
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "top_k": -1,
    "stop_token_ids": [3],
    "stream_options": None,
    "seed": 2**64 - 1,
}
CHAT_FIELDS = {
    "n": 2,
    "user": "u",
    "logprobs": True,
    "top_logprobs": 2,
    "max_completion_tokens": 5,
    "response_format": {"type": "text"},
    "tools": None,
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "metadata": {"a": "b"},
    "service_tier": "auto",
    "store": False,
    "modalities": ["text"],
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "repetition_penalty": 1.1,
    "min_tokens": 1,
    "min_p": 0.0,
    "add_special_tokens": False,
    "skip_special_tokens": True,
    "include_stop_str_in_output": False,
    "add_generation_prompt": True,
}


def test_every_listed_field_validates_and_passes_the_checks():
    body = CompletionRequest(prompt=[[1, 2], [3]], **COMPLETION_FIELDS)
    check_request(body, LIMITS)
    chat = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "ann"},
            {"role": "assistant", "content": None},
        ],
        **CHAT_FIELDS,
    )
    check_request(chat, LIMITS)
    assert chat.messages[1].text() == "hi" and chat.messages[2].text() == ""
    for prompt in ("a", ["a", "b"], [1, 2, 3], [[1], [2, 3]]):
        CompletionRequest(prompt=prompt)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (CompletionRequest(prompt="a", suffix="z"), "suffix", "not supported"),
        (CompletionRequest(prompt="a", n=5), "n", "serving.max_n=4"),
        (CompletionRequest(prompt="a", n=2, best_of=1), "best_of", "at least n"),
        (CompletionRequest(prompt="a", best_of=5), "best_of", "serving.max_n=4"),
        (CompletionRequest(prompt="a", best_of=2, stream=True), "best_of", "cannot be streamed"),
        (CompletionRequest(prompt="a", logprobs=6), "logprobs", "serving.max_logprobs=5"),
        (CompletionRequest(prompt="a", stop=["a", "b", "c", "d"]), "stop", "serving.max_stop=3"),
        (CompletionRequest(prompt="a", stop=["a"], stop_token_ids=[1, 2, 3]), "stop", "serving.max_stop=3"),
        (
            CompletionRequest(prompt="a", logit_bias={1: 1, 2: 1, 3: 1}),
            "logit_bias",
            "serving.max_logit_bias",
        ),
        (CompletionRequest(prompt="a", logit_bias={100: 1}), "logit_bias", "vocabulary"),
        (CompletionRequest(prompt="a", stop_token_ids=[100]), "stop_token_ids", "vocabulary"),
        (CompletionRequest(prompt="a", stream_options={"include_usage": True}), "stream_options", "stream"),
        (ChatCompletionRequest(messages=MESSAGES, tools=[{"type": "function"}]), "tools", "not supported"),
        (ChatCompletionRequest(messages=MESSAGES, tool_choice="required"), "tool_choice", "not supported"),
        (ChatCompletionRequest(messages=MESSAGES, functions=[{}]), "functions", "not supported"),
        (
            ChatCompletionRequest(messages=MESSAGES, response_format={"type": "json_schema"}),
            "response_format",
            "not supported",
        ),
        (ChatCompletionRequest(messages=MESSAGES, store=True), "store", "not supported"),
        (ChatCompletionRequest(messages=MESSAGES, modalities=["audio"]), "modalities", "not supported"),
        (
            ChatCompletionRequest(messages=MESSAGES, reasoning_effort="low"),
            "reasoning_effort",
            "not supported",
        ),
        (ChatCompletionRequest(messages=MESSAGES, top_logprobs=2), "top_logprobs", "logprobs"),
        (
            ChatCompletionRequest(messages=MESSAGES, logprobs=True, top_logprobs=20),
            "top_logprobs",
            "max_logprobs",
        ),
        (
            ChatCompletionRequest(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
            "messages.0.role",
            "not supported",
        ),
        (
            ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
            "messages.0.content.0",
            "not supported",
        ),
    ],
)
def test_refusals_name_the_field_or_the_limit(body, param, words):
    with pytest.raises(InvalidRequest) as refused:
        check_request(body, LIMITS)
    assert refused.value.param == param and words in refused.value.message
    assert refused.value.message.startswith(param.split(".")[0]) or "serving." in refused.value.message


def test_sampling_params_follow_openai_defaults_and_vllm_names():
    plain = sampling_params(CompletionRequest(prompt="a"), 7)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.logprobs, plain.max_tokens) == (
        1.0,
        1.0,
        0,
        None,
        7,
    )
    assert plain.repetition_penalty == 1.0 and plain.skip_special_tokens and not plain.shapes_logits()
    body = CompletionRequest(prompt="a", **COMPLETION_FIELDS)
    params = sampling_params(body, 4)
    assert params.n == 3  # best_of choices are generated, the n best kept
    assert params.seed == 2**64 - 1 and params.logit_bias == {5: 10.0} and params.stop_token_ids == [3]
    assert params.logprobs == 0  # best_of > n ranks choices by their log-probabilities
    assert params.presence_penalty == 0.5 and params.frequency_penalty == -0.5 and params.min_p == 0.1
    assert params.top_k == 0 and params.ignore_eos and params.include_stop_str_in_output
    assert not params.skip_special_tokens and params.shapes_logits()
    assert sampling_params(CompletionRequest(prompt="a", min_tokens=50), 4).min_tokens == 4
    chat = sampling_params(ChatCompletionRequest(messages=MESSAGES, logprobs=True, top_logprobs=3, n=2), 4)
    assert chat.logprobs == 3 and chat.n == 2
    assert sampling_params(ChatCompletionRequest(messages=MESSAGES, logprobs=True), 4).logprobs == 0


def test_logprob_shapes():
    fmt = LogprobFormatter(lambda t: {1: "a", 2: "bc", 3: "é"}[t])
    completion, end = fmt.completion([(1, None, []), (2, -0.5, [(2, -0.5), (3, float("-inf"))])], offset=4)
    assert completion == {
        "tokens": ["a", "bc"],
        "token_logprobs": [None, -0.5],
        "top_logprobs": [None, {"bc": -0.5, "é": -9999.0}],
        "text_offset": [4, 5],
    }
    assert end == 7
    chat = fmt.chat([(3, float("nan"), [(1, -1.0)])])
    assert chat == {
        "content": [
            {
                "token": "é",
                "logprob": -9999.0,
                "bytes": [195, 169],
                "top_logprobs": [{"token": "a", "logprob": -1.0, "bytes": [97]}],
            }
        ],
        "refusal": None,
    }
    json.dumps(chat, allow_nan=False)


def _chunks(*items):
    async def gen():
        for item in items:
            yield item

    return gen()


def _reply(**fields):
    from serve_apps._ingress import _Reply

    ingress = SimpleNamespace(model_id="tiny", token_text=lambda t: f"<{t}>")
    body = CompletionRequest(prompt="p", stream=True, **fields)
    return _Reply(ingress, body, chat=False, prompts=[([1, 2], "p")], n=fields.get("n", 1), echo=False)


async def _events(reply, streams):
    return [event async for event in reply.events(streams)]


def test_merged_stream_numbers_choices_and_counts_usage():
    reply = _reply(n=2, stream_options={"include_usage": True})
    streams = [
        (
            0,
            _chunks(
                TokenChunk([5], "x", False, None, 0),
                TokenChunk([7, 8], "zw", True, "eos", 1, index=1),
                TokenChunk([6], "y", True, "length", 0),
            ),
        ),
    ]
    events = asyncio.run(_events(reply, streams))
    assert events[-1] == "data: [DONE]\n\n"
    data = [json.loads(e[6:]) for e in events[:-1]]
    texts = {}
    for event in data[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "xy", 1: "zw"}
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 4
    assert (
        data[-1]["usage"]["prompt_tokens"] == 2
        and data[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 1
    )


def test_a_failed_choice_ends_the_stream_with_an_error_event_not_a_cut():
    reply = _reply(n=2)
    streams = [
        (
            0,
            _chunks(TokenChunk([5], "x", False, None, 0), TokenChunk([], "", True, "error", 0, error="boom")),
        ),
        (1, _chunks(TokenChunk([7], "z", False, None, 0))),
    ]
    events = asyncio.run(_events(reply, streams))
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2][6:])["error"]
    assert error["type"] == "server_error" and "boom" in error["message"] and "error id" in error["message"]
    assert "Traceback" not in "".join(events)
