"""The serving app's wire protocol: HTTP request bodies, OpenAI-style error bodies, stream pacing.

Plain pydantic (no Ray, no torch), so the Serve application in ``serve_apps/`` stays thin and these rules are
unit-testable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchGenerateRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "DetokenizeRequest",
    "GenerateRequest",
    "ServingSetupError",
    "SessionKey",
    "TokenChunk",
    "TokenizeRequest",
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
        logprobs: With ``logprobs`` asked: per token, its log-probability and the most likely alternatives
            as (token id, log-probability) pairs.
        prompt_logprobs: With ``prompt_logprobs`` asked, on the first chunk: per prompt token, None for the
            first, else (log-probability, alternatives).
        error: Why the request failed (``finish_reason="error"``); tracebacks stay in the replica's log.
        index: The choice these tokens belong to (0 to n - 1; ``finished`` is that choice's end).
    """

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    cached_tokens: int
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt_logprobs: list | None = None
    error: str | None = None
    index: int = 0


# Session ids travel in HTTP headers (X-Session-ID), which carry visible ASCII only.
SESSION_ID_PATTERN = r"^[!-~]{1,128}$"


class ServingSetupError(ValueError):
    """The serving section points at something unusable (adapter path, API-key source)."""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(False, description="Send a last chunk with the usage and no choices.")
    continuous_usage_stats: bool | None = Field(
        False, description="vLLM's: every chunk carries the usage so far."
    )


class _GenerationFields(BaseModel):
    """Fields of the seed API's bodies: model, sampling, stop, streaming and session."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="`base`, `base:adapter` or an adapter name; default base.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Seed of this request's sampler.")
    stop: str | list[str] | None = Field(None, description="Strings that end the completion.")
    stream: bool = Field(False, description="Stream the completion as it is generated.")
    ignore_eos: bool = Field(False, description="Generate past end-of-sequence until max_tokens.")
    session_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=SESSION_ID_PATTERN,
        description="Reuse this session's KV cache for the shared prefix of the prompt (visible ASCII: it is "
        "echoed in the X-Session-ID header).",
    )


Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


class _OpenAIFields(BaseModel):
    """Fields OpenAI's completions and chat completions share, and vLLM's sampling extensions.

    Every field may be null (the default then applies), as OpenAI's API accepts. Ranges are OpenAI's
    (vLLM's for its extensions); per-server limits (``serving.max_n``, ...) are checked on top.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="`base`, `base:adapter` or an adapter name; default base.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate per choice.")
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="Sampling temperature (default 1); 0 is greedy.",
    )
    top_p: float | None = Field(
        None, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass (default 1)."
    )
    n: int | None = Field(None, ge=1, description="Choices to generate per prompt (default 1).")
    stream: bool | None = Field(None, description="Stream server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (with `stream`).")
    stop: str | list[str] | None = Field(
        None, description="Up to `serving.max_stop` strings that end a choice."
    )
    presence_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, allow_inf_nan=False, description="Penalty on tokens already generated."
    )
    frequency_penalty: float | None = Field(
        None, ge=-2.0, le=2.0, allow_inf_nan=False, description="Penalty per time a token was generated."
    )
    logit_bias: dict[int, Bias] | None = Field(
        None, description="Token id -> bias in [-100, 100] added to its logit."
    )
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**64, description="Seed of the sampler (choice i uses seed + i)."
    )
    user: str | None = Field(None, max_length=512, description="End-user id; logged, not used otherwise.")
    # vLLM's sampling extensions (what vLLM-based tooling sends)
    top_k: int | None = Field(None, ge=-1, description="Keep the k most likely tokens; 0 or -1 keep all.")
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="Drop tokens below min_p x the top one's odds."
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=10.0,
        allow_inf_nan=False,
        description="Penalty on prompt and output tokens; 1 is off.",
    )
    min_tokens: int | None = Field(None, ge=0, description="No stop before this many tokens.")
    ignore_eos: bool | None = Field(None, description="Generate past end-of-sequence until max_tokens.")
    stop_token_ids: list[int] | None = Field(None, description="Token ids that end a choice.")
    skip_special_tokens: bool | None = Field(None, description="Leave special tokens out of the text.")
    include_stop_str_in_output: bool | None = Field(
        None, description="Keep the stop string that ended a choice in its text."
    )
    session_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=SESSION_ID_PATTERN,
        description="llmopt's: reuse this session's KV cache for the prompt's shared prefix (visible ASCII).",
    )


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_OpenAIFields):
    """Body of ``POST /v1/completions``: OpenAI's fields and vLLM's extensions."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="A string, a list of strings, token ids, or a list of token-id lists (choices each)."
    )
    best_of: int | None = Field(
        None, ge=1, description="Generate this many choices per prompt, return the `n` most likely."
    )
    echo: bool | None = Field(None, description="Put the prompt before the completion (and its logprobs).")
    logprobs: int | None = Field(
        None, ge=0, description="Log-probabilities of the tokens and this many alternatives."
    )
    suffix: str | None = Field(None, description="Not supported (insertion): must be null or empty.")
    add_special_tokens: bool | None = Field(None, description="vLLM's: add BOS to text prompts (default on).")


class ContentPart(BaseModel):
    """One part of a message's content (only `text` parts are supported)."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="`text` (images, audio and files are not supported).")
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: str | None = None


class ChatMessage(BaseModel):
    """One chat turn (OpenAI's message shape)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None

    def text(self) -> str:
        """The message's text (text parts joined); other parts are refused before this is called."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_OpenAIFields):
    """Body of ``POST /v1/chat/completions``: OpenAI's fields and vLLM's extensions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate per choice (OpenAI's newer name of max_tokens)."
    )
    logprobs: bool | None = Field(None, description="Return the log-probability of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Alternatives per token (with logprobs).")
    response_format: dict[str, Any] | None = Field(None, description='Only `{"type": "text"}` is supported.')
    tools: list[Any] | None = Field(None, description="Not supported: must be null or empty.")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="Only `none` (or `auto` with no tools)."
    )
    parallel_tool_calls: bool | None = Field(None, description="Accepted; there are no tool calls.")
    functions: list[Any] | None = Field(None, description="Deprecated tools: must be null or empty.")
    function_call: str | dict[str, Any] | None = Field(None, description="Only `none` or `auto`.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and logged.")
    store: bool | None = Field(None, description="Not supported: completions are not stored.")
    service_tier: str | None = Field(None, description="Accepted; every request has the same tier.")
    modalities: list[str] | None = Field(None, description='Only ["text"].')
    audio: dict[str, Any] | None = Field(None, description="Not supported: must be null.")
    prediction: dict[str, Any] | None = Field(None, description="Not supported: must be null.")
    reasoning_effort: str | None = Field(None, description="Not supported (not a reasoning model).")
    verbosity: str | None = Field(None, description="Not supported: must be null.")
    web_search_options: dict[str, Any] | None = Field(None, description="Not supported: must be null.")
    prompt_cache_key: str | None = Field(None, description="Accepted; sessions use `session_id`.")
    safety_identifier: str | None = Field(None, max_length=512, description="Accepted and logged.")
    add_generation_prompt: bool | None = Field(
        None, description="vLLM's: end the template with the assistant's turn opening (default on)."
    )
    add_special_tokens: bool | None = Field(
        None, description="vLLM's: add BOS on top of the chat template (default off)."
    )


class TokenizeRequest(BaseModel):
    """Body of ``POST /tokenize`` (vLLM's): a prompt or chat messages."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = Field(None, description="Text to tokenize.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat to template and tokenize."
    )
    add_special_tokens: bool | None = Field(None, description="Add BOS (default: on for a prompt).")
    add_generation_prompt: bool | None = Field(None, description="With messages (default on).")
    return_token_strs: bool | None = Field(None, description="Also return each token's string.")


class DetokenizeRequest(BaseModel):
    """Body of ``POST /detokenize`` (vLLM's)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: TokenIds = Field(description="Token ids to decode.")


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
