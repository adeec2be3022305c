"""Table and column descriptions: the texts agents read to choose a table and a column.

They are DuckDB comments on the served database (``COMMENT ON TABLE`` / ``COMMENT ON
COLUMN``), so a database built elsewhere with comments brings its own, and what an admin
sets with ``PUT /v1/tables/{schema.table}/description`` is stored in the database file
itself: it survives a restart and travels with backups. The data plane serves them in
ListFlights (FlightInfo ``app_metadata``, proto_docs/listing.md), the control plane in
``GET /v1/tables``, and MCP in ``list_tables`` / ``describe_table`` (proto_docs/mcp.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import duckdb
import msgspec

from catalog.database import Database, quote_ident
from catalog.errors import InvalidArgument
from catalog.tables import TableRef, fold
from catalog.writes import AdminWrites

#: Longest description kept (characters): a paragraph, not a document.
MAX_DESCRIPTION = 2000
#: Most column descriptions one request may set.
MAX_COLUMNS = 1000


class TableDescription(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A table's own text and its columns' texts (only the columns that have one)."""

    table: str = ""
    columns: dict[str, str] = msgspec.field(default_factory=dict)

    def only(self, names: list[str]) -> TableDescription:
        """The texts of the columns in ``names`` alone: a ruled table's listing names only the
        columns its view has (an excluded column's text would name it)."""
        wanted = set(names)
        return TableDescription(
            table=self.table, columns={k: v for k, v in self.columns.items() if k in wanted}
        )


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if len(value) > MAX_DESCRIPTION:
        raise InvalidArgument(f"{what} has {len(value):,} characters; at most {MAX_DESCRIPTION:,} are kept")
    if "\x00" in value:
        raise InvalidArgument(f"{what} contains a NUL character")
    return value


def _literal(text: str) -> str:
    """A SQL string literal: DuckDB's COMMENT ON takes no bound parameter."""
    return "'" + text.replace("'", "''") + "'"


class Descriptions:
    def __init__(self, db: Database, writes: AdminWrites) -> None:
        self._db = db
        self._writes = writes

    def of(
        self, refs: Iterable[TableRef], cur: duckdb.DuckDBPyConnection | None = None
    ) -> dict[tuple[str, str], TableDescription]:
        """Each table's description, keyed by :meth:`TableRef.key` (empty ones included)."""
        wanted = {ref.key() for ref in refs}
        if not wanted:
            return {}
        if cur is None:
            with self._db.reading() as c:
                return self.of(refs, c)
        out = {key: TableDescription() for key in wanted}
        tables = cur.execute(
            "SELECT schema_name, table_name, comment FROM duckdb_tables() "
            "WHERE database_name = current_database() AND comment IS NOT NULL AND comment <> ''"
        ).fetchall()
        for schema, table, comment in tables:
            key = (fold(schema), fold(table))
            if key in out:
                out[key].table = str(comment)
        columns = cur.execute(
            "SELECT schema_name, table_name, column_name, comment FROM duckdb_columns() "
            "WHERE database_name = current_database() AND comment IS NOT NULL AND comment <> '' "
            "ORDER BY column_index"
        ).fetchall()
        for schema, table, column, comment in columns:
            key = (fold(schema), fold(table))
            if key in out:
                out[key].columns[str(column)] = str(comment)
        return out

    def freshness(self, refs: Iterable[TableRef]) -> dict[tuple[str, str], datetime | None]:
        """When each table's data last changed (``_quiver.data_versions``), None if never
        recorded (a table loaded before Quiver ran)."""
        wanted = {ref.key() for ref in refs}
        with self._db.reading() as cur:
            rows = cur.execute(
                "SELECT schema_name, table_name, changed_at FROM _quiver.data_versions"
            ).fetchall()
        found = {(fold(s), fold(t)): changed for s, t, changed in rows}
        return {key: found.get(key) for key in wanted}

    def set(self, ref: TableRef, table: str | None, columns: Mapping[str, str]) -> TableDescription:
        """Set the table's text (when given) and the named columns' texts; an empty text
        removes one. Every column must exist; nothing is changed unless everything is valid
        (one transaction, under the admin-write lock)."""
        if table is not None:
            table = _text(table, "'table'")
        if len(columns) > MAX_COLUMNS:
            raise InvalidArgument(
                f"'columns' names {len(columns):,} columns; at most {MAX_COLUMNS:,} at once"
            )
        texts = {
            name: _text(text, f"the description of column {name[:60]!r}") for name, text in columns.items()
        }

        def write(cur: duckdb.DuckDBPyConnection) -> TableDescription:
            names = [
                str(r[0])
                for r in cur.execute(
                    "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
                    "AND schema_name = ? AND table_name = ? ORDER BY column_index",
                    [ref.schema, ref.name],
                ).fetchall()
            ]
            by_fold = {fold(n): n for n in names}
            unknown = [n for n in texts if fold(n) not in by_fold]
            if unknown:
                shown = ", ".join(repr(n[:60]) for n in unknown[:5])
                raise InvalidArgument(
                    f"{ref.qualified} has no column {shown}; its columns are: {', '.join(names[:100])}"
                )
            if table is not None:
                cur.execute(f"COMMENT ON TABLE {ref.sql} IS {_literal(table) if table else 'NULL'}")
            for name, text in texts.items():
                column = f"{ref.sql}.{quote_ident(by_fold[fold(name)])}"
                cur.execute(f"COMMENT ON COLUMN {column} IS {_literal(text) if text else 'NULL'}")
            return self.of([ref], cur)[ref.key()]

        with self._writes.lock:
            return self._writes.run(f"describe table {ref.qualified}", write)
