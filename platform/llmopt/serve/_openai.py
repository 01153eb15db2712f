"""OpenAI's API over the engine: what a body asks for (choices, sampling, logprobs) and how results look.

Torch-free and Ray-free, so every rule is unit-testable; the ingress (``serve_apps/_ingress.py``) calls these
and talks to the replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmopt.serve._engine import SamplingParams
from llmopt.serve._protocol import ChatCompletionRequest, CompletionRequest

__all__ = [
    "InvalidRequest",
    "Limits",
    "LogprobFormatter",
    "check_request",
    "sampling_params",
]

# JSON has no infinity: a log-probability of -inf (a token the model rules out) is reported as this, as
# vLLM does.
LOGPROB_FLOOR = -9999.0


class InvalidRequest(ValueError):
    """A body that is valid JSON of the right shape but asks for what this server cannot or will not do."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Limits:
    """Per-request limits (``serving.max_*``) and the model's vocabulary."""

    max_n: int = 16
    max_logprobs: int = 20
    max_prompts: int = 64
    max_stop: int = 16
    max_logit_bias: int = 1024
    vocab_size: int | None = None

    @classmethod
    def from_serving(cls, serving, vocab_size: int | None) -> Limits:
        return cls(
            max_n=serving.max_n,
            max_logprobs=serving.max_logprobs,
            max_prompts=serving.max_prompts,
            max_stop=serving.max_stop,
            max_logit_bias=serving.max_logit_bias,
            vocab_size=vocab_size,
        )


def _not_supported(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {what} is not supported by this server.", param, "unsupported_parameter")


def check_request(body: CompletionRequest | ChatCompletionRequest, limits: Limits) -> None:
    """Refuse what cannot be honoured (naming the field) and what passes a limit (naming the limit).

    Raises:
        InvalidRequest: The first problem found.
    """
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        _check_chat(body)
    else:
        if body.suffix:
            raise _not_supported("suffix", "inserting text before a suffix")
    n = body.n or 1
    best_of = None if chat else body.best_of
    if n > limits.max_n:
        raise InvalidRequest(f"n={n} is above this server's limit serving.max_n={limits.max_n}.", "n")
    if best_of is not None:
        if best_of < n:
            raise InvalidRequest(f"best_of={best_of} must be at least n={n}.", "best_of")
        if best_of > limits.max_n:
            raise InvalidRequest(
                f"best_of={best_of} is above this server's limit serving.max_n={limits.max_n}.", "best_of"
            )
        if body.stream and best_of > n:
            raise InvalidRequest("best_of above n cannot be streamed; drop stream or best_of.", "best_of")
    asked = body.top_logprobs if chat else body.logprobs
    param = "top_logprobs" if chat else "logprobs"
    if asked is not None and asked > limits.max_logprobs:
        raise InvalidRequest(
            f"{param}={asked} is above this server's limit serving.max_logprobs={limits.max_logprobs}.", param
        )
    if chat and body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true.", "top_logprobs")
    stops = _stops(body.stop)
    if len(stops) + len(body.stop_token_ids or []) > limits.max_stop:
        raise InvalidRequest(
            f"{len(stops)} stop strings and {len(body.stop_token_ids or [])} stop_token_ids are above this "
            f"server's limit serving.max_stop={limits.max_stop}.",
            "stop",
        )
    if body.logit_bias and len(body.logit_bias) > limits.max_logit_bias:
        raise InvalidRequest(
            f"logit_bias has {len(body.logit_bias)} entries; this server's limit is "
            f"serving.max_logit_bias={limits.max_logit_bias}.",
            "logit_bias",
        )
    vocab = limits.vocab_size
    if vocab is not None:
        for name, ids in (
            ("logit_bias", body.logit_bias or {}),
            ("stop_token_ids", body.stop_token_ids or []),
        ):
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise InvalidRequest(
                    f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab}).",
                    name,
                    "invalid_token",
                )
    if body.stream_options is not None and not body.stream:
        raise InvalidRequest("stream_options needs stream set to true.", "stream_options")


def _check_chat(body: ChatCompletionRequest) -> None:
    fmt = body.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise _not_supported("response_format", f"response_format type {fmt.get('type')!r} (JSON mode)")
    if body.tools:
        raise _not_supported("tools", "tool calling")
    if body.functions:
        raise _not_supported("functions", "function calling")
    for param, value in (("tool_choice", body.tool_choice), ("function_call", body.function_call)):
        if value is not None and value not in ("none", "auto"):
            raise _not_supported(param, f"{param}={value!r} (there are no tools)")
    if body.store:
        raise _not_supported("store", "storing completions")
    if body.modalities is not None and any(m != "text" for m in body.modalities):
        raise _not_supported("modalities", "output other than text")
    for param in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
        if getattr(body, param) is not None:
            raise _not_supported(param, param)
    for index, message in enumerate(body.messages):
        where = f"messages.{index}"
        if message.tool_calls or message.function_call is not None:
            raise _not_supported(f"{where}.tool_calls", "a tool call in the history")
        if message.role in ("tool", "function"):
            raise _not_supported(f"{where}.role", f"role {message.role!r} (tool calling)")
        if message.audio is not None:
            raise _not_supported(f"{where}.audio", "audio")
        if isinstance(message.content, list):
            for k, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise _not_supported(f"{where}.content.{k}", f"content of type {part.type!r}")


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def sampling_params(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    """The engine's parameters of one prompt of ``body`` and its choices (``n``, or ``best_of`` where it is
    larger; the replica expands them, choice i seeded ``seed + i``).

    Args:
        body: A checked body (see :func:`check_request`).
        max_tokens: Tokens each choice may generate (already fitted to the context).
    """
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        logprobs = body.logprobs
        if body.best_of is not None and body.best_of > (body.n or 1) and logprobs is None:
            logprobs = 0  # ranking the choices needs each token's log-probability
    top_k = body.top_k or 0
    n = body.n or 1
    if not chat and body.best_of is not None:
        n = max(n, body.best_of)
    return SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(top_k, 0),
        seed=body.seed,
        stop=_stops(body.stop),
        ignore_eos=bool(body.ignore_eos),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=dict(body.logit_bias or {}),
        min_tokens=min(body.min_tokens or 0, max_tokens),
        stop_token_ids=list(body.stop_token_ids or []),
        logprobs=logprobs,
        skip_special_tokens=True if body.skip_special_tokens is None else body.skip_special_tokens,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
    )


def finite(logprob: float) -> float:
    """A log-probability JSON can carry."""
    return LOGPROB_FLOOR if math.isnan(logprob) or logprob < LOGPROB_FLOOR else logprob


class LogprobFormatter:
    """OpenAI's ``logprobs`` objects from (token id, log-probability, alternatives) records.

    Args:
        token_text: Maps a token id to its text (the tokenizer's decode of that one token).
    """

    def __init__(self, token_text):
        self.token_text = token_text

    def completion(
        self, records: list[tuple[int, float | None, list[tuple[int, float]]]], offset: int
    ) -> tuple[dict[str, Any], int]:
        """The completions shape ``{tokens, token_logprobs, top_logprobs, text_offset}`` and the offset after
        the records' text (``offset`` is where their text starts in the choice's text)."""
        tokens, values, tops, offsets = [], [], [], []
        for token, logprob, alternatives in records:
            text = self.token_text(token)
            tokens.append(text)
            values.append(None if logprob is None else finite(logprob))
            tops.append(None if logprob is None else {self.token_text(t): finite(v) for t, v in alternatives})
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }, offset

    def chat(self, records: list[tuple[int, float, list[tuple[int, float]]]]) -> dict[str, Any]:
        """The chat shape ``{content: [{token, logprob, bytes, top_logprobs}], refusal}``."""
        content = []
        for token, logprob, alternatives in records:
            entry = self._entry(token, logprob)
            entry["top_logprobs"] = [self._entry(t, v) for t, v in alternatives]
            content.append(entry)
        return {"content": content, "refusal": None}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}
