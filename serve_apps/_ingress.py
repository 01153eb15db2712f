"""The HTTP front door of the LLM application: API keys, body limits and validation, tokenization, the
OpenAI and seed APIs, request metrics; it streams from the ``LLMServer`` replicas through a deployment handle,
sending each a typed ``GenerationRequest`` and reading typed ``TokenChunk`` records back.

The handle's multiplexed model id is the adapter (``model="base:adapter"``) and, for sessions, a digest of the
caller's key and session id, so a session's turns return to the replica holding its cache.
"""

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from llmopt.config import RunConfig
from llmopt.data import encode_prompt
from llmopt.serve import (
    SESSION_ID_PATTERN,
    BatchGenerateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    GenerationRequest,
    InvalidRequest,
    Limits,
    LogprobFormatter,
    ResponseCache,
    Router,
    SamplingParams,
    SessionKey,
    TokenChunk,
    TokenizeRequest,
    cache_key,
    cacheable,
    check_request,
    load_api_keys,
    owner_of,
    replay_events,
    replay_whole,
    sampling_params,
)
from serve_apps._errors import (
    GenerationFailed,
    Reject,
    ReplicaLost,
    error_event,
    install_handlers,
    internal_error,
    is_error_event,
    openai_finish_reason,
    overloaded,
    parse_body,
)
from serve_apps._metrics import IngressMetrics

fastapi_app = FastAPI(title="llmopt LLM server")
install_handlers(fastapi_app)

logger = logging.getLogger("ray.serve")


def _seed_result(result: dict[str, Any]) -> dict[str, Any]:
    """The seed API's result shape: text, finish reason and usage."""
    return {k: result[k] for k in ("text", "finish_reason", "usage")}


def openapi_body(model) -> dict[str, Any]:
    """A route's declared JSON request body: the routes read and check bodies themselves (for the size
    limit and OpenAI-style errors), so FastAPI cannot infer it. The schemas go in the components."""
    _BODIES[model.__name__] = model
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_BODIES: dict[str, Any] = {}


def _openapi() -> dict[str, Any]:
    """FastAPI's document, with the request bodies' JSON schemas (every field, type and range)."""
    if fastapi_app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=fastapi_app.title, version="1", routes=fastapi_app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _BODIES.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[name] = schema
        fastapi_app.openapi_schema = document
    return fastapi_app.openapi_schema


fastapi_app.openapi = _openapi


class _Reply:
    """The OpenAI response of one request: whole, or as server-sent events merged from its choices' streams.

    Choice ``p * n + j`` is the j-th choice of prompt p (OpenAI's numbering); with ``best_of`` the n most
    likely of each prompt's choices are kept.
    """

    def __init__(self, ingress, body, chat: bool, prompts: list[tuple[list[int], str]], n: int, echo: bool):
        self.body, self.chat, self.prompts, self.n, self.echo = body, chat, prompts, n, echo
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = body.model or ingress.model_id
        self.format = LogprobFormatter(ingress.token_text)
        self.logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        self.prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.prompt_logprobs: dict[int, list] = {}  # per prompt, from its choice 0 (echo with logprobs)

    # ---- whole -------------------------------------------------------------------------------------------
    def whole(self, results: list[list[dict[str, Any]]]) -> dict[str, Any]:
        """The response from each prompt's choices (``results[p][i]``)."""
        choices = []
        for p, group in enumerate(results):
            self.prompt_logprobs[p] = group[0]["prompt_logprobs"]
            if len(group) > self.n:  # best_of: the n choices of highest total log-probability
                group = sorted(group, key=lambda r: -sum(lp for lp, _ in r["logprobs"]))[: self.n]
            for j, result in enumerate(group):
                choices.append(self._choice(p * self.n + j, p, result))
        completion = sum(r["usage"]["completion_tokens"] for group in results for r in group)
        cached = sum(r["usage"]["cached_tokens"] for group in results for r in group)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": {**self._usage(completion), "prompt_tokens_details": {"cached_tokens": cached}},
        }

    def _choice(self, index: int, p: int, result: dict[str, Any]) -> dict[str, Any]:
        reason = openai_finish_reason(result["finish_reason"])
        records = [
            (t, lp, alts) for t, (lp, alts) in zip(result["token_ids"], result["logprobs"], strict=False)
        ]
        if self.chat:
            message = {"role": "assistant", "content": result["text"]}
            logprobs = self.format.chat(records) if self.logprobs else None
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        text = result["text"]
        if self.echo:
            text = self.prompts[p][1] + text
            records = self._prompt_records(p) + records
        logprobs = self.format.completion(records, 0)[0] if self.logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def _prompt_records(self, p: int) -> list:
        ids, prompt_logprobs = self.prompts[p][0], self.prompt_logprobs.get(p)
        records = []
        for i, token in enumerate(ids):
            entry = prompt_logprobs[i] if prompt_logprobs and i < len(prompt_logprobs) else None
            records.append((token, None, []) if entry is None else (token, entry[0], entry[1]))
        return records

    def _usage(self, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    # ---- streamed ----------------------------------------------------------------------------------------
    def _event(self, choices: list, **extra) -> str:
        event = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(event)}\n\n"

    async def events(self, streams: list[tuple[int, AsyncIterator[TokenChunk]]]) -> AsyncIterator[str]:
        """Server-sent events of every prompt's choices as their tokens come (choice ``p * n + i``); a failure
        ends the stream with an error event, then ``[DONE]``."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, tokens: AsyncIterator[TokenChunk]) -> None:
            try:
                async for item in tokens:
                    await queue.put((p * self.n + item.index, p, item))
            except Exception as exc:
                await queue.put((p * self.n, p, exc))
            finally:
                await queue.put((p * self.n, p, None))

        tasks = [asyncio.create_task(pump(*stream)) for stream in streams]
        options = self.body.stream_options
        include_usage = options is not None and bool(options.include_usage)
        continuous = options is not None and bool(options.continuous_usage_stats)
        started: set[int] = set()
        offsets: dict[int, int] = {}
        live, completion, cached = len(tasks), 0, 0
        try:
            while live:
                index, p, item = await queue.get()
                if item is None:
                    live -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason == "error":
                    raise GenerationFailed(item.error or "the replica gave no reason")
                completion += len(item.token_ids)
                if index not in started:
                    cached += item.cached_tokens
                choice = self._delta(index, p, item, started, offsets)
                extra = {"usage": self._usage(completion)} if continuous else {}
                yield self._event([choice], **extra)
            if include_usage:
                usage = {**self._usage(completion), "prompt_tokens_details": {"cached_tokens": cached}}
                yield self._event([], usage=usage)
        except Exception as exc:  # headers are sent already: report the failure in-band
            yield error_event(exc)
        finally:
            for task in tasks:
                task.cancel()  # a choice still generating stops (its stream is cancelled)
        yield "data: [DONE]\n\n"

    def _delta(
        self, index: int, p: int, item: TokenChunk, started: set[int], offsets: dict[int, int]
    ) -> dict:
        first = index not in started
        started.add(index)
        reason = openai_finish_reason(item.finish_reason)
        records = [(t, lp, alts) for t, (lp, alts) in zip(item.token_ids, item.logprobs or [], strict=False)]
        if self.chat:
            delta = {"role": "assistant", "content": item.text} if first else {"content": item.text}
            logprobs = self.format.chat(records) if self.logprobs else None
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        text = item.text
        if item.prompt_logprobs is not None:
            self.prompt_logprobs[p] = item.prompt_logprobs  # choice 0's first chunk comes before the others'
        if first and self.echo:
            text = self.prompts[p][1] + text
            records = self._prompt_records(p) + records
        logprobs = None
        if self.logprobs:
            logprobs, offsets[index] = self.format.completion(records, offsets.get(index, 0))
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


# A request survives the loss of one replica (its process died, or Ray cannot reach it): it moves to another.
# One only: a request that itself kills replicas must not take the others down one retry at a time.
REPLICA_LOSSES_ABSORBED = 1


class _ReplicaStream:
    """One request's token records from the ``LLMServer`` replicas, moved to another replica when the one
    generating it is lost (a SIGKILLed or crashed replica fails its in-flight calls with ``ActorDiedError``).

    Before its first record the request is simply sent again. After some, it continues where it stopped when
    that gives the same tokens: one choice, no stop strings (their matching spans the text already sent), no
    presence or frequency penalties (they count the generated tokens only), greedy or unseeded. The prompt
    plus the tokens generated so far goes to another replica for the rest (a full prefill), and the text is
    then decoded here from all the tokens: the new replica decodes only its own, and a token's text depends
    on the ones before it (a word's leading space, a character split across tokens). Otherwise, or past
    ``losses`` lost replicas, it raises :class:`ReplicaLost`.
    """

    def __init__(self, llm: DeploymentHandle, tokenizer, request: GenerationRequest, route: str, losses: int):
        self.llm, self.tokenizer, self.request, self.route = llm, tokenizer, request, route
        self.losses_left = losses
        self.received = 0  # records received
        self.generated: list[int] = []  # choice 0's tokens so far
        self.emitted = ""  # choice 0's text as passed on
        self.cached = 0
        self.resumed = False
        self._stream = self._send(request)

    def _send(self, request: GenerationRequest):
        handle = self.llm.options(stream=True, multiplexed_model_id=self.route)
        return handle.generate.remote(request)  # overload (BackPressureError) shows on the first record

    def __aiter__(self) -> "_ReplicaStream":
        return self

    async def __anext__(self) -> TokenChunk:
        while True:
            try:
                chunk = await self._stream.__anext__()
            except RayActorError as exc:
                self._stream.cancel()  # a replica that Ray merely cannot reach may still be generating it
                self._move(exc)
                continue
            except BackPressureError:
                if not self.received:
                    raise  # answered as a real 503 (nothing was sent yet)
                raise overloaded() from None  # resent mid-stream to replicas that are all full
            return self._record(chunk)

    def cancel(self) -> None:
        self._stream.cancel()

    def _resumable(self) -> bool:
        p = self.request.params
        return (
            p.n == 1
            and not p.stop
            and not (p.presence_penalty or p.frequency_penalty)
            and (p.seed is None or p.temperature == 0)
        )

    def _move(self, exc: RayActorError) -> None:
        """Send the request (or its rest) to another replica, or raise :class:`ReplicaLost`."""
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.losses_left <= 0 or (self.received and not self._resumable()):
            logger.warning(
                "llmopt request %s lost its replica after %d records and cannot continue on another: %s",
                self.rid,
                self.received,
                detail,
            )
            raise ReplicaLost(detail, retryable=self.losses_left > 0) from None
        self.losses_left -= 1
        request = self.request
        if self.received:
            done, p = len(self.generated), request.params
            params = dataclasses.replace(
                p,
                max_tokens=p.max_tokens - done,
                min_tokens=max(0, p.min_tokens - done),
                prompt_logprobs=None,
            )
            request = dataclasses.replace(
                request, prompt_ids=request.prompt_ids + self.generated, params=params
            )
            self.resumed = True
        logger.warning(
            "llmopt request %s lost its replica after %d tokens; continuing on another: %s",
            self.rid,
            len(self.generated),
            detail,
        )
        # A fresh id: a replica that Ray could not reach may still hold the old one.
        self._stream = self._send(dataclasses.replace(request, request_id=uuid.uuid4().hex))

    @property
    def rid(self) -> str:
        return self.request.request_id

    def _record(self, chunk: TokenChunk) -> TokenChunk:
        self.received += 1
        if self.received == 1:
            self.cached = chunk.cached_tokens
        if chunk.index != 0:
            return chunk
        self.generated += chunk.token_ids
        if not self.resumed:
            self.emitted += chunk.text
            return chunk
        p = self.request.params
        ids = self.generated
        if chunk.finish_reason == "eos" or (
            chunk.finish_reason == "stop" and not p.include_stop_str_in_output
        ):
            ids = ids[:-1]  # as the engine does: an end-of-sequence or stop token has no text
        text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
        if not chunk.finished:
            text = text.rstrip("\ufffd")  # a character split across tokens waits for its last token
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted += delta
        return dataclasses.replace(chunk, text=delta, cached_tokens=self.cached)


HIT = {"X-Cache": "hit"}
# In a request's route, `model>>` sends it to that model of `serving.models` instead of the main model.
MODEL_SEPARATOR = ">>"


def _with_header(response, value: str):
    """`response` (a JSON-able dict or a Response) with `X-Cache: value`."""
    if isinstance(response, dict):
        return JSONResponse(response, headers={"X-Cache": value})
    response.headers["X-Cache"] = value
    return response


def _as_response(answer):
    return JSONResponse(answer) if isinstance(answer, dict) else answer


async def _aiter(items) -> AsyncIterator[str]:
    for item in items:
        yield item


# serve.ingress pickles the FastAPI app (and the globals its routes reference) when the class is decorated:
# everything the routes use is defined or imported above.
@serve.deployment
@serve.ingress(fastapi_app)
class LLMIngress:
    """HTTP front door: checks keys, bodies and lengths, tokenizes, and streams from ``LLMServer`` replicas.

    Args:
        llm: Handle of the ``LLMServer`` deployment, or for ``serving.layout=single`` a
            ``serve_apps._local.LocalServer``, which starts the model in this replica's process.
        config: A :class:`RunConfig` as ``model_dump(mode="json")``.
        models: Handles of the `serving.models` deployments, by model name.
    """

    def __init__(
        self,
        llm: DeploymentHandle | Any,
        config: dict[str, Any],
        models: dict[str, DeploymentHandle] | None = None,
    ):
        from llmopt.models import load_tokenizer, model_info

        self.config = RunConfig.model_validate(config)
        serving = self.config.serving
        # serving.layout=single: the model replica object in this process (its batch settings and health).
        self.local = None
        if not isinstance(llm, DeploymentHandle):
            llm = llm.start()
            self.local = llm.server
        self.llm = llm
        self.models = dict(models or {})
        # Its own tokenizer even beside a local model's: a fast tokenizer is a Rust object that raises
        # "Already borrowed" when two threads use it at once (huggingface/tokenizers#537), and the local
        # model's engine thread tokenizes while this event loop does.
        self.tokenizer = load_tokenizer(self.config.model)
        self.model_id = self.config.model.name_or_path
        self.adapters = set(serving.adapters)
        self.max_seq_len = self.config.model.max_seq_len
        self.keys = load_api_keys(serving.api_keys_env, serving.api_keys_file)
        self.metrics = IngressMetrics()
        self.vocab_size = model_info(self.model_id).vocab_size
        self.limits = Limits.from_serving(serving, self.vocab_size)
        self._token_texts: dict[int, str] = {}
        self._metrics_url: str | None = None
        cache = serving.response_cache
        self.cache = ResponseCache.from_config(cache) if cache.enabled else None
        self.router = Router(serving.routes) if serving.routes else None
        self._evaluations: set[asyncio.Task] = set()
        self._evaluations_started = False
        # What the cache keys answers by besides the body: the weights, adapters and output settings.
        served = {
            "model": self.config.model.model_dump(mode="json"),
            "adapters": serving.adapters,
            "models": serving.models,
            "outputs": [serving.precision, serving.quantization, serving.engine, serving.max_new_tokens],
        }
        self.cache_model = hashlib.sha256(json.dumps(served, sort_keys=True).encode()).hexdigest()

    def token_text(self, token: int) -> str:
        """One token's text, as OpenAI's logprobs name tokens (cached: a request's tokens repeat)."""
        text = self._token_texts.get(token)
        if text is None:
            if len(self._token_texts) > 200_000:
                self._token_texts.clear()
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    # ---- request checks ------------------------------------------------------------------------------
    async def _read(self, request: Request) -> tuple[str, bytes]:
        """Authenticate, then read the body within the size limit. Returns (owner, body)."""
        owner = self._owner(request)
        limit = self.config.serving.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Reject(413, f"The body has {declared} bytes; the limit is {limit}.", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise Reject(413, f"The body exceeds the limit of {limit} bytes.", code="body_too_large")
        return owner, body

    def _owner(self, request: Request) -> str:
        if self.keys is None:
            return owner_of(None)
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
        if not key or key not in self.keys:
            raise Reject(
                401,
                "Missing or invalid API key; send `Authorization: Bearer <key>`.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return owner_of(key)

    def _adapter(self, model: str | None) -> str | None:
        """The adapter a `model` field names: None (base), `base:adapter` or a bare adapter name (a split
        route's name, where only the tokenizer matters, is the base)."""
        if model is None or model == self.model_id or model in self.models:
            return None
        if self.router is not None and model in self.router:
            return None
        base, _, adapter = model.rpartition(":")
        if base in ("", self.model_id) and adapter in self.adapters:
            return adapter
        known = [
            self.model_id,
            *(f"{self.model_id}:{a}" for a in sorted(self.adapters)),
            *sorted(self.models),
        ]
        known += sorted(self.router.routes) if self.router is not None else []
        raise Reject(
            404,
            f"The model {model!r} does not exist; this server serves {known}.",
            param="model",
            code="model_not_found",
        )

    def _fit(self, prompt_ids: list[int], asked: int | None, param: str) -> int:
        """Tokens a choice may generate: ``asked`` (default ``serving.max_new_tokens``) within the context.

        Raises:
            Reject: 400 when the prompt fills the context or ``asked`` does not fit beside it.
        """
        if len(prompt_ids) >= self.max_seq_len:
            raise Reject(
                400,
                f"The prompt has {len(prompt_ids)} tokens but the context is {self.max_seq_len}; shorten it.",
                param="prompt",
                code="context_length_exceeded",
            )
        room = self.max_seq_len - len(prompt_ids)
        if asked is not None and asked > room:
            raise Reject(
                400,
                f"{param}={asked} plus the prompt's {len(prompt_ids)} tokens exceeds "
                f"the context of {self.max_seq_len}; ask for at most {room} tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return min(asked or self.config.serving.max_new_tokens, room)

    def _target(self, model: str | None) -> tuple[str | None, str | None]:
        """(one of `serving.models` or None for the main model, adapter) that a `model` field names."""
        if model in self.models:
            return model, None
        return None, self._adapter(model)

    def _handle(self, route: str) -> tuple[DeploymentHandle, str]:
        """The deployment a request's route goes to, and its multiplexed model id."""
        head, separator, rest = route.partition(MODEL_SEPARATOR)
        if separator and head in self.models:
            return self.models[head], rest
        return self.llm, route

    def _generation(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None,
        owner: str,
        session_id: str | None,
        target: str | None = None,
    ) -> tuple[GenerationRequest, str]:
        """The replica's request and its route: the multiplexed model id (adapter, plus session digest),
        after `target>>` for a model of `serving.models`."""
        # A session's cache is per model: keys and values computed with one adapter are not another's.
        slot = f"{session_id}@{adapter}" if session_id and adapter else session_id
        session = SessionKey(owner, slot) if slot else None
        route = adapter or ""
        if session:
            route = f"{adapter or 'base'}|{hashlib.sha256(f'{owner}:{session_id}'.encode()).hexdigest()[:16]}"
        request = GenerationRequest(uuid.uuid4().hex, prompt_ids, params, adapter=adapter, session=session)
        return request, f"{target}{MODEL_SEPARATOR}{route}" if target else route

    def _request(
        self, body, prompt_ids: list[int], owner: str, session_id: str | None
    ) -> tuple[GenerationRequest, str]:
        """The seed API's request (one choice; its fields are a subset of the OpenAI ones)."""
        max_tokens = self._fit(prompt_ids, body.max_tokens, "max_tokens")
        model = body.model
        if self.router is not None and model in self.router:  # a split route: the caller's arm
            _, model = self.router.pick(model, None, session_id, self._sticky_owner(owner))
        target, adapter = self._target(model)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
        return self._generation(prompt_ids, params, adapter, owner, session_id, target)

    def _prompt_ids(self, text: str) -> list[int]:
        ids = encode_prompt(text, self.tokenizer)
        if not ids:
            raise Reject(400, "The prompt is empty; pass at least one character.", param="prompt")
        return ids

    # ---- talking to the replicas --------------------------------------------------------------------
    async def _open(
        self, request: GenerationRequest, route: str, losses: int = REPLICA_LOSSES_ABSORBED
    ) -> tuple[TokenChunk, Any, float]:
        """Start a generation; return its first token record, the stream and the start time.

        Waiting for the first token before answering lets admission failures (overload, a replica lost
        before it answered) become real HTTP statuses even for streamed responses.
        """
        start = time.perf_counter()
        handle, route = self._handle(route)
        stream = _ReplicaStream(handle, self.tokenizer, request, route, losses)
        async for chunk in stream:  # overload (BackPressureError) is answered by _guard
            return chunk, stream, start
        raise RuntimeError("the replica ended the stream before the first token")

    async def _tokens(
        self, first: TokenChunk, stream, start: float, route: str, choices: int = 1
    ) -> AsyncIterator[TokenChunk]:
        """Yield token records (the first one included) until each of the request's ``choices`` finished (or
        one failed); record latency metrics at the end."""
        ttft = time.perf_counter() - start
        count, done, left = 0, False, choices
        try:
            item = first
            while True:
                count += len(item.token_ids)
                yield item
                left -= item.finished
                if left <= 0 or item.finish_reason == "error":
                    done = True
                    return
                item = await stream.__anext__()
        finally:
            if not done:
                stream.cancel()  # the client went away: stop generating for it
            self.metrics.generation(route, ttft, time.perf_counter() - start, count)

    async def _collect(self, request: GenerationRequest, route: str, name: str) -> list[dict[str, Any]]:
        """Run a request (all its choices) to its end: each choice's text, tokens, log-probabilities and
        usage, in choice order. A whole response has sent nothing yet, so a request whose replica was lost
        and that cannot continue elsewhere (several choices, stop strings) runs again from its start.

        Raises:
            GenerationFailed: The replica finished it with an error.
            ReplicaLost: Its replicas were lost more often than a request may survive.
        """
        try:
            return await self._collect_once(request, route, name, REPLICA_LOSSES_ABSORBED)
        except ReplicaLost as exc:
            if not exc.retryable:
                raise
            logger.warning(
                "llmopt request %s lost its replica; running it again: %s", request.request_id, exc.detail
            )
            again = dataclasses.replace(request, request_id=uuid.uuid4().hex)
            return await self._collect_once(again, route, name, REPLICA_LOSSES_ABSORBED - 1)

    async def _collect_once(
        self, request: GenerationRequest, route: str, name: str, losses: int
    ) -> list[dict[str, Any]]:
        first, stream, start = await self._open(request, route, losses)
        choices = request.params.n
        results = [
            {"text": [], "finish_reason": None, "token_ids": [], "logprobs": [], "prompt_logprobs": None}
            for _ in range(choices)
        ]
        cached = [0] * choices
        async for item in self._tokens(first, stream, start, name, choices):
            if item.finish_reason == "error":
                raise GenerationFailed(item.error or "the replica gave no reason")
            result = results[item.index]
            result["text"].append(item.text)
            result["token_ids"] += item.token_ids
            result["logprobs"] += item.logprobs or []
            result["finish_reason"] = item.finish_reason
            if item.prompt_logprobs is not None:
                result["prompt_logprobs"] = item.prompt_logprobs
            cached[item.index] = max(cached[item.index], item.cached_tokens)
        prompt = len(request.prompt_ids)
        for result, hit in zip(results, cached, strict=True):
            result["text"] = "".join(result["text"])
            tokens = len(result["token_ids"])
            result["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": tokens,
                "total_tokens": prompt + tokens,
                "cached_tokens": hit,
            }
        return results

    async def _guard(self, route: str, work):
        """Run a route's work, counting its response status; unexpected failures become HTTP 500 with an
        error id (the traceback goes to the log, never to the client)."""
        try:
            response = await work
        except Reject as exc:
            self.metrics.response(route, exc.status)
            raise
        except BackPressureError:  # raised by the handle wherever the request was waiting
            self.metrics.response(route, 503)
            raise overloaded() from None
        except Exception as exc:  # a failing request must never take the replica down
            self.metrics.response(route, 500)
            raise internal_error(exc) from None
        self.metrics.response(route, getattr(response, "status_code", 200))
        return response

    # ---- routes ---------------------------------------------------------------------------------------
    @fastapi_app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness probe (no key needed)."""
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """OpenAI model list: the base model, one `base:adapter` entry per adapter, and each split route."""
        self._owner(request)
        ids = [self.model_id, *(f"{self.model_id}:{a}" for a in sorted(self.adapters)), *sorted(self.models)]
        ids += sorted(self.router.routes) if self.router is not None else []
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "llmopt"} for i in ids]
        return {"object": "list", "data": data}

    @fastapi_app.get("/api/v1/routes")
    async def routes(self, request: Request) -> dict[str, Any]:
        """Each split route's live weights and shares, and per arm: requests, errors, latency, evaluation."""
        self._owner(request)
        return {"routes": self.router.describe() if self.router is not None else {}}

    async def check_health(self) -> None:
        """Serve's periodic health check: with ``serving.layout=single``, the model's (a dead vLLM engine
        core replaces the replica)."""
        if self.local is not None:
            await self.local.check_health()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply new route weights (`{"routes": {route: {arm: weight}}}`) to the live ingress: requests in
        flight keep their arm, the next ones draw with the new weights; nothing restarts.

        Raises:
            RouteWeightsError: weights that cannot apply (Serve keeps the previous ones, or fails the
                deployment at its first start).
        """
        if self.local is not None:  # serving.layout=single: the batch settings of the model it runs
            self.local.reconfigure(user_config)
        if self.router is None:
            return
        changed = self.router.set_weights(user_config)
        if changed or not self._evaluations_started:  # at start, and after each change of weights
            self._evaluations_started = True
            logger.info("llmopt routes: weights now %s", self.router.weights)
            for name, route in self.router.routes.items():
                if route.eval_samples:
                    task = asyncio.get_running_loop().create_task(
                        self._evaluate_arms(name, route.eval_samples)
                    )
                    self._evaluations.add(task)
                    task.add_done_callback(self._evaluations.discard)

    async def _evaluate_arms(self, route: str, samples: int) -> None:
        """Greedy exact match of each arm with weight on `samples` held-out rows (data.eval_split)."""
        from llmopt.data import load_rows
        from llmopt.data._evaluate import normalize_answer
        from llmopt.data._tokenize import render

        data = self.config.data
        try:
            rows = await asyncio.to_thread(load_rows, data.dataset, data.eval_split, data.format, samples)
            rendered = [render(row, self.tokenizer, data.prompt_template) for row in rows]
            longest = max(
                len(self.tokenizer.encode(answer, add_special_tokens=False)) for _, answer in rendered
            )
            for arm, spec in self.router.routes[route].arms.items():
                if self.router.weights[route][arm] <= 0:
                    continue
                target, adapter = self._target(spec.model)

                async def one(prompt: str, target=target, adapter=adapter) -> str:
                    ids = encode_prompt(prompt, self.tokenizer)
                    params = SamplingParams(
                        max_tokens=self._fit(ids, longest + 2, "max_tokens"), temperature=0.0
                    )
                    request, way = self._generation(ids, params, adapter, "", None, target)
                    return (await self._collect(request, way, "eval"))[0]["text"]

                answers = await asyncio.gather(*(one(prompt) for prompt, _ in rendered))
                correct = sum(
                    normalize_answer(a) == normalize_answer(e)
                    for a, (_, e) in zip(answers, rendered, strict=True)
                )
                score = {"exact_match": correct / len(rendered), "rows": len(rendered), "at": time.time()}
                self.router.stats[route][arm].evaluation = score
                self.metrics.route_evaluation(route, arm, score["exact_match"])
        except Exception:  # a score is a report, never a reason to fail the route
            logger.exception("llmopt routes: evaluating the arms of %s failed", route)

    @fastapi_app.get("/api/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Engine settings, batch sizes and session-cache counters of the replica that answers."""
        self._owner(request)
        return await self._guard("stats", self._stats())

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request):
        """Prometheus metrics of this node (Ray's metrics agent: Serve's and llmopt's series)."""
        self._owner(request)
        return await self._guard("metrics", self._node_metrics())

    @fastapi_app.post("/tokenize", openapi_extra=openapi_body(TokenizeRequest))
    async def tokenize(self, request: Request):
        """vLLM's tokenizer endpoint: a prompt's (or a chat's) token ids."""
        return await self._guard("tokenize", self._tokenize(request))

    @fastapi_app.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest))
    async def detokenize(self, request: Request):
        """vLLM's detokenizer endpoint: the text of token ids."""
        return await self._guard("detokenize", self._detokenize(request))

    @fastapi_app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(self, request: Request):
        """OpenAI text completion, whole or streamed as server-sent events."""
        return await self._guard("completions", self._openai(request, chat=False))

    @fastapi_app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(self, request: Request):
        """OpenAI chat completion through the tokenizer's chat template, whole or streamed."""
        return await self._guard("chat", self._openai(request, chat=True))

    @fastapi_app.post("/api/v1/model/generate", openapi_extra=openapi_body(GenerateRequest))
    async def generate(self, request: Request):
        """Seed API: chunked text (JSON with `stream: false`); `X-Session-ID` reuses the session's cache."""
        return await self._guard("generate", self._seed_generate(request))

    @fastapi_app.post("/api/v1/model/batch-generate", openapi_extra=openapi_body(BatchGenerateRequest))
    async def batch_generate(self, request: Request):
        """Seed API: several prompts generated concurrently (batched on the replicas); results in order."""
        return await self._guard("batch_generate", self._seed_batch(request))

    # ---- route bodies ---------------------------------------------------------------------------------
    async def _openai(self, request: Request, chat: bool):
        owner, raw = await self._read(request)
        body = parse_body(raw, ChatCompletionRequest if chat else CompletionRequest)
        try:
            check_request(body, self.limits)
        except InvalidRequest as exc:
            raise Reject(400, exc.message, param=exc.param, code=exc.code) from None
        if self.router is None or body.model not in self.router:
            return await self._cached(body, owner, chat, body.model)
        user = body.user or (body.safety_identifier if chat else None)
        arm, served = self.router.pick(body.model, user, body.session_id, self._sticky_owner(owner))
        started = time.monotonic()
        try:
            answer = await self._cached(body, owner, chat, served)
        except Exception as exc:  # a client's mistake (4xx) is no error of the arm
            ok = isinstance(exc, Reject) and exc.status < 500
            self._arm_done(body.model, arm, time.monotonic() - started, ok)
            raise
        answer.headers["X-Route-Arm"] = arm
        if isinstance(answer, StreamingResponse):  # its latency and errors are known when it ends
            answer.body_iterator = self._arm_stream(answer.body_iterator, body.model, arm, started)
        else:
            self._arm_done(body.model, arm, time.monotonic() - started, True)
        return answer

    def _sticky_owner(self, owner: str) -> str | None:
        """The caller's key digest for a split's stickiness; None with API keys off (one anonymous owner)."""
        return owner if self.keys is not None else None

    def _arm_done(self, route: str, arm: str, seconds: float, ok: bool) -> None:
        self.router.stats[route][arm].record(seconds, ok)
        self.metrics.route(route, arm, seconds, ok)

    async def _arm_stream(self, events: AsyncIterator[str], route: str, arm: str, started: float):
        ok = True
        try:
            async for event in events:
                ok = ok and not is_error_event(event)
                yield event
        finally:
            self._arm_done(route, arm, time.monotonic() - started, ok)

    async def _cached(self, body, owner: str, chat: bool, model: str | None):
        """The answer to a checked body for the served `model` (a route's arm, or the body's own), from
        the response cache when it has it."""
        if self.cache is None:
            return _as_response(await self._answer(body, owner, chat, model))
        fields = body.model_dump(mode="json", exclude_unset=True)
        if not cacheable(fields):
            self.cache.bypass()
            self.metrics.response_cache("bypass")
            return _with_header(await self._answer(body, owner, chat, model), "bypass")
        served = f"{self.cache_model}:{model}"  # a route's arms answer differently
        key = cache_key(owner, "chat" if chat else "completions", served, fields)
        entry = await self.cache.get(key)
        if entry is not None:
            self.metrics.response_cache("hit")
            response_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
            if entry["kind"] == "stream":
                events = replay_events(entry, response_id, created)
                return StreamingResponse(_aiter(events), media_type="text/event-stream", headers=HIT)
            return JSONResponse(replay_whole(entry, response_id, created), headers=HIT)
        self.metrics.response_cache("miss")
        answer = await self._answer(body, owner, chat, model)
        if isinstance(answer, StreamingResponse):
            answer.body_iterator = self._recorded(answer.body_iterator, key)
            return _with_header(answer, "miss")
        await self.cache.put(key, {"kind": "whole", "body": answer})
        return JSONResponse(answer, headers={"X-Cache": "miss"})

    async def _recorded(self, events: AsyncIterator[str], key: str) -> AsyncIterator[str]:
        """Pass a stream's events on and store them once it ended well (an error event is never stored)."""
        sent, failed = [], False
        async for event in events:
            sent.append(event)
            failed = failed or is_error_event(event)
            yield event
        if not failed and self.cache is not None:
            await self.cache.put(key, {"kind": "stream", "events": sent})

    async def _answer(self, body, owner: str, chat: bool, model: str | None):
        """Generate the answer to a checked OpenAI body from the served `model`: its JSON, or a streaming
        response."""
        user = body.user or (body.safety_identifier if chat else None)
        if user or (chat and body.metadata):
            logger.info("llmopt request user=%r metadata=%r", user, body.metadata if chat else None)
        target, adapter = self._target(model)
        prompts = self._chat_prompt(body) if chat else self._completion_prompts(body)
        n = body.n or 1
        asked, param = body.max_tokens, "max_tokens"
        if chat and body.max_completion_tokens is not None:
            asked, param = body.max_completion_tokens, "max_completion_tokens"
        echo = not chat and bool(body.echo)
        jobs = []  # one request per prompt, carrying its choices (the replica expands them)
        for p, (ids, _) in enumerate(prompts):
            params = sampling_params(body, self._fit(ids, asked, param))
            if echo and body.logprobs is not None:
                params.prompt_logprobs = body.logprobs
            session_id = body.session_id if p == 0 else None  # one writer per session
            jobs.append(self._generation(ids, params, adapter, owner, session_id, target))
        reply = _Reply(self, body, chat, prompts, n, echo)
        name = "chat" if chat else "completions"
        if not body.stream:
            results = await asyncio.gather(*(self._collect(req, route, name) for req, route in jobs))
            return reply.whole(results)
        opened = await asyncio.gather(
            *(self._open(req, route) for req, route in jobs), return_exceptions=True
        )
        failure = next((o for o in opened if isinstance(o, BaseException)), None)
        if failure is not None:  # nothing was sent yet: answer with a real status, free the rest
            for o in opened:
                if not isinstance(o, BaseException):
                    o[1].cancel()
            raise failure
        streams = [
            (p, self._tokens(first, stream, start, name, req.params.n))
            for p, ((req, _), (first, stream, start)) in enumerate(zip(jobs, opened, strict=True))
        ]
        return StreamingResponse(reply.events(streams), media_type="text/event-stream")

    def _completion_prompts(self, body: CompletionRequest) -> list[tuple[list[int], str]]:
        """Each prompt of a completions body as (token ids, text)."""
        prompt = body.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise Reject(400, "prompt: the list is empty; pass at least one prompt.", param="prompt")
        limit = self.config.serving.max_prompts
        if len(items) > limit:
            raise Reject(
                400,
                f"prompt: {len(items)} prompts are above this server's limit serving.max_prompts={limit}.",
                param="prompt",
            )
        out = []
        for item in items:
            if isinstance(item, str):
                if body.add_special_tokens is False:
                    ids = self.tokenizer.encode(item, add_special_tokens=False)
                else:
                    ids = encode_prompt(item, self.tokenizer)
                if not ids:
                    raise Reject(400, "prompt: a prompt has no tokens; pass at least one.", param="prompt")
                out.append((ids, item))
                continue
            if not item:
                raise Reject(400, "prompt: a token-id prompt is empty; pass at least one id.", param="prompt")
            bad = [t for t in item if t >= self.vocab_size]
            if bad:
                raise Reject(
                    400,
                    f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).",
                    param="prompt",
                    code="invalid_token",
                )
            out.append((list(item), self.tokenizer.decode(item)))
        return out

    def _chat_prompt(self, body) -> list[tuple[list[int], str]]:
        """The conversation through the tokenizer's chat template, as one (token ids, text) prompt."""
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        add_generation = True if body.add_generation_prompt is None else body.add_generation_prompt
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation
            )
        except Exception as exc:  # the template refuses this conversation (e.g. roles out of order)
            raise Reject(
                400, f"messages: the model's chat template refused them: {exc}", param="messages"
            ) from None
        if body.add_special_tokens is None:  # the template's BOS, else one added (as training saw it)
            ids = encode_prompt(text, self.tokenizer)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return [(ids, text)]

    async def _tokenize(self, request: Request) -> dict[str, Any]:
        self._owner(request)
        _, raw = await self._read(request)
        body = parse_body(raw, TokenizeRequest)
        self._adapter(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise Reject(400, "Pass exactly one of prompt and messages.", param="prompt")
        if body.prompt is not None:
            if body.add_special_tokens is False:
                ids = self.tokenizer.encode(body.prompt, add_special_tokens=False)
            else:
                ids = encode_prompt(body.prompt, self.tokenizer)
        else:
            chat = ChatCompletionRequest(
                messages=body.messages,
                add_generation_prompt=body.add_generation_prompt,
                add_special_tokens=body.add_special_tokens,
            )
            try:
                check_request(chat, self.limits)
            except InvalidRequest as exc:
                raise Reject(400, exc.message, param=exc.param, code=exc.code) from None
            ids = self._chat_prompt(chat)[0][0]
        strs = [self.token_text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_seq_len, "tokens": ids, "token_strs": strs}

    async def _detokenize(self, request: Request) -> dict[str, Any]:
        _, raw = await self._read(request)
        body = parse_body(raw, DetokenizeRequest)
        self._adapter(body.model)
        bad = [t for t in body.tokens if t >= self.vocab_size]
        if bad:
            raise Reject(
                400,
                f"tokens: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size}).",
                param="tokens",
                code="invalid_token",
            )
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def _stats(self) -> dict[str, Any]:
        for _ in range(REPLICA_LOSSES_ABSORBED + 1):
            try:
                stats = await self.llm.stats.remote()
                if self.cache is not None:  # the answering ingress replica's
                    stats["response_cache"] = self.cache.stats()
                return stats
            except RayActorError as exc:  # that replica died: ask another (Serve no longer routes to it)
                lost = exc
        raise ReplicaLost(type(lost).__name__)

    async def _node_metrics(self) -> PlainTextResponse:
        if self._metrics_url is None:
            import ray

            node = ray.get_runtime_context().get_node_id()
            info = next((n for n in ray.nodes() if n["NodeID"] == node), None)
            port = info and info.get("MetricsExportPort")
            if not port:
                raise Reject(
                    503,
                    "Ray's metrics agent is not running on this node; see the Ray dashboard's metrics page.",
                    code="metrics_unavailable",
                )
            self._metrics_url = f"http://{info['NodeManagerAddress']}:{port}/metrics"

        def fetch() -> bytes:
            with urllib.request.urlopen(self._metrics_url, timeout=10) as response:
                return response.read()

        try:
            text = await asyncio.to_thread(fetch)
        except OSError as exc:
            raise Reject(
                503,
                f"Ray's metrics agent at {self._metrics_url} did not answer ({exc}).",
                code="metrics_unavailable",
            ) from None
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _seed_generate(self, request: Request):
        owner, raw = await self._read(request)
        body = parse_body(raw, GenerateRequest)
        session_id = request.headers.get("x-session-id") or body.session_id
        if session_id is not None and not re.fullmatch(SESSION_ID_PATTERN, session_id):
            raise Reject(
                400, "X-Session-ID must have 1 to 128 visible ASCII characters.", param="X-Session-ID"
            )
        request, route = self._request(body, self._prompt_ids(body.prompt), owner, session_id)
        headers = {"X-Prompt-Tokens": str(len(request.prompt_ids))}
        if session_id:
            headers["X-Session-ID"] = session_id
        if not body.stream:
            result = _seed_result((await self._collect(request, route, "generate"))[0])
            headers["X-Cached-Tokens"] = str(result["usage"]["cached_tokens"])
            return JSONResponse({**result, "session_id": session_id}, headers=headers)
        first, stream, start = await self._open(request, route)
        headers["X-Cached-Tokens"] = str(first.cached_tokens)
        tokens = self._tokens(first, stream, start, "generate")

        async def chunks() -> AsyncIterator[str]:
            try:
                async for item in tokens:
                    if item.finish_reason == "error":
                        raise GenerationFailed(item.error or "the replica gave no reason")
                    if item.text:
                        yield item.text
            except Exception as exc:  # plain text has no events: the stream ends with a marked error line
                reject = exc if isinstance(exc, Reject) else internal_error(exc)
                yield f"\n[llmopt error] {reject.message}\n"

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers=headers)

    async def _seed_batch(self, request: Request):
        owner, raw = await self._read(request)
        body = parse_body(raw, BatchGenerateRequest)
        jobs = [self._request(body, self._prompt_ids(p), owner, None) for p in body.prompts]
        results = [
            _seed_result(r[0])
            for r in await asyncio.gather(*(self._collect(p, r, "batch_generate") for p, r in jobs))
        ]
        usage = {
            k: sum(r["usage"][k] for r in results)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        return {"results": results, "usage": usage}
