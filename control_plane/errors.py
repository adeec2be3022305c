"""One path for refusals and errors: every failure becomes ``{"error", "detail"}`` JSON (the
``ErrorBody`` of the OpenAPI schema) with the statuses of proto_docs/control_plane.md. A
client mistake is never a 500; a fault of ours is logged with the request id and answered
without internals. A 405 keeps its ``Allow`` header."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from catalog import QuiverError
from catalog.errors import MAX_DETAIL_CHARS, bounded
from control_plane.context import request_id
from control_plane.gate import MAX_JSON_BODY

log = structlog.get_logger("control_plane")


class StreamAborted(Exception):
    """A streamed body stops midway on purpose (its failure was logged where it happened):
    the connection is dropped without the final chunk, so the client sees an incomplete
    body. ``request_context`` (control_plane/app.py) ends the request quietly on it, and the
    ASGI server closes the connection."""


def is_aborted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a :class:`StreamAborted`, or wraps one (Litestar and anyio wrap a
    failure after the response started in an exception group and a LitestarException)."""
    while exc is not None:
        if isinstance(exc, StreamAborted):
            return True
        if isinstance(exc, BaseExceptionGroup):
            return any(is_aborted(e) for e in exc.exceptions)
        exc = exc.__cause__
    return False


class NotAcceptable(QuiverError):
    """No result format the route can send is acceptable to the client (``Accept``)."""

    code = "INVALID_ARGUMENT"
    http_status = 406


_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "INVALID_ARGUMENT",
    409: "ALREADY_EXISTS",
    413: "RESOURCE_EXHAUSTED",
    415: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
}


def _body(code: str, detail: str, status: int, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response(
        {"error": code, "detail": bounded(detail, MAX_DETAIL_CHARS)},
        status_code=status,
        media_type=MediaType.JSON,
        headers=headers,
    )


def quiver_error(request: Request[Any, Any, Any], exc: QuiverError) -> Response[Any]:
    headers = {"www-authenticate": "Bearer"} if exc.http_status == 401 else None
    return _body(exc.code, exc.detail, exc.http_status, headers)


def validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    problems = []
    for item in exc.extra or []:
        if isinstance(item, dict):
            msg = str(item.get("message", "")).strip()
            key = item.get("key")
            source = getattr(item.get("source"), "value", item.get("source"))  # ParamType.QUERY -> "query"
            where = f"{source} " if source and source != "body" else ""
            if key == "data":  # the body as a whole (msgspec's `$.data`)
                problems.append(f"request body: {msg}")
            else:
                problems.append(f"{where}{key}: {msg}" if key and key not in msg else msg)
    detail = "; ".join(p for p in problems if p) or str(exc.detail)
    return _body("INVALID_ARGUMENT", f"{bounded(detail, 300)} ({request.method} {request.url.path})", 400)


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status >= 500:
        return internal_error(request, exc)
    code = _CODES.get(status, "INVALID_ARGUMENT")
    detail = str(exc.detail)
    if status == 400 and type(exc.__cause__).__name__ == "SerializationException":
        detail = f"request body is not valid JSON ({detail}); send one JSON object"
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.method} {bounded(request.url.path, 200)}; see /schema for the API"
    headers = None
    if status == 405:
        allow = (exc.headers or {}).get("allow", "")
        headers = {"allow": allow}
        detail = f"{request.method} is not allowed on {bounded(request.url.path, 200)}; allowed: {allow}"
    if status == 413:
        detail = f"request body too large: the limit is {MAX_JSON_BODY} bytes"
    return _body(code, detail, status, headers)


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    rid = request_id(request)
    log.error("http.internal_error", path=request.url.path, request_id=rid, exc_info=exc)
    return _body(
        "INTERNAL",
        f"internal error (request id {rid}); the server log has the details",
        HTTP_500_INTERNAL_SERVER_ERROR,
    )


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    QuiverError: quiver_error,
    ValidationException: validation_error,
    HTTPException: http_error,
    Exception: internal_error,
}
