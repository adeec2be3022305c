"""Tickets: opaque, short-lived, bound to the principal that obtained them.

A ticket is ``qv1.`` + 32 random bytes (URL-safe base64) naming a grant held in memory: what
to stream, for whom, until when. Nothing about the request can be read from or forged into a
ticket; a ticket shown by another principal, after its expiry or after a restart is refused.

Rules (proto_docs/tickets.md):
* a ticket is redeemable by the principal (token subject: the admin, one swarm, or one agent)
  that called GetFlightInfo — refreshing your token keeps your tickets valid, another
  agent's token does not;
* a ticket may be redeemed several times until it expires (a retried DoGet is safe);
* the allowlist is checked again at DoGet, so a revoked permission takes effect at once;
* an expired or unknown ticket is NOT_FOUND ("call GetFlightInfo again"); a foreign one is
  PERMISSION_DENIED.

Lifetimes read the catalog's clock (catalog/clock.py): its monotonic time decides expiry, its
wall time is what the endpoint's ``expiration_time`` tells the client.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from catalog import NotFound, PermissionDenied, Principal
from catalog.clock import SYSTEM_CLOCK, Clock

TICKET_PREFIX = b"qv1."
DEFAULT_TTL_SECONDS = 300.0
MAX_GRANTS = 100_000
PURGE_EVERY = 1_000

P = TypeVar("P")


@dataclass(frozen=True, slots=True)
class Grant(Generic[P]):
    subject: str
    payload: P
    expires: float  # Clock.monotonic()
    expires_at: float  # Clock.time(), for FlightEndpoint.expiration_time


class TicketStore(Generic[P]):
    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS, clock: Clock = SYSTEM_CLOCK) -> None:
        self.ttl = ttl_seconds
        self._clock = clock
        self._grants: dict[bytes, Grant[P]] = {}
        self._lock = threading.Lock()
        self._issued = 0

    def issue(self, principal: Principal, payload: P) -> tuple[bytes, Grant[P]]:
        now = self._clock.monotonic()
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32).encode()
        grant = Grant(principal.subject, payload, now + self.ttl, self._clock.time() + self.ttl)
        with self._lock:
            self._issued += 1
            if self._issued % PURGE_EVERY == 0 or len(self._grants) >= MAX_GRANTS:
                self._grants = {k: g for k, g in self._grants.items() if g.expires > now}
            if len(self._grants) >= MAX_GRANTS:
                # Still full of live grants: drop the oldest rather than grow without bound.
                for key in list(self._grants)[: MAX_GRANTS // 10]:
                    del self._grants[key]
            self._grants[ticket] = grant
        return ticket, grant

    def redeem(self, principal: Principal, ticket: bytes) -> P:
        grant = self._grants.get(ticket)
        if grant is None or grant.expires <= self._clock.monotonic():
            raise NotFound(
                "unknown or expired ticket: tickets live "
                f"{self.ttl:g} s and do not survive a restart; call GetFlightInfo again for a fresh one"
            )
        if grant.subject != principal.subject:
            raise PermissionDenied(
                "this ticket was issued to another principal; call GetFlightInfo with your own token"
            )
        return grant.payload

    def revoke(self, principal: Principal, ticket: bytes) -> bool:
        """Forget ``ticket`` if it is ``principal``'s (a closed Flight SQL prepared statement);
        whether it was. Another principal's ticket is left alone (and not revealed)."""
        with self._lock:
            grant = self._grants.get(ticket)
            if grant is None or grant.subject != principal.subject:
                return False
            del self._grants[ticket]
            return True

    def __len__(self) -> int:
        return len(self._grants)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def flight_endpoint(ticket: bytes, expires_at: float, app_metadata: bytes = b"") -> flight.FlightEndpoint:
    """The FlightEndpoint of ``ticket`` (no locations: this server) expiring at ``expires_at``
    (Unix seconds), in whole microseconds, with ``app_metadata`` (an inline result,
    flight_server/inline.py) — exactly ``flight.FlightEndpoint(ticket, [],
    expiration_time=pa.scalar(us * 1000, pa.timestamp("ns")), app_metadata=...)``, built from
    its protobuf encoding (Flight.proto: ``FlightEndpoint {Ticket ticket = 1; ...
    google.protobuf.Timestamp expiration_time = 3; bytes app_metadata = 4;}``) instead:
    pyarrow's constructor infers a scalar and runs a compute cast of it on every call, ~30 µs
    of a point query's GetFlightInfo (tests/bench/PROFILE.md, section 5); parsing the message
    is C++. tests/test_dataplane.py checks the two are equal."""
    micros = int(expires_at * 1e6)
    if micros < 0:  # before 1970 (never, for a ticket): protobuf's negative varints, by pyarrow
        return flight.FlightEndpoint(
            ticket,
            [],
            expiration_time=pa.scalar(micros * 1000, type=pa.timestamp("ns")),
            app_metadata=app_metadata,
        )
    seconds, rest = divmod(micros, 1_000_000)
    stamp = b"\x08" + _varint(seconds) + (b"\x10" + _varint(rest * 1000) if rest else b"")
    inner = b"\x0a" + _varint(len(ticket)) + ticket
    extra = b"\x22" + _varint(len(app_metadata)) + app_metadata if app_metadata else b""
    return flight.FlightEndpoint.deserialize(
        b"\x0a" + _varint(len(inner)) + inner + b"\x1a" + _varint(len(stamp)) + stamp + extra
    )
