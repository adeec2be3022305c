"""``CancelFlightInfo``: stop the running streams of one FlightInfo.

A Flight SQL client cancels a query by sending back the FlightInfo it got (the ADBC driver
and JDBC do, for ``cancel()``). Quiver's tickets name their FlightInfo (the ticket payload's
``group``), so the server tracks each DoGet stream under its group while it runs, and a cancel
interrupts their DuckDB cursors — as ``cancel-query`` interrupts an async query
(flight_server/results.py): DuckDB ignores an interrupt that arrives before its query starts,
so the cursors are interrupted again until their streams have ended or a short wait passed.
The interrupted stream fails with CANCELLED (its deadline did not fire: proto_docs/errors.md),
its admission slot is released by the middleware as for any stream, and the FlightInfo's
tickets are refused with CANCELLED from then on, so a cancelled query is not re-run by a retry.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import structlog

from catalog import Cancelled
from flight_server.middleware import CallState

log = structlog.get_logger("flight_server")

#: Cancelled FlightInfos remembered (their tickets refused) at most this many at once.
MAX_CANCELLED = 10_000


class RunningStreams:
    def __init__(self, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._running: dict[str, dict[int, CallState]] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()

    def track(self, group: str, state: CallState) -> None:
        """Track a DoGet stream of FlightInfo ``group`` until its call ends; refuse it when the
        FlightInfo was cancelled."""
        key = id(state)
        with self._lock:
            cancelled = self._cancelled.get(group)
            if cancelled is not None and cancelled > time.monotonic():
                raise Cancelled(
                    "this query was cancelled (CancelFlightInfo); call GetFlightInfo again to run it"
                )
            self._running.setdefault(group, {})[key] = state

        def untrack() -> None:
            with self._lock:
                streams = self._running.get(group)
                if streams is not None:
                    streams.pop(key, None)
                    if not streams:
                        del self._running[group]

        state.cleanups.append(untrack)

    def cancel(self, groups: set[str], wait_seconds: float = 2.0) -> bool:
        """Cancel the FlightInfos ``groups``: refuse their tickets from now on and interrupt
        their running streams, again and again until those ended or ``wait_seconds`` passed.
        Whether none is still running."""
        now = time.monotonic()
        with self._lock:
            for group in groups:
                self._cancelled[group] = now + self.ttl
                self._cancelled.move_to_end(group)
            while len(self._cancelled) > MAX_CANCELLED:
                self._cancelled.popitem(last=False)
        deadline = now + wait_seconds
        interrupted = 0
        while True:
            with self._lock:
                states = [s for g in groups for s in self._running.get(g, {}).values()]
            if not states:
                break
            for state in states:
                if state.deadline is not None:  # the stream's cursor (a stream with no cursor ends by itself)
                    state.deadline.interrupt()
                    interrupted += 1
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        log.info("flight_sql.cancelled", flight_infos=len(groups), interrupts=interrupted, done=not states)
        return not states
