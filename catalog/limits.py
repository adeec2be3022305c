"""Per-swarm (and per-agent) overrides of ``[limits]``: a swarm's own ``max_rows``, query
timeout, concurrency and calls-per-minute rate (proto_docs/limits.md, "Per-swarm limits").

Without them, every fleet of agents shares the one global ``[limits]``, which fits no swarm
in particular. An admin sets ``PUT /v1/swarms/{name}/limits`` with any of

* ``max_rows`` — the row cap of a query's result (the same cut as ``[limits] max_rows``);
* ``query_timeout_seconds`` — the query timeout (the same watchdog interrupt);
* ``max_concurrent`` — queries of the whole swarm at once, all its principals together;
* ``calls_per_minute`` — admitted calls of the whole swarm a minute (a token bucket);

and ``per_agent`` with the same keys for each agent token of the swarm on its own. An absent
key is the default: a per-agent ``max_rows`` or timeout falls back to the swarm's, then to
``[limits]``; a per-agent concurrency or rate absent leaves the agent only the swarm's (and
the global per-principal) bound. Overrides come *on top of* the global bounds, never instead
of them: the per-principal ``[limits] max_concurrent_queries`` and the server-wide
``max_concurrent_total`` still hold, so concurrency can only be tightened. ``max_rows`` and the
timeout may be tightened freely and loosened only up to ``[limits] max_rows_ceiling`` and
``query_timeout_ceiling_seconds`` (unset: not at all) — an override above the ceiling is a 422,
and one saved under a ceiling since lowered is clamped to it when applied.

Why in the catalog: the control plane saves them and the data plane applies them, and neither
may import the other. :meth:`SwarmLimits.limits_for` is the one lookup the admission path
(flight_server/admission.py) and the planner read for a principal's limits. Writes run under
the admin-write lock (catalog/writes.py) and update memory from what committed, so memory
always equals the database; a restart reads them back.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import duckdb
import msgspec
import structlog

from catalog.clock import Clock, utcnow
from catalog.config import LimitsConfig
from catalog.database import SYSTEM_SCHEMA, Database
from catalog.errors import ResourceExhausted, Unprocessable, bounded
from catalog.identity import Principal
from catalog.swarms import SwarmStore, no_such_swarm, require_swarm
from catalog.writes import AdminWrites

log = structlog.get_logger(__name__)

Positive = Annotated[int, msgspec.Meta(ge=1, le=2**62)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400 * 365)]


class LimitOverrides(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Overrides of ``[limits]``; an absent key (null) is the default (the module's docstring)."""

    max_rows: Positive | None = None
    query_timeout_seconds: Seconds | None = None
    max_concurrent: Positive | None = None
    calls_per_minute: Positive | None = None


class SwarmLimitsBody(LimitOverrides, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """``PUT /v1/swarms/{name}/limits``: the swarm's own overrides, and ``per_agent`` overrides
    each of its agents has on its own."""

    per_agent: LimitOverrides | None = None


class EffectiveOut(msgspec.Struct, kw_only=True):
    max_rows: int
    query_timeout_seconds: float
    #: Queries of this principal at once: min(per_agent max_concurrent, [limits] max_concurrent_queries).
    max_concurrent_queries: int
    #: Queries of the whole swarm at once (null: no swarm-wide bound beyond the server's).
    swarm_max_concurrent: int | None
    calls_per_minute: int | None
    swarm_calls_per_minute: int | None


class SwarmLimitsOut(msgspec.Struct, kw_only=True):
    """``GET``/``PUT /v1/swarms/{name}/limits``: what is saved, and what applies with it."""

    swarm: str
    limits: SwarmLimitsBody
    #: What a request of the swarm token gets (the swarm's own keys over ``[limits]``).
    effective: EffectiveOut
    #: What a request of one of its agent tokens gets (per_agent, then the swarm's, then global).
    effective_per_agent: EffectiveOut


@dataclass(frozen=True, slots=True)
class Effective:
    """The limits one principal's request runs under, and where each came from (the sentence
    of a refusal names the key that set it)."""

    max_rows: int
    max_rows_source: str
    query_timeout_seconds: float
    timeout_source: str
    #: Per principal (token subject), never above ``[limits] max_concurrent_queries``.
    max_concurrent_queries: int
    concurrency_source: str
    swarm: str | None = None
    swarm_max_concurrent: int | None = None
    calls_per_minute: int | None = None
    swarm_calls_per_minute: int | None = None

    def out(self) -> EffectiveOut:
        return EffectiveOut(
            max_rows=self.max_rows,
            query_timeout_seconds=self.query_timeout_seconds,
            max_concurrent_queries=self.max_concurrent_queries,
            swarm_max_concurrent=self.swarm_max_concurrent,
            calls_per_minute=self.calls_per_minute,
            swarm_calls_per_minute=self.swarm_calls_per_minute,
        )


def global_limits(config: LimitsConfig) -> Effective:
    """``[limits]`` alone: an admin token's, and any principal's of a swarm without overrides."""
    return Effective(
        max_rows=config.max_rows,
        max_rows_source="[limits] max_rows",
        query_timeout_seconds=float(config.query_timeout_seconds),
        timeout_source="[limits] query_timeout_seconds",
        max_concurrent_queries=config.max_concurrent_queries,
        concurrency_source="[limits] max_concurrent_queries",
    )


def parse_limits(raw: Any, config: LimitsConfig) -> SwarmLimitsBody:
    """The overrides of a PUT body, checked against ``[limits]``: a key that is not a positive
    whole number (a number of seconds for the timeout), an unknown key, or a value past its
    ceiling is a 422 with a sentence; nothing is saved."""
    try:
        body = msgspec.convert(raw, SwarmLimitsBody, strict=True)
    except msgspec.ValidationError as e:
        raise Unprocessable(
            f"invalid limits: {bounded(str(e), 200)}; max_rows, max_concurrent and calls_per_minute "
            "are whole numbers >= 1, query_timeout_seconds a number of seconds > 0, per_agent "
            "takes the same keys; an absent key is the default ([limits])"
        ) from None
    for where, overrides in (("", body), ("per_agent.", body.per_agent)):
        if overrides is None:
            continue
        _check_ceilings(where, overrides, config)
    return body


def _check_ceilings(where: str, o: LimitOverrides, config: LimitsConfig) -> None:
    if o.max_rows is not None and o.max_rows > config.rows_ceiling:
        raise Unprocessable(
            f"{where}max_rows {o.max_rows} is above the ceiling {config.rows_ceiling} ([limits] "
            "max_rows_ceiling, or max_rows when it is unset): an override may loosen max_rows "
            "only up to it"
        )
    timeout = o.query_timeout_seconds
    if timeout is not None and timeout > config.timeout_ceiling:
        raise Unprocessable(
            f"{where}query_timeout_seconds {timeout:g} is above the ceiling {config.timeout_ceiling:g} "
            "([limits] query_timeout_ceiling_seconds, or query_timeout_seconds when it is unset): "
            "an override may loosen the timeout only up to it"
        )
    if o.max_concurrent is not None and o.max_concurrent > config.max_concurrent_total:
        # Per agent it could never bind above the per-principal bound, nor the swarm's above
        # the server's: a value past them would read as a promise the server cannot keep.
        raise Unprocessable(
            f"{where}max_concurrent {o.max_concurrent} is above the server's "
            f"[limits] max_concurrent_total ({config.max_concurrent_total}): concurrency can only "
            "be tightened"
        )
    if where and o.max_concurrent is not None and o.max_concurrent > config.max_concurrent_queries:
        raise Unprocessable(
            f"per_agent.max_concurrent {o.max_concurrent} is above [limits] max_concurrent_queries "
            f"({config.max_concurrent_queries}), which every principal keeps: concurrency can "
            "only be tightened"
        )


class TokenBuckets:
    """Calls per minute, one bucket per key: a bucket holds up to ``rate`` calls and refills
    at ``rate`` a minute, so a burst of ``rate`` calls passes at once and then one call every
    ``60 / rate`` seconds. Reads the injected clock's monotonic time, so a test moves it
    instead of sleeping. Full buckets are forgotten once there are many (a full bucket is the
    same as a new one)."""

    MAX_KEYS = 100_000

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens, monotonic time of that reading, rate it was filled at)
        self._buckets: dict[str, tuple[float, float, int]] = {}

    def take(self, keys: list[tuple[str, int]]) -> tuple[int, str, float] | None:
        """Take one call from every bucket of ``keys`` ((key, rate) pairs), or from none:
        None when all had one; else (rate, key, seconds until that bucket has a call)."""
        now = self._clock.monotonic()
        with self._lock:
            levels: list[tuple[str, float, int]] = []
            for key, rate in keys:
                tokens, at, was = self._buckets.get(key, (float(rate), now, rate))
                tokens = min(float(rate), tokens + (now - at) * rate / 60.0) if was == rate else float(rate)
                if tokens < 1.0:
                    return rate, key, (1.0 - tokens) * 60.0 / rate
                levels.append((key, tokens, rate))
            for key, tokens, rate in levels:
                self._buckets[key] = (tokens - 1.0, now, rate)
            if len(self._buckets) > self.MAX_KEYS:
                self._forget_full(now)
        return None

    def _forget_full(self, now: float) -> None:
        full = [k for k, (t, at, rate) in self._buckets.items() if t + (now - at) * rate / 60.0 >= rate]
        for key in full:
            del self._buckets[key]

    def drop(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self._buckets if k.startswith(prefix)]:
                del self._buckets[key]


class SwarmLimits:
    """The saved overrides (``_quiver.swarm_limits``), in memory, and the one lookup."""

    def __init__(
        self, db: Database, config: LimitsConfig, clock: Clock, writes: AdminWrites, swarms: SwarmStore
    ) -> None:
        self._db = db
        self._config = config
        self._clock = clock
        self._writes = writes
        self._swarms = swarms
        self._lock = threading.Lock()
        self._limits: dict[str, SwarmLimitsBody] = {}
        # (swarm, agent token?) -> what applies, resolved once per change: the lookup is on
        # every request's path (a few µs to resolve, a dictionary read once resolved).
        self._resolved: dict[tuple[str, bool], Effective] = {}
        self._global = global_limits(config)
        self.buckets = TokenBuckets(clock)
        with db.reading() as cur:
            for swarm, body in cur.execute(
                f"SELECT swarm, body FROM {SYSTEM_SCHEMA}.swarm_limits"
            ).fetchall():
                self._limits[swarm] = msgspec.json.decode(body, type=SwarmLimitsBody)

    # --- admin ---------------------------------------------------------------------------------
    def put(self, swarm: str, raw: Any) -> SwarmLimitsOut:
        """Replace ``swarm``'s overrides (validated first: nothing is saved on a bad body)."""
        body = parse_limits(raw, self._config)
        text = msgspec.json.encode(body).decode()
        now = utcnow(self._clock)

        def write(cur: duckdb.DuckDBPyConnection) -> None:
            require_swarm(cur, swarm)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarm_limits WHERE swarm = ?", [swarm])
            cur.execute(f"INSERT INTO {SYSTEM_SCHEMA}.swarm_limits VALUES (?, ?, ?)", [swarm, text, now])

        with self._writes.lock:
            self._writes.run("set limits", write)
            with self._lock:
                self._limits[swarm] = body
                self._forget(swarm)
        log.info("limits.set", swarm=swarm, limits=text)
        return self.get(swarm)

    def clear(self, swarm: str) -> SwarmLimitsOut:
        """Delete ``swarm``'s overrides: ``[limits]`` applies again (404 for no such swarm)."""

        def write(cur: duckdb.DuckDBPyConnection) -> None:
            require_swarm(cur, swarm)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarm_limits WHERE swarm = ?", [swarm])

        with self._writes.lock:
            self._writes.run("clear limits", write)
            with self._lock:
                self._limits.pop(swarm, None)
                self._forget(swarm)
        log.info("limits.cleared", swarm=swarm)
        return self.get(swarm)

    def get(self, swarm: str) -> SwarmLimitsOut:
        if not self._swarms.exists(swarm):
            raise no_such_swarm(swarm)
        with self._lock:
            body = self._limits.get(swarm) or SwarmLimitsBody()
        return SwarmLimitsOut(
            swarm=swarm,
            limits=body,
            effective=self._resolve(swarm, body, agent=False).out(),
            effective_per_agent=self._resolve(swarm, body, agent=True).out(),
        )

    def count(self) -> int:
        """Swarms with limits of their own (for /v1/status)."""
        with self._lock:
            return len(self._limits)

    def drop(self, cur: duckdb.DuckDBPyConnection, swarm: str) -> Callable[[], None]:
        """Delete ``swarm``'s overrides in the caller's transaction (the swarm's deletion);
        returns what to apply in memory once it committed."""
        cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarm_limits WHERE swarm = ?", [swarm])

        def apply() -> None:
            with self._lock:
                self._limits.pop(swarm, None)
                self._forget(swarm)
            self.buckets.drop(f"{swarm}\x00")

        return apply

    def _forget(self, swarm: str) -> None:
        self._resolved.pop((swarm, False), None)
        self._resolved.pop((swarm, True), None)

    # --- the lookup -------------------------------------------------------------------------------
    def limits_for(self, principal: Principal) -> Effective:
        """The limits ``principal``'s next request runs under (read on every request, so a PUT
        applies to the next one)."""
        swarm = principal.swarm
        if swarm is None:
            return self._global
        key = (swarm, principal.agent is not None)
        with self._lock:
            hit = self._resolved.get(key)
            if hit is not None:
                return hit
            body = self._limits.get(swarm)
            if body is None:
                return self._global
            # Resolved under the lock, so a write's _forget cannot be overtaken by a stale one.
            resolved = self._resolved[key] = self._resolve(swarm, body, agent=key[1])
        return resolved

    def _resolve(self, swarm: str, body: SwarmLimitsBody, *, agent: bool) -> Effective:
        g, config = self._global, self._config
        mine = body.per_agent if agent and body.per_agent is not None else LimitOverrides()
        where = f"PUT /v1/swarms/{bounded(swarm, 40)}/limits"
        rows, rows_source = g.max_rows, g.max_rows_source
        if mine.max_rows is not None:
            rows, rows_source = mine.max_rows, f"per_agent.max_rows of {where}"
        elif body.max_rows is not None:
            rows, rows_source = body.max_rows, f"max_rows of {where}"
        timeout, timeout_source = g.query_timeout_seconds, g.timeout_source
        if mine.query_timeout_seconds is not None:
            timeout, timeout_source = (
                mine.query_timeout_seconds,
                f"per_agent.query_timeout_seconds of {where}",
            )
        elif body.query_timeout_seconds is not None:
            timeout, timeout_source = body.query_timeout_seconds, f"query_timeout_seconds of {where}"
        concurrent, concurrency_source = g.max_concurrent_queries, g.concurrency_source
        if mine.max_concurrent is not None and mine.max_concurrent < concurrent:
            concurrent, concurrency_source = mine.max_concurrent, f"per_agent.max_concurrent of {where}"
        return Effective(
            # Saved under a ceiling since lowered: the current ceiling holds.
            max_rows=min(rows, config.rows_ceiling),
            max_rows_source=rows_source,
            query_timeout_seconds=min(float(timeout), config.timeout_ceiling),
            timeout_source=timeout_source,
            max_concurrent_queries=concurrent,
            concurrency_source=concurrency_source,
            swarm=swarm,
            swarm_max_concurrent=body.max_concurrent,
            calls_per_minute=mine.calls_per_minute,
            swarm_calls_per_minute=body.calls_per_minute,
        )

    # --- calls per minute -------------------------------------------------------------------------
    def take_call(self, principal: Principal, limits: Effective) -> None:
        """Count one admitted call of ``principal`` against its swarm's and its own rate:
        RESOURCE_EXHAUSTED (HTTP 429) naming the limit and when to retry, before any work."""
        swarm = limits.swarm
        if swarm is None:
            return
        keys: list[tuple[str, int]] = []
        if limits.swarm_calls_per_minute is not None:
            keys.append((f"{swarm}\x00", limits.swarm_calls_per_minute))
        if limits.calls_per_minute is not None:
            keys.append((f"{swarm}\x00{principal.subject}", limits.calls_per_minute))
        if not keys:
            return
        over = self.buckets.take(keys)
        if over is None:
            return
        rate, key, wait = over
        whom = f"swarm {bounded(swarm, 40)}" if key.endswith("\x00") else "each agent of the swarm"
        name = "calls_per_minute" if key.endswith("\x00") else "per_agent.calls_per_minute"
        retry = max(1, math.ceil(wait))
        raise ResourceExhausted(
            f"over the limit of {rate} calls a minute for {whom} ({name} of PUT "
            f"/v1/swarms/{bounded(swarm, 40)}/limits); retry in {retry} s"
        )
