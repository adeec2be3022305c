"""Admin views: data tables, status, audit, sync (admin: the router's guard)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from litestar import Request, Router, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter

from catalog import Catalog, InvalidArgument, NotFound, Principal, StatusReport, SyncControl
from catalog.errors import bounded
from catalog.policy import pattern_matches
from catalog.query_log import QueryPage
from catalog.running import QueryCancelled, RunningQueries, RunningQueryList
from catalog.status import Status, SyncStatus, SyncTriggered
from control_plane.context import ADMIN, audited, require_running, require_sync
from control_plane.models import AuditList, DescriptionBody, DescriptionOut, TableList, TableOut


@get(
    "/v1/tables",
    sync_to_thread=True,
    tags=["tables"],
    summary="All data tables: rows, data version, which swarms may read them",
)
def list_tables(catalog: NamedDependency[Catalog]) -> TableList:
    swarms = catalog.swarms.all()
    out = []
    refs = catalog.tables.list_refs()
    texts = catalog.descriptions.of(refs)
    for info in catalog.tables.describe(refs):
        readers = [s.name for s in swarms if any(pattern_matches(p, info.ref) for p in s.tables)]
        text = texts[info.ref.key()]
        out.append(
            TableOut(
                table=info.ref.qualified,
                rows=info.rows,
                data_version=info.data_version,
                swarms=readers,
                description=text.table,
                columns=text.columns,
                live=info.live,
            )
        )
    return TableList(tables=out)


@put(
    "/v1/tables/{table:str}/description",
    sync_to_thread=True,
    tags=["tables"],
    summary="Set a table's and its columns' descriptions for agents (stored as DuckDB comments)",
)
def put_description(
    request: Request[Principal, Any, Any],
    table: FromPath[str],
    data: JSONBody[DescriptionBody],
    catalog: NamedDependency[Catalog],
) -> DescriptionOut:
    with audited(request, "table.describe", table[:200]):
        schema, dot, name = table.partition(".")
        ref = catalog.tables.resolve(schema, name) if dot else None
        if ref is None:
            raise NotFound(
                f"no data table {bounded(table, 120)!r}: name one of GET /v1/tables as 'schema.table'"
            )
        if catalog.tables.is_live(ref):
            raise InvalidArgument(
                f"{ref.qualified} is a live table (queried in Snowflake): descriptions of live tables "
                "are not stored yet (proto_docs/federation.md)"
            )
        text = catalog.descriptions.set(ref, data.table, data.columns)
    return DescriptionOut(table=ref.qualified, description=text.table, columns=text.columns)


@get(
    "/v1/status",
    sync_to_thread=True,
    tags=["status"],
    summary="Version, uptime, listeners, database size, tables, sync, cache, active queries",
)
def status(report: NamedDependency[StatusReport]) -> Status:
    return report.status()


@get("/v1/audit", sync_to_thread=True, tags=["audit"], summary="Audit log, newest first")
def audit(
    catalog: NamedDependency[Catalog],
    since: FromQuery[datetime | None] = None,
    actor: FromQuery[str | None] = None,
    action: FromQuery[str | None] = None,
    outcome: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 100,
) -> AuditList:
    events = catalog.audit.query(since=since, actor=actor, action=action, outcome=outcome, limit=limit)
    return AuditList(events=events)


@get(
    "/v1/queries",
    sync_to_thread=True,
    tags=["audit"],
    summary="Query log: every data-plane request, newest first, a page at a time (proto_docs/governance.md)",
)
def queries(  # noqa: PLR0913  one query parameter per filter
    catalog: NamedDependency[Catalog],
    running_queries: NamedDependency[RunningQueries | None],
    since: FromQuery[datetime | None] = None,
    until: FromQuery[datetime | None] = None,
    swarm: Annotated[str | None, QueryParameter(max_length=200)] = None,
    agent: Annotated[str | None, QueryParameter(max_length=200)] = None,
    table: Annotated[str | None, QueryParameter(max_length=400)] = None,
    outcome: FromQuery[Literal["ok", "refused", "failed"] | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, QueryParameter(ge=1)] = None,
    running: FromQuery[bool] = False,
) -> QueryPage | RunningQueryList:
    if running:
        # The queries running now are not the log: its filters would silently not apply.
        given = [
            n
            for n, v in (
                ("since", since),
                ("until", until),
                ("swarm", swarm),
                ("agent", agent),
                ("table", table),
                ("outcome", outcome),
                ("cursor", cursor),
            )
            if v is not None
        ]
        if given or limit != 100:
            names = ", ".join(given + (["limit"] if limit != 100 else []))
            raise InvalidArgument(f"running=true lists every running query and takes no filter: drop {names}")
        return RunningQueryList(running=True, queries=require_running(running_queries).list())
    return catalog.query_log.query(
        since=since,
        until=until,
        swarm=swarm,
        agent=agent,
        table=table,
        outcome=outcome,
        limit=limit,
        cursor=cursor,
    )


@delete(
    "/v1/queries/{query_id:str}",
    sync_to_thread=True,
    tags=["audit"],
    status_code=200,
    summary="Cancel a running query, stream or async query of any principal (its id from GET /v1/queries?running=true)",
)
def cancel_query(
    request: Request[Principal, Any, Any],
    query_id: FromPath[str],
    running_queries: NamedDependency[RunningQueries | None],
) -> QueryCancelled:
    with audited(request, "query.cancel", bounded(query_id, 80)):
        stopped = require_running(running_queries).cancel(query_id)
        if stopped is None:
            raise NotFound(
                f"no running query {bounded(query_id, 80)!r}: it finished, was cancelled, or never ran "
                "(GET /v1/queries?running=true lists what runs)"
            )
    return QueryCancelled(id=query_id, stopped=stopped)


@get("/v1/sync", sync_to_thread=True, tags=["sync"], summary="State of every replicated table")
def sync_status(sync: NamedDependency[SyncControl | None]) -> SyncStatus:
    return require_sync(sync).status()


@post(
    "/v1/sync/{table:str}/run",
    sync_to_thread=True,
    tags=["sync"],
    status_code=202,
    summary="Queue a sync run of one table (202 at once; a run in progress queues one follow-up)",
)
def sync_run(
    request: Request[Principal, Any, Any],
    table: FromPath[str],
    sync: NamedDependency[SyncControl | None],
    full: FromQuery[bool] = False,
) -> SyncTriggered:
    with audited(request, "sync.run", table):
        return require_sync(sync).trigger(table, full=full)


ROUTER = Router(
    "/",
    guards=[ADMIN],
    route_handlers=[
        list_tables,
        put_description,
        status,
        audit,
        queries,
        cancel_query,
        sync_status,
        sync_run,
    ],
)
