"""Usage budgets: a swarm's daily limits on queries, rows, bytes, query seconds and live
queries (requests that run SQL in Snowflake), for the swarm as a whole and for each of its
agents (proto_docs/governance.md, "Budgets").

What a request spends is what the query log records of it (catalog/query_log.py calls
:meth:`Budgets.charge` for every record that is not a refusal): rows and bytes actually sent,
the seconds the request took. Counting is in memory, under one lock; the counters are written
to ``_quiver.usage`` in batches by the housekeeping thread (and at shutdown), so a restart loses
at most one flush interval, and they are read back at start. A day is a UTC day of the
injected clock: at midnight every counter starts again from zero.

The check (:meth:`Budgets.check`) is made by the data plane's admission path before any work
(flight_server/admission.py), so every path that runs agent SQL or streams data is covered;
an exhausted budget is ``RESOURCE_EXHAUSTED`` (HTTP 429) naming the budget, the usage and the
reset time. A request already admitted finishes and is charged in full: a budget can be
overrun by the requests running when it was reached.

Live queries (``live_queries_per_day``, proto_docs/federation.md "Costs") are counted
differently: a request that is about to send SQL to Snowflake takes one with
:meth:`Budgets.take_live` — check and count in one step, before the first byte goes out —
so that budget is never overrun and a refusal costs nothing in the warehouse. A request
answered from the live result cache sends nothing and takes none.

Budgets are admin writes: ``PUT /v1/swarms/{name}/budget`` runs under the admin-write lock
(catalog/writes.py) and updates memory from what committed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

import msgspec
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from catalog.clock import Clock, utcnow
from catalog.database import SYSTEM_SCHEMA, Database, insert_columns
from catalog.errors import ResourceExhausted, Unprocessable, bounded
from catalog.identity import Principal
from catalog.swarms import SwarmStore, no_such_swarm, require_swarm
from catalog.writes import AdminWrites

log = structlog.get_logger(__name__)

Count = Annotated[int, msgspec.Meta(ge=0, le=2**62)]

#: The columns of a usage flush: (column, DuckDB type), in the order of a row.
_USAGE_COLUMNS = (
    ("day", "DATE"),
    ("swarm", "VARCHAR"),
    ("agent", "VARCHAR"),
    ("queries", "BIGINT"),
    ("rows", "BIGINT"),
    ("bytes", "BIGINT"),
    ("ms", "DOUBLE"),
    ("live_queries", "BIGINT"),
)

#: Budget names, in the order they are checked, and the usage field each limits.
BUDGETS = (
    "queries_per_day",
    "rows_per_day",
    "bytes_per_day",
    "query_seconds_per_day",
    "live_queries_per_day",
)
#: The budget only requests that run SQL in Snowflake spend (live tables,
#: proto_docs/federation.md): taken by :meth:`Budgets.take_live`, not checked for the others.
LIVE_BUDGET = "live_queries_per_day"


class Limits(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Daily limits; an absent key (null) is no limit."""

    queries_per_day: Count | None = None
    rows_per_day: Count | None = None
    bytes_per_day: Count | None = None
    query_seconds_per_day: Count | None = None
    live_queries_per_day: Count | None = None


class Budget(Limits, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """A swarm's budget: its own limits, and ``per_agent`` limits each agent has."""

    per_agent: Limits | None = None


class Usage(msgspec.Struct, kw_only=True):
    queries: int = 0
    rows: int = 0
    bytes: int = 0
    query_seconds: float = 0.0
    #: Requests that ran SQL in Snowflake (live tables), counted when the first is sent.
    live_queries: int = 0

    def used(self, budget: str) -> float:
        return {
            "queries_per_day": self.queries,
            "rows_per_day": self.rows,
            "bytes_per_day": self.bytes,
            "query_seconds_per_day": self.query_seconds,
            "live_queries_per_day": self.live_queries,
        }[budget]


class UsageReport(msgspec.Struct, kw_only=True):
    """``GET /v1/swarms/{name}/usage`` and the ``usage`` action."""

    swarm: str
    day: date
    resets_at: datetime
    budget: Budget
    usage: Usage
    agents: dict[str, Usage]


class UsageCollector(Collector):
    """Today's usage counters at every scrape: ``quiver_usage_*{swarm, agent}`` (agent "" is
    the swarm's total), read from memory."""

    def __init__(self, budgets: Budgets) -> None:
        self._budgets = budgets

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            "queries": GaugeMetricFamily(
                "quiver_usage_queries",
                "Requests counted today (UTC) against budgets.",
                labels=["swarm", "agent"],
            ),
            "rows": GaugeMetricFamily(
                "quiver_usage_rows", "Rows sent today (UTC).", labels=["swarm", "agent"]
            ),
            "bytes": GaugeMetricFamily(
                "quiver_usage_bytes", "Bytes sent today (UTC).", labels=["swarm", "agent"]
            ),
            "query_seconds": GaugeMetricFamily(
                "quiver_usage_query_seconds", "Request seconds spent today (UTC).", labels=["swarm", "agent"]
            ),
            "live_queries": GaugeMetricFamily(
                "quiver_usage_live_queries",
                "Requests today (UTC) that ran SQL in Snowflake (live tables).",
                labels=["swarm", "agent"],
            ),
        }
        for swarm, agent, usage in self._budgets.all_today():
            for name, family in families.items():
                family.add_metric([swarm, agent], float(getattr(usage, name)))
        yield from families.values()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


def reset_text(at: datetime) -> str:
    """The reset time in a refusal's sentence, written as the usage view's ``resets_at`` is
    (``2026-01-02T00:00:00Z``: msgspec's encoding of a UTC datetime), so a client can compare
    the two as text."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_budget(raw: Any) -> Budget:
    """The budget of a PUT body; a negative or non-integer limit, an unknown key: 422."""
    try:
        return msgspec.convert(raw, Budget, strict=True)
    except msgspec.ValidationError as e:
        raise Unprocessable(
            f"invalid budget: {bounded(str(e), 200)}; limits are whole numbers >= 0 "
            f"({', '.join(BUDGETS)}, and per_agent with the same keys); an absent key is no limit"
        ) from None


class Budgets:
    def __init__(self, db: Database, clock: Clock, writes: AdminWrites, swarms: SwarmStore) -> None:
        self._db = db
        self._clock = clock
        self._writes = writes
        self._swarms = swarms
        self._lock = threading.Lock()
        self._budgets: dict[str, Budget] = {}
        # (day, swarm, agent) -> usage; agent "" is the swarm's total.
        self._usage: dict[tuple[date, str, str], Usage] = {}
        self._dirty: set[tuple[date, str, str]] = set()
        self._load()

    def _load(self) -> None:
        today = self.today()
        with self._db.reading() as cur:
            budgets = cur.execute(f"SELECT swarm, body FROM {SYSTEM_SCHEMA}.budgets").fetchall()
            usage = cur.execute(
                f"SELECT swarm, agent, queries, rows, bytes, ms, live_queries FROM {SYSTEM_SCHEMA}.usage "
                "WHERE day = ?",
                [today],
            ).fetchall()
        for swarm, body in budgets:
            self._budgets[swarm] = msgspec.json.decode(body, type=Budget)
        for swarm, agent, queries, rows, nbytes, ms, live in usage:
            self._usage[(today, swarm, agent)] = Usage(
                queries=int(queries),
                rows=int(rows),
                bytes=int(nbytes),
                query_seconds=float(ms) / 1000,
                live_queries=int(live),
            )

    # --- the day ------------------------------------------------------------------------------
    def today(self) -> date:
        return utcnow(self._clock).astimezone(UTC).date()

    @staticmethod
    def resets_at(day: date) -> datetime:
        return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)

    # --- admin ---------------------------------------------------------------------------------
    def put(self, swarm: str, raw: Any) -> Budget:
        """Replace ``swarm``'s budget (validated first: nothing is saved on a bad one)."""
        budget = parse_budget(raw)
        body = msgspec.json.encode(budget).decode()
        now = utcnow(self._clock)

        def write(cur: Any) -> None:
            require_swarm(cur, swarm)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.budgets WHERE swarm = ?", [swarm])
            cur.execute(f"INSERT INTO {SYSTEM_SCHEMA}.budgets VALUES (?, ?, ?)", [swarm, body, now])

        with self._writes.lock:
            self._writes.run("set budget", write)
            with self._lock:
                self._budgets[swarm] = budget
        log.info("budget.set", swarm=swarm, budget=body)
        return budget

    def drop(self, cur: Any, swarm: str) -> Callable[[], None]:
        """Delete ``swarm``'s budget and counters in the caller's transaction (the swarm's
        deletion); returns what to apply in memory once it committed."""
        cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.budgets WHERE swarm = ?", [swarm])
        cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.usage WHERE swarm = ?", [swarm])

        def apply() -> None:
            with self._lock:
                self._budgets.pop(swarm, None)
                for key in [k for k in self._usage if k[1] == swarm]:
                    del self._usage[key]
                self._dirty = {k for k in self._dirty if k[1] != swarm}

        return apply

    def budget(self, swarm: str) -> Budget:
        with self._lock:
            return self._budgets.get(swarm) or Budget()

    def report(self, swarm: str) -> UsageReport:
        if not self._swarms.exists(swarm):
            raise no_such_swarm(swarm)
        day = self.today()
        with self._lock:
            total = self._usage.get((day, swarm, ""))
            agents = {
                a: msgspec.structs.replace(u)
                for (d, s, a), u in self._usage.items()
                if d == day and s == swarm and a
            }
            budget = self._budgets.get(swarm) or Budget()
            usage = msgspec.structs.replace(total) if total is not None else Usage()
        return UsageReport(
            swarm=swarm, day=day, resets_at=self.resets_at(day), budget=budget, usage=usage, agents=agents
        )

    def all_today(self) -> list[tuple[str, str, Usage]]:
        """Today's counters (for /metrics): (swarm, agent or "", usage)."""
        day = self.today()
        with self._lock:
            return [(s, a, msgspec.structs.replace(u)) for (d, s, a), u in self._usage.items() if d == day]

    # --- the hot path -----------------------------------------------------------------------------
    def check(self, principal: Principal) -> None:
        """Refuse before any work when a budget of the caller's swarm or agent is spent (all
        but ``live_queries_per_day``, which only a request to Snowflake spends:
        :meth:`take_live`)."""
        with self._lock:
            self._check_locked(principal, tuple(b for b in BUDGETS if b != LIVE_BUDGET))

    def check_live(self, principal: Principal) -> None:
        """Refuse, counting nothing, when ``live_queries_per_day`` is spent: at planning,
        before a live table's description may be read from Snowflake."""
        with self._lock:
            self._check_locked(principal, (LIVE_BUDGET,))

    def take_live(self, principal: Principal) -> None:
        """Count one request that is about to send SQL to Snowflake against
        ``live_queries_per_day`` of its swarm and agent — or refuse it (RESOURCE_EXHAUSTED)
        when that budget is spent, before anything is sent. Check and count are one step
        under the lock, so requests racing for the last live query cannot both get it."""
        swarm = principal.swarm
        if swarm is None:
            return
        with self._lock:
            self._check_locked(principal, (LIVE_BUDGET,))
            for key in self._keys(principal, swarm):
                usage = self._usage.get(key)
                if usage is None:
                    usage = self._usage[key] = Usage()
                usage.live_queries += 1
                self._dirty.add(key)

    def _check_locked(self, principal: Principal, names: tuple[str, ...]) -> None:
        swarm = principal.swarm
        if swarm is None:
            return
        budget = self._budgets.get(swarm)
        if budget is None:
            return
        day = self.today()
        checks: list[tuple[Limits, str, str]] = [(budget, "", f"swarm {swarm}")]
        if budget.per_agent is not None and principal.agent is not None:
            checks.append((budget.per_agent, principal.agent, f"agent {swarm}/{principal.agent}"))
        for limits, agent, whom in checks:
            usage = self._usage.get((day, swarm, agent)) or Usage()
            for name in names:
                limit = getattr(limits, name)
                if limit is None:
                    continue
                used = usage.used(name)
                if used >= limit:
                    shown = f"{used:.3f}" if isinstance(used, float) else str(used)
                    raise ResourceExhausted(
                        f"budget {name} of {whom} is spent: used {shown} of {limit} today; it resets "
                        f"at {reset_text(self.resets_at(day))}"
                    )

    def _keys(self, principal: Principal, swarm: str) -> list[tuple[date, str, str]]:
        """Today's counters a request of ``principal`` adds to: its swarm's, and its agent's."""
        day = self.today()
        keys = [(day, swarm, "")]
        if principal.agent is not None:
            keys.append((day, swarm, principal.agent))
        return keys

    def charge(self, principal: Principal, *, rows: int | None, nbytes: int | None, seconds: float) -> None:
        """Add one request's spend to today's counters of its swarm and agent (memory only)."""
        swarm = principal.swarm
        if swarm is None:
            return
        with self._lock:
            for key in self._keys(principal, swarm):
                usage = self._usage.get(key)
                if usage is None:
                    usage = self._usage[key] = Usage()
                usage.queries += 1
                usage.rows += rows or 0
                usage.bytes += nbytes or 0
                usage.query_seconds += seconds
                self._dirty.add(key)

    def flush(self) -> int:
        """Write the counters changed since the last flush (one transaction); return how many."""
        with self._lock:
            keys, self._dirty = self._dirty, set()
            # Earlier days' counters are written once more (if changed), then forgotten.
            today = self.today()
            for key in [k for k in self._usage if k[0] < today and k not in keys]:
                del self._usage[key]
            rows = [
                [d, s, a, u.queries, u.rows, u.bytes, u.query_seconds * 1000, u.live_queries]
                for (d, s, a) in keys
                if (u := self._usage.get((d, s, a))) is not None
            ]
        if not rows:
            return 0
        columns = [(name, kind, [r[i] for r in rows]) for i, (name, kind) in enumerate(_USAGE_COLUMNS)]
        try:
            # One INSERT … SELECT of every changed counter (executemany costs milliseconds per
            # row), with no pyarrow conversion of Python values (catalog/database.py).
            with self._db.transaction() as cur:
                insert_columns(cur, f"{SYSTEM_SCHEMA}.usage", columns, verb="INSERT OR REPLACE")
        except Exception:
            with self._lock:
                self._dirty |= keys  # written by the next flush
            raise
        return len(rows)
