"""Every error leaves the API as ``{"error": {"message", "type", "param", "code",
"request_id"}}``; the request id is the one echoed in ``X-Request-Id``, to find the
request in the server's log.

On the OpenAI-compatible routes a malformed or invalid request is a 400, as OpenAI
answers it; the native routes keep 422 for bodies that parse but do not validate.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ragcache.api.middleware import REQUEST_ID_HEADER, current_request_id
from ragcache.errors import InvalidInputError, PromptTooLongError, ServiceError, storage_failure

log = logging.getLogger(__name__)

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")


class UnsupportedFieldError(InvalidInputError):
    """An OpenAI request field this server does not implement."""

    code = "unsupported_parameter"


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def error_body(
    message: str,
    kind: str,
    param: str | None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict:
    """The error object; ``request_id`` defaults to the id of the request being served."""
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
            "request_id": request_id or current_request_id(),
        }
    }


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None) or current_request_id()


def error_code(error: ServiceError) -> str | None:
    if isinstance(error, PromptTooLongError):
        return "context_length_exceeded"
    return getattr(error, "code", None)


def error_response(
    request: Request,
    status: int,
    message: str,
    kind: str,
    param: str | None,
    code: str | None = None,
) -> JSONResponse:
    request_id = request_id_of(request)
    response = JSONResponse(error_body(message, kind, param, code, request_id), status_code=status)
    if request_id:
        # A 500 is answered outside the request-id middleware, so its header is set here.
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def _status_for(request: Request, status: int) -> int:
    return 400 if status == 422 and is_openai_path(request.url.path) else status


async def _service_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    status = _status_for(request, error.status)
    response = error_response(
        request, status, error.message, error.kind, error.param, error_code(error)
    )
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON: {detail}".rstrip(": ")
        return error_response(request, 400, message, "invalid_request_error", None, "invalid_json")
    location = [str(part) for part in first.get("loc", ())]
    if location and location[0] in ("body", "query", "path", "header"):
        location = location[1:]
    param = ".".join(location) or None
    reason = first.get("msg", "invalid value")
    message = f"{param}: {reason}" if param else f"invalid request body: {reason}"
    status = _status_for(request, 422)
    return error_response(
        request, status, message, "invalid_request_error", param, first.get("type")
    )


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, HTTPException)
    kind = "not_found" if error.status_code == 404 else "http_error"
    return error_response(request, error.status_code, str(error.detail), kind, None)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    translated = storage_failure(error)
    if translated is not None:
        log.error("%s %s: %s (%r)", request.method, request.url.path, translated.message, error)
        return await _service_error(request, translated)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(
        request, 500, f"internal error: {type(error).__name__}", "internal_error", None
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
