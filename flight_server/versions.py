"""The data version of every table, cheaply: what the caches of the data plane key on."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import duckdb

from catalog.database import SYSTEM_SCHEMA, Database
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
