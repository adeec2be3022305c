"""A swarm's limits: its overrides of ``[limits]`` (admin: the router's guard).

The logic — validation, ceilings, persistence, the admin-write lock — is catalog/limits.py's;
the data plane applies what is saved on the next request (flight_server/admission.py).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Router, delete, get, put
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.params import Body, FromPath

from catalog import Catalog, Principal
from catalog.limits import SwarmLimitsBody, SwarmLimitsOut
from control_plane.context import ADMIN, audited


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """msgspec's JSON schema with its ``$defs`` references written in place (the body's
    schema in OpenAPI, where those references would not resolve)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _body_schema() -> dict[str, Any]:
    schema = msgspec.json.schema(SwarmLimitsBody)
    inlined = _inline(schema, schema.get("$defs", {}))
    assert isinstance(inlined, dict)
    return inlined


#: Declared untyped so that a wrong type is the catalog's 422 with its sentence (as for a
#: budget), documented with the Struct's own schema.
LimitsBody = Annotated[
    dict[str, Any],
    Body(
        media_type=RequestEncodingType.JSON,
        title="SwarmLimitsBody",
        schema_extra=_body_schema(),
    ),
]


@get(
    "/v1/swarms/{name:str}/limits",
    sync_to_thread=True,
    tags=["swarms"],
    summary="A swarm's limits: its overrides of [limits] and what applies with them",
)
def get_limits(name: FromPath[str], catalog: NamedDependency[Catalog]) -> SwarmLimitsOut:
    return catalog.limits.get(name)


@put(
    "/v1/swarms/{name:str}/limits",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Replace a swarm's limits (proto_docs/limits.md, Per-swarm limits)",
    description=(
        'Body: {"max_rows", "query_timeout_seconds", "max_concurrent", "calls_per_minute"} for the '
        'swarm and "per_agent": {same keys} for each of its agents; an absent key is the default '
        "(per_agent: the swarm's, then [limits]). Whole numbers >= 1 (the timeout: seconds > 0); "
        "max_rows and the timeout at most [limits] max_rows_ceiling and query_timeout_ceiling_seconds, "
        "concurrency at most the global bounds (422 otherwise, nothing saved). Applies to the next request."
    ),
)
def put_limits(
    request: Request[Principal, Any, Any],
    name: FromPath[str],
    data: LimitsBody,
    catalog: NamedDependency[Catalog],
) -> SwarmLimitsOut:
    with audited(request, "limits.put", name):
        return catalog.limits.put(name, data)


@delete(
    "/v1/swarms/{name:str}/limits",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Clear a swarm's limits: [limits] applies to it again",
    status_code=200,
)
def delete_limits(
    request: Request[Principal, Any, Any],
    name: FromPath[str],
    catalog: NamedDependency[Catalog],
) -> SwarmLimitsOut:
    with audited(request, "limits.delete", name):
        return catalog.limits.clear(name)


ROUTER = Router("/", guards=[ADMIN], route_handlers=[get_limits, put_limits, delete_limits])
