"""Table and column descriptions: the texts agents read to choose a table and a column.

Two sources, one answer (:meth:`Descriptions.of`), per table text and per column text:

1. Quiver's own: DuckDB comments on the served database (``COMMENT ON TABLE`` / ``COMMENT ON
   COLUMN``), so a database built elsewhere with comments brings its own, and what an admin
   sets with ``PUT /v1/tables/{schema.table}/description`` is stored in the database file
   itself: it survives a restart and travels with backups.
2. The warehouse's: a replicated table's Snowflake ``COMMENT`` on the table and on its
   columns, as the last successful sync run read them (``_quiver.source_comments``, written
   by :func:`record_source_comments` in the run's own transaction; bounded and cleaned by
   :func:`clean_comment`, since they are text from outside).

Quiver's own text wins; the warehouse's shows where there is none (an admin who removes their
text with ``""`` lets the warehouse's show again). A full sync run rebuilds its table, and
keeps the table's own comments across the rebuild (:func:`own_comments`,
:func:`restore_comments`). The data plane serves the texts in ListFlights (FlightInfo
``app_metadata``, proto_docs/listing.md), the control plane in ``GET /v1/tables``, and MCP in
``list_tables`` / ``describe_table`` (proto_docs/mcp.md).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping
from datetime import datetime

import duckdb
import msgspec

from catalog.database import SYSTEM_SCHEMA, Database, quote_ident
from catalog.errors import InvalidArgument
from catalog.tables import TableRef, fold
from catalog.writes import AdminWrites

#: Longest description kept (characters): a paragraph, not a document.
MAX_DESCRIPTION = 2000
#: Most column descriptions one request may set.
MAX_COLUMNS = 1000
#: The warehouse's comments of replicated tables (see the module docs).
SOURCE_COMMENTS = f"{SYSTEM_SCHEMA}.source_comments"
#: What ends a warehouse comment cut to :data:`MAX_DESCRIPTION` characters.
CUT_MARK = "…"


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


# --- the warehouse's comments (written by the sync worker) ---------------------------------------


class SourceComments(msgspec.Struct, frozen=True, kw_only=True):
    """A replicated table's Snowflake comments, cleaned (:func:`clean_comment`): the table's
    (``""``: none; None: not read by this run, so the stored one is kept) and its columns'
    by the replica's column name (only the columns that have one)."""

    table: str | None = ""
    columns: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def clean(
        cls, table: object, columns: Mapping[str, object], *, table_read: bool = True
    ) -> SourceComments:
        """From the values Snowflake answered (NULL, empty and blank ones are no comment)."""
        texts = {name: clean_comment(text) for name, text in columns.items()}
        return cls(
            table=clean_comment(table) if table_read else None,
            columns={name: text for name, text in texts.items() if text},
        )


def clean_comment(value: object) -> str:
    """A comment from the warehouse made safe to keep and show: control characters other than
    newline and tab removed (a CR or CRLF becomes a newline), surrounding blanks stripped, and
    cut to :data:`MAX_DESCRIPTION` characters, the cut marked with :data:`CUT_MARK`. ``""``
    for NULL or a blank text."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    # Bound the work: only the head is looked at (a cut text is marked as cut either way).
    raw = text[: 4 * MAX_DESCRIPTION]
    cut = len(text) > len(raw)
    raw = raw.replace("\r\n", "\n").replace("\r", "\n")
    kept = "".join(c for c in raw if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs")).strip()
    if cut or len(kept) > MAX_DESCRIPTION:
        kept = kept[: MAX_DESCRIPTION - len(CUT_MARK)].rstrip() + CUT_MARK
    return kept


def record_source_comments(cur: duckdb.DuckDBPyConnection, ref: TableRef, comments: SourceComments) -> bool:
    """On the sync run's cursor, inside its transaction: ``ref``'s warehouse comments become
    ``comments`` (a comment gone at the source is gone here; ``comments.table`` None keeps the
    stored table comment). Texts are bound parameters, cleaned again here. Nothing is written
    when nothing changed; whether something did."""
    keep_table = comments.table is None
    scope = "WHERE lower(schema_name) = lower(?) AND lower(table_name) = lower(?)" + (
        " AND column_name <> ''" if keep_table else ""
    )
    wanted: dict[str, str] = {}
    table = clean_comment(comments.table)
    if table:
        wanted[""] = table
    for name, text in comments.columns.items():
        cleaned = clean_comment(text)
        if name and cleaned:
            wanted[name] = cleaned
    stored = cur.execute(
        f"SELECT column_name, comment FROM {SOURCE_COMMENTS} {scope}", [ref.schema, ref.name]
    ).fetchall()
    if len(stored) == len(wanted) and {str(n): str(c) for n, c in stored} == wanted:
        return False
    cur.execute(f"DELETE FROM {SOURCE_COMMENTS} {scope}", [ref.schema, ref.name])
    if wanted:
        cur.executemany(
            f"INSERT INTO {SOURCE_COMMENTS} (schema_name, table_name, column_name, comment) VALUES (?, ?, ?, ?)",
            [[ref.schema, ref.name, name, text] for name, text in wanted.items()],
        )
    return True


def own_comments(cur: duckdb.DuckDBPyConnection, ref: TableRef) -> TableDescription:
    """``ref``'s DuckDB comments alone (Quiver's own texts, not the warehouse's): what a full
    sync run carries over when it rebuilds the table (:func:`restore_comments`)."""
    where = (
        "WHERE database_name = current_database() AND lower(schema_name) = lower(?) "
        "AND lower(table_name) = lower(?) AND comment IS NOT NULL AND comment <> ''"
    )
    table = cur.execute(f"SELECT comment FROM duckdb_tables() {where}", [ref.schema, ref.name]).fetchall()
    columns = cur.execute(
        f"SELECT column_name, comment FROM duckdb_columns() {where} ORDER BY column_index",
        [ref.schema, ref.name],
    ).fetchall()
    return TableDescription(
        table=str(table[0][0]) if table else "", columns={str(n): str(c) for n, c in columns}
    )


def restore_comments(cur: duckdb.DuckDBPyConnection, ref: TableRef, saved: TableDescription) -> None:
    """Put :func:`own_comments` back on the rebuilt ``ref`` (same transaction); a column the
    new table no longer has loses its text."""
    if saved.table:
        cur.execute(f"COMMENT ON TABLE {ref.sql} IS {_literal(saved.table)}")
    if not saved.columns:
        return
    names = {
        fold(str(r[0])): str(r[0])
        for r in cur.execute(
            "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
            "AND lower(schema_name) = lower(?) AND lower(table_name) = lower(?)",
            [ref.schema, ref.name],
        ).fetchall()
    }
    for column, text in saved.columns.items():
        name = names.get(fold(column))
        if name is not None:
            cur.execute(f"COMMENT ON COLUMN {ref.sql}.{quote_ident(name)} IS {_literal(text)}")


class Descriptions:
    def __init__(self, db: Database, writes: AdminWrites) -> None:
        self._db = db
        self._writes = writes

    def of(
        self, refs: Iterable[TableRef], cur: duckdb.DuckDBPyConnection | None = None
    ) -> dict[tuple[str, str], TableDescription]:
        """Each table's description, keyed by :meth:`TableRef.key` (empty ones included): per
        text Quiver's own (a DuckDB comment) if it has one, else the warehouse's (see the
        module docs)."""
        wanted = {ref.key() for ref in refs}
        if not wanted:
            return {}
        if cur is None:
            with self._db.reading() as c:
                return self.of(refs, c)
        out = {key: TableDescription() for key in wanted}
        tables = cur.execute(
            "SELECT t.schema_name, t.table_name, t.comment, s.comment "
            f"FROM duckdb_tables() t LEFT JOIN {SOURCE_COMMENTS} s ON s.column_name = '' "
            "AND lower(s.schema_name) = lower(t.schema_name) AND lower(s.table_name) = lower(t.table_name) "
            "WHERE t.database_name = current_database() "
            "AND (coalesce(t.comment, '') <> '' OR s.comment IS NOT NULL)"
        ).fetchall()
        for schema, table, own, source in tables:
            key = (fold(schema), fold(table))
            if key in out:
                out[key].table = str(own or source)
        columns = cur.execute(
            "SELECT c.schema_name, c.table_name, c.column_name, c.comment, s.comment "
            f"FROM duckdb_columns() c LEFT JOIN {SOURCE_COMMENTS} s ON s.column_name <> '' "
            "AND lower(s.schema_name) = lower(c.schema_name) AND lower(s.table_name) = lower(c.table_name) "
            "AND lower(s.column_name) = lower(c.column_name) "
            "WHERE c.database_name = current_database() "
            "AND (coalesce(c.comment, '') <> '' OR s.comment IS NOT NULL) "
            "ORDER BY c.column_index"
        ).fetchall()
        for schema, table, column, own, source in columns:
            key = (fold(schema), fold(table))
            if key in out:
                out[key].columns[str(column)] = str(own or source)
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
        removes one (the warehouse's comment, if any, shows again). Every column must exist;
        nothing is changed unless everything is valid (one transaction, under the admin-write
        lock). The answer is what agents now read (:meth:`of`)."""
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
