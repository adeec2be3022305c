"""Profiles: every figure checked against an independent DuckDB computation per column, and
the per-data-version cache proven by counting scans and by serving a deliberately stale
profile until the version moves."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import InvalidArgument, TableRef
from catalog.database import Database
from catalog.status import ProfilesStatus
from catalog.tables import TableCatalog
from flight_server.profiles import (
    PROFILE_SCHEMA,
    TOP_VALUES_MAX_DISTINCT,
    ProfileCache,
    profile_table,
)
from quiver.demo import seed_sql
from tests.harness import Server, call_options, error_info

NUMERIC = ("BIGINT", "INTEGER", "DOUBLE", "DECIMAL", "HUGEINT", "UTINYINT", "FLOAT")
TEMPORAL = ("TIMESTAMP", "DATE", "TIME")

EDGE_SQL = '''
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE SCHEMA edge;
CREATE TABLE edge.mixed AS
SELECT
    i AS id,
    CASE WHEN i % 4 = 0 THEN NULL ELSE i * 1.5 END AS "with nulls",
    NULL::INTEGER AS all_null,
    CASE WHEN i % 3 = 0 THEN 'nan'::DOUBLE ELSE i::DOUBLE END AS has_nan,
    (i % 3 = 0) AS flag,
    (['a', 'b', NULL, 'c'])[1 + i % 4] AS "it's ""quoted""",
    (i % 5)::UTINYINT AS tiny,
    (i / 7)::DECIMAL(10, 2) AS dec,
    i::HUGEINT * 1000000000000 AS huge,
    DATE '2024-02-28' + (i % 10)::INTEGER AS day,
    TIME '10:00:00' + to_seconds(i) AS at_time,
    TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds(i * 3600) AS tz,
    INTERVAL (i) MINUTE AS span,
    (['sad', 'ok', 'happy'])[1 + i % 3]::mood AS mood,
    ('0000000' || (i % 2)::VARCHAR)::BIT AS bits,
    ('\\x0' || (i % 3)::VARCHAR)::BLOB AS payload,
    [i, i + 1] AS nums,
    {'k': i, 'v': 'x' || i} AS rec,
    MAP {'k': i} AS m,
    [i, i]::INTEGER[2] AS pair,
    union_value(num := i) AS u,
    repeat('long', 200) AS long_text
FROM range(1, 401) t(i);
CREATE TABLE edge.empty (a INTEGER, b VARCHAR, c TIMESTAMP);
CREATE TABLE edge.single (x DOUBLE);
INSERT INTO edge.single VALUES (42.0);
'''


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    root = tmp_path_factory.mktemp("profiles")
    database = Database(root / "p.duckdb", temp_dir=root / "tmp", lockdown=False)
    with database.transaction() as cur:
        cur.execute(seed_sql({"customers": 2000, "orders": 30_000, "events": 50_000}))
        cur.execute(EDGE_SQL)
        for name in ("customers", "orders", "events"):
            TableCatalog.bump_version(cur, TableRef("demo", name))
    yield database
    database.close()


def _one(cur: Any, sql: str) -> Any:
    return cur.execute(sql).fetchall()[0][0]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_against_duckdb(db: Database, ref: TableRef) -> pa.Table:
    """Profile ``ref`` and compare each figure with separate per-column queries."""
    with db.reading() as cur:
        profile = profile_table(cur, ref)
        assert profile.schema.equals(PROFILE_SCHEMA)
        columns = cur.sql(f"SELECT * FROM {ref.sql} LIMIT 0").columns
        assert profile.column("name").to_pylist() == columns
        total = _one(cur, f"SELECT count(*) FROM {ref.sql}")
        for row in profile.to_pylist():
            c, t = _q(row["name"]), row["type"]
            nonnull = _one(cur, f"SELECT count({c}) FROM {ref.sql}")
            assert row["count"] == total, row["name"]
            assert row["nulls"] == total - nonnull, row["name"]
            if total:
                assert row["null_fraction"] == pytest.approx((total - nonnull) / total)
            else:
                assert row["null_fraction"] is None
            exact_distinct = _one(cur, f"SELECT count(DISTINCT {c}) FROM {ref.sql}")
            if row["approx_distinct"] is not None:
                # HyperLogLog (DuckDB keeps few registers): within 10 %, never above the non-null count.
                assert row["approx_distinct"] <= nonnull
                assert abs(row["approx_distinct"] - exact_distinct) <= max(2, 0.1 * exact_distinct)
            nested = t.endswith("]") or t.startswith(("STRUCT", "MAP", "UNION"))
            if nested:
                assert row["min"] is None and row["mean"] is None and row["top_values"] is None
                assert row["approx_distinct"] is not None
                continue
            expect_min = _one(cur, f"SELECT left(min({c})::VARCHAR, 256) FROM {ref.sql}")
            expect_max = _one(cur, f"SELECT left(max({c})::VARCHAR, 256) FROM {ref.sql}")
            assert (row["min"], row["max"]) == (expect_min, expect_max), row["name"]
            if t.startswith(NUMERIC):
                mean = _one(cur, f"SELECT avg({c})::DOUBLE FROM {ref.sql}")
                sd = _one(cur, f"SELECT stddev_samp({c})::DOUBLE FROM {ref.sql}")
                _close(row["mean"], mean)
                _close(row["stddev"], sd)
            elif t == "BOOLEAN":
                _close(row["mean"], _one(cur, f"SELECT avg({c}::INTEGER) FROM {ref.sql}"))
            else:
                assert row["mean"] is None and row["stddev"] is None
            if t.startswith(NUMERIC + TEMPORAL):
                for q, label in ((0.25, "q25"), (0.5, "q50"), (0.75, "q75")):
                    expect = _one(cur, f"SELECT quantile_disc({c}, {q})::VARCHAR FROM {ref.sql}")
                    assert row[label] == expect, (row["name"], label)
            else:
                assert row["q25"] is None
            top = row["top_values"]
            if nonnull and exact_distinct <= TOP_VALUES_MAX_DISTINCT - 5:
                expect_top = cur.execute(
                    f"SELECT {c}::VARCHAR AS v, count(*) AS n FROM {ref.sql} WHERE {c} IS NOT NULL "
                    "GROUP BY v ORDER BY n DESC, v"
                ).fetchall()
                assert [(e["value"], e["count"]) for e in top] == expect_top, row["name"]
            elif exact_distinct > TOP_VALUES_MAX_DISTINCT * 1.2:
                assert top is None, row["name"]
    return profile


def _close(got: float | None, expect: float | None) -> None:
    if expect is None:
        assert got is None
    elif math.isnan(expect):
        assert got is not None and math.isnan(got)
    else:
        assert got == pytest.approx(expect, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("table", ["customers", "orders", "events"])
def test_demo_profiles_match_independent_duckdb(db: Database, table: str) -> None:
    profile = _check_against_duckdb(db, TableRef("demo", table))
    assert profile.schema.metadata[b"quiver.quartiles"] == b"exact"


def test_edge_cases_nulls_nan_nested_exotic_types(db: Database) -> None:
    profile = _check_against_duckdb(db, TableRef("edge", "mixed"))
    rows = {r["name"]: r for r in profile.to_pylist()}
    assert rows["all_null"]["nulls"] == 400 and rows["all_null"]["min"] is None
    assert rows["all_null"]["approx_distinct"] == 0 and rows["all_null"]["top_values"] is None
    assert rows["with nulls"]["nulls"] == 100
    assert rows["flag"]["top_values"] == [
        {"value": "false", "count": 267},
        {"value": "true", "count": 133},
    ]
    assert rows['it\'s "quoted"']["nulls"] == 100
    assert {e["value"] for e in rows["mood"]["top_values"]} == {"sad", "ok", "happy"}
    assert len(rows["long_text"]["min"]) == 256
    assert rows["nums"]["type"] == "BIGINT[]" and rows["nums"]["count"] == 400


def test_empty_and_single_row_tables(db: Database) -> None:
    empty = _check_against_duckdb(db, TableRef("edge", "empty")).to_pylist()
    assert [r["count"] for r in empty] == [0, 0, 0]
    assert all(r["approx_distinct"] == 0 and r["top_values"] is None for r in empty)
    (single,) = _check_against_duckdb(db, TableRef("edge", "single")).to_pylist()
    assert single["mean"] == 42.0 and single["stddev"] is None and single["q50"] == "42.0"
    assert single["top_values"] == [{"value": "42.0", "count": 1}]


def test_column_selection_and_unknown_columns(db: Database) -> None:
    ref = TableRef("demo", "orders")
    with db.reading() as cur:
        picked = profile_table(cur, ref, ["STATUS", "amount", "status"])
        assert picked.column("name").to_pylist() == ["status", "amount"]
        with pytest.raises(InvalidArgument) as err:
            profile_table(cur, ref, ["amount", "nope"])
    assert "'nope'" in err.value.detail and "order_id" in err.value.detail


def test_large_tables_use_bounded_quartile_sketches(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import flight_server.profiles as profiles

    monkeypatch.setattr(profiles, "EXACT_QUARTILE_MAX_VALUES", 1000)
    ref = TableRef("demo", "orders")
    with db.reading() as cur:
        profile = profile_table(cur, ref, ["order_id", "ordered_at"])
        exact = cur.execute(
            f"SELECT quantile_disc(order_id, 0.5), min(order_id), max(order_id) FROM {ref.sql}"
        ).fetchall()[0]
    assert profile.schema.metadata[b"quiver.quartiles"] == b"approximate"
    median = int(profile.column("q50")[0].as_py())
    assert abs(median - exact[0]) <= 0.02 * (exact[2] - exact[1])


# --- the cache ---------------------------------------------------------------------------


@pytest.fixture
def fresh_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "c.duckdb", temp_dir=tmp_path / "tmp", lockdown=False)
    with database.transaction() as cur:
        cur.execute("CREATE SCHEMA s; CREATE TABLE s.t AS SELECT i AS x, i * 2 AS y FROM range(100) t(i)")
        TableCatalog.bump_version(cur, TableRef("s", "t"))
    yield database
    database.close()


def _max_of(profile: pa.Table) -> str:
    return str(profile.column("max")[0].as_py())


def test_cache_serves_unchanged_versions_without_a_scan(fresh_db: Database) -> None:
    tables = TableCatalog(fresh_db)
    cache = ProfileCache(fresh_db, tables)
    ref = TableRef("s", "t")
    first = cache.profile(ref)
    assert cache.stats() == ProfilesStatus(entries=1, hits=0, computed=1)
    assert _max_of(first) == "99"

    # Change the data WITHOUT bumping the version: the cache must not scan, so it serves
    # the (now stale) profile — proof that no query ran.
    with fresh_db.transaction() as cur:
        cur.execute("INSERT INTO s.t VALUES (1000, 0)")
    again = cache.profile(ref)
    assert again is first and _max_of(again) == "99"
    assert cache.stats().computed == 1 and cache.stats().hits == 1

    # A writer that bumps the version invalidates: the next profile scans and sees the row.
    with fresh_db.transaction() as cur:
        cur.execute("INSERT INTO s.t VALUES (2000, 0)")
        tables.bump_version(cur, ref)
    fresh = cache.profile(ref)
    assert _max_of(fresh) == "2000" and fresh.column("count")[0].as_py() == 102
    assert cache.stats() == ProfilesStatus(entries=1, hits=1, computed=2)

    # Column subsets are their own entries; names match case-insensitively.
    cache.profile(ref, ["X"])
    cache.profile(ref, ["x"])
    assert cache.stats() == ProfilesStatus(entries=2, hits=2, computed=3)


def test_concurrent_requests_compute_once(fresh_db: Database) -> None:
    cache = ProfileCache(fresh_db, TableCatalog(fresh_db))
    ref = TableRef("s", "t")
    results: list[pa.Table] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(cache.profile(ref))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r.equals(results[0]) for r in results)
    assert cache.stats().computed == 1 and cache.stats().hits == 3


def test_cache_is_bounded(fresh_db: Database) -> None:
    cache = ProfileCache(fresh_db, TableCatalog(fresh_db), max_entries=2)
    ref = TableRef("s", "t")
    cache.profile(ref, ["x"])
    cache.profile(ref)
    cache.profile(ref, ["Y", "y"])  # a third key evicts the least recently used
    assert cache.stats().entries == 2


# --- through the Flight server ----------------------------------------------------------------


def _profile(server: Server, token: str, table: str) -> pa.Table:
    client = server.flight()
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "profile", "table": table}))
    info = client.get_flight_info(descriptor, call_options(token))
    return pa.concat_tables(client.do_get(e.ticket, call_options(token)).read_all() for e in info.endpoints)


def test_flight_profile_is_cached_per_version_and_governed(server: Server) -> None:
    agent = server.demo_token
    assert agent is not None
    before = server.http().get("/v1/status").json()["profiles"]
    first = _profile(server, agent, "demo.orders")
    assert first.schema.equals(PROFILE_SCHEMA)
    with server.catalog.db.reading() as cur:
        expected = cur.sql("SELECT * FROM demo.orders LIMIT 0").columns
        rows = _one(cur, "SELECT count(*) FROM demo.orders")
    assert first.column("name").to_pylist() == expected
    assert set(first.column("count").to_pylist()) == {rows}
    again = _profile(server, server.admin_token, "demo.orders")  # admins share the entry
    assert again.equals(first)
    after = server.http().get("/v1/status").json()["profiles"]
    assert after["computed"] == before["computed"] + 1 and after["hits"] >= before["hits"] + 1

    # Not readable (system schema, unknown table): the same refusal, nothing computed.
    for table in ("_quiver.tokens", "demo.nope"):
        with pytest.raises(flight.FlightUnauthorizedError) as err:
            _profile(server, agent, table)
        assert error_info(err.value)["code"] == "PERMISSION_DENIED"
    assert server.http().get("/v1/status").json()["profiles"]["computed"] == after["computed"]
