"""One error envelope for every failure: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's).

Validation problems are 400 (never FastAPI's 422), an unknown model 404, a missing or wrong API key 401,
a full server 429 / 503 with ``Retry-After``. Handlers are installed by :func:`install_error_handlers`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmkiln.errors import LmkilnError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error to send to the client with the OpenAI envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(
        404, f"The model {model!r} does not exist; this server serves {served!r}", "invalid_request_error",
        "model", "model_not_found",
    )


def context_length_exceeded(prompt_tokens: int, max_tokens: int, limit: int) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens; the request has {prompt_tokens} prompt "
        f"tokens and asks for {max_tokens} completion tokens ({prompt_tokens + max_tokens} in total). "
        "Shorten the prompt or lower max_tokens.",
        "invalid_request_error", "messages", "context_length_exceeded",
    )


def unauthorized() -> APIError:
    return APIError(
        401, "Missing or invalid API key: send it as 'Authorization: Bearer <key>'",
        "authentication_error", None, "invalid_api_key",
    )


def overloaded(status: int, retry_after: int, why: str) -> APIError:
    return APIError(status, f"The server is overloaded ({why}); retry later", "server_error" if status == 503
                    else "rate_limit_error", None, "server_overloaded", {"Retry-After": str(retry_after)})


def internal(e: BaseException) -> APIError:
    return APIError(500, f"Internal error: {e}", "server_error", None, "internal_error")


def _loc(err: dict[str, Any]) -> str | None:
    parts = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        param = _loc(first)
        msg = "; ".join(f"{_loc(x) or 'body'}: {x.get('msg', 'invalid')}" for x in errs) or "invalid request"
        return bad_request(msg, param, "invalid_value").response()

    @app.exception_handler(LmkilnError)
    async def _user_error(_: Request, e: LmkilnError) -> JSONResponse:
        return bad_request(str(e)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind, headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return internal(e).response()
