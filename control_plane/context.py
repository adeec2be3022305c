"""Per-request context: who may call a route, the authenticated principal, auditing helpers.

Who may call a route is declared once, on the router (or, for ``/metrics``, the handler)
that holds it: one of the :class:`Access` guards below (``ADMIN``, ``TOKEN``, ``METRICS``); a
route without one is public. Guards run before anything of the request is read, so a bad
token is always a 401 (and audited), never a 400; the guard verifies the token with the
catalog's TokenService and sets ``request.user`` to the :class:`~catalog.Principal`, which
handlers read. The query and body checks come after, in :func:`control_plane.gate.gate`,
and only a request that passes them marks its token used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler

from catalog import (
    Catalog,
    NotFound,
    PermissionDenied,
    Principal,
    QuiverError,
    StatusReport,
    SyncControl,
    Unauthenticated,
    Unavailable,
)
from catalog.identity import METRICS_ONLY
from catalog.running import RunningQueries
from catalog.tokens import bearer_token

_PRINCIPAL = "quiver.principal"  # scope state key of the verified Principal


def catalog_of(request: ASGIConnection[Any, Any, Any, Any]) -> Catalog:
    return request.app.state["catalog"]


def request_id(request: ASGIConnection[Any, Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


def client_of(request: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    return request.client.host if request.client else None


def authenticated(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller's principal, verified once per request and set as ``request.user``, not yet
    marked used. A failure is audited as ``auth.failed`` and counted, so fail2ban sees every
    refused token."""
    state = request.scope.setdefault("state", {})
    known = state.get(_PRINCIPAL)
    if isinstance(known, Principal):
        return known
    catalog = catalog_of(request)
    try:
        principal = catalog.tokens.check(bearer_token(request.headers.getall("authorization", [])))
    except Unauthenticated as e:
        catalog.metrics.auth_failures.labels("http").inc()
        catalog.audit.record(
            "auth.failed",
            outcome="denied",
            target=f"http:{request.scope.get('method')} {request.url.path}"[:300],
            client=client_of(request),
            request_id=request_id(request),
            detail=e.detail,
        )
        raise
    state[_PRINCIPAL] = principal
    state["principal"] = principal.label
    request.scope["user"] = principal
    return principal


def principal_of(request: ASGIConnection[Any, Any, Any, Any]) -> Principal | None:
    """The principal an :class:`Access` guard verified for this request, if any."""
    known = request.scope.get("state", {}).get(_PRINCIPAL)
    return known if isinstance(known, Principal) else None


@dataclass(frozen=True)
class Access:
    """A route guard: who may call the routes of a router (proto_docs/control_plane.md,
    "Who may call what"). It authenticates (401) and then asks ``refusal`` whether this
    principal may use the route (403 with that sentence)."""

    name: str
    refusal: Callable[[Principal], str | None]
    # Whether the route takes no token at all when the catalog's config says so.
    public_when: Callable[[Catalog], bool] = lambda _catalog: False

    def __call__(self, connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if self.public_when(catalog_of(connection)):
            return
        principal = authenticated(connection)
        why = self.refusal(principal)
        if why is not None:
            raise PermissionDenied(why)

    @staticmethod
    def of(handler: BaseRouteHandler) -> Access | None:
        """The access guard a (registered) handler is under, or None for a public route."""
        found = [g for layer in handler.ownership_layers for g in layer.guards or [] if isinstance(g, Access)]
        return found[-1] if found else None


def _admin_only(principal: Principal) -> str | None:
    if principal.is_admin:
        return None
    return f"this route needs an admin token; yours is a token of kind {principal.kind!r}"


def _any_but_metrics(principal: Principal) -> str | None:
    return METRICS_ONLY if principal.is_metrics else None


def _metrics_reader(principal: Principal) -> str | None:
    if principal.is_admin or principal.is_metrics:
        return None
    return f"GET /metrics needs an admin or a metrics token; yours is a token of kind {principal.kind!r}"


def _agents_only(principal: Principal) -> str | None:
    if principal.kind in ("agent", "swarm"):
        return None
    return (
        f"this route runs agent SQL and needs an agent or swarm token; yours is a token of kind "
        f"{principal.kind!r} (admins read data over Arrow Flight)"
    )


ADMIN = Access("admin", _admin_only)
"""Admin tokens only."""
TOKEN = Access("token", _any_but_metrics)
"""Any admin, swarm or agent token (the handler decides further, e.g. who may mint what)."""
AGENT = Access("agent", _agents_only)
"""Agent and swarm tokens: the routes that run agent SQL under a swarm's allowlist."""
METRICS = Access("metrics", _metrics_reader, public_when=lambda catalog: catalog.config.server.public_metrics)
"""An admin or a metrics token; no token at all with ``[server] public_metrics``."""


def provide_catalog(request: Request[Any, Any, Any]) -> Catalog:
    return catalog_of(request)


def provide_report(request: Request[Any, Any, Any]) -> StatusReport:
    """The process's status and health, handed to :func:`control_plane.create_app`."""
    return request.app.state["report"]


def provide_sync(request: Request[Any, Any, Any]) -> SyncControl | None:
    """The sync worker, None when this process runs none (see :func:`require_sync`)."""
    return request.app.state["sync"]


def provide_running(request: Request[Any, Any, Any]) -> RunningQueries | None:
    """The data plane's running queries, None when this app was built without one."""
    return request.app.state["running"]


def require_running(running: RunningQueries | None) -> RunningQueries:
    if running is None:
        raise Unavailable("the data plane is not running in this process: no running queries to list")
    return running


def require_sync(sync: SyncControl | None) -> SyncControl:
    """The sync worker, or NOT_FOUND saying how to configure one. Called inside the
    handler (not by the dependency), so a refused trigger is audited like any other."""
    if sync is None:
        raise NotFound("sync is not configured: add [snowflake] and [[sync.tables]] to quiver.toml")
    return sync


# What handlers receive by name besides the request and the body (never a query parameter).
DEPENDENCIES = {
    "catalog": Provide(provide_catalog, sync_to_thread=False),
    "report": Provide(provide_report, sync_to_thread=False),
    "sync": Provide(provide_sync, sync_to_thread=False),
    "running_queries": Provide(provide_running, sync_to_thread=False),
}


@contextmanager
def audited(
    request: Request[Principal, Any, Any], action: str, target: str | None, *, success: bool = True
) -> Iterator[None]:
    """Record a mutation by ``request.user`` in the audit log with its outcome, whether it
    succeeds or not. ``success=False`` records only a refusal or failure: for writes whose
    component audits what it committed itself (the artefact store does, for every listener),
    so that each write has one record."""
    catalog = catalog_of(request)
    fields = {
        "actor": request.user.label,
        "target": target,
        "client": client_of(request),
        "request_id": request_id(request),
    }
    try:
        yield
    except QuiverError as e:
        catalog.audit.record(action, outcome=e.code.lower(), detail=e.detail, **fields)
        raise
    except Exception:
        catalog.audit.record(action, outcome="error", **fields)
        raise
    if success:
        catalog.audit.record(action, outcome="ok", **fields)
