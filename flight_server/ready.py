"""Ready results and held runs: a query's whole result read at GetFlightInfo, or its run still
going, held for the DoGet that follows.

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

Held runs: a query still running when GetFlightInfo's budget passed is not stopped and run
again by DoGet (that cost every slow query its first quarter second twice). It goes on, on a
worker of the streamer, and its :class:`HeldRun` rides with the ticket; the ticket's first
DoGet takes it over (``Streamer.claim``) with the admission slot, cursor and query deadline it
holds, and streams it. Nothing of the result is buffered in Python beyond the head that
GetFlightInfo would have read anyway (DuckDB's ``memory_limit`` bounds the rest), and held runs
are bounded by the admission slots they hold. A run nobody takes is stopped and released by
its query deadline (counted from GetFlightInfo), an admin's cancel (it is listed as a run),
CancelFlightInfo of its FlightInfo (flight_server/running.py) or server shutdown.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from catalog.clock import SYSTEM_CLOCK, Clock

__all__ = ["READY_BUDGET_BYTES", "HeldRun", "ReadyPool", "ReadyResult"]

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


class HeldRun:
    """A query GetFlightInfo started and did not see finish its head within its budget: the
    run goes on (on a worker of :class:`~flight_server.streams.Streamer`), holding its
    admission slot, cursor and query deadline, until the first DoGet of its ticket
    :meth:`take` s it over — or until it is stopped untaken (its deadline fired, an admin or
    CancelFlightInfo cancelled it, the server shuts down), when everything it holds is
    released at once (proto_docs/tickets.md, rule 5).

    The worker reports its outcome with :meth:`finish`: whatever the run produced (a head of
    batches and the open reader; nothing is buffered beyond the head) or the error it raised.
    An error is kept even after the run was released, so that the DoGet that takes it reports
    it (a timeout as DEADLINE_EXCEEDED); an unfinished or unread result is dropped with its
    cursor. Who releases: the DoGet that took the run (its call's cleanups), else whichever of
    :meth:`finish` and :meth:`interrupt` comes last.
    """

    __slots__ = (
        "_cond",
        "_done",
        "_error",
        "_interrupt",
        "_on_release",
        "_outcome",
        "_release",
        "_released",
        "_stopped",
        "_taken",
        "_untrack",
        "deadline",
        "query",
        "schema",
    )

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._done = self._taken = self._stopped = self._released = False
        self._outcome: object = None
        self._error: BaseException | None = None
        self._release: Callable[[], None] = _nothing
        self._interrupt: Callable[[], None] = _nothing
        self._untrack: Callable[[], None] = _nothing
        self._on_release: list[Callable[[], None]] = []
        #: The run's query deadline (flight_server/limits.py ``Deadline``), set by the streamer.
        self.deadline: Any = None
        #: The result's schema, once DuckDB returned its reader.
        self.schema: pa.Schema | None = None
        #: The admission query id of its slot (a probe of the same query joins it).
        self.query = ""

    def bind(
        self,
        deadline: Any,
        interrupt: Callable[[], None],
        release: Callable[[], None],
        query: str,
    ) -> None:
        """What the run holds: its deadline, how to interrupt its cursor, the one release of
        everything (idempotent), and its admission slot's query id."""
        self.deadline, self._interrupt, self._release = deadline, interrupt, release
        self.query = query

    def listed(self, untrack: Callable[[], None]) -> None:
        """The run is listed for admins from now on (once handed over: a run that came back
        within GetFlightInfo's budget is planning, never listed); ``untrack`` ends that, when a
        DoGet takes it over or it is released — at once when it already was."""
        with self._cond:
            if not self._released:
                self._untrack = untrack
                self._on_release.append(untrack)
                return
        untrack()

    # --- the worker's side ---------------------------------------------------------------------
    def finish(self, outcome: object = None, error: BaseException | None = None) -> None:
        """The run's head is read (``outcome``) or it failed (``error``)."""
        with self._cond:
            self._outcome, self._error, self._done = outcome, error, True
            self._cond.notify_all()
            # Stopped untaken: released now. A failed run holds nothing worth keeping either:
            # released now, its error kept for the DoGet that takes it.
            free = (self._stopped or error is not None) and not self._taken
        if free:
            self._free(drop_outcome=True)

    def wait_head(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for :meth:`finish`; whether it came."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done, timeout)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def failed(self) -> bool:
        return self._error is not None

    # --- stopping ------------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Stop the run (its deadline, a cancel, shutdown): its cursor is interrupted; untaken,
        it is released (now when finished, else once its worker finishes). Taken, its DoGet's
        stream fails as any interrupted stream does."""
        with self._cond:
            if self._released:  # its cursor may serve another request by now: never touched
                return
            self._stopped = True
            release = self._done and not self._taken
        with contextlib.suppress(Exception):  # a closed cursor: nothing left to interrupt
            self._interrupt()
        if release:
            self._free(drop_outcome=True)

    def expire(self) -> None:
        """The ticket it goes with expired: stop the run unless a DoGet took it."""
        with self._cond:
            if self._taken:
                return
        self.interrupt()

    def on_release(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the run is released (at once when it already was)."""
        with self._cond:
            if not self._released:
                self._on_release.append(callback)
                return
        callback()

    # --- DoGet's side --------------------------------------------------------------------------
    def take(self) -> bool:
        """Claim the run for this DoGet, the first time only, while it still holds its result
        or an error to report; it is then no longer listed as a run (the DoGet's stream is)."""
        with self._cond:
            # Stopped while running, it ends in an error this DoGet reports (a timeout, a cancel).
            if self._taken or (self._released and self._error is None):
                return False
            self._taken = True
        self._untrack()
        return True

    def result(self) -> object:
        """The run's outcome (waiting for it: the run's deadline bounds the wait), or its
        error raised."""
        with self._cond:
            self._cond.wait_for(lambda: self._done)
            if self._error is not None:
                raise self._error
            return self._outcome

    def release(self) -> None:
        """Release everything the run holds (the taking DoGet's cleanup; idempotent)."""
        self._free(drop_outcome=False)

    def _free(self, *, drop_outcome: bool) -> None:
        with self._cond:
            if self._released:
                return
            self._released = True
            outcome = self._outcome
            if drop_outcome:
                self._outcome = None
            callbacks, self._on_release = self._on_release, []
        if drop_outcome:
            close = getattr(outcome, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):  # a reader already closed
                    close()
        self._release()
        for callback in callbacks:
            callback()


def _nothing() -> None:
    return None
