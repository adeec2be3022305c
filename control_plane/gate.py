"""The request gate: check the query and the body strictly, before Litestar decodes anything.

Litestar resolves a handler's ``data`` parameter (the JSON body) *before* its dependencies,
so an authentication dependency would answer a malformed body with 400 and never see the
token: the auth failure would not be audited and fail2ban would never learn of it. So the
work is split in the order Litestar runs things, both before the body is touched:

1. **Authenticate** in the route's :class:`~control_plane.context.Access` guard, declared on
   its router (who may call it): 401 + an ``auth.failed`` audit record, or 403 for a token
   that may not use the route.
2. **Check the query**, then **read the body** within ``request_max_body_size`` (413), require
   ``Content-Type: application/json`` when there is one (415).
3. **Decode the body strictly** into the handler's declared model (400 with msgspec's sentence):
   ``"60"`` is not an integer on any route, unknown fields are errors. Decoding into the
   model is also what bounds nesting: the decoder stops at the first value that does not
   fit the model, so ``[[[[…]]]]`` 100,000 deep (200 kB, well under the size limit) is
   refused at its first byte — it used to be decoded untyped first, recursing until a
   ``RecursionError`` (500). A ``RecursionError`` (a model with an ``Any`` field) is a 400
   too. Litestar then converts the already valid, shallow body.
4. **Mark the token used**: only a request that passed every check updates ``last_used_at``.

Steps 2-4 are :func:`gate`, the app's ``before_request`` hook (it runs after the guards and
before the handler's arguments are resolved).

The order and the statuses are documented in proto_docs/control_plane.md.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, InternalServerException
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.base import BaseRouteHandler

from catalog import InvalidArgument
from control_plane.context import DEPENDENCIES, catalog_of, principal_of

MAX_JSON_BODY = 1 << 20
"""Bytes a request body may have (413 beyond)."""

JSON_MEDIA_TYPE = "application/json"


class UnsupportedMediaType(HTTPException):
    status_code = 415


def decode_body(body: bytes, model: Any) -> Any:
    """``body`` decoded strictly into ``model``, or :class:`InvalidArgument` saying why not."""
    try:
        return msgspec.json.decode(body, type=model, strict=True)
    except msgspec.ValidationError as e:
        raise InvalidArgument(f"request body: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"request body is not valid JSON ({e}); send one JSON object") from None
    except UnicodeDecodeError:  # msgspec lets this one through undressed
        raise InvalidArgument("request body is not valid JSON: it is not UTF-8") from None
    except RecursionError:  # only a model with an Any field lets the decoder recurse this far
        raise InvalidArgument("request body is nested too deeply") from None


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


_INJECTED = frozenset({"request", "data", *DEPENDENCIES})


def query_parameters(handler: BaseRouteHandler) -> set[str]:
    """The query parameters a handler declares: its signature minus what Litestar injects
    (request, body, dependencies) and minus its path parameters."""
    names = set(handler.parsed_fn_signature.parameters) - _INJECTED
    return {n for n in names if not any("{" + n + ":" in p for p in handler.paths)}


def _check_query(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Query parameters as strictly as bodies: an unknown name is an error (a misspelt
    ``?acter=`` must not answer unfiltered, the rule of unknown body fields in
    control_plane.models), a scalar given twice is an error, and a value is the string
    itself or a JSON number/boolean — never a number read as a timestamp."""
    declared = query_parameters(handler)
    unknown = sorted(set(connection.query_params) - declared)
    if unknown:
        shown = ", ".join(repr(u[:40]) for u in unknown[:3])
        raise InvalidArgument(
            f"unknown query parameter {shown}; this route takes: {', '.join(sorted(declared)) or 'none'}"
        )
    fields = handler.parsed_fn_signature.parameters
    for name in declared & set(connection.query_params):
        values = connection.query_params.getall(name)
        if len(values) > 1:
            raise InvalidArgument(f"query parameter {name!r} is given {len(values)} times; give it once")
        annotation = fields[name].annotation
        try:
            msgspec.convert(values[0], annotation, strict=True)
        except msgspec.ValidationError:
            try:
                msgspec.json.decode(values[0].encode(), type=annotation, strict=True)
            except (msgspec.ValidationError, msgspec.DecodeError):
                raise InvalidArgument(
                    f"query parameter {name!r}: {values[0][:60]!r} is not a valid {_type_name(annotation)}"
                ) from None


def _type_name(annotation: Any) -> str:
    names = {
        "datetime": "RFC 3339 date-time",
        "int": "integer",
        "bool": "boolean (true/false)",
        "str": "string",
    }
    args = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not type(None)]
    return " or ".join(
        names.get(getattr(a, "__name__", str(a)), getattr(a, "__name__", str(a))) for a in args
    )


async def gate(request: Request[Any, Any, Any]) -> None:
    """The app's ``before_request`` hook: the query and body checks, after the route's access
    guard and before any decoding; then the caller's token is marked used."""
    handler = request.route_handler
    if not isinstance(handler, HTTPRouteHandler):  # a mounted ASGI app (e.g. MCP) checks its own
        return
    _check_query(request, handler)
    await _check_body(request, handler)
    principal = principal_of(request)
    if principal is not None:
        catalog_of(request).tokens.record_use(principal)


async def _check_body(connection: Request[Any, Any, Any], handler: HTTPRouteHandler) -> None:
    body_field = handler.parsed_fn_signature.parameters.get("data")
    if body_field is None:
        return
    try:
        body = await connection.body()  # 413 past request_max_body_size
    except InternalServerException:  # Litestar's word for a client that hung up mid-body
        raise InvalidArgument("the client disconnected before sending the whole body") from None
    if not body.strip():
        if body_field.has_default:
            return
        raise InvalidArgument("a request body is required: send one JSON object")
    media_type = _media_type(connection.headers.get("content-type"))
    if media_type != JSON_MEDIA_TYPE:
        shown = media_type[:60] or "none"
        raise UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: {JSON_MEDIA_TYPE}' (got {shown})"
        )
    decode_body(body, body_field.annotation)
