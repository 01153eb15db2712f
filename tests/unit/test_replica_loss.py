"""The ingress's replica streams (``serve_apps._ingress._ReplicaStream``) outlive a lost replica.

No Ray cluster: a fake deployment handle runs the real engine on the tiny preset and fails a call with
``ActorDiedError`` after a given number of records, as a SIGKILLed replica's in-flight calls fail. Lost before
its first record, a request is sent again as it was; lost mid-stream, a greedy one continues on another
"replica" from its prompt plus the tokens so far, and the client sees the same tokens and text as without
the loss; what cannot continue (stop strings) or a second loss raises ``ReplicaLost`` (HTTP 503).

    .venv/bin/python -m pytest tests/unit/test_replica_loss.py
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from ray.exceptions import ActorDiedError

from llmopt.models import load_model, load_tokenizer
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, TokenChunk
from serve_apps._errors import ReplicaLost
from serve_apps._ingress import REPLICA_LOSSES_ABSORBED, _ReplicaStream

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama").eval()


class _Call:
    """One call's records (``handle.generate.remote``'s response): it fails after ``die_after`` records."""

    def __init__(self, chunks: list[TokenChunk], die_after: int | None):
        self.chunks, self.die_after, self.sent, self.cancelled = iter(chunks), die_after, 0, False

    async def __anext__(self) -> TokenChunk:
        if self.sent == self.die_after:
            raise ActorDiedError()
        self.sent += 1
        try:
            return next(self.chunks)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """``llm.options(...).generate.remote(request)``: the i-th call runs the engine and dies after
    ``die_after[i]`` records (None: it finishes)."""

    def __init__(self, model, tok, die_after: list[int | None]):
        self.model, self.tok, self.die_after = model, tok, die_after
        self.requests: list[GenerationRequest] = []
        self.generate = self  # handle.generate.remote(...)

    def options(self, **_):
        return self

    def remote(self, request: GenerationRequest) -> _Call:
        self.requests.append(request)
        i = len(self.requests) - 1
        with torch.no_grad():
            outs = GenerationEngine(self.model, self.tok).generate([request])[request.request_id]
        chunks = [
            TokenChunk([o.token_id], o.text, o.finished, o.finish_reason, o.cached_tokens) for o in outs
        ]
        return _Call(chunks, self.die_after[i] if i < len(self.die_after) else None)


def _read(stream: _ReplicaStream) -> list[TokenChunk]:
    async def run():
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.finished:
                break
        return chunks

    return asyncio.run(run())


def _request(tok, **params) -> GenerationRequest:
    from llmopt.data import encode_prompt

    params = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True, **params}
    return GenerationRequest("r1", encode_prompt(PROMPT, tok), SamplingParams(**params))


def _stream(model, tok, die_after, request) -> tuple[_ReplicaStream, _Handle]:
    handle = _Handle(model, tok, die_after)
    return _ReplicaStream(handle, tok, request, "", REPLICA_LOSSES_ABSORBED), handle


def _whole(chunks: list[TokenChunk]) -> tuple[list[int], str]:
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def test_lost_before_the_first_record_is_sent_again(model, tok):
    want = _whole(_read(_stream(model, tok, [None], _request(tok))[0]))
    stream, handle = _stream(model, tok, [0], _request(tok))
    assert _whole(_read(stream)) == want
    first, again = handle.requests
    assert again.prompt_ids == first.prompt_ids and again.request_id != first.request_id


@pytest.mark.parametrize("after", [1, 3, 7])
def test_lost_mid_stream_continues_with_the_same_tokens_and_text(model, tok, after):
    want_ids, want_text = _whole(_read(_stream(model, tok, [None], _request(tok))[0]))
    stream, handle = _stream(model, tok, [after], _request(tok))
    chunks = _read(stream)
    assert _whole(chunks) == (want_ids, want_text)
    assert chunks[-1].finished and chunks[-1].finish_reason == "length"
    first, rest = handle.requests
    # The rest went out as the prompt plus the tokens received so far, for the remaining tokens.
    assert rest.prompt_ids == first.prompt_ids + want_ids[:after]
    assert rest.params.max_tokens == 12 - after
    assert all(c.cached_tokens == chunks[0].cached_tokens for c in chunks)


def test_stop_strings_cannot_continue_mid_stream(model, tok):
    stream, _ = _stream(model, tok, [3], _request(tok, stop=["no such text"]))
    with pytest.raises(ReplicaLost) as lost:
        _read(stream)
    # A whole response has sent nothing yet: the ingress runs it again from the start.
    assert lost.value.retryable and lost.value.status == 503


def test_a_second_loss_is_a_503_with_retry_after(model, tok):
    stream, handle = _stream(model, tok, [2, 1], _request(tok))
    with pytest.raises(ReplicaLost) as lost:
        _read(stream)
    assert not lost.value.retryable and len(handle.requests) == 2
    assert lost.value.status == 503 and lost.value.headers == {"Retry-After": "1"}
    assert lost.value.code == "replica_unavailable"


class _Scripted(_Handle):
    """Calls that return the given records (and die after ``die_after[i]`` of them)."""

    def __init__(self, calls: list[list[TokenChunk]], die_after: list[int | None]):
        self.calls, self.die_after, self.requests = calls, die_after, []
        self.generate = self

    def remote(self, request: GenerationRequest) -> _Call:
        self.requests.append(request)
        i = len(self.requests) - 1
        return _Call(self.calls[i], self.die_after[i])


def test_text_joins_up_across_the_loss(tok):
    """A character split across two tokens, lost between them: the replica that continues decodes only its
    own tokens (a lone continuation byte, shown as U+FFFD), so the text is decoded from all of them here."""
    ids = tok.encode(" naïve", add_special_tokens=False)  # " n", "a", then "ï" as two byte tokens, "v", "e"
    assert len(ids) == 6 and tok.decode(ids[2:4]) == "ï"
    first = [TokenChunk([ids[0]], " n", False, None, 0), TokenChunk([ids[1]], "a", False, None, 0),
             TokenChunk([ids[2]], "", False, None, 0)]  # fmt: skip
    rest = [TokenChunk([ids[3]], "\ufffd", False, None, 0), TokenChunk([ids[4]], "v", False, None, 0),
            TokenChunk([ids[5]], "e", True, "length", 0)]  # fmt: skip
    handle = _Scripted([first, rest], [3, None])
    request = GenerationRequest("r1", [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0))
    chunks = _read(_ReplicaStream(handle, tok, request, "", REPLICA_LOSSES_ABSORBED))
    assert _whole(chunks) == (ids, " naïve")
    assert handle.requests[1].prompt_ids == [1, 2, 3, *ids[:3]]
