"""Request and response bodies of the control plane (msgspec Structs).

Request bodies forbid unknown fields: a misspelt ``ttl_seconds`` must be an error, not a
token with the default lifetime.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from catalog.audit import AuditEvent
from catalog.tokens import TokenRecord


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str
    detail: str


class CreateSwarm(Request):
    name: str
    description: str = ""
    tables: list[str] = []


class SwarmOut(msgspec.Struct, kw_only=True):
    name: str
    description: str
    created_at: datetime
    tables: list[str]


class SwarmList(msgspec.Struct, kw_only=True):
    swarms: list[SwarmOut]


class Allowlist(Request):
    tables: list[str]


class AllowlistOut(msgspec.Struct, kw_only=True):
    swarm: str
    tables: list[str]
    # Data tables the patterns match right now (patterns may name tables synced later).
    matching: list[str]


class CreateToken(Request):
    kind: Literal["admin", "swarm", "agent"]
    swarm: str | None = None
    agent: str | None = None
    ttl_seconds: int | None = None


class RefreshToken(Request):
    ttl_seconds: int | None = None


class TokenOut(msgspec.Struct, kw_only=True):
    token: str
    jti: str
    kind: str
    swarm: str | None
    agent: str | None
    expires_at: datetime


class TokenInfo(TokenRecord, kw_only=True):
    """A token's record (never the token) and whether it is usable right now."""

    active: bool


class TokenList(msgspec.Struct, kw_only=True):
    tokens: list[TokenInfo]


class WhoAmI(msgspec.Struct, kw_only=True):
    kind: str
    swarm: str | None
    agent: str | None
    jti: str
    expires_at: datetime
    tables: list[str]


class TableOut(msgspec.Struct, kw_only=True):
    table: str
    rows: int
    data_version: int
    swarms: list[str]


class TableList(msgspec.Struct, kw_only=True):
    tables: list[TableOut]


class AuditList(msgspec.Struct, kw_only=True):
    events: list[AuditEvent]


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "unavailable"]
    listeners: dict[str, Any]
