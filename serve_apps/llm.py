"""OpenAI-compatible completion server: one Ray Serve deployment around a continuous-batching engine.

Run it with::

    serve run serve_apps.llm:app_builder config=jobs/configs/tiny-llama-reverse.yaml \
        serving.batching.max_batch_size=4

Each replica owns one :class:`llmopt.serve.GenerationEngine`. Concurrently arriving requests are grouped by
``@serve.batch`` and handed to the engine together (so they prefill together); one background task steps the
engine and routes every :class:`StepOutput` to its request's queue. Requests arriving while the engine decodes
join the running batch at the next step.

Prompts are tokenized with ``llmopt.data.encode_prompt`` (BOS unless the text already starts with it), exactly
as training and evaluation tokenize them, so adapters see the inputs they were trained on.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from llmopt.config import RunConfig, load_config
from llmopt.data import encode_prompt
from llmopt.serve import GenerationEngine, GenerationRequest, SamplingParams, StepOutput

fastapi_app = FastAPI(title="llmopt completions")


class _GenerationFields(BaseModel):
    """Fields that text and chat completions share: model, sampling, stop and streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


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


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (where if loc else None)
        problems.append(f"{where}: {err.get('msg')}")
    return _error(400, "Invalid request: " + "; ".join(problems), param=param, code="invalid_request")


@fastapi_app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
    return _error(exc.status_code, detail["message"], param=detail.get("param"), code=detail.get("code"))


@fastapi_app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return _error(500, f"Generation failed: {exc}")


def _reject(status: int, message: str, param: str | None = None, code: str | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail={"message": message, "param": param, "code": code})


def _openai_reason(reason: str | None) -> str | None:
    # OpenAI knows only "stop" and "length"; an end-of-sequence token is a natural stop.
    return "stop" if reason == "eos" else reason


# Everything the routes use must exist above this line: serve.ingress pickles the FastAPI app (and the
# globals its routes reference) when the class is decorated.
@serve.deployment
@serve.ingress(fastapi_app)
class LLMServer:
    """One replica: a model, its tokenizer and a continuous-batching engine behind the OpenAI API.

    Args:
        config: A :class:`RunConfig` as ``model_dump(mode="json")`` (plain data crosses to the actor).
    """

    def __init__(self, config: dict[str, Any]):
        from llmopt.evaluation import set_torch_threads
        from llmopt.models import load_model, load_tokenizer

        self.config = RunConfig.model_validate(config)
        set_torch_threads(self.config.resources.cpus_per_worker)
        self.model_id = self.config.model.name_or_path
        self.max_seq_len = self.config.model.max_seq_len
        self.tokenizer = load_tokenizer(self.config.model)
        model = load_model(self.config.model).eval()
        batching = self.config.serving.batching
        self.engine = GenerationEngine(model, self.tokenizer, max_batch_size=batching.max_batch_size)
        self._admit.set_max_batch_size(batching.max_batch_size)
        self._admit.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._queues: dict[str, asyncio.Queue] = {}
        # Requests are handed to the engine only between steps, from the event loop, because
        # engine.step runs in a worker thread and the engine is not thread-safe.
        self._pending: list[GenerationRequest] = []
        self._loop_task: asyncio.Task | None = None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _admit(self, requests: list[GenerationRequest]) -> list[asyncio.Queue]:
        """Queue a batch of concurrently arriving requests for the engine; one output queue each."""
        queues = []
        for request in requests:
            queue: asyncio.Queue = asyncio.Queue()
            self._queues[request.request_id] = queue
            self._pending.append(request)
            queues.append(queue)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return queues

    async def _run(self) -> None:
        """Step the engine while it has work and route each output to its request's queue."""
        while self._pending or self.engine.has_work():
            pending, self._pending = self._pending, []
            for request in pending:
                try:
                    self.engine.add(request)
                except ValueError as exc:
                    self._fail(request.request_id, exc)
            if not self.engine.has_work():
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # a broken step must fail its requests, never the replica
                for request_id in list(self._queues):
                    self._fail(request_id, exc)
                batching = self.config.serving.batching
                self.engine = GenerationEngine(
                    self.engine.model, self.tokenizer, max_batch_size=batching.max_batch_size
                )
                continue
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                if out.finished:
                    self._queues.pop(out.request_id, None)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(exc)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[StepOutput]:
        queue = await self._admit(request)
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def _build(
        self, body: _GenerationFields, prompt: str, prefix: str = "cmpl"
    ) -> tuple[GenerationRequest, str]:
        if body.model is not None and body.model != self.model_id:
            raise _reject(
                404,
                f"The model {body.model!r} does not exist; this server serves {self.model_id!r}.",
                param="model",
                code="model_not_found",
            )
        prompt_ids = encode_prompt(prompt, self.tokenizer)
        if not prompt_ids:
            raise _reject(400, "The prompt is empty; pass at least one character.", param="prompt")
        if len(prompt_ids) >= self.max_seq_len:
            raise _reject(
                400,
                f"The prompt has {len(prompt_ids)} tokens but the context is {self.max_seq_len}; "
                "shorten the prompt.",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = body.max_tokens or self.config.serving.max_new_tokens
        room = self.max_seq_len - len(prompt_ids)
        if body.max_tokens is not None and max_tokens > room:
            raise _reject(
                400,
                f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds the context of "
                f"{self.max_seq_len}; ask for at most {room} tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(
            max_tokens=min(max_tokens, room),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
        )
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        return GenerationRequest(request_id, prompt_ids, params), request_id

    @fastapi_app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness probe."""
        return {"status": "ok"}

    @fastapi_app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """OpenAI model list: the one served model."""
        return {
            "object": "list",
            "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "llmopt"}],
        }

    @fastapi_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        """OpenAI text completion, whole or streamed as server-sent events."""
        request, request_id = self._build(body, body.prompt)
        return await self._respond(request, request_id, body.stream, chat=False)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        """OpenAI chat completion through the tokenizer's chat template, whole or streamed."""
        messages = [m.model_dump() for m in body.messages]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request, request_id = self._build(body, prompt, prefix="chatcmpl")
        return await self._respond(request, request_id, body.stream, chat=True)

    async def _respond(self, request: GenerationRequest, request_id: str, stream: bool, chat: bool):
        """The whole response, or an SSE stream, in the text- or chat-completion shape."""
        created = int(time.time())
        if stream:
            return StreamingResponse(
                self._stream(request, request_id, created, chat=chat), media_type="text/event-stream"
            )
        text, finish_reason, completion_tokens = [], None, 0
        async for out in self._generate(request):
            text.append(out.text)
            completion_tokens += out.token_id is not None
            finish_reason = out.finish_reason
        reason = _openai_reason(finish_reason)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(text)},
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": "".join(text), "finish_reason": reason, "logprobs": None}
        prompt_tokens = len(request.prompt_ids)
        return {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": self.model_id,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _stream(
        self, request: GenerationRequest, request_id: str, created: int, chat: bool = False
    ) -> AsyncIterator[str]:
        try:
            first = True
            async for out in self._generate(request):
                reason = _openai_reason(out.finish_reason)
                if chat:
                    delta = {"role": "assistant", "content": out.text} if first else {"content": out.text}
                    choice = {"index": 0, "delta": delta, "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": out.text, "finish_reason": reason, "logprobs": None}
                chunk = {
                    "id": request_id,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": self.model_id,
                    "choices": [choice],
                }
                first = False
                yield f"data: {json.dumps(chunk)}\n\n"
        except Exception as exc:  # headers are sent already: report the failure in-band
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}}
            yield f"data: {json.dumps(error)}\n\n"
        yield "data: [DONE]\n\n"


def app_builder(args: dict[str, Any]) -> Application:
    """Build the Serve application from ``serve run`` arguments.

    Args:
        args: ``config`` (a YAML path, optional), ``overrides`` (a list of ``a.b=value`` strings, optional)
            and any other ``a.b=value`` pair that ``serve run ... a.b=value`` passes as a key.

    Returns:
        The bound ``LLMServer`` deployment, sized from ``config.serving`` and ``config.resources``.
    """
    args = dict(args)
    path = args.pop("config", None)
    overrides = list(args.pop("overrides", None) or [])
    overrides += [f"{key}={value}" for key, value in args.items()]
    config = load_config(path, overrides)
    serving = config.serving
    scaling = serving.autoscaling
    options: dict[str, Any] = {
        "max_ongoing_requests": serving.max_ongoing_requests or 2 * serving.batching.max_batch_size,
        "max_queued_requests": serving.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.resources.cpus_per_worker},
    }
    if scaling.min_replicas == scaling.max_replicas:
        options["num_replicas"] = scaling.min_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }
    return LLMServer.options(**options).bind(config.model_dump(mode="json"))
