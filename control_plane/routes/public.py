"""Public routes: health, JWKS; and metrics, for an admin or a metrics token (or anyone
with ``[server] public_metrics``), the ``METRICS`` guard on its handler."""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Response, Router, get
from litestar.di import NamedDependency

from catalog import Catalog, StatusReport
from catalog.status import Health
from control_plane.context import METRICS


@get("/healthz", sync_to_thread=True, tags=["health"], summary="200 only when both listeners are up")
def healthz(report: NamedDependency[StatusReport]) -> Response[Health]:
    health = report.health()
    return Response(health, status_code=200 if health.status == "ok" else 503)


@get(
    "/.well-known/jwks.json",
    sync_to_thread=False,
    tags=["tokens"],
    summary="Public keys that verify Quiver tokens",
)
def jwks(catalog: NamedDependency[Catalog]) -> dict[str, Any]:
    return catalog.tokens.jwks


@get(
    "/metrics",
    sync_to_thread=True,
    tags=["health"],
    summary="Prometheus metrics",
    media_type=MediaType.TEXT,
    guards=[METRICS],
)
def metrics(catalog: NamedDependency[Catalog]) -> Response[bytes]:
    catalog.core_status()  # refreshes the uptime and database size gauges
    return Response(catalog.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


ROUTER = Router("/", route_handlers=[healthz, jwks, metrics])
