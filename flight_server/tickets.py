"""Tickets: opaque, short-lived, bound to the principal that obtained them.

A ticket is 24 random bytes naming a grant held in memory: what to stream, for whom, until
when. Nothing about the request can be read from or forged into a ticket; a ticket shown by
another principal, after its expiry or after a restart is refused.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from catalog import NotFound, PermissionDenied, Principal

TICKET_PREFIX = b"qv1."
DEFAULT_TTL_SECONDS = 300.0
MAX_GRANTS = 100_000


@dataclass(slots=True)
class Grant:
    subject: str
    payload: Any
    expires: float
    created: float = field(default_factory=time.monotonic)


class TicketStore:
    def __init__(self, ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self.ttl = ttl_seconds
        self._grants: dict[bytes, Grant] = {}
        self._lock = threading.Lock()

    def issue(self, principal: Principal, payload: Any) -> bytes:
        now = time.monotonic()
        ticket = TICKET_PREFIX + secrets.token_urlsafe(24).encode()
        with self._lock:
            if len(self._grants) >= MAX_GRANTS:
                self._grants = {k: g for k, g in self._grants.items() if g.expires > now}
            self._grants[ticket] = Grant(principal.subject, payload, now + self.ttl)
        return ticket

    def redeem(self, principal: Principal, ticket: bytes) -> Any:
        grant = self._grants.get(ticket)
        if grant is None or grant.expires <= time.monotonic():
            raise NotFound(
                "unknown or expired ticket: tickets live "
                f"{int(self.ttl)} s; call GetFlightInfo again for a fresh one"
            )
        if grant.subject != principal.subject:
            raise PermissionDenied("this ticket was issued to another principal; call GetFlightInfo yourself")
        return grant.payload
