"""HTTP errors of the LLM application: OpenAI-style bodies, the one way a request is refused (`Reject`),
body validation that names every problem, and overload."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from llmopt.serve import error_body

__all__ = ["Reject", "install_handlers", "openai_finish_reason", "overloaded", "parse_body"]


class Reject(Exception):
    """An HTTP error with an OpenAI-style body (and optional headers such as Retry-After)."""

    def __init__(self, status: int, message: str, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """Validate a JSON body against ``schema``; every problem is named in one 400 message."""
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Reject(
            400, f"The body is not valid JSON ({exc}); send a JSON object.", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise Reject(400, "The body must be a JSON object.", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems, param = [], None
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "body"
            param = param or where
            message = "unknown field; remove it" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{where}: {message}")
        raise Reject(
            400, "Invalid request: " + "; ".join(problems), param=param, code="invalid_request"
        ) from None


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
