"""The query port: how a listener other than Flight runs agent SQL without importing
``flight_server``.

The control plane's ``POST /v1/query`` (and artefact refresh, and MCP later) must run agent
SQL through exactly the path a Flight ``{"kind": "query"}`` takes — the request checks, the
SQL guard, the admission path, the query timeout, the row cap and its exact cut, the result
cache — not a second one. The dependency rule (ARCHITECTURE.md) forbids the control plane to
import the data plane, so the contract lives here: :class:`QueryRunner` is implemented by
``flight_server`` (flight_server/runner.py) on top of its planner and streamer, and the process
wiring (quiver/runtime.py) hands it to the catalog as :attr:`catalog.Catalog.queries`.

A run answers a :class:`RunningQuery`: an Arrow ``RecordBatchReader`` still fed by DuckDB
(nothing is materialised beyond the head the streamer always reads), what the row cap is and
whether it cut the result, the data versions of the tables it read (provenance), and
:meth:`RunningQuery.close`, which gives back everything the run holds — its admission slot,
its cursor, its deadline. The caller must close it, whether it read the result to its end,
failed, or its own client went away; closing twice is harmless.

Failures are :class:`~catalog.errors.QuiverError` subclasses with the codes of
proto_docs/errors.md: raised by :meth:`QueryRunner.run` before any row is read (refusals,
binder errors, admission, a timeout while the head is read), and by the reader's iteration
for a failure in the middle of the stream.

Samples and profiles (the MCP tools ``sample_table``, ``profile_table``,
``describe_table``) go through :meth:`QueryRunner.read`: the body of a Flight ``sample`` or
``profile`` command, planned and run by the data plane as a Flight call would be (the same
checks, allowlist, admission slot and timeout), answered whole: both are bounded by
``[limits] max_sample_rows`` or by the table's column count.

The query log (catalog/query_log.py, proto_docs/governance.md): a run or read given a ``via``
(the listener's label: ``mcp``, ``http``) is recorded by the runner itself — one record per
run, refused or run, charged to the swarm's budgets — so no listener can run agent SQL
without it. A run's record is written when it is closed, with what the caller reported it
sent (:meth:`RunningQuery.sent`) and how it ended (:meth:`RunningQuery.failed`); a caller
that records the request itself (a Flight call, whose middleware records every call) passes
no ``via``, and the run is recorded once, there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pyarrow as pa

from catalog.identity import Principal
from catalog.query_log import RemoteWork
from catalog.tables import TableRef

#: Why a result has a row cap: the server's ``[limits] max_rows`` or the caller's ``max_rows``
#: (the ``reason`` of proto_docs/descriptors.md, "Cut results").
CapReason = Literal["server_max_rows", "max_rows", "max_sample_rows"]


@dataclass(eq=False)
class RunningQuery:
    """One run of agent SQL, admitted and streaming.

    ``truncated`` is known (True/False) when the run read the whole result before returning
    (a small result, or a result cache hit); otherwise it is None until ``reader`` has been
    read to its end, when :meth:`cut` tells. ``versions`` holds the data version
    (``_quiver.data_versions``) of every table the query read, taken before it ran: the rows
    are of that version or newer.
    """

    reader: pa.RecordBatchReader
    max_rows: int
    reason: CapReason
    tables: tuple[TableRef, ...]
    versions: dict[str, int]
    #: The SQL as the guard normalized it, and the parameters as bound.
    sql: str
    params: tuple[Any, ...]
    truncated: bool | None
    _cut: Callable[[], bool | None] | None = None
    _release: Callable[[], None] | None = None
    #: Writes the query-log record on close (the runner sets it for a run given a ``via``):
    #: called with the rows and bytes sent and the error code (None: ok).
    _record: Callable[[int | None, int | None, str | None], None] | None = None
    _rows: int | None = None
    _bytes: int | None = None
    _code: str | None = None
    #: What the run sent to Snowflake (a query of live tables): its query ids, for the record.
    remote: RemoteWork | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def schema(self) -> pa.Schema:
        return self.reader.schema

    def cut(self) -> bool | None:
        """Whether the row cap cut the result: known at once, or once the reader is done."""
        if self.truncated is not None:
            return self.truncated
        return self._cut() if self._cut is not None else None

    def record_with(self, record: Callable[[int | None, int | None, str | None], None]) -> None:
        """Have :meth:`close` write the run's query-log record with ``record`` (the runner,
        for a run given a ``via``): called once, with the rows and bytes sent and the code."""
        self._record = record

    def sent(self, rows: int, nbytes: int) -> None:
        """What the caller sent its client of this result (rows, bytes in its format): the
        query log's ``rows`` and ``bytes`` and what the budgets are charged."""
        self._rows, self._bytes = rows, nbytes

    def failed(self, code: str) -> None:
        """The run did not end well (a failure mid-stream, the client went away): the code
        its record gets."""
        self._code = code

    def close(self) -> None:
        """Give back the admission slot, the cursor and the deadline, then write the run's
        query-log record if the runner keeps it (idempotent: one record)."""
        with self._lock:
            release, self._release = self._release, None
            record, self._record = self._record, None
        if release is not None:
            release()
        if record is not None:
            record(self._rows, self._bytes, self._code)


class QueryRunner(Protocol):
    """Runs agent SQL as ``principal`` through the data plane's one query path."""

    def run(
        self,
        principal: Principal,
        sql: str,
        params: Sequence[Any] = (),
        max_rows: int | None = None,
        *,
        timeout_seconds: float | None = None,
        via: str | None = None,
        kind: str = "query",
        request_id: str | None = None,
    ) -> RunningQuery:
        """Check, admit and start ``sql``; the caller reads ``reader`` and must ``close()``.
        ``max_rows`` is the caller's cap (1 to ``[limits] max_rows``); without it the
        server's ``[limits] max_rows`` applies. ``timeout_seconds`` replaces ``[limits]
        query_timeout_seconds`` for work the server runs in the background on its own
        bounded workers (an async export: ``[results] timeout_seconds``). ``via``: record the
        run in the query log under that label, as ``kind`` (``query``, ``export``), with the
        listener's ``request_id``; None: the caller records it (see the module docs)."""
        ...

    def read(self, principal: Principal, command: dict[str, Any], *, via: str | None = None) -> pa.Table:
        """The whole result of a ``sample`` or ``profile`` command (proto_docs/descriptors.md)
        as ``principal``; any other kind is INVALID_ARGUMENT. ``via`` as for :meth:`run`
        (the record's kind is the command's)."""
        ...
