"""Swarms and their table allowlists (admin: the router's guard)."""

from __future__ import annotations

from typing import Any

from litestar import Request, Router, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from catalog import Catalog, Principal
from catalog.budgets import Budget, UsageReport
from catalog.policy import allowlist_matches
from catalog.swarms import Committed, Swarm
from control_plane.context import ADMIN, audited
from control_plane.models import (
    Allowlist,
    AllowlistOut,
    Attributes,
    AttributesBody,
    CreateSwarm,
    SwarmList,
    SwarmView,
)


@post(
    "/v1/swarms",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Create a swarm (optionally with its allowlist)",
)
def create_swarm(
    request: Request[Principal, Any, Any],
    data: JSONBody[CreateSwarm],
    catalog: NamedDependency[Catalog],
) -> Swarm:
    with audited(request, "swarm.create", data.name):
        return catalog.swarms.create(data.name, data.description, data.tables)


@get("/v1/swarms", sync_to_thread=True, tags=["swarms"], summary="List swarms")
def list_swarms(catalog: NamedDependency[Catalog]) -> SwarmList:
    return SwarmList(swarms=catalog.swarms.all())


@get(
    "/v1/swarms/{name:str}",
    sync_to_thread=True,
    tags=["swarms"],
    summary="One swarm: its allowlist entries with their rules, its attributes and its budget",
)
def get_swarm(name: FromPath[str], catalog: NamedDependency[Catalog]) -> SwarmView:
    swarm = catalog.swarms.get(name)
    return SwarmView(
        name=swarm.name,
        description=swarm.description,
        created_at=swarm.created_at,
        tables=swarm.tables,
        entries=catalog.swarms.get_allowlist(name).entries(),
        attributes=catalog.swarms.get_attributes(name),
        budget=catalog.budgets.budget(name),
    )


@delete(
    "/v1/swarms/{name:str}",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Delete a swarm, its allowlist, and revoke all its tokens",
)
def delete_swarm(
    request: Request[Principal, Any, Any],
    name: FromPath[str],
    catalog: NamedDependency[Catalog],
) -> None:
    with audited(request, "swarm.delete", name):
        catalog.delete_swarm(name)


def _allowlist_out(catalog: Catalog, name: str, committed: Committed) -> AllowlistOut:
    """The allowlist with the tables it matches now and its warnings (catalog/policy.py)."""
    matching, warnings = allowlist_matches(committed.patterns, catalog.tables.list_refs())
    return AllowlistOut(
        swarm=name,
        tables=committed.patterns,
        matching=matching,
        warnings=warnings,
        entries=committed.entries(),
    )


@get(
    "/v1/swarms/{name:str}/allowlist",
    sync_to_thread=True,
    tags=["swarms"],
    summary="A swarm's allowlist",
)
def get_allowlist(name: FromPath[str], catalog: NamedDependency[Catalog]) -> AllowlistOut:
    return _allowlist_out(catalog, name, catalog.swarms.get_allowlist(name))


@put(
    "/v1/swarms/{name:str}/allowlist",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Replace a swarm's allowlist ('schema.table', 'schema.*' or rule objects)",
    description=(
        'Each entry is a string ("sales.orders", "sales.*") or an object {"table": "schema.table", '
        '"columns": [...] | "except_columns": [...], "row_filter": "<SQL predicate, :name parameters>", '
        '"mask": {"<column>": "hash" | "null" | "redact" | "last4"}} (proto_docs/governance.md, '
        '"Rules and attributes"). A bad rule is a 422 naming it; nothing is saved.'
    ),
)
def put_allowlist(
    request: Request[Principal, Any, Any],
    name: FromPath[str],
    data: JSONBody[Allowlist],
    catalog: NamedDependency[Catalog],
) -> AllowlistOut:
    with audited(request, "allowlist.put", name):
        committed = catalog.swarms.set_allowlist(name, data.tables)
    return _allowlist_out(catalog, name, committed)


@get(
    "/v1/swarms/{name:str}/attributes",
    sync_to_thread=True,
    tags=["swarms"],
    summary="A swarm's attributes (bound into its row filters as :name)",
)
def get_attributes(name: FromPath[str], catalog: NamedDependency[Catalog]) -> Attributes:
    return Attributes(swarm=name, attributes=catalog.swarms.get_attributes(name))


@put(
    "/v1/swarms/{name:str}/attributes",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Replace a swarm's attributes (proto_docs/governance.md, Rules and attributes)",
    description=(
        "Body: a flat JSON object of names (identifiers, at most 64 characters; not swarm or agent) "
        "to strings (at most 1,000 characters) or finite numbers, at most 64 of them; {} removes them "
        "all. Anything else is a 422; nothing is saved."
    ),
)
def put_attributes(
    request: Request[Principal, Any, Any],
    name: FromPath[str],
    data: JSONBody[AttributesBody],
    catalog: NamedDependency[Catalog],
) -> Attributes:
    with audited(request, "attributes.put", name):
        return Attributes(swarm=name, attributes=catalog.swarms.set_attributes(name, data))


@put(
    "/v1/swarms/{name:str}/budget",
    sync_to_thread=True,
    tags=["swarms"],
    summary="Replace a swarm's daily usage budget (proto_docs/governance.md, Budgets)",
    description=(
        'Body: {"queries_per_day", "rows_per_day", "bytes_per_day", "query_seconds_per_day"} for the '
        'swarm and "per_agent": {same keys} for each of its agents; an absent key is no limit. Whole '
        "numbers >= 0 only (422 otherwise, nothing saved)."
    ),
)
def put_budget(
    request: Request[Principal, Any, Any],
    name: FromPath[str],
    data: JSONBody[dict[str, Any]],
    catalog: NamedDependency[Catalog],
) -> Budget:
    with audited(request, "budget.put", name):
        return catalog.budgets.put(name, data)


@get(
    "/v1/swarms/{name:str}/usage",
    sync_to_thread=True,
    tags=["swarms"],
    summary="A swarm's usage today (UTC), in total and per agent, with its budget and reset time",
)
def get_usage(name: FromPath[str], catalog: NamedDependency[Catalog]) -> UsageReport:
    return catalog.budgets.report(name)


ROUTER = Router(
    "/",
    guards=[ADMIN],
    route_handlers=[
        create_swarm,
        list_swarms,
        get_swarm,
        delete_swarm,
        get_allowlist,
        put_allowlist,
        get_attributes,
        put_attributes,
        put_budget,
        get_usage,
    ],
)
