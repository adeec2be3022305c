"""Swarms and their allowlists: the durable half of authorization.

Every mutation is one transaction run through :class:`~catalog.writes.AdminWrites` (one lock
for all admin writes), and the in-memory allowlists of :class:`Policy` and the swarm instance
ids are updated from what committed while that lock is still held: the committed state is the
single source of truth, memory never disagrees with it, and the next request of any listener
sees the change. A swarm deleted and re-created under the same name is a new *instance* (a
new ``id``); tokens carry the id of theirs, so a new swarm never honours an old one's tokens.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import duckdb
import msgspec

from catalog.database import SYSTEM_SCHEMA, Database, fetch_one
from catalog.errors import Conflict, InvalidArgument, NotFound, bounded
from catalog.policy import Policy, normalize_patterns
from catalog.writes import AdminWrites

SWARM_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_swarm_name(name: str) -> str:
    if not isinstance(name, str) or not SWARM_NAME_RE.match(name):
        raise InvalidArgument(
            f"swarm name {bounded(name)!r} is not valid: 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


class Swarm(msgspec.Struct, kw_only=True):
    name: str
    description: str
    created_at: datetime
    tables: list[str]


class SwarmStore:
    def __init__(self, db: Database, policy: Policy, writes: AdminWrites | None = None) -> None:
        self._db = db
        self._policy = policy
        self.writes = writes or AdminWrites(db)
        # name -> instance id of every existing swarm; read on every token verification.
        self._ids: dict[str, str] = {}
        self._ids_lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        with self.writes.lock, self._db.reading() as cur:
            swarms = cur.sql(f"SELECT name, id FROM {SYSTEM_SCHEMA}.swarms").fetchall()
            rows = cur.sql(f"SELECT swarm, pattern FROM {SYSTEM_SCHEMA}.allowlist").fetchall()
            lists: dict[str, list[str]] = {n: [] for n, _ in swarms}
            for swarm, pattern in rows:
                if swarm in lists:
                    lists[swarm].append(pattern)
            for swarm, patterns in lists.items():
                self._policy.set_allowlist(swarm, sorted(patterns))
            with self._ids_lock:
                self._ids = {n: i for n, i in swarms}

    # --- reading ------------------------------------------------------------------------
    def instance(self, name: str) -> str | None:
        """The id of the swarm called ``name`` now, or None (memory only: the hot path)."""
        return self._ids.get(name)

    def exists(self, name: str) -> bool:
        return name in self._ids

    @staticmethod
    def _committed_patterns(cur: duckdb.DuckDBPyConnection, name: str) -> list[str]:
        rows = cur.execute(
            f"SELECT pattern FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ? ORDER BY pattern", [name]
        ).fetchall()
        return [r[0] for r in rows]

    def get(self, name: str) -> Swarm:
        with self._db.reading() as cur:
            row = fetch_one(
                cur,
                f"SELECT name, description, created_at FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?",
                [name],
            )
            if row is None:
                raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")
            tables = self._committed_patterns(cur, name)
        return Swarm(name=row[0], description=row[1], created_at=row[2], tables=tables)

    def all(self) -> list[Swarm]:
        with self._db.reading() as cur:
            rows = cur.sql(
                f"SELECT name, description, created_at FROM {SYSTEM_SCHEMA}.swarms ORDER BY name"
            ).fetchall()
            patterns = cur.sql(
                f"SELECT swarm, pattern FROM {SYSTEM_SCHEMA}.allowlist ORDER BY swarm, pattern"
            ).fetchall()
        lists: dict[str, list[str]] = {}
        for swarm, pattern in patterns:
            lists.setdefault(swarm, []).append(pattern)
        return [Swarm(name=n, description=d, created_at=c, tables=lists.get(n, [])) for n, d, c in rows]

    def get_allowlist(self, name: str) -> list[str]:
        """The committed allowlist (the in-memory policy equals it: both change under one lock)."""
        with self._db.reading() as cur:
            if not fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
                raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")
            return self._committed_patterns(cur, name)

    # --- changing (each under the admin-write lock) ---------------------------------------
    def create(self, name: str, description: str = "", tables: list[str] | None = None) -> Swarm:
        check_swarm_name(name)
        patterns = normalize_patterns(tables or [])
        now = datetime.now(UTC)
        swarm_id = uuid.uuid4().hex

        def write(cur: duckdb.DuckDBPyConnection) -> list[str]:
            if fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
                raise Conflict(f"swarm {name!r} already exists; choose another name or DELETE it first")
            cur.execute(
                f"INSERT INTO {SYSTEM_SCHEMA}.swarms (name, description, created_at, id) VALUES (?, ?, ?, ?)",
                [name, description, now, swarm_id],
            )
            _insert_patterns(cur, name, patterns)
            return self._committed_patterns(cur, name)

        with self.writes.lock:
            committed = self.writes.run(f"create swarm {name!r}", write)
            self._policy.set_allowlist(name, committed)
            with self._ids_lock:
                self._ids[name] = swarm_id
        return Swarm(name=name, description=description, created_at=now, tables=committed)

    def delete(
        self,
        name: str,
        *,
        revoke_tokens_of: Callable[[duckdb.DuckDBPyConnection, str], Callable[[], object]] | None = None,
    ) -> None:
        """Remove the swarm and its allowlist. Its tokens are revoked by the caller's
        ``revoke_tokens_of`` inside the same transaction (it returns what to apply in memory
        once the transaction committed), so no token outlives its swarm; mints take the same
        lock, so none can slip in between."""

        def write(cur: duckdb.DuckDBPyConnection) -> Callable[[], object] | None:
            _require_swarm(cur, name)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ?", [name])
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name])
            return revoke_tokens_of(cur, name) if revoke_tokens_of is not None else None

        with self.writes.lock:
            apply = self.writes.run(f"delete swarm {name!r}", write)
            with self._ids_lock:
                self._ids.pop(name, None)
            self._policy.drop_swarm(name)
            if apply is not None:
                apply()

    def set_allowlist(self, name: str, tables: list[str]) -> list[str]:
        patterns = normalize_patterns(tables)

        def write(cur: duckdb.DuckDBPyConnection) -> list[str]:
            _require_swarm(cur, name)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ?", [name])
            _insert_patterns(cur, name, patterns)
            return self._committed_patterns(cur, name)

        with self.writes.lock:
            committed = self.writes.run(f"replace the allowlist of swarm {name!r}", write)
            self._policy.set_allowlist(name, committed)
        return committed


def _require_swarm(cur: duckdb.DuckDBPyConnection, name: str) -> None:
    if not fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
        raise NotFound(f"swarm {name!r} does not exist; GET /v1/swarms lists them")


def _insert_patterns(cur: duckdb.DuckDBPyConnection, name: str, patterns: list[str]) -> None:
    if patterns:
        cur.executemany(
            f"INSERT INTO {SYSTEM_SCHEMA}.allowlist (swarm, pattern) VALUES (?, ?)",
            [[name, p] for p in patterns],
        )
