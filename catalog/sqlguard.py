"""The SQL guard: the first layer of the data plane's defences (ARCHITECTURE.md) — decide,
before DuckDB runs anything, whether an agent's SQL text is one read-only query that reads
only tables the caller may read.

Everything here works on DuckDB's *own* parse of the text (``extract_statements`` for the
statement list and type, ``json_serialize_sql`` for the parse tree), never on the text itself:
a regex cannot tell a table name from a string literal, a comment or a quoted identifier, and
the parser that checks the query is the same one that will run it.

What is accepted
  One statement of DuckDB's SELECT class: SELECT, WITH … SELECT, VALUES, FROM-first,
  UNION/INTERSECT/EXCEPT (incl. BY NAME), PIVOT/UNPIVOT with an explicit ``IN`` list (without
  one DuckDB expands PIVOT into several statements, a MULTI statement, which is refused),
  QUALIFY, window functions, USING SAMPLE / TABLESAMPLE, positional parameters ``?``/``$1``.

What is refused
  * every other statement class (EXPLAIN, SET, PRAGMA, CALL, COPY, INSERT, CREATE, …) and the
    SELECT-class forms that are really catalog introspection: DESCRIBE, SHOW, SUMMARIZE;
  * any table that is not a readable data table: walked through the whole parse tree (CTE
    bodies, subqueries in every clause, joins, lateral, set operations, PIVOT sources, table
    function arguments). A table that does not exist and one that is not allowlisted get the
    same answer, so existence never leaks;
  * table functions outside :data:`ALLOWED_TABLE_FUNCTIONS`; scalar functions that reveal the
    configuration, the environment or the catalog, or that change state
    (:data:`DENIED_FUNCTIONS`, :data:`DENIED_FUNCTION_PREFIXES`); any function that is not a
    built-in of DuckDB itself, and any macro stored in the database (a macro can read any
    table, and one named like a built-in shadows it);
  * any parse-tree node the walker does not know: it fails closed;
  * type names other than DuckDB's built-in types, and functions that resolve catalog objects
    from strings (below);
  * values the query would build past the size bounds (below), and parameter indexes above
    :data:`MAX_PARAM_INDEX`.

Every refusal is InvalidArgument or PermissionDenied with one sentence of at most
:data:`MAX_DETAIL_CHARS` characters; names and DuckDB's own messages are quoted shortened.

Values built from small constants
  DuckDB evaluates constant expressions while *binding* and planning — before any execution,
  outside ``memory_limit`` (which governs its buffer manager, not these allocations) and outside
  the query interrupt. ``SELECT length(range(150000000))`` allocates about 1.5 GB and
  ``repeat('x', 1000000000)`` 2 GB in GetFlightInfo's ``LIMIT 0`` planning alone; turning the
  optimizer off does not help. So :class:`_Sizer` bounds, bottom-up over the whole tree, the
  size of every value a query builds from its own text, in *units*: one character of a string
  or blob, one element of a list or map.

  * Builders (:data:`BUILDER_FUNCTIONS`: scalar ``range``/``generate_series``, ``repeat``,
    ``list_resize``, ``lpad``/``rpad``, ``printf``/``format`` widths and precisions, ``bar``,
    ``to_base``, ``bitstring``, ``equi_width_bins``, ``replace``/``regexp_replace`` growth,
    separators of ``array_to_string``/``concat_ws``/``list_aggregate``, ``json_pretty``, encoders
    such as ``hex``/``bin``/``to_json`` by their factor, lambdas, and aggregates whose state is
    sized by an argument such as ``max(x, n)`` or ``bitstring_agg(x, min, max)``) get their size
    from their arguments; every other function is at most the sum of its arguments, and those
    returning one fixed-width scalar are one unit.
  * The bound holds through nesting, because sizes multiply bottom-up
    (``repeat(repeat('x', 1000), 1000000)`` is 10**9), through casts, and through CTEs and
    subqueries: DuckDB inlines them and folds the parent's expression too, so a column counts
    as the largest value any query node before it built. A lambda's body is probed as a linear
    function of its parameter; a reduce whose body uses its accumulator more than once doubles
    it per step and is refused.
  * No value may exceed :data:`MAX_BUILT_UNITS` (100,000) and a statement's builders together
    :data:`MAX_BUILT_TOTAL_UNITS` (1,000,000): a few MB each, far more than padding, labels or
    short series need, and bounded when combined with each row of a 2,048-row vector.
  * Folding takes time as well as memory, and no timeout reaches it: every expression's read of
    values built from constants (and the matrices of ``levenshtein``-like distances, and a
    lambda's body once per element) adds up to at most :data:`MAX_FOLD_WORK` units, a few
    seconds at the very worst.
  * Size arguments (counts, widths, lengths, bounds, format strings) must be constants the
    guard evaluates itself: integer and decimal literals, strings cast to numbers, casts, unary
    minus, arithmetic, ``abs``/``least``/``greatest`` of constants. A computed size (a column, a
    parameter, a scalar subquery, a lambda parameter) is **refused**: it is evaluated per row at
    run time, where one row can still allocate gigabytes and the guard cannot prove a bound.
    Scalar ``range``/``generate_series`` over dates or timestamps needs DATE/TIMESTAMP
    literals and a constant INTERVAL step of at least a second (months count as 28 days, so
    the count is never underestimated); the table functions in FROM (``FROM generate_series(d1, d2, INTERVAL 1 DAY)``,
    ``FROM t, range(t.n)``) stream rows at run time under the query's limits and stay allowed.
  * Values the guard cannot see count as :data:`DATA_VALUE_UNITS` (a stored value) or
    :data:`PARAM_VALUE_UNITS` (a parameter, at most its 1 MiB command); what the query does with
    them only counts against the bound where it multiplies them (``repeat(col, 200)`` is
    refused, ``upper(col)`` is not): stored data is the admin's to bound.

  What this does not cover is run-time volume: rows from ``FROM range(n)`` or joins aggregated
  into one value (``(SELECT list(i) FROM range(1e9))`` — measured: not folded while planning,
  it runs under the interrupt), recursive CTEs, and wide rows multiplied by a batch. Those are
  the admission path's to bound (see proto_docs/descriptors.md).

Catalog metadata
  Functions that resolve catalog objects named by strings (``index_key``, ``make_type``,
  ``to_aggregate_state``, the ``pg_*``/``duckdb_*`` families, …) are refused, and so is any
  type name that is not one of DuckDB's built-in types: ``enum_range(NULL::hr.band)``, a cast
  to ``hr.band`` or a ``STRUCT(a hr.band)`` would reveal an ENUM's values from a schema the
  agent cannot read. The refusal is the missing-table sentence (``not readable: not in your
  allowlist or does not exist``) for existing and missing types alike. User-defined types are
  refused even in readable schemas — an ENUM column of a readable table still compares with
  plain strings and casts to VARCHAR — so no type lookup ever depends on the allowlist.
  ``list_aggregate(l, 'name')`` names its aggregate as a string literal, checked as a call.

CTE scoping mirrors DuckDB's binder, erring only towards refusal: a CTE name hides a table only
for unqualified references in the CTE's scope (later CTEs of the same WITH, the query body and
everything nested in it; a recursive CTE's own name only inside its recursive term). A bare
name treated as a table where DuckDB would have used the CTE can only cause a refusal, never a
read, because every CTE body is checked on its own anyway.

Identifiers compare as DuckDB compares them: case-insensitively for ASCII letters only
(``"SECRET"."Salaries"`` is ``secret.salaries``; ``"Ü"`` is not ``"ü"``).

Parse caches
  A parse does not depend on who asks, so it is cached by the exact text and by the text's
  *shape*: the text with its literals taken out, found by DuckDB's own tokenizer
  (``duckdb.tokenize``), keyed with each literal's kind. An agent's fresh literal
  (``… WHERE id = 4711``) then costs no DuckDB parse: the shape gives the exact normalized
  tree for the new values, and the walk and the size bounds run on that tree, with the real
  values, on every check — except that a shape whose literals are all numbers outside any
  function call (a point query's ``id = 4711``) has the same size bounds whatever its values,
  so once they passed for it they are not walked again (``_Shape.sizes_fixed``); the walk and
  the allowlist still run on every check. Only plain integers, plain decimals and standard single-quoted
  strings that are each exactly one constant of the tree are substituted; a shape answers only
  after a second text of it parsed in full to exactly the substituted tree, with every literal
  changed (see ``_Shape``); anything else is cached by its exact text only.

The second layer — DuckDB's lockdown at open (no files, no network, no extension loading,
configuration locked; catalog/database.py) — stands under this one on its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

import duckdb
import msgspec

from catalog.database import ARTEFACT_SCHEMA, SYSTEM_SCHEMA, CursorPool, quote_literal
from catalog.errors import InvalidArgument, PermissionDenied
from catalog.identity import Principal
from catalog.policy import NOT_READABLE, Policy, readable_hint
from catalog.tables import TableCatalog, TableRef, fold

# --- what is allowed ------------------------------------------------------------------------

#: Table functions an agent may call in FROM. Each is a pure function of its arguments: it
#: reads no file, no table, no catalog and no setting, so it cannot widen what a query sees.
ALLOWED_TABLE_FUNCTIONS: Mapping[str, str] = {
    "range": "a series of numbers or timestamps",
    "generate_series": "range() with an inclusive end",
    "unnest": "the rows of a list or struct value given as argument",
    # Both expand a JSON *value* passed as argument (usually a column) into rows; they read
    # nothing else.
    "json_each": "the top-level elements of a JSON value given as argument",
    "json_tree": "all elements of a JSON value given as argument",
}

#: Scalar, aggregate and window functions refused wherever they appear, with why.
DENIED_FUNCTIONS: Mapping[str, str] = {
    # configuration and session state
    "current_setting": "reads the server's configuration",
    "getvariable": "reads session variables",
    "getenv": "reads the server's environment",
    "current_schema": "reveals the server's search path",
    "current_schemas": "reveals the server's search path",
    "in_search_path": "reveals the server's search path",
    "current_database": "reveals the server's database name",
    "current_catalog": "reveals the server's database name",
    "current_user": "reveals the server's session identity",
    "current_role": "reveals the server's session identity",
    "session_user": "reveals the server's session identity",
    "user": "reveals the server's session identity",
    "current_query": "reveals the SQL the server actually runs",
    "current_query_id": "reveals the server's connection state",
    "current_connection_id": "reveals the server's connection state",
    "current_transaction_id": "reveals the server's transaction state",
    "txid_current": "reveals the server's transaction state",
    "version": "reveals the engine version",
    "get_block_size": "reveals the storage configuration",
    # state changes
    "nextval": "advances a sequence (a write)",
    "setval": "changes a sequence (a write)",
    "currval": "reads a sequence of the database",
    "setseed": "changes the session's random seed",
    # SQL inside SQL: would run or bind text the guard never sees
    "query": "runs SQL given as a string",
    "query_table": "reads tables named by strings",
    "json_execute_serialized_sql": "runs serialized SQL",
    "json_serialize_plan": "binds SQL text against the catalog and reveals its tables",
    # catalog objects named by strings: they answer for objects of any schema and tell
    # existing from missing ones
    "index_key": "looks up a table's indexes by name",
    "make_type": "resolves a type named by a string",
    "to_aggregate_state": "resolves a function named by a string",
    # side effects
    "write_log": "writes to the server's log",
    "sleep_ms": "holds a query slot while doing nothing",
    # PostgreSQL catalog compatibility (schema pg_catalog): catalog and server details
    "col_description": "reads catalog comments",
    "obj_description": "reads catalog comments",
    "shobj_description": "reads catalog comments",
    "format_type": "reads the type catalog",
    "format_pg_type": "reads the type catalog",
    "map_to_pg_oid": "reads the type catalog",
    "map_type_id_to_pg_oid": "reads the type catalog",
    "has_any_column_privilege": "reads the privilege catalog",
    "has_column_privilege": "reads the privilege catalog",
    "has_database_privilege": "reads the privilege catalog",
    "has_foreign_data_wrapper_privilege": "reads the privilege catalog",
    "has_function_privilege": "reads the privilege catalog",
    "has_language_privilege": "reads the privilege catalog",
    "has_schema_privilege": "reads the privilege catalog",
    "has_sequence_privilege": "reads the privilege catalog",
    "has_server_privilege": "reads the privilege catalog",
    "has_table_privilege": "reads the privilege catalog",
    "has_tablespace_privilege": "reads the privilege catalog",
    "inet_client_addr": "reveals network details",
    "inet_client_port": "reveals network details",
    "inet_server_addr": "reveals network details",
    "inet_server_port": "reveals network details",
}

#: SQL keywords the parser emits as a bare column reference and DuckDB's binder turns into a call
#: of the function of that name when no column has that name. Refused unless qualified
#: (``t.current_schema``). ``user`` is left out: it is a common column name, and the keyword
#: would only return the constant 'duckdb'.
_KEYWORD_FUNCTIONS = frozenset(
    {"current_catalog", "current_schema", "current_user", "current_role", "session_user"}
)

#: Whole families refused by name prefix.
DENIED_FUNCTION_PREFIXES: Mapping[str, str] = {
    "duckdb_": "reads DuckDB's catalog and engine state",
    "pragma_": "runs a PRAGMA",
    "pg_": "PostgreSQL system function (catalog, server state or sleeping)",
    "__internal": "internal to DuckDB's optimizer",
}

#: Names the parser emits that are not listed in ``duckdb_functions()`` but are plain built-ins.
_BUILTIN_SPECIALS = frozenset({"unlist"})

#: Statement types (``duckdb.StatementType``) refused, with how the refusal names them.
_STATEMENT_LABELS: Mapping[str, str] = {
    "EXPLAIN": "EXPLAIN",
    "SET": "SET, RESET and USE",
    "PRAGMA": "PRAGMA (and IMPORT DATABASE)",
    "CALL": "CALL (and CHECKPOINT)",
    "ATTACH": "ATTACH",
    "DETACH": "DETACH",
    "COPY": "COPY",
    "COPY_DATABASE": "COPY",
    "EXPORT": "EXPORT",
    "LOAD": "INSTALL and LOAD",
    "EXTENSION": "extension",
    "TRANSACTION": "transaction (BEGIN, COMMIT, ROLLBACK)",
    "INSERT": "INSERT",
    "UPDATE": "UPDATE",
    "DELETE": "DELETE and TRUNCATE",
    "MERGE_INTO": "MERGE",
    "CREATE": "CREATE",
    "CREATE_FUNC": "CREATE FUNCTION",
    "DROP": "DROP (and DEALLOCATE)",
    "ALTER": "ALTER (and COMMENT ON)",
    "PREPARE": "PREPARE",
    "EXECUTE": "EXECUTE",
    "VACUUM": "VACUUM and ANALYZE",
    "ANALYZE": "ANALYZE",
    "VARIABLE_SET": "SET VARIABLE",
    "RELATION": "relation",
    "LOGICAL_PLAN": "logical plan",
    "UPDATE_EXTENSIONS": "UPDATE EXTENSIONS",
    "MULTI": "multi-statement",
}

_SHOW_LABELS: Mapping[str, str] = {
    "DESCRIBE": "DESCRIBE",
    "SUMMARY": "SUMMARIZE",
    "SHOW": "SHOW",
    "SHOW_SPECIAL": "SHOW",
}

_QUERIES_ONLY = (
    "only read-only queries are allowed (SELECT, WITH … SELECT, VALUES, FROM-first, "
    "UNION/INTERSECT/EXCEPT, PIVOT/UNPIVOT with an IN list)"
)
_METADATA_HINT = "for schemas and statistics use ListFlights, GetSchema and the 'profile' command"

#: Schemas that never hold data tables, whatever a name resolves to.
_NEVER_DATA_SCHEMAS = frozenset({SYSTEM_SCHEMA, "information_schema", "pg_catalog"})

#: Expression classes of DuckDB's parse tree the walker knows; any other class is refused.
_EXPRESSION_CLASSES = frozenset(
    {
        "BETWEEN",
        "CASE",
        "CAST",
        "COLLATE",
        "COLUMN_REF",
        "COMPARISON",
        "CONJUNCTION",
        "CONSTANT",
        "FUNCTION",
        "LAMBDA",
        "OPERATOR",
        "PARAMETER",
        "POSITIONAL_REFERENCE",
        "STAR",
        "SUBQUERY",
        "TYPE",
        "WINDOW",
    }
)

#: Non-expression nodes (``"type": "…"``) whose children are simply walked.
_PLAIN_NODES = frozenset(
    {
        # table references
        "JOIN",
        "SUBQUERY",
        "EXPRESSION_LIST",
        "EMPTY",
        "PIVOT",
        # result modifiers
        "ORDER_MODIFIER",
        "LIMIT_MODIFIER",
        "LIMIT_PERCENT_MODIFIER",
        "DISTINCT_MODIFIER",
        # ORDER BY entries
        "ORDER_DEFAULT",
        "ASCENDING",
        "DESCENDING",
    }
)

#: Parse-tree keys that only record where in the text a node came from.
_LOCATION_KEYS = frozenset({"query_location", "query_location_length"})

_FILE_SUFFIXES = (
    ".csv",
    ".tsv",
    ".txt",
    ".parquet",
    ".json",
    ".jsonl",
    ".ndjson",
    ".arrow",
    ".ipc",
    ".feather",
    ".xlsx",
    ".db",
    ".duckdb",
    ".sqlite",
    ".gz",
    ".zst",
)

#: Longest refusal detail, and longest name or DuckDB message quoted in one (issue #8, defect 8:
#: a multi-megabyte detail overflowed gRPC's header limit and the client saw no code at all).
MAX_DETAIL_CHARS = 4_000
_MAX_ECHO = 120
_MAX_DUCKDB_MESSAGE = 300
_TOO_DEEP = (
    "the query is nested too deeply to be checked (more than about 150 levels of nested "
    "expressions or subqueries); simplify it, e.g. list_sum([...]) or concat(...) instead of "
    "long chains of + or ||"
)
_PARSE_CACHE_ENTRIES = 512
_PARSE_CACHE_MAX_CHARS = 8_000
_PARTS_CACHE_ENTRIES = 64
#: The split caches keep trees (and parts) up to this many characters: a bound on their memory.
_SPLIT_CACHE_MAX_CHARS = 64_000
#: Whitespace DuckDB's lexer skips between tokens (a literal's extent ends before it).
_SQL_SPACE = " \t\n\r\f\v"
_DIGITS = frozenset("0123456789")
_LITERAL_TOKENS = frozenset({duckdb.token_type.numeric_const, duckdb.token_type.string_const})

QuiverRefusal = InvalidArgument | PermissionDenied


class _Unwritable(Exception):
    """A rewrite for ruled tables that DuckDB cannot write back exactly (refused: fail closed)."""


def _canonical(tree: Any) -> str:
    """A tree as compact JSON with every ``* REPLACE (…)`` list in name order: DuckDB keeps
    that list in a hash map, so a written-back text may list the same replacements in another
    order (which means the same)."""

    def sort(value: Any) -> Any:
        if isinstance(value, list):
            return [sort(v) for v in value]
        if isinstance(value, dict):
            out = {k: sort(v) for k, v in value.items()}
            replaced = out.get("replace_list")
            if isinstance(replaced, list) and all(isinstance(r, dict) for r in replaced):
                out["replace_list"] = sorted(replaced, key=lambda r: str(r.get("key")))
            return out
        return value

    return json.dumps(sort(tree), sort_keys=True, separators=(",", ":"))


def _strip_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_locations(v) for k, v in value.items() if k not in _LOCATION_KEYS}
    if isinstance(value, list):
        return [_strip_locations(v) for v in value]
    return value


def _clean_error(exc: BaseException) -> str:
    """DuckDB's message without its class prefix, the caret line folded into one line."""
    lines = [ln.rstrip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0]
    for prefix in ("Parser Error: ", "Not implemented Error: ", "Invalid Input Error: "):
        if head.startswith(prefix):
            head = head[len(prefix) :]
    where = next((ln.strip() for ln in lines[1:] if ln.lstrip().startswith("LINE ")), None)
    return _echo(f"{head} ({where})" if where else head, _MAX_DUCKDB_MESSAGE)


def _echo(text: str, limit: int = _MAX_ECHO) -> str:
    """``text`` as a refusal may quote it: at most ``limit`` characters, cut with '…'."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True, slots=True)
class _Parsed:
    text: str
    tree: dict[str, Any]
    normalized: str
    sized_as: tuple[str, ...] | None = None
    """From a shape whose size bounds do not depend on its literals' values (see
    :attr:`_Shape.sizes_fixed`): the shape's template, which :meth:`SqlGuard._check` keys its
    remembered size-bound passes on. None for a full parse and for any other shape."""
    shape: tuple[str, ...] | None = None
    """From a shape (a shape hit): its template, the tree's text around the literals. Texts
    with the same template differ only in literal values (see :attr:`GuardedQuery.template`)."""


@dataclass(frozen=True, slots=True)
class _Shape:
    """A parse with its literals taken out: the normalized tree split where each literal's text
    goes, so a text of the same shape gets its exact normalized tree without DuckDB's parser.

    ``pieces`` has one more element than ``order``; the literal ``order[i]`` (index in the
    text's order) goes between ``pieces[i]`` and ``pieces[i + 1]``.

    A shape is learnt from one text (``values``: its literals) and answers checks only once
    ``proven``: a second text of the shape with *every* literal different was parsed in full
    and gave exactly the substituted tree. ``refuted`` marks a shape whose substitution once
    differed from the parse: never learnt again (until evicted)."""

    pieces: tuple[str, ...]
    order: tuple[int, ...]
    values: tuple[str, ...]
    proven: bool = False
    refuted: bool = False
    sizes_fixed: bool = False
    """No literal of the shape is a string or lies under a FUNCTION node: :class:`_Sizer`
    reads a literal's value only there (a string's length; a function's arguments: sizes,
    counts, format strings, aggregate names), so every text of the shape gets the same size
    bounds and a pass for one is a pass for all. The walk and the allowlist still run."""

    def normalized(self, values: list[str]) -> str:
        out = [self.pieces[0]]
        for i, index in enumerate(self.order):
            out.append(json.dumps(values[index]))
            out.append(self.pieces[i + 1])
        return "".join(out)


def _literal_kind(extent: str) -> tuple[str, str] | None:
    """(the parser's literal kind, its text) for the literal forms the shape cache substitutes:
    plain integers (``4711``), plain decimals with digits on both sides of the point
    (``1.50``), and standard single-quoted strings (``'it''s'``). Any other form (exponents,
    ``_`` separators, ``E''``/``X''``/dollar quoting, …) returns None and the text is only
    cached by its exact spelling. Every form here starts and ends with the same kind of
    character whatever its value, so the lexer splits the text around it the same way."""
    if not extent:
        return None
    if extent[0] == "'":
        inner = extent[1:-1]
        if len(extent) < 2 or extent[-1] != "'" or "'" in inner.replace("''", ""):
            return None
        return "STRING", inner.replace("''", "'")
    whole, point, fraction = extent.partition(".")
    if not whole or not set(whole) <= _DIGITS:
        return None
    if not point:
        return "INTEGER", extent
    if fraction and set(fraction) <= _DIGITS:
        return "NUMERIC", extent
    return None


def _spell(kind: str, text: str) -> str:
    """A literal's spelling in SQL (the inverse of :func:`_literal_kind`)."""
    return quote_literal(text) if kind == "STRING" else text


def _tree(normalized: str) -> Any:
    """A normalized tree (our own ``json.dumps``) read back, as ``json.loads`` reads it: by
    msgspec, about twice as fast (once per shape hit), with ``json`` for what msgspec refuses
    and ``json`` reads (an escaped lone surrogate, a nesting deeper than msgspec's bound)."""
    try:
        return _TREE_DECODER.decode(normalized)
    except msgspec.DecodeError:
        return json.loads(normalized)


_TREE_DECODER = msgspec.json.Decoder()


def _statement_text(sql: str) -> str:
    """The statement as the guard keeps it: stripped, trailing ';' removed."""
    text = sql.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    return text


def _literals(sql: str) -> tuple[str, list[tuple[int, str, str]]] | None:
    """The shape key of ``sql`` and its literals as (offset, kind, text).

    Literals are found by DuckDB's own tokenizer, never by pattern: a literal's extent runs from
    its token's offset to the next token (comments are tokens), whitespace removed. The key is
    the text around the literals plus each literal's kind, so two texts share a key only if
    they differ in nothing but the values of literals of the same kinds. None if the text has
    no literal, or one of a form :func:`_literal_kind` does not substitute."""
    try:
        tokens = duckdb.tokenize(sql)
    except Exception:  # noqa: BLE001 — any tokenizer failure: the full parser reports it
        return None
    starts = [offset for offset, _ in tokens] + [len(sql)]
    key: list[str] = []
    found: list[tuple[int, str, str]] = []
    end = 0
    for i, (offset, kind) in enumerate(tokens):
        if kind not in _LITERAL_TOKENS:
            continue
        extent = sql[offset : starts[i + 1]].rstrip(_SQL_SPACE)
        literal = _literal_kind(extent)
        if literal is None or offset < end:
            return None
        key.append(sql[end:offset])
        key.append(f"\x00{literal[0]}\x00")
        found.append((offset, literal[0], literal[1]))
        end = offset + len(extent)
    if not found:
        return None
    key.append(sql[end:])
    return "".join(key), found


def redact_literals(sql: str) -> str:
    """``sql`` with every numeric and string literal replaced by ``?`` (the query log's
    ``[query_log] redact_literals``, catalog/query_log.py).

    The literals are DuckDB's own tokenizer's, as the shape cache finds them (a literal's
    extent runs from its token to the next token, whitespace removed), so a quote inside a
    comment or an identifier is never taken for one. Unlike the shape cache, every literal
    form is replaced, whatever its spelling. A text the tokenizer cannot read is answered as
    ``?`` whole: nothing of it is kept rather than something that may hold a value."""
    try:
        tokens = duckdb.tokenize(sql)
    except Exception:  # noqa: BLE001 - an unreadable text keeps nothing
        return "?"
    starts = [offset for offset, _ in tokens] + [len(sql)]
    out: list[str] = []
    end = 0
    for i, (offset, kind) in enumerate(tokens):
        if kind not in _LITERAL_TOKENS or offset < end:
            continue
        extent = sql[offset : starts[i + 1]].rstrip(_SQL_SPACE)
        out.append(sql[end:offset])
        out.append("?")
        end = offset + len(extent)
    out.append(sql[end:])
    return "".join(out)


#: Expression classes of DuckDB's parse tree that compute a value from one row (with the
#: functions they call checked separately): anything else — a subquery, a window, a class this
#: list does not know — keeps a query in one piece. Not LAMBDA: DuckDB writes a lambda back
#: in the arrow syntax (``x -> x + 1``) that it parses to the same tree but no longer binds.
_ROW_LOCAL_CLASSES = frozenset(
    {
        "BETWEEN",
        "CASE",
        "CAST",
        "COLLATE",
        "COLUMN_REF",
        "COMPARISON",
        "CONJUNCTION",
        "CONSTANT",
        "FUNCTION",
        "OPERATOR",
        "PARAMETER",
        "STAR",
        "TYPE",  # the target of a CAST
    }
)
_ANY = object()
#: Keys of a SELECT node, with the value each must have for a plain projection and filter
#: (``_ANY``: the select list, table and WHERE clause are checked on their own). An unknown
#: key keeps the query in one piece.
_PLAIN_SELECT: dict[str, Any] = {
    "type": "SELECT_NODE",
    "modifiers": [],
    "cte_map": {"map": []},
    "select_list": _ANY,
    "from_table": _ANY,
    "where_clause": _ANY,
    "group_expressions": [],
    "group_sets": [],
    "aggregate_handling": "STANDARD_HANDLING",
    "having": None,
    "sample": None,
    "qualify": None,
}


#: Functions whose value depends on when the query runs although they take arguments
#: (``age(ts)`` is ``age(current_date, ts)``).
_CLOCK_WITH_ARGUMENTS = frozenset({"age"})


def _query_clock(name: str, stability: str | None, arity: int | None) -> bool:
    """Whether a function's value is fixed per query rather than per row of data: DuckDB's
    CONSISTENT_WITHIN_QUERY without arguments (``now()``, ``current_date``, ``today()``, …)
    and :data:`_CLOCK_WITH_ARGUMENTS`. Its other CONSISTENT_WITHIN_QUERY overloads (``+`` or
    ``year()`` of a TIMESTAMPTZ) depend on session settings, which are the same for every
    part of a split query, so they do not keep a query whole."""
    return stability == "CONSISTENT_WITHIN_QUERY" and (not arity or name in _CLOCK_WITH_ARGUMENTS)


def _row_local_select(statement: dict[str, Any], row_local: frozenset[str], other: frozenset[str]) -> bool:
    """Whether a statement's parse tree is ``SELECT <row expressions> FROM <one base table>
    [WHERE <row expression>]``: no aggregate, window, DISTINCT, ORDER BY, LIMIT/OFFSET, set
    operation, sample, CTE, subquery, join, table function, time travel or unnest, no function
    that is not a scalar of the row alone (:attr:`SqlGuard._row_local`), and no mention of
    ``rowid`` (the split's own column: a reference to it, or an alias of that name that a WHERE
    clause could mean)."""
    if set(statement) - {"node", "named_param_map"}:
        return False
    node = statement.get("node")
    if not isinstance(node, dict) or set(node) - set(_PLAIN_SELECT):
        return False
    for key, want in _PLAIN_SELECT.items():
        if want is not _ANY and node.get(key) != want:
            return False
    source = node.get("from_table")
    if not isinstance(source, dict) or source.get("type") != "BASE_TABLE":
        return False
    if source.get("sample") is not None or source.get("at_clause") is not None:
        return False
    select = node.get("select_list")
    if not isinstance(select, list) or not select:
        return False
    for expr in select:
        if isinstance(expr, dict) and fold(str(expr.get("alias") or "")) == "rowid":
            return False
    return all(_row_local(e, row_local, other) for e in select) and (
        node.get("where_clause") is None or _row_local(node["where_clause"], row_local, other)
    )


def _row_local(value: Any, row_local: frozenset[str], other: frozenset[str]) -> bool:  # noqa: PLR0911  one early refusal per node class
    """Whether an expression computes its value from one row alone: only known classes, only
    functions in ``row_local``, and no bare name of a function in ``other`` (``current_date``
    parses as a column and binds as that function)."""
    if isinstance(value, list):
        return all(_row_local(v, row_local, other) for v in value)
    if not isinstance(value, dict):
        return True
    cls = value.get("class")
    if cls is not None:
        if cls not in _ROW_LOCAL_CLASSES:
            return False
        names = (value.get("column_names") or []) if cls == "COLUMN_REF" else []
        if any(fold(str(n)) == "rowid" for n in names):
            return False
        if len(names) == 1 and fold(str(names[0])) in other:
            return False
        if cls == "FUNCTION":
            if fold(str(value.get("function_name", ""))) not in row_local:
                return False
            if value.get("filter") is not None or value.get("distinct") or value.get("export_state"):
                return False
            if (value.get("order_bys") or {}).get("orders"):
                return False
            if value.get("schema") or value.get("catalog"):
                return False
    return all(_row_local(v, row_local, other) for v in value.values())


def _plain_columns(node: dict[str, Any]) -> tuple[str, ...] | None:
    """:meth:`SqlGuard.plain_columns` of a SELECT node that :func:`_row_local_select` accepted."""
    if node.get("where_clause") is not None:
        return None
    source = node["from_table"]
    qualifier = fold(str(source.get("alias") or source.get("table_name") or ""))
    names: list[str] = []
    for expr in node["select_list"]:
        if expr.get("alias"):
            return None
        if expr.get("class") == "STAR":
            plain = not any(expr.get(k) for k in ("exclude_list", "replace_list", "columns", "expr"))
            plain = plain and not any(expr.get(k) for k in ("qualified_exclude_list", "rename_list"))
            relation = fold(str(expr.get("relation_name") or ""))
            if not plain or relation not in ("", qualifier) or len(node["select_list"]) != 1:
                return None
            return ()
        path = expr.get("column_names") if expr.get("class") == "COLUMN_REF" else None
        if not isinstance(path, list) or not 1 <= len(path) <= 2:
            return None
        if len(path) == 2 and fold(str(path[0])) != qualifier:
            return None  # a struct field (``col.field``), or another qualification
        names.append(str(path[-1]))
    if len({fold(n) for n in names}) != len(names):
        return None
    return tuple(names)


def _and_terms(expr: dict[str, Any]) -> list[dict[str, Any]]:
    """The terms of a conjunction (nested ANDs flattened), or the expression itself."""
    if expr.get("class") == "CONJUNCTION" and expr.get("type") == "CONJUNCTION_AND":
        return [t for child in expr.get("children") or [] for t in _and_terms(child)]
    return [expr]


def _flat_where(statement: dict[str, Any]) -> str:
    """A statement as compact JSON with its WHERE clause's conjunction flattened: DuckDB's parser
    may nest ``a AND b AND c`` differently from how a tree built by hand does."""
    node = dict(statement["node"])
    where = node.get("where_clause")
    if where is not None:
        node["where_clause"] = _and_terms(where)
    return json.dumps({**statement, "node": node}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class GuardedQuery:
    """A query the guard accepted for one principal."""

    sql: str
    """The single statement to run, as given (trailing ';' and whitespace removed). It may end
    in a ``--`` comment: when embedding it in more SQL, put a newline after it."""
    tables: tuple[TableRef, ...]
    """The canonical data tables it reads, sorted (for cache keys and data versions)."""
    normalized: str
    """DuckDB's parse tree as compact JSON without text positions: equal for spellings that
    differ only in whitespace, comments or keyword case."""
    param_count: int = 0
    """How many positional parameters (``?`` or ``$n``) the statement expects."""
    text: str = ""
    """The caller's statement as given (:attr:`sql` before a rewrite): what logs, the query
    log and query-status show. Empty means :attr:`sql`."""
    ruled: bool = False
    """True when :attr:`sql` is a rewrite reading ruled tables through their views
    (catalog/views.py): its text holds row filters, bound values and masks, so errors must
    not quote it, and nothing may serve it from a copy of a whole table."""
    template: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)
    """For a check answered from the shape cache, and only without a rewrite: the shape's
    template (:attr:`normalized` around its literals' values). Queries with the same template
    have the same tree but for the values of literal constants, so whatever depends on the
    tree's structure alone — the result cache's verdict on volatile functions — may be
    remembered per template instead of per text. None otherwise."""

    @property
    def shown(self) -> str:
        """:attr:`text`, or :attr:`sql` when there was no rewrite."""
        return self.text or self.sql

    @property
    def fingerprint(self) -> str:
        """A stable digest of :attr:`normalized` (:func:`sql_digest`)."""
        return sql_digest(self.normalized)


# The parse tree is kilobytes of JSON: hash it once per text, not once per request.
@lru_cache(maxsize=4096)
def sql_digest(normalized: str) -> str:
    """The digest of a query: SHA-256 of the guard's normalized SQL, remembered per text. It
    is :attr:`GuardedQuery.fingerprint`, keys the data plane's result cache and names the
    query in logs (``query:`` + its start)."""
    return hashlib.sha256(normalized.encode()).hexdigest()


class SqlGuard:
    """Checks agent SQL against the caller's allowlist before anything runs.

    Parsing uses a private in-memory DuckDB (one cursor per thread), so checks never touch
    the data file and run concurrently. Parses are cached by SQL text and by the text's shape
    (they do not depend on the caller; see "Parse caches" in the module docs); the lists of data tables and stored functions are cached briefly (see
    :meth:`_data_tables`, :meth:`_stored_functions`); the allowlist decision is made afresh
    on every check.
    """

    def __init__(
        self,
        tables: TableCatalog,
        policy: Policy,
        catalog_name: str,
        *,
        max_sql_chars: int = 100_000,
        table_cache_seconds: float = 1.0,
        function_cache_seconds: float = 60.0,
    ) -> None:
        self._tables = tables
        self._table_cache_seconds = table_cache_seconds
        self._function_cache_seconds = function_cache_seconds
        self._functions_cache: tuple[float, frozenset[str]] | None = None
        self._lock = threading.Lock()
        self._parsed: OrderedDict[str, _Parsed] = OrderedDict()
        self._shapes: OrderedDict[str, _Shape] = OrderedDict()
        # Templates of value-independent shapes whose size bounds passed (see _sizes_passed).
        self._sized: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self.shape_hits = 0
        """Checks answered from the shape cache (no DuckDB parse): for tests and benchmarks."""
        self.sized_hits = 0
        """Checks whose size bounds were known to pass for their shape (no :class:`_Sizer`
        walk; see :meth:`_sizes_passed`): for tests and benchmarks."""
        self.rewrites = 0
        """Rewrites for ruled tables made with DuckDB (not answered from memory): for tests."""
        self._refs_cache: tuple[float, dict[tuple[str, str], TableRef | None]] | None = None
        self._policy = policy
        self._catalog = fold(catalog_name)
        self._max_sql_chars = max_sql_chars
        self._parser = duckdb.connect(":memory:")
        self._cursors = CursorPool(self._parser)
        rows = self._parser.execute(
            "SELECT function_name, function_type, schema_name, return_type, stability, len(parameters) "
            "FROM duckdb_functions()"
        ).fetchall()
        kinds: dict[str, set[str]] = {}
        returns: dict[str, set[str]] = {}
        pg_catalog: set[str] = set()
        not_row_local: set[str] = set()
        for name, kind, schema, returned, stability, arity in rows:
            if kind != "scalar" or stability == "VOLATILE" or _query_clock(fold(name), stability, arity):
                not_row_local.add(fold(name))
            kinds.setdefault(fold(name), set()).add(kind)
            returns.setdefault(fold(name), set()).add(str(returned).upper())
            if schema == "pg_catalog":
                pg_catalog.add(fold(name))
        # Functions whose every overload returns one fixed-width scalar (a number, a date, …):
        # whatever their arguments, their value is one unit for the size bounds.
        self._fixed_width = frozenset(
            name for name, types in returns.items() if types <= _FIXED_TYPES and kinds[name] <= {"scalar"}
        )
        # Functions whose every overload is a scalar of one row's values alone (no aggregate,
        # window, table function or macro; not now() or random()): what a split query may call.
        self._row_local = frozenset(kinds) - not_row_local
        # A bare name such as current_date parses as a column and binds as such a function.
        self._not_row_local = frozenset(not_row_local)
        self._splittable: OrderedDict[str, tuple[bool, tuple[str, ...] | None]] = OrderedDict()
        # Written-back parts by (normalized tree, bounds): a repeated large query at one layout
        # costs no DuckDB call to split (three per part otherwise).
        self._parts: OrderedDict[tuple[str, tuple[tuple[int, int | None], ...]], tuple[str, ...]] = (
            OrderedDict()
        )
        # Rewrites for ruled tables by (normalized tree, views): (text, normalized tree).
        self._rewrites: OrderedDict[tuple[str, tuple[tuple[tuple[str, str], str], ...]], tuple[str, str]] = (
            OrderedDict()
        )
        # Types a query may name: DuckDB's built-in ones. The private parser database holds
        # nothing else, so this lists no type of the data file.
        self._builtin_types = frozenset(
            fold(str(r[0])) for r in self._parser.execute("SELECT type_name FROM duckdb_types()").fetchall()
        )
        self._builtins = frozenset(kinds) | _BUILTIN_SPECIALS
        # Functions DuckDB only knows as table functions: called in an expression they are
        # refused with the table-function message (query(), read_csv(), …).
        self._table_only = frozenset(
            name
            for name, k in kinds.items()
            if k <= {"table", "table_macro", "pragma"} and name not in ALLOWED_TABLE_FUNCTIONS
        )
        # Every PostgreSQL catalog-compatibility function this DuckDB version ships, beyond the
        # static list, so a newer version's additions are refused too.
        self._denied = dict(DENIED_FUNCTIONS)
        for name in pg_catalog:
            self._denied.setdefault(name, "PostgreSQL catalog function")
        self._suggestable = sorted(
            name
            for name in self._builtins - self._table_only
            if name not in self._denied
            and name.isidentifier()
            and not name.startswith(tuple(DENIED_FUNCTION_PREFIXES))
        )
        self._parser.execute("SET enable_external_access = false")
        self._parser.execute("SET lock_configuration = true")

    # --- the check ------------------------------------------------------------------------
    def check(self, principal: Principal, sql: str) -> GuardedQuery:
        """Accept ``sql`` for ``principal`` or raise InvalidArgument / PermissionDenied with a
        sentence that names what is wrong and what is allowed.

        Every refusal is at most :data:`MAX_DETAIL_CHARS` long: names and DuckDB's messages are
        quoted shortened, so a refusal always fits in a gRPC header."""
        try:
            return self._check(principal, sql)
        except (InvalidArgument, PermissionDenied) as e:
            if len(e.detail) <= MAX_DETAIL_CHARS:
                raise
            raise type(e)(_echo(e.detail, MAX_DETAIL_CHARS)) from None

    def _check(self, principal: Principal, sql: str) -> GuardedQuery:
        parsed = self._parse(sql)
        walk = _Walk(self, principal)
        try:
            walk.statement(parsed.tree)
            if parsed.sized_as is None or not self._sizes_passed(parsed.sized_as):
                _Sizer(self, budget=_SIZER_STEPS_PER_NODE * walk.nodes + _SIZER_BASE_STEPS).any(
                    parsed.tree.get("node")
                )
                if parsed.sized_as is not None:
                    self._sizes_passed(parsed.sized_as, passed=True)
        except RecursionError:
            raise InvalidArgument(_TOO_DEEP) from None
        tables = tuple(sorted(walk.tables.values(), key=lambda r: r.key()))
        relation = self._policy.relation
        views = {ref.key(): view for ref in tables if (view := relation(principal, ref)) != ref.sql}
        if views:
            text, normalized = self._rewrite(parsed, walk, views)
            return GuardedQuery(
                sql=text,
                tables=tables,
                normalized=normalized,
                param_count=walk.param_count(),
                text=parsed.text,
                ruled=True,
            )
        return GuardedQuery(
            sql=parsed.text,
            tables=tables,
            normalized=parsed.normalized,
            param_count=walk.param_count(),
            template=parsed.shape,
        )

    def _sizes_passed(self, template: tuple[str, ...], *, passed: bool = False) -> bool:
        """Whether the size bounds passed for a shape whose bounds do not depend on its
        literals' values (:attr:`_Shape.sizes_fixed`), keyed by the shape's template (its exact
        tree around the literals); ``passed=True`` records a pass. A shape hit of such a shape
        then costs no :class:`_Sizer` walk: every text of it gets the same bounds."""
        with self._lock:
            if passed:
                self._sized[template] = None
                while len(self._sized) > _PARSE_CACHE_ENTRIES:
                    self._sized.popitem(last=False)
                return True
            if template in self._sized:
                self._sized.move_to_end(template)
                self.sized_hits += 1
                return True
            return False

    # --- ruled tables: the parse tree rewritten to read their views --------------------------
    def _rewrite(self, parsed: _Parsed, walk: _Walk, views: dict[tuple[str, str], str]) -> tuple[str, str]:
        """``parsed`` with every BASE_TABLE that reads a ruled table replaced by a SUBQUERY
        over its view (catalog/views.py), written back to SQL by DuckDB and parsed again: the
        text and normalized tree to run and key caches on.

        The subquery keeps the node's alias — the table's own name when it had none, so
        ``customers.email`` still binds (to the view's column) — its sample and its column
        aliases. The written-back text is used only if its parse is exactly the intended tree
        (as :meth:`_rowid_parts` does); anything else fails closed. Remembered per (tree,
        views): a repeated text costs no DuckDB call."""
        key = (parsed.normalized, tuple(sorted(views.items())))
        with self._lock:
            hit = self._rewrites.get(key)
            if hit is not None:
                self._rewrites.move_to_end(key)
                return hit
        refused = PermissionDenied(
            f"this query reads {', '.join(sorted('.'.join(k) for k in views))}, which your allowlist "
            "gives you through row or column rules, in a form the SQL guard cannot rewrite exactly; "
            "read the table in a plainer form (a subquery or CTE selecting from it)"
        )
        self.rewrites += 1
        try:
            text, got = self._rewritten(parsed, walk, views)
        except _Unwritable:
            raise refused from None
        except RecursionError:
            raise InvalidArgument(_TOO_DEEP) from None
        except (duckdb.Error, KeyError, TypeError, ValueError):
            raise refused from None
        answer = (text, got)
        if len(got) <= _SPLIT_CACHE_MAX_CHARS:
            with self._lock:
                self._rewrites[key] = answer
                while len(self._rewrites) > _PARSE_CACHE_ENTRIES:
                    self._rewrites.popitem(last=False)
        return answer

    def _rewritten(self, parsed: _Parsed, walk: _Walk, views: dict[tuple[str, str], str]) -> tuple[str, str]:
        """The work of :meth:`_rewrite`: raises :class:`_Unwritable` (or DuckDB's error) when
        the written-back text does not parse to exactly the intended tree."""
        with self._cursors.use() as cur:
            want = _Rewriter(cur, walk.bases, views, self._catalog).swap(
                json.loads(parsed.normalized), parsed.tree
            )[0]
            text = str(
                cur.execute(
                    "SELECT json_deserialize_sql(?)", [json.dumps({"error": False, "statements": [want]})]
                ).fetchall()[0][0]
            )
            back = json.loads(cur.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])
            if back.get("error") or len(back.get("statements") or []) != 1:
                raise _Unwritable
            got = _canonical(_strip_locations(back["statements"][0]))
            if got != _canonical(want):
                raise _Unwritable
            return text, got

    def invalidate_tables(self) -> None:
        """Forget the cached lists of data tables and stored functions (call after creating
        or dropping tables or macros)."""
        with self._lock:
            self._refs_cache = None
            self._functions_cache = None
        self._policy.views.invalidate()

    def _parse(self, sql: str) -> _Parsed:
        """The one SELECT-class statement in ``sql`` and its parse tree; cached by text, since
        parsing does not depend on who asks, and by shape (see "Parse caches" in the module
        docs, :class:`_Shape` and :meth:`_learn`)."""
        if not isinstance(sql, str):
            raise InvalidArgument("sql must be a string holding one SELECT query")
        with self._lock:
            hit = self._parsed.get(sql)
            if hit is not None:
                self._parsed.move_to_end(sql)
                return hit
        self._check_text(sql)
        cacheable = len(sql) <= _PARSE_CACHE_MAX_CHARS
        literals = _literals(sql) if cacheable else None
        shape: _Shape | None = None
        if literals is not None:
            with self._lock:
                shape = self._shapes.get(literals[0])
                if shape is not None and shape.proven:
                    self._shapes.move_to_end(literals[0])
                    self.shape_hits += 1
            if shape is not None and shape.proven:
                return self._from_shape(sql, shape, literals[1])
        parsed = self._parse_uncached(sql)
        if cacheable:
            with self._lock:
                self._parsed[sql] = parsed
                while len(self._parsed) > _PARSE_CACHE_ENTRIES:
                    self._parsed.popitem(last=False)
        if literals is not None:
            self._learn(literals[0], shape, sql, parsed, literals[1])
        return parsed

    def _learn(
        self, key: str, shape: _Shape | None, sql: str, parsed: _Parsed, literals: list[tuple[int, str, str]]
    ) -> None:
        """After a full parse of a text with literals: learn its shape, or prove or refute the
        shape learnt from an earlier text. The proof costs no extra parse: it is the full parse
        this text needed anyway, compared with what the shape would have answered."""
        values = tuple(text for _, _, text in literals)
        if shape is None:
            learned = self._learn_shape(sql, parsed, literals)
        elif shape.refuted or len(values) != len(shape.values):
            return
        elif shape.normalized(list(values)) == parsed.normalized and parsed.text == _statement_text(sql):
            # A literal that kept its value (a fixed 'open' beside a changing id) proves nothing
            # about itself: then one more text, every literal changed, is parsed to prove it.
            same = any(a == b for a, b in zip(values, shape.values, strict=True))
            proven = not same or self._variant_matches(shape, sql, literals)
            learned = dataclasses.replace(shape, proven=proven, refuted=not proven)
        else:
            learned = dataclasses.replace(shape, refuted=True)
        if learned is None:
            return
        with self._lock:
            # Threads race here: a refutation always wins, a new shape never replaces another
            # thread's, and a proof counts only for the entry it was checked against.
            if not learned.refuted and self._shapes.get(key) is not shape:
                return
            self._shapes[key] = learned
            self._shapes.move_to_end(key)
            while len(self._shapes) > _PARSE_CACHE_ENTRIES:
                self._shapes.popitem(last=False)

    @staticmethod
    def _from_shape(sql: str, shape: _Shape, literals: list[tuple[int, str, str]]) -> _Parsed:
        """The parse of ``sql`` from a cached shape: its exact normalized tree (what DuckDB's
        parser gives, text positions removed) with this text's literal values. The tree the walk
        and the size bounds check is read back from it, so every check that depends on a
        literal's value (sizes, format strings, aggregate names) sees this text's values."""
        normalized = shape.normalized([text for _, _, text in literals])
        return _Parsed(
            text=_statement_text(sql),
            tree=_tree(normalized),
            normalized=normalized,
            sized_as=shape.pieces if shape.sizes_fixed else None,
            shape=shape.pieces,
        )

    def _learn_shape(self, sql: str, parsed: _Parsed, literals: list[tuple[int, str, str]]) -> _Shape | None:  # noqa: C901, PLR0911  each way a shape can be unsafe to reuse, in order
        """A shape for ``sql``'s parse, or None when a text of the same shape could parse
        differently than by substituting its literals.

        Cached by shape only if every literal the tokenizer found is exactly one constant of
        the tree, at the literal's offset, spanning the literal, of the kind and text its
        spelling gives (so none was folded with a sign, merged with a neighbour, or used as a
        name, a table or a type), and the guard's statement text is the input stripped. The
        shape answers nothing until a second text proves it (see :class:`_Shape`): one whose
        tree a literal's value changes in any other way (a value copied into a name, say) is
        refuted and never answers."""
        if parsed.text != _statement_text(sql):
            return None
        by_offset = {offset: (kind, text) for offset, kind, text in literals}
        slots: dict[int, dict[str, Any]] = {}
        in_function: set[int] = set()  # offsets of literals with a FUNCTION node above them

        def find(value: Any, under_function: bool = False) -> None:
            if isinstance(value, list):
                for v in value:
                    find(v, under_function)
            elif isinstance(value, dict):
                if value.get("class") == "CONSTANT":
                    offset = value.get("query_location")
                    literal = value.get("literal")
                    if isinstance(offset, int) and offset in by_offset and isinstance(literal, dict):
                        if offset in slots:
                            raise LookupError(offset)
                        slots[offset] = value
                        if under_function:
                            in_function.add(offset)
                inner = under_function or value.get("class") == "FUNCTION"
                for v in value.values():
                    find(v, inner)

        try:
            find(parsed.tree)
        except (LookupError, RecursionError):
            return None
        if len(slots) != len(literals):
            return None
        for offset, kind, text in literals:
            node = slots[offset]
            literal = node["literal"]
            if set(literal) != {"kind", "text"} or (literal["kind"], literal["text"]) != (kind, text):
                return None
            length = node.get("query_location_length")
            if not isinstance(length, int) or _literal_kind(sql[offset : offset + length]) != (kind, text):
                return None
        # The normalized tree with a marker per literal (NUL never occurs in accepted SQL text).
        try:
            marked = json.loads(parsed.normalized)
        except RecursionError:
            return None
        index = {offset: i for i, (offset, _, _) in enumerate(literals)}

        def mark(value: Any, original: Any) -> None:
            if isinstance(value, list):
                for v, o in zip(value, original, strict=True):
                    mark(v, o)
            elif isinstance(value, dict):
                if original.get("class") == "CONSTANT" and original.get("query_location") in index:
                    value["literal"]["text"] = f"\x00{index[original['query_location']]}\x00"
                for k, v in value.items():
                    mark(v, original[k])

        try:
            mark(marked, parsed.tree)
            template = json.dumps(marked, sort_keys=True, separators=(",", ":"))
        except (RecursionError, KeyError, TypeError, ValueError):
            return None
        found = []
        for i in range(len(literals)):
            marker = json.dumps(f"\x00{i}\x00")
            at = template.find(marker)
            if at < 0 or template.find(marker, at + 1) >= 0:
                return None
            found.append((at, i, marker))
        found.sort()
        pieces, last = [], 0
        for at, _, marker in found:
            pieces.append(template[last:at])
            last = at + len(marker)
        pieces.append(template[last:])
        values = tuple(text for _, _, text in literals)
        sizes_fixed = not in_function and all(kind != "STRING" for _, kind, _ in literals)
        shape = _Shape(
            pieces=tuple(pieces), order=tuple(i for _, i, _ in found), values=values, sizes_fixed=sizes_fixed
        )
        if shape.normalized(list(values)) != parsed.normalized:
            return None
        return shape

    def _variant_matches(self, shape: _Shape, sql: str, literals: list[tuple[int, str, str]]) -> bool:
        """Whether ``sql`` with every literal changed (same kinds, other values and lengths)
        parses to exactly what ``shape`` gives for the changed values."""
        variant, values, end = [], [], 0
        for offset, kind, text in literals:
            changed = "q" + text if kind == "STRING" else "1" + text
            variant.append(sql[end:offset] + _spell(kind, changed))
            values.append(changed)
            end = offset + len(_spell(kind, text))
        variant.append(sql[end:])
        try:
            other = self._parse_uncached("".join(variant))
        except (InvalidArgument, PermissionDenied):
            return False
        return shape.normalized(values) == other.normalized

    def _check_text(self, sql: str) -> None:
        if len(sql) > self._max_sql_chars:
            raise InvalidArgument(
                f"the query is {len(sql)} characters long; at most {self._max_sql_chars} are accepted"
            )
        if "\x00" in sql:
            raise InvalidArgument("the query contains a NUL character; send plain SQL text")

    def _parse_uncached(self, sql: str) -> _Parsed:
        self._check_text(sql)
        with self._cursors.use() as cur:
            try:
                statements = cur.extract_statements(sql)
            except duckdb.ParserException as e:
                raise InvalidArgument(f"SQL syntax error: {_clean_error(e)}") from None
            except duckdb.Error as e:
                raise InvalidArgument(f"the SQL cannot be parsed: {_clean_error(e)}") from None
            if not statements:
                raise InvalidArgument(
                    "no SQL statement found (the text is empty or only comments); send one query"
                )
            if len(statements) > 1:
                raise InvalidArgument(
                    f"found {len(statements)} statements; send exactly one query, without ';' between statements"
                )
            stmt = statements[0]
            try:
                kind = stmt.type.name
            except ValueError:
                # The Python binding has no name for some statement types (e.g. UPDATE EXTENSIONS).
                raise PermissionDenied(f"this statement is not a query: {_QUERIES_ONLY}") from None
            if kind != "SELECT":
                raise PermissionDenied(self._statement_refusal(kind))
            text = _statement_text(stmt.query)
            try:
                raw = cur.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0]
                tree = json.loads(raw)
                if tree.get("error"):
                    detail = str(tree.get("error_message") or "unknown error")
                    raise InvalidArgument(f"the query cannot be analysed: {detail}")
                parsed = tree.get("statements")
                if not isinstance(parsed, list) or len(parsed) != 1 or not isinstance(parsed[0], dict):
                    raise InvalidArgument("the query cannot be analysed; send exactly one SELECT query")
                normalized = json.dumps(_strip_locations(parsed[0]), sort_keys=True, separators=(",", ":"))
            except RecursionError:
                raise InvalidArgument(_TOO_DEEP) from None
            except duckdb.Error as e:
                raise InvalidArgument(f"the query cannot be analysed: {_clean_error(e)}") from None
            return _Parsed(text=text, tree=parsed[0], normalized=normalized)

    @staticmethod
    def _statement_refusal(kind: str) -> str:
        if kind == "MULTI":
            return (
                "this statement expands into several statements (PIVOT without an IN list does): "
                f"{_QUERIES_ONLY}; list the pivot values, e.g. PIVOT t ON col IN ('a', 'b') USING sum(x)"
            )
        label = _STATEMENT_LABELS.get(kind, kind.replace("_", " "))
        hint = f"; {_METADATA_HINT}" if kind in ("EXPLAIN", "PRAGMA", "CALL") else ""
        return f"{label} statements are not allowed: {_QUERIES_ONLY}{hint}"

    # --- rowid-range parts of a query (flight_server/planner.py splits large reads) --------
    def splittable(self, guarded: GuardedQuery) -> bool:
        """Whether ``guarded`` computes each output row from one row of one base table alone, so
        that running it over disjoint ``rowid`` ranges and concatenating the parts in range
        order gives exactly its result: a plain projection and filter (:func:`_row_local_select`
        on DuckDB's parse tree). Remembered per normalized tree."""
        return self._split_shape(guarded)[0]

    def plain_columns(self, guarded: GuardedQuery) -> tuple[str, ...] | None:
        """The columns a query reads unchanged from its one table, when that is all it does —
        ``SELECT * FROM t`` (``()``: every column) or ``SELECT a, t.b FROM t`` (the names as
        written; DuckDB names such a column as the table spells it) — with no WHERE clause:
        its result is the table's rows in storage order, so the data plane may serve it from
        a copy of the table in memory. None for anything else (an alias, an expression, a
        filter, ``* EXCLUDE``, a column named twice)."""
        return self._split_shape(guarded)[1]

    def _split_shape(self, guarded: GuardedQuery) -> tuple[bool, tuple[str, ...] | None]:
        """(:meth:`splittable`, :meth:`plain_columns`), from one read of the tree, remembered.
        A rewrite for ruled tables is neither: its rows are a view's, not the table's."""
        if len(guarded.tables) != 1 or guarded.ruled:
            return False, None
        key = guarded.normalized
        with self._lock:
            hit = self._splittable.get(key)
            if hit is not None:
                self._splittable.move_to_end(key)
                return hit
        verdict: tuple[bool, tuple[str, ...] | None] = (False, None)
        try:
            tree = json.loads(key)
            if _row_local_select(tree, self._row_local, self._not_row_local):
                verdict = (True, _plain_columns(tree["node"]))
        except RecursionError:
            pass
        if len(key) <= _SPLIT_CACHE_MAX_CHARS:
            with self._lock:
                self._splittable[key] = verdict
                while len(self._splittable) > _PARSE_CACHE_ENTRIES:
                    self._splittable.popitem(last=False)
        return verdict

    def rowid_parts(
        self, guarded: GuardedQuery, bounds: list[tuple[int, int | None]]
    ) -> tuple[str, ...] | None:
        """``guarded`` once per ``[lo, hi)`` rowid range (``hi`` None: open-ended), or None when it
        is not :meth:`splittable` or a part cannot be written back exactly.

        Each part is the caller's parse tree with ``rowid >= lo AND rowid < hi`` ANDed to its
        WHERE clause, written back to SQL by DuckDB (``json_deserialize_sql``) and parsed again:
        a part is used only if that parse is exactly the tree intended (the caller's select
        list, table and filter untouched, parameters numbered as before), so the parts run the
        caller's query and nothing else. DuckDB prunes row groups by the rowid filter."""
        if not self.splittable(guarded):
            return None
        key = (guarded.normalized, tuple(bounds))
        with self._lock:
            hit = self._parts.get(key)
            if hit is not None:
                self._parts.move_to_end(key)
                return hit
        texts = self._rowid_parts(guarded.normalized, bounds)
        if texts is not None and len(key[0]) + sum(map(len, texts)) <= _SPLIT_CACHE_MAX_CHARS:
            with self._lock:
                self._parts[key] = texts
                while len(self._parts) > _PARTS_CACHE_ENTRIES:
                    self._parts.popitem(last=False)
        return texts

    def _rowid_parts(self, normalized: str, bounds: list[tuple[int, int | None]]) -> tuple[str, ...] | None:
        tree = json.loads(normalized)
        with self._cursors.use() as cur:
            out = []
            try:
                for lo, hi in bounds:
                    where = f"rowid >= {int(lo)}" + ("" if hi is None else f" AND rowid < {int(hi)}")
                    raw = cur.execute("SELECT json_serialize_sql(?)", [f"SELECT 1 WHERE {where}"]).fetchall()[
                        0
                    ][0]
                    predicate = _strip_locations(json.loads(raw)["statements"][0]["node"]["where_clause"])
                    node = dict(tree["node"])
                    old = node.get("where_clause")
                    terms = _and_terms(predicate) + (_and_terms(old) if old is not None else [])
                    node["where_clause"] = {
                        "class": "CONJUNCTION",
                        "type": "CONJUNCTION_AND",
                        "alias": "",
                        "children": terms,
                    }
                    want = {**tree, "node": node}
                    text = cur.execute(
                        "SELECT json_deserialize_sql(?)", [json.dumps({"error": False, "statements": [want]})]
                    ).fetchall()[0][0]
                    back = json.loads(cur.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0])
                    if back.get("error") or len(back.get("statements") or []) != 1:
                        return None
                    got = _strip_locations(back["statements"][0])
                    if not isinstance(got.get("node"), dict) or _flat_where(got) != _flat_where(want):
                        return None
                    out.append(str(text))
            except (duckdb.Error, KeyError, TypeError, ValueError, RecursionError):
                return None
            return tuple(out)

    # --- helpers used by the walk -----------------------------------------------------------
    def _data_tables(self) -> dict[tuple[str, str], TableRef | None]:
        """Data tables keyed as DuckDB compares names; None marks a (theoretical) clash.

        Cached for ``table_cache_seconds``: a stale list is harmless either way. A new table is
        refused until the list refreshes; a dropped one passes the guard only if the caller
        may read it, and DuckDB then reports that it does not exist.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._refs_cache
            if cached is not None and cached[0] > now:
                return cached[1]
        out: dict[tuple[str, str], TableRef | None] = {}
        for ref in self._tables.list_refs():
            key = (fold(ref.schema), fold(ref.name))
            out[key] = None if key in out else ref
        if self._table_cache_seconds > 0:
            with self._lock:
                self._refs_cache = (now + self._table_cache_seconds, out)
        return out

    def _stored_functions(self) -> frozenset[str]:
        """Names of functions defined in the database (macros) rather than built in.

        A stored macro runs whatever SQL it was created with, under the caller's name, and
        one named like a built-in shadows it (``main.upper`` wins over DuckDB's ``upper``), so
        calling one is refused. Only Quiver itself could create one (agents cannot run DDL):
        this is defence in depth, cached for ``function_cache_seconds`` because listing
        functions costs DuckDB tens of milliseconds.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._functions_cache
            if cached is not None and cached[0] > now:
                return cached[1]
        # TableCatalog keeps the Database it lists tables from; the guard reads the same one.
        with self._tables._db.reading() as cur:
            rows = cur.execute(
                "SELECT DISTINCT function_name FROM duckdb_functions() WHERE NOT internal"
            ).fetchall()
        names = frozenset(fold(str(r[0])) for r in rows)
        with self._lock:
            self._functions_cache = (now + self._function_cache_seconds, names)
        return names

    def _function_refusal(self, name: str, *, in_from: bool) -> QuiverRefusal | None:
        folded = fold(name)
        name = _echo(name)
        if folded in self._stored_functions():
            return PermissionDenied(
                f"function {name}() is defined in this database, not built into DuckDB, and is "
                "not allowed: a stored macro can read any table; only DuckDB's built-in functions "
                "may be called"
            )
        if in_from:
            if folded in ALLOWED_TABLE_FUNCTIONS:
                return None
            return PermissionDenied(
                f"table function {name}() is not allowed: in FROM only "
                f"{', '.join(f'{n}()' for n in ALLOWED_TABLE_FUNCTIONS)} may be called; "
                "read tables by name and files not at all"
            )
        reason = self._denied.get(folded)
        if reason is None:
            reason = next((r for p, r in DENIED_FUNCTION_PREFIXES.items() if folded.startswith(p)), None)
        if reason is not None:
            return PermissionDenied(
                f"function {name}() is not allowed ({reason}): functions that reveal the "
                "configuration, the environment or the catalog, or that change state, are refused; "
                f"{_METADATA_HINT}"
            )
        if folded in self._table_only:
            return PermissionDenied(
                f"{name}() is a table function and is not allowed: only "
                f"{', '.join(f'{n}()' for n in ALLOWED_TABLE_FUNCTIONS)} may be called, in FROM"
            )
        if folded not in self._builtins:
            close = difflib.get_close_matches(folded, self._suggestable, n=3)
            suggestion = f"; did you mean {', '.join(close)}?" if close else ""
            return InvalidArgument(
                f"function {name}() is not a built-in DuckDB function; only built-in functions "
                f"may be called{suggestion}"
            )
        return None

    def _not_readable(self, display: str, readable: Iterable[str]) -> PermissionDenied:
        display = _echo(display, 2 * _MAX_ECHO)
        hint = readable_hint(display, list(readable))
        last = display.rsplit(".", 1)[-1]
        files = (
            "; files and URLs cannot be read (FROM 'path' and read_*() are refused)"
            if any(c in last for c in "/\\:") or fold(last).endswith(_FILE_SUFFIXES)
            else ""
        )
        return PermissionDenied(f"{display}: {NOT_READABLE}{files}; you may read: {hint}")


class _Rewriter:
    """One rewrite of a stripped parse tree for ruled tables (:meth:`SqlGuard._rewrite`):
    each BASE_TABLE node that resolved to a ruled table becomes a SUBQUERY over its view."""

    def __init__(
        self,
        cur: duckdb.DuckDBPyConnection,
        bases: dict[int, TableRef],
        views: dict[tuple[str, str], str],
        catalog: str,
    ) -> None:
        self.cur, self.bases, self.views, self.catalog = cur, bases, views, catalog
        self._subqueries: dict[tuple[str, str], dict[str, Any]] = {}
        self._template: dict[str, Any] | None = None

    def replacement(self, original: dict[str, Any], ref: TableRef) -> dict[str, Any]:
        """The SUBQUERY node for ``original``: its alias (the table's name when it had none,
        so ``customers.email`` still binds), its sample and its column aliases."""
        if original.get("at_clause") is not None:
            raise _Unwritable  # time travel has no meaning for a view
        if ref.key() not in self._subqueries:
            raw = self.cur.execute(
                "SELECT json_serialize_sql(?)", [f"SELECT * FROM {self.views[ref.key()]} AS v"]
            ).fetchall()[0][0]
            self._subqueries[ref.key()] = _strip_locations(
                json.loads(raw)["statements"][0]["node"]["from_table"]
            )
        node: dict[str, Any] = json.loads(json.dumps(self._subqueries[ref.key()]))
        node["alias"] = str(original.get("alias") or original.get("table_name") or "")
        node["sample"] = _strip_locations(original.get("sample"))
        node["column_name_alias"] = list(original.get("column_name_alias") or [])
        return node

    def name_of(self, expr: dict[str, Any]) -> str:
        """The name DuckDB gives an unaliased expression: its text as DuckDB writes it."""
        if self._template is None:
            raw = self.cur.execute("SELECT json_serialize_sql('SELECT 1')").fetchall()[0][0]
            self._template = _strip_locations(json.loads(raw))
        tree = json.loads(json.dumps(self._template))
        tree["statements"][0]["node"]["select_list"] = [expr]
        text = str(self.cur.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchall()[0][0])
        if not text.startswith("SELECT "):
            raise _Unwritable
        return text[len("SELECT ") :]

    def swap(self, value: Any, original: Any) -> tuple[Any, bool]:
        """``value`` (a stripped copy of ``original``) with the ruled tables replaced, and
        whether anything in it was."""
        if isinstance(value, list):
            pairs = [self.swap(v, o) for v, o in zip(value, original, strict=True)]
            return [v for v, _ in pairs], any(c for _, c in pairs)
        if not isinstance(value, dict):
            return value, False
        ref = self.bases.get(id(original))
        if ref is not None and ref.key() in self.views:
            return self.replacement(original, ref), True
        if value.get("class") == "COLUMN_REF":
            names = self.unqualified(value.get("column_names"))
            if names is not None:
                return {**value, "column_names": names}, True
        out, changed = {}, False
        for k, v in value.items():
            if k == "select_list" and isinstance(v, list):
                out[k], c = self.select_list(v, original[k])
            else:
                out[k], c = self.swap(v, original[k])
            changed = changed or c
        return out, changed

    def select_list(self, items: list[Any], original: list[Any]) -> tuple[list[Any], bool]:
        """A select list swapped item by item. An unaliased expression is named by its text,
        which now holds a view: it keeps the name it has in the caller's query. (Each item is
        swapped once: a nested subquery's list is not walked again for its parent.)"""
        out, changed = [], False
        for item, before in zip(items, original, strict=True):
            new, c = self.swap(item, before)
            if (
                c
                and isinstance(item, dict)
                and not item.get("alias")
                and item.get("class") not in ("STAR", "COLUMN_REF")
            ):
                new["alias"] = self.name_of(item)
            out.append(new)
            changed = changed or c
        return out, changed

    def unqualified(self, names: Any) -> list[str] | None:
        """``schema.table.column`` (or ``catalog.schema.table.column``) of a ruled table as
        ``table.column``: the view's subquery has the table's name as alias but no schema, so
        the qualified spelling would not bind. None for any other reference."""
        if not isinstance(names, list) or len(names) < 3 or not all(isinstance(n, str) for n in names):
            return None
        folded = [fold(n) for n in names]
        if len(names) >= 4 and folded[0] == self.catalog and (folded[1], folded[2]) in self.views:
            return names[2:]
        if (folded[0], folded[1]) in self.views:
            return names[1:]
        return None


class _Walk:
    """One walk over one statement's parse tree, collecting tables and parameters.

    ``scope`` is the set of (folded) CTE names visible at a node. Every dict is visited:
    expressions (``"class"``) and typed nodes (``"type": "<NAME>"``) are dispatched by kind and
    unknown kinds are refused; any other dict or list is walked into, so nothing nested can be
    skipped.
    """

    def __init__(self, guard: SqlGuard, principal: Principal) -> None:
        self.guard = guard
        self.principal = principal
        self.tables: dict[tuple[str, str], TableRef] = {}
        # Each BASE_TABLE node that names a data table (not a CTE in scope), by the node's id
        # in the tree walked: what a rewrite for ruled tables replaces (SqlGuard._rewrite).
        self.bases: dict[int, TableRef] = {}
        self.params: set[int] = set()
        self.nodes = 0  # parse-tree nodes visited: the sizer's work budget is proportional
        self._refs: dict[tuple[str, str], TableRef | None] | None = None

    def param_count(self) -> int:
        return max(self.params, default=0)

    def statement(self, stmt: dict[str, Any]) -> None:
        node = stmt.get("node")
        if not isinstance(node, dict):
            raise InvalidArgument("the query cannot be analysed; send exactly one SELECT query")
        self.visit(node, frozenset())
        for entry in stmt.get("named_param_map") or []:
            self.parameter(str(entry.get("key", "")))
        self.children(stmt, frozenset(), skip=frozenset({"node", "named_param_map"}))

    # --- dispatch -------------------------------------------------------------------------
    def visit(self, value: Any, scope: frozenset[str]) -> None:
        if isinstance(value, list):
            for item in value:
                self.visit(item, scope)
            return
        if not isinstance(value, dict):
            return
        self.nodes += 1
        if "class" in value:
            self.expression(value, scope)
            return
        kind = value.get("type")
        if not isinstance(kind, str):
            self.children(value, scope)
            return
        if kind in ("SELECT_NODE", "SET_OPERATION_NODE"):
            self.query_node(value, scope)
        elif kind == "BASE_TABLE":
            self.base_table(value, scope)
        elif kind == "TABLE_FUNCTION":
            self.table_function(value, scope)
        elif kind == "SHOW_REF":
            label = _SHOW_LABELS.get(str(value.get("show_type")), "SHOW")
            raise PermissionDenied(f"{label} is not allowed: {_QUERIES_ONLY}; {_METADATA_HINT}")
        elif kind in _PLAIN_NODES or kind.endswith("_TYPE_INFO"):
            self.children(value, scope)
        else:
            # RECURSIVE_CTE_NODE outside a WITH (see with_ctes), CTE_NODE, COLUMN_DATA, DELIM_GET,
            # and whatever a future DuckDB adds: refused until understood.
            raise PermissionDenied(
                f"the query uses a construct the SQL guard does not support ({kind}); {_QUERIES_ONLY}"
            )

    def children(
        self, node: dict[str, Any], scope: frozenset[str], skip: frozenset[str] = frozenset()
    ) -> None:
        for key, value in node.items():
            if key not in skip:
                self.visit(value, scope)

    # --- query nodes and CTE scope ----------------------------------------------------------
    def with_ctes(self, node: dict[str, Any], scope: frozenset[str]) -> frozenset[str]:
        """Walk the node's CTE bodies in order; return the scope its body sees."""
        cte_map = node.get("cte_map") or {}
        entries = (cte_map.get("map") or []) if isinstance(cte_map, dict) else None
        if not isinstance(entries, list):
            raise InvalidArgument("the query cannot be analysed (unexpected WITH clause)")
        inner = scope
        for entry in entries:
            name = fold(str(entry.get("key", "")))
            definition = entry.get("value") or {}
            body = definition.get("query_node")
            if isinstance(body, dict) and body.get("type") == "RECURSIVE_CTE_NODE":
                self.recursive_cte(body, inner, name)
            else:
                self.visit(body, inner)
            self.children(definition, inner, skip=frozenset({"query_node"}))
            inner = inner | {name}
        return inner

    def query_node(self, node: dict[str, Any], scope: frozenset[str]) -> None:
        inner = self.with_ctes(node, scope)
        self.children(node, inner, skip=frozenset({"cte_map"}))

    def recursive_cte(self, node: dict[str, Any], scope: frozenset[str], name: str) -> None:
        if fold(str(node.get("cte_name", ""))) != name:
            raise PermissionDenied(
                "the query uses a recursive CTE form the SQL guard does not support; "
                "write WITH RECURSIVE name AS (anchor UNION [ALL] recursive-term)"
            )
        inner = self.with_ctes(node, scope)
        # The anchor (left) does not see the CTE itself: DuckDB reads a table of that name there.
        self.visit(node.get("left"), inner)
        self.visit(node.get("right"), inner | {name})
        self.children(node, inner, skip=frozenset({"cte_map", "left", "right"}))

    # --- table references -------------------------------------------------------------------
    def base_table(self, ref: dict[str, Any], scope: frozenset[str]) -> None:
        catalog = str(ref.get("catalog_name") or "")
        schema = str(ref.get("schema_name") or "")
        table = str(ref.get("table_name") or "")
        parts = [p for p in (catalog, schema, table) if p]
        path = (ref.get("qualified_name") or {}).get("path")
        if path is not None and list(path) != parts:
            raise PermissionDenied(
                f"table reference {_echo('.'.join(map(str, path)))} cannot be checked; name it as schema.table"
            )
        self.children(
            ref,
            scope,
            skip=frozenset({"catalog_name", "schema_name", "table_name", "qualified_name"}),
        )
        if not catalog and not schema and fold(table) in scope:
            return  # a CTE in scope; its body was checked where it is defined
        display = ".".join(parts)
        found = self.resolve(catalog, schema, table)
        if found is None or not self.guard._policy.can_read(self.principal, found):
            raise self.guard._not_readable(display, self.readable())
        self.tables[found.key()] = found
        self.bases[id(ref)] = found

    def resolve(self, catalog: str, schema: str, table: str) -> TableRef | None:
        """The data table DuckDB would read for this name, or None if it is not one."""
        s, t = fold(schema), fold(table)
        if s == ARTEFACT_SCHEMA and (not catalog or fold(catalog) == self.guard._catalog):
            # artefacts."<id>": a tabular artefact the caller may see, else None (refused with
            # the words of a missing table). Allowlists never reach this schema.
            return self.guard._policy.resolve_artefact(self.principal, s, t)
        refs = self.refs()
        if catalog:
            if fold(catalog) != self.guard._catalog or s in _NEVER_DATA_SCHEMAS:
                return None
            return refs.get((s or "main", t))
        if schema:
            if s in _NEVER_DATA_SCHEMAS:
                return None
            hit = refs.get((s, t))
            if hit is not None:
                return hit
            # DuckDB reads `db.table` as db.main.table when no schema `db` exists.
            return refs.get(("main", t)) if s == self.guard._catalog else None
        return refs.get(("main", t))

    def refs(self) -> dict[tuple[str, str], TableRef | None]:
        if self._refs is None:
            self._refs = self.guard._data_tables()
        return self._refs

    def readable(self) -> list[str]:
        can_read = self.guard._policy.can_read
        return [r.qualified for r in self.refs().values() if r is not None and can_read(self.principal, r)]

    def table_function(self, ref: dict[str, Any], scope: frozenset[str]) -> None:
        fn = ref.get("function")
        if not isinstance(fn, dict) or fn.get("class") != "FUNCTION":
            raise PermissionDenied(f"this table function form is not allowed: {_QUERIES_ONLY}")
        name = self.function_name(fn)
        if fn.get("schema") or fn.get("catalog"):
            raise PermissionDenied(
                f"table function {_echo(name)}() must not be qualified with a schema or catalog: "
                f"call {', '.join(f'{n}()' for n in ALLOWED_TABLE_FUNCTIONS)} by name"
            )
        refusal = self.guard._function_refusal(name, in_from=True)
        if refusal is not None:
            raise refusal
        self.children(fn, scope, skip=frozenset({"function_name", "schema", "catalog", "qualified_name"}))
        self.children(ref, scope, skip=frozenset({"function"}))

    # --- expressions ----------------------------------------------------------------------
    def expression(self, expr: dict[str, Any], scope: frozenset[str]) -> None:
        cls = expr.get("class")
        if cls not in _EXPRESSION_CLASSES:
            raise PermissionDenied(
                f"the query uses an expression the SQL guard does not support ({cls}); {_QUERIES_ONLY}"
            )
        skip: frozenset[str] = frozenset()
        if "function_name" in expr:
            name = self.function_name(expr)
            refusal = self.guard._function_refusal(name, in_from=False)
            if refusal is not None:
                raise refusal
            skip = frozenset({"function_name", "qualified_name"})
        if cls == "PARAMETER":
            self.parameter(str(expr.get("identifier", "")))
        if cls == "TYPE":
            self.type_reference(expr)
        if cls == "COLUMN_REF":
            names = expr.get("column_names") or []
            if len(names) == 1 and fold(str(names[0])) in _KEYWORD_FUNCTIONS:
                bare = _echo(str(names[0]))
                raise PermissionDenied(
                    f"{bare}: written bare, this keyword calls {fold(bare)}(), which is not allowed "
                    f"({DENIED_FUNCTIONS[fold(bare)]}); for a column of that name, qualify it "
                    f"(table_alias.{bare})"
                )
        self.children(expr, scope, skip=skip)

    @staticmethod
    def function_name(fn: dict[str, Any]) -> str:
        name = str(fn.get("function_name") or "")
        path = (fn.get("qualified_name") or {}).get("path")
        if not name or (path and str(path[-1]) != name):
            raise PermissionDenied("a function call cannot be checked; call functions by their plain name")
        return name

    def parameter(self, identifier: str) -> None:
        if not identifier.isdecimal() or int(identifier) < 1:
            raise InvalidArgument(
                f"named parameter ${identifier[:40]} is not supported: use positional parameters "
                "(? or $1, $2, …) and pass their values as a list"
            )
        if len(identifier) > 6 or int(identifier) > MAX_PARAM_INDEX:
            raise InvalidArgument(
                f"parameter ${identifier[:12]}{'…' if len(identifier) > 12 else ''} is out of range: "
                f"a query takes at most {MAX_PARAM_INDEX:,} parameters ($1 … ${MAX_PARAM_INDEX})"
            )
        self.params.add(int(identifier))

    def type_reference(self, expr: dict[str, Any]) -> None:
        """Only DuckDB's built-in types may be named (casts, ``::``, TRY_CAST, nested types).

        A user-defined type lives in a schema, and naming it reveals its definition (an ENUM's
        values through ``enum_range(NULL::s.t)`` or a failing cast); the refusal reads exactly
        like a missing table, so whether the type exists never leaks. Readable tables' ENUM
        columns still work: their values compare with plain strings."""
        name = str(expr.get("type_name") or "")
        parts = [str(p) for p in (expr.get("catalog"), expr.get("schema")) if p] + [name]
        if len(parts) > 1 or fold(name) not in self.guard._builtin_types:
            display = ".".join(parts)[:200]
            raise PermissionDenied(
                f"type {display}: {NOT_READABLE}; only DuckDB's built-in types may be named"
            )


# --- values built from small constants (see "Values built from small constants" above) ------

#: Largest value, in units, that one expression may build from what the query text says: a unit
#: is one character (byte) of a string or blob or one element of a list or map, at most a few
#: tens of bytes. Far more than a real query needs from a constant (padding, a label, a short
#: series; rows come from FROM range(n)), and small enough that a constant combined with every
#: row stays bounded: DuckDB evaluates 2,048 rows at a time, so 100,000 units per row is
#: 200 MB-2 GB per vector — at 1,000,000 it would be 2-20 GB.
MAX_BUILT_UNITS = 100_000

#: Largest sum over all the value builders of one statement: DuckDB folds each constant
#: builder on its own while planning, so 5,000 calls each under :data:`MAX_BUILT_UNITS` would
#: otherwise add up to gigabytes.
MAX_BUILT_TOTAL_UNITS = 1_000_000

#: Most work DuckDB may do folding one statement's constants while planning, in units (one
#: element or character an expression reads; the cost of one is in tests/bench/RESULTS.md,
#: "Costs the code relies on"): a few seconds at the very worst, where the query timeout
#: cannot interrupt. A value under
#: :data:`MAX_BUILT_UNITS` can still be read by a thousand expressions.
MAX_FOLD_WORK = 20_000_000

#: What the guard assumes for one value it cannot see: a column of a stored table, a lambda
#: parameter over such a list, a scalar subquery over rows. Stored data is the admin's to bound;
#: this only sets how far a query may *enlarge* it (``repeat(col, n)`` with n ≤ 100).
DATA_VALUE_UNITS = 1_000

#: What the guard assumes for one parameter value: it arrives inside a Flight command of at most
#: 1 MiB (flight_server.commands.MAX_COMMAND_BYTES), so it can be that large.
PARAM_VALUE_UNITS = 1 << 20

#: Highest positional parameter index ($n) accepted. Equal to flight_server's MAX_PARAMS (the
#: most parameter values one command may carry): a higher index can never be bound, and DuckDB
#: answers one with an error message listing every missing index (megabytes for $1000000).
MAX_PARAM_INDEX = 1_000

#: Functions whose value is at most this many times the size of their arguments.
_EXPANDING: Mapping[str, int] = {
    "hex": 2,
    "to_hex": 2,
    "bin": 8,
    "to_binary": 8,
    "to_base64": 2,
    "base64": 2,
    "url_encode": 3,
    "upper": 3,
    "ucase": 3,
    "lower": 3,
    "lcase": 3,
    "nfc_normalize": 3,
    "json_quote": 6,
    "to_json": 6,
    "array_to_json": 6,
    "row_to_json": 6,
    "json_array": 6,
    "json_object": 6,
    "json_serialize_sql": 64,
}

#: Functions that build a value larger than their arguments, with what they build. Each one's
#: size arguments must be constants the guard can evaluate (see :class:`_Sizer`).
BUILDER_FUNCTIONS: Mapping[str, str] = {
    "range": "a list of numbers (count from start, stop, step)",
    "generate_series": "a list of numbers (count from start, stop, step, inclusive)",
    "repeat": "a string, blob or list repeated count times",
    "list_resize": "a list of the given length",
    "array_resize": "a list of the given length",
    "lpad": "a string padded to the given width",
    "rpad": "a string padded to the given width",
    "printf": "a string formatted with widths and precisions from the format string",
    "format": "a string formatted with widths and precisions from the format string",
    "bar": "a bar of the given width",
    "to_base": "a string padded to the given minimum length",
    "bitstring": "a bitstring of the given length",
    "equi_width_bins": "a list of the given number of bins",
    "replace": "a string with every match replaced (grows by the replacement's length)",
    "regexp_replace": "a string with matches replaced (grows by the replacement's length)",
    "list_transform": "a list with the lambda's value for each element",
    "array_transform": "a list with the lambda's value for each element",
    "list_apply": "a list with the lambda's value for each element",
    "array_apply": "a list with the lambda's value for each element",
    "apply": "a list with the lambda's value for each element",
    "list_reduce": "one value folded over a list by the lambda",
    "array_reduce": "one value folded over a list by the lambda",
    "reduce": "one value folded over a list by the lambda",
    "array_to_string": "a string joining a list with a separator (grows by the separator per element)",
    "concat_ws": "a string joining its arguments with a separator",
    "list_aggregate": "an aggregate over a list (string_agg's separator per element)",
    "list_aggr": "an aggregate over a list (string_agg's separator per element)",
    "array_aggregate": "an aggregate over a list (string_agg's separator per element)",
    "array_aggr": "an aggregate over a list (string_agg's separator per element)",
    "aggregate": "an aggregate over a list (string_agg's separator per element)",
    "json_pretty": "indented JSON: one line per nesting level, each indented by its depth (quadratic)",
    # Encoders: a fixed factor per call, which nesting multiplies (hex(hex(hex(…)))).
    **{name: f"an encoding up to {factor} times its input" for name, factor in _EXPANDING.items()},
    # Aggregates whose state is sized by an argument, allocated on the first row of a group.
    "bitstring_agg": "a bitstring with one bit per value between min and max",
    "approx_top_k": "a state holding k values",
    "reservoir_quantile": "a sample of the given size",
    "max": "the n largest values (max(x, n))",
    "min": "the n smallest values (min(x, n))",
    "arg_max": "the n values at the largest keys (arg_max(x, key, n))",
    "arg_min": "the n values at the smallest keys (arg_min(x, key, n))",
    "argmax": "the n values at the largest keys",
    "argmin": "the n values at the smallest keys",
    "max_by": "the n values at the largest keys",
    "min_by": "the n values at the smallest keys",
}

#: String distances that compare every character of one argument with every character of the
#: other, with how many cells cost one unit of :data:`MAX_FOLD_WORK` (from their measured
#: costs: tests/bench/RESULTS.md, "Costs the code relies on").
_QUADRATIC: Mapping[str, int] = {"levenshtein": 64, "editdist3": 64, "damerau_levenshtein": 8}
#: Functions that pack their arguments into one list, struct or map ([a, b], {'k': v}, row(…)).
_CONSTRUCTORS = frozenset({"list_value", "list_pack", "array_value", "struct_pack", "row", "map"})
_LAMBDA_MAPPERS = frozenset({"list_transform", "array_transform", "list_apply", "array_apply", "apply"})
_LAMBDA_REDUCERS = frozenset({"list_reduce", "array_reduce", "reduce"})
#: Aggregates taking the name of another aggregate as a string; the name is checked as a call.
_AGGREGATE_BY_NAME = frozenset({"list_aggregate", "list_aggr", "array_aggregate", "array_aggr", "aggregate"})
_TOP_N = {"max": 1, "min": 1, "arg_max": 2, "arg_min": 2, "argmax": 2, "argmin": 2, "max_by": 2, "min_by": 2}
#: Arithmetic the guard evaluates in size arguments: Python's exact integers, clamped.
_HUGE = 10**30
#: A parameter size for probing a lambda body: far above any real size, far below _HUGE.
_PROBE = 10**12
#: Each lambda level evaluates its body twice, so nesting multiplies the work: at most this
#: deep, and at most a few visits per parse-tree node (plus a base for small queries), so
#: sizing never costs much more than the walk itself.
_MAX_LAMBDA_DEPTH = 6
_SIZER_STEPS_PER_NODE = 4
_SIZER_BASE_STEPS = 20_000
#: Expression classes whose value is one fixed-width scalar (a boolean).
_SCALAR_CLASSES = frozenset({"COMPARISON", "CONJUNCTION", "BETWEEN"})
_FIXED_TYPES = frozenset(
    {
        "BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
        "UINTEGER", "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL", "DATE", "TIME", "TIME_NS",
        "TIME WITH TIME ZONE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_NS",
        "TIMESTAMPTZ_NS", "TIMESTAMP_MS", "TIMESTAMP_S", "INTERVAL", "UUID",
    }
)  # fmt: skip
_PRINTF_SPEC = re.compile(r"%[-+ #0']*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_FORMAT_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True, slots=True)
class _Size:
    """An upper bound on a value's size in units: ``built`` comes from the query text (literals
    and builders, folded while planning), ``outside`` from values the guard cannot see (stored
    data, parameters)."""

    built: int
    outside: int = 0

    @property
    def total(self) -> int:
        return self.built + self.outside

    def __add__(self, other: _Size) -> _Size:
        return _Size(self.built + other.built, self.outside + other.outside)


_ONE = _Size(1)
_ZERO = _Size(0)


class _Sizer:
    """Bounds the size of every value a statement builds from its own text, bottom-up.

    Runs after :class:`_Walk` accepted the tree, so every node is one the guard knows. Values
    flow through queries: a column of a subquery or CTE may hold whatever that query built
    (DuckDB inlines it and folds the parent's expression too — measured), so a column counts as
    the largest value built by any query node completed before it (FROM and CTEs are sized
    before the clauses that read them), plus :data:`DATA_VALUE_UNITS` for stored data.
    """

    def __init__(self, guard: SqlGuard, budget: int) -> None:
        self.budget = budget
        self.guard = guard
        self.completed = 0  # largest built value returned by a finished query node
        self.total = 0  # sum over builder calls
        self.lambdas: list[dict[str, _Size]] = []
        self.memo: dict[tuple[int, tuple[int, ...]], _Size] = {}
        self.probing = 0  # inside copies(): sizes only, no checks
        self.steps = 0
        self.work = 0  # see fold()
        self.envs: list[dict[str, _Size]] = []

    # --- traversal --------------------------------------------------------------------------
    def any(self, value: Any) -> int:
        """Size every expression under ``value``; return the largest built value of the query
        nodes found directly in it."""
        if isinstance(value, list):
            return max((self.any(v) for v in value), default=0)
        if not isinstance(value, dict):
            return 0
        if "class" in value:
            return self.expr(value).built
        self.step()
        kind = value.get("type")
        if kind in ("SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE"):
            return self.query(value)
        if kind == "TABLE_FUNCTION" and isinstance(value.get("function"), dict):
            # In FROM, range() and friends stream rows at run time under the query's limits;
            # only their arguments are values.
            fn = value["function"]
            rest = [v for k, v in value.items() if k != "function"]
            return max(self.any(fn.get("arguments")), self.any(fn.get("children")), self.any(rest))
        return max((self.any(v) for v in value.values()), default=0)

    def query(self, node: dict[str, Any]) -> int:
        cte_map = node.get("cte_map") or {}
        for entry in cte_map.get("map") or [] if isinstance(cte_map, dict) else []:
            self.any(entry.get("value"))
        self.any(node.get("from_table"))
        if node.get("type") == "SELECT_NODE":
            out = 0
            for item in node.get("select_list") or []:
                # A later item, WHERE and ORDER BY may name an earlier item's alias (DuckDB's
                # lateral column aliases), which the binder replaces by its expression.
                out = max(out, self.expr(item).built)
                self.completed = max(self.completed, out)
            rest = {k: v for k, v in node.items() if k not in ("cte_map", "from_table", "select_list")}
        else:
            out = 0
            rest = {k: v for k, v in node.items() if k not in ("cte_map",)}
        out = max(out, self.any(list(rest.values())))
        self.completed = max(self.completed, out)
        return out

    # --- expressions ------------------------------------------------------------------------
    def expr(self, e: dict[str, Any]) -> _Size:
        if self.probing:
            return self.size(e)
        key = (id(e), tuple(id(env) for env in self.lambdas))
        hit = self.memo.get(key)
        if hit is None:
            hit = self.memo[key] = self.size(e)
        return hit

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.budget:
            raise InvalidArgument(
                "the query is too complex for the guard to bound the values it builds (nested "
                "lambdas multiply the work); simplify it, e.g. compute inner lists in a CTE"
            )

    def size(self, e: dict[str, Any]) -> _Size:  # noqa: C901, PLR0911, PLR0912  a dispatch on the expression class
        self.step()
        cls = e.get("class")
        if cls == "CONSTANT":
            literal = e.get("literal")
            if isinstance(literal, dict) and literal.get("kind") == "STRING":
                return _Size(max(1, len(str(literal.get("text", "")).encode())))
            value = e.get("value")
            if isinstance(value, dict) and isinstance(value.get("value"), str):
                return _Size(max(1, len(value["value"].encode())))
            return _ONE
        if cls == "COLUMN_REF":
            names = e.get("column_names") or []
            if len(names) == 1:
                for scope in reversed(self.lambdas):
                    hit = scope.get(fold(str(names[0])))
                    if hit is not None:
                        return hit
            return _Size(self.completed, DATA_VALUE_UNITS)
        if cls == "PARAMETER":
            return _Size(0, PARAM_VALUE_UNITS)
        if cls == "POSITIONAL_REFERENCE":  # #n: a column of FROM, like a column name
            return _Size(self.completed, DATA_VALUE_UNITS)
        if cls == "STAR":
            self.any([v for k, v in e.items() if k != "class"])
            return _Size(self.completed, DATA_VALUE_UNITS)
        if cls == "SUBQUERY":
            out = self.any(e.get("subquery"))
            self.any(e.get("child"))
            return _Size(out, DATA_VALUE_UNITS)
        if cls == "FUNCTION":
            return self.function(e)
        if cls == "TYPE":
            return _ONE
        if cls == "CAST":
            child = self.expr(e["child"]) if isinstance(e.get("child"), dict) else _ONE
            type_expr = e.get("type_expr") or {}
            if str(type_expr.get("type_name", "")).upper() in _FIXED_TYPES:
                return _ONE
            return child
        if cls == "LAMBDA":
            return self.expr(e["expr"]) if isinstance(e.get("expr"), dict) else _ONE
        parts = self.children(e)
        if cls in _SCALAR_CLASSES:
            return _ONE
        return sum(parts, _ZERO) if parts else _ONE

    def children(self, e: dict[str, Any]) -> list[_Size]:
        """Sizes of the expressions directly under ``e`` (query nodes under it are sized too)."""
        out: list[_Size] = []

        def collect(value: Any) -> None:
            if isinstance(value, list):
                for v in value:
                    collect(v)
            elif isinstance(value, dict):
                if "class" in value:
                    out.append(self.expr(value))
                elif value.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE"):
                    out.append(_Size(self.query(value), DATA_VALUE_UNITS))
                else:
                    for v in value.values():
                        collect(v)

        for key, value in e.items():
            if key != "class":
                collect(value)
        return out

    def function(self, e: dict[str, Any]) -> _Size:
        name = fold(str(e.get("function_name", "")))
        args = _arguments(e)
        if name in _LAMBDA_MAPPERS or name in _LAMBDA_REDUCERS or name == "invoke":
            return self.lambda_call(name, e, args)
        if name in _AGGREGATE_BY_NAME and len(args) >= 2:
            self.aggregate_by_name(name, args[1])
        sizes = [self.expr(a) for a in args]
        # filter, ORDER BY inside the call, window clauses: sized for what they build
        self.any([e.get("filter"), e.get("order_bys")])
        self.fold(name, sizes)
        if name in BUILDER_FUNCTIONS:
            size = self.builder(name, args, sizes)
            if size is None:
                return sum(sizes, _ZERO) if sizes else _ONE
            self.charge(name, size)
            return size
        if name in self.guard._fixed_width:
            return _ONE
        out = sum(sizes, _ZERO) if sizes else _ONE
        if name in _CONSTRUCTORS:
            out = out + _Size(len(sizes))  # one slot per element, whatever the element's size
        self.check(name, out)
        return out

    def lambda_call(self, name: str, e: dict[str, Any], args: list[dict[str, Any]]) -> _Size:
        """Size a call with a lambda: its body is a linear function of its parameters' sizes
        (sums, and products with constants), so two probes give how many times the body copies
        a parameter (``k``) and what it adds on its own (``c``); the result is ``k`` copies of
        the list plus ``c`` per element. A reduce whose body copies its accumulator more than
        once doubles it at each step and is refused."""
        lam = next((a for a in args if a.get("class") == "LAMBDA"), None)
        others = [a for a in args if a is not lam]
        sizes = [self.expr(a) for a in others]
        if lam is None or not isinstance(lam.get("expr"), dict):
            return sum(sizes, _ZERO) if sizes else _ONE
        if len(self.lambdas) >= _MAX_LAMBDA_DEPTH:
            raise InvalidArgument(
                f"lambdas are nested more than {_MAX_LAMBDA_DEPTH} deep; the guard cannot bound "
                "what they build — un-nest them (e.g. with a CTE)"
            )
        params = _lambda_params(lam)
        display = _echo(str(e.get("function_name")))
        if name == "invoke":
            return self.body(lam, dict(zip(params, sizes, strict=False)))
        lst = sizes[0] if sizes else _ONE
        count = max(1, lst.total)
        # The body with empty parameters: its own builds, checked; then one probe per parameter.
        # DuckDB evaluates the body once per element: its work counts that many times.
        before = self.work
        own = self.body(lam, dict.fromkeys(params, _ZERO))
        body_work, self.work = self.work - before, before
        self.fold(display, [lst, _Size(0)])
        self.fold(display, [_Size(body_work)], count)
        if name in _LAMBDA_REDUCERS:
            start = sizes[1] if len(sizes) > 1 else _ZERO
            if self.copies(lam, params, 0, own) > 1:
                raise InvalidArgument(
                    f"{display}() with a lambda that uses its accumulator more than once is not "
                    "allowed: each step doubles the value, and DuckDB folds constant lists while "
                    "planning, outside every limit; use the accumulator once (lambda acc, x: acc + x)"
                )
            size = start + lst + _scale(own, count) + _scale(lst, self.copies(lam, params, 1, own))
            self.check(display, size)
            return size
        size = _scale(lst, self.copies(lam, params, 0, own)) + _scale(own, count)
        self.charge(display, size)
        return size

    def body(self, lam: dict[str, Any], env: dict[str, _Size]) -> _Size:
        self.envs.append(env)  # kept alive: memo keys use id(env), which must stay unique
        self.lambdas.append(env)
        try:
            return self.expr(lam["expr"])
        finally:
            self.lambdas.pop()

    def copies(self, lam: dict[str, Any], params: list[str], index: int, own: _Size) -> int:
        """How many copies of parameter ``index`` the body's value holds (sizes are linear in
        it: sums, and products with constants), from one probe with a huge parameter."""
        if index >= len(params):
            return 0
        probe = _Size(_PROBE, _PROBE)
        self.probing += 1
        try:
            grown = self.body(lam, dict.fromkeys(params, _ZERO) | {params[index]: probe}).total - own.total
        finally:
            self.probing -= 1
        return -(-grown // probe.total)

    def aggregate_by_name(self, name: str, arg: dict[str, Any]) -> None:
        literal = arg.get("literal") if arg.get("class") == "CONSTANT" else None
        if not isinstance(literal, dict) or literal.get("kind") != "STRING":
            raise PermissionDenied(
                f"{name}() must name its aggregate as a string literal, e.g. "
                f"{name}(l, 'sum'): the name is resolved from the catalog"
            )
        refusal = self.guard._function_refusal(str(literal.get("text", "")), in_from=False)
        if refusal is not None:
            raise refusal

    # --- builders ---------------------------------------------------------------------------
    def builder(self, name: str, args: list[dict[str, Any]], sizes: list[_Size]) -> _Size | None:  # noqa: C901, PLR0911, PLR0912  a dispatch on the function name
        """The size ``name(args)`` builds, or None when this call builds nothing large (e.g.
        max(x) with one argument)."""
        n = len(args)
        if name in ("range", "generate_series"):
            return _Size(self.series_count(name, args))
        if name == "repeat" and n == 2:
            return _Size(_mul(sizes[0].total, self.size_arg(name, args[1], "count")))
        if name in ("list_resize", "array_resize") and n >= 2:
            fill = sizes[2].total if n > 2 else 1
            return _Size(_mul(self.size_arg(name, args[1], "length"), max(1, fill)) + sizes[0].total)
        if name in ("lpad", "rpad") and n >= 2:
            return _Size(self.size_arg(name, args[1], "width"))
        if name == "bar" and n >= 4:
            return _Size(self.size_arg(name, args[3], "width"))
        if name == "to_base" and n >= 3:
            return _Size(max(64, self.size_arg(name, args[2], "minimum length")))
        if name == "bitstring" and n >= 2:
            return _Size(max(1, self.size_arg(name, args[1], "length") // 8) + sizes[0].total)
        if name == "equi_width_bins" and n >= 3:
            return _Size(self.size_arg(name, args[2], "bin count"))
        if name in ("printf", "format") and n >= 1:
            return self.formatted(name, args[0], sizes[1:])
        if name in ("replace", "regexp_replace") and n >= 3:
            return _Size(_mul(sizes[0].total + 1, max(1, sizes[2].total)))
        if name in _EXPANDING:
            return _scale(sum(sizes, _ZERO), _EXPANDING[name])
        if name == "array_to_string" and n >= 2:
            return sizes[0] + _scale(sizes[1], max(1, sizes[0].total))
        if name == "concat_ws" and n >= 1:
            return sum(sizes, _ZERO) + _scale(sizes[0], n)
        if name in _AGGREGATE_BY_NAME and n >= 2:
            extra = sum(sizes[2:], _ZERO)
            return sizes[0] + _scale(extra, max(1, sizes[0].total))
        if name == "json_pretty" and n >= 1:
            # (b + o)^2 for b built and o outside units: the squares and the cross term that the
            # query's constants control count as built.
            b, o = sizes[0].built, sizes[0].outside
            return _Size(_mul(b, b + 2 * o) + b, _mul(o, o) + o)
        if name == "bitstring_agg" and n >= 3:
            low, high = self.int_arg(name, args[1], "min"), self.int_arg(name, args[2], "max")
            return _Size(max(0, high - low) // 8 + 1)
        if name == "approx_top_k" and n >= 2:
            return _Size(self.size_arg(name, args[1], "k"))
        if name == "reservoir_quantile" and n >= 3:
            return _Size(self.size_arg(name, args[2], "sample size"))
        if name in _TOP_N and n > _TOP_N[name]:
            return _Size(_mul(self.size_arg(name, args[_TOP_N[name]], "n"), max(1, sizes[0].total)))
        return None

    def series_count(self, name: str, args: list[dict[str, Any]]) -> int:
        values = [_const_int(a) for a in args]
        if any(v is None for v in values):
            temporal = _temporal_count(args)
            if temporal is not None:
                return temporal
            raise PermissionDenied(
                f"{name}() as a value needs constant bounds the guard can evaluate (integers, or "
                "DATE/TIMESTAMP literals with a constant INTERVAL step): DuckDB builds the whole "
                f"list (at most {MAX_BUILT_UNITS:,} elements here) and one row could otherwise "
                f"build gigabytes; for many rows use the table function in FROM (FROM {name}(...) "
                f"or FROM t, {name}(t.a, t.b)), which streams its rows"
            )
        ints = [v for v in values if v is not None]
        start, stop, step = 0, 0, 1
        if len(ints) == 1:
            stop = ints[0]
        elif len(ints) >= 2:
            start, stop = ints[0], ints[1]
            step = ints[2] if len(ints) > 2 else 1
        if step == 0:
            return 0
        if name == "generate_series":
            return max(0, min(_HUGE, (stop - start) // step + 1))
        return max(0, min(_HUGE, -((start - stop) // step)))

    def int_arg(self, name: str, arg: dict[str, Any], what: str) -> int:
        value = _const_int(arg)
        if value is None:
            raise PermissionDenied(
                f"{name}(): the {what} must be a constant the guard can evaluate (an integer, "
                f"arithmetic of integers, a cast of one), at most {MAX_BUILT_UNITS:,}; a computed "
                f"{what} (a column, parameter or subquery) is refused because one row could build "
                "gigabytes"
            )
        return value

    def size_arg(self, name: str, arg: dict[str, Any], what: str) -> int:
        return max(0, self.int_arg(name, arg, what))

    def formatted(self, name: str, fmt: dict[str, Any], sizes: list[_Size]) -> _Size:
        literal = fmt.get("literal") if fmt.get("class") == "CONSTANT" else None
        if not isinstance(literal, dict) or literal.get("kind") != "STRING":
            raise PermissionDenied(
                f"{name}(): the format string must be a string literal; its widths and precisions "
                "decide how large the result is, and the guard must see them"
            )
        # The format *string's* contents (not SQL), scanned for field widths and precisions.
        text = str(literal.get("text", ""))
        biggest = max((s.total for s in sizes), default=1)
        if name == "printf":
            specs = list(_PRINTF_SPEC.finditer(text))
            if any("*" in m.group(0) for m in specs):
                raise PermissionDenied(
                    "printf(): a '*' width or precision takes its size from an argument and is not "
                    "allowed; write the width in the format string"
                )
            numbers = [int(g) for m in specs for g in m.groups() if g and g.isdecimal()]
            fields = len(specs)
        else:
            fields, numbers, depth, spec = 0, [], 0, ""
            for ch in text:
                if ch == "{":
                    depth += 1
                    if depth > 1:
                        raise PermissionDenied(
                            "format(): a nested {} width or precision takes its size from an "
                            "argument and is not allowed; write the width in the format string"
                        )
                    spec = ""
                elif ch == "}" and depth:
                    depth -= 1
                    fields += 1
                    numbers.extend(int(x) for x in _FORMAT_NUMBER.findall(spec.partition(":")[2]))
                elif depth:
                    spec += ch
        size = len(text.encode()) + sum(numbers) + _mul(fields, biggest)
        return _Size(min(_HUGE, size))

    def fold(self, name: str, sizes: list[_Size], times: int = 1) -> None:
        """Count the work of evaluating ``name`` on arguments of these sizes ``times`` times:
        what it reads of values built from the query's text, and for the string distances the
        cells of their matrix (both sides stored data: run time, under the interrupt)."""
        if self.probing:
            return
        work = sum(s.built for s in sizes)
        cells = _QUADRATIC.get(name)
        if cells is not None and len(sizes) >= 2:
            a, b = sizes[0], sizes[1]
            work += (_mul(a.total, b.total) - _mul(a.outside, b.outside)) // cells
        self.work = min(_HUGE, self.work + _mul(work, times))
        if self.work > MAX_FOLD_WORK:
            raise InvalidArgument(
                f"{_echo(name)}(): the query's constant expressions would take too long to evaluate "
                f"(more than {MAX_FOLD_WORK:,} elements or characters read): DuckDB evaluates them "
                "while planning, where the query timeout cannot stop it; use smaller constants or "
                "fewer expressions over them"
            )

    def charge(self, name: str, size: _Size) -> None:
        if self.probing:
            return
        self.check(name, size)
        self.total += size.built
        if self.total > MAX_BUILT_TOTAL_UNITS:
            raise InvalidArgument(
                f"the query's value builders (range, repeat, lpad, printf widths, …) would build "
                f"more than {MAX_BUILT_TOTAL_UNITS:,} elements or characters in all; DuckDB "
                "evaluates constant expressions while planning, outside the query's memory and "
                "time limits; build fewer or smaller values, or generate rows with FROM range(n)"
            )

    def check(self, name: str, size: _Size) -> None:
        if size.built > MAX_BUILT_UNITS and not self.probing:
            about = f"about {size.built:,}" if size.built < _HUGE else "an unbounded number of"
            raise InvalidArgument(
                f"{_echo(name)}() would build {about} elements or characters, more than the "
                f"{MAX_BUILT_UNITS:,} a query may build from constants: DuckDB evaluates constant "
                "expressions while planning, outside the query's memory and time limits; build a "
                "smaller value, or generate rows with FROM range(n)"
            )


def _arguments(e: dict[str, Any]) -> list[dict[str, Any]]:
    """A call's argument expressions (DuckDB 2.0 wraps each in ``{"name", "expression"}``)."""
    out: list[dict[str, Any]] = []
    for a in e.get("arguments") or e.get("children") or []:
        inner = a.get("expression") if isinstance(a, dict) and "class" not in a else a
        if isinstance(inner, dict):
            out.append(inner)
    return out


def _mul(a: int, b: int) -> int:
    return min(_HUGE, a * b)


def _scale(size: _Size, factor: int) -> _Size:
    return _Size(_mul(size.built, factor), _mul(size.outside, factor))


def _lambda_params(lam: dict[str, Any]) -> list[str]:
    lhs = lam.get("lhs")
    if not isinstance(lhs, dict):
        return []
    refs = [lhs] if lhs.get("class") == "COLUMN_REF" else _arguments(lhs)
    return [fold(str((r.get("column_names") or [""])[-1])) for r in refs if isinstance(r, dict)]


def _const_int(e: dict[str, Any]) -> int | None:
    """The integer value of a constant size argument, or None if the guard cannot evaluate it.

    Integer and decimal literals, strings cast to numbers, casts, unary minus, + - * / // %,
    abs, least and greatest — evaluated with Python's exact integers and clamped to ±10**30,
    so no input makes this slow or large."""
    value = _const_num(e, 0)
    if value is None:
        return None
    return int(max(Decimal(-_HUGE), min(Decimal(_HUGE), value)))


def _const_num(e: dict[str, Any], depth: int) -> Decimal | None:  # noqa: C901, PLR0911, PLR0912  a dispatch on the expression class
    if depth > 64 or not isinstance(e, dict):
        return None
    cls = e.get("class")
    if cls == "CONSTANT":
        literal = e.get("literal")
        if not isinstance(literal, dict):
            return None
        if literal.get("kind") == "NULL_LITERAL":
            return Decimal(0)
        return _decimal(str(literal.get("text", "")))
    if cls == "CAST":
        child = e.get("child")
        if isinstance(child, dict) and child.get("class") == "CONSTANT":
            literal = child.get("literal") or {}
            if literal.get("kind") == "STRING":
                return _decimal(str(literal.get("text", "")).strip())
        return _const_num(child, depth + 1) if isinstance(child, dict) else None
    if cls != "FUNCTION":
        return None
    name = fold(str(e.get("function_name", "")))
    raw = _arguments(e)
    args = [_const_num(a, depth + 1) for a in raw]
    if len(raw) != len(e.get("arguments") or []) or any(a is None for a in args):
        return None
    vals = [a for a in args if a is not None]
    huge = Decimal(_HUGE)
    try:
        if name in ("-", "subtract") and len(vals) == 1:
            return -vals[0]
        if name in ("+", "add") and len(vals) in (1, 2):
            return sum(vals, Decimal(0))
        if name in ("-", "subtract") and len(vals) == 2:
            return vals[0] - vals[1]
        if name in ("*", "multiply") and len(vals) == 2:
            return max(-huge, min(huge, vals[0] * vals[1]))
        if name in ("/", "divide", "//", "fdiv") and len(vals) == 2:
            return vals[0] / vals[1] if vals[1] else Decimal(0)
        if name in ("%", "mod") and len(vals) == 2:
            return vals[0] % vals[1] if vals[1] else Decimal(0)
        if name in ("**", "^", "pow", "power") and len(vals) == 2:
            base, exp = vals
            if abs(base) <= 1 or exp <= 0:
                return Decimal(1)
            return huge if exp > 100 else max(-huge, min(huge, base**exp))
        if name == "abs" and len(vals) == 1:
            return abs(vals[0])
        if name in ("trunc", "floor", "ceil", "ceiling", "round") and len(vals) == 1:
            # rounded away from zero: never below what DuckDB computes
            return vals[0].to_integral_value(rounding="ROUND_UP")
        if name == "least" and vals:
            return min(vals)
        if name == "greatest" and vals:
            return max(vals)
    except (ArithmeticError, ValueError):
        return None
    return None


#: Seconds in one unit of DuckDB's interval constructors, rounded *down* for calendar units
#: (a month is at least 28 days), so a step is never longer than the guard assumes.
_INTERVAL_SECONDS: Mapping[str, int] = {
    "to_microseconds": 0,
    "to_milliseconds": 0,
    "to_seconds": 1,
    "to_minutes": 60,
    "to_hours": 3_600,
    "to_days": 86_400,
    "to_weeks": 7 * 86_400,
    "to_months": 28 * 86_400,
    "to_quarters": 89 * 86_400,
    "to_years": 365 * 86_400,
    "to_decades": 3_652 * 86_400,
    "to_centuries": 36_524 * 86_400,
    "to_millennia": 365_242 * 86_400,
}
_INTERVAL_WORDS: Mapping[str, int] = {
    "second": 1,
    "sec": 1,
    "minute": 60,
    "min": 60,
    "hour": 3_600,
    "day": 86_400,
    "week": 7 * 86_400,
    "month": 28 * 86_400,
    "mon": 28 * 86_400,
    "year": 365 * 86_400,
}
_INSTANT_TYPES = frozenset(
    {
        "DATE",
        "TIMESTAMP",
        "DATETIME",
        "TIMESTAMPTZ",
        "TIMESTAMP WITH TIME ZONE",
        "TIMESTAMP_S",
        "TIMESTAMP_MS",
    }
)


def _temporal_count(args: list[dict[str, Any]]) -> int | None:
    """An upper bound on the length of ``range(start, stop, step)`` over DATE/TIMESTAMP
    literals with a constant, positive-length INTERVAL step; None if it cannot be evaluated."""
    if len(args) != 3:
        return None
    start, stop, step = _const_instant(args[0]), _const_instant(args[1]), _const_interval(args[2], 0)
    if start is None or stop is None or step is None or step[0] < 1:
        return None
    span = stop - start
    if span == 0:
        return 1
    if (span > 0) != step[1]:
        return 1
    return min(_HUGE, int(abs(span) // step[0]) + 1)


def _const_instant(e: dict[str, Any]) -> float | None:
    """Seconds since the epoch of a DATE or TIMESTAMP literal (``DATE '2024-01-01'``)."""
    if (
        e.get("class") != "CAST"
        or str((e.get("type_expr") or {}).get("type_name", "")).upper() not in _INSTANT_TYPES
    ):
        return None
    child = e.get("child") or {}
    literal = child.get("literal") if child.get("class") == "CONSTANT" else None
    if not isinstance(literal, dict) or literal.get("kind") != "STRING":
        return None
    try:
        moment = datetime.fromisoformat(str(literal.get("text", "")).strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _const_interval(e: dict[str, Any], depth: int) -> tuple[int, bool] | None:  # noqa: PLR0911  a dispatch on the expression class
    """(the fewest seconds a constant INTERVAL can last, whether it is positive), or None."""
    if depth > 16 or not isinstance(e, dict):
        return None
    if e.get("class") == "FUNCTION":
        name = fold(str(e.get("function_name", "")))
        args = _arguments(e)
        if name in _INTERVAL_SECONDS and len(args) == 1:
            n = _const_int(args[0])
            if n is None or n == 0:
                return None
            return abs(n) * _INTERVAL_SECONDS[name], n > 0
        return None
    if e.get("class") != "CAST" or str((e.get("type_expr") or {}).get("type_name", "")).upper() != "INTERVAL":
        return None
    child = e.get("child") or {}
    literal = child.get("literal") if child.get("class") == "CONSTANT" else None
    if not isinstance(literal, dict) or literal.get("kind") != "STRING":
        return None
    words = str(literal.get("text", "")).lower().split()
    if not words or len(words) % 2 or len(words) > 16:
        return None
    total = 0
    for count, unit in zip(words[::2], words[1::2], strict=True):
        seconds = _INTERVAL_WORDS.get(unit.removesuffix("s"))
        if seconds is None or not count.isdecimal():
            return None  # signs, fractions and clock forms: not evaluated, so refused
        total += int(count) * seconds
    return (total, True) if total > 0 else None


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text.replace("_", ""))
    except (ArithmeticError, ValueError):
        return None
    if not value.is_finite():
        return None
    return max(-Decimal(_HUGE), min(Decimal(_HUGE), value))
