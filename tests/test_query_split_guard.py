"""The guard's side of split queries (catalog/sqlguard.py ``splittable``, ``rowid_parts``,
``plain_columns``), on a real locked-down DuckDB file: for generated projections and filters
and generated rowid bounds, the parts run by DuckDB and concatenated in order are exactly the
statement's own result; statements that cannot be split give no parts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.database import Database
from catalog.sqlguard import SqlGuard
from tests.guard_support import analyst, guard_database

ROWS = 5_000
SETUP = f"""
CREATE SCHEMA demo;
CREATE TABLE demo.t AS
SELECT range AS id, range % 13 AS k, 'v' || (range % 97)::VARCHAR AS s,
       CASE WHEN range % 5 = 0 THEN NULL ELSE range * 1.5 END AS x, [range, range % 3] AS l,
       TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(range * 3600) AS ts
FROM range({ROWS});
"""

COLUMNS = [
    "id",
    "k",
    "s",
    "x",
    "l",
    "id * 2 AS a",
    "upper(s) AS b",
    "coalesce(x, -1) AS c",
    "CASE WHEN k > 6 THEN s END AS d",
    "k::VARCHAR || s AS e",
    "l[2] AS f",
    "t.id AS g",
    "round(x / 3, 2) AS h",
    # Overloads DuckDB marks consistent within a query (they read the session's time zone,
    # the same for every part): row functions all the same.
    "ts + INTERVAL 1 DAY AS i",
    "year(ts) AS j",
    "date_trunc('day', ts) AS m",
]
FILTERS: list[tuple[str | None, list[Any]]] = [
    (None, []),
    ("k > ?", [6]),
    ("s LIKE 'v1%'", []),
    ("x IS NULL OR id < ?", [100]),
    ("id BETWEEN $1 AND $2 AND NOT k IN (1, 2)", [10, 4000]),
    ("(k = 3 OR k = 4) AND s <> ?", ["v7"]),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, SqlGuard]]:
    root: Path = tmp_path_factory.mktemp("split_guard")
    db, tables, policy = guard_database(root, SETUP)
    yield db, SqlGuard(tables, policy, db.catalog_name)
    db.close()


def _run(db: Database, sql: str, params: list[Any]) -> pa.Table:
    with db.reading() as cur:
        return cur.sql(sql, params=params or None).to_arrow_table()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    columns=st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=5, unique=True) | st.just(["*"]),
    where=st.sampled_from(FILTERS),
    cuts=st.lists(st.integers(min_value=1, max_value=ROWS - 1), max_size=6, unique=True),
)
def test_parts_concatenated_are_the_statement(
    setup: tuple[Database, SqlGuard], columns: list[str], where: tuple[str | None, list[Any]], cuts: list[int]
) -> None:
    db, guard = setup
    condition, params = where
    sql = f"SELECT {', '.join(columns)} FROM demo.t" + (f" WHERE {condition}" if condition else "")
    guarded = guard.check(analyst("split"), sql)
    assert guard.splittable(guarded)
    edges = [0, *sorted(cuts)]
    bounds = [(lo, edges[i + 1] if i + 1 < len(edges) else None) for i, lo in enumerate(edges)]
    parts = guard.rowid_parts(guarded, bounds)
    assert parts is not None and len(parts) == len(bounds)
    got = pa.concat_tables([_run(db, p, params) for p in parts])
    assert got.equals(_run(db, sql, params))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM demo.t ORDER BY id",
        "SELECT id FROM demo.t LIMIT 10",
        "SELECT DISTINCT k FROM demo.t",
        "SELECT count(*) FROM demo.t",
        "SELECT k, sum(id) FROM demo.t GROUP BY k",
        "SELECT id, lag(id) OVER () FROM demo.t",
        "SELECT id FROM demo.t UNION ALL SELECT id FROM demo.t",
        "SELECT id FROM demo.t WHERE k IN (SELECT k FROM demo.t WHERE id < 3)",
        "SELECT (SELECT max(id) FROM demo.t) AS m, id FROM demo.t",
        "SELECT a.id FROM demo.t a, demo.t b WHERE a.id = b.id",
        "WITH c AS (SELECT id FROM demo.t) SELECT id FROM c",
        "SELECT id FROM demo.t USING SAMPLE 10 ROWS",
        "SELECT unnest(l) FROM demo.t",
        "SELECT id, random() FROM demo.t",
        "SELECT id, current_date FROM demo.t",
        "SELECT id, today() AS d FROM demo.t",
        "SELECT id, get_current_timestamp() AS g FROM demo.t",
        "SELECT id, age(ts) AS a FROM demo.t",
        "SELECT rowid FROM demo.t",
        "SELECT id FROM demo.t WHERE rowid > 4",
        "SELECT id AS rowid FROM demo.t",
        "SELECT id FROM range(10) r(id)",
        "SELECT 1 AS one",
        "SELECT id FROM demo.t HAVING id > 1",
    ],
)
def test_statements_that_cannot_be_split_give_no_parts(setup: tuple[Database, SqlGuard], sql: str) -> None:
    _, guard = setup
    guarded = guard.check(analyst("split"), sql)
    assert not guard.splittable(guarded)
    assert guard.rowid_parts(guarded, [(0, 10), (10, None)]) is None
    assert guard.plain_columns(guarded) is None


@pytest.mark.parametrize(
    ("sql", "columns"),
    [
        ("SELECT * FROM demo.t", ()),
        ("FROM demo.t", ()),
        ("SELECT t.* FROM demo.t", ()),
        ("SELECT id, S FROM demo.t", ("id", "S")),
        ("SELECT x.k FROM demo.t AS x", ("k",)),
        ("SELECT id AS a FROM demo.t", None),
        ("SELECT id FROM demo.t WHERE k = 1", None),
        ("SELECT * EXCLUDE (l) FROM demo.t", None),
        ("SELECT id, id FROM demo.t", None),
        ("SELECT id, * FROM demo.t", None),
        ("SELECT l[1] FROM demo.t", None),
    ],
)
def test_plain_columns(setup: tuple[Database, SqlGuard], sql: str, columns: tuple[str, ...] | None) -> None:
    _, guard = setup
    assert guard.plain_columns(guard.check(analyst("split"), sql)) == columns
