"""Snapshots of Quiver's durable state, read through the catalog, for "nothing changed"
assertions after a refused request."""

from __future__ import annotations

from typing import Any

from tests.harness import Server


def snapshot(server: Server) -> dict[str, Any]:
    catalog = server.catalog
    swarms = [(s.name, s.description, tuple(s.tables)) for s in catalog.swarms.all()]
    tokens = [
        (t.jti, t.kind, t.swarm, t.agent, t.expires_at, t.revoked_at)
        for t in catalog.tokens.list(include_inactive=True, limit=100_000)
    ]
    return {
        "swarms": swarms,
        "tokens": sorted(tokens, key=lambda t: t[0]),
        "tables": catalog.tables.list_refs(),
    }
