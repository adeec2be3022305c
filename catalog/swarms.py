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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import duckdb
import msgspec

from catalog.database import SYSTEM_SCHEMA, Database, fetch_one
from catalog.errors import Conflict, InvalidArgument, NotFound, bounded
from catalog.policy import Policy
from catalog.rules import (
    AttributeValue,
    Entries,
    EntryChecker,
    RuleEntry,
    TableRule,
    check_attributes,
    entry_view,
)
from catalog.tables import TableCatalog
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


class Committed(msgspec.Struct, frozen=True, kw_only=True):
    """A swarm's allowlist as committed: its patterns and the rules of its ruled entries."""

    patterns: list[str]
    rules: list[TableRule]

    def entries(self) -> list[str | RuleEntry]:
        """The entries as the admin view shows them (proto_docs/control_plane.md)."""
        by_table = {r.table: r for r in self.rules}
        return [entry_view(p, by_table.get(p)) for p in self.patterns]


#: An allowlist entry as a PUT or POST body gives it: a pattern, or an object with rules
#: (checked by :class:`catalog.rules.EntryChecker`, 422 on any fault). Typed only as deep as
#: an entry can be, so the request gate's strict decode stops a deeper body at its first byte
#: (control_plane/gate.py), while unknown fields and wrong scalars reach the checker's 422.
Scalar = str | int | float | bool | None
EntryObject = dict[str, Scalar | list[Scalar] | dict[str, Scalar]]
Entry = str | EntryObject


class SwarmStore:
    def __init__(
        self,
        db: Database,
        policy: Policy,
        writes: AdminWrites | None = None,
        *,
        tables: TableCatalog | None = None,
    ) -> None:
        self._db = db
        self._policy = policy
        # Ruled entries are checked against the tables' real columns when they are saved: the
        # catalog's own TableCatalog, which knows the live tables (catalog/live.py) too.
        self._checker = EntryChecker(tables or TableCatalog(db))
        self.writes = writes or AdminWrites(db)
        # name -> instance id of every existing swarm; read on every token verification.
        self._ids: dict[str, str] = {}
        self._ids_lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        with self.writes.lock, self._db.reading() as cur:
            swarms = cur.sql(f"SELECT name, id FROM {SYSTEM_SCHEMA}.swarms").fetchall()
            rows = cur.sql(
                f"SELECT swarm, pattern, rule FROM {SYSTEM_SCHEMA}.allowlist ORDER BY swarm, pattern"
            ).fetchall()
            attributes = cur.sql(f"SELECT swarm, body FROM {SYSTEM_SCHEMA}.swarm_attributes").fetchall()
            lists: dict[str, Committed] = {n: Committed(patterns=[], rules=[]) for n, _ in swarms}
            for swarm, pattern, rule in rows:
                if swarm in lists:
                    lists[swarm].patterns.append(pattern)
                    if rule is not None:
                        lists[swarm].rules.append(msgspec.json.decode(rule, type=TableRule))
            held = {swarm: _decode_attributes(body) for swarm, body in attributes}
            for swarm, committed in lists.items():
                self._apply(swarm, committed)
                self._policy.set_attributes(swarm, held.get(swarm, {}))
            with self._ids_lock:
                self._ids = {n: i for n, i in swarms}

    # --- reading ------------------------------------------------------------------------
    def instance(self, name: str) -> str | None:
        """The id of the swarm called ``name`` now, or None (memory only: the hot path)."""
        return self._ids.get(name)

    def exists(self, name: str) -> bool:
        return name in self._ids

    def _apply(self, swarm: str, committed: Committed) -> None:
        """Memory from what committed (the caller holds the admin-write lock)."""
        self._policy.set_allowlist(swarm, committed.patterns)
        self._policy.set_rules(swarm, committed.rules)

    @staticmethod
    def _committed(cur: duckdb.DuckDBPyConnection, name: str) -> Committed:
        rows = cur.execute(
            f"SELECT pattern, rule FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ? ORDER BY pattern", [name]
        ).fetchall()
        return Committed(
            patterns=[r[0] for r in rows],
            rules=[msgspec.json.decode(r[1], type=TableRule) for r in rows if r[1] is not None],
        )

    @classmethod
    def _committed_patterns(cls, cur: duckdb.DuckDBPyConnection, name: str) -> list[str]:
        return cls._committed(cur, name).patterns

    def get(self, name: str) -> Swarm:
        with self._db.reading() as cur:
            row = fetch_one(
                cur,
                f"SELECT name, description, created_at FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?",
                [name],
            )
            if row is None:
                raise no_such_swarm(name)
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

    def get_allowlist(self, name: str) -> Committed:
        """The committed allowlist (the in-memory policy equals it: both change under one lock)."""
        with self._db.reading() as cur:
            require_swarm(cur, name)
            return self._committed(cur, name)

    def get_attributes(self, name: str) -> dict[str, AttributeValue]:
        """The swarm's committed attributes (the policy holds the same)."""
        with self._db.reading() as cur:
            require_swarm(cur, name)
            row = fetch_one(cur, f"SELECT body FROM {SYSTEM_SCHEMA}.swarm_attributes WHERE swarm = ?", [name])
        return _decode_attributes(row[0]) if row else {}

    # --- changing (each under the admin-write lock) ---------------------------------------
    def check_entries(self, entries: Sequence[Entry]) -> Entries:
        """Validate an allowlist body (422 on any fault, nothing read but the tables)."""
        return self._checker.check(entries)

    def create(self, name: str, description: str = "", tables: Sequence[Entry] | None = None) -> Swarm:
        check_swarm_name(name)
        entries = self.check_entries(tables or [])
        now = datetime.now(UTC)
        swarm_id = uuid.uuid4().hex

        def write(cur: duckdb.DuckDBPyConnection) -> Committed:
            if fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
                raise Conflict(f"swarm {name!r} already exists; choose another name or DELETE it first")
            cur.execute(
                f"INSERT INTO {SYSTEM_SCHEMA}.swarms (name, description, created_at, id) VALUES (?, ?, ?, ?)",
                [name, description, now, swarm_id],
            )
            _insert_entries(cur, name, entries)
            return self._committed(cur, name)

        with self.writes.lock:
            committed = self.writes.run(f"create swarm {name!r}", write)
            self._apply(name, committed)
            self._policy.set_attributes(name, {})
            with self._ids_lock:
                self._ids[name] = swarm_id
        return Swarm(name=name, description=description, created_at=now, tables=committed.patterns)

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
            require_swarm(cur, name)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ?", [name])
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarm_attributes WHERE swarm = ?", [name])
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name])
            return revoke_tokens_of(cur, name) if revoke_tokens_of is not None else None

        with self.writes.lock:
            apply = self.writes.run(f"delete swarm {name!r}", write)
            with self._ids_lock:
                self._ids.pop(name, None)
            self._policy.drop_swarm(name)
            if apply is not None:
                apply()

    def set_allowlist(self, name: str, tables: Sequence[Entry]) -> Committed:
        """Replace the swarm's allowlist: every entry is validated first (a ruled one against
        its table's columns), then the whole list is replaced in one transaction and memory
        set from what committed, under the admin-write lock."""
        entries = self.check_entries(tables)

        def write(cur: duckdb.DuckDBPyConnection) -> Committed:
            require_swarm(cur, name)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.allowlist WHERE swarm = ?", [name])
            _insert_entries(cur, name, entries)
            return self._committed(cur, name)

        with self.writes.lock:
            committed = self.writes.run(f"replace the allowlist of swarm {name!r}", write)
            self._apply(name, committed)
        return committed

    def set_attributes(self, name: str, raw: object) -> dict[str, AttributeValue]:
        """Replace the swarm's attributes (validated first: 422, nothing saved); memory is set
        from what committed under the admin-write lock. An empty object removes them all."""
        attributes = check_attributes(raw)
        body = msgspec.json.encode(attributes).decode()
        now = datetime.now(UTC)

        def write(cur: duckdb.DuckDBPyConnection) -> dict[str, AttributeValue]:
            require_swarm(cur, name)
            cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.swarm_attributes WHERE swarm = ?", [name])
            if attributes:
                cur.execute(
                    f"INSERT INTO {SYSTEM_SCHEMA}.swarm_attributes (swarm, body, updated_at) VALUES (?, ?, ?)",
                    [name, body, now],
                )
            row = fetch_one(cur, f"SELECT body FROM {SYSTEM_SCHEMA}.swarm_attributes WHERE swarm = ?", [name])
            return _decode_attributes(row[0]) if row else {}

        with self.writes.lock:
            committed = self.writes.run(f"replace the attributes of swarm {name!r}", write)
            self._policy.set_attributes(name, committed)
        return committed


def no_such_swarm(name: str) -> NotFound:
    """The one refusal of a swarm that does not exist (every swarm route's 404), the name
    echoed bounded."""
    return NotFound(f"swarm {bounded(name, 80)!r} does not exist; GET /v1/swarms lists them")


def require_swarm(cur: duckdb.DuckDBPyConnection, name: str) -> None:
    """Refuse, inside the caller's write transaction, a swarm that does not exist (so a write
    racing the swarm's deletion cannot leave a row behind)."""
    if not fetch_one(cur, f"SELECT 1 FROM {SYSTEM_SCHEMA}.swarms WHERE name = ?", [name]):
        raise no_such_swarm(name)


def _insert_entries(cur: duckdb.DuckDBPyConnection, name: str, entries: Entries) -> None:
    """One row per pattern; a ruled entry's row holds its rule (a rule that restricts
    nothing is stored as the plain entry it is)."""
    rules = {r.table: r for r in entries.rules if not r.is_plain}
    if entries.patterns:
        cur.executemany(
            f"INSERT INTO {SYSTEM_SCHEMA}.allowlist (swarm, pattern, rule) VALUES (?, ?, ?)",
            [
                [name, p, msgspec.json.encode(rules[p]).decode() if p in rules else None]
                for p in entries.patterns
            ],
        )


def _decode_attributes(body: str) -> dict[str, AttributeValue]:
    return msgspec.json.decode(body, type=dict[str, str | int | float])
