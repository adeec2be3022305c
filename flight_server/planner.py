"""Planning: a descriptor becomes a :class:`~flight_server.plans.Plan` — the schema, the row count where it is cheap,
and the endpoints (parts) a client fetches, possibly in parallel.

Schemas come from DuckDB's binder (a ``LIMIT 0`` of the bound relation, which DuckDB answers
without executing the plan), row counts from DuckDB's row-group metadata (``count(*)`` of a
table) — with one exception: GetFlightInfo of a ``query`` command runs the query once
(:class:`QueryRunner`, the streamer's ``run_at_info``) and takes the schema from the result,
which its DoGet then streams from memory when it was read whole — planned once, not probed at
GetFlightInfo and planned again at DoGet. GetSchema and ``submit-query`` never run it.

Parallel endpoints. A large table is split into contiguous ``rowid`` ranges aligned to
DuckDB's row groups; DuckDB prunes row groups by ``rowid`` filters, so each endpoint reads only
its share. Every part of a split plan carries the table's *layout* read in one snapshot at
GetFlightInfo: its data version (``_quiver.data_versions``, bumped by every writer in the
writing transaction) plus its row count and largest rowid (which also catch a checkpoint that
compacts deleted rows and so renumbers rowids without a new version). DoGet reads the layout
again *in the same transaction as the rows*, and refuses with UNAVAILABLE if it differs, so
the endpoints of one FlightInfo either all read the same data or one of them fails — never a
mix. A table with a column named ``rowid`` (which hides DuckDB's row id) is never split.

Split queries. Splitting arbitrary SQL is not sound, so a query is one endpoint unless it is
a plain projection and filter of one table — each output row computed from one row alone,
which the guard decides on DuckDB's parse tree (``SqlGuard.splittable``) — whose result was
not read whole at GetFlightInfo: then it is split like a scan of that table, each part the
caller's statement with a rowid range ANDed to its WHERE clause, written back to SQL by DuckDB
and checked by a second parse (``SqlGuard.rowid_parts``), with the same layout check
(:meth:`Planner._split_query`). A query of plain columns of a table held by the hot-table
cache is served from it without running (:meth:`Planner._cached_query`). Samples are single
endpoints.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import duckdb
import pyarrow as pa
import structlog

from catalog import Catalog, InvalidArgument, Principal, ResourceExhausted, TableRef, quote_ident
from catalog.config import FlightConfig, LimitsConfig
from catalog.database import fetch_one
from catalog.sqlguard import GuardedQuery, SqlGuard
from catalog.tables import fold
from flight_server import commands as cmds
from flight_server import live
from flight_server.admission import Admission
from flight_server.cache import sql_digest
from flight_server.commands import (
    ArtefactCommand,
    Command,
    ProfileCommand,
    QueryCommand,
    ResultCommand,
    SampleCommand,
    TableScan,
)
from flight_server.errors import check_result_type, duckdb_error
from flight_server.plans import (
    BATCH_ROWS,
    ArtefactPart,
    CachedPart,
    Layout,
    LivePart,
    MixedPart,
    Plan,
    ProfilePart,
    ResultPart,
    SqlPart,
    limited,
)
from flight_server.profiles import PROFILE_SCHEMA, ProfileCache
from flight_server.ready import HeldRun
from flight_server.results import PreparedQuery, QueryManager
from flight_server.streams import arrow_stream
from flight_server.table_cache import CachedTable, TableCache
from flight_server.truncation import RowCap
from flight_server.versions import VersionWatch, read_layout

log = structlog.get_logger("flight_server")

ROW_GROUP_ROWS = 122_880  # DuckDB's default row group size; parts are aligned to it


class QueryRunner(Protocol):
    """Runs a query at GetFlightInfo (flight_server/streams.py ``Streamer.run_at_info``):
    the schema, the part for the ticket (holding the result when it was read whole), and
    whether it was."""

    def run_at_info(
        self, admission: Admission, principal: Principal, tables: tuple[TableRef, ...], part: SqlPart
    ) -> tuple[pa.Schema | None, SqlPart, bool] | None: ...


@dataclass(frozen=True, slots=True)
class SplitOptions:
    """How large tables are split into endpoints (``[flight] split_*``, proto_docs/configuration.md).

    A table of at least ``min_split_rows`` rows becomes ``rows // part_rows`` parts (at most
    ``max_parts``); parts are whole row groups. The defaults turn a 1M-row table into 4
    endpoints and a 5M-row table into 8, and keep tables under 500,000 rows in one: below
    that, a second stream costs more than it brings.
    """

    part_rows: int = 2 * ROW_GROUP_ROWS
    max_parts: int = 8
    min_split_rows: int = 500_000
    align_rows: int = ROW_GROUP_ROWS

    @classmethod
    def from_config(cls, cfg: FlightConfig) -> SplitOptions:
        return cls(cfg.split_part_rows, cfg.split_max_parts, cfg.split_min_rows, cfg.split_align_rows)


class Planner:
    def __init__(
        self,
        catalog: Catalog,
        guard: SqlGuard,
        profiles: ProfileCache,
        queries: QueryManager,
        admission: Admission,
        table_cache: TableCache | None = None,
        versions: VersionWatch | None = None,
        runner: QueryRunner | None = None,
    ) -> None:
        self.catalog = catalog
        self.runner = runner
        self.table_cache = table_cache or TableCache(0)
        self.versions = versions or VersionWatch(catalog.db)
        self.guard = guard
        self.profiles = profiles
        self._queries = queries
        self.split = SplitOptions.from_config(catalog.config.flight)
        self.admission = admission
        self._guarded: OrderedDict[tuple[str, str, Any], tuple[float, GuardedQuery]] = OrderedDict()
        self._schemas: OrderedDict[tuple[Any, ...], tuple[float, pa.Schema]] = OrderedDict()
        self._resolved: dict[tuple[str, str], tuple[int, TableRef]] = {}
        self._large: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        #: ``LIMIT 0`` schema probes run (GetSchema, submit-query, and GetFlightInfo of a query
        #: whose result recently did not fit the head, that failed, or that was handed over before
        #: DuckDB returned its reader): a count for tests.
        self.probes = 0

    @property
    def limits(self) -> LimitsConfig:
        return self.catalog.config.limits

    # --- entry point ---------------------------------------------------------------------------
    def plan(self, principal: Principal, target: Command | TableScan, *, parts: bool = True) -> Plan:
        """The plan for ``target``; ``parts=False`` when only the schema is wanted (GetSchema)."""
        if isinstance(target, TableScan):
            return self.scan(principal, target, parts=parts)
        if isinstance(target, QueryCommand):
            return self.query(principal, target, execute=parts)
        if isinstance(target, SampleCommand):
            return self.sample(principal, target)
        if isinstance(target, ProfileCommand):
            return self.profile(principal, target)
        if isinstance(target, ResultCommand):
            return self.result(principal, target)
        if isinstance(target, ArtefactCommand):
            return self.artefact(principal, target)
        raise InvalidArgument(f"unsupported command {type(target).__name__}")

    def readable(self, principal: Principal, name: str, field: str = "table") -> TableRef:
        schema, table = cmds.split_table_name(name, field)
        return self.require_readable(principal, schema, table)

    RESOLVED_SIZE = 4096

    def require_readable(self, principal: Principal, schema: str, table: str) -> TableRef:
        """``Policy.require_readable`` with the name resolution remembered.

        Resolving a name lists the catalog (a DuckDB query, about a millisecond: more than a
        cached scan's whole GetFlightInfo). A resolution is reused while the
        :class:`VersionWatch` generation is unchanged — a CREATE or DROP commits, which the
        watch notices, and it re-reads at least every second anyway. The allowlist is checked
        on every call; a refusal always goes through the policy itself (same words)."""
        self.versions.current()
        generation = self.versions.generation
        key = (fold(schema), fold(table))
        hit = self._resolved.get(key)
        policy = self.catalog.policy
        if hit is not None and hit[0] == generation and policy.can_read(principal, hit[1]):
            return hit[1]
        ref = policy.require_readable(principal, schema, table)
        self._resolved[key] = (generation, ref)
        if len(self._resolved) > self.RESOLVED_SIZE:
            self._resolved.clear()
        return ref

    def _unruled_live(self, principal: Principal, ref: TableRef) -> None:
        """PATH scans, samples and profiles of a live table are pushed to Snowflake as they are
        (flight_server/live.py), outside the view a rule defines: for a principal whose
        allowlist entry rules the table they are refused, and a query — which the guard
        rewrites to read the view, and which is then pushed down whole — reads it instead."""
        if self.catalog.policy.is_ruled(principal, ref):
            raise InvalidArgument(
                f"{ref.qualified} is a live table read through row or column rules: scans, samples "
                f"and profiles of it are not available; query it instead (SELECT … FROM {ref.qualified})"
            )

    # --- PATH: full table scans, split when large --------------------------------------------
    def scan(self, principal: Principal, target: TableScan, *, parts: bool) -> Plan:
        ref = self.require_readable(principal, target.schema, target.table)
        if self.catalog.tables.is_live(ref):
            if not parts and self.catalog.policy.is_ruled(principal, ref):
                # GetSchema: the view's schema (bound on the live table's empty stand-in,
                # nothing sent to Snowflake); a scan itself is refused below.
                schema = live.require_live(self.catalog).bind(
                    self.catalog.policy.relation(principal, ref), (), [ref]
                )
                return Plan("scan", schema, -1, (), (ref,), ref.qualified, timeout=False)
            self._unruled_live(principal, ref)
            live.check_budget(self.catalog, principal)
            return live.scan_plan(
                self.catalog, ref, self.admission.limits_for(principal).max_rows, parts=parts
            )
        if self.catalog.policy.is_ruled(principal, ref):
            return self._ruled_scan(principal, ref, parts=parts)
        if not parts:
            with self.catalog.db.reading() as cur:
                return Plan("scan", table_schema(cur, ref), -1, (), (ref,), ref.qualified, timeout=False)
        cache = self.table_cache
        cached = cache.get(ref, self._version(ref)) if cache.enabled else None
        if cached is not None:
            pieces = self._cached_parts(cached, self._slices(cached.rows), None)
            return Plan("scan", cached.schema, cached.rows, pieces, (ref,), ref.qualified, timeout=False)
        with self.catalog.db.reading() as cur:
            schema = table_schema(cur, ref)
            rows = _count(cur, ref)
            split = rows >= self._split_threshold and not _has_rowid_column(schema)
            fills = cache.admits(ref, self._version(ref), rows, schema)
            if fills and cache.defers:
                # Streamed exactly as uncached; the table is loaded while the data plane is
                # idle (flight_server/table_cache.py "IdleFiller").
                cache.want(ref)
                fills = False
            # The layout: what split parts check at DoGet, and what a fill's entry is keyed by.
            layout = read_layout(cur, ref, begin=True) if split or fills else None
        sql_parts: tuple[SqlPart, ...]
        if split and layout is not None:
            sql_parts, rows = self._split(ref, layout), layout.rows
        else:  # a small table: one endpoint, no layout check needed
            sql_parts = (SqlPart(f"SELECT * FROM {ref.sql}"),)
        fill = cache.begin_fill(ref, layout, len(sql_parts)) if fills and layout is not None else None
        if fill is not None:
            # The first scan: it streams from DuckDB, as any uncached scan, and fills the cache
            # with what it sends (flight_server/table_cache.py "Fill").
            sql_parts = tuple(
                dataclasses.replace(p, fill=fill, fill_index=i) for i, p in enumerate(sql_parts)
            )
        return Plan("scan", schema, rows, sql_parts, (ref,), ref.qualified, timeout=False)

    def _ruled_scan(self, principal: Principal, ref: TableRef, *, parts: bool) -> Plan:
        """A PATH scan of a table read through its rule's view (catalog/views.py): the view's
        schema and row count, never the hot-table cache (it holds the whole table, and is
        filled only by unruled scans), split like a table scan with each rowid range ANDed
        inside the view, where ``rowid`` is the table's."""
        policy = self.catalog.policy
        view = policy.relation(principal, ref)
        with self.catalog.db.reading() as cur:
            version = self.catalog.tables.versions(cur).get(ref.key(), 0)
            schema, rows = policy.views.shape(cur, view, version)
            if not parts:
                return Plan("scan", schema, -1, (), (ref,), ref.qualified, timeout=False)
            stored = _count(cur, ref)
            split = stored >= self._split_threshold and not _has_rowid_column(table_schema(cur, ref))
            layout = read_layout(cur, ref, begin=True) if split else None
        if layout is None:
            return Plan(
                "scan",
                schema,
                rows,
                (SqlPart(f"SELECT * FROM {view}", ruled=True),),
                (ref,),
                ref.qualified,
                timeout=False,
            )
        sql_parts = tuple(
            SqlPart(
                f"SELECT * FROM {policy.relation(principal, ref, rowids=bounds)}", layout=layout, ruled=True
            )
            for bounds in self._rowid_ranges(layout)
        )
        return Plan("scan", schema, rows, sql_parts, (ref,), ref.qualified, timeout=False)

    def _version(self, ref: TableRef) -> int:
        return self.versions.current().get(ref.key(), 0)

    @property
    def _split_threshold(self) -> int:
        return max(self.split.min_split_rows, 2 * self.split.part_rows)

    def _slices(self, rows: int) -> list[tuple[int, int]]:
        """Row ranges of a cached table: as many as a DuckDB scan of it would have endpoints."""
        s = self.split
        count = 1 if rows < self._split_threshold else max(1, min(s.max_parts, rows // max(1, s.part_rows)))
        bounds = [i * rows // count for i in range(count)] + [rows]
        return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(count)]

    def _cached_parts(
        self, entry: CachedTable, slices: list[tuple[int, int]], columns: tuple[str, ...] | None
    ) -> tuple[CachedPart, ...]:
        ref, layout = entry.ref, entry.layout
        select = "*" if columns is None else ", ".join(quote_ident(c) for c in columns)
        held = weakref.ref(entry)
        out = []
        for offset, length in slices:
            # Without the entry, DuckDB reads the same rows: storage order, checked layout
            # (a single endpoint cannot mix versions, so it reads whatever is current).
            fallback = SqlPart(
                f"SELECT {select} FROM {ref.sql} LIMIT {length} OFFSET {offset}",
                layout=layout if len(slices) > 1 else None,
            )
            out.append(CachedPart(held, offset, length, columns, fallback))
        return tuple(out)

    def _rowid_ranges(self, layout: Layout) -> list[tuple[int, int | None]]:
        """``[lo, hi)`` rowid ranges of a split read, aligned to row groups. The last is
        open-ended (``hi`` None): rows appended since the layout was read would fail the layout
        check anyway, but no rowid can ever fall between the parts."""
        s = self.split
        count = max(1, min(s.max_parts, layout.rows // max(1, s.part_rows)))
        span = layout.max_rowid + 1
        align = max(1, s.align_rows)
        bounds: list[int] = []
        for i in range(count):
            lo = (i * span // count) // align * align  # row-group aligned, rounded down
            if not bounds or lo > bounds[-1]:
                bounds.append(lo)
        return [(lo, bounds[i + 1] if i + 1 < len(bounds) else None) for i, lo in enumerate(bounds)]

    def _split(self, ref: TableRef, layout: Layout) -> tuple[SqlPart, ...]:
        out = []
        for lo, hi in self._rowid_ranges(layout):
            where = f"rowid >= {lo}" + (f" AND rowid < {hi}" if hi is not None else "")
            out.append(SqlPart(f"SELECT * FROM {ref.sql} WHERE {where}", layout=layout))
        return tuple(out)

    def _cached_query(self, guarded: GuardedQuery, part: SqlPart) -> Plan | None:
        """A query that only reads columns of a table held by the hot-table cache, unchanged
        and unfiltered (:meth:`SqlGuard.plain_columns`: ``SELECT * FROM t``, ``SELECT a, b FROM
        t``), served from memory like a scan of it: zero-copy slices, split as a scan is, run
        nowhere. Only without the caller's ``max_rows`` or ``params``, and for a table of at
        most ``[limits] max_rows`` rows (nothing to cut). None otherwise."""
        if part.limit is not None or part.params or len(guarded.tables) != 1 or guarded.ruled:
            return None  # a ruled read is a view's rows: never the cached table's
        ref = guarded.tables[0]
        cache = self.table_cache
        if not cache.holds(ref):
            return None
        columns = self.guard.plain_columns(guarded)
        if columns is None:
            return None
        version = self._version(ref)
        held = cache.peek(ref, version)
        if held is None or part.cap is None or held.rows > part.cap:
            return None
        schema, picked = held.schema, None
        if columns:
            try:
                names = resolve_columns(schema, list(columns), ref)
            except InvalidArgument:
                return None  # DuckDB's binder says what is wrong, on the usual path
            if len(names) != len(columns):
                return None
            schema = pa.schema([schema.field(n) for n in names], metadata=schema.metadata)
            picked = tuple(names)
        entry = cache.get(ref, version, count_miss=False)  # counted: it answers
        if entry is None:
            return None
        pieces = self._cached_parts(entry, self._slices(entry.rows), picked)
        label = _query_label(guarded.normalized)
        return Plan(
            "query",
            schema,
            -1,
            pieces,
            guarded.tables,
            label,
            timeout=True,
            row_cap=_uncut(part),
            sql=guarded.shown,
            params=len(part.params),
        )

    def _split_query(
        self, principal: Principal, guarded: GuardedQuery, part: SqlPart, schema: pa.Schema
    ) -> tuple[SqlPart, ...] | None:
        """A large query as parallel endpoints, one per rowid range of its one table, or None.

        Only a plain projection and filter over one base table is split (the guard decides it
        on DuckDB's parse tree: :meth:`SqlGuard.splittable`), only without the caller's own
        ``max_rows`` (a cut must fall at the one exact row), only for a table of at least the
        split threshold and at most ``[limits] max_rows`` rows — such a query yields at most
        one row per table row, so no part, nor all of them together, can pass the server's
        cap: the parts stream uncut, through one generator that reports a runtime error
        mid-stream as a proper Flight error (``SqlPart.label_errors``) — and never for a table
        with a column named ``rowid`` (which hides DuckDB's row id). Every part carries the
        table's layout, checked at DoGet in the snapshot that reads the rows, like a split
        scan: the parts of one FlightInfo never mix data versions. Parts are not stored in
        the result cache (each is a slice; the whole is larger than an entry may be)."""
        if part.limit is not None or len(guarded.tables) != 1 or not self.guard.splittable(guarded):
            return None
        ref = guarded.tables[0]
        with self.catalog.db.reading() as cur:
            rows = _count(cur, ref)
            if rows < self._split_threshold or part.cap is None or rows > part.cap:
                return None
            columns = table_schema(cur, ref)
            if _has_rowid_column(columns):
                return None
            layout = read_layout(cur, ref, begin=True)
        ranges = self._rowid_ranges(layout)
        if len(ranges) < 2:
            return None
        texts = self.guard.rowid_parts(guarded, ranges)
        if texts is None or not self._binds_as(principal, texts[0], part.params, schema):
            return None
        cache = self.table_cache
        if (
            not part.params
            and self.guard.plain_columns(guarded) == ()
            and cache.admits(ref, layout.version, rows, columns)
        ):
            # SELECT * FROM t: the rows of a scan of t, so they fill the hot-table cache as the
            # first scan's do (no cap: a scan has nothing to cut and no expression to fail) —
            # or, filled when idle, queue it like a scan that missed.
            if cache.defers:
                if not cache.holds(ref):
                    cache.want(ref)
                return tuple(SqlPart(t, part.params, layout=layout, label_errors=True) for t in texts)
            fill = cache.begin_fill(ref, layout, len(texts))
            if fill is not None:
                return tuple(SqlPart(t, layout=layout, fill=fill, fill_index=i) for i, t in enumerate(texts))
        return tuple(SqlPart(t, part.params, layout=layout, label_errors=True) for t in texts)

    def _binds_as(self, principal: Principal, sql: str, params: tuple[Any, ...], schema: pa.Schema) -> bool:
        """Whether a written-back part binds to the query's own result schema (a ``LIMIT 0``
        probe, admitted like any planning step): the last check before a query is split, so
        that a quirk of DuckDB's writer that parses alike but binds otherwise keeps it whole."""
        key = (sql, tuple(_param_type(p) for p in params))
        now = time.monotonic()
        hit = self._schemas.get(key)
        if hit is not None and hit[0] > now:
            return hit[1] == schema
        try:
            with self.admission.planning(principal) as (cur, _):
                rel = cur.sql(f"SELECT * FROM (\n{sql}\n) LIMIT 0", params=list(params) or None)
                bound = rel.to_arrow_table().schema
        except (duckdb.Error, ResourceExhausted):
            return False
        self._schemas[key] = (now + self.SCHEMA_CACHE_SECONDS, bound)
        if len(self._schemas) > self.SCHEMA_CACHE_SIZE:
            self._schemas.popitem(last=False)
        return bound == schema

    # --- samples ----------------------------------------------------------------------------
    def sample(self, principal: Principal, cmd: SampleCommand) -> Plan:
        cmds.check_sample(cmd, self.limits)
        ref = self.readable(principal, cmd.table)
        cap = self.limits.max_sample_rows
        policy = self.catalog.policy
        source = policy.relation(principal, ref)  # a ruled table: its view (catalog/views.py)
        ruled = source != ref.sql
        if self.catalog.tables.is_live(ref):
            self._unruled_live(principal, ref)
            live.check_budget(self.catalog, principal)
            return self._live_sample(ref, cmd, cap)
        with self.catalog.db.reading() as cur:
            if ruled:
                version = self.catalog.tables.versions(cur).get(ref.key(), 0)
                schema, rows = policy.views.shape(cur, source, version)
            else:
                schema = table_schema(cur, ref)
            select = "*"
            if cmd.columns is not None:
                names = resolve_columns(schema, cmd.columns, ref)
                schema = pa.schema([schema.field(n) for n in names], metadata=schema.metadata)
                select = ", ".join(quote_ident(n) for n in names)
            if not ruled:
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
            sql = f"SELECT {select} FROM {source} USING SAMPLE {cmd.percent:.12f} PERCENT (bernoulli{seed})"
            # The estimate above is an expectation: the cap holds even for an unlucky draw.
            part = SqlPart(sql, limit=cap, limit_reason="max_sample_rows", ruled=ruled)
            total = -1
        else:
            assert cmd.rows is not None
            cached = self._cached_sample(ref) if cmd.method != "random" and not ruled else None
            if cached is not None:
                columns = tuple(schema.names) if cmd.columns is not None else None
                n = min(cached.rows, cmd.rows)
                pieces = self._cached_parts(cached, [(0, n)], columns)
                return Plan("sample", schema, n, pieces, (ref,), ref.qualified, timeout=True)
            if cmd.method == "random":
                seed = "" if cmd.seed is None else f", {cmd.seed}"
                sql = f"SELECT {select} FROM {source} USING SAMPLE {cmd.rows} ROWS (reservoir{seed})"
            else:
                sql = f"SELECT {select} FROM {source} LIMIT {cmd.rows}"
            part = SqlPart(sql, ruled=ruled)
            total = min(rows, cmd.rows)
        return Plan(
            "sample", schema, total, (part,), (ref,), ref.qualified, timeout=True, row_cap=part.row_cap
        )

    def _live_sample(self, ref: TableRef, cmd: SampleCommand, cap: int) -> Plan:
        """A sample of a live table, pushed down to Snowflake (flight_server/live.py)."""
        names = None
        if cmd.columns is not None:
            names = resolve_columns(live.require_live(self.catalog).describe(ref).schema, cmd.columns, ref)
        return live.sample_plan(
            self.catalog,
            ref,
            columns=names,
            rows=cmd.rows,
            percent=cmd.percent,
            seed=cmd.seed,
            method=cmd.method,
            cap=cap,
        )

    def _cached_sample(self, ref: TableRef) -> CachedTable | None:
        """The cached table for a first-N-rows sample, when it holds the current layout. Only a
        lookup: a sample never fills the cache."""
        cache = self.table_cache
        if not cache.holds(ref):
            return None
        return cache.get(ref, self._version(ref), count_miss=False)

    # --- profiles -------------------------------------------------------------------------------
    def profile(self, principal: Principal, cmd: ProfileCommand) -> Plan:
        ref = self.readable(principal, cmd.table)
        source = self.catalog.policy.relation(principal, ref)  # a ruled table: its view
        if self.catalog.tables.is_live(ref):  # aggregates pushed down (flight_server/live.py)
            self._unruled_live(principal, ref)
            live.check_budget(self.catalog, principal)
            schema = live.require_live(self.catalog).describe(ref).schema
        else:
            with self.catalog.db.reading() as cur:
                schema = cur.sql(f"SELECT * FROM {source} LIMIT 0").to_arrow_table().schema
        columns = None
        count = len(schema)
        if cmd.columns is not None:
            if not cmd.columns:
                raise InvalidArgument("field 'columns' is empty: omit it for every column or name some")
            columns = tuple(resolve_columns(schema, cmd.columns, ref))
            count = len(columns)
        part = ProfilePart(ref, columns, cmd.cached_only, relation=None if source == ref.sql else source)
        return Plan("profile", PROFILE_SCHEMA, count, (part,), (ref,), ref.qualified, timeout=True)

    # --- async results ------------------------------------------------------------------------
    def result(self, principal: Principal, cmd: ResultCommand) -> Plan:
        info = self._queries.result_info(principal, cmd.id)
        return Plan(
            "result",
            info.schema,
            info.rows,
            (ResultPart(cmd.id),),
            (),
            f"result:{cmd.id}",
            False,
            row_cap=info.row_cap,
        )

    # --- artefacts ----------------------------------------------------------------------------------
    def artefact(self, principal: Principal, cmd: ArtefactCommand) -> Plan:
        """A tabular artefact — a table, or a Parquet or Arrow-stream file such as an export —
        with its schema and row count from the store (the file's footer), one endpoint.
        NOT_FOUND when it is not visible, as for an id that never existed; a CSV or NDJSON
        file is INVALID_ARGUMENT. DoGet checks visibility again (it may have been unshared or
        deleted since)."""
        art, schema, rows = self.catalog.artefacts.table_info(principal, cmd.for_read())
        return Plan("artefact", schema, rows, (ArtefactPart(art.id),), (), f"artefact:{art.id}", False)

    # --- SQL -------------------------------------------------------------------------------------
    LARGE_SECONDS = 60.0
    LARGE_SIZE = 1024

    def query(self, principal: Principal, cmd: QueryCommand, *, execute: bool = False) -> Plan:
        """The plan of a query. ``execute`` (GetFlightInfo): start it once here, through the
        :attr:`runner`, and take the schema from its result — unless the same text and
        parameter types recently gave a result larger than the head (then its DoGet runs it,
        possibly split, so the cheaper ``LIMIT 0`` probe gives the schema). A query still
        running when the runner's budget passed is handed over to the ticket's DoGet (one
        endpoint, never split: the run is going); its schema is the reader's, or the probe's
        while DuckDB has not returned one yet. A query that failed in the runner is probed
        (its DoGet reports the failure)."""
        guarded, part = self.query_part(principal, cmd)
        if live.reads_live(self.catalog, guarded.tables):
            return live.query_plan(self.catalog, guarded, part, self.admission, principal)
        params = part.params
        if execute:
            served = self._cached_query(guarded, part)
            if served is not None:
                return served
        shape = (guarded.sql, tuple(_param_type(p) for p in params))
        now = time.monotonic()
        large = self._large.get(shape)
        ran = None
        if execute and self.runner is not None and (large is None or large <= now):
            ran = self.runner.run_at_info(self.admission, principal, guarded.tables, part)
            if ran is not None and not ran[2] and ran[1].held is None:  # more than the head
                self._large[shape] = now + self.LARGE_SECONDS
                if len(self._large) > self.LARGE_SIZE:
                    self._large.popitem(last=False)
        schema: pa.Schema | None = None
        if ran is not None:
            schema, part, _ = ran
        if schema is None:
            schema = self._probed(principal, guarded, part)
        label = _query_label(guarded.normalized)
        if execute and (ran is None or not ran[2]) and part.held is None:  # not read whole: large
            split = self._split_query(principal, guarded, part, schema)
            if split is not None:
                return Plan(
                    "query",
                    schema,
                    -1,
                    split,
                    guarded.tables,
                    label,
                    timeout=True,
                    row_cap=_uncut(part),
                    sql=guarded.shown,
                    params=len(params),
                )
        return Plan(
            "query",
            schema,
            -1,
            (part,),
            guarded.tables,
            label,
            timeout=True,
            row_cap=part.row_cap,
            sql=guarded.shown,
            params=len(params),
        )

    def _probed(self, principal: Principal, guarded: GuardedQuery, part: SqlPart) -> pa.Schema:
        """The binder's schema of a query that failed in the runner or whose handed-over run
        has no reader yet; a refusal stops the handed-over run (there is no ticket to take it)."""
        held = part.held
        try:
            return self.query_schema(principal, guarded, part.params, join=held)
        except BaseException:
            if held is not None:
                held.interrupt()
            raise

    def query_part(self, principal: Principal, cmd: QueryCommand) -> tuple[GuardedQuery, SqlPart]:
        """The checks of a query — its size against ``[limits]``, the guard — and the part
        that runs it under its row cap: the caller's ``max_rows`` as DuckDB's ``LIMIT``, the
        server's cut from the stream (flight_server/plans.py) — the server's cap for this
        principal: ``[limits] max_rows`` or its swarm's override (:meth:`Admission.limits_for`).
        Every path that runs a query starts here (GetFlightInfo, submit-query,
        flight_server/runner.py)."""
        limits = self.admission.limits_for(principal)
        cap = cmds.check_query(cmd, limits.max_rows, limits.max_rows_source)
        guarded = self.check_sql(principal, cmd.sql)
        params = tuple(cmd.params)
        ruled = guarded.ruled
        template = guarded.template
        if cmd.max_rows is not None:
            return guarded, SqlPart(
                guarded.sql, params, limit=cap, normalized=guarded.normalized, ruled=ruled, template=template
            )
        return guarded, SqlPart(
            guarded.sql, params, normalized=guarded.normalized, cap=cap, ruled=ruled, template=template
        )

    def prepare(self, principal: Principal, cmd: QueryCommand) -> PreparedQuery:
        """submit-query: :meth:`query`'s path — the same checks as a ``{"kind": "query"}``
        descriptor (limits, guard, binder), all before anything is queued — as a query the
        :class:`~flight_server.results.QueryManager` runs later. It reads one row more than
        the cap, so the manager cuts the result and knows it did."""
        plan = self.query(principal, cmd)
        part, cap = plan.parts[0], plan.row_cap
        if isinstance(part, LivePart | MixedPart):
            raise InvalidArgument(
                "submit-query of live tables (queried in Snowflake) is not built yet; run it as a "
                "query command (proto_docs/federation.md)"
            )
        assert isinstance(part, SqlPart) and cap is not None  # a query always has a cap
        sql, params = limited(part.sql, cap.max_rows + 1), list(part.params) or None

        def run(cur: duckdb.DuckDBPyConnection) -> pa.RecordBatchReader:
            return cur.sql(sql, params=params).to_arrow_reader(BATCH_ROWS)

        return PreparedQuery(
            run=run,
            sql=plan.sql or part.sql,  # the caller's text, never a rewrite's (filters, masks)
            quote_sql=not part.ruled,
            max_rows=cap.max_rows,
            max_rows_reason=cap.reason,
            tables=tuple(ref.qualified for ref in plan.tables),
        )

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
        # A ruled swarm's verdict is a rewrite for its rules and this principal's bound values.
        key = (scope, sql, self.catalog.policy.rule_scope(principal))
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

    def query_schema(
        self,
        principal: Principal,
        guarded: GuardedQuery,
        params: tuple[Any, ...],
        *,
        join: HeldRun | None = None,
    ) -> pa.Schema:
        """The result schema from DuckDB's binder, without running the query.

        Binding is work (DuckDB folds constant expressions while it binds), so it is admitted
        like a stream and runs under the query timeout (flight_server/admission.py) — in the
        slot of ``join``, the run of this same query GetFlightInfo handed over (its probe is a
        step of that query, not a query of its own).
        Remembered for a few seconds by (text, parameter types): binding costs about as much
        as a point query, and an agent asks the same shape again and again.
        """
        key = (guarded.sql, tuple(_param_type(p) for p in params))
        now = time.monotonic()
        hit = self._schemas.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        self.probes += 1
        with self.admission.planning(principal, join=join.query if join is not None else None) as (
            cur,
            deadline,
        ):
            try:
                # DuckDB plans LIMIT 0 as an empty result: nothing below it executes. Through
                # the engine's submit step as a run is (streams.arrow_stream): the relation API
                # (``cur.sql(q).to_arrow_table()``) would parse and bind it twice, half of the
                # probe's time (tests/bench/PROFILE.md, section 10). The empty stream's schema
                # is the one its rows would have.
                reader = arrow_stream(cur, limited(guarded.sql, 0), params)
                schema = reader.schema
                reader.close()
            except duckdb.Error as e:
                raise duckdb_error(
                    e,
                    timed_out=deadline.fired,
                    timeout_seconds=deadline.seconds,
                    wrapped=True,
                    quote_sql=not guarded.ruled,
                ) from None
        check_result_type(schema)
        self._schemas[key] = (now + self.SCHEMA_CACHE_SECONDS, schema)
        if len(self._schemas) > self.SCHEMA_CACHE_SIZE:
            self._schemas.popitem(last=False)
        return schema


# --- helpers -----------------------------------------------------------------------------------
def _query_label(normalized: str) -> str:
    """``query:`` + the start of the query's digest (the result cache's, remembered per text)."""
    return f"query:{sql_digest(normalized)[:12]}"


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


def _uncut(part: SqlPart) -> RowCap | None:
    """The row cap of a query known not to reach it (split, or served from a held table: at
    most one row per row of a table no longer than the cap) — reported as not cut, so a
    client need not watch the streams for a cut."""
    cap = part.row_cap
    return dataclasses.replace(cap, truncated=False) if cap is not None else None


def _has_rowid_column(schema: pa.Schema) -> bool:
    """A column named ``rowid`` hides DuckDB's row id: such a table is read in one piece."""
    return any(name.lower() == "rowid" for name in schema.names)


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
