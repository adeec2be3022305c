"""Who is calling: the principal a verified token stands for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

TokenKind = Literal["admin", "swarm", "agent"]
TOKEN_KINDS: tuple[TokenKind, ...] = ("admin", "swarm", "agent")


@dataclass(frozen=True, slots=True)
class Principal:
    kind: TokenKind
    jti: str
    subject: str
    expires_at: datetime
    swarm: str | None = None
    agent: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def label(self) -> str:
        """A short name for logs and the audit log (never the token)."""
        if self.kind == "agent":
            return f"agent:{self.swarm}/{self.agent}"
        if self.kind == "swarm":
            return f"swarm:{self.swarm}"
        return f"admin:{self.subject}"
