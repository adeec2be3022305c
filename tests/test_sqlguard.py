"""The SQL guard (the first layer: ARCHITECTURE.md, proto_docs/descriptors.md) against a real,
locked-down DuckDB file.

Every accepted query is also executed on that file (parameters bound by DuckDB) and its plan
is read back with DuckDB's own ``json_serialize_plan``: the tables DuckDB really scans must be
among the tables the guard checked. Every refusal asserts the error class, that the message
names the offender and, for tables, that it lists what the caller may read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from catalog.database import Database
from catalog.errors import InvalidArgument, PermissionDenied, QuiverError
from catalog.identity import Principal
from catalog.policy import HINT_NAMES, NOT_READABLE, Policy, closest_readable, readable_hint
from catalog.sqlguard import (
    ALLOWED_TABLE_FUNCTIONS,
    DENIED_FUNCTIONS,
    GuardedQuery,
    SqlGuard,
)
from catalog.tables import TableCatalog, TableRef
from tests.guard_support import guard_database

READABLE = {"demo.accounts", "demo.customers", "demo.orders", "demo.ünicode"}


def suggested(detail: str) -> list[str]:
    """The names a refusal suggests, in its order."""
    return detail.rsplit("; you may read: ", 1)[1].split(" (the ", 1)[0].split(", ")


SETUP = """
CREATE SCHEMA demo;
CREATE TABLE demo.orders AS
    SELECT i AS id, i % 7 AS customer_id,
           CASE WHEN i % 3 = 0 THEN 'open' WHEN i % 3 = 1 THEN 'paid' ELSE 'void' END AS status,
           (i * 1.5)::DOUBLE AS amount,
           DATE '2024-01-01' + (i % 30)::INTEGER AS created,
           [i, i + 1] AS tags,
           {'channel': 'web', 'score': i % 5} AS info,
           '{"a": 1, "b": [1, 2]}' AS payload
    FROM range(200) r(i);
CREATE TABLE demo.customers AS
    SELECT i AS id, 'customer ' || i AS name, CASE WHEN i % 2 = 0 THEN 'north' ELSE 'south' END AS region
    FROM range(7) r(i);
CREATE TABLE demo.accounts AS SELECT 'bob' AS "user", 'x' AS current_schema, 1 AS id;
CREATE TABLE demo."ünicode" AS SELECT 1 AS id;
CREATE SCHEMA secret;
CREATE TABLE secret.salaries AS SELECT i AS id, 100000 + i AS pay FROM range(7) r(i);
CREATE TABLE main.orders AS SELECT 'main.orders is not allowlisted' AS note;
CREATE TABLE main.salaries AS SELECT 42 AS pay;
CREATE TABLE main."Ünicode" AS SELECT 'forbidden' AS note;
CREATE VIEW demo.salaries_view AS SELECT * FROM secret.salaries;
CREATE MACRO demo.leak() AS (SELECT max(pay) FROM secret.salaries);
CREATE MACRO demo.leak_rows() AS TABLE SELECT * FROM secret.salaries;
CREATE MACRO main.reverse(x) AS (SELECT max(pay)::VARCHAR FROM secret.salaries);
CREATE MACRO main.json_tree(x) AS TABLE SELECT * FROM secret.salaries;
"""


@dataclass
class Env:
    db: Database
    guard: SqlGuard
    agent: Principal
    swarm: Principal
    admin: Principal
    stranger: Principal
    policy: Policy


def _principal(kind: str, swarm: str | None = None) -> Principal:
    return Principal(
        kind=kind,  # type: ignore[arg-type]
        jti=f"jti-{kind}-{swarm}",
        subject=f"{kind}-subject",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        swarm=swarm,
        agent="a1" if kind == "agent" else None,
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db, tables, policy = guard_database(tmp_path_factory.mktemp("sqlguard"), SETUP)
    policy.set_allowlist("empty", [])
    guard = SqlGuard(tables, policy, db.catalog_name)
    yield Env(
        db=db,
        guard=guard,
        agent=_principal("agent", "analysts"),
        swarm=_principal("swarm", "analysts"),
        admin=_principal("admin"),
        stranger=_principal("agent", "empty"),
        policy=policy,
    )
    db.close()


def plan_tables(cur: duckdb.DuckDBPyConnection, sql: str) -> set[tuple[str, str]] | None:
    """What DuckDB's bound plan reads: (schema, table) for table scans and ("()", name) for
    table functions (system views such as duckdb_tables are table functions underneath), or
    None if the plan cannot be serialized."""
    raw = cur.execute("SELECT json_serialize_plan(?)", [sql]).fetchall()[0][0]
    plan = json.loads(raw)
    if plan.get("error"):
        return None
    found: set[tuple[str, str]] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("type") == "LOGICAL_GET":
                data = node.get("function_data")
                if isinstance(data, dict) and "table" in data:
                    found.add((data["schema"].lower(), data["table"].lower()))
                else:
                    found.add(("()", str(node["qname"]["path"][-1])))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(plan)
    return found


def run(env: Env, q: GuardedQuery, params: list[object]) -> list[tuple[object, ...]]:
    with env.db.reading() as cur:
        rows = cur.execute(q.sql, params).fetchall()
        if not params:
            scanned = plan_tables(cur, q.sql)
            if scanned is not None:
                allowed = {t.key() for t in q.tables} | {("()", f) for f in ALLOWED_TABLE_FUNCTIONS}
                assert scanned <= allowed, (q.sql, scanned, q.tables)
    return rows


# --- legitimate queries -------------------------------------------------------------------
# (sql, params, tables the guard must report)
ALLOWED: list[tuple[str, list[object], set[str]]] = [
    (
        "SELECT o.id, c.name FROM demo.orders o JOIN demo.customers c ON c.id = o.customer_id "
        "WHERE o.amount > ? ORDER BY o.id",
        [10],
        {"demo.orders", "demo.customers"},
    ),
    (
        "SELECT id, row_number() OVER (PARTITION BY customer_id ORDER BY amount DESC) AS rn, "
        "sum(amount) OVER w AS running, lag(amount, 1, 0) OVER w AS prev "
        "FROM demo.orders WINDOW w AS (ORDER BY id ROWS BETWEEN 2 PRECEDING AND CURRENT ROW)",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT customer_id, id FROM demo.orders "
        "QUALIFY row_number() OVER (PARTITION BY customer_id ORDER BY amount DESC) = 1",
        [],
        {"demo.orders"},
    ),
    (
        "WITH big AS (SELECT * FROM demo.orders WHERE amount > 100), "
        "n AS (SELECT customer_id, count(*) AS c FROM big GROUP BY customer_id) "
        "SELECT * FROM n JOIN demo.customers c ON c.id = n.customer_id",
        [],
        {"demo.orders", "demo.customers"},
    ),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
        "SELECT r.n, x.range FROM r, range(r.n) x",
        [],
        set(),
    ),
    (
        "SELECT id FROM demo.orders WHERE status = 'open' UNION SELECT id FROM demo.customers "
        "INTERSECT SELECT customer_id FROM demo.orders EXCEPT SELECT 3",
        [],
        {"demo.orders", "demo.customers"},
    ),
    ("SELECT * FROM demo.orders USING SAMPLE 10% (bernoulli, 42)", [], {"demo.orders"}),
    ("SELECT * FROM demo.orders TABLESAMPLE reservoir(5 ROWS) REPEATABLE (7)", [], {"demo.orders"}),
    (
        "SELECT * FROM range(3) a, generate_series(1, 3, 1) b, range(DATE '2024-01-01', DATE '2024-01-03', "
        "INTERVAL 1 DAY) c",
        [],
        set(),
    ),
    (
        "SELECT id, unnest(tags) AS tag FROM demo.orders WHERE id < 3",
        [],
        {"demo.orders"},
    ),
    ("SELECT * FROM unnest([1, 2, 3]) WITH ORDINALITY AS u(x, n)", [], set()),
    ("SELECT * FROM demo.orders WHERE id = $1 OR customer_id = $2 OR id = $1", [5, 2], {"demo.orders"}),
    ("SELECT ? AS a, ? AS b", ["x", 2], set()),
    ("FROM demo.orders SELECT id, amount WHERE amount > 250 ORDER BY id", [], {"demo.orders"}),
    ("FROM demo.customers", [], {"demo.customers"}),
    ("VALUES (1, 'a'), (2, 'b')", [], set()),
    ("SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v(x, y) WHERE x > 1", [], set()),
    (
        "PIVOT demo.orders ON status IN ('open', 'paid', 'void') USING sum(amount) GROUP BY customer_id",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT * FROM (PIVOT demo.orders ON status IN ('open', 'paid') USING count(*)) p",
        [],
        {"demo.orders"},
    ),
    (
        "UNPIVOT (SELECT id, amount, customer_id::DOUBLE AS cust FROM demo.orders) "
        "ON amount, cust INTO NAME k VALUE v",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT customer_id, status, count(*), sum(amount) FROM demo.orders GROUP BY ALL ORDER BY ALL",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT info.channel, info['score'], tags[1], tags[1:1], list_transform(tags, lambda x: x * 2), "
        "[t + 1 FOR t IN tags IF t > 0], struct_pack(a := id), {'k': id}, map {'m': id} "
        "FROM demo.orders LIMIT 5",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT id, (SELECT max(amount) FROM demo.orders) AS top, "
        "(SELECT name FROM demo.customers c WHERE c.id = o.customer_id) AS who FROM demo.orders o",
        [],
        {"demo.orders", "demo.customers"},
    ),
    # a CTE shadowing forbidden tables (main.salaries, main.orders) while reading allowed ones
    ("WITH salaries AS (SELECT * FROM demo.orders) SELECT count(*) FROM salaries", [], {"demo.orders"}),
    (
        'WITH "Orders" AS (SELECT * FROM demo.customers) SELECT * FROM orders, (SELECT 1 FROM ORDERS) x',
        [],
        {"demo.customers"},
    ),
    (
        "WITH RECURSIVE salaries AS (SELECT 1 AS pay UNION ALL "
        "SELECT (SELECT max(pay) FROM salaries) + 1 FROM salaries WHERE pay < 3) SELECT * FROM salaries",
        [],
        set(),
    ),
    (
        "WITH salaries AS (SELECT 1 AS pay) SELECT * FROM demo.orders "
        "WHERE id IN (SELECT pay FROM salaries) AND EXISTS (FROM salaries)",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT o.id, s.x FROM demo.orders o, LATERAL (SELECT o.amount * 2 AS x) s WHERE o.id < 3",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT c.name, t.n FROM demo.customers c JOIN LATERAL "
        "(SELECT count(*) AS n FROM demo.orders o WHERE o.customer_id = c.id) t ON true",
        [],
        {"demo.orders", "demo.customers"},
    ),
    (
        "SELECT id, CASE WHEN amount > 100 THEN 'big' ELSE 'small' END, coalesce(NULL, status), "
        "amount::DECIMAL(18, 2), try_cast(status AS INTEGER), date_trunc('month', created), "
        "strftime(created, '%Y-%m'), created + INTERVAL 1 DAY FROM demo.orders",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT e.key, e.value FROM demo.orders o, json_each(o.payload) e WHERE o.id = 1",
        [],
        {"demo.orders"},
    ),
    ('SELECT * FROM "DEMO"."Orders" WHERE ID < 2', [], {"demo.orders"}),
    ("SELECT * FROM Quiver.Demo.Customers", [], {"demo.customers"}),
    ('SELECT * FROM demo."ünicode"', [], {"demo.ünicode"}),
    ('SELECT user, a.current_schema, "user" FROM demo.accounts a', [], {"demo.accounts"}),
    ("SELECT 'DROP TABLE demo.orders; SELECT * FROM secret.salaries' AS s", [], set()),
    ("SELECT 1 AS one /* ; DROP TABLE demo.orders */", [], set()),
    ("SELECT 1 AS one -- ; DROP TABLE demo.orders", [], set()),
    ("SELECT 1 AS one;", [], set()),
    (
        "SELECT customer_id, status, sum(amount) FROM demo.orders "
        "GROUP BY GROUPING SETS ((customer_id), (status), ()) HAVING sum(amount) > 0",
        [],
        {"demo.orders"},
    ),
    ("SELECT customer_id, sum(amount) FROM demo.orders GROUP BY ROLLUP (customer_id)", [], {"demo.orders"}),
    (
        "SELECT DISTINCT ON (customer_id) customer_id, id FROM demo.orders ORDER BY customer_id, id",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT id FROM demo.orders UNION ALL BY NAME SELECT id FROM demo.customers",
        [],
        {"demo.orders", "demo.customers"},
    ),
    ("SELECT * FROM demo.orders ORDER BY amount DESC LIMIT ? OFFSET ?", [5, 1], {"demo.orders"}),
    (
        "SELECT count(*) FROM demo.orders WHERE status IN (SELECT unnest(['open', 'void']))",
        [],
        {"demo.orders"},
    ),
    ("SELECT name.upper(), name.length() FROM demo.customers", [], {"demo.customers"}),
    (
        "SELECT * EXCLUDE (payload), COLUMNS('^am') AS a FROM demo.orders LIMIT 1",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT count(*) FILTER (WHERE status = 'open'), string_agg(status, ',' ORDER BY id), "
        "arg_max(id, amount), quantile_cont(amount, 0.5), approx_count_distinct(customer_id) FROM demo.orders",
        [],
        {"demo.orders"},
    ),
    (
        "SELECT o.id, c.id FROM demo.orders o ASOF JOIN demo.customers c ON o.customer_id >= c.id",
        [],
        {"demo.orders", "demo.customers"},
    ),
    ("SELECT current_date, now() IS NOT NULL, random() < 2, uuid() IS NOT NULL, typeof(1)", [], set()),
    (
        "SELECT id FROM demo.orders o WHERE amount > ALL (SELECT amount FROM demo.orders WHERE id < 3)",
        [],
        {"demo.orders"},
    ),
]


@pytest.mark.parametrize(("sql", "params", "expected"), ALLOWED, ids=range(len(ALLOWED)))
def test_allowed_queries_pass_and_run(env: Env, sql: str, params: list[object], expected: set[str]) -> None:
    q = env.guard.check(env.agent, sql)
    assert {t.qualified for t in q.tables} == expected
    assert q.param_count == len(params)
    run(env, q, params)


# A CTE named like a forbidden table (main.salaries) is seen in every clause, as DuckDB sees it:
# the guard accepts these and DuckDB's plan reads no forbidden table.
_W = "WITH salaries AS (SELECT 1 AS pay) "
_X = "(SELECT max(pay) FROM salaries)"
CTE_CONTEXTS = [
    f"SELECT {_X}",
    f"SELECT * FROM demo.orders WHERE id = {_X}",
    f"SELECT * FROM demo.orders ORDER BY {_X}",
    f"SELECT * FROM demo.orders LIMIT {_X}",
    f"SELECT * FROM demo.orders OFFSET {_X}",
    f"SELECT count(*) FROM demo.orders GROUP BY customer_id HAVING count(*) > {_X}",
    f"SELECT id FROM demo.orders QUALIFY row_number() OVER () > {_X}",
    f"SELECT sum(id) OVER (PARTITION BY {_X}) FROM demo.orders",
    f"SELECT sum(id) OVER (ORDER BY id ROWS BETWEEN {_X} PRECEDING AND CURRENT ROW) FROM demo.orders",
    f"SELECT lag(id, {_X}) OVER (ORDER BY id) FROM demo.orders",
    f"SELECT * FROM range({_X})",
    f"SELECT * FROM generate_series(1, {_X})",
    f"SELECT * FROM unnest([{_X}])",
    f"VALUES ({_X})",
    "PIVOT salaries ON pay IN (1) USING count(*)",
    "UNPIVOT salaries ON pay INTO NAME k VALUE v",
    "SELECT * FROM (PIVOT salaries ON pay IN (1) USING count(*))",
    "SELECT * FROM demo.orders o, LATERAL (SELECT * FROM salaries WHERE pay = o.id)",
    "SELECT * FROM demo.orders o JOIN salaries s ON s.pay = o.id",
    "SELECT * FROM demo.orders o ASOF JOIN salaries s ON o.id >= s.pay",
    "SELECT * FROM demo.orders POSITIONAL JOIN salaries",
    f"SELECT CASE WHEN true THEN {_X} END, coalesce({_X}, 0), [{_X}], {{'a': {_X}}}",
    "SELECT 1 IN (SELECT pay FROM salaries), EXISTS (FROM salaries)",
    "SELECT * FROM salaries USING SAMPLE 1",
    "SELECT * FROM salaries UNION ALL SELECT * FROM salaries",
    "SELECT * FROM (SELECT * FROM (SELECT * FROM salaries))",
    "SELECT * FROM (WITH x AS MATERIALIZED (SELECT * FROM salaries) SELECT * FROM x)",
    f"SELECT string_agg(status, ',' ORDER BY {_X}), count(*) FILTER (WHERE id > {_X}) FROM demo.orders",
    f"SELECT * REPLACE ({_X} AS amount) FROM demo.orders",
    f"SELECT DISTINCT ON ({_X}) id FROM demo.orders",
    f"SELECT id FROM demo.orders GROUP BY GROUPING SETS ((id), ({_X}))",
    "SELECT * FROM demo.orders WHERE id > ALL (FROM salaries)",
]


@pytest.mark.parametrize("context", CTE_CONTEXTS, ids=range(len(CTE_CONTEXTS)))
def test_cte_shadowing_a_forbidden_table_in_every_clause(env: Env, context: str) -> None:
    q = env.guard.check(env.agent, _W + context)
    assert {t.qualified for t in q.tables} <= {"demo.orders"}
    run(env, q, [])


def test_allowed_corpus_is_broad() -> None:
    assert len(ALLOWED) >= 25


def test_swarm_token_reads_like_its_agents(env: Env) -> None:
    q = env.guard.check(env.swarm, "SELECT count(*) FROM demo.orders")
    assert q.tables == (TableRef("demo", "orders"),)


def test_admin_reads_every_data_table(env: Env) -> None:
    q = env.guard.check(env.admin, "SELECT * FROM secret.salaries s JOIN main.orders o ON true")
    assert {t.qualified for t in q.tables} == {"secret.salaries", "main.orders"}
    assert len(run(env, q, [])) == 7


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM _quiver.tokens",
        'SELECT * FROM "_QUIVER"."Tokens"',
        "SELECT * FROM quiver._quiver.audit",
        "SELECT * FROM demo.orders WHERE id IN (SELECT 1 FROM _quiver.settings)",
    ],
)
def test_system_schema_is_never_readable_even_by_admin(env: Env, sql: str) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.admin, sql)
    assert NOT_READABLE in e.value.detail
    assert "_quiver" in e.value.detail.lower()
    # Suggestions come from the admin's own readable list: every data table, never _quiver.
    admin_reads = set(env.policy.readable_names(env.admin))
    assert "secret.salaries" in admin_reads
    assert set(suggested(e.value.detail)) <= admin_reads


# --- escape attempts ------------------------------------------------------------------------
S = "secret.salaries"
# (sql, error class, text the message must contain)
TABLE_ESCAPES: list[tuple[str, str]] = [
    (f"SELECT * FROM {S}", S),
    (f"SELECT id, (SELECT max(pay) FROM {S}) FROM demo.orders", S),
    (f"SELECT * FROM demo.orders WHERE id IN (SELECT id FROM {S})", S),
    (f"SELECT * FROM demo.orders WHERE EXISTS (SELECT 1 FROM {S})", S),
    (f"SELECT customer_id FROM demo.orders GROUP BY 1 HAVING count(*) > (SELECT min(pay) FROM {S})", S),
    (f"SELECT * FROM demo.orders o JOIN demo.customers c ON c.id = (SELECT id FROM {S} LIMIT 1)", S),
    (f"SELECT * FROM demo.orders o JOIN {S} s ON s.id = o.customer_id", S),
    (f"SELECT * FROM demo.orders, {S}", S),
    (f"SELECT * FROM demo.orders ORDER BY (SELECT max(pay) FROM {S})", S),
    (f"SELECT * FROM demo.orders LIMIT (SELECT count(*) FROM {S})", S),
    (f"SELECT * FROM demo.orders OFFSET (SELECT count(*) FROM {S})", S),
    (f"SELECT id FROM demo.orders QUALIFY id = (SELECT max(id) FROM {S})", S),
    (f"SELECT sum(amount) OVER (PARTITION BY (SELECT max(pay) FROM {S})) FROM demo.orders", S),
    (f"SELECT rank() OVER (ORDER BY (SELECT max(pay) FROM {S})) FROM demo.orders", S),
    (f"SELECT count(*) FILTER (WHERE id IN (SELECT id FROM {S})) OVER () FROM demo.orders", S),
    (f"SELECT CASE WHEN id > 0 THEN (SELECT max(pay) FROM {S}) END FROM demo.orders", S),
    (f"SELECT coalesce(NULL, (SELECT max(pay) FROM {S}))", S),
    (f"SELECT * FROM demo.orders WHERE id IN (1, 2, (SELECT max(id) FROM {S}))", S),
    (f"SELECT count(*) FROM demo.orders GROUP BY (SELECT max(pay) FROM {S})", S),
    (f"SELECT * FROM demo.orders o, LATERAL (SELECT pay FROM {S} s WHERE s.id = o.customer_id)", S),
    (f"SELECT id FROM demo.orders UNION ALL SELECT pay FROM {S}", S),
    (f"SELECT id FROM demo.orders INTERSECT SELECT id FROM {S}", S),
    (f"SELECT id FROM demo.orders EXCEPT SELECT id FROM {S}", S),
    (f"SELECT [(SELECT max(pay) FROM {S})], {{'a': (SELECT min(pay) FROM {S})}}", S),
    (f"SELECT list_transform([1], lambda x: (SELECT max(pay) FROM {S}))", S),
    (f"SELECT string_agg(status, ',' ORDER BY (SELECT max(pay) FROM {S})) FROM demo.orders", S),
    (f"SELECT * REPLACE ((SELECT max(pay) FROM {S}) AS amount) FROM demo.orders", S),
    (f"SELECT DISTINCT ON ((SELECT max(pay) FROM {S})) id FROM demo.orders", S),
    (f"SELECT * FROM range((SELECT max(pay) FROM {S}))", S),
    (f"SELECT * FROM unnest((SELECT list(pay) FROM {S}))", S),
    (f"VALUES ((SELECT max(pay) FROM {S}))", S),
    (f"SELECT * FROM demo.orders WHERE amount > ALL (SELECT pay FROM {S})", S),
    (f"SELECT * FROM (FROM {S})", S),
    (f"FROM {S} USING SAMPLE 1", S),
    (f"SELECT * FROM demo.orders o ASOF JOIN {S} s ON o.id >= s.id", S),
    (f"PIVOT {S} ON id IN (1, 2) USING sum(pay)", S),
    (f"SELECT * FROM (PIVOT {S} ON id IN (1) USING sum(pay))", S),
    (f"UNPIVOT {S} ON pay INTO NAME k VALUE v", S),
    (f"PIVOT demo.orders ON status IN ('open', (SELECT 'x' FROM {S})) USING count(*)", S),
    (
        f"SELECT customer_id FROM demo.orders GROUP BY GROUPING SETS ((customer_id), ((SELECT max(pay) FROM {S})))",
        S,
    ),
    # CTEs
    (f"WITH x AS (SELECT * FROM {S}) SELECT 1", S),
    (f"WITH orders AS (SELECT * FROM {S}) SELECT * FROM orders", S),
    (f"WITH customers AS (SELECT * FROM {S}) SELECT * FROM customers", S),
    (f"WITH x AS MATERIALIZED (SELECT * FROM {S}) SELECT * FROM x", S),
    (
        "SELECT * FROM (WITH salaries AS (SELECT 1 AS pay) SELECT * FROM salaries) UNION ALL SELECT * FROM salaries",
        "salaries",
    ),
    (
        "(WITH salaries AS (SELECT 1 AS pay) SELECT * FROM salaries) UNION ALL SELECT * FROM salaries",
        "salaries",
    ),
    (
        "SELECT (WITH salaries AS (SELECT 1 AS pay) SELECT max(pay) FROM salaries), * FROM salaries",
        "salaries",
    ),
    ("WITH salaries AS (SELECT * FROM salaries) SELECT * FROM salaries", "salaries"),
    (
        "WITH RECURSIVE salaries AS (SELECT * FROM salaries UNION ALL SELECT 1) SELECT * FROM salaries",
        "salaries",
    ),
    (
        f"WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r, {S} WHERE n < 3) SELECT * FROM r",
        S,
    ),
    ("WITH a AS (SELECT * FROM salaries), salaries AS (SELECT 1 AS pay) SELECT * FROM a", "salaries"),
    ("WITH salaries AS (SELECT 1 AS pay) SELECT * FROM main.salaries", "main.salaries"),
    ("WITH salaries AS (SELECT 1 AS pay) SELECT * FROM quiver.salaries", "quiver.salaries"),
    ("WITH orders AS (SELECT 1) SELECT * FROM quiver.main.orders", "quiver.main.orders"),
    # names: quoting, case, catalogs, schemas
    ('SELECT * FROM "SECRET"."Salaries"', "SECRET.Salaries"),
    ("SELECT * FROM SECRET.SALARIES", "SECRET.SALARIES"),
    ("SELECT * FROM quiver.secret.salaries", "quiver.secret.salaries"),
    ('SELECT * FROM "QUIVER"."SECRET"."SALARIES"', "QUIVER.SECRET.SALARIES"),
    ("SELECT * FROM orders", "orders"),
    ("SELECT * FROM main.orders", "main.orders"),
    ("SELECT * FROM quiver.orders", "quiver.orders"),
    ("SELECT * FROM system.main.duckdb_tables", "system.main.duckdb_tables"),
    ("SELECT * FROM temp.main.orders", "temp.main.orders"),
    ("SELECT * FROM temp.orders", "temp.orders"),
    ("SELECT * FROM memory.main.orders", "memory.main.orders"),
    ("SELECT * FROM other.demo.orders", "other.demo.orders"),
    ("SELECT * FROM nosuch.table_x", "nosuch.table_x"),
    ("SELECT * FROM demo.no_such_table", "demo.no_such_table"),
    ("SELECT * FROM demo.salaries_view", "demo.salaries_view"),
    # system catalogs
    ("SELECT * FROM information_schema.tables", "information_schema.tables"),
    ("SELECT * FROM system.information_schema.columns", "system.information_schema.columns"),
    ("SELECT * FROM pg_catalog.pg_tables", "pg_catalog.pg_tables"),
    ("SELECT * FROM pg_tables", "pg_tables"),
    ("SELECT * FROM sqlite_master", "sqlite_master"),
    ("SELECT * FROM duckdb_tables", "duckdb_tables"),
    ("SELECT * FROM duckdb_settings", "duckdb_settings"),
    # files and URLs as tables (replacement scans)
    ("SELECT * FROM '/etc/passwd'", "/etc/passwd"),
    ("SELECT * FROM 'orders.csv'", "orders.csv"),
    ("FROM 'https://example.com/data.parquet'", "https://example.com/data.parquet"),
    ('SELECT * FROM "data.parquet"', "data.parquet"),
    # unicode look-alikes
    ("SELECT * FROM \u0455ecret.salaries", "\u0455ecret.salaries"),
    (
        "SELECT * FROM \uff53\uff45\uff43\uff52\uff45\uff54.salaries",
        "\uff53\uff45\uff43\uff52\uff45\uff54.salaries",
    ),
    ('SELECT * FROM "secret\u200b".salaries', "secret\u200b.salaries"),
    ('SELECT * FROM demo."Ünicode"', "demo.Ünicode"),
    ('SELECT * FROM "Ünicode"', "Ünicode"),
]


@pytest.mark.parametrize(("sql", "offender"), TABLE_ESCAPES, ids=range(len(TABLE_ESCAPES)))
def test_table_escapes_are_refused(env: Env, sql: str, offender: str) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.agent, sql)
    detail = e.value.detail
    assert detail.startswith(f"{offender}: {NOT_READABLE}"), detail
    assert set(suggested(detail)) == READABLE, detail  # few readable tables: all of them, ranked
    assert "Traceback" not in detail


def test_file_paths_get_a_hint(env: Env) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.agent, "SELECT * FROM '/etc/passwd'")
    assert "files and URLs cannot be read" in e.value.detail


def test_missing_and_forbidden_tables_get_the_same_answer(env: Env) -> None:
    answers = []
    for name in ("secret.salaries", "secret.no_such_table"):
        with pytest.raises(PermissionDenied) as e:
            env.guard.check(env.agent, f"SELECT * FROM {name}")
        detail = e.value.detail
        # The suggestions are ranked by the name asked for, among readable names only.
        assert suggested(detail) == closest_readable(name, READABLE)
        answers.append(detail.split("; you may read: ")[0].replace(name, "<t>"))
    assert answers[0] == answers[1]


def test_a_typo_is_answered_with_the_closest_readable_names_first(env: Env) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.agent, "SELECT * FROM demo.ordrs")
    assert suggested(e.value.detail)[0] == "demo.orders"
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.agent, "SELECT * FROM sales.customer")  # wrong schema, close table
    assert suggested(e.value.detail)[0] == "demo.customers"


def test_a_long_allowlist_suggests_a_handful_ranked() -> None:
    readable = [f"s{i}.table_{i}" for i in range(200)] + ["sales.orders"]
    hint = readable_hint("sales.ordres", readable)
    names = hint.split(" (the ")[0].split(", ")
    assert names[0] == "sales.orders" and len(names) == HINT_NAMES
    assert f"closest of {len(readable)}" in hint


def test_empty_allowlist_lists_nothing(env: Env) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.stranger, "SELECT * FROM demo.orders")
    assert e.value.detail == f"demo.orders: {NOT_READABLE}; you may read: none"


# (sql, error class, text the message must contain)
FUNCTION_ESCAPES: list[tuple[str, type[QuiverError], str]] = [
    ("SELECT * FROM duckdb_tables()", PermissionDenied, "duckdb_tables()"),
    ("SELECT * FROM duckdb_settings()", PermissionDenied, "duckdb_settings()"),
    ("SELECT * FROM duckdb_secrets()", PermissionDenied, "duckdb_secrets()"),
    ("SELECT * FROM duckdb_functions()", PermissionDenied, "duckdb_functions()"),
    ("SELECT * FROM pragma_table_info('secret.salaries')", PermissionDenied, "pragma_table_info()"),
    ("SELECT * FROM pragma_version()", PermissionDenied, "pragma_version()"),
    ("SELECT * FROM pragma_database_size()", PermissionDenied, "pragma_database_size()"),
    ("SELECT * FROM query('SELECT * FROM secret.salaries')", PermissionDenied, "query()"),
    ("SELECT * FROM query_table('secret.salaries')", PermissionDenied, "query_table()"),
    ("SELECT * FROM read_csv('/etc/passwd')", PermissionDenied, "read_csv()"),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", PermissionDenied, "read_csv_auto()"),
    ("SELECT * FROM read_text('/etc/passwd')", PermissionDenied, "read_text()"),
    ("SELECT * FROM read_blob('/etc/passwd')", PermissionDenied, "read_blob()"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", PermissionDenied, "read_parquet()"),
    ("SELECT * FROM read_json_auto('/tmp/x.json')", PermissionDenied, "read_json_auto()"),
    ("SELECT * FROM parquet_metadata('/tmp/x.parquet')", PermissionDenied, "parquet_metadata()"),
    ("SELECT * FROM glob('/etc/*')", PermissionDenied, "glob()"),
    ("SELECT * FROM sniff_csv('/etc/passwd')", PermissionDenied, "sniff_csv()"),
    ("SELECT * FROM sql_auto_complete('SELECT * FROM sec')", PermissionDenied, "sql_auto_complete()"),
    ("SELECT * FROM which_secret('s3://bucket/x', 's3')", PermissionDenied, "which_secret()"),
    ("SELECT * FROM histogram('secret.salaries', pay)", PermissionDenied, "histogram()"),
    ("SELECT * FROM summary((SELECT 1))", PermissionDenied, "summary()"),
    ("SELECT * FROM json_execute_serialized_sql('{}')", PermissionDenied, "json_execute_serialized_sql()"),
    ("SELECT * FROM iceberg_scan('s3://x')", PermissionDenied, "iceberg_scan()"),
    ("SELECT * FROM delta_scan('s3://x')", PermissionDenied, "delta_scan()"),
    ("SELECT * FROM test_all_types()", PermissionDenied, "test_all_types()"),
    ("SELECT * FROM checkpoint()", PermissionDenied, "checkpoint()"),
    ("SELECT * FROM main.range(3)", PermissionDenied, "range()"),
    ("SELECT * FROM demo.leak_rows()", PermissionDenied, "leak_rows()"),
    ("SELECT * FROM leak_rows()", PermissionDenied, "leak_rows() is defined in this database"),
    # table functions in expressions
    ("SELECT query('SELECT 1')", PermissionDenied, "query()"),
    ("SELECT read_text('/etc/passwd')", PermissionDenied, "read_text()"),
    # configuration and environment, anywhere
    ("SELECT getenv('HOME')", PermissionDenied, "getenv()"),
    ("SELECT * FROM demo.orders WHERE status = getenv('USER')", PermissionDenied, "getenv()"),
    ("SELECT current_setting('threads')", PermissionDenied, "current_setting()"),
    ("SELECT * FROM demo.orders WHERE current_setting('threads') > 0", PermissionDenied, "current_setting()"),
    ("SELECT pg_catalog.current_setting('threads')", PermissionDenied, "current_setting()"),
    ("SELECT \"CURRENT_SETTING\"('threads')", PermissionDenied, "current_setting()"),
    ("SELECT getvariable('x')", PermissionDenied, "getvariable()"),
    ("SELECT id FROM demo.orders ORDER BY getvariable('x')", PermissionDenied, "getvariable()"),
    ("SELECT current_setting('memory_limit') OVER ()", PermissionDenied, "current_setting()"),
    (
        "SELECT list_transform([1], lambda x: current_setting('threads'))",
        PermissionDenied,
        "current_setting()",
    ),
    ("SELECT * FROM range((SELECT current_setting('threads')::INT))", PermissionDenied, "current_setting()"),
    ("SELECT current_schema", PermissionDenied, "current_schema"),
    ("SELECT current_catalog", PermissionDenied, "current_catalog"),
    ("SELECT current_user", PermissionDenied, "current_user"),
    ("SELECT * FROM demo.orders WHERE status = session_user", PermissionDenied, "session_user"),
    ("SELECT current_role", PermissionDenied, "current_role"),
    ("SELECT duckdb_extensions_version()", PermissionDenied, "duckdb_extensions_version()"),
    ("SELECT pragma_anything()", PermissionDenied, "pragma_anything()"),
    ("SELECT pg_get_viewdef('demo.salaries_view')", PermissionDenied, "pg_get_viewdef()"),
    ("SELECT pg_sleep(10)", PermissionDenied, "pg_sleep()"),
    ("SELECT __internal_tablefilter_dynamic()", PermissionDenied, "__internal_tablefilter_dynamic()"),
    # stored macros (a macro can read any table), also those shadowing built-ins
    ("SELECT leak()", PermissionDenied, "leak() is defined in this database"),
    ("SELECT demo.leak()", PermissionDenied, "leak() is defined in this database"),
    ("SELECT reverse('abc')", PermissionDenied, "reverse() is defined in this database"),
    ("SELECT * FROM json_tree('[1]')", PermissionDenied, "json_tree() is defined in this database"),
    ("SELECT no_such_function(1)", InvalidArgument, "no_such_function()"),
]


@pytest.mark.parametrize(("sql", "cls", "offender"), FUNCTION_ESCAPES, ids=range(len(FUNCTION_ESCAPES)))
def test_function_escapes_are_refused(env: Env, sql: str, cls: type[QuiverError], offender: str) -> None:
    with pytest.raises(cls) as e:
        env.guard.check(env.admin, sql)  # functions are refused even for admins
    assert offender in e.value.detail, e.value.detail
    assert type(e.value) is cls


def test_stored_macros_really_shadow_builtins(env: Env) -> None:
    """Why stored macros are refused: unqualified calls reach them instead of the built-in."""
    with env.db.reading() as cur:
        assert cur.execute("SELECT reverse('abc')").fetchall() == [("100006",)]
        assert cur.execute("SELECT count(*) FROM json_tree('[1]')").fetchall() == [(7,)]


def test_table_function_refusal_lists_the_allowed_ones(env: Env) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.agent, "SELECT * FROM read_csv('/etc/passwd')")
    for name in ALLOWED_TABLE_FUNCTIONS:
        assert f"{name}()" in e.value.detail


@pytest.mark.parametrize("name", sorted(DENIED_FUNCTIONS))
def test_every_denied_function_is_refused(env: Env, name: str) -> None:
    for sql in (f"SELECT {name}('x')", f"SELECT * FROM demo.orders WHERE {name}() IS NOT NULL"):
        with pytest.raises(PermissionDenied) as e:
            env.guard.check(env.admin, sql)
        assert f"function {name}() is not allowed ({DENIED_FUNCTIONS[name]})" in e.value.detail


def test_every_pg_catalog_function_of_this_duckdb_is_refused(env: Env) -> None:
    con = duckdb.connect()
    names = [
        r[0]
        for r in con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE schema_name = 'pg_catalog'"
        ).fetchall()
    ]
    assert names
    for name in names:
        with pytest.raises(PermissionDenied):
            env.guard.check(env.admin, f"SELECT {name}()")


def test_sequences_cannot_be_advanced(env: Env) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.admin, "SELECT nextval('_quiver.audit_id')")
    assert "nextval()" in e.value.detail and "a write" in e.value.detail


# one per statement class: (sql, text naming the class)
STATEMENTS: list[tuple[str, str]] = [
    ("EXPLAIN SELECT * FROM demo.orders", "EXPLAIN"),
    ("EXPLAIN ANALYZE SELECT * FROM demo.orders", "EXPLAIN"),
    ("DESCRIBE demo.orders", "DESCRIBE"),
    ("DESCRIBE SELECT * FROM demo.orders", "DESCRIBE"),
    ("SUMMARIZE demo.orders", "SUMMARIZE"),
    ("SUMMARIZE SELECT 1", "SUMMARIZE"),
    ("SHOW TABLES", "SHOW"),
    ("SHOW ALL TABLES", "SHOW"),
    ("SHOW demo.orders", "SHOW"),
    ("SELECT * FROM (DESCRIBE demo.orders)", "DESCRIBE"),
    ("SELECT * FROM demo.orders WHERE id IN (SELECT 1 FROM (SHOW TABLES))", "SHOW"),
    ("PRAGMA version", "PRAGMA"),
    ("PRAGMA table_info('demo.orders')", "PRAGMA"),
    ("SET threads = 1", "SET"),
    ("SET VARIABLE x = 1", "SET"),
    ("RESET threads", "RESET"),
    ("CALL pragma_version()", "CALL"),
    ("USE memory", "USE"),
    ("ATTACH '/tmp/x.duckdb' AS x", "ATTACH"),
    ("DETACH x", "DETACH"),
    ("COPY demo.orders TO '/tmp/x.csv'", "COPY"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY"),
    ("EXPORT DATABASE '/tmp/x'", "EXPORT"),
    ("IMPORT DATABASE '/tmp/x'", "IMPORT DATABASE"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("UPDATE EXTENSIONS", "not a query"),
    ("BEGIN TRANSACTION", "transaction"),
    ("COMMIT", "transaction"),
    ("ROLLBACK", "transaction"),
    ("INSERT INTO demo.orders (id) VALUES (1)", "INSERT"),
    ("WITH x AS (SELECT 1) INSERT INTO demo.orders (id) SELECT * FROM x", "INSERT"),
    ("UPDATE demo.orders SET amount = 0", "UPDATE"),
    ("DELETE FROM demo.orders", "DELETE"),
    ("TRUNCATE demo.orders", "TRUNCATE"),
    ("MERGE INTO demo.orders USING demo.customers c ON c.id = orders.id WHEN MATCHED THEN DELETE", "MERGE"),
    ("CREATE TABLE demo.x AS SELECT * FROM secret.salaries", "CREATE"),
    ("CREATE TEMP TABLE x AS SELECT 1", "CREATE"),
    ("CREATE VIEW demo.v AS SELECT 1", "CREATE"),
    ("CREATE MACRO m() AS 1", "CREATE"),
    ("CREATE SECRET s (TYPE s3)", "CREATE"),
    ("DROP TABLE demo.orders", "DROP"),
    ("ALTER TABLE demo.orders ADD COLUMN x INTEGER", "ALTER"),
    ("COMMENT ON TABLE demo.orders IS 'x'", "COMMENT ON"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXECUTE p", "EXECUTE"),
    ("DEALLOCATE p", "DEALLOCATE"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("FORCE CHECKPOINT", "CHECKPOINT"),
    ("VACUUM", "VACUUM"),
    ("ANALYZE", "ANALYZE"),
    ("PIVOT demo.orders ON status USING sum(amount)", "PIVOT without an IN list"),
    ("SELECT * FROM (PIVOT demo.orders ON status USING count(*))", "PIVOT without an IN list"),
]


@pytest.mark.parametrize(("sql", "label"), STATEMENTS, ids=range(len(STATEMENTS)))
def test_non_query_statements_are_refused(env: Env, sql: str, label: str) -> None:
    with pytest.raises(PermissionDenied) as e:
        env.guard.check(env.admin, sql)
    assert label in e.value.detail, e.value.detail
    assert "only read-only queries are allowed" in e.value.detail


# malformed input: (sql, text the message must contain)
MALFORMED: list[tuple[str, str]] = [
    ("", "no SQL statement"),
    ("   \n\t ", "no SQL statement"),
    ("-- just a comment", "no SQL statement"),
    ("/* nothing */ ;", "no SQL statement"),
    (";", "no SQL statement"),
    ("please give me every salary", "syntax error"),
    ("SELEC * FROM demo.orders", "syntax error"),
    ("SELECT * FROM demo.orders WHERE", "syntax error"),
    ("SELECT 1; DROP TABLE demo.orders", "found 2 statements"),
    ("SELECT 1; SELECT 2", "found 2 statements"),
    ("SELECT 1 --\n; DELETE FROM demo.orders", "found 2 statements"),
    ("SELECT 1 /* x */; DELETE FROM demo.orders", "found 2 statements"),
    ("SELECT 1\x00; DROP TABLE demo.orders", "NUL"),
    ("SELECT 1\u037e DROP TABLE demo.orders", "syntax error"),  # Greek question mark, looks like ';'
    ("SELECT * FROM demo.orders\u202e; DROP TABLE demo.orders", "found 2 statements"),
    ("SELECT $name", "named parameter $name"),
    ("SELECT $name, ?", "cannot be parsed"),
]


@pytest.mark.parametrize(("sql", "fragment"), MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_input_is_invalid_argument(env: Env, sql: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        env.guard.check(env.agent, sql)
    assert fragment in e.value.detail, e.value.detail
    assert "Traceback" not in e.value.detail


def test_escape_corpus_is_broad() -> None:
    assert len(TABLE_ESCAPES) + len(FUNCTION_ESCAPES) + len(STATEMENTS) + len(MALFORMED) >= 60


def test_syntax_error_carries_duckdb_position(env: Env) -> None:
    with pytest.raises(InvalidArgument) as e:
        env.guard.check(env.agent, "SELECT * FROM demo.orders WHER id = 1")
    assert e.value.detail.startswith("SQL syntax error: syntax error at or near")
    assert "LINE 1:" in e.value.detail and "\n" not in e.value.detail


def test_non_string_and_oversized_input(env: Env) -> None:
    with pytest.raises(InvalidArgument):
        env.guard.check(env.agent, 42)  # type: ignore[arg-type]
    small = SqlGuard(
        TableCatalog(env.db), Policy(TableCatalog(env.db)), env.db.catalog_name, max_sql_chars=20
    )
    with pytest.raises(InvalidArgument) as e:
        small.check(env.agent, "SELECT 1 AS a_rather_long_alias")
    assert "at most 20" in e.value.detail


def test_deep_nesting_is_refused_cleanly(env: Env) -> None:
    with pytest.raises(InvalidArgument) as e:
        env.guard.check(env.agent, "SELECT " + "(" * 5000 + "1" + ")" * 5000)
    assert "depth" in e.value.detail
    with pytest.raises(InvalidArgument) as e:
        env.guard.check(env.agent, "SELECT " + " + ".join(["1"] * 600))
    assert "nested too deeply" in e.value.detail
    q = env.guard.check(env.agent, "SELECT " + " + ".join(["id"] * 100) + " FROM demo.orders")
    assert len(run(env, q, [])) == 200


def test_unknown_functions_get_suggestions_but_never_denied_ones(env: Env) -> None:
    with pytest.raises(InvalidArgument) as e:
        env.guard.check(env.agent, "SELECT lenght('abc')")
    assert "did you mean" in e.value.detail and "length" in e.value.detail
    with pytest.raises(InvalidArgument) as e:
        env.guard.check(env.agent, "SELECT nvl(NULL, 1)")
    assert "nextval" not in e.value.detail


# --- fail closed on parse trees the walker does not know --------------------------------------
def _tree(env: Env, sql: str) -> dict[str, object]:
    with env.db.reading() as cur:
        raw = cur.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    stmt: dict[str, object] = json.loads(raw)["statements"][0]
    return stmt


def _walk(env: Env, stmt: dict[str, object]) -> None:
    from catalog.sqlguard import _Walk

    _Walk(env.guard, env.agent).statement(stmt)


def test_walker_refuses_unknown_table_reference_types(env: Env) -> None:
    stmt = _tree(env, "SELECT * FROM demo.orders")
    _walk(env, stmt)  # the real tree passes
    stmt["node"]["from_table"]["type"] = "COLUMN_DATA"  # type: ignore[index]
    with pytest.raises(PermissionDenied) as e:
        _walk(env, stmt)
    assert "does not support (COLUMN_DATA)" in e.value.detail


def test_walker_refuses_unknown_expression_classes(env: Env) -> None:
    stmt = _tree(env, "SELECT id FROM demo.orders")
    stmt["node"]["select_list"][0]["class"] = "BOUND_REF"  # type: ignore[index]
    with pytest.raises(PermissionDenied) as e:
        _walk(env, stmt)
    assert "BOUND_REF" in e.value.detail


def test_walker_refuses_a_recursive_cte_node_outside_with(env: Env) -> None:
    stmt = _tree(
        env, "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 2) SELECT 1"
    )
    body = stmt["node"]["cte_map"]["map"][0]["value"]["query_node"]  # type: ignore[index]
    stmt = _tree(env, "SELECT * FROM (SELECT 1) s")
    stmt["node"]["from_table"]["subquery"]["node"] = body  # type: ignore[index]
    with pytest.raises(PermissionDenied) as e:
        _walk(env, stmt)
    assert "RECURSIVE_CTE_NODE" in e.value.detail


def test_walker_refuses_names_whose_two_spellings_disagree(env: Env) -> None:
    stmt = _tree(env, "SELECT * FROM demo.orders")
    stmt["node"]["from_table"]["qualified_name"]["path"] = ["secret", "salaries"]  # type: ignore[index]
    with pytest.raises(PermissionDenied):
        _walk(env, stmt)


def test_escapes_would_really_read_forbidden_tables(env: Env) -> None:
    """The CTE-scope and clause-position escapes are real: DuckDB's plan for them scans a
    table the agent may not read (run as admin, who may)."""
    readable = {("demo", "orders"), ("demo", "customers"), ("demo", "accounts"), ("demo", "ünicode")}
    planned = 0
    harmless: list[str] = []
    with env.db.reading() as cur:
        for sql, _ in TABLE_ESCAPES:
            try:
                scanned = plan_tables(cur, sql)
            except duckdb.Error:
                continue  # e.g. a catalog that does not exist
            if scanned is None:
                continue
            planned += 1
            if not scanned - readable:
                harmless.append(sql)
    # refused although DuckDB's optimizer would drop the read: an unused CTE
    assert harmless == [f"WITH x AS (SELECT * FROM {S}) SELECT 1"]
    assert planned >= 40


# --- the GuardedQuery -----------------------------------------------------------------------
def test_tables_are_exactly_the_data_tables_read(env: Env) -> None:
    q = env.guard.check(
        env.agent,
        "WITH c AS (SELECT * FROM demo.customers) SELECT * FROM demo.orders o "
        "JOIN c ON c.id = o.customer_id JOIN DEMO.ORDERS o2 ON o2.id = o.id "
        "WHERE EXISTS (SELECT 1 FROM demo.accounts)",
    )
    assert q.tables == (
        TableRef("demo", "accounts"),
        TableRef("demo", "customers"),
        TableRef("demo", "orders"),
    )
    assert env.guard.check(env.agent, "SELECT 1").tables == ()


def test_normalized_ignores_whitespace_comments_and_keyword_case(env: Env) -> None:
    a = env.guard.check(env.agent, "SELECT id, amount FROM demo.orders WHERE id = ? ORDER BY id")
    b = env.guard.check(
        env.agent, "select   id,\n\tamount\nfrom demo.orders -- the orders\nwhere id = $1 order BY id ;"
    )
    c = env.guard.check(env.agent, "SELECT id, amount FROM demo.orders WHERE id = ? ORDER BY id DESC")
    assert a.normalized == b.normalized and a.fingerprint == b.fingerprint
    assert a.normalized != c.normalized
    assert a.sql != b.sql
    assert b.sql.endswith("order BY id")


def test_sql_is_the_statement_without_trailing_semicolons(env: Env) -> None:
    assert env.guard.check(env.agent, "  SELECT 1 ;; ").sql == "SELECT 1"
    assert env.guard.check(env.agent, "SELECT ';' AS s;").sql == "SELECT ';' AS s"


def test_param_count(env: Env) -> None:
    assert env.guard.check(env.agent, "SELECT ?, ?, ?").param_count == 3
    assert env.guard.check(env.agent, "SELECT $2, $1, $2").param_count == 2
    assert env.guard.check(env.agent, "SELECT 1").param_count == 0
    q = env.guard.check(env.agent, "SELECT * FROM demo.orders WHERE id IN (SELECT ? UNION SELECT ?)")
    assert q.param_count == 2
    with env.db.reading() as cur:
        assert len(cur.execute(q.sql, [1, 2]).fetchall()) == 2


def test_parse_cache_does_not_mix_principals(env: Env) -> None:
    sql = "SELECT * FROM secret.salaries"
    assert env.guard.check(env.admin, sql).tables == (TableRef("secret", "salaries"),)
    with pytest.raises(PermissionDenied):
        env.guard.check(env.agent, sql)
    assert env.guard.check(env.admin, sql).tables == (TableRef("secret", "salaries"),)


def test_new_tables_are_seen_after_invalidation(env: Env) -> None:
    sql = "SELECT * FROM demo.fresh_table"
    with pytest.raises(PermissionDenied):
        env.guard.check(env.agent, sql)
    with env.db.transaction() as cur:
        cur.execute("CREATE TABLE demo.fresh_table AS SELECT 1 AS x")
    env.guard.invalidate_tables()
    assert env.guard.check(env.agent, sql).tables == (TableRef("demo", "fresh_table"),)
    with env.db.transaction() as cur:
        cur.execute("DROP TABLE demo.fresh_table")
    env.guard.invalidate_tables()
    with pytest.raises(PermissionDenied):
        env.guard.check(env.agent, sql)


def test_concurrent_checks(env: Env) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(30):
                q = env.guard.check(env.agent, f"SELECT {i * 100 + j} AS n, count(*) FROM demo.orders")
                assert q.tables == (TableRef("demo", "orders"),)
                with pytest.raises(PermissionDenied):
                    env.guard.check(env.agent, f"SELECT {j} FROM secret.salaries")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
