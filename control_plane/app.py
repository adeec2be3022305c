"""The Litestar application of the control plane."""

from __future__ import annotations

import time
import uuid

import structlog
from litestar import Litestar
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from catalog import VERSION, Catalog
from control_plane.context import DEPENDENCIES
from control_plane.errors import EXCEPTION_HANDLERS
from control_plane.routes import admin, backup, public, swarms, tokens

log = structlog.get_logger("control_plane")

MAX_JSON_BODY = 1 << 20


def request_context(app: ASGIApp) -> ASGIApp:
    """Request id, timing, one structlog event and metrics per request."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
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
        finally:
            seconds = time.perf_counter() - started
            catalog: Catalog = scope["app"].state["catalog"]  # type: ignore[index]
            handler = scope.get("route_handler")  # type: ignore[typeddict-item]
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


def create_app(catalog: Catalog) -> Litestar:
    app = Litestar(
        route_handlers=[*public.ROUTES, *swarms.ROUTES, *tokens.ROUTES, *admin.ROUTES, *backup.ROUTES],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[request_context],
        request_max_body_size=MAX_JSON_BODY,
        openapi_config=OpenAPIConfig(
            title="Quiver control plane",
            version=VERSION,
            description="Admin API: swarms, tokens, allowlists, tables, status, audit, sync.",
            components=Components(
                security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
            ),
            security=[{"bearer": []}],
        ),
        debug=False,
    )
    app.state["catalog"] = catalog
    return app
