"""Who is calling: the principal a verified token stands for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import msgspec

TokenKind = Literal["admin", "swarm", "agent", "metrics"]
TOKEN_KINDS: tuple[TokenKind, ...] = ("admin", "swarm", "agent", "metrics")
# Kinds that belong to no swarm. A metrics token may read GET /metrics and nothing else
# (proto_docs/authentication.md, "Metrics tokens"): Prometheus holds no admin power.
UNSCOPED_KINDS: frozenset[str] = frozenset({"admin", "metrics"})
METRICS_ONLY = "a metrics token may read GET /metrics on the control plane and nothing else"


@dataclass(frozen=True, slots=True)
class Principal:
    kind: TokenKind
    jti: str
    subject: str
    expires_at: datetime
    swarm: str | None = None
    agent: str | None = None
    # Lineage (proto_docs/authentication.md, "Token chains"): the first jti of this token's
    # refresh chain; for an agent token minted by a swarm token, the root of that swarm
    # token's chain, whose revocation this token does not survive; the swarm instance the
    # token was minted for (a swarm re-created under the same name is another instance).
    root: str | None = None
    grant: str | None = None
    swarm_id: str | None = None
    # Agent attributes given when the token was minted and carried by its refreshes
    # (proto_docs/governance.md): bound into row filters, overriding the swarm's own.
    attributes: tuple[tuple[str, str | int | float], ...] = ()

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def is_metrics(self) -> bool:
        return self.kind == "metrics"

    @property
    def label(self) -> str:
        """A short name for logs and the audit log (never the token)."""
        if self.kind == "agent":
            return f"agent:{self.swarm}/{self.agent}"
        if self.kind == "swarm":
            return f"swarm:{self.swarm}"
        if self.kind == "metrics":
            return "metrics"
        return f"admin:{self.subject}"


class WhoAmI(msgspec.Struct, kw_only=True):
    """Who a token stands for and what it may read: the one answer of ``GET /v1/whoami``
    and of the Flight action ``whoami`` (proto_docs/listing.md, proto_docs/actions.md), so
    the two listeners cannot drift apart. Built by :meth:`catalog.Catalog.whoami`."""

    kind: str
    swarm: str | None
    agent: str | None
    jti: str
    expires_at: datetime  # JSON: RFC 3339 in UTC ("...Z")
    tables: list[str]
