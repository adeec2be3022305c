"""The admission path: the one gate every piece of agent SQL work passes before DuckDB sees it.

Planning is work. DuckDB binds a query to learn its schema, and binding folds constant
expressions, so a GetFlightInfo can cost as much as the query itself. Therefore planning
(GetFlightInfo and GetSchema of a query, the check of a ``submit-query``) and running (every
DoGet stream) are admitted the same way, here, and nowhere else:

* **per principal** — at most ``[limits] max_concurrent_queries`` queries of one token
  subject at once; beyond that the call is refused at once with RESOURCE_EXHAUSTED, so one
  agent cannot crowd out the others. A query is one FlightInfo: its endpoints, fetched in
  parallel, share a slot. Each *copy* of a FlightInfo's streams counts anew: the same ticket
  redeemed twice at once is two queries (a query ticket re-runs its query each time).
* **globally** — at most ``[limits] max_concurrent_total`` streams and planning steps of all
  principals together. Beyond that a call waits up to ``[limits] admission_wait_seconds`` for
  a slot (back-pressure, not an error, for a burst of well-behaved agents), then is refused
  with RESOURCE_EXHAUSTED.
* **per swarm** — a swarm's limits (``PUT /v1/swarms/{name}/limits``, catalog/limits.py) add
  bounds on top of these, never instead of them: ``max_concurrent`` queries of all the swarm's
  principals together, ``per_agent.max_concurrent`` of each agent (at most the per-principal
  bound), and ``calls_per_minute`` (the swarm's and each agent's token bucket: every call
  admitted here counts one, refused at once with RESOURCE_EXHAUSTED before any work).
* **time** — planning runs under the query timeout (the watchdog interrupts the cursor), and
  so does every DoGet of a query, sample or profile: ``[limits] query_timeout_seconds`` or the
  swarm's override, read per principal from :meth:`Admission.limits_for` — the one lookup of a
  principal's limits (the planner reads its row cap there too).
* **memory** — DuckDB's ``memory_limit`` and, under ``quiver serve``, the process's address
  space bound (catalog/resources.py) turn an allocation that would not fit into a clean
  RESOURCE_EXHAUSTED. What planning could build without allocating through either — values
  built from small constants while binding — the SQL guard refuses before anything is planned
  (catalog/sqlguard.py).

Async queries (``submit-query``) are planned through here and then run by their own workers,
bounded by ``[results] workers``, ``max_active_per_principal`` and ``timeout_seconds``.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import duckdb
import structlog

from catalog import Principal, ResourceExhausted
from catalog.budgets import Budgets
from catalog.config import LimitsConfig
from catalog.database import Database
from catalog.limits import Effective, SwarmLimits, global_limits
from catalog.metrics import Metrics
from flight_server.limits import Deadline, Watchdog

log = structlog.get_logger("flight_server")

Release = Callable[[], None]


def release_all(held: list[Release], event: str) -> Release:
    """One release of everything a run holds (its admission slot, cursor, deadline, lease),
    in reverse order of taking, each once: a failed step is logged as ``event`` and does not
    skip the others, and ``held`` is empty afterwards, so a second call does nothing."""

    def close() -> None:
        for step in reversed(held):
            try:
                step()
            except Exception as e:  # noqa: BLE001 - one failed release must not skip the others
                log.warning(event, error=str(e))
        held.clear()

    return close


class SpareCursors(Protocol):
    """Idle cursors to reuse (flight_server/streams.py keeps the server's)."""

    def take(self) -> duckdb.DuckDBPyConnection: ...

    def give_back(self, cur: duckdb.DuckDBPyConnection) -> bool: ...


@dataclass(slots=True)
class _Query:
    """The streams of one FlightInfo held by one principal: endpoint index → running copies.
    The query occupies as many slots as its most-copied endpoint has running streams."""

    streams: dict[int, int] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return max(self.streams.values(), default=0)


@dataclass(slots=True)
class _Principal:
    swarm: str | None = None
    queries: dict[str, _Query] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return sum(q.slots for q in self.queries.values())


class Admission:
    """Per-principal and global concurrency, the query timeout, for planning and streaming."""

    def __init__(
        self,
        limits: LimitsConfig,
        db: Database,
        watchdog: Watchdog,
        metrics: Metrics | None = None,
        budgets: Budgets | None = None,
        overrides: SwarmLimits | None = None,
        activity: Callable[[], Release] | None = None,
    ) -> None:
        # Marks the data plane busy while a slot is held, whichever path took it (a Flight call,
        # POST /v1/query, MCP, an export): the hot-table cache's idle fill waits for it
        # (flight_server/table_cache.py ``Activity.begin``); returns the function that ends it.
        self._activity = activity
        # Usage budgets (catalog/budgets.py): checked before a slot is taken.
        self._budgets = budgets
        # Per-swarm limits (catalog/limits.py); None: [limits] for everyone.
        self._overrides = overrides
        self._global = global_limits(limits)
        self.total = limits.max_concurrent_total
        self.wait_seconds = float(limits.admission_wait_seconds)
        self._db = db
        self.watchdog = watchdog
        self._principals: dict[str, _Principal] = {}
        # swarm -> the subjects of its principals holding slots (for a swarm's max_concurrent).
        self._swarm_members: dict[str, set[str]] = {}
        self._running = 0
        self._cond = threading.Condition()
        self._metrics = metrics
        if metrics is not None:
            metrics.streams_running.set_function(self.streams)

    # --- the lookup -------------------------------------------------------------------------------
    def limits_for(self, principal: Principal) -> Effective:
        """The limits ``principal``'s request runs under: ``[limits]`` with its swarm's (and, for
        an agent, its per-agent) overrides (catalog/limits.py). Read on every request."""
        if self._overrides is None:
            return self._global
        return self._overrides.limits_for(principal)

    # --- the gate -----------------------------------------------------------------------------
    def acquire(self, principal: Principal, query: str, index: int = 0, *, call: bool = True) -> Release:
        """Admit one stream of endpoint ``index`` of the FlightInfo ``query`` for ``principal``
        (or one planning step, under a query id of its own): first its swarm's usage budgets
        (RESOURCE_EXHAUSTED when one is spent, before any work) and, for a ``call`` (a request
        of its own, not a step of one already counted), its calls per minute; then the slots.
        Returns the function that lets it go; calling it more than once is harmless."""
        limits = self.limits_for(principal)
        self.check_budget(principal)
        if call:
            self._take_call(principal, limits)
        subject = principal.subject
        with self._cond:
            self._check_share(principal, query, index, limits)
            if self._running >= self.total:
                deadline = time.monotonic() + self.wait_seconds
                while self._running >= self.total:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._refused("total")
                        raise ResourceExhausted(
                            f"the server is running {self._running} queries, its limit ([limits] "
                            f"max_concurrent_total = {self.total}); retry in a few seconds"
                        )
                    self._cond.wait(left)
                # This principal's (or its swarm's) own streams may have started meanwhile.
                self._check_share(principal, query, index, limits)
            # Counted under its swarm whether or not the swarm has limits now: a bound set
            # later counts what already runs.
            self._take(subject, principal.swarm, query, index)
        release = self._releaser(subject, query, index)
        if self._activity is None:
            return release
        end = self._activity()

        def release_and_end() -> None:
            release()
            end()

        return release_and_end

    def admit_call(self, principal: Principal, *, budget: bool = True) -> None:
        """The checks at the start of a call whose planning may take no slot, or takes it
        as a step of this call (a result or plan from a cache, GetFlightInfo, GetSchema,
        ``submit-query``): one call of its calls per minute and, with ``budget``, the usage
        budgets — before any work."""
        if budget:
            self.check_budget(principal)
        self._take_call(principal, self.limits_for(principal))

    def _take_call(self, principal: Principal, limits: Effective) -> None:
        if self._overrides is None:
            return
        try:
            self._overrides.take_call(principal, limits)
        except ResourceExhausted:
            self._refused("rate")
            raise

    def check_budget(self, principal: Principal) -> None:
        """Refuse a caller whose swarm or agent has spent a usage budget (catalog/budgets.py).
        Every slot checks it; GetFlightInfo checks it first too, so a request answered from a
        cache (no slot at planning) is refused there rather than at its DoGet."""
        if self._budgets is None:
            return
        try:
            self._budgets.check(principal)
        except ResourceExhausted:
            self._refused("budget")
            raise

    def _check_share(self, principal: Principal, query: str, index: int, limits: Effective) -> None:
        """Refuse a principal whose queries already fill its share — its own, or its swarm's
        together — unless this stream joins a query it holds (another endpoint of the same
        FlightInfo), which takes no new slot."""
        holder = self._principals.get(principal.subject)
        held = 0
        if holder is not None:
            entry = holder.queries.get(query)
            if entry is not None and entry.streams.get(index, 0) < entry.slots:
                return  # joins a slot it holds
            held = holder.slots
        if held >= limits.max_concurrent_queries:
            self._refused("per_principal")
            raise ResourceExhausted(
                f"too many concurrent queries: {held} of yours are running and the limit "
                f"is {limits.max_concurrent_queries} per principal ({limits.concurrency_source}); "
                "wait for one to finish, then retry"
            )
        swarm, cap = principal.swarm, limits.swarm_max_concurrent
        if swarm is not None and cap is not None:
            members = self._swarm_members.get(swarm, ())
            together = sum(self._principals[m].slots for m in members if m in self._principals)
            if together >= cap:
                self._refused("swarm")
                raise ResourceExhausted(
                    f"too many concurrent queries of swarm {swarm}: {together} are running and its "
                    f"limit is {cap} (max_concurrent of PUT /v1/swarms/{swarm}/limits); wait for one "
                    "to finish, then retry"
                )

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.admission_refusals.labels(reason).inc()

    def _take(self, subject: str, swarm: str | None, query: str, index: int) -> None:
        holder = self._principals.get(subject)
        if holder is None:
            holder = self._principals[subject] = _Principal(swarm)
            if swarm is not None:
                self._swarm_members.setdefault(swarm, set()).add(subject)
        entry = holder.queries.setdefault(query, _Query())
        entry.streams[index] = entry.streams.get(index, 0) + 1
        self._running += 1

    def _releaser(self, subject: str, query: str, index: int) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            with self._cond:
                if released:
                    return
                released = True
                self._running -= 1
                holder = self._principals.get(subject)
                entry = holder.queries.get(query) if holder is not None else None
                if holder is not None and entry is not None:
                    left = entry.streams.get(index, 0) - 1
                    if left > 0:
                        entry.streams[index] = left
                    else:
                        entry.streams.pop(index, None)
                        if not entry.streams:
                            holder.queries.pop(query, None)
                            if not holder.queries:
                                self._principals.pop(subject, None)
                                self._leave_swarm(holder.swarm, subject)
                self._cond.notify()

        return release

    def _leave_swarm(self, swarm: str | None, subject: str) -> None:
        if swarm is None:
            return
        members = self._swarm_members.get(swarm)
        if members is not None:
            members.discard(subject)
            if not members:
                del self._swarm_members[swarm]

    # --- planning -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def planning(
        self,
        principal: Principal,
        cursors: SpareCursors | None = None,
        *,
        call: bool = False,
        join: str | None = None,
    ) -> Iterator[tuple[duckdb.DuckDBPyConnection, Deadline]]:
        """A cursor to plan agent SQL on, admitted like a stream and under the principal's
        query timeout. Yields the cursor and its deadline (``deadline.fired`` tells a timeout
        from a cancel; ``deadline.seconds`` is the timeout). ``call``: this is a request of its
        own (a sample read for MCP), counted against calls per minute; planning within a
        Flight call is not (the call was counted when it began).
        With ``cursors``, the cursor is taken from and, when the block ended cleanly and its
        deadline never fired, given back to that pool (a new cursor is not free:
        tests/bench/RESULTS.md, "Costs the code relies on"); the
        block must then leave it as it found it (no open result, no transaction).
        ``join``: the admission query id of a run of the same query whose slot this step shares
        (the schema probe of a query GetFlightInfo handed over to DoGet: flight_server/ready.py).
        """
        if join is None:
            release = self.acquire(principal, "plan-" + secrets.token_hex(6), call=call)
        else:  # a step of the query ``join`` (which runs): in its slot, as its second stream
            release = self.acquire(principal, join, 1, call=call)
        timeout = self.limits_for(principal).query_timeout_seconds
        try:
            if cursors is None:
                with self._db.reading() as cur:
                    deadline = self.watchdog.arm(timeout, cur.interrupt)
                    try:
                        yield cur, deadline
                    finally:
                        Watchdog.disarm(deadline)
                return
            cur = cursors.take()
            deadline = self.watchdog.arm(timeout, cur.interrupt)
            clean = False
            try:
                yield cur, deadline
                clean = True
            finally:
                Watchdog.disarm(deadline)
                if not (clean and not deadline.fired and cursors.give_back(cur)):
                    cur.close()
        finally:
            release()

    # --- status --------------------------------------------------------------------------------
    def active(self) -> dict[str, int]:
        """Slots (queries) in use per principal (for /v1/status)."""
        with self._cond:
            return {s: h.slots for s, h in self._principals.items()}

    def streams(self) -> int:
        """Streams and planning steps running now, all principals together."""
        with self._cond:
            return self._running
