"""The one DuckDB database instance of a Quiver process, locked down at open.

DuckDB allows a single read-write process per file, so every component of ``quiver serve``
shares this instance and takes its own cursor per request or thread (a cursor is a
connection of its own; DuckDB's MVCC gives each a consistent snapshot while sync writes).

Lockdown (ARCHITECTURE.md, "Limits"; proto_docs/errors.md) is the second layer under the SQL guard: after migrations, external
file and network access is switched off, extension auto-install/auto-load are off and the
configuration is locked, so even a query that slipped past the guard cannot read a file,
attach a database, load an extension or loosen a setting. Quiver writes files itself with
pyarrow, never with ``COPY``. Spilling to ``temp_directory`` keeps working.
"""

from __future__ import annotations

import os
import secrets
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import structlog

from catalog.errors import DatabaseInUse, QuiverError

log = structlog.get_logger(__name__)

SYSTEM_SCHEMA = "_quiver"
# Where tabular artefacts are loaded for SQL (catalog/artefacts.py): never a data schema.
ARTEFACT_SCHEMA = "artefacts"


def quote_ident(name: str) -> str:
    """Quote an identifier for DuckDB (doubling embedded quotes)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string literal for DuckDB SQL (doubling embedded single quotes), for the few places
    where a value cannot be a parameter (ATTACH's path, a struct's keys)."""
    return "'" + text.replace("'", "''") + "'"


def fetch_one(cur: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> tuple | None:
    """The first row or None, with the result consumed: a DuckDB connection with an
    unfinished result refuses its next query."""
    rows = cur.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def insert_columns(
    cur: duckdb.DuckDBPyConnection,
    table: str,
    columns: Sequence[tuple[str, str, list[Any]]],
    *,
    verb: str = "INSERT",
) -> None:
    """Insert a batch of rows given column by column, ``(name, DuckDB type, values)``, in one
    statement: ``INSERT INTO table (names) SELECT unnest($1::T1[]), unnest($2::T2[]), …``.

    For the batched writes of the hot path's records (the query log, the usage counters).
    DuckDB's ``executemany`` costs milliseconds per row; an Arrow table built from Python
    lists is fast, but pyarrow's first conversion of a Python list imports pandas (~340
    modules, ~0.2 s of a core, ~90 MB resident: every server that served one query paid it
    at its first flush). Here DuckDB's own binding converts each list into a LIST parameter,
    and the unnests of one SELECT zip them row by row (tests/test_query_log.py checks that a
    flush imports nothing and keeps every value). ``verb`` is ``INSERT`` or ``INSERT OR
    REPLACE``; names and types are the caller's constants, never input."""
    names = ", ".join(name for name, _, _ in columns)
    unnests = ", ".join(f"unnest(${i}::{kind}[])" for i, (_, kind, _) in enumerate(columns, 1))
    cur.execute(f"{verb} INTO {table} ({names}) SELECT {unnests}", [values for _, _, values in columns])


class CursorPool:
    """Cursors of a private DuckDB connection (the guard's parser, the views' filter parser,
    the live tables' binder), each taken for one use and given back: a DuckDB connection is
    not safe to share between threads, and a cursor per call would cost a connection each
    time (~0.15 ms, tests/bench/RESULTS.md "Costs the code relies on").

    A pool, not one cursor per thread: pyarrow's Flight server runs the handlers on gRPC's
    threads, which are not Python threads, and CPython makes and destroys their Python thread
    state — and with it every thread-local — on each entry into Python, so a per-thread
    cursor was opened again on nearly every call (tests/bench/PROFILE.md, section 11). At
    most ``keep`` idle cursors are kept (as many as calls used one at once, up to that)."""

    def __init__(self, connection: duckdb.DuckDBPyConnection, keep: int = 16) -> None:
        self._connection = connection
        self._keep = keep
        self._idle: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self.made = 0
        """Cursors opened (for tests)."""

    @contextmanager
    def use(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for the caller alone until the block ends."""
        with self._lock:
            cur = self._idle.pop() if self._idle else None
            if cur is None:
                self.made += 1
        if cur is None:
            cur = self._connection.cursor()
        try:
            yield cur
        finally:
            with self._lock:
                kept = len(self._idle) < self._keep
                if kept:
                    self._idle.append(cur)
            if not kept:
                cur.close()


class DatabaseTooNew(QuiverError):
    """The database holds migrations this release does not know: it was written by a newer
    Quiver. Opening it anyway would serve a schema this code was never written for (and a
    later downgrade-then-upgrade could apply a migration twice), so start-up refuses."""

    code = "FAILED_PRECONDITION"
    http_status = 503


def _migrations() -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("catalog.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name[:-4], entry.read_text()))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers: {versions}")
    return found


class Database:
    """Owns the DuckDB connection; hands out cursors; applies migrations and the lockdown."""

    def __init__(
        self,
        path: Path,
        *,
        temp_dir: Path,
        memory_limit: str = "",
        threads: int = 0,
        lockdown: bool = True,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.path = path
        # The one file the locked-down instance may create (see snapshot()): a fresh,
        # unguessable name per process, so a query that slipped past the SQL guard cannot
        # name it, and no directory is opened to it.
        self._snapshot_path = (
            snapshot_dir / f"snapshot-{secrets.token_hex(8)}.duckdb" if snapshot_dir else None
        )
        self._snapshot_lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, str | bool | int | float | list[str]] = {
            "temp_directory": str(temp_dir),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
        if memory_limit:
            config["memory_limit"] = memory_limit
        if threads:
            config["threads"] = threads
        created = not path.exists()
        try:
            self._con = duckdb.connect(str(path), config=config)
        except duckdb.IOException as e:
            if "lock" in str(e).lower():
                raise DatabaseInUse(
                    f"{path} is in use by another process (is `quiver serve` running?)"
                ) from None
            raise
        # Within one process DuckDB hands back the instance already open on this file
        # instead of failing on its lock; a locked configuration means another Database
        # (a running server) owns it.
        if fetch_one(self._con, "SELECT current_setting('lock_configuration')") == (True,):
            self._con.close()
            raise DatabaseInUse(f"{path} is in use by a server in this process")
        if created:
            # DuckDB creates the file with the process umask (often 0644); it holds every
            # token record and synced row, so it is private from the first start, like the
            # signing key. A file the operator brought ([server] database) keeps its mode.
            path.chmod(0o600)
        self._lock = threading.Lock()
        self._closed = False
        self._cursors: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()
        self.catalog_name: str = fetch_one(self._con, "SELECT current_database()")[0]  # type: ignore[index]
        try:
            self.migrate()
            if lockdown:
                self._lockdown()
        except BaseException:
            # Refusing to start must leave the file closed and unlocked, not half-open.
            self._closed = True
            self._con.close()
            raise

    def _snapshot_files(self) -> list[Path]:
        """The snapshot file and the companions DuckDB writes beside it (WAL, checkpoint WAL)."""
        assert self._snapshot_path is not None
        base = str(self._snapshot_path)
        return [Path(base), Path(base + ".wal"), Path(base + ".wal.checkpoint")]

    def _lockdown(self) -> None:
        if self._snapshot_path is not None:
            # allowed_paths must be set after the database has started and before the
            # configuration is locked; exact files, never a directory.
            self._con.execute("SET allowed_paths = ?", [[str(p) for p in self._snapshot_files()]])
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")

    def migrate(self) -> list[str]:
        """Apply pending migrations, each atomically; return the names applied."""
        con = self._con
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {SYSTEM_SCHEMA}")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {SYSTEM_SCHEMA}.schema_migrations ("
            " version INTEGER NOT NULL PRIMARY KEY, name VARCHAR NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        rows = con.sql(f"SELECT version, name FROM {SYSTEM_SCHEMA}.schema_migrations").fetchall()
        done = {r[0] for r in rows}
        known = _migrations()
        unknown = sorted((v, n) for v, n in rows if v not in {k for k, _, _ in known})
        if unknown:
            newest = max(rows)[1]
            ours = known[-1][1] if known else "none"
            raise DatabaseTooNew(
                f"{self.path} was migrated by a newer Quiver (its highest migration is {newest}; "
                f"this release knows up to {ours}; unknown: {', '.join(n for _, n in unknown)}): "
                "upgrade Quiver to the release that wrote it, or restore a backup taken before "
                "that upgrade with `quiver restore`. Nothing was changed"
            )
        applied = []
        for version, name, sql in known:
            if version in done:
                continue
            con.execute("BEGIN")
            try:
                con.execute(sql)
                con.execute(
                    f"INSERT INTO {SYSTEM_SCHEMA}.schema_migrations (version, name) VALUES (?, ?)",
                    [version, name],
                )
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            applied.append(name)
            log.info("catalog.migrated", migration=name)
        return applied

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one request or thread; close it when done."""
        with self._lock:
            if self._closed:
                raise RuntimeError("database is closed")
            cur = self._con.cursor()
            self._cursors.add(cur)
            return cur

    def interrupt_all(self) -> int:
        """Interrupt every query still running on a cursor (used at shutdown)."""
        with self._lock:
            cursors = list(self._cursors)
        for cur in cursors:
            with suppress(duckdb.Error):
                cur.interrupt()
        return len(cursors)

    @contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cur = self.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside BEGIN … COMMIT; any exception rolls everything back."""
        cur = self.cursor()
        try:
            cur.execute("BEGIN")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")
        finally:
            cur.close()

    @contextmanager
    def snapshot(self) -> Iterator[Path]:
        """A consistent, complete copy of the whole database as a DuckDB file, taken while
        the instance keeps serving; the file is removed when the block ends.

        Why ``ATTACH`` + ``COPY FROM DATABASE`` inside one transaction rather than
        ``CHECKPOINT`` and a file copy: the copy runs as a single MVCC transaction, so it
        sees every table (data tables, the ``_quiver`` system schema, sequences at their
        current values, views, macros, types) as of one instant while sync and admin writes
        go on, and it never reads the live file's bytes, so a checkpoint that lands halfway
        (DuckDB checkpoints automatically as the WAL grows) cannot tear it. Copying the file
        would need every writer in the process to stop, and nothing enforces that. The
        lockdown stays on: only this process's snapshot file is allowed (``allowed_paths``).
        """
        if self._snapshot_path is None:
            raise RuntimeError("this database was opened without a snapshot directory")
        with self._snapshot_lock:
            target = self._snapshot_path
            target.parent.mkdir(parents=True, exist_ok=True)
            for leftover in self._snapshot_files():
                leftover.unlink(missing_ok=True)
            alias = "quiver_snapshot_" + secrets.token_hex(4)
            source = quote_ident(self.catalog_name)
            literal = quote_literal(str(target))
            cur = self.cursor()
            try:
                cur.execute(f"ATTACH {literal} AS {alias}")
                try:
                    cur.execute("BEGIN")
                    try:
                        cur.execute(f"COPY FROM DATABASE {source} TO {alias}")
                        cur.execute("COMMIT")
                    except BaseException:
                        cur.execute("ROLLBACK")
                        raise
                finally:
                    # DETACH checkpoints the copy: afterwards the file is complete on its own.
                    cur.execute(f"DETACH {alias}")
            finally:
                cur.close()
            try:
                with open(target, "rb") as f:
                    os.fsync(f.fileno())
                yield target
            finally:
                for path in self._snapshot_files():
                    path.unlink(missing_ok=True)
                self._remove_empty_snapshot_dir()

    def _remove_empty_snapshot_dir(self) -> None:
        """The staging directory exists only while a snapshot is taken: an empty directory
        left in the data dir looks like a failed backup. Removed only when empty (another
        backup may be staging files in it); callers hold ``_snapshot_lock``, which also
        guards the create-then-ATTACH of :meth:`snapshot`."""
        if self._snapshot_path is not None:
            with suppress(OSError):
                self._snapshot_path.parent.rmdir()

    def tidy_snapshot_dir(self) -> None:
        """Remove the snapshot staging directory if nothing is staged in it any more."""
        with self._snapshot_lock:
            self._remove_empty_snapshot_dir()

    def size_bytes(self) -> int:
        total = 0
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            if p.exists():
                total += p.stat().st_size
        return total

    def close(self) -> None:
        """Checkpoint and close: the file is complete on disk without its WAL."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._con.execute("CHECKPOINT")
        except duckdb.Error as e:
            log.warning("catalog.checkpoint_failed", error=str(e))
        # Cursors still referenced somewhere (a finished request's thread, a reader) keep
        # the DuckDB instance -- and its file lock and locked configuration -- alive after
        # the main connection closes; a restart in the same process would get it back.
        with self._lock:
            cursors = list(self._cursors)
        for cur in cursors:
            with suppress(duckdb.Error):
                cur.close()
        self._con.close()
        log.info("catalog.closed", path=str(self.path))
