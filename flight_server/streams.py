"""DoGet: one endpoint of a plan becomes a Flight stream fed by DuckDB.

The stream is DuckDB's Arrow ``RecordBatchReader`` handed to ``flight.RecordBatchStream``:
the gRPC thread pulls batches from DuckDB in C++; Python never sees a row, and memory stays
bounded by a few batches whatever the result size (gRPC flow control pauses DuckDB when the
client reads slowly).

Lifetime. Everything a stream holds — its cursor, its query deadline, its concurrency slot —
is released by the middleware's ``call_completed``, which Flight calls when the stream ends,
fails or the client goes away. ``to_arrow_reader`` runs blocking operators (sorts,
aggregates, joins) before it returns, so most timeouts and errors are raised here, inside the
handler, as a proper Flight error with ``extra_info``. A query interrupted *after* its first
batch fails inside the C++ stream instead; the client then sees a FlightServerError whose
message contains ``INTERRUPT Error: Interrupted!`` (Quiver's client maps it to
DEADLINE_EXCEEDED; proto_docs/errors.md explains).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import structlog

from catalog import Catalog, Unavailable
from catalog.database import SYSTEM_SCHEMA
from flight_server.cache import ResultCache
from flight_server.endpoints import Plan, ProfilePart, ResultPart, SqlPart, read_layout
from flight_server.errors import duckdb_error, stream_error
from flight_server.limits import Deadline, Watchdog
from flight_server.middleware import CallState
from flight_server.profiles import ProfileCache
from flight_server.results import QueryManager

log = structlog.get_logger("flight_server")

# Rows per record batch. Throughput is flat from ~32k rows up (measured on the 2-core VM);
# memory per stream is a few batches, so a smaller batch keeps wide rows (long strings) cheap.
BATCH_ROWS = 65_536


class Streamer:
    def __init__(
        self,
        catalog: Catalog,
        watchdog: Watchdog,
        profiles: ProfileCache,
        queries: QueryManager,
        cache: ResultCache,
    ) -> None:
        self.catalog = catalog
        self.watchdog = watchdog
        self.profiles = profiles
        self._queries = queries
        self.cache = cache
        self.versions = VersionWatch(catalog.db.path)

    @property
    def timeout(self) -> float:
        return float(self.catalog.config.limits.query_timeout_seconds)

    def open(self, plan: Plan, index: int, state: CallState) -> flight.FlightDataStream:
        part = plan.parts[index]
        if isinstance(part, ResultPart):
            assert state.principal is not None
            _, reader, _ = self._queries.open_result(state.principal, part.id)
            return flight.RecordBatchStream(reader)
        cur = self.catalog.db.cursor()
        state.cleanups.append(cur.close)
        deadline: Deadline | None = None
        if plan.timeout:
            deadline = self.watchdog.arm(self.timeout, cur.interrupt)
            state.deadline = deadline
            state.cleanups.append(lambda: Watchdog.disarm(deadline))  # type: ignore[arg-type]
        try:
            if isinstance(part, ProfilePart):
                table = self.profiles.profile(part.ref, part.columns, cursor=cur)
                return flight.RecordBatchStream(table)
            if part.normalized is not None:
                return self._cached(cur, plan, part, state, deadline)
            return flight.RecordBatchStream(self._sql(cur, part))
        except duckdb.Error as e:
            raise duckdb_error(
                e,
                timed_out=deadline is not None and deadline.fired,
                timeout_seconds=self.timeout,
                wrapped=isinstance(part, SqlPart) and part.limit is not None,
            ) from None

    def _cached(
        self,
        cur: duckdb.DuckDBPyConnection,
        plan: Plan,
        part: SqlPart,
        state: CallState,
        deadline: Deadline | None,
    ) -> flight.FlightDataStream:
        """A query through the result cache, keyed by the data versions of its tables
        (:class:`VersionWatch`: read before the query runs, so the rows are of that version
        or newer — a newer version seen later drops the entry).

        A miss is streamed through the cache's tee, a Python generator: an error it raises
        mid-stream would reach the client as a Python traceback. So the tee feeds a
        ``GeneratorStream``, whose generator turns any failure into the FlightError of
        DESIGN.md §5 (a timeout mid-stream is then DEADLINE_EXCEEDED with extra_info)."""
        assert part.normalized is not None
        versions: dict[Any, int] = {}
        if plan.tables:
            current = self.versions.current(cur)
            versions = {ref.key(): current.get(ref.key(), 0) for ref in plan.tables}
        key = self.cache.key(part.normalized, part.params, part.limit, versions)
        entry = self.cache.get(key) if key is not None else None
        if entry is not None:
            reader = self.cache.open(entry)
            if reader is not None:
                state.fields["cache"] = "hit"
                return flight.RecordBatchStream(reader)
        state.fields["cache"] = "miss" if key is not None else "off"
        reader = self._sql(cur, part)
        if key is None:
            return flight.RecordBatchStream(reader)
        teed = self.cache.tee(key, reader)
        timeout, request_id = self.timeout, state.request_id
        wrapped = part.limit is not None

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from teed
            except Exception as e:  # noqa: BLE001 - every failure becomes a FlightError
                raise stream_error(
                    e,
                    request_id,
                    timed_out=deadline is not None and deadline.fired,
                    timeout_seconds=timeout,
                    wrapped=wrapped,
                ) from None

        return flight.GeneratorStream(teed.schema, batches())

    @staticmethod
    def _sql(cur: duckdb.DuckDBPyConnection, part: SqlPart) -> Any:
        if part.layout is not None:
            # The layout check and the rows share one snapshot: the transaction stays open
            # (read-only) until the cursor is closed at the end of the stream.
            cur.execute("BEGIN TRANSACTION")
            now = read_layout(cur, part.layout.ref, begin=False)
            if now != part.layout:
                log.info(
                    "scan.layout_changed",
                    table=part.layout.ref.qualified,
                    version=part.layout.version,
                    now=now.version,
                )
                raise Unavailable(
                    f"table {part.layout.ref.qualified} changed since GetFlightInfo; call "
                    "GetFlightInfo again (the endpoints of one FlightInfo never mix data versions)"
                )
        return cur.sql(limited(part.sql, part.limit), params=list(part.params) or None).to_arrow_reader(
            BATCH_ROWS
        )


class VersionWatch:
    """The data versions of every table, read from the catalog only when the database may
    have changed.

    Reading ``_quiver.data_versions`` is a DuckDB query (about half a millisecond here), more
    than a cache hit or a point query's own work. Every commit that changes data writes the
    DuckDB file or its WAL (durability), so while neither file's size and mtime changed, the
    versions read last are still current. The file times are coarse (a few ms), so the
    versions are also re-read at least every ``max_age`` seconds whatever the files say.
    The stat is taken *before* the read, so a commit racing with the read is seen next time.
    """

    def __init__(self, path: Path, max_age: float = 1.0) -> None:
        self._files = (path, path.with_name(path.name + ".wal"))
        self.max_age = max_age
        self._lock = threading.Lock()
        self._state: tuple[tuple[int, ...], float, dict[tuple[str, str], int]] | None = None

    def _stamp(self) -> tuple[int, ...]:
        out: list[int] = []
        for f in self._files:
            try:
                st = os.stat(f)
                out += (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                out += (0, -1, 0)
        return tuple(out)

    def current(self, cur: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], int]:
        stamp, now = self._stamp(), time.monotonic()
        state = self._state
        if state is not None and state[0] == stamp and now - state[1] < self.max_age:
            return state[2]
        rows = cur.execute(
            f"SELECT lower(schema_name), lower(table_name), version FROM {SYSTEM_SCHEMA}.data_versions"
        ).fetchall()
        versions = {(s, t): int(v) for s, t, v in rows}
        with self._lock:
            self._state = (stamp, now, versions)
        return versions


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
