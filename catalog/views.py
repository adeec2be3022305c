"""The view a ruled table is read through: one principal's rows and columns of one table
(proto_docs/governance.md, "How rules are applied").

A :class:`~catalog.rules.TableRule` says which columns exist for a swarm, which rows and how
columns are masked; :func:`~catalog.rules.bindings` says what its row filter's ``$name``
parameters are for one principal. :class:`Views` turns the three into one relation text,

    (SELECT <projection> FROM "schema"."table" WHERE (<bound filter>))

which every read path puts where it would have named the table (``ref.sql``): PATH scans,
samples, profiles, row counts and schemas, and every ``BASE_TABLE`` of guarded SQL
(catalog/sqlguard.py rewrites the parse tree). What is not in the view does not exist for the
caller: excluded columns are not in its projection, filtered-out rows never leave its WHERE,
masked columns are transformed in the projection, before any outer clause can see them.

Binding writes each value into the text as a SQL literal (strings quoted, numbers in
parentheses, an absent value NULL: no row passes a comparison with it) at the spans DuckDB's
own parser gives for the filter's PARAMETER nodes — never found by a regex, so a ``$`` inside a
string constant of the filter is never mistaken for one. Each text is built once per (table,
rule, bound values) and remembered; the data plane's caches key on the text (or on queries
containing it), so no principal is ever served another's view.
"""

from __future__ import annotations

import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import duckdb
import pyarrow as pa

from catalog.database import CursorPool, quote_ident, quote_literal
from catalog.errors import InvalidArgument, PermissionDenied
from catalog.rules import AttributeValue, TableRule
from catalog.tables import TableCatalog, TableRef, fold

#: Where the filter goes in the text parsed to find its parameters (their offsets are shifted).
_PROBE_PREFIX = "SELECT 1 WHERE "

_VIEW_CACHE_ENTRIES = 4096
#: How long the column types a ``null`` mask casts to are reused (a changed type is still NULL).
_TYPE_SECONDS = 5.0


def literal(value: AttributeValue | None) -> str:
    """A bound value as DuckDB SQL: a quoted string, a parenthesized number (so ``x - $n`` with
    a negative ``n`` never spells ``--``, a comment), or NULL — for an absent value and for a
    number that is not finite (attributes refuse those; a stray one must not widen a view)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return f"({int(value)})"
    if isinstance(value, float):
        return f"({value!r})" if math.isfinite(value) else "NULL"
    return quote_literal(str(value))


def mask_expression(column: str, kind: str, type_name: str | None, key: str) -> str:
    """The expression a masked column is read as (NULL stays NULL in every kind).

    ``hash`` is SHA-256 of the server's mask key and the value as text: one value gives one
    hash in a deployment, so masked columns still join and group, but an agent cannot compute
    the hash of a value it guesses (``WHERE email = sha256('ada@example.com')`` finds nothing),
    which an unkeyed hash would let it do for every value of a small domain. The key is in
    the relation text only, which agents never see (errors of ruled reads withhold DuckDB's
    message and the text; the query log and listings show the caller's text)."""
    col = quote_ident(column)
    if kind == "hash":
        return f"sha256({quote_literal(key)} || CAST({col} AS VARCHAR))"
    if kind == "null":
        return f"CAST(NULL AS {type_name or 'VARCHAR'})"
    if kind == "redact":
        return f"CASE WHEN {col} IS NULL THEN NULL ELSE '***' END"
    if kind == "last4":
        return f"'****' || right(CAST({col} AS VARCHAR), 4)"
    # A kind the contract does not know reads as nothing rather than as the clear value.
    return "CAST(NULL AS VARCHAR)"


class Views:
    """Builds and remembers the relation text of ruled reads (see the module docs).

    Parsing a filter uses a private in-memory DuckDB (one cursor per thread), never the data
    file. The table's columns are read from the catalog (``duckdb_columns()``, reused for a few
    seconds): a rule naming a column the table no longer has fails closed, and a ``null`` mask
    casts to the column's own type."""

    def __init__(self, tables: TableCatalog, mask_key: str | None = None) -> None:
        self._tables = tables
        #: The key of ``hash`` masks (catalog/keys.py ``load_or_create_mask_key``; a server
        #: passes its persisted one, a Views made without one uses a key of its own).
        self.mask_key = mask_key or secrets.token_hex(32)
        self._lock = threading.Lock()
        self._views: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._spans: dict[str, tuple[tuple[int, int, str], ...]] = {}
        self._types: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        self._shapes: OrderedDict[tuple[str, int], tuple[pa.Schema, int]] = OrderedDict()
        self._parser = duckdb.connect(":memory:")
        self._parser.execute("SET enable_external_access = false")
        self._cursors = CursorPool(self._parser)
        self.builds = 0
        """Texts built (not answered from memory): for tests."""

    def invalidate(self) -> None:
        """Forget the remembered column types and texts (a table was altered or replaced)."""
        with self._lock:
            self._types.clear()
            self._views.clear()
            self._shapes.clear()

    # --- the relation -----------------------------------------------------------------------
    def relation(
        self,
        ref: TableRef,
        rule: TableRule,
        bound: Mapping[str, AttributeValue | None],
        *,
        rowids: tuple[int, int | None] | None = None,
    ) -> str:
        """``(SELECT … FROM ref WHERE (…))`` for ``rule`` with ``bound`` values; ``rowids``
        (a PATH scan's ``[lo, hi)`` part) is ANDed inside the view, where ``rowid`` exists."""
        values = tuple((name, type(bound.get(name)).__name__, bound.get(name)) for name in rule.parameters)
        key = (ref.key(), ref.sql, rule, values, rowids)
        with self._lock:
            hit = self._views.get(key)
            if hit is not None:
                self._views.move_to_end(key)
                return hit
        text = self._build(ref, rule, bound, rowids)
        with self._lock:
            self.builds += 1
            self._views[key] = text
            while len(self._views) > _VIEW_CACHE_ENTRIES:
                self._views.popitem(last=False)
        return text

    def _build(
        self,
        ref: TableRef,
        rule: TableRule,
        bound: Mapping[str, AttributeValue | None],
        rowids: tuple[int, int | None] | None,
    ) -> str:
        masks = {fold(col): kind for col, kind in rule.mask}
        types = self._column_types(ref)
        named = [*(rule.columns or ()), *(rule.except_columns or ()), *(col for col, _ in rule.mask)]
        if any(fold(c) not in types for c in named):
            # The table changed since the rule was saved (a column dropped or renamed): reading
            # it now could show what the rule hid, and DuckDB's error would name its columns.
            raise PermissionDenied(
                f"the row or column rules for {ref.qualified} no longer match the table's columns; "
                "an admin must update the allowlist entry before it can be read"
            )
        excluded = {fold(c) for c in rule.except_columns or ()}

        def masked(col: str) -> str:
            return mask_expression(col, masks[fold(col)], types.get(fold(col)), self.mask_key)

        if rule.columns is not None:
            items = [
                f"{masked(c)} AS {quote_ident(c)}" if fold(c) in masks else quote_ident(c)
                for c in rule.columns
            ]
            projection = ", ".join(items)
        else:
            projection = "*"
            if rule.except_columns:
                projection += " EXCLUDE (" + ", ".join(quote_ident(c) for c in rule.except_columns) + ")"
            replaced = [
                f"{masked(col)} AS {quote_ident(col)}"
                for col, _ in sorted(rule.mask, key=lambda m: fold(m[0]))
                if fold(col) not in excluded
            ]
            if replaced:
                projection += " REPLACE (" + ", ".join(replaced) + ")"
        terms = []
        if rule.row_filter is not None:
            terms.append(f"({self.bind(rule.row_filter, bound)})")
        if rowids is not None:
            lo, hi = rowids
            terms.append(f"rowid >= {int(lo)}" + ("" if hi is None else f" AND rowid < {int(hi)}"))
        where = f" WHERE {' AND '.join(terms)}" if terms else ""
        return f"(SELECT {projection} FROM {ref.sql}{where})"

    def shape(self, cur: duckdb.DuckDBPyConnection, view: str, version: int) -> tuple[pa.Schema, int]:
        """The schema (DuckDB's binder: ``LIMIT 0``) and row count of ``view`` at the table's
        data ``version``, remembered per (view text, version): a count over a row filter scans
        the table, unlike a table's count (row-group metadata). Read on ``cur``, whose snapshot
        ``version`` was read in."""
        key = (view, version)
        with self._lock:
            hit = self._shapes.get(key)
            if hit is not None:
                self._shapes.move_to_end(key)
                return hit
        schema = cur.sql(f"SELECT * FROM {view} LIMIT 0").to_arrow_table().schema
        row = cur.execute(f"SELECT count(*) FROM {view}").fetchall()
        answer = (schema, int(row[0][0]))
        with self._lock:
            self._shapes[key] = answer
            while len(self._shapes) > _VIEW_CACHE_ENTRIES:
                self._shapes.popitem(last=False)
        return answer

    # --- binding ------------------------------------------------------------------------------
    def bind(self, predicate: str, bound: Mapping[str, AttributeValue | None]) -> str:
        """``predicate`` with every ``$name`` replaced by its bound value's literal."""
        spans = self._parameter_spans(predicate)
        out, end = [], 0
        for start, length, name in spans:
            out.append(predicate[end:start])
            out.append(literal(bound.get(name)))
            end = start + length
        out.append(predicate[end:])
        return "".join(out)

    def _parameter_spans(self, predicate: str) -> tuple[tuple[int, int, str], ...]:
        """(offset, length, folded name) of each PARAMETER of ``predicate``, in text order, as
        DuckDB's parser locates them; remembered per predicate (there are few)."""
        hit = self._spans.get(predicate)
        if hit is not None:
            return hit
        with self._cursors.use() as cur:
            raw = cur.execute("SELECT json_serialize_sql(?)", [_PROBE_PREFIX + predicate]).fetchall()[0][0]
        tree = json.loads(raw)
        if tree.get("error"):
            raise InvalidArgument(f"a row filter cannot be parsed: {str(tree.get('error_message'))[:200]}")
        found: list[tuple[int, int, str]] = []

        def walk(value: Any) -> None:
            if isinstance(value, list):
                for v in value:
                    walk(v)
            elif isinstance(value, dict):
                if value.get("class") == "PARAMETER":
                    start = int(value["query_location"]) - len(_PROBE_PREFIX)
                    length = int(value["query_location_length"])
                    name = str(value.get("identifier", ""))
                    # The span must spell exactly the parameter: anything else fails closed.
                    if start < 0 or fold(predicate[start : start + length]) != "$" + fold(name):
                        raise InvalidArgument(
                            "a row filter's parameter cannot be located; save the rule again"
                        )
                    found.append((start, length, fold(name)))
                for v in value.values():
                    walk(v)

        walk(tree["statements"])
        spans = tuple(sorted(found))
        if len(self._spans) > _VIEW_CACHE_ENTRIES:
            self._spans.clear()
        self._spans[predicate] = spans
        return spans

    def _column_types(self, ref: TableRef) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            hit = self._types.get(ref.key())
            if hit is not None and hit[0] > now:
                return hit[1]
        live = self._tables.live
        if live is not None and live.is_live(ref):
            # A live table is not in the data file: its columns are those read from Snowflake
            # (catalog/live.py, cached there), so a rule is checked and a ``null`` mask cast
            # against what the query will read. Unavailable propagates as it does for a query.
            types = {fold(c.name): c.duckdb_type for c in live.describe(ref).columns}
            with self._lock:
                self._types[ref.key()] = (now + _TYPE_SECONDS, types)
            return types
        with self._tables.db.reading() as cur:
            rows = cur.execute(
                "SELECT column_name, data_type FROM duckdb_columns() "
                "WHERE database_name = current_database() AND schema_name = ? AND table_name = ?",
                [ref.schema, ref.name],
            ).fetchall()
        types = {fold(str(name)): str(kind) for name, kind in rows}
        with self._lock:
            self._types[ref.key()] = (now + _TYPE_SECONDS, types)
        return types
