"""``/mcp`` on the control plane's HTTP listener: the SDK's streamable HTTP transport, with
Quiver's checks in front of it (proto_docs/mcp.md).

Each request, in this order, before the SDK reads a byte of the body:

1. **Host and Origin** against ``[mcp] allowed_hosts`` / ``allowed_origins`` (the SDK's
   DNS-rebinding protection: 421 for a host, 403 for an origin not allowed). By default the
   listener's own host (and ``advertise_host``) and localhost, on any port.
2. **The token**: ``authorization: Bearer`` verified by the catalog's token service on every
   request, so a revoked token is refused on its next call; missing or bad → 401 with
   ``WWW-Authenticate: Bearer`` (and an ``auth.failed`` audit record, as every listener
   does); an admin or metrics token → 403: tools run agent SQL under a swarm's allowlist.
3. The SDK's session manager, in **stateless** mode (POST only: any other method is 405 with
   ``Allow: POST``, before the token is read — there is no event stream and no session): the stateless protocol revision and the
   earlier handshake-based clients are both served, no session state is kept between
   requests, and the verified caller travels to the tool handlers in a context variable.

The session manager's task group must run for the app's lifetime: :meth:`McpHttp.lifespan`
is entered by the Litestar app's lifespan (quiver/runtime.py runs uvicorn with the lifespan
on); without it every request fails.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog
from litestar import Litestar
from litestar.handlers import asgi
from litestar.handlers.asgi_handlers import ASGIRouteHandler
from litestar.types import Receive, Scope, Send
from mcp.server.context import ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST
from starlette.requests import Request

from catalog import Catalog, Unauthenticated
from catalog.config import McpConfig
from catalog.errors import bounded
from catalog.query_port import QueryRunner
from catalog.tokens import bearer_token
from mcp_server.backend import LocalBackend
from mcp_server.server import Caller, CallLimiter, build_server
from mcp_server.tools import ToolBox

log = structlog.get_logger("mcp")

PATH = "/mcp"

_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("quiver_mcp_caller", default=None)
_BASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("quiver_mcp_base", default=None)

_WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 - listener addresses, not binds


def default_hosts(listen_host: str, advertise_host: str | None) -> list[str]:
    """The Host values /mcp answers by default: the listener's own name (or the advertised
    one), and localhost — each on any port."""
    names = ["localhost", "127.0.0.1", "[::1]"]
    for name in (listen_host, advertise_host):
        if name and name not in _WILDCARDS:
            names.append(f"[{name}]" if ":" in name and not name.startswith("[") else name)
    out: list[str] = []
    for name in dict.fromkeys(names):
        out += [name, f"{name}:*"]
    return out


def security_settings(
    config: McpConfig, listen_host: str, advertise_host: str | None
) -> TransportSecuritySettings:
    hosts = list(config.allowed_hosts) or default_hosts(listen_host, advertise_host)
    origins = list(config.allowed_origins)
    if not origins:
        for host in hosts:
            origins += [f"http://{host}", f"https://{host}"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


async def _answer(
    send: Send, status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})  # type: ignore[arg-type]


def _caller_of(ctx: ServerRequestContext[Any, Any]) -> Caller:
    caller = _CALLER.get()
    if caller is None:  # only a request that passed the token check reaches the SDK
        raise MCPError(INVALID_REQUEST, "no verified caller for this request")
    return caller


class McpHttp:
    """The ``/mcp`` endpoint of one process: the tools on ``catalog`` and the data plane's
    ``runner``, checked as the module docstring says."""

    def __init__(
        self,
        catalog: Catalog,
        runner: QueryRunner,
        config: McpConfig,
        *,
        listen_host: str,
        advertise_host: str | None = None,
    ) -> None:
        self._catalog = catalog
        self._runner = runner
        self.toolbox = ToolBox(config, download_base=_BASE.get)
        self.server = build_server(self.toolbox, _caller_of, CallLimiter(config), catalog.audit)
        self.security = security_settings(config, listen_host, advertise_host)
        self._checks = TransportSecurityMiddleware(self.security)
        self.manager = StreamableHTTPSessionManager(
            self.server, stateless=True, json_response=True, security_settings=self.security
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        async with self.manager.run():
            yield

    def route_handler(self) -> ASGIRouteHandler:
        @asgi(PATH, is_mount=True, copy_scope=True)
        async def mcp_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            await self(scope, receive, send)

        return mcp_endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)  # type: ignore[arg-type]
        refused = await self._checks.validate_request(request, is_post=False)
        if refused is not None:  # the SDK's check; answered in the control plane's error body
            if refused.status_code == 421:
                host = bounded(request.headers.get("host", ""), 100)
                detail = f"Host {host!r} is not one of [mcp] allowed_hosts; an admin may add it"
                await _answer(send, 421, "MISDIRECTED_REQUEST", detail)
            else:
                origin = bounded(request.headers.get("origin", ""), 100)
                detail = f"Origin {origin!r} is not one of [mcp] allowed_origins; an admin may add it"
                await _answer(send, refused.status_code, "PERMISSION_DENIED", detail)
            return
        if scope.get("path", "") not in (PATH, PATH + "/", "/", ""):  # a mount also matches /mcp/…
            await _answer(send, 404, "NOT_FOUND", f"no such route; the MCP endpoint is {PATH}")
            return
        if scope.get("method") != "POST":
            # Stateless: no standalone event stream (GET), no session to end (DELETE). Left to
            # the SDK, a GET would hold its connection open for as long as the client likes.
            await _answer(
                send,
                405,
                "METHOD_NOT_ALLOWED",
                "/mcp takes POST only (stateless streamable HTTP: no event stream, no session)",
                {"allow": "POST"},
            )
            return
        try:
            principal = self._authenticate(scope, request)
        except Unauthenticated as e:
            await _answer(
                send,
                401,
                e.code,
                e.detail,
                {"www-authenticate": 'Bearer realm="quiver", error="invalid_token"'},
            )
            return
        if principal.kind not in ("agent", "swarm"):
            await _answer(
                send,
                403,
                "PERMISSION_DENIED",
                f"MCP tools run agent SQL and need an agent or swarm token; yours is a token of kind "
                f"{principal.kind!r}",
            )
            return
        self._catalog.tokens.record_use(principal)
        state = scope.setdefault("state", {})
        state["principal"] = principal.label
        backend = LocalBackend(self._catalog, self._runner, principal)
        caller_token = _CALLER.set(Caller(principal.label, principal.subject, backend))
        base_token = _BASE.set(f"{request.url.scheme}://{request.headers.get('host', '')}")
        try:
            await self.manager.handle_request(scope, receive, send)  # type: ignore[arg-type]
        finally:
            _CALLER.reset(caller_token)
            _BASE.reset(base_token)

    def _authenticate(self, scope: Scope, request: Request) -> Any:
        catalog = self._catalog
        try:
            return catalog.tokens.check(bearer_token(request.headers.getlist("authorization")))
        except Unauthenticated as e:
            catalog.metrics.auth_failures.labels("http").inc()
            catalog.audit.record(
                "auth.failed",
                outcome="denied",
                target=f"http:{scope.get('method')} {PATH}",
                client=request.client.host if request.client else None,
                request_id=str(scope.get("state", {}).get("request_id", "-")),
                detail=e.detail,
            )
            raise
