"""The Flight listener: Quiver's data plane (wire contract: proto_docs/).

Python decides, C++ moves the rows: every stream is a DuckDB Arrow ``RecordBatchReader``
handed to Flight, never a Python loop over batches or rows.

The pieces, each in its own module:

* :mod:`~flight_server.commands` — descriptors and action bodies → typed Structs (msgspec),
  with size checks;
* :mod:`~flight_server.planner` — commands → plans (:mod:`~flight_server.plans`): schema, row
  count, endpoints;
* :mod:`~flight_server.tickets` — opaque, expiring tickets bound to a principal;
* :mod:`~flight_server.streams` — DoGet: a plan's endpoint → a DuckDB stream;
* :mod:`~flight_server.middleware` — authentication and per-call bookkeeping of every RPC;
* :mod:`~flight_server.ready` — whole results read at GetFlightInfo, held for the first DoGet;
* :mod:`~flight_server.cache` — the result cache of identical queries;
* :mod:`~flight_server.table_cache` — scanned tables kept in memory as Arrow (hot tables);
* :mod:`~flight_server.versions` — the data versions every cache keys on, read cheaply;
* :mod:`~flight_server.admission` — the one gate for planning and streams: concurrency, timeout;
* :mod:`~flight_server.limits` — the query timeout's watchdog;
* :mod:`~flight_server.errors` — every failure → a FlightError with ``extra_info``;
* :mod:`~flight_server.profiles`, :mod:`~flight_server.results` — profiles and async queries;
* :mod:`~flight_server.truncation` — row caps and the metadata that reports a cut;
* :mod:`~flight_server.running` — running DoGet streams: CancelFlightInfo, clients that left;
* :mod:`~flight_server.runner` — the same query path for the other listeners and exports
  (``catalog.queries``, catalog/query_port.py);
* :mod:`~flight_server.flight_sql` — Flight SQL (protobuf ``Any`` commands from ADBC, JDBC,
  DBeaver) onto the same planner, tickets and streams;
* :mod:`quiver_client.wire` — the wire constants shared with the agent client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import pyarrow as pa
import pyarrow.flight as flight
import structlog

from catalog import Catalog, InvalidArgument, PermissionDenied, Principal, TableRef
from catalog.artefacts import ArtefactFilter
from catalog.descriptions import TableDescription
from catalog.errors import QuiverError, Unavailable, bounded
from catalog.policy import NOT_READABLE
from catalog.previews import preview
from catalog.running import RunningQueries, RunningQueryInfo
from catalog.sqlguard import SqlGuard
from catalog.status import AsyncQueriesStatus, CacheStatus, ProfilesStatus, QueriesStatus, QueryLimits
from flight_server import commands, inline
from flight_server.admission import Admission
from flight_server.cache import ResultCache
from flight_server.errors import (
    install_traceback_filter,
    map_exception,
    schema_call_error,
)
from flight_server.flight_sql import ACTIONS as FLIGHT_SQL_ACTIONS
from flight_server.flight_sql import FlightSql, is_flight_sql
from flight_server.flight_sql.wire import unwrap_ticket, wrap_ticket
from flight_server.limits import Watchdog
from flight_server.middleware import AuthMiddlewareFactory, CallState, QueryFacts
from flight_server.planner import Planner
from flight_server.plans import Plan, SqlPart
from flight_server.profiles import ProfileCache
from flight_server.results import ACTION_DESCRIPTIONS as QUERY_ACTIONS
from flight_server.results import PreparedTask, QueryManager
from flight_server.runner import SqlRunner
from flight_server.running import QueryRuns, RunningStreams
from flight_server.streams import Streamer, table_snapshot
from flight_server.table_cache import HOT_TABLES_FILE, Activity, TableCache, resolve_budget
from flight_server.tickets import TicketStore, flight_endpoint
from flight_server.uploads import save_table
from flight_server.versions import VersionWatch
from quiver_client.wire import decode_error

log = structlog.get_logger("flight_server")

T = TypeVar("T")


ACTIONS: dict[str, str] = {
    "whoami": "Who you are: {kind, swarm, agent, jti, expires_at, tables} as JSON. Body: none.",
    "refresh-token": (
        'A new token for the same identity and chain (new jti). Body (optional): {"ttl_seconds": N}; '
        "the expiry is clamped to the grant the chain's root was minted with (a refresh rotates, it "
        "never extends). Answers {token, jti, kind, swarm, agent, expires_at}; the old token stays "
        "valid until it expires, and revoking either revokes the chain."
    ),
    **QUERY_ACTIONS,
    "usage": (
        "Your swarm's usage budget and what it spent today (UTC): {swarm, day, resets_at, budget, "
        "usage, agents} (an agent token sees only its own entry under agents). Body: none."
    ),
    "my-queries": (
        "Your own last query-log records, newest first (proto_docs/governance.md). Body (optional): "
        '{"limit": N} (1 to 1000, default 50). Answers {"queries": [{occurred_at, kind, via, tables, '
        "sql, params, rows, bytes, ms, outcome, error_code, request_id, ...}]}."
    ),
    "export": (
        'Run a query into a file artefact. Body: {"query": "...", "params": [...]} or {"table": '
        '"schema.table"}, "format": "parquet" | "csv" | "ndjson" | "arrow" (default parquet), and '
        'optionally "name", "ttl_seconds", "max_rows", "tags", "description". Streams the result '
        '(guard, admission, timeout and row cap as a query); answers {"artefact", "download", '
        '"stale", "changed", "rows", "truncated", "max_rows"}; the artefact records its provenance. '
        'With "async": true it runs in the background: answers an id at once; query-status shows '
        'the rows and bytes written, then the answer under "export".'
    ),
    "list-artefacts": (
        'The artefacts you may see, oldest first, one page at a time. Body (optional): {"kind": '
        '"table" | "file", "tag": "...", "page_size": N (1 to 1000), "after": "<id>"}. Answers '
        '{"items": [artefact metadata], "next": "<id>" | null} (pass next as after).'
    ),
    "read-artefact": (
        'An artefact\'s metadata and its first rows (or, for CSV/NDJSON, first bytes). Body: {"id": '
        '"...", "rows": N (0 to 100, default 10)}. Answers {"artefact", "columns", "rows", "text", '
        '"truncated"}; NOT_FOUND when you may not see it.'
    ),
    "refresh-artefact": (
        "Re-run an export as you (its principal) under your current allowlist into a new "
        'artefact whose provenance.parent_id is the old one. Body: {"id": "..."}, optionally '
        '"ttl_seconds". Answers as export; PERMISSION_DENIED when a source is no longer readable.'
    ),
    **FLIGHT_SQL_ACTIONS,
}


@dataclass(frozen=True, slots=True)
class TicketPayload:
    """What a ticket grants: endpoint ``index`` of ``plan``; ``group`` names the FlightInfo."""

    plan: Plan
    index: int
    group: str
    # What SQL named each table of the plan as (its view when ruled: Policy.relation) at
    # GetFlightInfo; None when a rule or attribute changed while it was planned. A DoGet
    # whose principal now reads them otherwise is refused: a ticket never serves a view the
    # rules no longer give.
    relations: tuple[str, ...] | None = ()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()


def _describe(facts: QueryFacts, target: commands.Command | commands.TableScan) -> None:
    """What a decoded command tells the query log before it is planned (a refused plan is
    recorded with this much)."""
    if isinstance(target, commands.TableScan):
        facts.kind = "scan"
        return
    facts.kind = str(type(target).__struct_config__.tag)
    if isinstance(target, commands.QueryCommand):
        facts.sql, facts.params = target.sql, len(target.params or ())


def _describe_refused(facts: QueryFacts, descriptor: flight.FlightDescriptor) -> None:
    """A command refused by admission (a spent budget, the calls per minute) before it was
    decoded is still recorded with what it asked — the scan, sample or query and its SQL —
    when it decodes; one that does not stays ``unknown``. Decoded only on a refusal, so the
    admitted path decodes once, after admission."""
    with contextlib.suppress(QuiverError):
        _describe(facts, commands.decode_descriptor(descriptor))


def _flight_sql_action_facts(action: str) -> QueryFacts | None:
    """The query-log record of a Flight SQL action: ADBC and JDBC prepare every statement, so a
    ``CreatePreparedStatement`` the guard or a spent budget refuses — the statement never
    reaches GetFlightInfo — is recorded as the refused query; a prepare that succeeds records
    nothing (its statement's DoGet does), nor do the other actions."""
    if action != "CreatePreparedStatement":
        return None
    return QueryFacts(kind="query", via="flight-sql", failures_only=True)


def _planned(facts: QueryFacts, plan: Plan) -> None:
    """What the plan adds: its kind, the tables it reads, the query's text."""
    facts.kind = plan.kind
    facts.tables = tuple(ref.qualified for ref in plan.tables)
    if plan.sql is not None:
        facts.sql, facts.params = plan.sql, plan.params


class _RunningQueries:
    """:class:`catalog.running.RunningQueries` over the streams, the async queries and the
    runs for callers outside Flight; the id's prefix names which holds it."""

    def __init__(self, streams: RunningStreams, queries: QueryManager, runs: QueryRuns) -> None:
        self._streams = streams
        self._queries = queries
        self._runs = runs

    def list(self) -> list[RunningQueryInfo]:
        every = self._streams.listing() + self._queries.listing() + self._runs.listing()
        return sorted(every, key=lambda q: (q.started_at, q.id))

    def cancel(self, query_id: str) -> bool | None:
        if query_id.startswith("s_"):
            return self._streams.cancel_call(query_id)
        if query_id.startswith("h_"):
            return self._runs.cancel(query_id)
        return self._queries.cancel_any(query_id)


class QuiverFlightServer(flight.FlightServerBase):
    def __init__(
        self,
        catalog: Catalog,
        location: str,
        *,
        tls_certificates: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        # GetSchema's refusals need it (flight_server/errors.py); installed by a server, never
        # by an import (the agent client shares a process with no server: quiver_client).
        install_traceback_filter()
        super().__init__(
            location,
            middleware={"quiver": AuthMiddlewareFactory(catalog)},
            tls_certificates=tls_certificates or [],
        )
        self.catalog = catalog
        limits = catalog.config.limits
        self.tickets: TicketStore[TicketPayload] = TicketStore(limits.ticket_ttl_seconds, catalog.clock)
        self.watchdog = Watchdog()
        # Every Flight call, and every query any path admits, counts as activity: the hot-table
        # cache fills only while none runs.
        self.activity = Activity()
        self.admission = Admission(
            limits,
            catalog.db,
            self.watchdog,
            catalog.metrics,
            catalog.budgets,
            catalog.limits,
            activity=self.activity.begin,
        )
        self.guard = SqlGuard(catalog.tables, catalog.policy, catalog.db.catalog_name)
        self.profiles = ProfileCache.for_catalog(catalog)
        self.queries = QueryManager.for_catalog(catalog)
        self.queries.activity = self.activity.begin  # async queries run outside admission
        self.versions = VersionWatch(catalog.db)
        self.table_cache = TableCache(
            resolve_budget(catalog.config.cache.table_memory_bytes),
            registry=catalog.metrics.registry,
            fill=catalog.config.cache.table_fill,
        )
        self.table_cache.fill_when_idle(functools.partial(table_snapshot, catalog), self.activity)
        if catalog.config.cache.reload_hot_tables:
            # The tables the previous run held load again while idle (table_cache "remember").
            self.table_cache.remember(catalog.data_dir / HOT_TABLES_FILE, self._stored_tables)
        self.planner = Planner(
            catalog,
            self.guard,
            self.profiles,
            self.queries,
            self.admission,
            self.table_cache,
            self.versions,
        )
        self.cache = ResultCache.for_catalog(catalog)
        self.streamer = Streamer(
            catalog,
            self.watchdog,
            self.profiles,
            self.queries,
            self.cache,
            self.versions,
            self.admission.limits_for,
        )
        # GetFlightInfo of a query runs it once through the streamer (planned once).
        self.planner.runner = self.streamer
        # DoGet streams by FlightInfo: CancelFlightInfo, and clients that went away.
        self.running = RunningStreams(float(limits.ticket_ttl_seconds))
        self.sql = FlightSql(catalog, self.planner, self.tickets, self.running)
        # The same path for callers outside Flight (POST /v1/query, exports): quiver/runtime.py
        # hands it to the catalog as catalog.queries (catalog/query_port.py).
        self.query_runner = SqlRunner(self.planner, self.streamer, self.admission, catalog.query_log)

    # --- one entry for every RPC: authentication, audit of failures, error mapping ------
    def _state(self, context: flight.ServerCallContext) -> CallState:
        state = context.get_middleware("quiver")
        assert isinstance(state, CallState)
        return state

    def _begin(self, context: flight.ServerCallContext) -> tuple[CallState, Principal]:
        state = self._state(context)
        if state.principal is None:
            self.catalog.metrics.auth_failures.labels("flight").inc()
            self.catalog.audit.record(
                "auth.failed",
                outcome="denied",
                target=f"flight:{state.method}",
                client=context.peer(),
                request_id=state.request_id,
                detail=state.auth_error.detail if state.auth_error else None,
            )
            assert state.auth_error is not None
            raise state.auth_error
        return state, state.principal

    def _run(
        self, context: flight.ServerCallContext, where: str, fn: Callable[[Principal, CallState], T]
    ) -> T:
        state = self._state(context)
        state.cleanups.insert(0, self.activity.begin())  # ends last, when the call has ended
        try:
            _, principal = self._begin(context)
            return fn(principal, state)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped, none leaks a traceback
            err = map_exception(exc, state.request_id, where)
            extra = getattr(err, "extra_info", None)
            if extra:
                coded = decode_error(extra)
                state.outcome = coded[0] if coded is not None else "ERROR"
            raise err from None

    # --- listing ------------------------------------------------------------------------
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        def run(principal: Principal, state: CallState) -> list[flight.FlightInfo]:
            refs = self.catalog.policy.readable_tables(principal)
            infos = self.catalog.policy.describe(principal, refs)  # a ruled table: its view's
            texts = self.catalog.descriptions.of(refs)
            changed = self.catalog.descriptions.freshness(refs)
            state.fields["tables"] = len(infos)
            return [
                flight.FlightInfo(
                    info.schema,
                    flight.FlightDescriptor.for_path(info.ref.schema, info.ref.name),
                    [],
                    info.rows,
                    -1,
                    # The table's and its columns' descriptions (proto_docs/listing.md).
                    app_metadata=_listing_metadata(
                        _visible(texts.get(info.ref.key()), info.schema), changed.get(info.ref.key())
                    ),
                )
                for info in infos
            ]

        return iter(self._run(context, "list_flights", run))

    # --- describing -----------------------------------------------------------------------
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        def run(principal: Principal, state: CallState) -> flight.FlightInfo:
            # Recorded only when refused: a planned request is recorded by its DoGet.
            facts = state.query = QueryFacts(kind="unknown", failures_only=True)
            sql = self._is_flight_sql(descriptor)
            limit = 0 if sql else inline.requested(state.inline)  # a malformed header: before any work
            # One call of the swarm's calls per minute, before any work; the budgets too, but
            # Flight SQL metadata is free (a statement's budget is checked when it plans).
            try:
                self.admission.admit_call(principal, budget=not sql)
            except QuiverError:
                if not sql:
                    _describe_refused(facts, descriptor)
                raise
            scope = self.catalog.policy.rule_scope(principal)
            if sql:
                facts.kind, facts.via = "query", "flight-sql"
                plan = self.sql.plan(principal, descriptor.command, execute=True)
                state.fields["flight_sql"] = True
            else:
                target = commands.decode_descriptor(descriptor)
                _describe(facts, target)
                plan = self.planner.plan(principal, target)
            try:
                return self._flight_info(principal, state, descriptor, plan, scope, sql, limit)
            except BaseException:
                for part in plan.parts:  # a run handed over that no ticket will name: stopped
                    if isinstance(part, SqlPart) and part.held is not None:
                        part.held.interrupt()
                raise

        return self._run(context, "get_flight_info", run)

    def _flight_info(
        self,
        principal: Principal,
        state: CallState,
        descriptor: flight.FlightDescriptor,
        plan: Plan,
        scope: tuple[object, ...] | None,
        sql: bool,
        limit: int = 0,
    ) -> flight.FlightInfo:
        """The FlightInfo of a plan: one ticket per endpoint, all naming one group; ``limit``:
        the bytes of a result the client takes inline (flight_server/inline.py)."""
        facts = state.query
        assert facts is not None
        relations = self._relations(principal, plan, scope)
        _planned(facts, plan)
        state.fields["kind"] = plan.kind
        state.fields["target"] = plan.label
        group = secrets.token_hex(8)
        for part in plan.parts:  # a run handed over: CancelFlightInfo of this FlightInfo stops it
            if isinstance(part, SqlPart) and part.held is not None:
                self.running.hold(group, part.held)
        # A client that asked gets a small result in the FlightInfo (flight_server/inline.py):
        # recorded here, since no DoGet will record it.
        data = self.streamer.inline(plan, state, limit) if limit else None
        metadata = plan.app_metadata  # the row cap (proto_docs/descriptors.md)
        if data is not None:
            facts.failures_only = False
            state.fields["inline"] = len(data)
            if plan.row_cap is not None:  # the result is known whole: not cut
                metadata = dataclasses.replace(plan.row_cap, truncated=False).info_metadata()
        endpoints = []
        for index in range(len(plan.parts)):
            ticket, grant = self.tickets.issue(principal, TicketPayload(plan, index, group, relations))
            if sql:  # Flight SQL clients expect Any(TicketStatementQuery); DoGet unwraps it
                ticket = wrap_ticket(ticket)
            endpoints.append(flight_endpoint(ticket, grant.expires_at, data or b""))
        state.fields["endpoints"] = len(endpoints)
        return flight.FlightInfo(
            plan.schema,
            descriptor,
            endpoints,
            plan.total_records,
            -1,
            ordered=plan.ordered,
            app_metadata=metadata,
        )

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        def run(principal: Principal, state: CallState) -> flight.SchemaResult:
            self.admission.admit_call(principal, budget=False)  # planning checks the budget
            if self._is_flight_sql(descriptor):
                plan = self.sql.plan(principal, descriptor.command, execute=False)
            else:
                plan = self.planner.plan(principal, commands.decode_descriptor(descriptor), parts=False)
            state.fields["kind"] = plan.kind
            state.fields["target"] = plan.label
            return flight.SchemaResult(plan.schema)

        try:
            return self._run(context, "get_schema", run)
        except flight.FlightError as e:
            raise schema_call_error(e) from None

    # --- streaming ------------------------------------------------------------------------
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        def run(principal: Principal, state: CallState) -> flight.FlightDataStream:
            facts = state.query = QueryFacts(kind="unknown")
            raw = unwrap_ticket(ticket.ticket)
            if raw != ticket.ticket:
                facts.via = "flight-sql"
            payload = self.tickets.redeem(principal, raw)
            plan = payload.plan
            if plan.kind == "metadata":  # a Flight SQL listing reads no data: not a query
                state.query = None
            else:
                _planned(facts, plan)
            state.fields["kind"] = plan.kind
            state.fields["target"] = plan.label
            state.fields["endpoint"] = payload.index
            # The allowlist may have changed since the ticket was issued.
            policy = self.catalog.policy
            for ref in plan.tables:
                if not policy.can_read(principal, ref):
                    raise PermissionDenied(f"{ref.qualified}: {NOT_READABLE}")
            if payload.relations != tuple(policy.relation(principal, ref) for ref in plan.tables):
                raise Unavailable(
                    "the row or column rules you read these tables through changed since GetFlightInfo; "
                    "call GetFlightInfo again"
                )
            held = self.streamer.claim(plan, payload.index)
            if held is None:
                state.cleanups.append(self.admission.acquire(principal, payload.group, payload.index))
            else:  # the run GetFlightInfo started goes on, in the slot it holds
                state.cleanups.append(held.release)
                self.admission.admit_call(principal)
            # Until the call ends: CancelFlightInfo finds it, a client that leaves stops it.
            self.running.track(payload.group, state, context)
            return self.streamer.open(plan, payload.index, state, held)

        return self._run(context, "do_get", run)

    # --- actions --------------------------------------------------------------------------
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return self._run(context, "list_actions", lambda _p, _s: list(ACTIONS.items()))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[bytes]:  # noqa: C901  one branch per action
        def run(principal: Principal, state: CallState) -> list[bytes]:  # noqa: PLR0911  a dispatch on the action
            state.action = action.type
            body = action.body.to_pybytes() if action.body is not None else b""
            if action.type == "whoami":
                return [msgspec.json.encode(self.catalog.whoami(principal))]
            if action.type == "refresh-token":
                ttl = commands.decode_body(body, commands.RefreshBody, action.type).ttl_seconds
                issued = self.catalog.tokens.refresh(principal, ttl)
                return [_json(msgspec.structs.asdict(issued))]
            if action.type == "submit-query":
                # The query path of a {"kind": "query"} descriptor: every check before queueing.
                facts = state.query = QueryFacts(kind="query")
                query = commands.decode_body(body, commands.QueryCommand, action.type)
                facts.sql, facts.params = query.sql, len(query.params or ())
                self.admission.admit_call(principal)  # its workers run it outside admission
                return [
                    msgspec.json.encode(
                        self.queries.submit(principal, self.planner.prepare(principal, query))
                    )
                ]
            if action.type in ("usage", "my-queries"):
                return [self._governance(principal, action.type, body)]
            if action.type == "query-status":
                query_id = commands.decode_body(body, commands.QueryIdBody, action.type).id
                return [msgspec.json.encode(self.queries.status(principal, query_id))]
            if action.type == "cancel-query":
                query_id = commands.decode_body(body, commands.QueryIdBody, action.type).id
                return [msgspec.json.encode(self.queries.cancel(principal, query_id))]
            if self.sql.handles(action.type):
                state.fields["flight_sql"] = True
                state.query = _flight_sql_action_facts(action.type)
                return self.sql.do_action(principal, action.type, body, state.query)
            if action.type == "export":
                state.query = QueryFacts(kind="export")
                return [msgspec.json.encode(self._export(principal, state, body))]
            if action.type == "list-artefacts":
                listing = commands.decode_body(body, commands.ListArtefactsBody, action.type)
                page = self.catalog.artefacts.list(
                    principal,
                    ArtefactFilter(kind=listing.kind, tag=listing.tag),
                    page_size=listing.page_size,
                    after=listing.after,
                )
                return [msgspec.json.encode(page)]
            if action.type == "read-artefact":
                wanted = commands.decode_body(body, commands.ReadArtefactBody, action.type)
                state.fields["target"] = f"artefact:{bounded(wanted.id, 40)}"
                return [
                    msgspec.json.encode(preview(self.catalog.artefacts, principal, wanted.id, wanted.rows))
                ]
            if action.type == "refresh-artefact":
                state.query = QueryFacts(kind="export")
                refresh = commands.decode_body(body, commands.RefreshArtefactBody, action.type)
                info = self.catalog.exports.refresh(principal, refresh.id, ttl_seconds=refresh.ttl_seconds)
                state.fields["target"] = f"artefact:{info.artefact.id}"
                return [msgspec.json.encode(info)]
            raise InvalidArgument(
                f"unknown action {bounded(action.type, 40)!r}; available: {', '.join(sorted(ACTIONS))} "
                "(see ListActions)"
            )

        return iter(self._run(context, "do_action", run))

    def _governance(self, principal: Principal, name: str, body: bytes) -> bytes:
        """``usage`` and ``my-queries``: the caller's own budget and query log
        (proto_docs/governance.md)."""
        if name == "my-queries":
            limit = commands.decode_body(body, commands.MyQueriesBody, name).limit
            return msgspec.json.encode({"queries": self.catalog.query_log.mine(principal, limit)})
        commands.decode_body(body, commands.EmptyBody, name)
        if principal.swarm is None:
            raise InvalidArgument("usage: an admin token has no swarm and no budget")
        report = self.catalog.budgets.report(principal.swarm)
        if principal.agent is not None:  # an agent sees its own entry and its swarm's, not its peers'
            report.agents = {k: v for k, v in report.agents.items() if k == principal.agent}
        return msgspec.json.encode(report)

    def _relations(self, principal: Principal, plan: Plan, scope: object) -> tuple[str, ...] | None:
        """:attr:`TicketPayload.relations` of ``plan``: None when the caller's rules or bound
        values (``Policy.rule_scope``, read before planning as ``scope``) changed while it was
        planned — the plan may hold either view."""
        policy = self.catalog.policy
        relations = tuple(policy.relation(principal, ref) for ref in plan.tables)
        return relations if policy.rule_scope(principal) == scope else None

    @staticmethod
    def _is_flight_sql(descriptor: flight.FlightDescriptor) -> bool:
        return descriptor.descriptor_type == flight.DescriptorType.CMD and is_flight_sql(descriptor.command)

    def _export(self, principal: Principal, state: CallState, raw: bytes) -> Any:
        """``export``: a query, or every row of a table (readable now, the same refusal as a
        scan), into a file artefact through the query path (catalog/exports.py)."""
        body = commands.decode_body(raw, commands.ExportBody, "export")
        if (body.query is None) == (body.table is None):
            raise InvalidArgument(
                f'export takes exactly one of "query" or "table": {commands.ExportBody.usage}'
            )
        if body.table is not None:
            if body.params:
                raise InvalidArgument('export: "params" go with "query"; a table export takes none')
            ref = self.planner.readable(principal, body.table)
            sql = f"SELECT * FROM {ref.sql}"
        else:
            assert body.query is not None
            sql = body.query
        facts = state.query
        if facts is not None:
            facts.sql, facts.params = sql, len(body.params or ())
        exports = self.catalog.exports

        def export(progress: Callable[[int, int], None] | None = None, timeout: float | None = None) -> Any:
            return exports.export(
                principal,
                sql,
                body.params,
                format=body.format,
                name=body.name,
                ttl_seconds=body.ttl_seconds,
                max_rows=body.max_rows,
                tags=body.tags,
                description=body.description,
                progress=progress,
                timeout_seconds=timeout,
            )

        if body.run_async:
            # The checks of a query first (limits, guard: a refusal is immediate, nothing is
            # queued); then a worker of the async queries runs it, under [results]'s timeout.
            guarded, _part = self.planner.query_part(
                principal, commands.QueryCommand(sql=sql, params=body.params, max_rows=body.max_rows)
            )
            timeout = float(self.catalog.config.results.timeout_seconds)

            def task(progress: Callable[[int, int], None]) -> dict[str, Any]:
                return msgspec.to_builtins(export(progress, timeout))

            tables = tuple(ref.qualified for ref in guarded.tables)
            return self.queries.submit(principal, PreparedTask(run=task, sql=sql, tables=tables))
        info = export()
        state.fields["target"] = f"artefact:{info.artefact.id}"
        state.fields["rows"] = info.rows
        if facts is not None:
            facts.rows, facts.nbytes = info.rows, info.artefact.size_bytes
        return info

    # --- DoPut: artefact uploads, Flight SQL parameters and ingest -----------------------------
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """Flight SQL's DoPuts — prepared-statement parameters, and ingest, which saves a tabular
        artefact — go to its handler (proto_docs/flight-sql.md). Everything else saves the upload
        as a tabular artefact (proto_docs/artefacts.md); the PutResult's app_metadata is the
        artefact's JSON. Both artefact uploads run the one loop of
        :func:`~flight_server.uploads.save_table`: batch by batch into the store's temporary IPC
        file, and a failure (a limit, a schema change, the client going away) keeps nothing."""

        def run(principal: Principal, state: CallState) -> None:
            if self._is_flight_sql(descriptor):
                state.fields["flight_sql"] = True
                answer = self.sql.do_put(
                    principal, descriptor.command, reader, context.is_cancelled, state.fields
                )
                writer.write(pa.py_buffer(answer))
                return
            target = None
            if descriptor.descriptor_type == flight.DescriptorType.CMD:
                target = commands.decode_descriptor(descriptor)
            if not isinstance(target, commands.ArtefactCommand):
                raise InvalidArgument(
                    'DoPut saves a tabular artefact: send a CMD descriptor {"kind": "artefact", '
                    '"name": "...", "tags": [...], "description": "...", "ttl_seconds": N}'
                )
            cmd = target.for_upload()
            state.fields["kind"] = "artefact"
            artefact = save_table(
                self.catalog.artefacts,
                principal,
                reader,
                context.is_cancelled,
                name=cmd.name or "",
                tags=cmd.tags or [],
                description=cmd.description or "",
                ttl_seconds=cmd.ttl_seconds,
            )
            state.fields["target"] = f"artefact:{artefact.id}"
            state.fields["rows"] = artefact.rows
            writer.write(pa.py_buffer(msgspec.json.encode(artefact)))

        self._run(context, "do_put", run)

    # --- not offered ---------------------------------------------------------------------
    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        def run(_principal: Principal, _state: CallState) -> None:
            raise InvalidArgument("DoExchange is not offered by this server; use GetFlightInfo and DoGet")

        self._run(context, "do_exchange", run)

    # --- status (GET /v1/status: the process wiring asks, quiver/status.py) ------------------
    def queries_status(self) -> QueriesStatus:
        """ "queries": streams being sent, admission slots in use, live tickets, the limits,
        and the results sent inline since start."""
        active = self.admission.active()
        limits = self.catalog.config.limits
        inlined, inlined_bytes = self.streamer.inline_counts()
        return QueriesStatus(
            streaming=self.admission.streams(),
            queries=sum(active.values()),
            by_principal=active,
            tickets=len(self.tickets),
            limits=QueryLimits(
                query_timeout_seconds=limits.query_timeout_seconds,
                max_concurrent_queries=limits.max_concurrent_queries,
                max_concurrent_total=limits.max_concurrent_total,
                max_rows=limits.max_rows,
                swarms_with_limits=self.catalog.limits.count(),
            ),
            inlined=inlined,
            inlined_bytes=inlined_bytes,
        )

    def _stored_tables(self) -> list[TableRef]:
        """The data tables stored in DuckDB (live tables are read from Snowflake, never held)."""
        tables = self.catalog.tables
        return [r for r in tables.list_refs() if not tables.is_live(r)]

    def cache_status(self) -> CacheStatus:
        """ "cache": the result cache, with the hot-table cache under "tables" (the one
        ``cache`` section: the result cache alone does not report itself)."""
        result = self.cache.stats()
        return CacheStatus(**msgspec.structs.asdict(result), tables=self.table_cache.stats())

    def running_queries(self) -> RunningQueries:
        """What an admin lists and cancels (catalog.running): every DoGet stream and every
        queued or running async query of this server."""
        return _RunningQueries(self.running, self.queries, self.streamer.runs)

    def async_queries_status(self) -> AsyncQueriesStatus:
        """ "async_queries": queued, running and retained async queries."""
        return self.queries.stats()

    def profiles_status(self) -> ProfilesStatus:
        """ "profiles": the column-profile cache."""
        return self.profiles.stats()

    # --- lifecycle --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop accepting calls and wait for running ones, then stop async queries."""
        self.table_cache.stop_filling()  # first: a fill must not delay the shutdown
        super().shutdown()
        self.queries.close()
        self.running.close()
        self.cache.close()
        self.streamer.close()
        self.table_cache.close()
        self.watchdog.stop()


def _visible(text: TableDescription | None, schema: pa.Schema) -> TableDescription | None:
    """The descriptions of the columns ``schema`` has (a ruled table's view lacks some)."""
    return text.only(schema.names) if text is not None else None


def _listing_metadata(text: TableDescription | None, changed_at: datetime | None) -> bytes:
    """A listed table's ``app_metadata``: JSON ``{"description", "columns", "changed_at"}``
    (proto_docs/listing.md)."""
    return msgspec.json.encode(
        {
            "description": text.table if text else "",
            "columns": text.columns if text else {},
            "changed_at": changed_at,
        }
    )
