"""Row and column rules of allowlist entries, and the attributes their row filters bind
(proto_docs/governance.md).

An allowlist entry is a pattern (``"sales.orders"``, ``"sales.*"``) or a :class:`TableRule`
for one table: which columns exist for the swarm (``columns`` *or* ``except_columns``), which
rows (``row_filter``, a SQL predicate over the table's own columns and the parameters
``$swarm``, ``$agent`` and ``$<attribute>``) and how columns are masked before anything else
sees them (``mask``). The data plane reads a ruled table through the *view* the rule defines
for the calling principal (:meth:`catalog.policy.Policy.rule_for`, :func:`bindings`), on every
path; what is not in the view does not exist for the caller.

This module holds the shapes every layer shares. A rule is validated once, when the allowlist
is saved (control plane, 422 on any fault); what is held here has passed that check, so the
data plane never re-validates it on the hot path.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import duckdb
import msgspec

from catalog.errors import InvalidArgument, Unprocessable, bounded
from catalog.tables import TableCatalog, TableRef, fold

MaskKind = Literal["hash", "null", "redact", "last4"]
MASK_KINDS: tuple[str, ...] = ("hash", "null", "redact", "last4")

#: What an attribute value may be: flat scalars only (a row filter compares columns with them).
AttributeValue = str | int | float
Attributes = Mapping[str, AttributeValue]

#: Parameter names every principal binds, whatever its attributes: its swarm and agent name.
BUILTIN_PARAMETERS: tuple[str, ...] = ("swarm", "agent")


class TableRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One table's rules for one swarm, as validated and stored.

    ``table`` is the folded ``schema.table``; column names are as the table spells them;
    ``row_filter`` is the canonical predicate text, parameters spelled ``$name``;
    ``parameters`` the names it uses (folded), for binding and for the admin view."""

    table: str
    columns: tuple[str, ...] | None = None
    except_columns: tuple[str, ...] | None = None
    row_filter: str | None = None
    parameters: tuple[str, ...] = ()
    mask: tuple[tuple[str, MaskKind], ...] = ()

    @property
    def is_plain(self) -> bool:
        """True when the rule restricts nothing (the entry behaves as a plain string)."""
        return (
            self.columns is None and self.except_columns is None and self.row_filter is None and not self.mask
        )


def bindings(
    swarm: str | None, agent: str | None, swarm_attributes: Attributes, agent_attributes: Attributes
) -> dict[str, AttributeValue | None]:
    """The values a row filter's parameters take for one principal: its swarm's attributes,
    overridden by the agent's own (given when its token was minted), then ``swarm`` and
    ``agent`` themselves, which no attribute can override. Names are folded as DuckDB folds
    identifiers. A parameter absent from the result binds NULL: the comparison is unknown and
    no row passes, so a missing attribute never widens what a principal sees."""
    out: dict[str, AttributeValue | None] = {}
    for source in (swarm_attributes, agent_attributes):
        for name, value in source.items():
            out[fold(name)] = value
    out["swarm"] = swarm
    out["agent"] = agent
    return out


# --- validation (the control plane's side: an allowlist PUT, a swarm's or a token's attributes) ---
#
# Everything below runs when an admin saves something, never on the data plane's hot path. Every
# refusal is :class:`~catalog.errors.Unprocessable` (HTTP 422) with one bounded sentence naming
# the problem; nothing is saved (proto_docs/governance.md, "Rules and attributes").

#: Attribute names: identifiers of at most this many characters; at most this many per object.
MAX_ATTRIBUTE_NAME = 64
MAX_ATTRIBUTES = 64
#: The longest string an attribute may hold.
MAX_ATTRIBUTE_CHARS = 1_000
#: The most a token's attributes may take as JSON: a token must stay within the 4,096
#: characters a listener accepts (catalog/tokens.py), signature and claims included.
MAX_TOKEN_ATTRIBUTE_BYTES = 2_048
#: The longest row filter (characters).
MAX_ROW_FILTER_CHARS = 4_000

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

#: Scalar functions a row filter may call: deterministic, reading nothing but their arguments,
#: each result at most about the size of its arguments (proto_docs/governance.md lists them).
#: Operators (``+``, ``||``, LIKE as ``~~`` …) are functions in DuckDB's parse.
SAFE_FUNCTIONS: frozenset[str] = frozenset(
    {
        # operators
        "+", "-", "*", "/", "//", "%", "||",
        "~~", "!~~", "~~*", "!~~*", "~~~", "!~~~",  # [NOT] LIKE, [NOT] ILIKE, [NOT] GLOB
        # text
        "lower", "upper", "lcase", "ucase", "trim", "ltrim", "rtrim", "length", "strlen",
        "char_length", "substring", "substr", "left", "right", "starts_with", "ends_with",
        "prefix", "suffix", "contains", "concat",
        # numbers
        "abs", "round", "floor", "ceil", "ceiling", "sign",
        # either
        "least", "greatest", "nullif", "ifnull",
        # dates and times
        "date_trunc", "date_part", "datepart", "year", "month", "day", "hour", "minute", "quarter",
        # lists (a tags column)
        "list_contains", "array_contains", "list_has",
    }
)  # fmt: skip

#: Types a CAST in a row filter may name (DuckDB's built-in scalar types).
SAFE_CAST_TYPES: frozenset[str] = frozenset(
    {
        "BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
        "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL", "VARCHAR", "DATE", "TIME",
        "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ", "UUID",
    }
)  # fmt: skip

_OPERATORS: dict[str, int | None] = {
    # operator node type -> how many children it takes (None: any)
    "OPERATOR_NOT": 1,
    "OPERATOR_IS_NULL": 1,
    "OPERATOR_IS_NOT_NULL": 1,
    "COMPARE_IN": None,
    "COMPARE_NOT_IN": None,
    "OPERATOR_COALESCE": None,
}

#: The statement a predicate is parsed in; everything of its parse but the WHERE clause must
#: equal this template's, so nothing can ride along (ORDER BY, LIMIT, UNION, a CTE …).
_RULE_TABLE = "__quiver_rule"
_ENTRY_SHAPE = '{"table", "columns" | "except_columns", "row_filter", "mask"}'


class RuleEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """An allowlist entry that is an object, as an admin writes it — and as the admin view
    (``GET /v1/swarms/{name}``) shows a stored rule: the table folded, columns as the table
    spells them, ``row_filter`` in its canonical spelling (parameters as ``$name``, which a
    PUT accepts as well as ``:name``)."""

    table: str
    columns: list[str] | None = None
    except_columns: list[str] | None = None
    row_filter: str | None = None
    mask: dict[str, MaskKind] | None = None


class Entries(msgspec.Struct, frozen=True, kw_only=True):
    """A validated allowlist: its patterns (sorted, de-duplicated; a ruled entry's is its
    ``schema.table``) and the rules of its ruled entries."""

    patterns: tuple[str, ...]
    rules: tuple[TableRule, ...]


def entry_view(pattern: str, rule: TableRule | None) -> str | RuleEntry:
    """How the admin view shows one stored entry: its pattern, or its rule as an object."""
    if rule is None or rule.is_plain:
        return pattern
    return RuleEntry(
        table=rule.table,
        columns=list(rule.columns) if rule.columns is not None else None,
        except_columns=list(rule.except_columns) if rule.except_columns is not None else None,
        row_filter=rule.row_filter,
        mask=dict(rule.mask) if rule.mask else None,
    )


def _refuse(detail: str) -> Unprocessable:
    return Unprocessable(detail)


def check_attributes(raw: object, *, what: str = "attributes") -> dict[str, AttributeValue]:
    """A flat object of strings and finite numbers under identifier names, or a 422 naming
    the first problem. ``swarm`` and ``agent`` are reserved (every principal binds them), and
    two names that differ only in case would bind the same parameter."""
    if not isinstance(raw, dict):
        raise _refuse(
            f"{what} must be a JSON object of names to strings or numbers, got {type(raw).__name__}"
        )
    if len(raw) > MAX_ATTRIBUTES:
        raise _refuse(f"{what} may hold at most {MAX_ATTRIBUTES} names, got {len(raw)}")
    out: dict[str, AttributeValue] = {}
    seen: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or len(name) > MAX_ATTRIBUTE_NAME or not _IDENTIFIER.match(name):
            raise _refuse(
                f"{what}: name {bounded(name, 70)!r} is not an identifier (letters, digits and _, "
                f"not starting with a digit, at most {MAX_ATTRIBUTE_NAME} characters)"
            )
        folded = fold(name)
        if folded in BUILTIN_PARAMETERS:
            raise _refuse(f"{what}: {name!r} is reserved (every principal binds :swarm and :agent itself)")
        if folded in seen:
            raise _refuse(
                f"{what}: {seen[folded]!r} and {name!r} differ only in case; a row filter sees one name"
            )
        seen[folded] = name
        out[name] = _attribute_value(what, name, value)
    return out


def _attribute_value(what: str, name: str, value: object) -> AttributeValue:
    if isinstance(value, bool) or value is None:
        raise _refuse(f"{what}: {name!r} is {json_name(value)}; values are strings or numbers")
    if isinstance(value, str):
        if len(value) > MAX_ATTRIBUTE_CHARS:
            raise _refuse(f"{what}: {name!r} has {len(value):,} characters; at most {MAX_ATTRIBUTE_CHARS:,}")
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise _refuse(f"{what}: {name!r} is out of range (a 64-bit integer at most)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _refuse(f"{what}: {name!r} is not a finite number")
        return value
    raise _refuse(f"{what}: {name!r} is {json_name(value)}; values are strings or numbers, not nested")


def json_name(value: object) -> str:
    """What a decoded JSON value is, in JSON's words (for a refusal)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def check_token_attributes(raw: object) -> tuple[tuple[str, AttributeValue], ...]:
    """An agent token's attributes (:func:`check_attributes`, and small enough for the token),
    as :attr:`catalog.identity.Principal.attributes` holds them: sorted pairs."""
    attributes = check_attributes(raw)
    size = len(msgspec.json.encode(attributes))
    if size > MAX_TOKEN_ATTRIBUTE_BYTES:
        raise _refuse(
            f"attributes take {size:,} bytes as JSON; a token carries at most {MAX_TOKEN_ATTRIBUTE_BYTES:,} "
            "(set large or shared values on the swarm: PUT /v1/swarms/{name}/attributes)"
        )
    return tuple(sorted(attributes.items()))


class EntryChecker:
    """Validates an allowlist's entries against the tables as they are now (the real columns,
    DuckDB's own parse and binder). Reads the database; writes nothing."""

    def __init__(self, tables: TableCatalog) -> None:
        self._tables = tables

    def check(self, raw: Sequence[object]) -> Entries:
        """The validated entries, or a 422 naming the first bad rule (entries count from 1); a
        malformed pattern string is a 400, as it always was."""
        from catalog.policy import MAX_PATTERNS, parse_pattern  # catalog.policy imports this module

        plain: set[str] = set()
        rules: dict[str, TableRule] = {}
        refs: dict[tuple[str, str], TableRef] | None = None  # listed once, at the first rule
        for i, item in enumerate(raw, 1):
            if isinstance(item, str):
                # A bad pattern is the 400 it always was (catalog.policy.parse_pattern).
                plain.add(".".join(parse_pattern(item)))
                continue
            if refs is None:
                refs = {r.key(): r for r in self._tables.list_refs()}
            rule = self._rule(i, item, parse_pattern, refs)
            if rule.table in rules:
                raise _refuse(f"allowlist entry {i}: {rule.table} has a rule already; give each table once")
            rules[rule.table] = rule
        both = sorted(plain & set(rules))
        if both:
            raise _refuse(f"{both[0]} is listed both as a string and with a rule; give each table once")
        patterns = tuple(sorted(plain | set(rules)))
        if len(patterns) > MAX_PATTERNS:
            raise InvalidArgument(f"an allowlist holds at most {MAX_PATTERNS} entries, got {len(patterns)}")
        return Entries(patterns=patterns, rules=tuple(rules[t] for t in sorted(rules)))

    def _rule(
        self,
        i: int,
        item: object,
        parse_pattern: Callable[[str], tuple[str, str]],
        refs: dict[tuple[str, str], TableRef],
    ) -> TableRule:
        where = f"allowlist entry {i}"
        if not isinstance(item, dict):
            raise _refuse(f"{where} is {json_name(item)}; an entry is a string or an object {_ENTRY_SHAPE}")
        try:
            entry = msgspec.convert(item, RuleEntry, strict=True)
        except msgspec.ValidationError as e:
            raise _refuse(f"{where}: {bounded(str(e), 200)}; an object entry is {_ENTRY_SHAPE}") from None
        try:
            schema, table = parse_pattern(entry.table)
        except InvalidArgument as e:
            raise _refuse(f"{where}: {bounded(e.detail, 300)}") from None
        if table == "*":
            raise _refuse(
                f"{where}: a rule needs one table, not the pattern {bounded(entry.table)!r}: rules are "
                "checked against a table's columns (list the pattern as a string, each ruled table as an object)"
            )
        ref = refs.get((schema, table))  # parse_pattern folded both, as TableRef.key does
        if ref is None:
            raise _refuse(
                f"{where}: table {schema}.{table} does not exist, and a rule is checked against its "
                "columns (list it as a plain string to pre-provision it)"
            )
        return _TableCheck(self._tables, ref, where).rule(entry)


class _TableCheck:
    """One ruled entry checked against its table's real columns."""

    def __init__(self, tables: TableCatalog, ref: TableRef, where: str) -> None:
        self._tables = tables
        self.ref = ref
        self.where = where
        self.name = f"{fold(ref.schema)}.{fold(ref.name)}"
        self.live = tables.live if tables.is_live(ref) else None
        if self.live is not None:
            # A live table is not in the data file: its columns are Snowflake's, as every
            # read of it sees them (catalog/live.py; Unavailable while Snowflake cannot say).
            self.order = [c.name for c in self.live.describe(ref).columns]
        else:
            with tables.db.reading() as cur:
                rows = cur.execute(
                    "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
                    "AND schema_name = ? AND table_name = ? ORDER BY column_index",
                    [ref.schema, ref.name],
                ).fetchall()
            self.order = [r[0] for r in rows]
        self.columns = {fold(c): c for c in self.order}

    def _known(self, field: str, names: list[str]) -> list[str]:
        spelled: list[str] = []
        for name in names:
            column = self.columns.get(fold(name)) if isinstance(name, str) else None
            if column is None:
                raise _refuse(
                    f"{self.where}: {field} names {bounded(name, 60)!r}, which is not a column of "
                    f"{self.ref.qualified} (its columns: {bounded(', '.join(self.order), 200)})"
                )
            if column in spelled:
                raise _refuse(f"{self.where}: {field} names {column!r} twice")
            spelled.append(column)
        return sorted(spelled, key=self.order.index)

    def rule(self, entry: RuleEntry) -> TableRule:
        if entry.columns is not None and entry.except_columns is not None:
            raise _refuse(f"{self.where}: give columns or except_columns, not both")
        visible = list(self.order)
        columns = except_columns = None
        if entry.columns is not None:
            columns = tuple(self._known("columns", entry.columns))
            if not columns:
                raise _refuse(f"{self.where}: columns is empty; a rule must leave at least one column")
            visible = list(columns)
        if entry.except_columns is not None:
            except_columns = tuple(self._known("except_columns", entry.except_columns))
            visible = [c for c in self.order if c not in except_columns]
            if not visible:
                raise _refuse(f"{self.where}: except_columns excludes every column of {self.ref.qualified}")
        mask: list[tuple[str, MaskKind]] = []
        for name, kind in (entry.mask or {}).items():
            (column,) = self._known("mask", [name])
            if column not in visible:
                raise _refuse(f"{self.where}: mask names {column!r}, which the rule's columns leave out")
            mask.append((column, kind))
        mask.sort(key=lambda pair: self.order.index(pair[0]))
        row_filter: str | None = None
        parameters: tuple[str, ...] = ()
        if entry.row_filter is not None:
            row_filter, parameters = self._row_filter(entry.row_filter)
        if self.live is not None:
            self._pushable(row_filter, mask)
        return TableRule(
            table=self.name,
            columns=columns,
            except_columns=except_columns,
            row_filter=row_filter,
            parameters=parameters,
            mask=tuple(mask),
        )

    def _row_filter(self, text: str) -> tuple[str, tuple[str, ...]]:
        where = f"{self.where}: row_filter"
        text = text.strip(" \t\n\r\f\v")
        if not text:
            raise _refuse(f"{where} is empty; leave it out to keep every row")
        if len(text) > MAX_ROW_FILTER_CHARS:
            raise _refuse(f"{where} has {len(text):,} characters; at most {MAX_ROW_FILTER_CHARS:,}")
        canonical, rewritten = _canonical_parameters(text, where)
        with self._tables.db.reading() as cur:
            tree = _parse_predicate(cur, canonical, where)
            canonical = _check_parameter_spans(tree, canonical, rewritten, where)
            names = _PredicateWalk(cur, where, self.columns).walk(tree)
            parameters = tuple(sorted(set(names)))
            if self.live is None:
                _bind(cur, self.ref, canonical, parameters, where)
        if self.live is not None:
            # Bound against the live table's empty stand-in (no rows, nothing sent to Snowflake).
            with self.live.binder() as binder:
                _bind(binder, self.ref, canonical, parameters, where)
        return canonical, parameters

    def _pushable(self, row_filter: str | None, mask: list[tuple[str, MaskKind]]) -> None:
        """A live table's view is pushed down to Snowflake whole (proto_docs/federation.md,
        "Rules on live tables"): a filter or mask sqlglot cannot translate faithfully would
        make every read of the table fail, so it is refused now, naming the construct."""
        from catalog.live_sql import check_pushable  # catalog.live_sql imports the live catalog
        from catalog.views import mask_expression

        assert self.live is not None
        desc = self.live.describe(self.ref)
        types = {fold(c.name): c.duckdb_type for c in desc.columns}
        # Any key translates as the real one does (a string literal): this only checks sqlglot.
        projection = [mask_expression(c, kind, types.get(fold(c)), "0" * 64) for c, kind in mask] or ["1"]
        try:
            check_pushable(projection, row_filter, desc)
        except InvalidArgument as e:
            raise _refuse(
                f"{self.where}: {self.ref.qualified} is a live table, whose rules are applied in "
                f"Snowflake, and its rule cannot be translated: {bounded(e.detail, 300)}"
            ) from None


def _canonical_parameters(text: str, where: str) -> tuple[str, set[int]]:
    """``text`` with each ``:name`` rewritten ``$name`` (DuckDB's spelling of a named
    parameter), found with DuckDB's own tokenizer — a ``:`` inside a string literal or a
    quoted identifier is no parameter — and the offsets rewritten. Comments are refused here:
    the tokenizer is what sees them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(f"{where} is not valid text (a lone surrogate)") from None
    try:
        tokens = duckdb.tokenize(text)
    except duckdb.Error as e:
        raise _refuse(f"{where} is not valid SQL: {bounded(str(e), 200)}") from None
    rewritten: set[int] = set()
    out = list(text)
    for n, (offset, kind) in enumerate(tokens):
        if kind == duckdb.token_type.comment:
            raise _refuse(f"{where} holds a comment; comments are not allowed in a row filter")
        if kind != duckdb.token_type.operator or text[offset] != ":":
            continue
        if n + 1 == len(tokens):
            continue  # a ':' at the very end: the parser refuses it
        end, following = tokens[n + 1]
        if end != offset + 1:
            continue  # '::' (a cast), or ':' followed by a space
        if following not in (duckdb.token_type.identifier, duckdb.token_type.keyword):
            continue
        out[offset] = "$"
        rewritten.add(offset)
    return "".join(out), rewritten


def _parse_predicate(cur: duckdb.DuckDBPyConnection, predicate: str, where: str) -> dict[str, Any]:
    """DuckDB's parse of ``predicate`` as the WHERE clause of a one-table SELECT; refused
    unless it is exactly one statement whose every part but that clause is the template's."""
    prefix = f"SELECT 1 FROM {_RULE_TABLE} WHERE "
    try:
        parsed: dict[str, Any] = json.loads(_serialized(cur, prefix + predicate))
    except RecursionError:
        raise _refuse(f"{where} is nested too deeply") from None
    except duckdb.Error as e:
        raise _refuse(f"{where} is not valid SQL: {bounded(str(e), 200)}") from None
    if parsed.get("error"):
        message = str(parsed.get("error_message", "syntax error"))
        raise _refuse(f"{where} is not a valid SQL predicate: {bounded(message, 200)}")
    statements = parsed.get("statements") or []
    if len(statements) != 1:
        raise _refuse(f"{where} holds several statements; it must be one condition")
    node = statements[0].get("node") or {}
    clause = node.get("where_clause")
    if not isinstance(clause, dict) or _without(node, "where_clause") != _template(cur):
        raise _refuse(
            f"{where} must be one condition on the table's rows (no ORDER BY, LIMIT, GROUP BY, "
            "UNION or other clauses around it)"
        )
    return clause


_TEMPLATE: list[Any] = []  # the template's parse, without its WHERE clause (computed once)


def _template(cur: duckdb.DuckDBPyConnection) -> Any:
    if not _TEMPLATE:
        parsed = json.loads(_serialized(cur, f"SELECT 1 FROM {_RULE_TABLE} WHERE TRUE"))
        _TEMPLATE.append(_without(parsed["statements"][0]["node"], "where_clause"))
    return _TEMPLATE[0]


def _serialized(cur: duckdb.DuckDBPyConnection, sql: str) -> str:
    row = cur.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()
    assert row is not None  # a scalar function answers one row
    return str(row[0])


def _without(node: dict[str, Any], key: str) -> Any:
    return _strip_locations({k: v for k, v in node.items() if k != key})


def _strip_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_locations(v)
            for k, v in value.items()
            if k not in ("query_location", "query_location_length")
        }
    if isinstance(value, list):
        return [_strip_locations(v) for v in value]
    return value


class _PredicateWalk:
    """Walks a predicate's parse tree (iteratively: no recursion to exhaust) and refuses any
    node outside the documented subset; returns the parameter names used (folded)."""

    def __init__(self, cur: duckdb.DuckDBPyConnection, where: str, columns: dict[str, str]) -> None:
        self.cur = cur
        self.where = where
        self.columns = columns

    def walk(self, root: dict[str, Any]) -> list[str]:
        names: list[str] = []
        stack: list[Any] = [root]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict):
                raise _refuse(f"{self.where}: an unexpected part of the parse; write a plainer condition")
            names.extend(self.node(node, stack))
        return names

    def node(self, e: dict[str, Any], stack: list[Any]) -> list[str]:  # noqa: C901, PLR0912  a dispatch on the node class
        cls = e.get("class")
        if cls == "COLUMN_REF":
            self.column(e.get("column_names") or [])
            return []
        if cls == "CONSTANT":
            return []
        if cls == "PARAMETER":
            return [self.parameter(str(e.get("identifier", "")))]
        if cls == "COMPARISON":
            stack += [e.get("left"), e.get("right")]
        elif cls == "CONJUNCTION":
            stack += list(e.get("children") or [])
        elif cls == "OPERATOR":
            kind = e.get("type")
            if kind not in _OPERATORS:
                raise _refuse(
                    f"{self.where}: the operator {bounded(str(kind), 40)} is not allowed in a row filter"
                )
            stack += list(e.get("children") or [])
        elif cls == "BETWEEN":
            stack += [e.get("input"), e.get("lower"), e.get("upper")]
        elif cls == "CASE":
            for check in e.get("case_checks") or []:
                stack += [check.get("when_expr"), check.get("then_expr")]
            stack.append(e.get("else_expr"))
        elif cls == "CAST":
            self.cast_type(e.get("type_expr") or {})
            stack.append(e.get("child"))
        elif cls == "FUNCTION":
            self.function(e)
            stack += [a.get("expression") if isinstance(a, dict) else a for a in e.get("arguments") or []]
        elif cls == "SUBQUERY":
            raise _refuse(f"{self.where}: subqueries are not allowed; a row filter reads only its own row")
        elif cls == "WINDOW":
            raise _refuse(
                f"{self.where}: window functions are not allowed; a row filter decides each row alone"
            )
        elif cls in ("STAR", "COLUMNS"):
            raise _refuse(f"{self.where}: * and COLUMNS(…) are not allowed; name the columns")
        else:
            raise _refuse(
                f"{self.where}: {bounded(str(cls), 40)} expressions are not allowed in a row filter"
            )
        return []

    def column(self, parts: list[str]) -> None:
        if len(parts) != 1:
            shown = bounded(".".join(str(p) for p in parts), 80)
            raise _refuse(
                f"{self.where}: {shown!r} names another table or a field; a row filter reads its own "
                "table's columns, each by its name alone"
            )
        if fold(str(parts[0])) not in self.columns:
            raise _refuse(
                f"{self.where}: {bounded(str(parts[0]), 60)!r} is not a column of the table "
                f"(its columns: {bounded(', '.join(self.columns.values()), 200)})"
            )

    def parameter(self, identifier: str) -> str:
        if not _IDENTIFIER.match(identifier):
            raise _refuse(
                f"{self.where}: positional parameters (?, $1) are not allowed; name them "
                ":swarm, :agent or :<attribute>"
            )
        return fold(identifier)

    def cast_type(self, t: dict[str, Any]) -> None:
        name = str(t.get("type_name", "")).upper()
        if t.get("class") != "TYPE" or t.get("catalog") or t.get("schema") or name not in SAFE_CAST_TYPES:
            raise _refuse(
                f"{self.where}: a cast to {bounded(name or 'that type', 40)} is not allowed in a row filter"
            )
        for child in t.get("children") or []:
            if not isinstance(child, dict) or child.get("class") != "CONSTANT":
                raise _refuse(f"{self.where}: a type's arguments must be constants")

    def function(self, e: dict[str, Any]) -> None:
        name = str(e.get("function_name", ""))
        if e.get("schema") or e.get("catalog"):
            raise _refuse(
                f"{self.where}: functions are called by their name alone, not {bounded(name, 40)} of a schema"
            )
        if name in SAFE_FUNCTIONS and not (
            e.get("filter")
            or e.get("distinct")
            or e.get("export_state")
            or (e.get("order_bys") or {}).get("orders")
        ):
            return
        row = self.cur.execute(
            "SELECT function_type FROM duckdb_functions() WHERE function_name = ? LIMIT 1", [fold(name)]
        ).fetchone()
        if (row is not None and row[0] == "aggregate") or name == "count_star":
            raise _refuse(
                f"{self.where}: aggregate functions such as {bounded(name, 40)}() are not allowed; a row filter decides each row alone"
            )
        raise _refuse(
            f"{self.where}: the function {bounded(name, 40)}() is not allowed in a row filter "
            "(proto_docs/governance.md lists the ones that are)"
        )


def _check_parameter_spans(tree: dict[str, Any], canonical: str, rewritten: set[int], where: str) -> str:
    """Every ``:name`` rewritten must have become a parameter where it stood: a ``:`` glued to
    a name before it (``a:b``) would merge into one identifier instead. Returns the text with
    every parameter's name folded (``$Country`` → ``$country``, the same length: DuckDB's
    spans stay valid), so the stored text names each parameter exactly as ``parameters`` does."""
    prefix = len(f"SELECT 1 FROM {_RULE_TABLE} WHERE ")
    out = list(canonical)
    found: set[int] = set()
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class") == "PARAMETER" and _IDENTIFIER.match(str(node.get("identifier", ""))):
                start = int(node.get("query_location", -1)) - prefix
                spelled = canonical[start : start + int(node.get("query_location_length", 0))]
                if spelled != "$" + str(node.get("identifier", "")):
                    # '$"x"', '$1', '?': the data plane finds parameters spelled $name only.
                    raise _refuse(
                        f"{where}: write each parameter as :name (a bare name), not {bounded(spelled, 40)!r}"
                    )
                found.add(start)
                out[start + 1 : start + len(spelled)] = fold(spelled[1:])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    if not rewritten <= found:
        raise _refuse(f"{where}: a ':' is glued to the name before it; put a space before each :parameter")
    return "".join(out)


def _bind(
    cur: duckdb.DuckDBPyConnection, ref: TableRef, predicate: str, parameters: tuple[str, ...], where: str
) -> None:
    """Bind the predicate against the table itself (no rows read: LIMIT 0), every parameter
    NULL: unknown functions, wrong argument types and a result that is not a condition are
    refused now rather than failing every agent's read later."""
    try:
        result = cur.execute(
            f"SELECT ({predicate}) AS keep FROM {ref.sql} LIMIT 0", {p: None for p in parameters}
        )
        kind = str(result.description[0][1]) if result.description else "?"
    except duckdb.Error as e:
        message = str(e).split("\n", 1)[0]
        raise _refuse(f"{where} does not bind against {ref.qualified}: {bounded(message, 200)}") from None
    if kind != "BOOLEAN":
        raise _refuse(f"{where} must be a condition (BOOLEAN), not {bounded(kind, 40)}")
