"""Data tables: every table of the database outside the system schema.

Listings and schemas come from DuckDB's catalog (``duckdb_tables()``, a ``LIMIT 0`` query for
the Arrow schema, DuckDB's row-group counts for ``count(*)``), never from scanning data. The
data version of each table is a counter every writer bumps in the same transaction as its
change; caches of profiles and results key on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import structlog

from catalog.database import ARTEFACT_SCHEMA, SYSTEM_SCHEMA, Database, fetch_one, quote_ident
from catalog.errors import Unavailable

if TYPE_CHECKING:
    from catalog.live import LiveDescription, LiveTables

log = structlog.get_logger("catalog")

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(name: str) -> str:
    """Case-fold an identifier the way DuckDB matches identifiers: ASCII letters only.
    (Python's ``str.lower`` also folds e.g. the Kelvin sign to ``k``, which DuckDB does not,
    so two distinct DuckDB tables could otherwise compare equal.)"""
    return name.translate(_ASCII_LOWER)


@dataclass(frozen=True, slots=True)
class TableRef:
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql(self) -> str:
        """The quoted, schema-qualified name to put in SQL."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def key(self) -> tuple[str, str]:
        """DuckDB identifiers match case-insensitively; so do allowlists and lookups."""
        return (fold(self.schema), fold(self.name))


@dataclass(frozen=True, slots=True)
class TableInfo:
    ref: TableRef
    rows: int
    schema: pa.Schema
    data_version: int
    # Queried in Snowflake, not stored here (catalog/live.py); rows are Snowflake's count.
    live: bool = False


class TableCatalog:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Set by Catalog when [[live.tables]] are configured: they are data tables too.
        self.live: LiveTables | None = None

    @property
    def db(self) -> Database:
        return self._db

    def list_refs(self, cur: duckdb.DuckDBPyConnection | None = None) -> list[TableRef]:
        sql = (
            "SELECT schema_name, table_name FROM duckdb_tables() "
            "WHERE database_name = current_database() AND NOT temporary AND NOT internal "
            "AND schema_name NOT IN (?, ?) ORDER BY schema_name, table_name"
        )
        # Tabular artefacts' SQL copies are not data tables: they are listed, resolved and
        # allowed by the artefact store (catalog/artefacts.py), never by allowlists.
        if cur is None:
            with self._db.reading() as c:
                rows = c.execute(sql, [SYSTEM_SCHEMA, ARTEFACT_SCHEMA]).fetchall()
        else:
            rows = cur.execute(sql, [SYSTEM_SCHEMA, ARTEFACT_SCHEMA]).fetchall()
        refs = [TableRef(s, t) for s, t in rows]
        return self._with_live(refs)

    def _with_live(self, refs: list[TableRef]) -> list[TableRef]:
        """Live tables join the list; a stored table of the same name (say, a replica left
        from before the table went live) is hidden by it, so a name means one table."""
        if self.live is None:
            return refs
        live = self.live.refs()
        keys = {r.key() for r in live}
        merged = [r for r in refs if r.key() not in keys] + live
        return sorted(merged, key=lambda r: (r.schema, r.name))

    def is_live(self, ref: TableRef) -> bool:
        return self.live is not None and self.live.is_live(ref)

    def resolve(self, schema: str, name: str) -> TableRef | None:
        """The table's canonical spelling, or None when it is not a data table."""
        if fold(schema) in (SYSTEM_SCHEMA, ARTEFACT_SCHEMA):
            return None
        wanted = (fold(schema), fold(name))
        for ref in self.list_refs():
            if ref.key() == wanted:
                return ref
        return None

    def describe(self, refs: list[TableRef]) -> list[TableInfo]:
        if not refs:
            return []
        with self._db.reading() as cur:
            versions = self.versions(cur)
            out = []
            for ref in refs:
                if self.is_live(ref):
                    info = self._describe_live(ref)
                    if info is not None:
                        out.append(info)
                    continue
                schema = cur.sql(f"SELECT * FROM {ref.sql} LIMIT 0").to_arrow_table().schema
                rows = fetch_one(cur, f"SELECT count(*) FROM {ref.sql}")[0]  # type: ignore[index]
                out.append(TableInfo(ref, int(rows), schema, versions.get(ref.key(), 0)))
        return out

    def _describe_live(self, ref: TableRef) -> TableInfo | None:
        """A live table's listing entry; while Snowflake cannot answer, the last description
        read (or none: the table is left out of the listing, logged, rather than failing it)."""
        assert self.live is not None
        desc: LiveDescription | None
        try:
            desc = self.live.describe(ref)
        except Unavailable as e:
            desc = self.live.cached(ref)
            if desc is None:
                log.warning("live.listing_skipped", table=ref.qualified, error=e.detail)
                return None
        return TableInfo(desc.ref, desc.rows, desc.schema, 0, live=True)

    def versions(self, cur: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], int]:
        rows = cur.sql(
            f"SELECT schema_name, table_name, version FROM {SYSTEM_SCHEMA}.data_versions"
        ).fetchall()
        return {(fold(s), fold(t)): int(v) for s, t, v in rows}

    def version(self, ref: TableRef) -> int:
        with self._db.reading() as cur:
            return self.versions(cur).get(ref.key(), 0)

    @staticmethod
    def bump_version(cur: duckdb.DuckDBPyConnection, ref: TableRef) -> int:
        """Record that ``ref`` changed. Call inside the writer's own transaction, so the new
        contents and the new version commit (or roll back) together."""
        now = datetime.now(UTC)
        row = fetch_one(
            cur,
            f"UPDATE {SYSTEM_SCHEMA}.data_versions SET version = version + 1, changed_at = ? "
            "WHERE schema_name = ? AND table_name = ? RETURNING version",
            [now, ref.schema, ref.name],
        )
        if row is not None:
            return int(row[0])
        cur.execute(
            f"INSERT INTO {SYSTEM_SCHEMA}.data_versions VALUES (?, ?, 1, ?)",
            [ref.schema, ref.name, now],
        )
        return 1
