"""Guarded DuckDB SQL → Snowflake SQL for live tables (catalog/live.py,
proto_docs/federation.md "What is pushed down").

The guard has accepted the text before this runs; this only rewrites it:

* every reference to a live table becomes its Snowflake source (``"DB"."SCHEMA"."TABLE"``),
  aliased to the name the query used, so ``orders.amount`` still resolves;
* every column name of a live table becomes its stored Snowflake spelling, quoted (Snowflake
  folds unquoted names to upper case, DuckDB matches any case);
* the row cap is pushed down as ``LIMIT`` (the smaller of the query's own literal LIMIT and
  the cap);
* the tree is written with ``unsupported_level=RAISE``: what sqlglot cannot express in
  Snowflake is refused, naming the construct. Functions sqlglot does not know are passed
  through unchanged by it, which would hand Snowflake a function that may mean something
  else: they are refused too, as are a few whose translation sqlglot gets wrong
  (:data:`MISTRANSLATED`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, SqlglotError, UnsupportedError
from sqlglot.tokens import TokenType

from catalog.errors import InvalidArgument
from catalog.live import LiveDescription
from catalog.tables import TableRef, fold

#: DuckDB functions sqlglot maps to a Snowflake function with other semantics (checked
#: against both documentations): refused rather than answered differently.
MISTRANSLATED = {
    "regexp_matches": "DuckDB's regexp_matches finds the pattern anywhere, Snowflake's REGEXP_LIKE must match all of it",
    "epoch_ms": "sqlglot translates it to TO_TIMESTAMP, the inverse of DuckDB's epoch_ms(timestamp)",
    "random": "DuckDB's random() is a double in [0, 1), Snowflake's RANDOM() a 64-bit integer",
}


def _refused(what: str) -> InvalidArgument:
    return InvalidArgument(
        f"this query reads live tables (queried in Snowflake) and {what}; rewrite it without "
        "that construct (proto_docs/federation.md lists what is pushed down)"
    )


def _parse_query(sql: str) -> exp.Query:
    """Guarded ``sql`` as sqlglot's tree (both translations start here), or the refusal of
    what sqlglot cannot read or is not a query."""
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except ParseError as e:
        raise _refused(f"the translator cannot read it ({_first(e)})") from None
    if not isinstance(tree, exp.Query):
        raise _refused("is not a query the translator can push down")
    return tree


def transpile(sql: str, live: Mapping[tuple[str, str], LiveDescription], *, limit: int | None) -> str:
    """The Snowflake text of guarded ``sql`` whose every table is in ``live`` (keyed as
    :meth:`TableRef.key`), with at most ``limit`` rows. INVALID_ARGUMENT for what cannot be
    translated faithfully."""
    tree = _parse_query(sql)
    _duckdb_spellings(tree)
    _check_joins(tree)
    _check_functions(sql, tree)
    numbered = _check_placeholders(tree)
    ctes = {fold(c.alias_or_name) for c in tree.find_all(exp.CTE)}
    used: list[LiveDescription] = []
    replaced: set[int] = set()
    for table in list(tree.find_all(exp.Table)):
        desc = _live_table(table, live, ctes)
        if desc is None:
            continue
        used.append(desc)
        src = desc.source
        alias = table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(table.name))
        replacement = exp.Table(
            this=exp.to_identifier(src.name, quoted=True),
            db=exp.to_identifier(src.schema, quoted=True),
            catalog=exp.to_identifier(src.database, quoted=True),
            alias=alias,
        )
        for key in ("sample", "joins", "laterals", "pivots"):
            if table.args.get(key):
                replacement.set(key, table.args[key])
        table.replace(replacement)
        replaced.add(id(replacement))
    _only_live_sources(tree, replaced, ctes)
    _map_columns(tree, used, ctes)
    if limit is not None:
        tree = _capped(tree, limit)
    try:
        text = tree.sql(dialect="snowflake", unsupported_level=ErrorLevel.RAISE)
        return _positional(text) if numbered else text
    except UnsupportedError as e:
        raise _refused(f"uses what Snowflake's dialect cannot express: {_first(e)}") from None
    except SqlglotError as e:
        raise _refused(f"cannot be translated ({_first(e)})") from None


def _only_live_sources(tree: exp.Expr, replaced: set[int], ctes: set[str]) -> None:
    """Every table the Snowflake text reads is a live table's source (or a CTE of the query):
    a table function or any other name is refused, never sent to resolve in Snowflake."""
    for table in tree.find_all(exp.Table):
        if id(table) in replaced or (not table.args.get("db") and fold(table.name) in ctes):
            continue
        raise _refused(
            f"reads {_first(Exception(table.sql(dialect='duckdb')))[:80]}, which is not a live table"
        )


def _first(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


def _duckdb_spellings(tree: exp.Expr) -> None:
    """Names DuckDB writes when it serializes a parse tree back to SQL, as the guard's rewrite
    of a ruled table does (catalog/sqlguard.py), read as what they are: ``count_star()`` is
    ``count(*)``. sqlglot knows only the written forms, and would refuse the rest as unknown."""
    for node in list(tree.find_all(exp.Anonymous)):
        if fold(str(node.name)) == "count_star" and not node.expressions:
            node.replace(exp.Count(this=exp.Star()))


#: DuckDB join methods sqlglot writes unchanged although Snowflake has none of that meaning:
#: Snowflake's ASOF JOIN takes a MATCH_CONDITION (its ON is equalities only), and it has no
#: POSITIONAL JOIN. Found by the escape corpus on the emulator, which runs them as DuckDB does.
UNTRANSLATED_JOINS = {"asof": "ASOF JOIN", "positional": "POSITIONAL JOIN"}


def _check_joins(tree: exp.Expr) -> None:
    """Joins and row sources Snowflake cannot take faithfully. ``unnest`` (in ``FROM`` or the
    select list) is sqlglot's ``FLATTEN``, whose rows carry SEQ, KEY, PATH, INDEX, VALUE and
    THIS: a ``SELECT *`` over it would answer other columns; it is not a table either, so the
    check that only live sources reach Snowflake does not see it."""
    if tree.find(exp.Unnest, exp.Explode) is not None:
        raise _refused("uses unnest(), which Snowflake spells as FLATTEN with other columns")
    if tree.find(exp.Columns) is not None:  # written unchanged by sqlglot; Snowflake has none
        raise _refused("uses a COLUMNS(…) expression, which Snowflake's dialect lacks")
    if tree.find(exp.Pivot) is not None:
        # Snowflake names UNPIVOT's rows and PIVOT's columns by its stored (upper-case) column
        # names and takes PIVOT's values differently: answers would differ from DuckDB's.
        raise _refused("uses PIVOT or UNPIVOT, whose Snowflake answer names columns differently")
    if tree.find(exp.Struct, exp.Array) is not None:
        # OBJECT_CONSTRUCT / ARRAY_CONSTRUCT answer semi-structured values (JSON text over
        # Arrow), not the STRUCT or LIST DuckDB binds the result to.
        raise _refused("builds a list or struct value, which Snowflake returns as semi-structured JSON")
    for join in tree.find_all(exp.Join):
        name = UNTRANSLATED_JOINS.get(fold(str(join.args.get("method") or "")))
        if name is not None:
            raise _refused(f"uses {name}, which Snowflake's dialect spells with other semantics or lacks")


def _check_functions(sql: str, tree: exp.Expr) -> None:
    for node in tree.find_all(exp.Anonymous):
        raise _refused(f"calls {str(node.name)[:80]}(), which has no known Snowflake equivalent")
    # The parse tree no longer says which DuckDB name was written (regexp_matches parses as
    # sqlglot's RegexpLike): the tokens do.
    tokens = sqlglot.tokenize(sql, read="duckdb")
    for token, following in itertools.pairwise(tokens):
        why = MISTRANSLATED.get(fold(token.text))
        if why is not None and following.token_type == TokenType.L_PAREN:
            raise _refused(f"calls {fold(token.text)}(), whose Snowflake translation differs: {why}")


#: The name a numbered parameter is written under until :func:`_positional` reads it back.
_MARK = "quiver_param_"


def _check_placeholders(tree: exp.Expr) -> bool:
    """Refuse named parameters; mark numbered ones (``$1``, ``$2`` …), which is how DuckDB
    writes ``?`` when it serializes a parse tree (the guard's rewrite of a ruled table,
    catalog/sqlguard.py), for :func:`_positional`. True when there were numbered ones."""
    numbered = False
    for node in list(tree.find_all(exp.Placeholder, exp.Parameter)):
        name = node.name
        if isinstance(node, exp.Placeholder) and name.isdigit():
            node.replace(exp.Placeholder(this=f"{_MARK}{int(name)}"))
            numbered = True
        elif isinstance(node, exp.Parameter) or (name and name != "?"):
            raise _refused("uses a numbered or named parameter; write ? placeholders, bound in order")
    return numbered


def _positional(text: str) -> str:
    """``text`` with its marked numbered parameters written ``?``, when they appear exactly in
    the order 1, 2, … n, each once — then binding the parameters in order means what the
    numbers meant. Anything else (a number used twice, out of order, mixed with ``?``) is
    refused rather than bound to the wrong value."""
    spans: list[tuple[int, int]] = []
    order: list[int] = []
    tokens = sqlglot.tokenize(text, read="snowflake")
    for token, following in itertools.pairwise(tokens):
        if token.token_type == TokenType.COLON and following.text.startswith(_MARK):
            spans.append((token.start, following.end + 1))
            order.append(int(following.text[len(_MARK) :]))
    if order != list(range(1, len(order) + 1)) or any(t.token_type == TokenType.PLACEHOLDER for t in tokens):
        raise _refused(
            "uses its parameters in an order Snowflake's ? placeholders cannot bind; write each ? once"
        )
    for start, end in reversed(spans):
        text = text[:start] + "?" + text[end:]
    return text


def _live_table(
    table: exp.Table, live: Mapping[tuple[str, str], LiveDescription], ctes: set[str]
) -> LiveDescription | None:
    name = fold(table.name)
    if not table.db:
        if name in ctes:
            return None
        return live.get(("main", name))
    return live.get((fold(table.db), name))


def _folded(ident: exp.Identifier) -> exp.Identifier:
    """DuckDB matches names in any case, quoted or not; Snowflake matches quoted ones exactly.
    Aliases, CTE names and qualifiers are all written folded, so they match each other."""
    return exp.to_identifier(fold(ident.name))


def _map_columns(tree: exp.Expr, used: list[LiveDescription], ctes: set[str]) -> None:
    """Column names of live tables → their stored Snowflake spelling, quoted. Qualifiers
    beyond the table alias (``schema.table.column``) are dropped: the alias names it. The
    names a query gives (table aliases, CTEs) are folded, see :func:`_folded`."""
    names: dict[str, str] = {}
    for desc in used:
        for col in desc.columns:
            names.setdefault(fold(col.name), col.source)
    for column in tree.find_all(exp.Column):
        source = names.get(fold(column.name))
        if source is not None and isinstance(column.this, exp.Identifier):
            column.set("this", exp.to_identifier(source, quoted=True))
        if column.args.get("db") is not None:
            column.set("db", None)
            column.set("catalog", None)
        qualifier = column.args.get("table")
        if isinstance(qualifier, exp.Identifier):
            column.set("table", _folded(qualifier))
    for alias in tree.find_all(exp.TableAlias):
        if isinstance(alias.this, exp.Identifier):
            alias.set("this", _folded(alias.this))
    for table in tree.find_all(exp.Table):
        if not table.args.get("db") and fold(table.name) in ctes and isinstance(table.this, exp.Identifier):
            table.set("this", _folded(table.this))


def _capped(tree: exp.Query, limit: int) -> exp.Query:
    current = tree.args.get("limit")
    if current is None and not tree.args.get("offset"):
        return tree.limit(limit, copy=False)
    value = current.expression if isinstance(current, exp.Limit) else None
    if isinstance(value, exp.Literal) and not value.is_string and not tree.args.get("offset"):
        return tree.limit(min(int(value.this), limit), copy=False)
    # A LIMIT of a parameter or with an OFFSET: the cap goes around the query.
    return exp.select("*").from_(tree.subquery("q")).limit(limit)


# --- mixed queries: live scans pushed down, the rest in DuckDB -------------------------------------
@dataclass(frozen=True, slots=True)
class Pull:
    """One live table's scan for a mixed query: its Snowflake text (the columns the query
    names, the filters that concern this table alone) and the name DuckDB reads it under."""

    ref: TableRef
    name: str  # the registered Arrow table the local query reads instead
    columns: tuple[str, ...]  # Quiver's names, in the table's order
    sql: str  # Snowflake SQL, LIMIT max_rows + 1
    filtered: bool  # a filter was pushed down with it
    #: The DuckDB text of a pushed-down view (a rule's, see :func:`_view_of`), for binding
    #: its result schema; None for a plain scan of ``columns``.
    view: str | None = None


def split_mixed(
    sql: str, live: Mapping[tuple[str, str], LiveDescription], *, max_rows: int
) -> tuple[str, list[Pull]]:
    """The DuckDB text of guarded ``sql`` with each live table replaced by a registered
    table, and the pulls that fill them. Projection: every column of the table whose name the
    query mentions anywhere (a superset, so always enough; all of them for a ``*``). Filters:
    conjuncts of the top-level WHERE that name only this table's columns, qualified by its
    alias, when the top-level joins are all inner (an outer join's filter is not the
    table's own), without parameters, subqueries, aggregates or windows. DuckDB applies every
    filter again, so pushing one is never needed for correctness, only for cost."""
    tree = _parse_query(sql)
    ctes = {fold(c.alias_or_name) for c in tree.find_all(exp.CTE)}
    mentioned = {fold(c.name) for c in tree.find_all(exp.Column)}
    # SELECT * and t.* read every column; count(*) reads none.
    star = any(isinstance(s.parent, exp.Select | exp.Column) for s in tree.find_all(exp.Star))
    conjuncts = _own_conjuncts(tree)
    pulls: list[Pull] = []
    for i, table in enumerate(list(tree.find_all(exp.Table))):
        desc = _live_table(table, live, ctes)
        if desc is None:
            continue
        alias = fold(table.alias_or_name)
        name = f"__quiver_live_{i}"
        view = _view_of(table, desc)
        if view is not None:
            # The whole view is pushed down: Snowflake applies its row filter, drops its
            # excluded columns and computes its masks, so neither reaches Quiver.
            select, subquery = view
            text = select.sql(dialect="duckdb")
            pull_sql = transpile(text, {desc.ref.key(): desc}, limit=max_rows + 1)
            names = tuple(fold(s.alias_or_name) for s in select.expressions)
            filtered = select.args.get("where") is not None
            pulls.append(Pull(desc.ref, name, names, pull_sql, filtered, text))
            stand_in = exp.Table(
                this=exp.to_identifier(name, quoted=True),
                alias=subquery.args.get("alias") or exp.TableAlias(this=exp.to_identifier(alias)),
            )
            for key in ("joins", "laterals", "pivots", "sample"):  # what hangs on the subquery
                if subquery.args.get(key):
                    stand_in.set(key, subquery.args[key])
            subquery.replace(stand_in)
            continue
        columns = tuple(c.name for c in desc.columns if star or fold(c.name) in mentioned) or (
            desc.columns[0].name,
        )
        own = [c for c in conjuncts.get(id(table), []) if _only(c, alias)]
        pulled = exp.select(*(exp.column(c, table=alias, quoted=True) for c in columns)).from_(
            exp.Table(
                this=exp.to_identifier(desc.ref.name, quoted=True),
                db=exp.to_identifier(desc.ref.schema, quoted=True),
                alias=exp.TableAlias(this=exp.to_identifier(alias)),
            )
        )
        if own:
            pulled = pulled.where(exp.and_(*(c.copy() for c in own)), copy=False)
        pull_sql = transpile(pulled.sql(dialect="duckdb"), {desc.ref.key(): desc}, limit=max_rows + 1)
        pulls.append(Pull(desc.ref, name, columns, pull_sql, bool(own)))
        table.replace(
            exp.Table(
                this=exp.to_identifier(name, quoted=True),
                alias=table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(table.name)),
            )
        )
    try:
        return tree.sql(dialect="duckdb"), pulls
    except SqlglotError as e:
        raise _refused(f"cannot be rewritten for a mixed query ({_first(e)})") from None


def _own_conjuncts(tree: exp.Query) -> dict[int, list[exp.Expr]]:
    """Top-level WHERE conjuncts, offered to each table of the top-level FROM when every join
    there is inner (by ``id`` of the table node)."""
    if not isinstance(tree, exp.Select):
        return {}
    where = tree.args.get("where")
    source = tree.args.get("from_") or tree.args.get("from")
    if where is None or source is None:
        return {}
    joins = tree.args.get("joins") or []
    if any(
        j.args.get("side") or fold(str(j.args.get("kind") or "")) not in ("", "inner", "cross") for j in joins
    ):
        return {}
    tables = [source.this, *(j.this for j in joins)]
    parts = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
    return {id(t): parts for t in tables if isinstance(t, exp.Table)}


def _only(conjunct: exp.Expr, alias: str) -> bool:
    if conjunct.find(exp.Placeholder, exp.Parameter, exp.Subquery, exp.AggFunc, exp.Window, exp.Select):
        return False
    columns = list(conjunct.find_all(exp.Column))
    return bool(columns) and all(fold(c.table) == alias and not c.args.get("db") for c in columns)


def _view_of(table: exp.Table, desc: LiveDescription) -> tuple[exp.Select, exp.Subquery] | None:
    """The subquery ``(SELECT <projection> FROM table [WHERE …])`` that reads only ``table``
    — the shape of a rule's view (catalog/views.py), which the guard puts where the query
    named a ruled table — when it can be pushed down whole: one table, no joins, grouping,
    ordering, limits, windows, subqueries or parameters, and every column it names is a column
    of that table (so nothing in it refers to the outer query). None otherwise: the table is
    pulled as a plain scan and the rest runs in DuckDB."""
    select = table.parent.parent if isinstance(table.parent, exp.From) else None
    if not isinstance(select, exp.Select) or not isinstance(select.parent, exp.Subquery):
        return None
    source = select.args.get("from_") or select.args.get("from")
    if source is None or source.this is not table:
        return None
    for key in (
        "joins",
        "laterals",
        "group",
        "having",
        "qualify",
        "order",
        "limit",
        "offset",
        "distinct",
        "with_",
        "with",
        "windows",
    ):
        if select.args.get(key):
            return None
    if table.args.get("sample") or table.args.get("joins") or table.args.get("pivots"):
        return None
    if select.find(exp.Placeholder, exp.Parameter, exp.Subquery, exp.AggFunc, exp.Window) or any(
        isinstance(n, exp.Select) and n is not select for n in select.find_all(exp.Select)
    ):
        return None
    alias = fold(table.alias_or_name)
    names = {fold(c.name) for c in desc.columns}
    for column in select.find_all(exp.Column):
        if fold(column.name) not in names or (column.table and fold(column.table) != alias):
            return None
    if any(not isinstance(e, exp.Star) and not e.alias_or_name for e in select.expressions):
        return None
    return select, select.parent


def check_pushable(projection: list[str], row_filter: str | None, desc: LiveDescription) -> None:
    """Translate a rule's masks (``projection``, DuckDB expressions) and row filter over the
    live table ``desc`` as a query would push them down, parameters read as NULL;
    INVALID_ARGUMENT naming what cannot be translated (catalog/rules.py checks this when an
    allowlist is saved)."""
    where = f" WHERE ({row_filter})" if row_filter is not None else ""
    try:
        tree = sqlglot.parse_one(f"SELECT {', '.join(projection)} FROM {desc.ref.sql}{where}", read="duckdb")
    except ParseError as e:
        raise _refused(f"the translator cannot read it ({_first(e)})") from None
    for node in list(tree.find_all(exp.Parameter, exp.Placeholder)):
        node.replace(exp.Null())
    transpile(tree.sql(dialect="duckdb"), {desc.ref.key(): desc}, limit=None)
