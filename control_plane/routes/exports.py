"""``POST /v1/artefacts/{id}/refresh``: re-run an exported artefact's query as its principal,
under that principal's current allowlist, into a new artefact linked to the old one
(catalog/exports.py; proto_docs/artefacts.md, "Provenance"). The artefact routes themselves
(list, get, content, share, extend) live in control_plane/routes/artefacts.py."""

from __future__ import annotations

from typing import Any

from litestar import Request, Router, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from catalog import Catalog, Principal
from catalog.errors import bounded
from catalog.exports import ExportInfo
from control_plane.context import TOKEN, audited
from control_plane.models import RefreshArtefact


@post(
    "/v1/artefacts/{artefact_id:str}/refresh",
    sync_to_thread=True,
    tags=["artefacts"],
    summary="Re-run an export as its principal under its current allowlist into a new, linked artefact",
)
def refresh_artefact(
    request: Request[Principal, Any, Any],
    artefact_id: FromPath[str],
    catalog: NamedDependency[Catalog],
    data: JSONBody[RefreshArtefact | None] = None,
) -> ExportInfo:
    with audited(request, "artefact.refresh", bounded(artefact_id, 80)):
        return catalog.exports.refresh(
            request.user, artefact_id, ttl_seconds=data.ttl_seconds if data else None, via="http"
        )


ROUTER = Router("/", route_handlers=[refresh_artefact], guards=[TOKEN])
