"""Per-request context: request id, the authenticated principal, and auditing helpers.

Authentication is a dependency (``principal`` / ``admin``) so that a handler states in its
signature who may call it; the decision itself is made by the catalog's TokenService.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from litestar import Request
from litestar.di import Provide

from catalog import Catalog, PermissionDenied, Principal, QuiverError, Unauthenticated


def catalog_of(request: Request[Any, Any, Any]) -> Catalog:
    return request.app.state["catalog"]  # type: ignore[no-any-return]


def request_id(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", "-"))


def client_of(request: Request[Any, Any, Any]) -> str | None:
    return request.client.host if request.client else None


def _authenticated(request: Request[Any, Any, Any]) -> Principal:
    """The verified principal, not yet marked used: a refused request never counts as use."""
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
            target=f"http:{request.method} {request.url.path}",
            client=client_of(request),
            request_id=request_id(request),
            detail=e.detail,
        )
        raise
    request.scope.setdefault("state", {})["principal"] = principal.label
    return principal


def authenticate(request: Request[Any, Any, Any]) -> Principal:
    principal = _authenticated(request)
    catalog_of(request).tokens.record_use(principal)
    return principal


def require_admin(request: Request[Any, Any, Any]) -> Principal:
    principal = _authenticated(request)
    if not principal.is_admin:
        raise PermissionDenied(f"this route needs an admin token; yours is a {principal.kind} token")
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
