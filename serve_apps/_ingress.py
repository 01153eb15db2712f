"""The HTTP front door of the LLM application: API keys, body limits and validation, tokenization, the
OpenAI and seed APIs, request metrics; it streams from the ``LLMServer`` replicas through a deployment handle,
sending each a typed ``GenerationRequest`` and reading typed ``TokenChunk`` records back.

The handle's multiplexed model id is the adapter (``model="base:adapter"``) and, for sessions, a digest of the
caller's key and session id, so a session's turns return to the replica holding its cache.
"""

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from llmopt.config import RunConfig
from llmopt.data import encode_prompt
from llmopt.serve import (
    BatchGenerateRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerationRequest,
    SamplingParams,
    SessionKey,
    TokenChunk,
    error_body,
    load_api_keys,
    owner_of,
)
from serve_apps._errors import Reject, install_handlers, openai_finish_reason, overloaded, parse_body
from serve_apps._metrics import IngressMetrics

fastapi_app = FastAPI(title="llmopt LLM server")
install_handlers(fastapi_app)


# serve.ingress pickles the FastAPI app (and the globals its routes reference) when the class is decorated:
# everything the routes use is defined or imported above.
@serve.deployment
@serve.ingress(fastapi_app)
class LLMIngress:
    """HTTP front door: checks keys, bodies and lengths, tokenizes, and streams from ``LLMServer`` replicas.

    Args:
        llm: Handle of the ``LLMServer`` deployment.
        config: A :class:`RunConfig` as ``model_dump(mode="json")``.
    """

    def __init__(self, llm: DeploymentHandle, config: dict[str, Any]):
        from llmopt.models import load_tokenizer

        self.llm = llm
        self.config = RunConfig.model_validate(config)
        serving = self.config.serving
        self.tokenizer = load_tokenizer(self.config.model)
        self.model_id = self.config.model.name_or_path
        self.adapters = set(serving.adapters)
        self.max_seq_len = self.config.model.max_seq_len
        self.keys = load_api_keys(serving.api_keys_env, serving.api_keys_file)
        self.metrics = IngressMetrics()

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
        """The adapter a `model` field names: None (base), `base:adapter` or a bare adapter name."""
        if model is None or model == self.model_id:
            return None
        base, _, adapter = model.rpartition(":")
        if base in ("", self.model_id) and adapter in self.adapters:
            return adapter
        known = [self.model_id, *(f"{self.model_id}:{a}" for a in sorted(self.adapters))]
        raise Reject(
            404,
            f"The model {model!r} does not exist; this server serves {known}.",
            param="model",
            code="model_not_found",
        )

    def _request(
        self, body, prompt_ids: list[int], owner: str, session_id: str | None
    ) -> tuple[GenerationRequest, str]:
        """The replica's request and the multiplexed model id (adapter, plus session digest) for routing."""
        if len(prompt_ids) >= self.max_seq_len:
            raise Reject(
                400,
                f"The prompt has {len(prompt_ids)} tokens but the context is {self.max_seq_len}; shorten it.",
                param="prompt",
                code="context_length_exceeded",
            )
        room = self.max_seq_len - len(prompt_ids)
        if body.max_tokens is not None and body.max_tokens > room:
            raise Reject(
                400,
                f"max_tokens={body.max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds "
                f"the context of {self.max_seq_len}; ask for at most {room} tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        adapter = self._adapter(body.model)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(
            max_tokens=min(body.max_tokens or self.config.serving.max_new_tokens, room),
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
        session = SessionKey(owner, session_id) if session_id else None
        route = adapter or ""
        if session:
            route = f"{adapter or 'base'}|{hashlib.sha256(f'{owner}:{session_id}'.encode()).hexdigest()[:16]}"
        request = GenerationRequest(uuid.uuid4().hex, prompt_ids, params, adapter=adapter, session=session)
        return request, route

    def _prompt_ids(self, text: str) -> list[int]:
        ids = encode_prompt(text, self.tokenizer)
        if not ids:
            raise Reject(400, "The prompt is empty; pass at least one character.", param="prompt")
        return ids

    # ---- talking to the replicas --------------------------------------------------------------------
    async def _open(self, request: GenerationRequest, route: str) -> tuple[TokenChunk, Any, float]:
        """Start a generation; return its first token record, the stream and the start time.

        Waiting for the first token before answering lets admission failures (overload) become real HTTP
        statuses even for streamed responses.
        """
        start = time.perf_counter()
        handle = self.llm.options(stream=True, multiplexed_model_id=route)
        stream = handle.generate.remote(request)  # overload (BackPressureError) is answered by _guard
        async for chunk in stream:
            return chunk, stream, start
        raise RuntimeError("the replica ended the stream before the first token")

    async def _tokens(self, first: TokenChunk, stream, start: float, route: str) -> AsyncIterator[TokenChunk]:
        """Yield token records (the first one included); record latency metrics at the end."""
        ttft = time.perf_counter() - start
        count, done = 0, False
        try:
            item = first
            while True:
                count += len(item.token_ids)
                yield item
                if item.finished:
                    done = True
                    return
                item = await stream.__anext__()
        finally:
            if not done:
                stream.cancel()  # the client went away: stop generating for it
            self.metrics.generation(route, ttft, time.perf_counter() - start, count)

    async def _collect(self, request: GenerationRequest, route: str, name: str) -> dict[str, Any]:
        first, stream, start = await self._open(request, route)
        text, reason, tokens = [], None, 0
        async for item in self._tokens(first, stream, start, name):
            text.append(item.text)
            tokens += len(item.token_ids)
            reason = item.finish_reason
        prompt = len(request.prompt_ids)
        return {
            "text": "".join(text),
            "finish_reason": reason,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": tokens,
                "total_tokens": prompt + tokens,
                "cached_tokens": first.cached_tokens,
            },
        }

    async def _guard(self, route: str, work):
        """Run a route's work, counting its response status; unexpected failures become HTTP 500."""
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
            raise Reject(
                500, f"Generation failed: {type(exc).__name__}: {exc}", code="internal_error"
            ) from None
        self.metrics.response(route, getattr(response, "status_code", 200))
        return response

    # ---- routes ---------------------------------------------------------------------------------------
    @fastapi_app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness probe (no key needed)."""
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """OpenAI model list: the base model and one `base:adapter` entry per adapter."""
        self._owner(request)
        ids = [self.model_id, *(f"{self.model_id}:{a}" for a in sorted(self.adapters))]
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "llmopt"} for i in ids]
        return {"object": "list", "data": data}

    @fastapi_app.get("/api/v1/stats")
    async def stats(self, request: Request) -> dict[str, Any]:
        """Engine settings, batch sizes and session-cache counters of the replica that answers."""
        self._owner(request)
        return await self.llm.stats.remote()

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI text completion, whole or streamed as server-sent events."""
        return await self._guard("completions", self._openai(request, chat=False))

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI chat completion through the tokenizer's chat template, whole or streamed."""
        return await self._guard("chat", self._openai(request, chat=True))

    @fastapi_app.post("/api/v1/model/generate")
    async def generate(self, request: Request):
        """Seed API: chunked text (JSON with `stream: false`); `X-Session-ID` reuses the session's cache."""
        return await self._guard("generate", self._seed_generate(request))

    @fastapi_app.post("/api/v1/model/batch-generate")
    async def batch_generate(self, request: Request):
        """Seed API: several prompts generated concurrently (batched on the replicas); results in order."""
        return await self._guard("batch_generate", self._seed_batch(request))

    # ---- route bodies ---------------------------------------------------------------------------------
    async def _openai(self, request: Request, chat: bool):
        owner, raw = await self._read(request)
        body = parse_body(raw, ChatCompletionRequest if chat else CompletionRequest)
        if chat:
            messages = [m.model_dump() for m in body.messages]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt = body.prompt
        request, route = self._request(body, self._prompt_ids(prompt), owner, body.session_id)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}"
        created = int(time.time())
        name = "chat" if chat else "completions"
        if not body.stream:
            result = await self._collect(request, route, name)
            reason = openai_finish_reason(result["finish_reason"])
            if chat:
                message = {"role": "assistant", "content": result["text"]}
                choice = {"index": 0, "message": message, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": result["text"], "finish_reason": reason, "logprobs": None}
            usage = dict(result["usage"])
            usage["prompt_tokens_details"] = {"cached_tokens": usage.pop("cached_tokens")}  # OpenAI's place
            return {
                "id": request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": body.model or self.model_id,
                "choices": [choice],
                "usage": usage,
            }
        first, stream, start = await self._open(request, route)
        tokens = self._tokens(first, stream, start, name)

        include_usage = body.stream_options is not None and body.stream_options.include_usage

        def chunk(choices: list, **extra) -> str:
            event = {
                "id": request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": body.model or self.model_id,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(event)}\n\n"

        async def events() -> AsyncIterator[str]:
            opening, completion = True, 0
            try:
                async for item in tokens:
                    completion += len(item.token_ids)
                    reason = openai_finish_reason(item.finish_reason)
                    if chat:
                        delta = (
                            {"role": "assistant", "content": item.text} if opening else {"content": item.text}
                        )
                        choice = {"index": 0, "delta": delta, "finish_reason": reason}
                    else:
                        choice = {"index": 0, "text": item.text, "finish_reason": reason, "logprobs": None}
                    opening = False
                    yield chunk([choice])
                if include_usage:
                    prompt = len(request.prompt_ids)
                    usage = {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
                    }
                    yield chunk([], usage=usage)
            except Exception as exc:  # headers are sent already: report the failure in-band
                yield f"data: {json.dumps(error_body(500, f'Generation failed: {exc}'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _seed_generate(self, request: Request):
        owner, raw = await self._read(request)
        body = parse_body(raw, GenerateRequest)
        session_id = request.headers.get("x-session-id") or body.session_id
        if session_id is not None and not 0 < len(session_id) <= 128:
            raise Reject(400, "X-Session-ID must have 1 to 128 characters.", param="X-Session-ID")
        request, route = self._request(body, self._prompt_ids(body.prompt), owner, session_id)
        headers = {"X-Prompt-Tokens": str(len(request.prompt_ids))}
        if session_id:
            headers["X-Session-ID"] = session_id
        if not body.stream:
            result = await self._collect(request, route, "generate")
            headers["X-Cached-Tokens"] = str(result["usage"]["cached_tokens"])
            return JSONResponse({**result, "session_id": session_id}, headers=headers)
        first, stream, start = await self._open(request, route)
        headers["X-Cached-Tokens"] = str(first.cached_tokens)
        tokens = self._tokens(first, stream, start, "generate")

        async def chunks() -> AsyncIterator[str]:
            async for item in tokens:
                if item.text:
                    yield item.text

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers=headers)

    async def _seed_batch(self, request: Request):
        owner, raw = await self._read(request)
        body = parse_body(raw, BatchGenerateRequest)
        jobs = [self._request(body, self._prompt_ids(p), owner, None) for p in body.prompts]
        results = await asyncio.gather(*(self._collect(p, r, "batch_generate") for p, r in jobs))
        usage = {
            k: sum(r["usage"][k] for r in results)
            for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        return {"results": results, "usage": usage}
