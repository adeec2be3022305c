"""The clock that expiry reads: token lifetimes (catalog/tokens.py), tickets and the results
held with them (flight_server/tickets.py, ready.py), result-cache entries (cache.py) and
async results (results.py); and :func:`iso`, how an answer writes a time.

Whatever decides "has this expired?" reads one injected :class:`Clock` instead of calling
``time`` itself, so that every part of one decision (a token's ``iat`` and ``exp`` when it is
signed, the expiry check when it is presented, the clamp of a refresh to what the chain's
root was granted) sees the same time. The process uses :data:`SYSTEM_CLOCK`; a test passes a
clock it moves by hand (``tests/harness.FakeClock``) to a real server, so it can say "five
minutes later" without waiting five minutes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol, overload


class Clock(Protocol):
    """Two readings of one clock: wall time (what tokens and Flight endpoints carry) and a
    monotonic time (what in-memory deadlines compare: unaffected by the wall clock being
    set back or forward)."""

    def time(self) -> float:
        """Seconds since the epoch, like :func:`time.time`."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin that never go back, like :func:`time.monotonic`."""
        ...


class SystemClock:
    """The host's clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()


def utcnow(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime (what the tokens table stores)."""
    return datetime.fromtimestamp(clock.time(), UTC)


@overload
def iso(value: datetime | float) -> str: ...
@overload
def iso(value: None) -> None: ...
def iso(value: datetime | float | None) -> str | None:
    """A time in an answer (Flight actions, GET /v1/sync): ISO 8601 in UTC
    (``2026-01-31T12:00:00.5+00:00``). A float is a ``time.time()`` timestamp; a naive
    datetime is UTC (what DuckDB's ``TIMESTAMP`` columns of Quiver's own state hold), never
    the host's local time."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        return datetime.fromtimestamp(value, UTC).isoformat()
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()
