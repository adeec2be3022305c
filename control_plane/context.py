"""Per-request context: request id, the authenticated principal, and auditing helpers.

Authentication is a dependency (``principal`` / ``admin``) so that a handler states in its
signature who may call it; the decision itself is made by the catalog's TokenService. The
app-wide guard in :mod:`control_plane.gate` reads those signatures and authenticates before
the body is read, so a bad token is always a 401 (and audited), never a 400.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import Provide

from catalog import Catalog, PermissionDenied, Principal, QuiverError, Unauthenticated

_PRINCIPAL = "quiver.principal"  # scope state key of the verified Principal

ADMIN_UNLESS_PUBLIC_METRICS = "admin-unless-public-metrics"
"""``opt={"auth": …}`` of a route that needs an admin token unless ``[server] public_metrics``."""


def catalog_of(request: ASGIConnection[Any, Any, Any, Any]) -> Catalog:
    return request.app.state["catalog"]  # type: ignore[no-any-return]


def request_id(request: ASGIConnection[Any, Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


def client_of(request: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    return request.client.host if request.client else None


def authenticated(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller's principal, verified once per request (the gate does it before the body
    is read; the ``principal``/``admin`` dependencies then reuse it), not yet marked used. A
    failure is audited as ``auth.failed`` and counted, so fail2ban sees every refused token."""
    state = request.scope.setdefault("state", {})  # type: ignore[typeddict-item]
    known = state.get(_PRINCIPAL)
    if isinstance(known, Principal):
        return known
    catalog = catalog_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    try:
        if not header:
            raise Unauthenticated("missing token: send the header 'authorization: Bearer <token>'")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization header: use 'Bearer <token>'")
        principal = catalog.tokens.check(token.strip())
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
    return principal


def admin_of(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The caller's principal if it is an admin's (403 otherwise), not yet marked used."""
    principal = authenticated(request)
    if not principal.is_admin:
        raise PermissionDenied(
            f"this route needs an admin token; yours is a token of kind {principal.kind!r}"
        )
    return principal


def authenticate(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The ``principal`` dependency. Dependencies resolve after the body and the query are
    accepted, so only a request that reaches its handler marks the token used: a refused
    request never updates ``last_used_at``."""
    principal = authenticated(request)
    catalog_of(request).tokens.record_use(principal)
    return principal


def require_admin(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The ``admin`` dependency: as :func:`authenticate`, for admin tokens only."""
    principal = admin_of(request)
    catalog_of(request).tokens.record_use(principal)
    return principal


def provide_catalog(request: Request[Any, Any, Any]) -> Catalog:
    return catalog_of(request)


DEPENDENCIES = {
    "principal": Provide(authenticate, sync_to_thread=False),
    "admin": Provide(require_admin, sync_to_thread=False),
    "catalog": Provide(provide_catalog, sync_to_thread=False),
}


@contextmanager
def audited(
    request: Request[Any, Any, Any], actor: Principal, action: str, target: str | None
) -> Iterator[None]:
    """Record a mutation in the audit log with its outcome, whether it succeeds or not."""
    catalog = catalog_of(request)
    fields = {
        "actor": actor.label,
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
    catalog.audit.record(action, outcome="ok", **fields)
