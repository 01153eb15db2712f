"""HTTP errors of the LLM application: OpenAI-style bodies, the one way a request is refused (`Reject`),
body validation that names every problem, and overload."""

from __future__ import annotations

import json
import logging
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from llmopt.serve import error_body

__all__ = [
    "GenerationFailed",
    "Reject",
    "ReplicaLost",
    "error_event",
    "install_handlers",
    "internal_error",
    "openai_finish_reason",
    "overloaded",
    "parse_body",
]

logger = logging.getLogger("ray.serve")


class GenerationFailed(RuntimeError):
    """The replica finished a request with an error (its batch went on)."""


class Reject(Exception):
    """An HTTP error with an OpenAI-style body (and optional headers such as Retry-After)."""

    def __init__(self, status: int, message: str, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


class ReplicaLost(Reject):
    """The model replica generating a request was lost (its process died, or Ray cannot reach it) and the
    request could not move to another one: HTTP 503 with Retry-After, since a retry finds a live replica
    (Serve replaces the lost one), or the error event of a stream already under way.

    Attributes:
        retryable: Whether the request may still run again from its start (nothing of it reached the client
            and it has not used up its replica losses).
    """

    def __init__(self, detail: str, retryable: bool = False):
        super().__init__(
            503,
            "The model replica serving this request stopped; retry after Retry-After seconds.",
            code="replica_unavailable",
            headers={"Retry-After": "1"},
        )
        self.detail, self.retryable = detail, retryable


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Validate a JSON body against ``schema``; every problem is named in one 400 message."""
    try:
        data = json.loads(raw or b"null", parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Reject(
            400, f"The body is not valid JSON ({exc}); send a JSON object.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise Reject(400, "The body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems, param = [], None
        errors = exc.errors()
        for err in errors[:10]:
            where = ".".join(str(p) for p in err["loc"]) or "body"
            param = param or where
            message = "unknown field; remove it" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {message}")
        more = f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise Reject(
            400, "Invalid request: " + "; ".join(problems) + more, param=param, code="invalid_request"
        ) from None


def internal_error(exc: BaseException) -> Reject:
    """HTTP 500 for an unexpected failure: a message and an error id for the client, the traceback (under the
    same id) in the log. A replica's exception carries its traceback, file paths and node address."""
    error_id = uuid.uuid4().hex[:12]
    if isinstance(exc, GenerationFailed):
        logger.error("llmopt request failed [error %s]: %s", error_id, exc)
        message = f"Generation failed: {exc} (error id {error_id})."
    else:
        logger.error("llmopt request failed [error %s]", error_id, exc_info=exc)
        message = f"Generation failed (error id {error_id}); the server log has the details."
    return Reject(500, message, code="internal_error")


def is_error_event(event: str) -> bool:
    """Whether a server-sent event is the one `error_event` writes (a failed stream's end)."""
    return event.startswith('data: {"error"')


def error_event(exc: BaseException) -> str:
    """The server-sent event that ends a stream which failed after its headers went out."""
    reject = exc if isinstance(exc, Reject) else internal_error(exc)
    return f"data: {json.dumps(error_body(reject.status, reject.message, reject.param, reject.code))}\n\n"


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def overloaded() -> Reject:
    """HTTP 503 with Retry-After: every replica's queue is full."""
    return Reject(
        503,
        "The server is at capacity (every replica's queue is full); retry after Retry-After seconds.",
        code="overloaded",
        headers={"Retry-After": "1"},
    )


def openai_finish_reason(reason: str | None) -> str | None:
    """The engine's finish reason as OpenAI names it: it knows only "stop" and "length", and an
    end-of-sequence token is a natural stop."""
    return "stop" if reason == "eos" else reason


def install_handlers(app) -> None:
    """Answer `Reject` and FastAPI's own validation errors with OpenAI-style error bodies."""

    @app.exception_handler(Reject)
    async def _rejected(request: Request, exc: Reject) -> JSONResponse:
        body = error_body(exc.status, exc.message, exc.param, exc.code)
        return JSONResponse(status_code=exc.status, content=body, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=400, content=error_body(400, f"Invalid request: {exc.errors()}"))
