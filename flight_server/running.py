"""The DoGet streams running now, by FlightInfo: cancelling them, and noticing a client that left.

Two ways a running query must stop before its timeout:

* **CancelFlightInfo** — a Flight (SQL) client sends back the FlightInfo of the query to stop.
  Quiver's tickets name their FlightInfo (the ticket payload's ``group``), so each DoGet is
  tracked under its group while its call lasts, and a cancel interrupts their DuckDB cursors
  and refuses the FlightInfo's tickets from then on (a retry does not run it again).
* **The client went away** — a cancelled gRPC call (the ADBC driver's ``cancel()``, a killed
  agent) does not stop a DoGet handler that is blocked in DuckDB: a sort, an aggregate or a
  join runs to its end before the first batch, whoever is still listening. One watcher thread
  (while streams run, and a second after) polls, every :data:`POLL_SECONDS`, the
  ``context.is_cancelled()`` of the tracked calls that have lasted a poll interval, and
  interrupts the cursor of a call whose client is gone.

The watcher polls on its own clock and only calls that have run a whole interval:
``is_cancelled()`` holds the GIL while it waits for gRPC's completion queue (pyarrow does not
release it), so a watcher woken by every DoGet that started or ended — and asking each brand
new call — was a third of the GIL's time under eight agents' point queries (tests/bench/RESULTS.md,
"Agent query path"). A point query's DoGet ends within a millisecond or two: it is never asked.
Nor is the watcher woken when a DoGet starts on an idle server: it lingers in poll-sized waits
(a thread switch per DoGet was a measurable part of a lone agent's point query:
tests/bench/PROFILE.md, section 5).
A client that leaves is noticed within two intervals (0.1 s) of its call's start at the latest.

Both interrupt like ``cancel-query`` does for an async query (flight_server/results.py):
DuckDB ignores an interrupt that arrives before its query starts, so a cancelled call is
interrupted again on every poll until its call has ended. The stream then fails with CANCELLED
(its deadline did not fire: proto_docs/errors.md), and the middleware releases its cursor and
admission slot as for any stream.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import pyarrow.flight as flight
import structlog

from catalog import Cancelled
from catalog.clock import iso
from catalog.running import RunningQueryInfo, shown_sql, shown_tables
from flight_server.limits import Deadline
from flight_server.middleware import CallState
from flight_server.ready import HeldRun

log = structlog.get_logger("flight_server")

#: Cancelled FlightInfos remembered (their tickets refused) at most this many at once.
MAX_CANCELLED = 10_000
#: How often the watcher looks for calls whose client went away, and re-interrupts cancelled
#: ones (seconds).
POLL_SECONDS = 0.05
#: How long the watcher thread outlives the last running stream (seconds).
IDLE_SECONDS = 1.0


@dataclass(eq=False, slots=True)
class _Call:
    state: CallState
    context: flight.ServerCallContext
    cancelled: bool = False
    #: What an admin's ``DELETE /v1/queries/{id}`` names (never the group: that is the
    #: tickets' own, and the list must not hand out what a ticket is bound to).
    id: str = field(default_factory=lambda: "s_" + secrets.token_urlsafe(12))
    started_at: float = field(default_factory=time.time)
    #: When it was tracked (monotonic): the watcher asks only calls older than a poll interval.
    since: float = field(default_factory=time.monotonic)


class RunningStreams:
    def __init__(self, ttl_seconds: float) -> None:
        self.ttl = ttl_seconds
        self._cond = threading.Condition()
        self._running: dict[str, dict[int, _Call]] = {}
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        #: Runs GetFlightInfo handed over that no DoGet took yet, by FlightInfo.
        self._held: dict[str, set[HeldRun]] = {}
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: Threads in :meth:`cancel` waiting for streams to end (an ended call wakes them).
        self._waiters = 0
        #: Calls interrupted because their client went away: a count for tests and logs.
        self.abandoned = 0
        #: Polls of ``is_cancelled()`` the watcher made (a count for tests).
        self.polls = 0
        #: Times the watcher's waits returned (a count for tests: it runs on its own clock,
        #: not once per DoGet).
        self.wakes = 0

    def track(self, group: str, state: CallState, context: flight.ServerCallContext) -> None:
        """Track a DoGet of FlightInfo ``group`` until its call ends (the middleware's
        cleanups); refuse it when that FlightInfo was cancelled."""
        call = _Call(state, context)
        key = id(call)
        with self._cond:
            until = self._cancelled.get(group)
            if until is not None and until > time.monotonic():
                raise Cancelled(
                    "this query was cancelled (CancelFlightInfo); call GetFlightInfo again to run it"
                )
            self._running.setdefault(group, {})[key] = call
            # No notify: a lingering watcher wakes on its own clock (:meth:`_watch`), and a
            # new call is not asked before it lasted a poll interval anyway. Waking it here
            # cost a thread switch (and a GIL hand-over) on every DoGet of an idle server.
            self._start_locked()

        def untrack() -> None:
            with self._cond:
                calls = self._running.get(group)
                if calls is not None:
                    calls.pop(key, None)
                    if not calls:
                        del self._running[group]
                if self._waiters:  # a cancel() waits for its streams to end
                    self._cond.notify_all()

        state.cleanups.append(untrack)

    def hold(self, group: str, run: HeldRun) -> None:
        """Track the run GetFlightInfo handed over with FlightInfo ``group`` until it is
        released (taken by a DoGet, which is tracked itself, or stopped): a CancelFlightInfo
        stops it too."""
        with self._cond:
            self._held.setdefault(group, set()).add(run)

        def unhold() -> None:
            with self._cond:
                runs = self._held.get(group)
                if runs is not None:
                    runs.discard(run)
                    if not runs:
                        del self._held[group]
                if self._waiters:
                    self._cond.notify_all()

        run.on_release(unhold)

    def cancel(self, groups: set[str], wait_seconds: float = 2.0) -> bool:
        """Cancel the FlightInfos ``groups``: refuse their tickets from now on and interrupt
        their running streams until those ended (the watcher keeps at it) or ``wait_seconds``
        passed. Whether none is still running."""
        deadline = time.monotonic() + wait_seconds
        with self._cond:
            for group in groups:
                self._cancelled[group] = time.monotonic() + self.ttl
                self._cancelled.move_to_end(group)
                for call in self._running.get(group, {}).values():
                    call.cancelled = True
                    _interrupt(call)
            while len(self._cancelled) > MAX_CANCELLED:
                self._cancelled.popitem(last=False)
            held = [run for group in groups for run in self._held.get(group, ())]
        for run in held:  # outside the lock: a finished run releases (and unholds) at once
            run.interrupt()
        with self._cond:
            self._waiters += 1
            try:
                while any(g in self._running or g in self._held for g in groups):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, POLL_SECONDS))
            finally:
                self._waiters -= 1
            done = not any(g in self._running or g in self._held for g in groups)
        log.info("flight.cancelled", flight_infos=len(groups), done=done)
        return done

    def listing(self) -> list[RunningQueryInfo]:
        """Every tracked stream (running.md: what ``GET /v1/queries?running=true`` lists)."""
        with self._cond:
            calls = [call for calls in self._running.values() for call in calls.values()]
            return [_info(call) for call in calls]

    def cancel_call(self, call_id: str, wait_seconds: float = 2.0) -> bool | None:
        """Cancel the FlightInfo of the stream ``call_id`` (all of its endpoints, as
        CancelFlightInfo would); None when no stream of that id runs."""
        with self._cond:
            group = next(
                (g for g, calls in self._running.items() for c in calls.values() if c.id == call_id),
                None,
            )
        if group is None:
            return None
        return self.cancel({group}, wait_seconds)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # --- the watcher -------------------------------------------------------------------------------
    def _start_locked(self) -> None:
        if self._thread is None and not self._stopped:
            thread = threading.Thread(target=self._watch, name="quiver-stream-watch", daemon=True)
            thread.start()
            self._thread = thread

    def _watch(self) -> None:
        next_poll = time.monotonic() + POLL_SECONDS
        while True:
            with self._cond:
                if not self._running and not self._stopped:
                    # Idle: linger a little (the next DoGet is usually close), then end, so
                    # that a quiet server holds no thread for this. It lingers in poll-sized
                    # waits, so a call tracked meanwhile (track() does not wake it) is seen
                    # within one interval, as while streams run.
                    idle_until = time.monotonic() + IDLE_SECONDS
                    while not self._running and not self._stopped:
                        left = idle_until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(min(left, POLL_SECONDS))
                        self.wakes += 1
                    next_poll = time.monotonic()
                if self._stopped or not self._running:
                    self._thread = None
                    return
                now = time.monotonic()
                if now < next_poll:
                    self._cond.wait(next_poll - now)
                    self.wakes += 1
                    continue
                next_poll = now + POLL_SECONDS
                # Under the lock: a call's context is valid until its call completes, and its
                # completion (untrack) takes this lock.
                for calls in self._running.values():
                    for call in calls.values():
                        if not call.cancelled and now - call.since >= POLL_SECONDS:
                            self.polls += 1
                            if _client_gone(call.context):
                                call.cancelled = True
                                self.abandoned += 1
                                log.info("flight.client_gone", request_id=call.state.request_id)
                        if call.cancelled:
                            _interrupt(call)


@dataclass(eq=False, slots=True)
class _Run:
    info: RunningQueryInfo
    deadline: Deadline


class QueryRuns:
    """The runs of agent SQL for callers outside Flight (flight_server/runner.py:
    ``POST /v1/query``, exports, artefact refresh) while they hold their cursor: listed and
    cancelled by an admin like a stream. A cancel interrupts the run's cursor (again, until
    the run released it or the wait is over: DuckDB ignores an interrupt that arrives before
    its query started); the caller then gets CANCELLED from its reader."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._runs: dict[str, _Run] = {}

    def track(
        self,
        principal: str,
        sql: str,
        tables: tuple[str, ...],
        deadline: Deadline,
        *,
        via: Literal["http", "flight"] = "http",
    ) -> Callable[[], None]:
        """Track one run until the returned release is called. ``via``: who asked — a caller
        outside Flight (``http``), or GetFlightInfo, whose run goes on until a DoGet takes it
        over (``flight``: flight_server/ready.py ``HeldRun``)."""
        run_id = "h_" + secrets.token_urlsafe(12)
        info = RunningQueryInfo(
            id=run_id,
            principal=principal,
            kind="run",
            what="query",
            sql=shown_sql(sql),
            tables=shown_tables(tables),
            started_at=iso(time.time()),
            rows=None,
            via=via,
        )
        with self._cond:
            self._runs[run_id] = _Run(info, deadline)

        def release() -> None:
            with self._cond:
                self._runs.pop(run_id, None)
                self._cond.notify_all()

        return release

    def listing(self) -> list[RunningQueryInfo]:
        with self._cond:
            return [run.info for run in self._runs.values()]

    def cancel(self, run_id: str, wait_seconds: float = 2.0) -> bool | None:
        deadline = time.monotonic() + wait_seconds
        with self._cond:
            run = self._runs.get(run_id)
            if run is None:
                return None
            while run_id in self._runs:
                if not run.deadline.done:
                    with contextlib.suppress(Exception):
                        run.deadline.interrupt()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, POLL_SECONDS))
            stopped = run_id not in self._runs
        log.info("query.run_cancelled", id=run_id, stopped=stopped)
        return stopped


def _info(call: _Call) -> RunningQueryInfo:
    state = call.state
    facts = state.query
    principal = state.principal
    return RunningQueryInfo(
        id=call.id,
        principal=principal.label if principal is not None else "?",
        kind="stream",
        what=facts.kind if facts is not None else str(state.fields.get("kind", "stream")),
        sql=shown_sql(facts.sql if facts is not None else None),
        tables=shown_tables(facts.tables if facts is not None else ()),
        started_at=iso(call.started_at),
        rows=facts.rows if facts is not None else None,
        via=facts.via if facts is not None else "flight",
    )


def _client_gone(context: flight.ServerCallContext) -> bool:
    try:
        return bool(context.is_cancelled())
    except Exception:  # noqa: BLE001 - a context that cannot tell is treated as still there
        return False


def _interrupt(call: _Call) -> None:
    """Interrupt the call's cursor, if it has one (a stream from memory ends by itself)."""
    deadline = call.state.deadline
    if deadline is not None and not deadline.done:
        try:
            deadline.interrupt()
        except Exception as e:  # noqa: BLE001 - an interrupt that fails must not stop the watcher
            log.warning("flight.interrupt_failed", error=str(e))
