"""OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, for every failure the server reports.

Client mistakes are 4xx with the field named in ``param``; nothing a client sends may produce a 5xx.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error answered with OpenAI's body; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code, **self.extra}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_value(error: Exception) -> APIError:
    """A 400 from the ValueError/TypeError of SamplingParams or the engine; their messages start with the field."""
    message = str(error)
    first = message.split(" ", 1)[0].rstrip(":")
    return APIError(400, message, param=first if first.isidentifier() else None)


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
    if not loc:
        return APIError(400, f"the request body must be a JSON object ({first.get('msg', 'invalid')})").response()
    field = loc[0]
    where = ".".join(loc)
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=field).response()


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
    return APIError(exc.status_code, message).response()


async def unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {type(exc).__name__}").response()
