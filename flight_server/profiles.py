"""Column profiles: one row of statistics per column, computed inside DuckDB.

A profile answers "what is in this table?" without the agent reading it: counts, NULLs,
approximate distinct values, min/max, mean/stddev and quartiles for numbers and times, and
the most frequent values of low-cardinality columns. It is computed in at most two scans
(one aggregate query over every column at once, then one ``histogram`` query over the
columns found to have few distinct values), never by looping over rows in Python. Sketches
(HyperLogLog for distinct counts, T-Digest for quartiles) keep memory flat on large tables;
the figures are therefore approximate where the column name says so (``approx_distinct``)
and for quartiles of large tables.

Profiles are cached per table *data version* (``_quiver.data_versions``, bumped by every
writer in the transaction that changes the table): a second profile of an unchanged table
costs no scan, and a new version makes the next request recompute.

Interface used by the Flight server::

    profiles = ProfileCache.for_catalog(catalog)
    table = profiles.profile(ref, columns=None, cursor=None)    # -> pa.Table (PROFILE_SCHEMA)
    profiles.stats()                                             # -> dict for /v1/status

``profile_table(cur, ref, columns)`` is the uncached computation on a given cursor.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import structlog

from catalog import Catalog, InvalidArgument, TableRef
from catalog.database import Database, quote_ident, quote_literal
from catalog.status import ProfilesStatus
from catalog.tables import TableCatalog

log = structlog.get_logger(__name__)

#: Columns with at most this many (approximately counted) distinct values get ``top_values``.
TOP_VALUES_MAX_DISTINCT = 50
#: min/max/quartile strings longer than this are cut (a profile describes, it does not copy).
MAX_VALUE_CHARS = 256
#: Exact quartiles (``quantile_disc``) buffer every value of every quartile column; above
#: this many buffered values (rows x such columns) the bounded T-Digest sketch is used.
EXACT_QUARTILE_MAX_VALUES = 20_000_000

TOP_VALUE_TYPE = pa.struct([("value", pa.string()), ("count", pa.int64())])

PROFILE_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),  # rows in the table
        pa.field("nulls", pa.int64(), nullable=False),
        pa.field("null_fraction", pa.float64()),  # NULL when the table is empty
        pa.field("approx_distinct", pa.int64()),
        pa.field("min", pa.string()),
        pa.field("max", pa.string()),
        pa.field("mean", pa.float64()),
        pa.field("stddev", pa.float64()),
        pa.field("q25", pa.string()),
        pa.field("q50", pa.string()),
        pa.field("q75", pa.string()),
        pa.field("top_values", pa.list_(TOP_VALUE_TYPE)),
    ],
    metadata={
        "quiver.profile": "one row per column; approx_distinct (HyperLogLog) is approximate; "
        "min/max/quartiles are rendered as text; top_values only for columns with at most "
        f"{TOP_VALUES_MAX_DISTINCT} distinct values; quartiles are exact values of the column "
        "unless quiver.quartiles says approximate (T-Digest, for large tables)"
    },
)

# What each DuckDB type (``DuckDBPyType.id``) supports. Types not named here (and any type
# whose statistics fail to bind) get count, nulls and approx_distinct only.
_NUMERIC = frozenset(
    {
        "tinyint",
        "smallint",
        "integer",
        "bigint",
        "hugeint",
        "utinyint",
        "usmallint",
        "uinteger",
        "ubigint",
        "uhugeint",
        "float",
        "double",
        "decimal",
        "bignum",
    }
)
_TEMPORAL = frozenset(
    {
        "date",
        "time",
        "time_ns",
        "timestamp",
        "timestamp_s",
        "timestamp_ms",
        "timestamp_ns",
        "timestamp with time zone",
        "time with time zone",
    }
)
_ORDERED = frozenset({"boolean", "varchar", "uuid", "blob", "enum", "bit", "interval"})
_NESTED = frozenset({"list", "struct", "map", "array", "union"})


@dataclass(frozen=True, slots=True)
class _Column:
    ordinal: int
    name: str
    type: str
    kind: str  # numeric | temporal | ordered | nested | other


def _kind(type_id: str) -> str:
    if type_id in _NUMERIC:
        return "numeric"
    if type_id in _TEMPORAL:
        return "temporal"
    if type_id in _ORDERED:
        return "ordered"
    if type_id in _NESTED:
        return "nested"
    return "other"


def _text(expr: str) -> str:
    return f"left(({expr})::VARCHAR, {MAX_VALUE_CHARS})"


def _aggregates(col: _Column, full: bool, exact: bool = True) -> list[tuple[str, str]]:
    """(alias suffix, aggregate expression) for one column; ``full=False`` is the safe
    minimum every type supports."""
    c = quote_ident(col.name)
    out = [("n", f"count({c})")]
    if col.kind == "other" and not full:
        return out
    out.append(("d", f"approx_count_distinct({c})"))
    if not full or col.kind in ("nested", "other"):
        return out
    out += [("min", _text(f"min({c})")), ("max", _text(f"max({c})"))]
    if col.kind == "numeric":
        out += [("mean", f"avg({c})::DOUBLE"), ("sd", f"stddev_samp({c})::DOUBLE")]
    if col.type == "BOOLEAN":
        out.append(("mean", f"avg({c}::INTEGER)::DOUBLE"))
    if col.kind in ("numeric", "temporal"):
        fn = "quantile_disc" if exact else "approx_quantile"
        out.append(("q", f"{fn}({c}, [0.25, 0.5, 0.75])::VARCHAR[]"))
    return out


def _row_struct(col: _Column, present: set[str]) -> str:
    p = f"c{col.ordinal}_"

    def field(suffix: str, sql_type: str, expr: str | None = None) -> str:
        if suffix in present:
            return expr or p + suffix
        return f"NULL::{sql_type}"

    nulls = f"(qv_rows - {p}n)"
    quartile = [f"left({p}q[{i}], {MAX_VALUE_CHARS})" for i in (1, 2, 3)]
    fields = {
        "ordinal": str(col.ordinal),
        "name": quote_literal(col.name),
        "type": quote_literal(col.type),
        "count": "qv_rows",
        "nulls": nulls,
        "null_fraction": f"{nulls}::DOUBLE / nullif(qv_rows, 0)",
        "approx_distinct": field("d", "BIGINT", f"least({p}d, {p}n)::BIGINT"),
        "min": field("min", "VARCHAR"),
        "max": field("max", "VARCHAR"),
        "mean": field("mean", "DOUBLE"),
        "stddev": field("sd", "DOUBLE"),
        "q25": field("q", "VARCHAR", quartile[0]),
        "q50": field("q", "VARCHAR", quartile[1]),
        "q75": field("q", "VARCHAR", quartile[2]),
    }
    return "{" + ", ".join(f"{quote_literal(k)}: {v}" for k, v in fields.items()) + "}"


def _binds(cur: duckdb.DuckDBPyConnection, source: str, exprs: list[str]) -> bool:
    try:
        cur.execute(f"SELECT {', '.join(exprs)} FROM {source} LIMIT 0").fetchall()
    except duckdb.Error:
        return False
    return True


def table_columns(cur: duckdb.DuckDBPyConnection, source: str) -> list[tuple[str, str, str]]:
    """(name, DuckDB type, type id) of every column, from the catalog (no scan)."""
    rel = cur.sql(f"SELECT * FROM {source} LIMIT 0")
    return [(n, str(t), t.id) for n, t in zip(rel.columns, rel.dtypes, strict=True)]


def _select_columns(
    available: list[tuple[str, str, str]], wanted: Sequence[str] | None, ref: TableRef
) -> list[_Column]:
    cols = [_Column(i, n, t, _kind(tid)) for i, (n, t, tid) in enumerate(available)]
    if wanted is None:
        return cols
    by_name = {c.name.lower(): c for c in cols}
    missing = [w for w in wanted if w.lower() not in by_name]
    if missing:
        raise InvalidArgument(
            f"unknown column(s) {', '.join(repr(m) for m in missing)} in {ref.qualified}; "
            f"its columns are: {', '.join(c.name for c in cols)}"
        )
    seen: dict[int, _Column] = {}
    for w in wanted:
        col = by_name[w.lower()]
        seen.setdefault(col.ordinal, col)
    return list(seen.values())


def profile_table(
    cur: duckdb.DuckDBPyConnection,
    ref: TableRef,
    columns: Sequence[str] | None = None,
    relation: str | None = None,
) -> pa.Table:
    """Profile ``ref`` (already authorized) on ``cur``: one row per column, PROFILE_SCHEMA.

    Runs in the caller's transaction when there is one, so the figures describe one
    snapshot. Interrupting ``cur`` interrupts the scan.
    """
    source = relation or ref.sql  # a ruled table's view (catalog/views.py): its rows and columns only
    cols = _select_columns(table_columns(cur, source), columns, ref)
    # count(*) of a table is answered from DuckDB's row-group metadata, without a scan.
    rows = int(cur.execute(f"SELECT count(*) FROM {source}").fetchall()[0][0])
    quartile_cols = sum(1 for c in cols if c.kind in ("numeric", "temporal"))
    exact = rows * quartile_cols <= EXACT_QUARTILE_MAX_VALUES
    # Pass 1: every statistic of every column in one aggregate query.
    per_col: dict[int, list[tuple[str, str]]] = {}
    for col in cols:
        full = _aggregates(col, full=True, exact=exact)
        if col.kind in ("nested", "other") and not _binds(cur, source, [e for _, e in full]):
            full = _aggregates(col, full=False)
        per_col[col.ordinal] = full
    if not _binds(cur, source, [e for aggs in per_col.values() for _, e in aggs]):
        # A type we classified wrongly: find it and fall back to the safe minimum for it.
        for col in cols:
            if not _binds(cur, source, [e for _, e in per_col[col.ordinal]]):
                per_col[col.ordinal] = _aggregates(col, full=False)
    select = ["count(*) AS qv_rows"]
    for ordinal, aggs in per_col.items():
        select += [f"{expr} AS c{ordinal}_{suffix}" for suffix, expr in aggs]
    structs = ", ".join(_row_struct(col, {suffix for suffix, _ in per_col[col.ordinal]}) for col in cols)
    sql = f"SELECT unnest([{structs}], recursive := true) FROM (SELECT {', '.join(select)} FROM {source})"
    stats = cur.sql(sql).to_arrow_table()

    # Pass 2: value frequencies, only for columns with few distinct values.
    distinct = stats.column("approx_distinct").to_pylist()
    ordinals = stats.column("ordinal").to_pylist()
    low = [
        col
        for col, d in zip(cols, distinct, strict=True)
        if col.kind in ("numeric", "temporal", "ordered")
        and d is not None
        and 0 < d <= TOP_VALUES_MAX_DISTINCT
    ]
    top_column = pa.nulls(len(cols), pa.list_(TOP_VALUE_TYPE))
    if low:
        parts = ", ".join(f"{{'ordinal': {col.ordinal}, 'top': {_top_values(col)}}}" for col in low)
        top = cur.sql(f"SELECT unnest([{parts}], recursive := true) FROM {source}").to_arrow_table()
        position = {o: i for i, o in enumerate(top.column("ordinal").to_pylist())}
        take = pa.array([position.get(o) for o in ordinals], pa.int64())
        top_column = top.column("top").combine_chunks().take(take).cast(pa.list_(TOP_VALUE_TYPE))
    out = stats.drop_columns(["ordinal"]).append_column("top_values", top_column)
    metadata = dict(PROFILE_SCHEMA.metadata or {})
    metadata[b"quiver.quartiles"] = b"exact" if exact else b"approximate"
    return out.cast(PROFILE_SCHEMA).replace_schema_metadata(metadata)


def _top_values(col: _Column) -> str:
    """The most frequent values (as text) with their counts, most frequent first, ties by
    value; NULLs are counted in ``nulls``, not here."""
    c = quote_ident(col.name)
    return (
        f"list_transform(list_sort(list_transform(map_entries(histogram({c}::VARCHAR)), "
        "lambda qv_e: {'n': -(qv_e.value::BIGINT), 'v': qv_e.key})), "
        "lambda qv_s: {'value': qv_s.v, 'count': -qv_s.n})"
        f"[1:{TOP_VALUES_MAX_DISTINCT}]"
    )


# --- cache ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    version: int
    table: pa.Table


class ProfileCache:
    """Profiles by (table, data version, columns); LRU-bounded in entries (profiles are small).

    Concurrent requests for the same missing profile compute it once: the others wait for
    the first. ``computed`` counts real computations (scans), ``hits`` cache answers.
    """

    def __init__(self, db: Database, tables: TableCatalog, *, max_entries: int = 512) -> None:
        self._db = db
        self._tables = tables
        self._max = max_entries
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[Any, ...], threading.Lock] = {}
        self.hits = 0
        self.computed = 0

    @classmethod
    def for_catalog(cls, catalog: Catalog) -> ProfileCache:
        """A cache over the catalog's database (its :meth:`stats` are /v1/status "profiles")."""
        return cls(catalog.db, catalog.tables)

    def profile(
        self,
        ref: TableRef,
        columns: Sequence[str] | None = None,
        *,
        cursor: duckdb.DuckDBPyConnection | None = None,
        relation: str | None = None,
    ) -> pa.Table:
        """The profile of ``ref`` (the caller has checked it is readable); ``relation``: the
        view of a ruled read (catalog/views.py), which the entry is keyed on with the version.

        ``cursor``: run on this cursor (so the caller can interrupt it on timeout); by
        default a cursor of its own. The version and the statistics are read in one
        transaction, so a cached profile is exactly the profile of that version.
        """
        wanted = None if columns is None else tuple(dict.fromkeys(c.lower() for c in columns))
        key = (ref.key(), wanted, relation)
        version = self._current_version(ref, cursor)
        hit = self._lookup(key, version)
        if hit is not None:
            return hit
        with self._lock:
            gate = self._inflight.setdefault(key, threading.Lock())
        with gate:
            # Someone may have computed it while we waited.
            hit = self._lookup(key, version, count=True)
            if hit is not None:
                return hit
            try:
                computed_version, table = self._compute(ref, columns, cursor, relation)
            finally:
                with self._lock:
                    self._inflight.pop(key, None)
            self._store(key, ref, computed_version, table)
            return table

    def cached(
        self,
        ref: TableRef,
        columns: Sequence[str] | None = None,
        *,
        cursor: duckdb.DuckDBPyConnection | None = None,
        relation: str | None = None,
    ) -> pa.Table | None:
        """The profile of ``ref`` when it is cached for the current data version, else None
        (nothing is computed)."""
        wanted = None if columns is None else tuple(dict.fromkeys(c.lower() for c in columns))
        return self._lookup((ref.key(), wanted, relation), self._current_version(ref, cursor))

    def _lookup(self, key: tuple[Any, ...], version: int, *, count: bool = True) -> pa.Table | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != version:
                return None
            self._entries.move_to_end(key)
            if count:
                self.hits += 1
            return entry.table

    def _current_version(self, ref: TableRef, cursor: duckdb.DuckDBPyConnection | None) -> int:
        if cursor is not None:
            return self._tables.versions(cursor).get(ref.key(), 0)
        return self._tables.version(ref)

    def _compute(
        self,
        ref: TableRef,
        columns: Sequence[str] | None,
        cursor: duckdb.DuckDBPyConnection | None,
        relation: str | None = None,
    ) -> tuple[int, pa.Table]:
        started = time.perf_counter()
        own = cursor is None
        cur = self._db.cursor() if cursor is None else cursor
        try:
            cur.execute("BEGIN TRANSACTION")
            try:
                version = self._tables.versions(cur).get(ref.key(), 0)
                table = profile_table(cur, ref, columns, relation)
            finally:
                with suppress(duckdb.Error):
                    cur.execute("ROLLBACK")  # read-only: nothing to commit
        finally:
            if own:
                cur.close()
        with self._lock:
            self.computed += 1
        log.info(
            "profile.computed",
            table=ref.qualified,
            version=version,
            columns=table.num_rows,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return version, table

    def _store(self, key: tuple[Any, ...], ref: TableRef, version: int, table: pa.Table) -> None:
        with self._lock:
            # A new version makes every older profile of the table useless: drop them now.
            stale = [k for k, e in self._entries.items() if k[0] == ref.key() and e.version < version]
            for k in stale:
                del self._entries[k]
            current = self._entries.get(key)
            if current is not None and current.version > version:
                return
            self._entries[key] = _Entry(version, table)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def stats(self) -> ProfilesStatus:
        with self._lock:
            return ProfilesStatus(entries=len(self._entries), hits=self.hits, computed=self.computed)
