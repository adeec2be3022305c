"""The query timeout (proto_docs/limits.md); the admission path that arms it is
flight_server/admission.py.

:class:`Watchdog` — one daemon thread holds a heap of deadlines and calls
``cursor.interrupt()`` when one passes, which really stops DuckDB (its worker threads check the
flag) and leaves every other cursor running. One thread for all queries keeps the hot path
free of thread creation (a ``threading.Timer`` per query costs a thread).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("flight_server")


@dataclass(eq=False, slots=True)
class Deadline:
    """One armed timeout; ``fired`` tells the error mapping that an interrupt was ours."""

    at: float
    seconds: float
    interrupt: Callable[[], None]
    fired: bool = False
    done: bool = False


class Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._cond = threading.Condition()
        self._counter = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def arm(self, seconds: float, interrupt: Callable[[], None]) -> Deadline:
        deadline = Deadline(time.monotonic() + seconds, seconds, interrupt)
        with self._cond:
            if self._thread is None and not self._stopped:
                # Started before it is recorded: a failed start (no memory for a thread) is
                # retried by the next query instead of leaving every timeout unenforced.
                thread = threading.Thread(target=self._loop, name="quiver-watchdog", daemon=True)
                thread.start()
                self._thread = thread
            first = not self._heap or deadline.at < self._heap[0][0]
            heapq.heappush(self._heap, (deadline.at, next(self._counter), deadline))
            if first:
                self._cond.notify()
        return deadline

    @staticmethod
    def disarm(deadline: Deadline) -> None:
        # Entries are left in the heap and skipped when they come due: O(1) here.
        deadline.done = True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        _, _, due = heapq.heappop(self._heap)
                        break
                    self._cond.wait(wait)
            due.fired = True
            due.done = True
            try:
                due.interrupt()
                log.info("query.deadline_interrupt", seconds=due.seconds)
            except Exception as e:  # noqa: BLE001 - a failed interrupt must not kill the watchdog
                log.warning("query.interrupt_failed", error=str(e))

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
