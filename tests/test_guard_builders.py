"""The SQL guard's bounds on what one query may build or reveal (issue #8, defects 1, 6, 8).

* Values built from small constants: DuckDB folds constant expressions while *binding*, outside
  ``memory_limit`` and the query interrupt, so ``SELECT length(range(150000000))`` allocated GBs
  before anything could stop it. The guard bounds every builder's size through nesting, CTEs,
  subqueries and lambdas, and refuses size arguments it cannot evaluate.
* Catalog metadata outside the allowlist: functions that resolve catalog objects from strings
  and user-defined type references are refused exactly like a missing table.
* Parameter indexes beyond the maximum are refused with a short message.

Accepted queries run on the same real, locked-down DuckDB file and return what they should.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from catalog.database import Database
from catalog.errors import InvalidArgument, PermissionDenied, QuiverError
from catalog.identity import Principal
from catalog.policy import NOT_READABLE
from catalog.sqlguard import (
    BUILDER_FUNCTIONS,
    DENIED_FUNCTIONS,
    MAX_BUILT_TOTAL_UNITS,
    MAX_BUILT_UNITS,
    MAX_FOLD_WORK,
    MAX_PARAM_INDEX,
    SqlGuard,
)
from tests.guard_support import analyst, guard_database

SETUP = """
CREATE SCHEMA demo;
CREATE TYPE demo.mood AS ENUM ('happy', 'sad');
CREATE TABLE demo.t AS
    SELECT i AS id, 'name ' || i AS s, [i, i + 1] AS l, 3 AS n,
           CASE WHEN i % 2 = 0 THEN 'happy' ELSE 'sad' END::demo.mood AS mood
    FROM range(10) r(i);
CREATE SCHEMA hr;
CREATE TYPE hr.band AS ENUM ('junior', 'senior', 'principal');
CREATE TABLE hr.staff (id INTEGER, band hr.band, pay INTEGER);
INSERT INTO hr.staff VALUES (1, 'senior', 100);
CREATE INDEX staff_pay_idx ON hr.staff (pay);
"""


@dataclass
class Env:
    db: Database
    guard: SqlGuard
    agent: Principal


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db, tables, policy = guard_database(tmp_path_factory.mktemp("guard_builders"), SETUP)
    guard = SqlGuard(tables, policy, db.catalog_name)
    agent = analyst("agent-subject")
    yield Env(db=db, guard=guard, agent=agent)
    db.close()


def run(env: Env, sql: str, params: list[object] | None = None) -> list[tuple[object, ...]]:
    q = env.guard.check(env.agent, sql)
    with env.db.reading() as cur:
        return cur.execute(q.sql, params or None).fetchall()


def refusal(env: Env, sql: str) -> QuiverError:
    with pytest.raises((InvalidArgument, PermissionDenied)) as info:
        env.guard.check(env.agent, sql)
    err = info.value
    assert len(err.detail) <= 600, err.detail
    return err


# --- defect 1: values built from small constants -------------------------------------------

#: (sql, the function the refusal names). Each one allocates gigabytes in DuckDB's binder.
TOO_BIG = [
    ("SELECT length(range(150000000)) AS v", "range()"),
    ("SELECT length(repeat('x', 1000000000))", "repeat()"),
    ("SELECT length(generate_series(150000000))", "generate_series()"),
    ("SELECT length(generate_series(1, 150000000, 1))", "generate_series()"),
    ("SELECT range(-1000000000, 1000000000, 1)", "range()"),
    ("SELECT length(lpad('x', 1000000000, 'y'))", "lpad()"),
    ("SELECT rpad('x', 1000000000, 'y')", "rpad()"),
    ("SELECT length(printf('%1000000000d', 1))", "printf()"),
    ("SELECT printf('%.1000000000f', 1.5)", "printf()"),
    ("SELECT length(format('{:>1000000000}', 1))", "format()"),
    ("SELECT format('{:.1000000000f}', 1.5)", "format()"),
    ("SELECT list_resize([1], 150000000)", "list_resize()"),
    ("SELECT array_resize([1], 150000000, 0)", "array_resize()"),
    ("SELECT repeat([1], 150000000)", "repeat()"),
    ("SELECT bar(1, 0, 2, 1000000000)", "bar()"),
    ("SELECT to_base(5, 2, 1000000000)", "to_base()"),
    ("SELECT bitstring('1', 1000000000)", "bitstring()"),
    ("SELECT equi_width_bins(0, 10, 1000000000, false)", "equi_width_bins()"),
    ("SELECT unnest(range(150000000))", "range()"),
    (
        "SELECT generate_series(TIMESTAMP '2000-01-01', TIMESTAMP '3000-01-01', INTERVAL 1 SECOND)",
        "generate_series()",
    ),
    ("SELECT range(DATE '1000-01-01', DATE '9000-01-01', INTERVAL '1 hour')", "range()"),
    # through nesting: the product of sizes, not each call alone
    ("SELECT repeat(repeat('x', 1000), 1000000)", "repeat()"),
    ("SELECT repeat(repeat('x', 1001), 1000)", "repeat()"),
    ("SELECT replace(repeat('x', 10000), 'x', repeat('y', 1000))", "replace()"),
    ("SELECT regexp_replace(repeat('x', 10000), 'x', repeat('y', 1000), 'g')", "regexp_replace()"),
    ("SELECT list_concat(range(60000), range(60000))", "list_concat()"),
    ("SELECT range(60000) || range(60000)", "||()"),
    ("SELECT [range(60000), range(60000)]", "list_value()"),
    ("SELECT concat(repeat('x', 60000), repeat('y', 60000))", "concat()"),
    ("SELECT list_transform(range(2000), lambda x: range(10000))", "list_transform()"),
    ("SELECT [repeat('ab', 50) FOR x IN range(100000)]", "list_apply()"),
    (
        "SELECT list_transform(range(1000), lambda x: list_transform(range(1000), lambda y: [x, y]))",
        "list_transform()",
    ),
    # functions that multiply their input: nesting multiplies the factors
    ("SELECT json_pretty(repeat('[', 2000) || repeat(']', 2000))", "json_pretty()"),
    ("SELECT hex(hex(hex(hex(hex(repeat('x', 100000))))))", "hex()"),
    ("SELECT bin(bin(repeat('x', 20000)::BLOB))", "bin()"),
    ("SELECT array_to_string(range(100000), repeat(',', 100))", "array_to_string()"),
    ("SELECT list_aggregate(range(100000), 'string_agg', repeat('x', 100))", "list_aggregate()"),
    ("SELECT concat_ws(repeat('x', 50000), 'a', 'b', 'c')", "concat_ws()"),
    # casts, CTEs and subqueries carry what they built (DuckDB inlines them and folds the parent)
    ("SELECT repeat('x', CAST('1000000000' AS INTEGER))", "repeat()"),
    ("SELECT repeat('x', -(-1000000000))", "repeat()"),
    ("SELECT repeat('x', 10 * 100000000)", "repeat()"),
    ("SELECT repeat('x', 2 ** 40)", "repeat()"),
    ("SELECT repeat('x', 1e9::BIGINT)", "repeat()"),
    ("SELECT repeat('x', least(1000000000, 2000000000))", "repeat()"),
    ("SELECT repeat('x', abs(-1000000000))", "repeat()"),
    (
        "WITH c AS (SELECT range(90000) r) SELECT list_concat(r, r, r, r, r, r, r, r, r, r) FROM c",
        "list_concat()",
    ),
    ("WITH c AS MATERIALIZED (SELECT range(90000) r) SELECT list_concat(r, r) FROM c", "list_concat()"),
    ("SELECT list_concat(r, r) FROM (SELECT range(60000) r)", "list_concat()"),
    (
        "WITH a AS (SELECT repeat('x', 1000) s), b AS (SELECT repeat(s, 1001) t FROM a) SELECT t FROM b",
        "repeat()",
    ),
    ("SELECT (SELECT list_concat(r, r) FROM (SELECT range(60000) r))", "list_concat()"),
    # lateral column aliases: the binder substitutes the earlier item's expression
    ("SELECT range(90000) AS r, list_concat(r, r, r, r, r, r, r, r, r, r) AS big", "list_concat()"),
    ("SELECT range(60000) AS r WHERE len(list_concat(r, r)) > 0", "list_concat()"),
    ("SELECT list_concat(#1, #1) FROM (SELECT range(60000))", "list_concat()"),
    ("SELECT * FROM demo.t WHERE id IN (SELECT unnest(range(2000000)))", "range()"),
    ("SELECT l FROM demo.t ORDER BY length(repeat('x', 1000000000))", "repeat()"),
    ("SELECT * FROM range(10) r(i), LATERAL (SELECT repeat('x', 1000000000))", "repeat()"),
    ("SELECT * FROM unnest(range(150000000))", "range()"),
    ("SELECT invoke(lambda x: repeat(x, 1000000), repeat('x', 10))", "repeat()"),
    # data values may be enlarged by at most MAX_BUILT_UNITS / DATA_VALUE_UNITS
    ("SELECT repeat(s, 2000) FROM demo.t", "repeat()"),
    ("SELECT list_transform(l, lambda x: repeat('y', 10000)) FROM demo.t", "list_transform()"),
    # aggregates whose state is sized by an argument
    ("SELECT bitstring_agg(id, 0, 100000000000) FROM demo.t", "bitstring_agg()"),
    ("SELECT max(id, 1000000000) FROM demo.t", "max()"),
    ("SELECT arg_max(id, id, 1000000000) FROM demo.t", "arg_max()"),
    ("SELECT approx_top_k(id, 1000000000) FROM demo.t", "approx_top_k()"),
    ("SELECT reservoir_quantile(id, 0.5, 1000000000) FROM demo.t", "reservoir_quantile()"),
]


@pytest.mark.parametrize(("sql", "offender"), TOO_BIG, ids=range(len(TOO_BIG)))
def test_values_built_from_constants_are_bounded(env: Env, sql: str, offender: str) -> None:
    err = refusal(env, sql)
    assert isinstance(err, InvalidArgument), err.detail
    assert err.detail.startswith(offender) or offender in err.detail, err.detail
    assert f"{MAX_BUILT_UNITS:,}" in err.detail


#: Size arguments the guard cannot evaluate: one row could build gigabytes at run time.
NOT_CONSTANT = [
    ("SELECT repeat('x', id) FROM demo.t", "repeat()", "count"),
    ("SELECT repeat('x', ?)", "repeat()", "count"),
    ("SELECT repeat('x', (SELECT 1000000000))", "repeat()", "count"),
    ("SELECT lpad(s, n, '0') FROM demo.t", "lpad()", "width"),
    ("SELECT list_resize(l, id) FROM demo.t", "list_resize()", "length"),
    ("SELECT range(id) FROM demo.t", "range()", "constant bounds"),
    ("SELECT generate_series(id, id + 10) FROM demo.t", "generate_series()", "constant bounds"),
    (
        "SELECT generate_series(DATE '2024-01-01', DATE '2024-01-01' + id, INTERVAL 1 DAY) FROM demo.t",
        "generate_series()",
        "table function in FROM",
    ),
    (
        "SELECT range(TIMESTAMP '2024-01-01', TIMESTAMP '2024-01-02', INTERVAL 1 MICROSECOND)",
        "range()",
        "INTERVAL",
    ),
    ("SELECT printf(s, 1) FROM demo.t", "printf()", "string literal"),
    ("SELECT format(?, 1)", "format()", "string literal"),
    ("SELECT printf('%*d', 1000000000, 1)", "printf()", "'*'"),
    ("SELECT format('{:{}}', 1, 1000000000)", "format()", "nested"),
    ("SELECT max(id, n) FROM demo.t", "max()", "constant"),
    ("SELECT list_aggregate(l, s) FROM demo.t", "list_aggregate()", "string literal"),
    ("SELECT list_reduce(range(40), lambda a, x: a || a, 'x')", "list_reduce()", "accumulator"),
]


@pytest.mark.parametrize(("sql", "offender", "fragment"), NOT_CONSTANT, ids=range(len(NOT_CONSTANT)))
def test_size_arguments_must_be_constants(env: Env, sql: str, offender: str, fragment: str) -> None:
    err = refusal(env, sql)
    assert err.detail.startswith(offender), err.detail
    assert fragment in err.detail, err.detail


def test_the_statement_total_is_bounded(env: Env) -> None:
    per_call = MAX_BUILT_UNITS
    calls = MAX_BUILT_TOTAL_UNITS // per_call
    fits = "SELECT " + ", ".join(f"length(range({per_call})) AS c{i}" for i in range(calls))
    assert run(env, fits) == [tuple([per_call] * calls)]
    over = fits + f", length(range({per_call})) AS extra"
    err = refusal(env, over)
    assert isinstance(err, InvalidArgument)
    assert f"{MAX_BUILT_TOTAL_UNITS:,}" in err.detail


#: Queries near the bounds, and everyday uses of the builders: accepted and run.
ACCEPTED = [
    ("SELECT length(range(100000))", [(100_000,)]),
    ("SELECT length(generate_series(1, 100000))", [(100_000,)]),
    ("SELECT length(repeat('x', 100000))", [(100_000,)]),
    ("SELECT length(repeat(repeat('x', 100), 1000))", [(100_000,)]),
    ("SELECT length(lpad('7', 100000, '0'))", [(100_000,)]),
    ("SELECT lpad('7', 3, '0'), rpad('ab', 4, '.'), repeat('-', 5)", [("007", "ab..", "-----")]),
    ("SELECT printf('%05d|%-4s|%.2f', 42, 'ab', 3.14159)", [("00042|ab  |3.14",)]),
    ("SELECT format('{:>6}|{:.1f}', 'ab', 2.25)", [("    ab|2.2",)]),
    ("SELECT length(bar(5, 0, 10, 20))", [(20,)]),
    ("SELECT to_base(5, 2, 8)", [("00000101",)]),
    ("SELECT list_resize([1, 2], 4, 0)", [([1, 2, 0, 0],)]),
    ("SELECT repeat([1, 2], 2)", [([1, 2, 1, 2],)]),
    ("SELECT range(3), range(1, 7, 2), generate_series(3, 1, -1)", [([0, 1, 2], [1, 3, 5], [3, 2, 1])]),
    ("SELECT range(5, 0), range(0, 10, -1)", [([], [])]),
    ("SELECT list_sum(list_transform(range(100000), lambda x: x * 2))", [(9_999_900_000,)]),
    ("SELECT list_reduce(range(5), lambda a, x: a + x)", [(10,)]),
    ("SELECT list_reduce(['a', 'b', 'c'], lambda a, x: a || ',' || x)", [("a,b,c",)]),
    ("SELECT sum(list_reduce(l, lambda a, x: a + x)) FROM demo.t", [(100,)]),
    ("SELECT [x * 10 FOR x IN range(3) IF x > 0]", [([10, 20],)]),
    ("SELECT replace('a-b-c', '-', '+'), regexp_replace('aaa', 'a', 'bb', 'g')", [("a+b+c", "bbbbbb")]),
    ("SELECT max(id, 3), min(id, 2), arg_max(s, id, 1) FROM demo.t", [([9, 8, 7], [0, 1], ["name 9"])]),
    ("SELECT list_aggregate([3, 1, 2], 'max'), list_aggr([1, 2], 'sum')", [(3, 3)]),
    ("SELECT count(*) FROM (SELECT unnest(range(100000)))", [(100_000,)]),
    ("WITH c AS (SELECT range(1000) r) SELECT length(list_concat(r, r)) FROM c", [(2000,)]),
    ("SELECT length(repeat(s, 3)) FROM demo.t WHERE id = 1", [(18,)]),
    ("SELECT invoke(lambda x: x + 1, 41)", [(42,)]),
    ("SELECT length(generate_series(DATE '2024-01-01', DATE '2024-12-31', INTERVAL 1 DAY))", [(366,)]),
    ("SELECT length(range(TIMESTAMP '2024-01-01', TIMESTAMP '2024-01-02', INTERVAL '1 hour'))", [(24,)]),
    ("SELECT length(generate_series(DATE '2024-01-01', DATE '2024-12-01', INTERVAL 1 MONTH))", [(12,)]),
    (
        "SELECT upper(s), hex('a'), to_json(l), array_to_string(l, '-') FROM demo.t WHERE id = 1",
        [("NAME 1", "61", "[1,2]", "1-2")],
    ),
    ("SELECT json_pretty('[1]') = json_pretty('[1]'), concat_ws('/', 'a', 'b')", [(True, "a/b")]),
    # in FROM, range() and generate_series() stream rows under the query's limits
    ("SELECT count(*) FROM range(3000000)", [(3_000_000,)]),
    ("SELECT max(i) FROM range(1000000000000) r(i) WHERE i < 5 LIMIT 1", None),
    ("SELECT sum(x) FROM demo.t, range(demo.t.n) r(x)", [(30,)]),
    ("SELECT count(*) FROM generate_series(DATE '2024-01-01', DATE '2024-12-31', INTERVAL 1 DAY)", [(366,)]),
]


@pytest.mark.parametrize(("sql", "expected"), ACCEPTED, ids=range(len(ACCEPTED)))
def test_everyday_builders_run(env: Env, sql: str, expected: list[tuple[object, ...]] | None) -> None:
    if expected is None:
        env.guard.check(env.agent, sql)
        return
    assert run(env, sql) == expected


#: Small values read many times: DuckDB folds each expression while planning, where no timeout
#: reaches (levenshtein of two 1 M strings would run for half an hour).
TOO_SLOW = [
    "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))",
    "SELECT damerau_levenshtein(repeat('a', 20000), repeat('b', 20000))",
    # a row's value against a large constant: per row at run time, 2,048 rows per vector
    "SELECT id FROM demo.t WHERE "
    + " OR ".join(f"levenshtein(s || s, repeat('{c}', 100000)) < 3" for c in "abcdefghi"),
    "SELECT " + ", ".join(["list_sort(r)"] * 300) + " FROM (SELECT range(100000) r)",
    "SELECT list_transform(range(100000), lambda x: levenshtein(repeat('a', 1000), repeat('b', 1000)))",
    "SELECT list_transform(range(100000), lambda x: list_sum(range(1000)))",
]


@pytest.mark.parametrize("sql", TOO_SLOW, ids=range(len(TOO_SLOW)))
def test_folding_work_is_bounded(env: Env, sql: str) -> None:
    err = refusal(env, sql)
    assert isinstance(err, InvalidArgument) and f"{MAX_FOLD_WORK:,}" in err.detail, err.detail


def test_folding_work_allows_everyday_queries(env: Env) -> None:
    assert run(env, "SELECT min(levenshtein(s, 'name 3')) FROM demo.t") == [(0,)]
    assert (
        run(env, "SELECT " + ", ".join(["list_sum(r)"] * 50) + " FROM (SELECT range(1000) r)")[0][0]
        == 499_500
    )


def test_nested_lambdas_are_bounded_in_depth_and_work(env: Env) -> None:
    """Each lambda level is sized by probing its body, so nesting multiplies the guard's work:
    too deep or too much is a clean refusal, never a slow check."""
    body = "x"
    for _ in range(7):
        body = f"list_sum(list_transform([1, 2], lambda x: {body}))"
    assert "nested more than" in refusal(env, f"SELECT {body}").detail

    def wide(depth: int) -> str:
        return "x" if depth == 0 else f"list_transform([1], lambda x: [{', '.join([wide(depth - 1)] * 4)}])"

    assert "too complex" in refusal(env, f"SELECT {wide(6)}").detail
    assert run(env, f"SELECT length({wide(3)})") == [(1,)]


def test_every_builder_is_a_builtin(env: Env) -> None:
    """The classification names real DuckDB functions (a rename would silently unbound one)."""
    with env.db.reading() as cur:
        names = {r[0] for r in cur.execute("SELECT function_name FROM duckdb_functions()").fetchall()}
    assert set(BUILDER_FUNCTIONS) <= names


def test_duckdb_really_builds_the_value_while_binding(env: Env) -> None:
    """Why the guard must refuse: binding alone (GetFlightInfo's LIMIT 0 planning) allocates the
    value. Measured in a child process so this test never strains the machine: the child's peak
    memory grows by the value's size for 200 M characters, and not for the guard's bound."""
    # Peak RSS from /proc (VmHWM, per address space): ru_maxrss would carry pytest's own peak
    # across fork and exec.
    script = (
        "import sys, duckdb\n"
        "def peak():\n"
        "    lines = open('/proc/self/status').read().splitlines()\n"
        "    return int(next(ln for ln in lines if ln.startswith('VmHWM')).split()[1])\n"
        "c = duckdb.connect(); c.execute('SET threads = 1')\n"
        "before = peak()\n"
        "c.sql(f'SELECT * FROM ({sys.argv[1]}) LIMIT 0').fetchall()\n"
        "print((peak() - before) // 1024)\n"
    )

    def grown_mb(sql: str) -> int:
        out = subprocess.run([sys.executable, "-c", script, sql], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    big = "SELECT length(repeat('x', 200000000)) AS v"
    assert grown_mb(big) >= 150
    assert grown_mb(f"SELECT length(repeat('x', {MAX_BUILT_UNITS})) AS v") < 64
    assert isinstance(refusal(env, big), InvalidArgument)


# --- defect 6: catalog metadata outside the allowlist ---------------------------------------

#: Probes with {obj} standing for an object of the non-allowlisted schema hr; each is run for an
#: existing object and a missing one and must be refused identically.
PROBES = [
    ("SELECT enum_range(NULL::hr.{obj})", "band"),
    ("SELECT enum_first(NULL::hr.{obj}), enum_last(NULL::hr.{obj})", "band"),
    ("SELECT 'junior'::hr.{obj}", "band"),
    ("SELECT CAST('junior' AS hr.{obj})", "band"),
    ("SELECT TRY_CAST('x' AS hr.{obj})", "band"),
    ("SELECT NULL::hr.{obj}[]", "band"),
    ("SELECT NULL::STRUCT(a hr.{obj})", "band"),
    ("SELECT NULL::MAP(VARCHAR, hr.{obj})", "band"),
    ("SELECT [x::hr.{obj} FOR x IN ['junior']]", "band"),
    ("SELECT * FROM demo.t WHERE s::hr.{obj} IS NULL", "band"),
    ("SELECT cast_to_type('junior', NULL::hr.{obj})", "band"),
    ("SELECT typeof(NULL::{obj})", "band"),
    ("SELECT NULL::main.{obj}", "band"),
    ("SELECT NULL::quiver.hr.{obj}", "band"),
]


def _probe_pairs() -> list[tuple[str, str]]:
    return [(p.format(obj=existing), p.format(obj=existing + "_missing")) for p, existing in PROBES]


@pytest.mark.parametrize(("existing", "missing"), _probe_pairs(), ids=range(len(PROBES)))
def test_type_probes_read_like_a_missing_table(env: Env, existing: str, missing: str) -> None:
    a, b = refusal(env, existing), refusal(env, missing)
    assert isinstance(a, PermissionDenied) and isinstance(b, PermissionDenied)
    assert NOT_READABLE in a.detail
    assert a.detail == b.detail.replace("band_missing", "band"), (a.detail, b.detail)


CATALOG_FUNCTIONS = [
    ("SELECT index_key({{'schema': 'hr', 'table': '{obj}'}}, 'x', 'x')", "staff", "index_key()"),
    ("SELECT index_key({{'schema': '_quiver', 'table': '{obj}'}}, 'x', 'x')", "tokens", "index_key()"),
    ("SELECT make_type('hr.{obj}')", "band", "make_type()"),
    ("SELECT to_aggregate_state(1, '{obj}', [])", "sum", "to_aggregate_state()"),
]


@pytest.mark.parametrize(
    ("template", "existing", "offender"), CATALOG_FUNCTIONS, ids=range(len(CATALOG_FUNCTIONS))
)
def test_catalog_resolvers_are_refused_identically(
    env: Env, template: str, existing: str, offender: str
) -> None:
    a = refusal(env, template.format(obj=existing))
    b = refusal(env, template.format(obj=existing + "_missing"))
    assert isinstance(a, PermissionDenied) and type(a) is type(b)
    assert offender in a.detail and a.detail == b.detail


def test_the_probes_really_leak_without_the_guard(env: Env) -> None:
    """The same probes on the same file, straight into DuckDB: they do reveal hr's metadata."""
    with env.db.reading() as cur:
        assert cur.execute("SELECT enum_range(NULL::hr.band)").fetchall() == [
            (["junior", "senior", "principal"],)
        ]
        with pytest.raises(Exception, match="staff_pay_idx"):
            cur.execute("SELECT index_key({'schema': 'hr', 'table': 'staff'}, 'x', 'x')").fetchall()


def test_enum_columns_of_readable_tables_still_work(env: Env) -> None:
    assert run(env, "SELECT count(*) FROM demo.t WHERE mood = 'happy'") == [(5,)]
    assert run(env, "SELECT DISTINCT mood::VARCHAR AS m FROM demo.t ORDER BY m") == [("happy",), ("sad",)]
    assert run(env, "SELECT enum_range(mood) FROM demo.t LIMIT 1") == [(["happy", "sad"],)]
    # naming even a readable schema's type is refused: only built-in types may be named
    assert NOT_READABLE in refusal(env, "SELECT NULL::demo.mood").detail


def test_builtin_types_may_be_named(env: Env) -> None:
    sql = (
        "SELECT 1::TINYINT, 2::HUGEINT, '1.5'::DECIMAL(10, 2), 'x'::VARCHAR(3), '{}'::JSON, "
        "[1]::INTEGER[], [1]::INTEGER[1], {'a': 1}::STRUCT(a BIGINT), MAP {'k': 1}::MAP(VARCHAR, INT), "
        "'2024-01-01'::TIMESTAMPTZ IS NOT NULL, TRY_CAST('x' AS UUID), 'ab'::BLOB, 1::UNION(i INT, s TEXT)"
    )
    assert len(run(env, sql)[0]) == 13


def test_aggregates_named_by_string_are_checked_as_calls(env: Env) -> None:
    assert "nextval()" in refusal(env, "SELECT list_aggregate([1], 'nextval')").detail
    assert "current_setting()" in refusal(env, "SELECT list_aggr([1], 'current_setting')").detail


def test_side_effect_functions_are_denied(env: Env) -> None:
    for name in ("write_log", "sleep_ms", "index_key", "make_type", "to_aggregate_state"):
        assert name in DENIED_FUNCTIONS
    assert "sleep_ms()" in refusal(env, "SELECT sleep_ms(100000)").detail


# --- defect 8: parameter indexes -------------------------------------------------------------


@pytest.mark.parametrize("index", [MAX_PARAM_INDEX + 1, 1_000_000, 10**17])
def test_parameter_indexes_beyond_the_maximum_are_refused(env: Env, index: int) -> None:
    err = refusal(env, f"SELECT ${index}")
    assert isinstance(err, InvalidArgument)
    assert len(err.detail) < 200 and f"{MAX_PARAM_INDEX:,}" in err.detail


def test_the_highest_parameter_index_is_accepted(env: Env) -> None:
    q = env.guard.check(env.agent, f"SELECT ${MAX_PARAM_INDEX}")
    assert q.param_count == MAX_PARAM_INDEX
