"""Request and response bodies of the control plane (msgspec Structs).

Request bodies forbid unknown fields: a misspelt ``ttl_seconds`` must be an error, not a
token with the default lifetime. Answers that are a domain object are that object's own
Struct (``catalog.swarms.Swarm``, ``catalog.tokens.IssuedToken``, ``TokenRecord``), not a copy.
The answers of GET /v1/status, /healthz, /v1/sync and POST /v1/sync/{table}/run live in
``catalog/status.py`` (the components that fill them, and ``quiver sync``, which decodes them,
name the same types).
"""

from __future__ import annotations

from typing import Any

import msgspec

from catalog.artefacts import Artefact
from catalog.audit import AuditEvent
from catalog.budgets import Budget
from catalog.identity import TokenKind
from catalog.rules import AttributeValue, RuleEntry
from catalog.swarms import Entry, Scalar, Swarm
from catalog.tokens import TokenRecord


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ErrorBody(msgspec.Struct, kw_only=True):
    error: str
    detail: str


class CreateSwarm(Request):
    name: str
    description: str = ""
    #: Entries: ``"schema.table"``, ``"schema.*"``, or an object with rules
    #: ``{"table", "columns" | "except_columns", "row_filter", "mask"}`` (proto_docs/governance.md).
    tables: list[Entry] = []


class SwarmList(msgspec.Struct, kw_only=True):
    swarms: list[Swarm]


class Allowlist(Request):
    #: As in CreateSwarm: strings, or objects with rules (422 for any fault in a rule).
    tables: list[Entry]


#: A flat object of strings and numbers; anything else is a 422 (proto_docs/governance.md).
#: Typed one level deep so a nested value reaches that 422 and a deeper one stops at the gate.
AttributesBody = dict[str, Scalar | list[Scalar] | dict[str, Scalar]]


class AllowlistOut(msgspec.Struct, kw_only=True):
    swarm: str
    #: The patterns (a ruled entry's is its ``schema.table``).
    tables: list[str]
    # Data tables the patterns match right now (patterns may name tables synced later).
    matching: list[str]
    # One sentence per entry that matches no table right now: saved all the same (a table
    # synced later is readable at once), but a typo shows here (proto_docs/control_plane.md).
    warnings: list[str] = msgspec.field(default_factory=list)
    #: The entries as stored: strings, and ruled entries as objects (canonical: the table
    #: folded, columns as the table spells them, parameters written ``$name``).
    entries: list[str | RuleEntry] = msgspec.field(default_factory=list)


class Attributes(msgspec.Struct, kw_only=True):
    """``GET``/``PUT /v1/swarms/{name}/attributes``: the swarm's attributes."""

    swarm: str
    attributes: dict[str, AttributeValue]


class SwarmView(Swarm, kw_only=True):
    """``GET /v1/swarms/{name}``: the swarm (``tables`` its patterns, as in the list), its
    entries with their rules, its attributes and its budget."""

    entries: list[str | RuleEntry]
    attributes: dict[str, AttributeValue]
    budget: Budget


class CreateToken(Request):
    kind: TokenKind
    swarm: str | None = None
    agent: str | None = None
    ttl_seconds: int | None = None
    #: Agent tokens only: carried by the token and its refreshes, bound into row filters.
    attributes: AttributesBody | None = None


class RefreshToken(Request):
    ttl_seconds: int | None = None


class TokenInfo(TokenRecord, kw_only=True):
    """A token's record (never the token) and whether it is usable right now."""

    active: bool


class TokenList(msgspec.Struct, kw_only=True):
    tokens: list[TokenInfo]


# GET /v1/whoami answers catalog.identity.WhoAmI: one Struct with the Flight action whoami.


class TableOut(msgspec.Struct, kw_only=True):
    table: str
    rows: int
    data_version: int
    swarms: list[str]
    #: The table's text for agents and its columns' (catalog/descriptions.py).
    description: str = ""
    columns: dict[str, str] = msgspec.field(default_factory=dict)
    #: Queried in Snowflake, never stored (proto_docs/federation.md); ``rows`` is Snowflake's count.
    live: bool = False


class DescriptionBody(Request):
    """``PUT /v1/tables/{schema.table}/description``: the table's text (omit to keep it, ""
    to remove it) and texts of named columns ("" removes one)."""

    table: str | None = None
    columns: dict[str, str] = msgspec.field(default_factory=dict)


class DescriptionOut(msgspec.Struct, kw_only=True):
    table: str
    description: str
    columns: dict[str, str]


class TableList(msgspec.Struct, kw_only=True):
    tables: list[TableOut]


class AuditList(msgspec.Struct, kw_only=True):
    events: list[AuditEvent]


# --- artefacts (proto_docs/artefacts.md, "Over HTTP") ----------------------------------------
# An artefact's metadata is the store's own ``catalog.artefacts.Artefact``.


class ArtefactList(msgspec.Struct, kw_only=True):
    """``GET /v1/artefacts``: one page, oldest first; pass ``next_cursor`` as ``cursor`` for
    the next one (null on the last page)."""

    artefacts: list[Artefact]
    next_cursor: str | None


class ShareArtefact(Request):
    """Whom to share with (or to stop sharing with): a whole swarm, or one agent of it."""

    swarm: str
    agent: str | None = None


class ExtendArtefact(Request):
    """Keep the artefact until now + ``ttl_seconds``."""

    ttl_seconds: int


class QueryBody(Request):
    """``POST /v1/query``: the fields of a Flight ``{"kind": "query"}`` command
    (proto_docs/descriptors.md); the result's format is chosen by ``Accept``."""

    sql: str
    params: list[Any] = []
    max_rows: int | None = None


class RefreshArtefact(Request):
    """``POST /v1/artefacts/{id}/refresh`` (optional): the new artefact's lifetime."""

    ttl_seconds: int | None = None
