"""The Litestar application of the control plane."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

import structlog
from litestar import Litestar, Router
from litestar.handlers import HTTPRouteHandler
from litestar.handlers.asgi_handlers import ASGIRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from catalog import VERSION, Catalog, StatusReport, SyncControl
from catalog.running import RunningQueries
from catalog.status import Health
from control_plane.api_docs import render_plugins
from control_plane.context import DEPENDENCIES, Access
from control_plane.errors import EXCEPTION_HANDLERS, is_aborted
from control_plane.gate import MAX_JSON_BODY, gate
from control_plane.models import ErrorBody
from control_plane.routes import admin, artefacts, backup, exports, limits, public, query, swarms, tokens

log = structlog.get_logger("control_plane")

# Who may call a route is its router's guard (control_plane.context.Access): one place per
# decision, outside the handlers.
ROUTERS: list[Router] = [
    public.ROUTER,
    swarms.ROUTER,
    limits.ROUTER,
    tokens.ROUTER,
    admin.ROUTER,
    backup.ROUTER,
    artefacts.ROUTER,
    query.ROUTER,
    exports.ROUTER,
]

_WHY = {
    400: "Invalid request: a malformed or wrongly typed body, an unknown field, a bad query parameter",
    401: "No token, a malformed header, or a bad, expired or revoked token (checked before the body)",
    403: "The token is valid but may not do this",
    404: "No such object",
    406: "None of the formats the route sends is acceptable (Accept)",
    409: "Conflicts with the current state (exists already, or a concurrent change; retry)",
    413: "The request body is larger than the limit (an upload: [artefacts] max_upload_bytes or the swarm's quota)",
    415: "The body is not sent as 'Content-Type: application/json' (an upload: 'multipart/form-data')",
    416: "The range lies past the end of the content (Content-Range: bytes */size)",
    422: "Well-formed but out of range (e.g. ttl_seconds above the configured maximum) or invalid in meaning (an allowlist rule, attributes, limits)",
    429: "Over a limit: too many concurrent queries (yours, your swarm's, or the server's after a wait), a calls-per-minute rate or a usage budget",
    504: "The query ran past the query timeout ([limits] query_timeout_seconds)",
    503: "Not ready: a listener is down",
}

# Statuses a route can answer beyond what its signature implies (see document_errors).
_DOMAIN_STATUSES: dict[str, set[int]] = {
    "create_swarm": {409, 422, 503},  # 503: a rule on a live table Snowflake cannot describe now
    "delete_swarm": {409},
    "put_allowlist": {409, 422, 503},
    "put_attributes": {409, 422},
    "put_budget": {404, 409, 422},
    "get_usage": {404},
    "get_limits": {404},
    "put_limits": {404, 409, 422},
    "delete_limits": {404, 409},
    "create_token": {403, 404, 409, 422},
    "refresh_token": {403, 409, 422},
    "revoke_token": {409},
    "revoke_tokens": {404, 409},
    "sync_status": {404},
    "put_description": {404, 409},
    "metrics": {401, 403},
    # Artefacts (proto_docs/artefacts.md, "Over HTTP"): the upload reads its own body (no
    # ``data`` model), so its body statuses are listed here; 403 for a reader who is not the
    # owner, 404 for an unknown swarm, 413 for the size cap and the swarm's quota.
    "upload_artefact": {413, 415, 422},
    "artefact_content": {416},
    "share_artefact": {403},
    "unshare_artefact": {403},
    "extend_artefact": {403, 422},
    "delete_artefact": {403},
    "run_query": {406, 429, 503, 504},
    "refresh_artefact": {404, 413, 422, 429, 503, 504},
}


def statuses_of(handler: HTTPRouteHandler) -> set[int]:
    """Every error status ``handler`` can answer: 401 and 403 from its access guard, the
    gate's checks from what its signature asks for (control_plane.gate), plus the domain
    conflicts listed in ``_DOMAIN_STATUSES``."""
    parameters = handler.parsed_fn_signature.parameters
    statuses = set(_DOMAIN_STATUSES.get(handler.handler_name, set()))
    if Access.of(handler) is not None:
        statuses |= {401, 403}
    if "data" in parameters:
        statuses |= {413, 415}
    params = set(parameters) - {"request", "data", *DEPENDENCIES}
    if any("{" + p + ":" in path for p in params for path in handler.paths):
        statuses.add(404)
    statuses.add(400)  # any route: an unknown or malformed query parameter (control_plane.gate)
    return statuses


def document_errors(app: Litestar) -> None:
    """Declare on each registered route the error statuses it answers, each with the one
    error body (the ``ErrorBody`` component): the OpenAPI schema then says what a client
    really gets, and schemathesis holds the server to it (tests/test_fuzz_http.py). Runs on
    the registered handlers, whose guards include their routers' (the schema is built on its
    first request)."""
    for handler in _handlers(app):
        extra = dict(handler.responses or {})
        if handler.handler_name == "healthz":
            extra[503] = ResponseSpec(data_container=Health, generate_examples=False, description=_WHY[503])
        for status in sorted(statuses_of(handler)):
            extra.setdefault(
                status,
                ResponseSpec(data_container=ErrorBody, generate_examples=False, description=_WHY[status]),
            )
        handler.responses = extra
        if Access.of(handler) is not None:
            handler.security = [{"bearer": []}]  # public routes (health, JWKS) declare none


def _handlers(app: Litestar) -> list[HTTPRouteHandler]:
    """The app's own registered route handlers (not the OpenAPI schema's)."""
    ours = {
        h.handler_name for r in ROUTERS for route in r.routes for h in getattr(route, "route_handlers", [])
    }
    return [
        h
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for h in route.route_handlers
        if h.handler_name in ours
    ]


def request_context(app: ASGIApp) -> ASGIApp:
    """Request id, timing, one structlog event and metrics per request."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        except Exception as e:
            if not is_aborted(e):
                raise
            # A streamed body cut on purpose (already logged): returning without the last
            # chunk makes the ASGI server drop the connection; no traceback for it.
        finally:
            seconds = time.perf_counter() - started
            catalog: Catalog = scope["app"].state["catalog"]
            handler = scope.get("route_handler")
            route = getattr(handler, "handler_name", None) or "unmatched"
            catalog.metrics.requests.labels("http", route, str(status)).inc()
            catalog.metrics.request_seconds.labels("http", route).observe(seconds)
            log.info(
                "http.request",
                method=scope.get("method"),
                path=scope.get("path"),
                principal=state.get("principal"),
                status=status,
                ms=round(seconds * 1000, 3),
                request_id=rid,
            )

    return middleware


def create_app(
    catalog: Catalog,
    *,
    report: StatusReport,
    sync: SyncControl | None = None,
    running: RunningQueries | None = None,
    mounts: Sequence[ASGIRouteHandler] = (),
    lifespans: Sequence[Callable[[Litestar], AbstractAsyncContextManager[None]]] = (),
) -> Litestar:
    """The control plane over ``catalog``. ``report`` answers GET /v1/status and /healthz;
    ``sync`` is the sync worker of GET /v1/sync and POST /v1/sync/{table}/run (None: those
    answer 404); ``running`` lists and cancels the data plane's running queries (GET
    /v1/queries?running=true, DELETE /v1/queries/{id}; None: UNAVAILABLE). ``mounts`` are ASGI apps the process wiring adds beside the routes (``/mcp``,
    mcp_server/http.py), each checking its own requests, and ``lifespans`` what they need
    running while the app serves (uvicorn runs the lifespan). The process wiring builds all of
    them from the components it started (quiver/runtime.py): the control plane never reaches
    into another component."""
    docs_plugins, docs_assets = render_plugins()
    app = Litestar(
        route_handlers=[*ROUTERS, *docs_assets, *mounts],
        lifespan=list(lifespans),
        before_request=gate,
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=MAX_JSON_BODY,
        openapi_config=OpenAPIConfig(
            title="Quiver control plane",
            version=VERSION,
            description="Admin API: swarms, tokens, allowlists, tables, status, audit, sync; artefacts for agents.",
            render_plugins=docs_plugins,
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
            ),
        ),
        debug=False,
    )
    app.state["catalog"] = catalog
    app.state["report"] = report
    app.state["sync"] = sync
    app.state["running"] = running
    document_errors(app)
    # Outside routing, not as route middleware: 404s and 405s get a request id, a log line
    # and a metric like every other answer.
    app.asgi_handler = request_context(app.asgi_handler)
    return app
