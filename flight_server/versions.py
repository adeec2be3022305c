"""The data version of every table, cheaply: what the caches of the data plane key on; and
a table's :class:`Layout`, the snapshot of it that split reads and the hot-table cache check.

At the bottom of the data plane's modules: plans, the planner, streams and the caches all
import it, it imports none of them."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from catalog import TableRef
from catalog.database import SYSTEM_SCHEMA, Database, fetch_one
from catalog.tables import fold


class VersionWatch:
    """The data versions of every table, read from the catalog only when the database may
    have changed.

    Reading ``_quiver.data_versions`` is a DuckDB query (about half a millisecond here), more
    than a cache hit or a point query's own work. Every commit that changes data writes the
    DuckDB file or its WAL (durability), so while neither file's size and mtime changed, the
    versions read last are still current. The file times are coarse (a few ms), so the
    versions are also re-read at least every ``max_age`` seconds whatever the files say.
    The stat is taken *before* the read, so a commit racing with the read is seen next time.

    Keys are ``TableRef.key()`` (identifiers folded the way DuckDB matches them).
    """

    def __init__(self, db: Database, max_age: float = 1.0) -> None:
        path: Path = db.path
        self._db = db
        self._files = (path, path.with_name(path.name + ".wal"))
        self.max_age = max_age
        self._lock = threading.Lock()
        self._state: tuple[tuple[int, ...], float, dict[tuple[str, str], int]] | None = None
        #: Changes whenever the catalog was read again: what was derived from the database
        #: under an older generation (e.g. resolved table names) may be out of date.
        self.generation = 0

    def _stamp(self) -> tuple[int, ...]:
        out: list[int] = []
        for f in self._files:
            try:
                st = os.stat(f)
                out += (st.st_ino, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                out += (0, -1, 0)
        return tuple(out)

    def current(self, cur: duckdb.DuckDBPyConnection | None = None) -> dict[tuple[str, str], int]:
        """Every table's data version; ``cur`` is used when the catalog must be read (a
        cursor of its own otherwise)."""
        stamp, now = self._stamp(), time.monotonic()
        state = self._state
        if state is not None and state[0] == stamp and now - state[1] < self.max_age:
            return state[2]
        sql = f"SELECT schema_name, table_name, version FROM {SYSTEM_SCHEMA}.data_versions"
        if cur is None:
            with self._db.reading() as own:
                rows = own.execute(sql).fetchall()
        else:
            rows = cur.execute(sql).fetchall()
        versions = {(fold(s), fold(t)): int(v) for s, t, v in rows}
        with self._lock:
            self._state = (stamp, now, versions)
            self.generation += 1
        return versions


@dataclass(frozen=True, slots=True)
class Layout:
    """The physical state of a table that a split read depends on: its data version plus its
    row count and largest rowid (which also catch a checkpoint that compacts deleted rows and
    so renumbers rowids without a new version). The planner reads it at GetFlightInfo, DoGet
    again with the rows (flight_server/planner.py), and the hot-table cache keys on it."""

    ref: TableRef
    version: int
    rows: int
    max_rowid: int


def read_layout(cur: duckdb.DuckDBPyConnection, ref: TableRef, *, begin: bool) -> Layout:
    """Version, row count and largest rowid of ``ref`` in one snapshot.

    ``begin=True`` opens (and afterwards ends) a transaction of its own; with
    ``begin=False`` the caller's transaction is used and stays open for its next query.
    """
    if begin:
        cur.execute("BEGIN TRANSACTION")
    try:
        s, t = ref.key()
        row = fetch_one(
            cur,
            f"SELECT version FROM {SYSTEM_SCHEMA}.data_versions "
            "WHERE lower(schema_name) = ? AND lower(table_name) = ?",
            [s, t],
        )
        count, max_rowid = fetch_one(cur, f"SELECT count(*), coalesce(max(rowid), -1) FROM {ref.sql}")  # type: ignore[misc]
        return Layout(ref, int(row[0]) if row else 0, int(count), int(max_rowid))
    finally:
        if begin:
            cur.execute("ROLLBACK")
