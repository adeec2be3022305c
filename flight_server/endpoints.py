"""Planning: a descriptor becomes a :class:`Plan` — the schema, the row count where it is cheap,
and the endpoints (parts) a client fetches, possibly in parallel.

Nothing here runs the caller's query: schemas come from DuckDB's binder (a ``LIMIT 0`` of the
bound relation, which DuckDB answers without executing the plan), row counts from DuckDB's
row-group metadata (``count(*)`` of a table).

Parallel endpoints. A large table is split into contiguous ``rowid`` ranges aligned to
DuckDB's row groups; DuckDB prunes row groups by ``rowid`` filters, so each endpoint reads only
its share. Every part of a split plan carries the table's *layout* read in one snapshot at
GetFlightInfo: its data version (``_quiver.data_versions``, bumped by every writer in the
writing transaction) plus its row count and largest rowid (which also catch a checkpoint that
compacts deleted rows and so renumbers rowids without a new version). DoGet reads the layout
again *in the same transaction as the rows*, and refuses with UNAVAILABLE if it differs, so
the endpoints of one FlightInfo either all read the same data or one of them fails — never a
mix. Queries and samples are single endpoints: splitting arbitrary SQL is not sound.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import pyarrow as pa
import structlog

from catalog import Catalog, InvalidArgument, Principal, TableRef, quote_ident
from catalog.database import SYSTEM_SCHEMA, fetch_one
from catalog.sqlguard import GuardedQuery, SqlGuard
from flight_server import commands as cmds
from flight_server.commands import (
    Command,
    ProfileCommand,
    QueryCommand,
    ResultCommand,
    SampleCommand,
    TableScan,
)
from flight_server.profiles import PROFILE_SCHEMA, ProfileCache
from flight_server.results import QueryManager

log = structlog.get_logger("flight_server")

ROW_GROUP_ROWS = 122_880  # DuckDB's default row group size; parts are aligned to it


@dataclass(frozen=True, slots=True)
class SplitOptions:
    """How large tables are split into endpoints.

    A table of at least ``min_split_rows`` rows becomes ``rows // part_rows`` parts (at most
    ``max_parts``); parts are whole row groups. The defaults turn a 1M-row table into 4
    endpoints and a 5M-row table into 8, and keep tables under 500,000 rows in one: below
    that, a second stream costs more than it brings.
    """

    part_rows: int = 2 * ROW_GROUP_ROWS
    max_parts: int = 8
    min_split_rows: int = 500_000
    align_rows: int = ROW_GROUP_ROWS


@dataclass(frozen=True, slots=True)
class Layout:
    """The physical state of a table that a split read depends on (see the module doc)."""

    ref: TableRef
    version: int
    rows: int
    max_rowid: int


@dataclass(frozen=True, slots=True)
class SqlPart:
    sql: str
    params: tuple[Any, ...] = ()
    limit: int | None = None
    layout: Layout | None = None
    # The guard's normalized SQL when the result may be served from the result cache.
    normalized: str | None = None


@dataclass(frozen=True, slots=True)
class ProfilePart:
    ref: TableRef
    columns: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class ResultPart:
    id: str


Part = SqlPart | ProfilePart | ResultPart
PlanKind = Literal["scan", "sample", "query", "profile", "result"]


@dataclass(frozen=True, slots=True)
class Plan:
    kind: PlanKind
    schema: pa.Schema
    total_records: int
    parts: tuple[Part, ...]
    # Tables whose readability is checked again at DoGet (the allowlist may have changed).
    tables: tuple[TableRef, ...]
    label: str
    timeout: bool  # DoGet arms the query timeout
    ordered: bool = True


class Planner:
    def __init__(
        self,
        catalog: Catalog,
        guard: SqlGuard,
        profiles: ProfileCache,
        queries: QueryManager,
        split: SplitOptions,
        probe: Callable[[Callable[[duckdb.DuckDBPyConnection], pa.Schema]], pa.Schema],
    ) -> None:
        self.catalog = catalog
        self.guard = guard
        self.profiles = profiles
        self._queries = queries
        self.split = split
        self._probe = probe
        self._guarded: OrderedDict[tuple[str, str], tuple[float, GuardedQuery]] = OrderedDict()
        self._schemas: OrderedDict[tuple[Any, ...], tuple[float, pa.Schema]] = OrderedDict()

    @property
    def limits(self) -> Any:
        return self.catalog.config.limits

    # --- entry point ---------------------------------------------------------------------------
    def plan(self, principal: Principal, target: Command | TableScan, *, parts: bool = True) -> Plan:
        """The plan for ``target``; ``parts=False`` when only the schema is wanted (GetSchema)."""
        if isinstance(target, TableScan):
            return self.scan(principal, target, parts=parts)
        if isinstance(target, QueryCommand):
            return self.query(principal, target)
        if isinstance(target, SampleCommand):
            return self.sample(principal, target)
        if isinstance(target, ProfileCommand):
            return self.profile(principal, target)
        if isinstance(target, ResultCommand):
            return self.result(principal, target)
        raise InvalidArgument(f"unsupported command {type(target).__name__}")

    def readable(self, principal: Principal, name: str, field: str = "table") -> TableRef:
        schema, table = cmds.split_table_name(name, field)
        return self.catalog.policy.require_readable(principal, schema, table)

    # --- PATH: full table scans, split when large --------------------------------------------
    def scan(self, principal: Principal, target: TableScan, *, parts: bool) -> Plan:
        ref = self.catalog.policy.require_readable(principal, target.schema, target.table)
        with self.catalog.db.reading() as cur:
            schema = table_schema(cur, ref)
            if not parts:
                return Plan("scan", schema, -1, (), (ref,), ref.qualified, timeout=False)
            rows = _count(cur, ref)
            if rows < max(self.split.min_split_rows, 2 * self.split.part_rows):
                part = SqlPart(f"SELECT * FROM {ref.sql}")
                return Plan("scan", schema, rows, (part,), (ref,), ref.qualified, timeout=False)
            layout = read_layout(cur, ref, begin=True)
        return Plan(
            "scan",
            schema,
            layout.rows,
            self._split(ref, layout),
            (ref,),
            ref.qualified,
            timeout=False,
        )

    def _split(self, ref: TableRef, layout: Layout) -> tuple[SqlPart, ...]:
        s = self.split
        count = max(1, min(s.max_parts, layout.rows // max(1, s.part_rows)))
        span = layout.max_rowid + 1
        align = max(1, s.align_rows)
        bounds: list[int] = []
        for i in range(count):
            lo = (i * span // count) // align * align  # row-group aligned, rounded down
            if not bounds or lo > bounds[-1]:
                bounds.append(lo)
        out = []
        for i, lo in enumerate(bounds):
            # The last part is open-ended: rows appended since the layout was read would
            # fail the layout check anyway, but no rowid can ever fall between the parts.
            where = f"rowid >= {lo}" + (f" AND rowid < {bounds[i + 1]}" if i + 1 < len(bounds) else "")
            out.append(SqlPart(f"SELECT * FROM {ref.sql} WHERE {where}", layout=layout))
        return tuple(out)

    # --- samples ----------------------------------------------------------------------------
    def sample(self, principal: Principal, cmd: SampleCommand) -> Plan:
        cmds.check_sample(cmd, self.limits)
        ref = self.readable(principal, cmd.table)
        cap = self.limits.max_sample_rows
        with self.catalog.db.reading() as cur:
            schema = table_schema(cur, ref)
            select = "*"
            if cmd.columns is not None:
                names = resolve_columns(schema, cmd.columns, ref)
                schema = pa.schema([schema.field(n) for n in names], metadata=schema.metadata)
                select = ", ".join(quote_ident(n) for n in names)
            rows = _count(cur, ref)
        if cmd.percent is not None:
            expected = rows * cmd.percent / 100
            if expected > cap:
                most = 100 * cap / rows
                raise InvalidArgument(
                    f"a {cmd.percent:g}% sample of {ref.qualified} is about {expected:,.0f} rows, above "
                    f"the limit of {cap:,} ([limits] max_sample_rows); use percent <= {most:.4g} "
                    "or rows <= the limit"
                )
            seed = "" if cmd.seed is None else f", {cmd.seed}"
            sql = f"SELECT {select} FROM {ref.sql} USING SAMPLE {cmd.percent:.12f} PERCENT (bernoulli{seed})"
            # The estimate above is an expectation: the cap holds even for an unlucky draw.
            part = SqlPart(sql, limit=cap)
            total = -1
        else:
            assert cmd.rows is not None
            if cmd.method == "random":
                seed = "" if cmd.seed is None else f", {cmd.seed}"
                sql = f"SELECT {select} FROM {ref.sql} USING SAMPLE {cmd.rows} ROWS (reservoir{seed})"
            else:
                sql = f"SELECT {select} FROM {ref.sql} LIMIT {cmd.rows}"
            part = SqlPart(sql)
            total = min(rows, cmd.rows)
        return Plan("sample", schema, total, (part,), (ref,), ref.qualified, timeout=True)

    # --- profiles -------------------------------------------------------------------------------
    def profile(self, principal: Principal, cmd: ProfileCommand) -> Plan:
        ref = self.readable(principal, cmd.table)
        with self.catalog.db.reading() as cur:
            schema = table_schema(cur, ref)
        columns = None
        count = len(schema)
        if cmd.columns is not None:
            if not cmd.columns:
                raise InvalidArgument("field 'columns' is empty: omit it for every column or name some")
            columns = tuple(resolve_columns(schema, cmd.columns, ref))
            count = len(columns)
        part = ProfilePart(ref, columns)
        return Plan("profile", PROFILE_SCHEMA, count, (part,), (ref,), ref.qualified, timeout=True)

    # --- async results ------------------------------------------------------------------------
    def result(self, principal: Principal, cmd: ResultCommand) -> Plan:
        info = self._queries.result_info(principal, cmd.id)
        return Plan("result", info.schema, info.rows, (ResultPart(cmd.id),), (), f"result:{cmd.id}", False)

    # --- SQL -------------------------------------------------------------------------------------
    def query(self, principal: Principal, cmd: QueryCommand) -> Plan:
        cap = cmds.check_query(cmd, self.limits)
        guarded = self.check_sql(principal, cmd.sql)
        params = tuple(cmd.params)
        schema = self.query_schema(guarded, params)
        part = SqlPart(guarded.sql, params, limit=cap, normalized=guarded.normalized)
        label = f"query:{guarded.fingerprint[:12]}"
        return Plan("query", schema, -1, (part,), guarded.tables, label, timeout=True)

    GUARD_CACHE_SECONDS = 10.0
    GUARD_CACHE_SIZE = 1024

    def check_sql(self, principal: Principal, sql: str) -> GuardedQuery:
        """The guard's verdict, remembered briefly per (allowlist scope, text).

        Agents repeat the same query text with new parameters; parsing it again each time
        costs more than the point query itself. Only acceptances are remembered, for a few
        seconds, and the tables are checked against the current allowlist on every use, so a
        narrowed allowlist takes effect at once.
        """
        scope = "admin" if principal.is_admin else f"swarm:{principal.swarm}"
        key = (scope, sql)
        now = time.monotonic()
        hit = self._guarded.get(key)
        if hit is not None and hit[0] > now:
            guarded = hit[1]
            policy = self.catalog.policy
            if all(policy.can_read(principal, t) for t in guarded.tables):
                return guarded
        guarded = self.guard.check(principal, sql)
        self._guarded[key] = (now + self.GUARD_CACHE_SECONDS, guarded)
        if len(self._guarded) > self.GUARD_CACHE_SIZE:
            self._guarded.popitem(last=False)
        return guarded

    SCHEMA_CACHE_SECONDS = 5.0
    SCHEMA_CACHE_SIZE = 1024

    def query_schema(self, guarded: GuardedQuery, params: tuple[Any, ...]) -> pa.Schema:
        """The result schema from DuckDB's binder, without running the query.

        Remembered for a few seconds by (text, parameter types): binding costs about as much
        as a point query, and an agent asks the same shape again and again.
        """
        key = (guarded.sql, tuple(_param_type(p) for p in params))
        now = time.monotonic()
        hit = self._schemas.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]

        def bind(cur: duckdb.DuckDBPyConnection) -> pa.Schema:
            # DuckDB plans LIMIT 0 as an empty result: nothing below it executes.
            rel = cur.sql(f"SELECT * FROM (\n{guarded.sql}\n) LIMIT 0", params=list(params) or None)
            return rel.to_arrow_table().schema

        schema = self._probe(bind)
        self._schemas[key] = (now + self.SCHEMA_CACHE_SECONDS, schema)
        if len(self._schemas) > self.SCHEMA_CACHE_SIZE:
            self._schemas.popitem(last=False)
        return schema


# --- helpers -----------------------------------------------------------------------------------
def _param_type(value: Any) -> Any:
    if isinstance(value, list):
        return ("list", tuple(_param_type(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _param_type(v)) for k, v in value.items()))
    return type(value).__name__


def table_schema(cur: duckdb.DuckDBPyConnection, ref: TableRef) -> pa.Schema:
    return cur.sql(f"SELECT * FROM {ref.sql} LIMIT 0").to_arrow_table().schema


def _count(cur: duckdb.DuckDBPyConnection, ref: TableRef) -> int:
    # Answered from row-group metadata: no scan.
    return int(fetch_one(cur, f"SELECT count(*) FROM {ref.sql}")[0])  # type: ignore[index]


def read_layout(cur: duckdb.DuckDBPyConnection, ref: TableRef, *, begin: bool) -> Layout:
    """Version, row count and largest rowid of ``ref`` in one snapshot.

    ``begin=True`` opens (and afterwards ends) a transaction of its own; with
    ``begin=False`` the caller's transaction is used and stays open for its next query.
    """
    if begin:
        cur.execute("BEGIN TRANSACTION")
    try:
        s, t = ref.key()
        row = fetch_one(
            cur,
            f"SELECT version FROM {SYSTEM_SCHEMA}.data_versions "
            "WHERE lower(schema_name) = ? AND lower(table_name) = ?",
            [s, t],
        )
        count, max_rowid = fetch_one(cur, f"SELECT count(*), coalesce(max(rowid), -1) FROM {ref.sql}")  # type: ignore[misc]
        return Layout(ref, int(row[0]) if row else 0, int(count), int(max_rowid))
    finally:
        if begin:
            cur.execute("ROLLBACK")


def resolve_columns(schema: pa.Schema, wanted: list[str], ref: TableRef) -> list[str]:
    """Requested column names → the table's own spelling; unknown names are refused."""
    by_lower: dict[str, str] = {}
    for name in schema.names:
        by_lower.setdefault(name.lower(), name)
    out, missing = [], []
    for w in wanted:
        name = schema.names[schema.names.index(w)] if w in schema.names else by_lower.get(w.lower())
        if name is None:
            missing.append(w)
        elif name not in out:
            out.append(name)
    if missing:
        raise InvalidArgument(
            f"unknown column(s) {', '.join(map(repr, missing))} in {ref.qualified}; "
            f"its columns are: {', '.join(schema.names)}"
        )
    return out
