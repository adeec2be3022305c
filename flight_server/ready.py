"""Ready results: a query's whole result, read at GetFlightInfo, held for the DoGet that follows.

GetFlightInfo of a ``query`` command runs the query once and reads the head of its result
(flight_server/streams.py, :meth:`~flight_server.streams.Streamer.run_at_info`). When that head
is the whole result — a point query, an aggregate — the FlightInfo's schema is the result's own,
and the rows are kept here, with the ticket, so that its DoGet streams them from memory: no
second planning pass, no cursor (proto_docs/tickets.md, rule 5).

A ready result is *one-shot*: the first DoGet of the ticket takes it; a later DoGet of the same
ticket runs the query again (or is a result-cache hit). Held rows are bounded: each result is at
most the result cache's memory-entry size (about 1 MiB), all of them together at most
:data:`READY_BUDGET_BYTES`; a result that does not fit is simply not held (its DoGet runs the
query, as before), and one whose ticket is never redeemed is dropped when the ticket expires.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import pyarrow as pa

from catalog.clock import SYSTEM_CLOCK, Clock

__all__ = ["READY_BUDGET_BYTES", "ReadyPool", "ReadyResult"]

#: Bytes of ready results held at once, all tickets together.
READY_BUDGET_BYTES = 64 * 1024 * 1024
#: Ready results held at once (a bound on bookkeeping for many tiny results).
READY_MAX_COUNT = 100_000


class ReadyResult:
    """One query result read whole at GetFlightInfo; :meth:`take` hands it out once."""

    __slots__ = ("_batches", "_pool", "expires", "schema", "size", "truncated")

    def __init__(
        self,
        pool: ReadyPool,
        schema: pa.Schema,
        batches: tuple[pa.RecordBatch, ...],
        size: int,
        truncated: bool,
        expires: float,
    ) -> None:
        self._pool = pool
        self.schema = schema
        self._batches: tuple[pa.RecordBatch, ...] | None = batches
        self.size = size
        self.truncated = truncated
        self.expires = expires

    def take(self) -> tuple[pa.RecordBatch, ...] | None:
        """The batches, the first time only (None afterwards, or once dropped)."""
        return self._pool.take(self)

    @property
    def held(self) -> bool:
        return self._batches is not None


class ReadyPool:
    """The ready results of all tickets, within a byte budget; expired ones are dropped
    (oldest first) whenever a new one is held. ``ttl_seconds`` is the ticket's lifetime and
    ``clock`` the tickets' clock: a result is held no longer than the ticket it goes with."""

    def __init__(
        self,
        ttl_seconds: float,
        budget_bytes: int = READY_BUDGET_BYTES,
        max_count: int = READY_MAX_COUNT,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.ttl = ttl_seconds
        self._clock = clock
        self.budget = budget_bytes
        self.max_count = max_count
        self._queue: deque[ReadyResult] = deque()
        self._used = 0
        self._lock = threading.Lock()
        self.held = self.taken = self.refused = 0

    def hold(
        self, schema: pa.Schema, batches: Sequence[pa.RecordBatch], size: int, truncated: bool
    ) -> ReadyResult | None:
        """Keep a whole result for one DoGet, or None when the budget is full."""
        now = self._clock.monotonic()
        with self._lock:
            queue = self._queue
            while queue and (queue[0].expires <= now or not queue[0].held):
                self._drop_locked(queue.popleft())
            if self._used + size > self.budget or len(queue) >= self.max_count:
                self.refused += 1
                return None
            ready = ReadyResult(self, schema, tuple(batches), size, truncated, now + self.ttl)
            queue.append(ready)
            self._used += size
            self.held += 1
            return ready

    def take(self, ready: ReadyResult) -> tuple[pa.RecordBatch, ...] | None:
        with self._lock:
            batches, ready._batches = ready._batches, None
            if batches is not None:
                self._used -= ready.size
                self.taken += 1
            return batches

    def _drop_locked(self, ready: ReadyResult) -> None:
        if ready._batches is not None:
            ready._batches = None
            self._used -= ready.size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "bytes": self._used,
                "held": self.held,
                "taken": self.taken,
                "refused": self.refused,
            }
