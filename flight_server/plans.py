"""What a plan is: the types the planner makes and the streamer reads.

A :class:`Plan` is the answer to GetFlightInfo: the schema, the row count where it is
cheap, and its endpoints (parts), each a :data:`Part` that DoGet turns into a stream — SQL
for DuckDB (:class:`SqlPart`), a column profile (:class:`ProfilePart`), the stored result
of an async query (:class:`ResultPart`), a slice of a table held in memory
(:class:`CachedPart`) or a small table built at planning (:class:`TablePart`: Flight SQL's
metadata listings). Planning is flight_server/planner.py, streaming
flight_server/streams.py; both import this module, which imports neither (nor the server).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

from catalog import TableRef
from catalog.live_sql import Pull
from flight_server.commands import Param
from flight_server.ready import HeldRun, ReadyResult
from flight_server.table_cache import CachedTable, Fill
from flight_server.truncation import CapReason, RowCap
from flight_server.versions import Layout

__all__ = [
    "BATCH_ROWS",
    "ArtefactPart",
    "CachedPart",
    "Layout",
    "LivePart",
    "MixedPart",
    "Part",
    "Plan",
    "PlanKind",
    "ProfilePart",
    "ResultPart",
    "SqlPart",
    "TablePart",
    "limited",
]

# Rows per record batch. Throughput stops growing with the batch size well below this
# (tests/bench/RESULTS.md, "Costs the code relies on"); memory per stream is a few batches,
# so a smaller batch keeps wide rows (long strings) cheap.
BATCH_ROWS = 65_536


@dataclass(frozen=True, slots=True)
class SqlPart:
    sql: str
    params: tuple[Param, ...] = ()
    # At most this many rows, by wrapping the SQL in a LIMIT (the caller's own max_rows: a
    # LIMIT lets DuckDB stop early, e.g. a top-N instead of a full sort). DuckDB is asked for
    # one row more, so that a cut is known exactly (flight_server/truncation.py).
    limit: int | None = None
    layout: Layout | None = None
    # The guard's normalized SQL when the result may be served from the result cache.
    normalized: str | None = None
    # At most this many rows, cut from the stream (the server's [limits] max_rows: wrapping
    # every query in a LIMIT costs DuckDB a tenth of a point query or so, tests/bench/RESULTS.md).
    # The stream is read one batch past the cap, so that a cut is known exactly and reported.
    cap: int | None = None
    # Why ``limit`` applies (``cap`` is always the server's max_rows).
    limit_reason: CapReason = "max_rows"
    # The whole result, already read by GetFlightInfo (a query run once there): the first
    # DoGet streams it from memory, later ones run the SQL (flight_server/ready.py).
    ready: ReadyResult | None = field(default=None, compare=False)
    # The run GetFlightInfo started and handed over, still running: the first DoGet takes it
    # over and streams it, later ones run the SQL (flight_server/ready.py ``HeldRun``).
    held: HeldRun | None = field(default=None, compare=False)
    # The hot-table cache's fill this part feeds (the first scan of a table; its index among
    # the scan's parts): the stream hands over its batches as it sends them (table_cache.py).
    fill: Fill | None = field(default=None, compare=False)
    fill_index: int = 0
    # A query's part that cannot reach a row cap (a split query's range): streamed without a
    # cut, through one generator that turns a runtime error into a labelled Flight error.
    label_errors: bool = False
    # The SQL reads a ruled table's view (catalog/views.py): its text holds the row filter,
    # bound values and masks, so a DuckDB error's quote of the text is dropped.
    ruled: bool = False
    # The guard's shape template of the query (GuardedQuery.template): the result cache
    # decides volatility once per template, not once per fresh text.
    template: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def max_rows(self) -> int | None:
        return self.limit if self.limit is not None else self.cap

    @property
    def row_cap(self) -> RowCap | None:
        """The cap a cut of this part's result is reported against, if any."""
        if self.limit is not None:
            return RowCap(self.limit, self.limit_reason)
        if self.cap is not None:
            return RowCap(self.cap, "server_max_rows")
        return None


@dataclass(frozen=True, slots=True)
class ProfilePart:
    ref: TableRef
    columns: tuple[str, ...] | None
    cached_only: bool = False
    # The view a ruled read profiles (catalog/views.py); None: the table itself.
    relation: str | None = None


@dataclass(frozen=True, slots=True)
class ResultPart:
    id: str


@dataclass(frozen=True, slots=True)
class ArtefactPart:
    """A tabular artefact, streamed from its memory-mapped IPC file (catalog/artefacts.py)."""

    id: str


@dataclass(frozen=True, slots=True)
class CachedPart:
    """Rows ``[offset, offset + length)`` of a table held by the :class:`TableCache`.

    The entry is held weakly, so tickets never keep an evicted table in memory; when it is
    gone, DoGet reads ``fallback`` (the same rows, from DuckDB) instead."""

    entry: weakref.ReferenceType[CachedTable]
    offset: int
    length: int
    columns: tuple[str, ...] | None
    fallback: SqlPart


@dataclass(frozen=True, slots=True)
class TablePart:
    """A small table built whole at planning — a Flight SQL metadata listing (catalogs,
    tables, SqlInfo: flight_server/flight_sql/metadata.py), already filtered to what the
    caller may read — streamed from memory by DoGet."""

    table: pa.Table


@dataclass(frozen=True, slots=True)
class LivePart:
    """A query run in Snowflake (live tables, flight_server/live.py): its Snowflake text with
    the row cap pushed down as ``LIMIT cap + 1``, its bound parameters, and the schema DuckDB's
    binder gave the DuckDB text — every batch Snowflake sends is cast to it."""

    sql: str
    params: tuple[Param, ...]
    schema: pa.Schema
    cap: RowCap
    # A query's normalized SQL: its result may be kept for [live] cache_ttl_seconds unless it
    # calls a volatile function (a scan's or a sample's never is kept).
    normalized: str | None = None


@dataclass(frozen=True, slots=True)
class MixedPart:
    """A query joining live and stored tables (flight_server/live.py): each live table's
    scan pulled from Snowflake (``pulls``: its columns and own filters pushed down), then
    ``sql`` — the caller's query reading the pulled tables instead — run by DuckDB."""

    sql: str
    params: tuple[Param, ...]
    schema: pa.Schema
    cap: RowCap
    pulls: tuple[Pull, ...]
    pull_schemas: tuple[pa.Schema, ...]


Part = SqlPart | ProfilePart | ResultPart | CachedPart | ArtefactPart | TablePart | LivePart | MixedPart
PlanKind = Literal["scan", "sample", "query", "profile", "result", "artefact", "metadata"]


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
    # The row cap known at planning: reported in the FlightInfo's app_metadata.
    row_cap: RowCap | None = None
    # A query's text as the caller sent it and its parameter count (the query log).
    sql: str | None = None
    params: int = 0

    @property
    def app_metadata(self) -> bytes:
        """The FlightInfo's ``app_metadata``: the row cap, when one applies (empty otherwise)."""
        return self.row_cap.info_metadata() if self.row_cap is not None else b""


def limited(sql: str, limit: int | None) -> str:
    """``sql`` capped at ``limit`` rows.

    Text, not the relation API's ``.limit()`` (which costs about a millisecond per query more).
    Sound because ``sql`` is one statement the guard accepted: an unterminated comment, string
    or parenthesis is a syntax error on its own, so nothing in it can reach past the newline
    into the wrapper, and the wrapper names no table. The newline also ends a trailing ``--``
    comment. DuckDB's ``LINE n`` in errors is then one more than in the caller's text
    (:data:`~flight_server.errors.WRAP_LINES`)."""
    if limit is None:
        return sql
    return f"SELECT * FROM (\n{sql}\n) LIMIT {int(limit)}"
