"""Swarms and their allowlists: the durable half of authorization.

Every mutation is one transaction in the catalog, then the in-memory allowlists of
:class:`Policy` are updated, so the next request of any listener sees the change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import duckdb
import msgspec

from catalog.database import SYSTEM_SCHEMA, Database, fetch_one
from catalog.errors import Conflict, InvalidArgument, NotFound
from catalog.policy import Policy, normalize_patterns

SWARM_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_swarm_name(name: str) -> str:
    if not isinstance(name, str) or not SWARM_NAME_RE.match(name):
        raise InvalidArgument(
            f"swarm name {name!r} is not valid: 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


class Swarm(msgspec.Struct, kw_only=True):
    name: str
    description: str
    created_at: datetime
    tables: list[str]


class SwarmStore:
    def __init__(self, db: Database, policy: Policy) -> None:
        self._db = db
        self._policy = policy
        self._load()

    def _load(self) -> None:
        with self._db.reading() as cur:
            names = [r[0] for r in cur.sql(f"SELECT name FROM {SYSTEM_SCHEMA}.swarms").fetchall()]
            rows = cur.sql(f"SELECT swarm, pattern FROM {SYSTEM_SCHEMA}.allowlist").fetchall()
        lists: dict[str, list[str]] = {n: [] for n in names}
        for swarm, pattern in rows:
            lists.setdefault(swarm, []).append(pattern)
        for swarm, patterns in lists.items():
            self._policy.set_allowlist(swarm, sorted(patterns))

    def exists(self, name: str) -> bool:
        with self._db.reading() as cur:
            return fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]) is not None

    def create(self, name: str, description: str = "", tables: list[str] | None = None) -> Swarm:
        check_swarm_name(name)
        patterns = normalize_patterns(tables or [])
        now = datetime.now(UTC)
        with self._db.transaction() as cur:
            if fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
                raise Conflict(f"swarm {name!r} already exists; choose another name or DELETE it first")
            cur.execute(f"INSERT INTO {SYSTEM_SCHEMA}.swarms VALUES (?, ?, ?)", [name, description, now])
            if patterns:
                cur.executemany(
                    f"INSERT INTO {SYSTEM_SCHEMA}.allowlist VALUES (?, ?)",
                    [[name, p] for p in patterns],
                )
        self._policy.set_allowlist(name, patterns)
        return Swarm(name=name, description=description, created_at=now, tables=patterns)

    def get(self, name: str) -> Swarm:
        with self._db.reading() as cur:
            row = fetch_one(
                cur,
                f"SELECT name, description, created_at FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?",
                [name],
            )
        if row is None:
            raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")
        return Swarm(
            name=row[0],
            description=row[1],
            created_at=row[2],
            tables=list(self._policy.allowlist(name)),
        )

    def all(self) -> list[Swarm]:
        with self._db.reading() as cur:
            rows = cur.sql(
                f"SELECT name, description, created_at FROM {SYSTEM_SCHEMA}.swarms ORDER BY name"
            ).fetchall()
        return [
            Swarm(name=n, description=d, created_at=c, tables=list(self._policy.allowlist(n)))
            for n, d, c in rows
        ]

    def delete(
        self,
        name: str,
        *,
        revoke_tokens_of: Callable[[duckdb.DuckDBPyConnection, str], object] | None = None,
    ) -> None:
        """Remove the swarm and its allowlist. Its tokens are revoked by the caller's
        ``revoke_tokens_of`` inside the same transaction, so no token outlives its swarm."""
        with self._db.transaction() as cur:
            if not fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
                raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ?", [name])
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name])
            if revoke_tokens_of is not None:
                revoke_tokens_of(cur, name)
        self._policy.drop_swarm(name)

    def set_allowlist(self, name: str, tables: list[str]) -> list[str]:
        patterns = normalize_patterns(tables)
        with self._db.transaction() as cur:
            if not fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
                raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ?", [name])
            if patterns:
                cur.executemany(
                    f"INSERT INTO {SYSTEM_SCHEMA}.allowlist VALUES (?, ?)",
                    [[name, p] for p in patterns],
                )
        self._policy.set_allowlist(name, patterns)
        return patterns

    def get_allowlist(self, name: str) -> list[str]:
        if not self.exists(name):
            raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")
        return list(self._policy.allowlist(name))
