"""The serving app's wire protocol: HTTP request bodies, OpenAI-style error bodies, stream pacing.

Plain pydantic (no Ray, no torch), so the Serve application in ``serve_apps/`` stays thin and these rules are
unit-testable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchGenerateRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerateRequest",
    "ServingSetupError",
    "SessionKey",
    "TokenChunk",
    "error_body",
    "stream_interval",
]


@dataclass(frozen=True)
class SessionKey:
    """A session whose KV cache a request reads and extends: its owner (a digest of the caller's API key,
    see `owner_of`) and the caller's session id. No caller reaches another owner's caches."""

    owner: str
    id: str


@dataclass
class TokenChunk:
    """What a model replica streams back to the ingress: the tokens generated since its previous chunk.

    Attributes:
        token_ids: The new tokens.
        text: Their text (a delta; stop strings and held-back partial characters excluded).
        finished: Whether the request is done.
        finish_reason: "stop", "length" or "eos" when finished, else None.
        cached_tokens: Prompt tokens that came from the session's cache instead of a prefill.
    """

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    cached_tokens: int


class ServingSetupError(ValueError):
    """The serving section points at something unusable (adapter path, API-key source)."""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="Send a last chunk with the usage and no choices.")


class _GenerationFields(BaseModel):
    """Fields every generation body shares: model, sampling, stop, streaming and session."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="`base`, `base:adapter` or an adapter name; default base.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(None, description="Seed of this request's sampler.")
    stop: str | list[str] | None = Field(None, description="Strings that end the completion.")
    stream: bool = Field(False, description="Stream the completion as it is generated.")
    stream_options: StreamOptions | None = Field(None, description="OpenAI streaming options.")
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence until max_tokens.")
    session_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Reuse this session's KV cache for the shared prefix of the prompt.",
    )


class CompletionRequest(_GenerationFields):
    """Body of ``POST /v1/completions`` (the subset of OpenAI's fields this server honours)."""

    prompt: str


class ChatMessage(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_GenerationFields):
    """Body of ``POST /v1/chat/completions`` (the subset of OpenAI's fields this server honours)."""

    messages: list[ChatMessage] = Field(min_length=1)


class GenerateRequest(_GenerationFields):
    """Body of the seed API's ``POST /api/v1/model/generate``; the session comes from ``X-Session-ID``.

    The prompt is the whole conversation so far; with a session, the server prefills only what its cached
    prefix does not cover. Streams chunked text by default.
    """

    prompt: str
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default here) is greedy.")
    stream: bool = Field(True, description="Stream chunked text (false: one JSON body).")


class BatchGenerateRequest(BaseModel):
    """Body of ``POST /api/v1/model/batch-generate``: several prompts, one set of parameters."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=256)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = {
        401: "authentication_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_overloaded",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def stream_interval(min_interval_s: float, events_per_s: float, streams: int) -> float:
    """Seconds between two chunks of one stream when ``streams`` streams share a replica.

    At least ``min_interval_s`` (``serving.stream_interval_s``; 0 sends every token on its own), and long
    enough that all streams together send at most ``events_per_s`` chunks per second.
    """
    if min_interval_s <= 0:
        return 0.0
    return max(min_interval_s, streams / events_per_s)
