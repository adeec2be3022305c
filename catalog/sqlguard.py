"""The SQL guard: layer 1 of DESIGN.md §4 — decide, before DuckDB runs anything, whether an
agent's SQL text is one read-only query that reads only tables the caller may read.

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
  * any parse-tree node the walker does not know: it fails closed.

CTE scoping mirrors DuckDB's binder, erring only towards refusal: a CTE name hides a table only
for unqualified references in the CTE's scope (later CTEs of the same WITH, the query body and
everything nested in it; a recursive CTE's own name only inside its recursive term). A bare
name treated as a table where DuckDB would have used the CTE can only cause a refusal, never a
read, because every CTE body is checked on its own anyway.

Identifiers compare as DuckDB compares them: case-insensitively for ASCII letters only
(``"SECRET"."Salaries"`` is ``secret.salaries``; ``"Ü"`` is not ``"ü"``).

The second layer — DuckDB's lockdown at open (no files, no network, no extension loading,
configuration locked; catalog/database.py) — stands under this one on its own.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import duckdb

from catalog.database import SYSTEM_SCHEMA
from catalog.errors import InvalidArgument, PermissionDenied
from catalog.identity import Principal
from catalog.policy import NOT_READABLE, Policy
from catalog.tables import TableCatalog, TableRef

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

_HINT_LIMIT = 50
_TOO_DEEP = (
    "the query is nested too deeply to be checked (more than about 150 levels of nested "
    "expressions or subqueries); simplify it, e.g. list_sum([...]) or concat(...) instead of "
    "long chains of + or ||"
)
_PARSE_CACHE_ENTRIES = 512
_PARSE_CACHE_MAX_CHARS = 8_000

QuiverRefusal = InvalidArgument | PermissionDenied


def _fold(name: str) -> str:
    """DuckDB's identifier comparison: ASCII letters fold, nothing else does."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


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
    return f"{head} ({where})" if where else head


@dataclass(frozen=True, slots=True)
class _Parsed:
    text: str
    tree: dict[str, Any]
    normalized: str


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

    @property
    def fingerprint(self) -> str:
        """A short stable digest of :attr:`normalized`."""
        return hashlib.sha256(self.normalized.encode()).hexdigest()


class SqlGuard:
    """Checks agent SQL against the caller's allowlist before anything runs.

    Parsing uses a private in-memory DuckDB (one cursor per thread), so checks never touch
    the data file and run concurrently. Parses are cached by SQL text (they do not depend on
    the caller); the lists of data tables and stored functions are cached briefly (see
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
        self._refs_cache: tuple[float, dict[tuple[str, str], TableRef | None]] | None = None
        self._policy = policy
        self._catalog = _fold(catalog_name)
        self._max_sql_chars = max_sql_chars
        self._parser = duckdb.connect(":memory:")
        self._local = threading.local()
        rows = self._parser.execute(
            "SELECT function_name, function_type, schema_name FROM duckdb_functions()"
        ).fetchall()
        kinds: dict[str, set[str]] = {}
        pg_catalog: set[str] = set()
        for name, kind, schema in rows:
            kinds.setdefault(_fold(name), set()).add(kind)
            if schema == "pg_catalog":
                pg_catalog.add(_fold(name))
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

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._parser.cursor()
            self._local.cursor = cur
        return cur

    # --- the check ------------------------------------------------------------------------
    def check(self, principal: Principal, sql: str) -> GuardedQuery:
        """Accept ``sql`` for ``principal`` or raise InvalidArgument / PermissionDenied with a
        sentence that names what is wrong and what is allowed."""
        parsed = self._parse(sql)
        walk = _Walk(self, principal)
        try:
            walk.statement(parsed.tree)
        except RecursionError:
            raise InvalidArgument(_TOO_DEEP) from None
        tables = tuple(sorted(walk.tables.values(), key=lambda r: r.key()))
        return GuardedQuery(
            sql=parsed.text, tables=tables, normalized=parsed.normalized, param_count=walk.param_count()
        )

    def invalidate_tables(self) -> None:
        """Forget the cached lists of data tables and stored functions (call after creating
        or dropping tables or macros)."""
        with self._lock:
            self._refs_cache = None
            self._functions_cache = None

    def _parse(self, sql: str) -> _Parsed:
        """The one SELECT-class statement in ``sql`` and its parse tree; cached by text, since
        parsing does not depend on who asks."""
        if not isinstance(sql, str):
            raise InvalidArgument("sql must be a string holding one SELECT query")
        with self._lock:
            hit = self._parsed.get(sql)
            if hit is not None:
                self._parsed.move_to_end(sql)
                return hit
        parsed = self._parse_uncached(sql)
        if len(sql) <= _PARSE_CACHE_MAX_CHARS:
            with self._lock:
                self._parsed[sql] = parsed
                while len(self._parsed) > _PARSE_CACHE_ENTRIES:
                    self._parsed.popitem(last=False)
        return parsed

    def _parse_uncached(self, sql: str) -> _Parsed:
        if len(sql) > self._max_sql_chars:
            raise InvalidArgument(
                f"the query is {len(sql)} characters long; at most {self._max_sql_chars} are accepted"
            )
        if "\x00" in sql:
            raise InvalidArgument("the query contains a NUL character; send plain SQL text")
        cur = self._cursor()
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
        text = stmt.query.strip()
        while text.endswith(";"):
            text = text[:-1].rstrip()
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
            key = (_fold(ref.schema), _fold(ref.name))
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
        names = frozenset(_fold(str(r[0])) for r in rows)
        with self._lock:
            self._functions_cache = (now + self._function_cache_seconds, names)
        return names

    def _function_refusal(self, name: str, *, in_from: bool) -> QuiverRefusal | None:
        folded = _fold(name)
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
        names = sorted(readable)
        hint = ", ".join(names[:_HINT_LIMIT]) if names else "none"
        if len(names) > _HINT_LIMIT:
            hint += f", … ({len(names) - _HINT_LIMIT} more; see ListFlights)"
        last = display.rsplit(".", 1)[-1]
        files = (
            "; files and URLs cannot be read (FROM 'path' and read_*() are refused)"
            if any(c in last for c in "/\\:") or _fold(last).endswith(_FILE_SUFFIXES)
            else ""
        )
        return PermissionDenied(f"{display}: {NOT_READABLE}{files}; you may read: {hint}")


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
        self.params: set[int] = set()
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
            name = _fold(str(entry.get("key", "")))
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
        if _fold(str(node.get("cte_name", ""))) != name:
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
                f"table reference {'.'.join(map(str, path))} cannot be checked; name it as schema.table"
            )
        self.children(
            ref,
            scope,
            skip=frozenset({"catalog_name", "schema_name", "table_name", "qualified_name"}),
        )
        if not catalog and not schema and _fold(table) in scope:
            return  # a CTE in scope; its body was checked where it is defined
        display = ".".join(parts)
        found = self.resolve(catalog, schema, table)
        if found is None or not self.guard._policy.can_read(self.principal, found):
            raise self.guard._not_readable(display, self.readable())
        self.tables[found.key()] = found

    def resolve(self, catalog: str, schema: str, table: str) -> TableRef | None:
        """The data table DuckDB would read for this name, or None if it is not one."""
        refs = self.refs()
        s, t = _fold(schema), _fold(table)
        if catalog:
            if _fold(catalog) != self.guard._catalog or s in _NEVER_DATA_SCHEMAS:
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
                f"table function {name}() must not be qualified with a schema or catalog: "
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
        if cls == "COLUMN_REF":
            names = expr.get("column_names") or []
            if len(names) == 1 and _fold(str(names[0])) in _KEYWORD_FUNCTIONS:
                bare = str(names[0])
                raise PermissionDenied(
                    f"{bare}: written bare, this keyword calls {_fold(bare)}(), which is not allowed "
                    f"({DENIED_FUNCTIONS[_fold(bare)]}); for a column of that name, qualify it "
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
                f"named parameter ${identifier} is not supported: use positional parameters "
                "(? or $1, $2, …) and pass their values as a list"
            )
        self.params.add(int(identifier))
