"""Property-based tests of the SQL guard (issue #8: "only refusals with a code ever come out").

Whatever text arrives — random bytes decoded as text, random unicode, random nesting, random
identifiers and quoting, random expressions over random functions — the guard either accepts
or raises InvalidArgument / PermissionDenied with a bounded sentence: never another exception,
never a RecursionError. And a query that names a table the caller may not read is never
accepted, however it is spelled or wherever it is nested.

Each property is bounded (``max_examples``, ``deadline=None``) so the file runs in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.errors import InvalidArgument, PermissionDenied
from catalog.identity import Principal
from catalog.policy import NOT_READABLE
from catalog.sqlguard import BUILDER_FUNCTIONS, DENIED_FUNCTIONS, MAX_DETAIL_CHARS, SqlGuard
from tests.guard_support import analyst, guard_database

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

SETUP = """
CREATE SCHEMA demo;
CREATE TABLE demo.orders AS SELECT i AS id, 'x' || i AS s, [i] AS l FROM range(5) r(i);
CREATE SCHEMA secret;
CREATE TABLE secret.salaries AS SELECT 1 AS id, 100 AS pay;
CREATE TABLE main.orders AS SELECT 1 AS id;
CREATE TYPE secret.band AS ENUM ('a', 'b');
"""

#: Tables the agent may not read, as (schema, table); the fuzzer spells them every way.
FORBIDDEN = [
    ("secret", "salaries"),
    ("main", "orders"),
    ("_quiver", "tokens"),
    ("information_schema", "tables"),
]
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


@dataclass
class Env:
    guard: SqlGuard
    agent: Principal


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db, tables, policy = guard_database(tmp_path_factory.mktemp("guard_fuzz"), SETUP)
    agent = analyst("fuzz")
    yield Env(guard=SqlGuard(tables, policy, db.catalog_name), agent=agent)
    db.close()


def outcome(env: Env, sql: str) -> InvalidArgument | PermissionDenied | None:
    """None if accepted, else the refusal; any other exception fails the property."""
    try:
        env.guard.check(env.agent, sql)
    except (InvalidArgument, PermissionDenied) as e:
        assert 0 < len(e.detail) <= MAX_DETAIL_CHARS, len(e.detail)
        assert type(e) in (InvalidArgument, PermissionDenied)
        return e
    return None


# --- strategies -------------------------------------------------------------------------------


def quoted(name: str) -> st.SearchStrategy[str]:
    """``name`` spelled as DuckDB reads it the same: any ASCII case, bare or double-quoted."""
    cased = st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))
    )
    return st.one_of(cased, cased.map(lambda n: f'"{n}"'))


@st.composite
def forbidden_ref(draw: st.DrawFn) -> str:
    schema, table = draw(st.sampled_from(FORBIDDEN))
    s, t = draw(quoted(schema)), draw(quoted(table))
    if schema == "main" and draw(st.booleans()):
        return t if draw(st.booleans()) else f"{draw(quoted('quiver'))}.{s}.{t}"
    return f"{s}.{t}"


LITERALS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=8).map(lambda s: "'" + s.replace("'", "''") + "'"),
    st.sampled_from(
        ["NULL", "true", "DATE '2024-01-01'", "INTERVAL 1 DAY", "?", "$1", "$2000", "id", "s", "l"]
    ),
)
FUNCTIONS = st.sampled_from(
    sorted(BUILDER_FUNCTIONS)
    + sorted(DENIED_FUNCTIONS)[:12]
    + ["length", "concat", "list_concat", "upper", "coalesce", "list_value", "abs", "least", "sum", "count"]
    + ["enum_range", "typeof", "nosuchfunction", "read_csv", "query"]
)
TYPES = st.sampled_from(
    ["INTEGER", "VARCHAR", "BIGINT[]", "STRUCT(a INT)", "secret.band", "band", "JSON", "DECIMAL(9,2)"]
)


def expressions() -> st.SearchStrategy[str]:
    return st.recursive(
        LITERALS,
        lambda inner: st.one_of(
            st.tuples(FUNCTIONS, st.lists(inner, max_size=4)).map(lambda t: f"{t[0]}({', '.join(t[1])})"),
            st.tuples(inner, st.sampled_from(["+", "-", "*", "||", "=", "AND", "<"]), inner).map(" ".join),
            inner.map(lambda e: f"({e})"),
            st.lists(inner, max_size=4).map(lambda xs: f"[{', '.join(xs)}]"),
            st.tuples(inner, TYPES).map(lambda t: f"CAST({t[0]} AS {t[1]})"),
            st.tuples(inner, TYPES).map(lambda t: f"{t[0]}::{t[1]}"),
            inner.map(lambda e: f"(SELECT {e})"),
            inner.map(lambda e: f"list_transform([1, 2], lambda x: {e})"),
            st.tuples(inner, inner).map(lambda t: f"CASE WHEN {t[0]} THEN {t[1]} END"),
        ),
        max_leaves=12,
    )


# --- properties ---------------------------------------------------------------------------------


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_random_bytes_only_ever_get_a_refusal(env: Env, raw: bytes) -> None:
    outcome(env, raw.decode("utf-8", errors="replace"))
    outcome(env, "SELECT " + raw.decode("latin-1"))


@SETTINGS
@given(text=st.text(max_size=200))
def test_random_unicode_only_ever_gets_a_refusal(env: Env, text: str) -> None:
    outcome(env, text)
    outcome(env, f"SELECT {text}")
    outcome(env, f"SELECT * FROM {text}")


@SETTINGS
@given(expr=expressions())
def test_random_expressions_only_ever_get_a_refusal(env: Env, expr: str) -> None:
    outcome(env, f"SELECT {expr}")
    outcome(env, f"SELECT {expr} AS v FROM demo.orders WHERE {expr}")


@SETTINGS
@given(
    opens=st.lists(
        st.sampled_from(["(", "[", "(SELECT ", "abs(", "-", "NOT ", "CASE WHEN true THEN ", "{'a': "]),
        max_size=400,
    ),
    leaf=LITERALS,
)
def test_random_nesting_never_crashes_the_walker(env: Env, opens: list[str], leaf: str) -> None:
    closes = {
        "(": ")",
        "[": "]",
        "(SELECT ": ")",
        "abs(": ")",
        "-": "",
        "NOT ": "",
        "CASE WHEN true THEN ": " END",
        "{'a': ": "}",
    }
    sql = "SELECT " + "".join(opens) + leaf + "".join(closes[o] for o in reversed(opens))
    outcome(env, sql)


@SETTINGS
@given(
    ref=forbidden_ref(),
    context=st.sampled_from(
        [
            "SELECT * FROM {t}",
            "SELECT id FROM demo.orders WHERE id IN (SELECT id FROM {t})",
            "WITH c AS (SELECT * FROM {t}) SELECT * FROM c",
            "WITH salaries AS (SELECT 1) SELECT * FROM {t}",
            "SELECT (SELECT count(*) FROM {t})",
            "SELECT * FROM demo.orders a JOIN {t} b ON true",
            "SELECT * FROM demo.orders, LATERAL (SELECT * FROM {t})",
            "SELECT * FROM demo.orders UNION ALL SELECT * FROM {t}",
            "FROM {t} SELECT *",
            "SELECT * FROM (SELECT * FROM (SELECT * FROM {t}))",
            "SELECT list_transform([1], lambda x: (SELECT max(1) FROM {t}))",
            "SELECT * FROM unnest((SELECT list(1) FROM {t}))",
            "SELECT EXISTS (SELECT 1 FROM {t})",
            "PIVOT {t} ON id IN (1) USING count(*)",
        ]
    ),
)
def test_forbidden_tables_are_never_accepted(env: Env, ref: str, context: str) -> None:
    err = outcome(env, context.format(t=ref))
    assert err is not None, context.format(t=ref)


@SETTINGS
@given(
    name=st.text(alphabet=st.characters(codec="utf-8", exclude_characters='"\x00'), min_size=1, max_size=40)
)
def test_random_identifiers_read_like_missing_tables(env: Env, name: str) -> None:
    """A quoted name that is no readable table is refused with the one 'not readable' sentence,
    whether or not something of that name exists."""
    err = outcome(env, f'SELECT * FROM secret."{name}"')
    assert isinstance(err, PermissionDenied) and NOT_READABLE in err.detail


@SETTINGS
@given(name=st.text(min_size=1, max_size=30_000))
def test_long_names_are_echoed_bounded(env: Env, name: str) -> None:
    quoted_name = '"' + name.replace('"', '""').replace("\x00", "") + '"'
    for sql in (f"SELECT * FROM {quoted_name}", f"SELECT {quoted_name}()", f"SELECT 1::{quoted_name}"):
        outcome(env, sql)


LONG = "x" * 50_000
ECHOES = [
    f'SELECT * FROM "{LONG}"',
    f'SELECT * FROM secret."{LONG}"',
    f'SELECT "{LONG}"()',
    f'SELECT * FROM "{LONG}"()',
    f'SELECT 1::"{LONG}"',
    f"SELECT 1 FROM demo.orders {LONG} {LONG}",
    f"SELECT 1 FROM demo.orders WHERE s = '{LONG}' AND AND",
    f"SELECT ${'9' * 5000}",
    f'SELECT * FROM "{LONG}"."{LONG}"',
]


@pytest.mark.parametrize("sql", ECHOES, ids=range(len(ECHOES)))
def test_echoed_names_and_messages_are_bounded(env: Env, sql: str) -> None:
    err = outcome(env, sql)
    assert err is not None and LONG not in err.detail


# --- deep nesting, fixed cases --------------------------------------------------------------------

DEEP = [
    "SELECT " + "(" * 5000 + "1" + ")" * 5000,
    "SELECT " + "[" * 70 + "1" + "]" * 70,
    "SELECT " + "[" * 1000 + "1" + "]" * 1000,
    "SELECT " + "(SELECT " * 300 + "1" + ")" * 300,
    "SELECT " + "abs(" * 2000 + "1" + ")" * 2000,
    "SELECT " + "repeat(" * 200 + "'x'" + ", 2)" * 200,
    "SELECT " + " || ".join(["'x'"] * 3000),
    "SELECT " + "list_transform(" * 40 + "[1]" + ", lambda x: x)" * 40,
    "SELECT 1 FROM " + "(SELECT 1 FROM " * 300 + "demo.orders" + ")" * 300,
    "WITH "
    + ", ".join(f"c{i} AS (SELECT * FROM c{i - 1})" if i else "c0 AS (SELECT 1)" for i in range(500))
    + " SELECT * FROM c499",
    "SELECT " + "CASE WHEN true THEN " * 500 + "1" + " END" * 500,
    "SELECT " + "{'a': " * 300 + "1" + "}" * 300,
    "SELECT " + "-" * 3000 + "1",
]


@pytest.mark.parametrize("sql", DEEP, ids=range(len(DEEP)))
def test_deep_nesting_gets_a_clean_answer(env: Env, sql: str) -> None:
    outcome(env, sql)
