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

from typing import Any

import duckdb
import pyarrow.flight as flight
import structlog

from catalog import Catalog, Unavailable
from flight_server.endpoints import Plan, ProfilePart, ResultPart, SqlPart, read_layout
from flight_server.errors import duckdb_error
from flight_server.limits import Deadline, Watchdog
from flight_server.middleware import CallState
from flight_server.profiles import ProfileCache
from flight_server.results import QueryManager

log = structlog.get_logger("flight_server")

BATCH_ROWS = 122_880  # DuckDB's vector-aligned row group size; larger batches change nothing


class Streamer:
    def __init__(
        self,
        catalog: Catalog,
        watchdog: Watchdog,
        profiles: ProfileCache,
        queries: QueryManager,
    ) -> None:
        self.catalog = catalog
        self.watchdog = watchdog
        self.profiles = profiles
        self._queries = queries

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
            return flight.RecordBatchStream(self._sql(cur, part))
        except duckdb.Error as e:
            raise duckdb_error(
                e,
                timed_out=deadline is not None and deadline.fired,
                timeout_seconds=self.timeout,
                wrapped=isinstance(part, SqlPart) and part.limit is not None,
            ) from None

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
        rel = cur.sql(part.sql + "\n", params=list(part.params) or None)
        if part.limit is not None:
            rel = rel.limit(part.limit)
        return rel.to_arrow_reader(BATCH_ROWS)
