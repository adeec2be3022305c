"""The guard's parse cache keyed by the text's shape (issue #10: a fresh literal must not cost a
DuckDB parse), held to one rule: a guard answering from the shape cache says exactly what a guard
that parses the text in full says — the same acceptance, the same refusal class and sentence,
the same statement text, tables, parameters, normalized tree and fingerprint.

The properties generate queries from templates with random literals: small and huge numbers in
builder sizes, format strings, aggregate names that are denied functions, strings that look like
identifiers, tables, comments or SQL, and edge spellings the cache does not substitute (``-5``,
``1e5``, ``E''``, dollar quoting). The cached guard is warmed with each template first, so its
answers come from the shape cache wherever the template is cacheable (checked by its hit count).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from catalog.errors import InvalidArgument, PermissionDenied
from catalog.identity import Principal
from catalog.sqlguard import _PARSE_CACHE_ENTRIES, _PARSE_CACHE_MAX_CHARS, GuardedQuery, SqlGuard
from flight_server.cache import sql_digest
from tests.guard_support import analyst, guard_database

SETUP = """
CREATE SCHEMA demo;
CREATE TABLE demo.orders AS SELECT i AS id, 'x' || i AS s, [i] AS l, i * 1.5 AS amount FROM range(5) r(i);
CREATE SCHEMA secret;
CREATE TABLE secret.salaries AS SELECT 1 AS id, 100 AS pay;
CREATE TYPE secret.band AS ENUM ('a', 'b');
"""

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
    database=None,
)


@dataclass
class Env:
    cached: SqlGuard
    fresh: SqlGuard
    agent: Principal


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db, tables, policy = guard_database(tmp_path_factory.mktemp("guard_shape"), SETUP)
    agent = analyst("shape")
    yield Env(
        cached=SqlGuard(tables, policy, db.catalog_name),
        fresh=SqlGuard(tables, policy, db.catalog_name),
        agent=agent,
    )
    db.close()


Outcome = GuardedQuery | tuple[type, str]


def outcome(guard: SqlGuard, agent: Principal, sql: str) -> Outcome:
    try:
        return guard.check(agent, sql)
    except (InvalidArgument, PermissionDenied) as e:
        return type(e), e.detail


def full(env: Env, sql: str) -> Outcome:
    """The verdict of a full parse: the fresh guard's parse caches are emptied first."""
    with env.fresh._lock:
        env.fresh._parsed.clear()
        env.fresh._shapes.clear()
    return outcome(env.fresh, env.agent, sql)


def assert_same(cached: Outcome, fresh: Outcome, sql: str) -> None:
    if isinstance(fresh, GuardedQuery):
        assert isinstance(cached, GuardedQuery), (sql, cached)
        assert cached == fresh, sql
        assert cached.fingerprint == fresh.fingerprint, sql
    else:
        assert cached == fresh, sql


# --- literals -------------------------------------------------------------------------------

EDGE_INTS = [0, 1, 7, 99_999, 100_000, 100_001, 500_000, 1_000_000, 2**31, 2**63, 10**30, 10**31, 10**400]
ints = st.one_of(
    st.sampled_from(EDGE_INTS),
    st.integers(0, 20),
    st.integers(0, 300_000),
    st.integers(0, 10**45),
).map(str)
spelled_ints = st.one_of(
    ints,
    ints.map(lambda s: "00" + s),  # leading zeros: still an INTEGER literal
    ints.map(lambda s: s + ".0"),
    ints.map(lambda s: s + "e0"),  # an exponent: not substituted, parsed in full
    ints.map(lambda s: "-" + s),  # folded with its sign by the parser: parsed in full
)
LOOKALIKES = [
    "sum",
    "max",
    "string_agg",
    "current_setting",
    "getenv",
    "query",
    "duckdb_tables",
    "pg_sleep",
    "secret.salaries",
    "demo.orders",
    "information_schema.tables",
    "/etc/passwd",
    "x.csv",
    "%999999d",
    "%5d",
    "%*d",
    "{:>999999}",
    "{:>5}",
    "1e9",
    " 123 ",
    "-5",
    "100001",
    "99999",
    "1 day",
    "1000000 days",
    "'",
    "''",
    "--",
    "/*",
    "*/",
    "\n",
    "x'||'y",
    ";select 1",
    "$$",
    "\\",
    "Ü",
    "",
]
strings = st.one_of(
    st.sampled_from(LOOKALIKES),
    st.text(max_size=12),
    st.text(alphabet="ab'%{}:>0123456789 .-;*/\\$", max_size=16),
)


def sq(text: str) -> str:
    """A standard SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


spelled_strings = st.one_of(
    strings.map(sq),
    strings.filter(lambda s: "$" not in s).map(lambda s: f"$${s}$$"),  # dollar quoting: parsed in full
    strings.filter(lambda s: "\\" not in s and "'" not in s).map(lambda s: f"E'{s}'"),
)
decimals = st.tuples(ints, st.integers(0, 10**6)).map(lambda p: f"{p[0]}.{p[1]}")

#: (template, what each slot holds). Slots are ``{0}``, ``{1}``, …: i = integer, s = string,
#: d = decimal.
TEMPLATES: list[tuple[str, str]] = [
    ("SELECT * FROM demo.orders WHERE id = {0}", "i"),
    ("SELECT id, s FROM demo.orders WHERE s = {0} AND id > {1} LIMIT {2} OFFSET {3}", "siii"),
    ("SELECT repeat({0}, {1})", "si"),
    ("SELECT repeat(s, {0}) FROM demo.orders", "i"),
    ("SELECT range({0}, {1}, {2})", "iii"),
    ("SELECT generate_series({0}, {1})", "ii"),
    ("SELECT lpad(s, {0}, {1}) FROM demo.orders", "is"),
    ("SELECT printf({0}, id) FROM demo.orders", "s"),
    ("SELECT format({0}, {1})", "ss"),
    ("SELECT list_aggregate(l, {0}) FROM demo.orders", "s"),
    ("SELECT list_aggregate(l, 'string_agg', {0}) FROM demo.orders", "s"),
    ("SELECT list_resize(l, {0}, {1}) FROM demo.orders", "ii"),
    ("SELECT bar(id, {0}, {1}, {2}) FROM demo.orders", "iii"),
    ("SELECT to_base(id, 2, {0}) FROM demo.orders", "i"),
    ("SELECT equi_width_bins(0, 10, {0}, true)", "i"),
    ("SELECT max(id, {0}), approx_top_k(s, {1}) FROM demo.orders", "ii"),
    ("SELECT repeat('x', {0}::INTEGER)", "s"),
    ("SELECT repeat('ab', CAST({0} AS BIGINT) * {1})", "si"),
    ("SELECT amount * {0} + {1} FROM demo.orders WHERE amount < {2}", "ddd"),
    ("SELECT CAST(amount AS DECIMAL({0}, {1})) FROM demo.orders", "ii"),
    ("SELECT {0}::INTERVAL, range(TIMESTAMP '2024-01-01', TIMESTAMP '2024-02-01', {1}::INTERVAL)", "ss"),
    ("SELECT * FROM demo.orders WHERE s IN ({0}, {1}) OR id IN ({2}, {3})", "ssii"),
    ("SELECT CASE WHEN id = {0} THEN {1} ELSE {2} END FROM demo.orders", "iss"),
    ("SELECT {0} AS a, {1} AS b -- {2}\n", "sis"),
    ("SELECT * FROM demo.orders, secret.salaries WHERE pay = {0}", "i"),
    ("SELECT {0}::secret.band", "s"),
    ("SELECT * FROM {0}", "s"),
    ("SELECT levenshtein(repeat('a', {0}), repeat('b', {1}))", "ii"),
    ("SELECT list_transform(range({0}), x -> repeat('y', {1}))", "ii"),
    ("WITH c AS (SELECT repeat({0}, {1}) AS v) SELECT repeat(v, {2}) FROM c", "sii"),
    ("SELECT {{'k': {0}}}", "i"),
    ("PIVOT demo.orders ON s IN ({0}, {1}) USING sum(id)", "ss"),
]
PLAIN = {"i": ints, "s": strings.map(sq), "d": decimals}
EDGY = {"i": spelled_ints, "s": spelled_strings, "d": decimals}


def values(kinds: str, table: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.tuples(*(table[k] for k in kinds))


def warming(template: str, kinds: str) -> list[str]:
    return [
        template.format(*("7" if k == "i" else "'sum'" if k == "s" else "1.5" for k in kinds)),
        template.format(*("8" if k == "i" else "'max'" if k == "s" else "2.5" for k in kinds)),
    ]


@pytest.mark.parametrize(("template", "kinds"), TEMPLATES, ids=[t for t, _ in TEMPLATES])
@SETTINGS
@given(data=st.data())
def test_shape_cached_verdict_is_the_full_guards(
    env: Env, template: str, kinds: str, data: st.DataObject
) -> None:
    # Warm the cache with this template (a text learns the shape, one with every literal
    # different proves it), then compare on random literals.
    for warm in warming(template, kinds):
        assert_same(outcome(env.cached, env.agent, warm), full(env, warm), warm)
    table = data.draw(st.sampled_from([PLAIN, EDGY]))
    sql = template.format(*data.draw(values(kinds, table)))
    assert_same(outcome(env.cached, env.agent, sql), full(env, sql), sql)


@SETTINGS
@given(st.data())
def test_different_literals_never_share_a_cache_key(env: Env, data: st.DataObject) -> None:
    """Two texts that differ in a literal's value get different normalized trees, fingerprints
    and result-cache digests, from the shape cache as from a full parse."""
    template, kinds = data.draw(st.sampled_from(TEMPLATES[:2] + TEMPLATES[18:19] + TEMPLATES[21:23]))
    a = data.draw(values(kinds, PLAIN))
    b = data.draw(values(kinds, PLAIN).filter(lambda v: v != a))
    qa, qb = (outcome(env.cached, env.agent, template.format(*v)) for v in (a, b))
    assume(isinstance(qa, GuardedQuery) and isinstance(qb, GuardedQuery))
    assert isinstance(qa, GuardedQuery) and isinstance(qb, GuardedQuery)
    assert qa.normalized != qb.normalized
    assert qa.fingerprint != qb.fingerprint
    assert sql_digest(qa.normalized) != sql_digest(qb.normalized)
    assert qa.sql == template.format(*a) and qb.sql == template.format(*b)


def _hits(guard: SqlGuard, agent: Principal, sqls: list[str]) -> int:
    before = guard.shape_hits
    for sql in sqls:
        outcome(guard, agent, sql)
    return guard.shape_hits - before


def test_a_fresh_literal_is_answered_without_a_parse(env: Env) -> None:
    sqls = [f"SELECT * FROM demo.orders WHERE id = {k} AND s <> 'q{k}'" for k in range(4700, 4720)]
    # the first text learns the shape, the second proves it, the rest are answered from it
    assert _hits(env.cached, env.agent, sqls) == len(sqls) - 2
    for sql in sqls:
        assert_same(outcome(env.cached, env.agent, sql), full(env, sql), sql)


@pytest.mark.parametrize(
    "pair",
    [
        ("SELECT -5 + id FROM demo.orders", "SELECT -6 + id FROM demo.orders"),  # sign folded
        ("SELECT DATE '2024-01-01'", "SELECT DATE '2024-01-02'"),  # constant without a position
        ("SELECT {'k': 1}", "SELECT {'j': 1}"),  # a string used as a name
        ("SELECT * FROM 'a.csv'", "SELECT * FROM 'b.csv'"),  # a string used as a table
        ("SELECT 'a'\n'b'", "SELECT 'c'\n'd'"),  # two literals, one constant
        ("SELECT 1e5", "SELECT 2e5"),
        ("SELECT E'a'", "SELECT E'b'"),
        ("SELECT 1_000", "SELECT 2_000"),
        ("SELECT 'x' AS 'y'", "SELECT 'x' AS 'z'"),
    ],
)
def test_literals_that_are_not_plain_constants_are_parsed_in_full(env: Env, pair: tuple[str, str]) -> None:
    assert _hits(env.cached, env.agent, list(pair)) == 0
    for sql in pair:
        assert_same(outcome(env.cached, env.agent, sql), full(env, sql), sql)


def test_a_shape_hit_still_bounds_the_text(env: Env) -> None:
    """A longer literal in a cached shape meets the same length and NUL checks as a parse."""
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver", max_sql_chars=60)
    short = "SELECT * FROM demo.orders WHERE s = 'a'"
    assert isinstance(outcome(guard, env.agent, short), GuardedQuery)
    assert isinstance(outcome(guard, env.agent, short.replace("'a'", "'b'")), GuardedQuery)
    assert isinstance(outcome(guard, env.agent, short.replace("'a'", "'c'")), GuardedQuery)
    assert guard.shape_hits == 1
    long = short.replace("'a'", "'" + "x" * 40 + "'")
    assert outcome(guard, env.agent, long) == (
        InvalidArgument,
        f"the query is {len(long)} characters long; at most 60 are accepted",
    )
    nul = short.replace("'a'", "'\x00'")
    assert outcome(guard, env.agent, nul) == (
        InvalidArgument,
        "the query contains a NUL character; send plain SQL text",
    )
    assert guard.shape_hits == 1


def test_a_value_free_shape_skips_the_size_bounds_it_passed(env: Env) -> None:
    """A shape whose literals are numbers outside any function (a point query) gets the same
    size bounds for every text, so once they passed, its shape hits skip the sizer walk — and
    answer exactly what a full parse answers."""
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver")
    sqls = [f"SELECT * FROM demo.orders WHERE id = {k} AND amount < {k}.5" for k in range(10, 20)]
    for sql in sqls:
        assert_same(outcome(guard, env.agent, sql), full(env, sql), sql)
    # learnt, proven, then the first shape hit records the pass; every later hit skips
    assert guard.shape_hits == len(sqls) - 2
    assert guard.sized_hits == len(sqls) - 3
    huge = "SELECT * FROM demo.orders WHERE id = " + "9" * 400 + " AND amount < 1.5"
    assert_same(outcome(guard, env.agent, huge), full(env, huge), huge)
    assert guard.sized_hits == len(sqls) - 2


@pytest.mark.parametrize(
    ("template", "small", "huge"),
    [
        # a literal under a function: its value is a size (sized on every check)
        ("SELECT repeat(s, {}) FROM demo.orders WHERE id = 1", [3, 4, 5, 6], "5000000000"),
        # a string literal outside any function: its length is a size (of the CTE's column)
        (
            "WITH c AS (SELECT {} AS v) SELECT v || v FROM c",
            ["'a'", "'b'", "'c'", "'d'"],
            "'" + "x" * 60_000 + "'",
        ),
    ],
)
def test_a_shape_whose_sizes_depend_on_its_literals_is_always_sized(
    env: Env, template: str, small: list[object], huge: str
) -> None:
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver", max_sql_chars=300_000)
    for value in small:
        sql = template.format(value)
        assert isinstance(outcome(guard, env.agent, sql), GuardedQuery), sql
    assert guard.shape_hits == len(small) - 2
    sql = template.format(huge)
    refused = outcome(guard, env.agent, sql)
    assert isinstance(refused, tuple) and refused[0] is InvalidArgument, refused
    assert refused == full(env, sql)
    assert guard.sized_hits == 0
    # the refusal left the shape as it was: a small value is still accepted from it
    assert isinstance(outcome(guard, env.agent, template.format(small[0])), GuardedQuery)


def test_a_value_free_shape_the_sizer_refuses_is_refused_on_every_hit(env: Env) -> None:
    """A refusal of the size bounds is never remembered as a pass: each text is sized again."""
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver")
    answers = [
        outcome(guard, env.agent, f"SELECT repeat(s, id) FROM demo.orders WHERE id = {k}") for k in range(6)
    ]
    assert guard.shape_hits == 4 and guard.sized_hits == 0
    assert all(isinstance(a, tuple) and a[0] is PermissionDenied for a in answers), answers
    assert len({a for a in answers if isinstance(a, tuple)}) == 1


def test_the_shape_cache_is_bounded(env: Env) -> None:
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver")
    for n in range(_PARSE_CACHE_ENTRIES + 40):
        guard.check(env.agent, f"SELECT {n} AS c{n}")
    assert len(guard._shapes) == _PARSE_CACHE_ENTRIES
    assert len(guard._parsed) == _PARSE_CACHE_ENTRIES
    pad = "x" * _PARSE_CACHE_MAX_CHARS
    guard.check(env.agent, f"SELECT 1 AS {pad}")
    guard.check(env.agent, f"SELECT 2 AS {pad}")
    assert pad not in "".join(guard._shapes) and guard.shape_hits == 0


def test_concurrent_checks_agree_with_the_full_guard(env: Env) -> None:
    """Threads checking fresh literals of a few shapes at once: every answer is the full
    guard's (computed up front), and the cache served most of them."""
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver")
    shapes = [
        "SELECT * FROM demo.orders WHERE id = {0}",
        "SELECT repeat('x', {0})",
        "SELECT lpad(s, {0}, '.') FROM demo.orders",
    ]
    sqls = [t.format(n) for t in shapes for n in (3, 50_000, 100_001, 10**20, 12, 99_999)]
    expected = {sql: full(env, sql) for sql in sqls}
    failures: list[str] = []

    def run(seed: int) -> None:
        for i in range(60):
            sql = sqls[(seed * 7 + i) % len(sqls)]
            got = outcome(guard, env.agent, sql)
            if got != expected[sql]:
                failures.append(sql)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert guard.shape_hits > 0
    assert guard.sized_hits > 0  # the point query's shape skipped the sizer, racing the others


#: Templates whose literals are not all plain constants (a string in FROM, in a comment, as a
#: struct key; TIMESTAMP literals carry no position): always parsed in full.
UNCACHED = {
    "SELECT {0}::INTERVAL, range(TIMESTAMP '2024-01-01', TIMESTAMP '2024-02-01', {1}::INTERVAL)",
    "SELECT {0} AS a, {1} AS b -- {2}\n",
    "SELECT * FROM {0}",
    "SELECT {{'k': {0}}}",
}


@pytest.mark.parametrize(("template", "kinds"), TEMPLATES, ids=[t for t, _ in TEMPLATES])
def test_the_properties_exercise_the_shape_cache(env: Env, template: str, kinds: str) -> None:
    """The property above compares cached answers only if the cache answers: every template
    not in UNCACHED is served from its shape on a second literal."""
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver")
    third = template.format(*("9" if k == "i" else "'min'" if k == "s" else "3.5" for k in kinds))
    assert _hits(guard, env.agent, [*warming(template, kinds), third]) == (0 if template in UNCACHED else 1)
    assert_same(outcome(guard, env.agent, third), full(env, third), third)


def test_a_shape_with_a_fixed_literal_is_proven_by_a_changed_variant(env: Env) -> None:
    """A literal that keeps its value between the learning and the proving text (a fixed
    'open' beside a changing id) is proven by one more parse, every literal changed; then the
    shape answers for any value of either literal."""
    guard = SqlGuard(env.cached._tables, env.cached._policy, "quiver")
    q = "SELECT * FROM demo.orders WHERE id = {0} AND s = {1}"
    assert _hits(guard, env.agent, [q.format(1, "'open'"), q.format(2, "'open'")]) == 0
    texts = [q.format(3, "'open'"), q.format(4, "'it''s'"), q.format(10**30, "'secret.salaries'")]
    assert _hits(guard, env.agent, texts) == len(texts)
    for sql in texts:
        assert_same(outcome(guard, env.agent, sql), full(env, sql), sql)
