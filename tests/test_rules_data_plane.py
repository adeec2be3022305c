"""Row and column rules applied on every read path (proto_docs/governance.md, "How rules are
applied"), against a real server.

One swarm, ``rgn``, reads ``ruled.*``; its entry for ``ruled.people`` excludes ``ssn``, hashes
``email`` and keeps the rows ``region = $region OR owner = $agent`` (the swarm's attribute
``region`` is ``north``). Every answer is checked against DuckDB's own answer on the view the
rule defines, built in the test in a separate in-memory DuckDB (the *oracle*): a query shape
either answers exactly what the oracle answers or is refused with a client error — and never
shows a filtered-out row, the excluded column or a clear e-mail address.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.errors import PermissionDenied
from catalog.identity import Principal
from catalog.keys import MASK_KEY_FILE, write_private
from catalog.rules import TableRule
from catalog.sqlguard import SqlGuard
from catalog.tables import TableRef
from flight_server.errors import duckdb_error
from mcp_server.backend import LocalBackend
from quiver_client import QuiverClient
from quiver_client.client import QuiverClientError
from tests.guard_support import guard_database
from tests.harness import (
    SMALL_SPLIT,
    Server,
    call_options,
    client_error_info,
    flight_sql_connect,
    start_server,
    wait_until,
)
from tests.test_sqlguard import TABLE_ESCAPES

SWARM = "rgn"
DATA = """
CREATE SCHEMA IF NOT EXISTS ruled;
CREATE TABLE ruled.{people} AS
    SELECT i AS id,
           CASE WHEN i % 3 = 0 THEN 'north' WHEN i % 3 = 1 THEN 'south' ELSE 'east' END AS region,
           'a' || (i % 4 + 1) AS owner,
           'person-' || i || '-x' AS name,
           CASE WHEN i % 5 = 0 THEN NULL ELSE 'p' || i || '@example.com' END AS email,
           'SSN-' || (1000 + i) AS ssn,
           1000 + i * 10 AS pay
    FROM range(60) r(i);
CREATE TABLE ruled.big AS
    SELECT i AS id, CASE WHEN i % 3 = 0 THEN 'north' ELSE 'south' END AS region, 'S' || i AS secret
    FROM range(40000) r(i);
CREATE TABLE ruled.orders AS
    SELECT i AS id, i % 60 AS customer_id, CASE WHEN i % 2 = 0 THEN 'open' ELSE 'paid' END AS status,
           (i * 1.5)::DOUBLE AS amount
    FROM range(200) r(i);
"""
RULE = TableRule(
    table="ruled.people",
    except_columns=("ssn",),
    row_filter="region = $region OR owner = $agent",
    parameters=("region", "agent"),
    mask=(("email", "hash"),),
)
#: A table large enough to be split into rowid ranges (the module's server uses SMALL_SPLIT).
BIG_RULE = TableRule(
    table="ruled.big", except_columns=("secret",), row_filter="region = $region", parameters=("region",)
)
#: The server's key of hash masks: written to its data dir before the first start, as a
#: restored backup's would be (catalog/keys.py ``load_or_create_mask_key``).
MASK_KEY = "5eed" * 16
#: What the rule's view is, written by hand for the oracle.
VIEW = (
    "CREATE VIEW ruled.people AS SELECT * EXCLUDE (ssn) "
    f"REPLACE (sha256('{MASK_KEY}' || CAST(email AS VARCHAR)) AS email) "
    "FROM ruled.people_base WHERE region = {region} OR owner = {agent}"
)


def visible(i: int, region: str, agent: str) -> bool:
    regions = {0: "north", 1: "south", 2: "east"}
    return regions[i % 3] == region or f"a{i % 4 + 1}" == agent


def forbidden(region: str, agent: str) -> set[str]:
    """Cell values an agent must never see: the filtered-out rows' names, every clear e-mail
    address and every value of the excluded column."""
    names = {f"person-{i}-x" for i in range(60) if not visible(i, region, agent)}
    return names | {f"p{i}@example.com" for i in range(60)} | {f"SSN-{1000 + i}" for i in range(60)}


def oracle(region: str, agent: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    con.execute("ATTACH ':memory:' AS quiver; USE quiver")  # the catalog name of the server's database
    con.execute(DATA.format(people="people_base"))
    con.execute(VIEW.format(region=f"'{region}'", agent=f"'{agent}'"))
    return con


def rows(table: pa.Table) -> list[str]:
    """A result as a sorted list of row texts (set comparison, duplicates kept)."""
    return sorted(repr(sorted(r.items())) for r in table.to_pylist())


def cells(table: pa.Table) -> Iterator[str]:
    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from walk(v)
        elif value is not None:
            yield str(value)

    for row in table.to_pylist():
        yield from walk(row)


def assert_no_leak(table: pa.Table, region: str = "north", agent: str = "a1") -> None:
    assert "ssn" not in [n.lower() for n in table.column_names]
    bad = forbidden(region, agent)
    leaked = [c for c in cells(table) if any(b in c for b in bad)]
    assert not leaked, leaked[:5]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("rules")
    write_private(data_dir / "keys" / MASK_KEY_FILE, MASK_KEY.encode())
    s = start_server(data_dir, flight=SMALL_SPLIT)
    with s.catalog.db.transaction() as cur:
        cur.execute(DATA.format(people="people"))
    s.runtime.flight.planner.guard.invalidate_tables()  # type: ignore[union-attr]
    r = s.http().post("/v1/swarms", json={"name": SWARM, "tables": ["ruled.*"]})
    assert r.status_code == 201, r.text
    s.catalog.policy.set_rules(SWARM, [RULE, BIG_RULE])
    s.catalog.policy.set_attributes(SWARM, {"region": "north"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokens(env: Server) -> dict[str, str]:
    return {agent: env.mint(swarm=SWARM, agent=agent) for agent in ("a1", "a2")}


@pytest.fixture(scope="module")
def a1(env: Server, tokens: dict[str, str]) -> QuiverClient:
    c = QuiverClient(env.flight_url, token=tokens["a1"])
    env._clients.append(c)
    return c


@pytest.fixture(scope="module")
def truth() -> duckdb.DuckDBPyConnection:
    return oracle("north", "a1")


# --- the corpus of SQL shapes ---------------------------------------------------------------
def _from_escapes() -> list[str]:
    """The guard's escape corpus shapes that read the forbidden table, pointed at the ruled one."""
    out = []
    for sql, offender in TABLE_ESCAPES:
        if offender != "secret.salaries" or "secret.salaries" not in sql:
            continue
        out.append(
            sql.replace("secret.salaries", "ruled.people")
            .replace("demo.orders", "ruled.orders")
            .replace("demo.customers", "ruled.orders")
        )
    return out


P = "ruled.people"
SHAPES = [
    *_from_escapes(),
    f"SELECT * FROM {P}",
    f"SELECT people.email, people.name FROM {P}",
    f"SELECT p.* FROM {P} p",
    f"SELECT COLUMNS(*) FROM {P}",
    f"SELECT COLUMNS('e.*') FROM {P}",
    f"SELECT * EXCLUDE (name) FROM {P}",
    f"SELECT * FROM {P} WHERE email = 'p3@example.com'",
    f"SELECT count(*) FROM {P} WHERE email LIKE '%@example.com'",
    f"SELECT count(*) FROM {P} WHERE region <> 'north'",
    f"SELECT max(id), min(id), count(*), sum(pay) FROM {P} WHERE region = 'south'",
    f"SELECT region, owner, count(*), sum(pay), string_agg(email, ',' ORDER BY id) FROM {P} GROUP BY ALL",
    f"WITH x AS (SELECT * FROM {P}) SELECT * FROM x",
    f"WITH x AS (SELECT * FROM {P}), y AS (SELECT * FROM x WHERE pay > 1100) SELECT count(*) FROM y",
    f"SELECT a.id, b.id FROM {P} a JOIN {P} b ON a.pay + 10 = b.pay",
    f"SELECT o.id, p.name FROM ruled.orders o LEFT JOIN {P} p ON p.id = o.customer_id",
    f"SELECT o.id, p.name FROM ruled.orders o JOIN {P} p USING (id)",
    f"SELECT * FROM ruled.orders o WHERE o.customer_id IN (SELECT id FROM {P})",
    f"SELECT * FROM ruled.orders o WHERE NOT EXISTS (SELECT 1 FROM {P} p WHERE p.id = o.customer_id)",
    f"SELECT (SELECT count(*) FROM {P}) AS n, (SELECT max(name) FROM {P}) AS m",
    f"SELECT id FROM {P} UNION SELECT customer_id FROM ruled.orders",
    f"SELECT id FROM ruled.orders EXCEPT SELECT id FROM {P}",
    f"SELECT * FROM ruled.orders o, LATERAL (SELECT name, email FROM {P} p WHERE p.id = o.customer_id)",
    f"PIVOT {P} ON region IN ('north', 'south', 'east') USING count(*) GROUP BY owner",
    f"UNPIVOT (SELECT id, name, email FROM {P}) ON name, email INTO NAME k VALUE v",
    f"SELECT * FROM {P} USING SAMPLE 100%",
    f"SELECT * FROM {P} TABLESAMPLE 100%",
    f"SELECT ruled.people.name FROM {P}",
    f"SELECT quiver.ruled.people.name, ruled.people.email FROM {P} WHERE ruled.people.id < 30",
    f"SELECT ruled.people.name FROM {P} JOIN ruled.orders o ON o.customer_id = ruled.people.id",
    f"SELECT people.ssn FROM {P}",
    f"SELECT ssn FROM {P}",
    f"SELECT * FROM {P} WHERE ssn = 'SSN-1001'",
    f"SELECT * FROM {P} ORDER BY (SELECT count(*) FROM {P} q WHERE q.id < people.id) LIMIT 5",
    f"SELECT id, rank() OVER (PARTITION BY region ORDER BY pay) FROM {P}",
    f"SELECT DISTINCT ON (region) region, name FROM {P} ORDER BY region, id",
    f"SELECT region, count(*) FROM {P} GROUP BY region HAVING count(*) > (SELECT count(*) / 10 FROM {P})",
    f"SELECT * FROM {P} AS p(a, b, c)",
    f"FROM {P} SELECT name WHERE id < 12",
    f"SELECT * FROM {P} p JOIN {P} q ON p.owner = q.owner AND p.id < q.id",
    f"SELECT list(name ORDER BY id) FROM {P}",
    # A CTE of the table's name is not the table; the table named inside or beside it is.
    "WITH people AS (SELECT 1 AS id, 'clear' AS email) SELECT * FROM people",
    f"WITH people AS (SELECT * FROM {P}) SELECT * FROM people",
    f"WITH people AS (SELECT 1 AS id) SELECT p.* FROM {P} p JOIN people USING (id)",
    f"SELECT * FROM {P} NATURAL JOIN ruled.orders",
    f"SELECT * FROM (SELECT * FROM (SELECT * FROM {P}))",
    f"WITH RECURSIVE r AS (SELECT min(id) AS n FROM {P} UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r",
]


def run(client: QuiverClient, sql: str) -> pa.Table | dict[str, Any]:
    try:
        return client.query(sql)
    except QuiverClientError as e:
        return {"code": e.code, "detail": e.detail}


def test_the_corpus_answers_what_duckdb_answers_on_the_view(
    a1: QuiverClient, truth: duckdb.DuckDBPyConnection
) -> None:
    assert len(SHAPES) >= 70
    answered, both, refused = 0, 0, []
    for sql in SHAPES:
        got = run(a1, sql)
        if isinstance(got, dict):
            # A refusal is a client error that quotes nothing of the view.
            assert got["code"] in ("INVALID_ARGUMENT", "PERMISSION_DENIED"), (sql, got)
            for secret in ("north", "sha256", "$region", "owner ="):
                assert secret not in got["detail"], (sql, got)
            try:
                truth.sql(sql).fetchall()
            except duckdb.Error:
                both += 1  # DuckDB refuses it on the view too (e.g. QUALIFY without a window)
                continue
            refused.append(sql)
            continue
        assert_no_leak(got)
        want = truth.sql(sql).to_arrow_table()
        assert got.column_names == want.column_names, sql
        if "SAMPLE 1" in sql:  # a random row: one of the view's
            assert got.num_rows == want.num_rows and set(rows(got)) <= set(
                rows(truth.sql(f"FROM {P}").to_arrow_table())
            )
        else:
            assert rows(got) == rows(want), sql
        answered += 1
    # The shapes a view cannot answer as a table would: naming the excluded column (it does
    # not exist for the caller), and a bare VALUES statement, which DuckDB's writer does not
    # write back as it parses (refused: fail closed).
    assert all("ssn" in sql or sql.startswith("VALUES") for sql in refused), refused
    assert answered + both + len(refused) == len(SHAPES) and answered >= len(SHAPES) - 8


def test_admin_reads_everything(env: Server) -> None:
    admin = QuiverClient(env.flight_url, token=env.admin_token)
    env._clients.append(admin)
    table = admin.read("ruled.people")
    assert table.num_rows == 60 and "ssn" in table.column_names
    assert "p1@example.com" in table.column("email").to_pylist()
    assert admin.query("SELECT count(*) AS n FROM ruled.people").to_pylist() == [{"n": 60}]


def test_a_swarm_token_is_ruled_like_its_agents(env: Server) -> None:
    """A swarm token reads through the same rule; ``$agent`` binds NULL for it, so only the
    rows the swarm's own attributes select pass."""
    swarm = QuiverClient(env.flight_url, token=env.mint(kind="swarm", swarm=SWARM))
    env._clients.append(swarm)
    got = swarm.query("SELECT id FROM ruled.people ORDER BY id")
    assert got.column("id").to_pylist() == [i for i in range(60) if i % 3 == 0]
    table = swarm.read("ruled.people")
    assert "ssn" not in table.column_names and table.num_rows == 20


def test_the_excluded_column_reads_like_a_missing_one(a1: QuiverClient) -> None:
    got = run(a1, "SELECT ssn FROM ruled.people")
    assert isinstance(got, dict) and got["code"] == "INVALID_ARGUMENT"
    missing = run(a1, "SELECT no_such_column FROM ruled.people")
    assert isinstance(missing, dict) and missing["code"] == "INVALID_ARGUMENT"
    assert "not found" in got["detail"]
    assert "ssn" not in missing["detail"]  # candidates are the view's columns, never the hidden one


def test_errors_of_a_rewritten_query_do_not_quote_it(env: Server, tokens: dict[str, str]) -> None:
    """DuckDB's ``LINE 1: …`` context would quote the rewritten text (the filter, the bound
    value, the masks); it is dropped on every path, binder and runtime errors alike."""
    c = env.flight()
    opts = call_options(tokens["a1"])
    for sql in (
        "SELECT nosuch FROM ruled.people",
        "SELECT CAST(name AS INTEGER) FROM ruled.people",
        "SELECT * FROM ruled.people WHERE pay = 'x'",
    ):
        for max_rows in (None, 5):
            body: dict[str, Any] = {"kind": "query", "sql": sql}
            if max_rows is not None:
                body["max_rows"] = max_rows
            descriptor = flight.FlightDescriptor.for_command(json.dumps(body))
            with pytest.raises(flight.FlightError) as e:
                info = c.get_flight_info(descriptor, opts)
                c.do_get(info.endpoints[0].ticket, opts).read_all()
            detail = client_error_info(e.value)["detail"]
            for secret in ("north", "sha256", "region =", "EXCLUDE", "LINE"):
                assert secret not in detail, (sql, detail)
            # A value a conversion error quotes is a visible row's: the filter ran first.
            assert not any(name in detail for name in forbidden("north", "a1")), detail
    # An async query's failure, found by a worker long after the checks, says no more.
    client = QuiverClient(env.flight_url, token=tokens["a1"])
    env._clients.append(client)
    failed = client.submit("SELECT CAST(name AS INTEGER) FROM ruled.people")
    assert wait_until(lambda: client.status(failed)["state"] in ("failed", "succeeded"), timeout=60)
    status = client.status(failed)
    assert status["state"] == "failed", status
    detail = json.dumps(status)
    for secret in ("north", "sha256", "region =", "EXCLUDE", "LINE"):
        assert secret not in detail, detail
    # An unruled query keeps DuckDB's context: only rewrites lose it.
    with pytest.raises(flight.FlightError) as e:
        sql = "SELECT CAST(status AS INTEGER) FROM ruled.orders"
        info = c.get_flight_info(
            flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql})), opts
        )
        c.do_get(info.endpoints[0].ticket, opts).read_all()
    assert "LINE 1" in client_error_info(e.value)["detail"]


# --- the other read paths ---------------------------------------------------------------------
def test_a_path_scan_reads_the_view(a1: QuiverClient, truth: duckdb.DuckDBPyConnection) -> None:
    want = truth.sql("SELECT * FROM ruled.people").to_arrow_table()
    for _ in range(2):  # the second scan would be served by the hot-table cache if it held it
        got = a1.read("ruled.people")
        assert_no_leak(got)
        assert got.column_names == want.column_names and rows(got) == rows(want)


def test_a_split_path_scan_reads_the_view_in_every_part(a1: QuiverClient) -> None:
    info = a1.info(flight.FlightDescriptor.for_path("ruled", "big"))
    assert len(info.endpoints) > 1  # split into rowid ranges, each applied inside the view
    assert info.schema.names == ["id", "region"] and info.total_records == 13334
    got = a1.fetch(info)
    assert got.num_rows == 13334 and set(got.column("region").to_pylist()) == {"north"}
    assert sorted(got.column("id").to_pylist()) == list(range(0, 40000, 3))
    # A query of the ruled table is one endpoint: its rows are the view's, never split by rowid.
    query = a1.info(a1.command("query", sql="SELECT * FROM ruled.big"))
    assert len(query.endpoints) == 1 and a1.fetch(query).num_rows == 13334


def test_listings_and_schemas_show_the_view(
    env: Server, tokens: dict[str, str], a1: QuiverClient, truth: duckdb.DuckDBPyConnection
) -> None:
    want = truth.sql("SELECT * FROM ruled.people LIMIT 0").to_arrow_table().schema
    count = truth.sql("SELECT count(*) FROM ruled.people").fetchall()[0][0]
    c = env.flight()
    listed = {
        tuple(p.decode() for p in i.descriptor.path): i
        for i in c.list_flights(options=call_options(tokens["a1"]))
    }
    info = listed[("ruled", "people")]
    assert info.schema.names == want.names and "ssn" not in info.schema.names
    assert info.total_records == count
    assert a1.schema("ruled.people").names == want.names
    assert a1.query_schema("SELECT * FROM ruled.people").names == want.names
    assert a1.info(flight.FlightDescriptor.for_path("ruled", "people")).total_records == count


def test_samples_read_the_view(a1: QuiverClient, truth: duckdb.DuckDBPyConnection) -> None:
    every = set(rows(truth.sql("SELECT * FROM ruled.people").to_arrow_table()))
    for table in (
        a1.sample("ruled.people", 5),
        a1.sample("ruled.people", 10, method="random", seed=7),
        a1.sample("ruled.people", percent=60, seed=3),
        a1.sample("ruled.people", 100),
    ):
        assert_no_leak(table)
        assert table.num_rows > 0 and set(rows(table)) <= every
    assert a1.sample("ruled.people", 100).num_rows == len(every)
    part = a1.sample("ruled.people", 5, columns=["name", "email"])
    assert part.column_names == ["name", "email"]
    assert_no_leak(part)
    with pytest.raises(QuiverClientError) as e:
        a1.sample("ruled.people", 5, columns=["ssn"])
    assert e.value.code == "INVALID_ARGUMENT" and "ssn" not in e.value.detail.split("its columns are:")[-1]


def test_a_profile_describes_the_view(a1: QuiverClient, truth: duckdb.DuckDBPyConnection) -> None:
    count = truth.sql("SELECT count(*) FROM ruled.people").fetchall()[0][0]
    profile = a1.profile("ruled.people")
    assert "ssn" not in profile.column("name").to_pylist()
    assert set(profile.column("count").to_pylist()) == {count}
    assert_no_leak(profile)
    email = next(r for r in profile.to_pylist() if r["name"] == "email")
    want = truth.sql("SELECT min(email), max(email) FROM ruled.people").fetchall()[0]
    assert (email["min"], email["max"]) == want


def test_async_queries_and_exports_read_the_view(
    env: Server, a1: QuiverClient, truth: duckdb.DuckDBPyConnection
) -> None:
    sql = "SELECT id, name, email FROM ruled.people ORDER BY id"
    want = truth.sql(sql).to_arrow_table()
    query_id = a1.submit(sql)
    got = a1.result(query_id, wait=60)
    assert rows(got) == rows(want)
    # What the agent is shown of its query is its own text, never the rewrite (filter, masks).
    assert a1.status(query_id)["sql"] == sql
    logged = a1.action("my-queries", {"limit": 20})["queries"]
    assert any(q["sql"] == sql for q in logged)
    assert not any("sha256" in (q["sql"] or "") or "north" in (q["sql"] or "") for q in logged)
    for export in (a1.export(sql, format="arrow"), a1.export(table="ruled.people", format="arrow")):
        admin = env.catalog.tokens.check(env.admin_token)
        _, path = env.catalog.artefacts.content_path(admin, export["artefact"]["id"])
        table = pa.ipc.open_stream(Path(path).read_bytes()).read_all()
        assert_no_leak(table)
        assert table.num_rows == want.num_rows
        assert export["artefact"]["provenance"]["sql"] in (sql, 'SELECT * FROM "ruled"."people"')


def test_flight_sql_reads_the_view(
    env: Server, tokens: dict[str, str], truth: duckdb.DuckDBPyConnection
) -> None:
    conn = flight_sql_connect(env, tokens["a1"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT * FROM ruled.people WHERE id < ?", parameters=(40,))
            got = cur.fetch_arrow_table()
        assert_no_leak(got)
        assert rows(got) == rows(truth.sql("SELECT * FROM ruled.people WHERE id < 40").to_arrow_table())
        schema = conn.adbc_get_table_schema("people", db_schema_filter="ruled")
        assert "ssn" not in schema.names and schema.names == got.column_names
    finally:
        conn.close()


# --- principals, caches, races ----------------------------------------------------------------
def test_two_agents_see_their_own_rows_through_one_cached_text(env: Server, tokens: dict[str, str]) -> None:
    sql = "SELECT id, name, owner FROM ruled.people ORDER BY id"
    want = {agent: rows(oracle("north", agent).sql(sql).to_arrow_table()) for agent in tokens}
    assert want["a1"] != want["a2"]
    clients = {agent: QuiverClient(env.flight_url, token=token) for agent, token in tokens.items()}
    env._clients.extend(clients.values())
    errors: list[BaseException] = []

    def hammer(agent: str) -> None:
        try:
            for _ in range(15):
                got = clients[agent].query(sql)
                assert rows(got) == want[agent], agent
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(a,)) for a in ("a1", "a2", "a1", "a2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_a_changed_attribute_takes_effect_on_the_next_query(env: Server, a1: QuiverClient) -> None:
    sql = "SELECT id FROM ruled.people ORDER BY id"
    before = a1.query(sql)
    assert rows(before) == rows(oracle("north", "a1").sql(sql).to_arrow_table())
    policy = env.catalog.policy
    try:
        policy.set_attributes(SWARM, {"region": "south"})
        after = a1.query(sql)
        assert rows(after) == rows(oracle("south", "a1").sql(sql).to_arrow_table())
        assert a1.read("ruled.people").num_rows == after.num_rows
        policy.set_attributes(SWARM, {})  # absent: binds NULL, only the agent's own rows pass
        assert rows(a1.query(sql)) == rows(oracle("nowhere", "a1").sql(sql).to_arrow_table())
    finally:
        policy.set_attributes(SWARM, {"region": "north"})
    assert rows(a1.query(sql)) == rows(before)


# --- units: binding, columns, agent attributes --------------------------------------------------
def _principal(agent: str, attributes: dict[str, Any] | None = None) -> Principal:
    return Principal(
        kind="agent",
        jti=f"jti-{agent}",
        subject=agent,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        swarm=SWARM,
        agent=agent,
        attributes=tuple((attributes or {}).items()),
    )


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    db, tables, policy = guard_database(tmp_path_factory.mktemp("units"), DATA.format(people="people"))
    policy.set_allowlist(SWARM, ["ruled.*"])
    guard = SqlGuard(tables, policy, "quiver")
    return db, policy, guard


def test_an_agent_attribute_overrides_the_swarms(unit: Any) -> None:
    db, policy, guard = unit
    policy.set_rules(SWARM, [RULE])
    policy.set_attributes(SWARM, {"region": "north"})
    q = guard.check(_principal("a9", {"region": "east"}), "SELECT id FROM ruled.people ORDER BY id")
    assert q.ruled and "'east'" in q.sql and "'north'" not in q.sql
    with db.reading() as cur:
        got = [r[0] for r in cur.execute(q.sql).fetchall()]
    assert got == [i for i in range(60) if visible(i, "east", "a9")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.sampled_from(["north", "south", "east", "' OR true --", "$region", "north' OR 'a' = 'a"]),
        st.text(
            alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=12
        ),
    ),
    number=st.one_of(
        st.integers(-(2**40), 2**40), st.sampled_from([1000, 1090, -1000]), st.floats(-1e6, 1e6)
    ),
)
def test_a_bound_value_is_a_literal_never_sql(unit: Any, text: str, number: int | float) -> None:
    """Whatever an attribute holds — quotes, ``--``, ``$``, negative numbers — it binds as one
    literal: the view keeps exactly the rows whose column equals it."""
    db, policy, _ = unit
    rule = TableRule(
        table="ruled.people", row_filter="region = $region OR pay = -$n", parameters=("region", "n")
    )
    policy.set_rules(SWARM, [rule])
    policy.set_attributes(SWARM, {"region": text, "n": number})
    view = policy.relation(_principal("a1"), TableRef("ruled", "people"))
    with db.reading() as cur:
        got = sorted(r[0] for r in cur.execute(f"SELECT id FROM {view}").fetchall())
    regions = {0: "north", 1: "south", 2: "east"}
    assert got == [i for i in range(60) if regions[i % 3] == text or 1000 + i * 10 == -number]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    picked=st.lists(
        st.sampled_from(["id", "region", "owner", "name", "email", "pay"]), min_size=1, unique=True
    ),
    kind=st.sampled_from(["hash", "null", "redact", "last4"]),
)
def test_a_column_rule_is_the_schema_every_path_sees(unit: Any, picked: list[str], kind: str) -> None:
    db, policy, guard = unit
    rule = TableRule(table="ruled.people", columns=tuple(picked), mask=(("email", kind),))  # type: ignore[arg-type]
    policy.set_rules(SWARM, [rule])
    agent = _principal("a1")
    q = guard.check(agent, "SELECT * FROM ruled.people")
    [info] = policy.describe(agent, [TableRef("ruled", "people")])
    assert info.schema.names == picked and info.rows == 60
    with db.reading() as cur:
        table = cur.sql(q.sql).to_arrow_table()
    assert table.column_names == picked
    if "email" in picked:
        values = [v for v in table.column("email").to_pylist() if v is not None]
        assert all("@" not in str(v) or (kind == "last4" and str(v).startswith("****")) for v in values)
        if kind == "null":
            assert values == [] and table.schema.field("email").type == pa.string()
    for hidden in {"id", "region", "owner", "name", "email", "pay"} - set(picked):
        with pytest.raises(duckdb.BinderException), db.reading() as cur:
            cur.sql(guard.check(agent, f"SELECT {hidden} FROM ruled.people").sql).fetchall()


def test_a_ticket_never_serves_a_view_the_rules_no_longer_give(env: Server, tokens: dict[str, str]) -> None:
    """A ticket planned under one rule and redeemed after the rule or the attributes changed
    is refused (UNAVAILABLE: plan again), for a PATH scan and a query alike — ready results
    held with the ticket included; a ticket of an unaffected table still works."""
    c = env.flight()
    opts = call_options(tokens["a1"])
    descriptors = [
        flight.FlightDescriptor.for_path("ruled", "people"),
        flight.FlightDescriptor.for_command(
            json.dumps({"kind": "query", "sql": "SELECT * FROM ruled.people"})
        ),
    ]
    policy = env.catalog.policy
    try:
        unmasked = msgspec.structs.replace(RULE, mask=())
        for change, region, masked in (
            (lambda: policy.set_attributes(SWARM, {"region": "south"}), "south", True),
            (lambda: policy.set_rules(SWARM, [unmasked, BIG_RULE]), "north", False),
        ):
            infos = [c.get_flight_info(d, opts) for d in descriptors]
            orders = c.get_flight_info(flight.FlightDescriptor.for_path("ruled", "orders"), opts)
            change()
            for info in infos:
                with pytest.raises(flight.FlightError) as e:
                    c.do_get(info.endpoints[0].ticket, opts).read_all()
                assert client_error_info(e.value)["code"] == "UNAVAILABLE"
            assert c.do_get(orders.endpoints[0].ticket, opts).read_all().num_rows == 200
            # Planned again, the new rule applies.
            fresh = c.get_flight_info(descriptors[0], opts)
            table = c.do_get(fresh.endpoints[0].ticket, opts).read_all()
            assert table.num_rows == sum(visible(i, region, "a1") for i in range(60))
            clear = any("@" in (v or "") for v in table.column("email").to_pylist())
            assert clear is not masked
            policy.set_rules(SWARM, [RULE, BIG_RULE])
            policy.set_attributes(SWARM, {"region": "north"})
    finally:
        policy.set_rules(SWARM, [RULE, BIG_RULE])
        policy.set_attributes(SWARM, {"region": "north"})


def test_a_repeated_ruled_text_costs_no_rewrite(unit: Any) -> None:
    """The rewrite is remembered per (tree, views): the same text for the same bound values
    costs no DuckDB call; another agent's values (another view) are a rewrite of their own."""
    _, policy, guard = unit
    policy.set_rules(SWARM, [RULE])
    policy.set_attributes(SWARM, {"region": "north"})
    sql = "SELECT name FROM ruled.people WHERE id = 42"
    first = guard.check(_principal("a1"), sql)
    made = guard.rewrites
    for _ in range(3):
        assert guard.check(_principal("a1"), sql) == first
    assert guard.rewrites == made
    other = guard.check(_principal("a2"), sql)
    assert guard.rewrites == made + 1 and other.normalized != first.normalized and "'a2'" in other.sql


def test_a_ruled_query_is_never_split_nor_served_from_the_table_cache(unit: Any) -> None:
    _, policy, guard = unit
    policy.set_rules(SWARM, [RULE])
    q = guard.check(_principal("a1"), "SELECT * FROM ruled.people")
    assert q.ruled and not guard.splittable(q) and guard.plain_columns(q) is None
    plain = guard.check(_principal("a1"), "SELECT * FROM ruled.orders")
    assert not plain.ruled and guard.plain_columns(plain) == ()


def test_time_travel_on_a_ruled_table_is_refused(unit: Any) -> None:
    _, policy, guard = unit
    policy.set_rules(SWARM, [RULE])
    with pytest.raises(PermissionDenied) as e:
        guard.check(_principal("a1"), "SELECT * FROM ruled.people AT (VERSION => 1)")
    assert "rules" in e.value.detail


def test_mcp_tools_read_the_view(
    env: Server, tokens: dict[str, str], truth: duckdb.DuckDBPyConnection
) -> None:
    """MCP's in-process backend (what ``/mcp`` tools call): listings, samples, profiles and
    SQL through the same planner and runner."""
    principal = env.catalog.tokens.check(tokens["a1"])
    backend = LocalBackend(env.catalog, env.catalog.require_queries(), principal)
    meta = next(m for m in backend.tables() if m.name == "ruled.people")
    assert meta.schema.names == truth.sql("FROM ruled.people LIMIT 0").to_arrow_table().column_names
    assert meta.rows == truth.sql("SELECT count(*) FROM ruled.people").fetchall()[0][0]
    assert_no_leak(backend.read({"kind": "sample", "table": "ruled.people", "rows": 100}))
    assert_no_leak(backend.read({"kind": "profile", "table": "ruled.people"}))
    rows_ = backend.query("SELECT * FROM ruled.people WHERE email IS NOT NULL", [], 1000)
    try:
        got = rows_.reader.read_all()
    finally:
        rows_.close()
    assert_no_leak(got)
    assert rows(got) == rows(truth.sql("SELECT * FROM ruled.people WHERE email IS NOT NULL").to_arrow_table())


def test_post_v1_query_reads_the_view(
    env: Server, tokens: dict[str, str], truth: duckdb.DuckDBPyConnection
) -> None:
    """``POST /v1/query`` (the control plane's route onto the same runner): the view's rows,
    and a refusal that quotes nothing of it."""
    http = env.http(tokens["a1"])
    sql = "SELECT id, name, email FROM ruled.people ORDER BY id"
    r = http.post("/v1/query", json={"sql": sql}, headers={"accept": "application/json"})
    assert r.status_code == 200, r.text
    got = pa.Table.from_pylist(r.json()["rows"])
    assert_no_leak(got)
    assert rows(got) == rows(truth.sql(sql).to_arrow_table())
    bad = http.post("/v1/query", json={"sql": "SELECT CAST(name AS INTEGER) FROM ruled.people"})
    assert bad.status_code == 400, bad.text
    for secret in ("north", "sha256", "region =", "EXCLUDE", "LINE"):
        assert secret not in bad.text, bad.text


def test_an_artefact_refresh_reads_the_view_as_it_is_now(env: Server, a1: QuiverClient) -> None:
    """A refresh re-runs the export's SQL as its principal under the current rules: a new
    attribute value gives the new view's rows."""
    sql = "SELECT id FROM ruled.people ORDER BY id"
    first = a1.export(sql, format="arrow")
    admin = env.catalog.tokens.check(env.admin_token)

    def ids(info: dict[str, Any]) -> list[int]:
        _, path = env.catalog.artefacts.content_path(admin, info["artefact"]["id"])
        return list(pa.ipc.open_stream(Path(path).read_bytes()).read_all().column("id").to_pylist())

    assert ids(first) == [i for i in range(60) if visible(i, "north", "a1")]
    policy = env.catalog.policy
    try:
        policy.set_attributes(SWARM, {"region": "east"})
        again = a1.action("refresh-artefact", {"id": first["artefact"]["id"]})
        assert ids(again) == [i for i in range(60) if visible(i, "east", "a1")]
    finally:
        policy.set_attributes(SWARM, {"region": "north"})


@pytest.mark.parametrize(
    "predicate",
    [
        "id = 1 AND CAST(name AS INTEGER) > 0",
        "CAST(name AS INTEGER) > 0 AND id = 1",
        "region = 'south' AND CAST(name AS INTEGER) = 1",
        "owner = 'a2' AND name::DATE > DATE '2020-01-01'",
        "id IN (1, 2, 5) AND CAST(name AS INTEGER) IS NOT NULL",
    ],
)
def test_a_failing_expression_never_quotes_a_hidden_row(a1: QuiverClient, predicate: str) -> None:
    """The caller's WHERE may fail on a value (a conversion error quotes it); the row filter is
    applied first, so a failure can only quote a row the caller may see, and a predicate that
    selects only hidden rows finds nothing instead of failing."""
    got = run(a1, f"SELECT id FROM ruled.people WHERE {predicate}")
    if isinstance(got, dict):
        assert got["code"] == "INVALID_ARGUMENT", got
        assert not any(name in got["detail"] for name in forbidden("north", "a1")), got
    else:
        assert set(got.column("id").to_pylist()) <= {i for i in range(60) if visible(i, "north", "a1")}


def test_deeply_nested_select_list_subqueries_are_rewritten_once(unit: Any) -> None:
    """Each select-list item is rewritten once however deep subqueries nest in select lists
    (walking a nested list again for each parent would double the work per level), and every
    level keeps its own column name."""
    db, policy, guard = unit
    policy.set_rules(SWARM, [RULE])
    policy.set_attributes(SWARM, {"region": "north"})
    sql = "SELECT max(id) FROM ruled.people"
    for _ in range(24):
        sql = f"SELECT ({sql}) + 0"
    q = guard.check(_principal("a1"), sql)
    with db.reading() as cur:
        got = cur.sql(q.sql).to_arrow_table()
    want = oracle("north", "a1").sql(sql).to_arrow_table()
    assert got.column_names == want.column_names
    assert got.to_pylist() == want.to_pylist() == [{want.column_names[0]: 57}]


def test_a_rule_that_no_longer_fits_the_table_fails_closed(unit: Any) -> None:
    """A rule naming a column the table no longer has (dropped or renamed since it was saved)
    is refused with a sentence that names no column, instead of reading the table otherwise
    or quoting DuckDB's list of its columns; the table is left out of listings."""
    _, policy, guard = unit
    stale = msgspec.structs.replace(RULE, except_columns=("social_security",))
    policy.set_rules(SWARM, [stale])
    policy.views.invalidate()
    agent = _principal("a1")
    try:
        with pytest.raises(PermissionDenied) as e:
            guard.check(agent, "SELECT * FROM ruled.people")
        assert "no longer match" in e.value.detail
        assert "social_security" not in e.value.detail and "ssn" not in e.value.detail
        listed = [
            i.ref.qualified
            for i in policy.describe(agent, [TableRef("ruled", "people"), TableRef("ruled", "orders")])
        ]
        assert listed == ["ruled.orders"]
    finally:
        policy.set_rules(SWARM, [RULE])


def test_errors_of_a_rewritten_query_name_no_candidates() -> None:
    """DuckDB's candidate names in a ruled query's error may be a view's table columns."""
    exc = duckdb.BinderException(
        'Binder Error: Referenced column "b" not found in FROM clause!\nCandidate bindings: "ssn"'
    )
    assert "ssn" in duckdb_error(exc).detail
    assert "ssn" not in duckdb_error(exc, quote_sql=False).detail
    assert "not found" in duckdb_error(exc, quote_sql=False).detail


def test_a_value_error_of_a_ruled_query_quotes_no_value(a1: QuiverClient) -> None:
    """A failed cast or range check quotes the value it failed on, and DuckDB does not promise
    to apply a view's row filter before the caller's expressions: for a query that reads a
    ruled table the message is withheld (with the error's kind and what to do), while an
    unruled query keeps DuckDB's words."""
    for sql in (
        "SELECT CAST(name AS INTEGER) FROM ruled.people",
        "SELECT id FROM ruled.people WHERE pay::TINYINT = 1",
        "SELECT error(name) FROM ruled.people",
    ):
        got = run(a1, sql)
        assert isinstance(got, dict) and got["code"] == "INVALID_ARGUMENT", (sql, got)
        assert "withheld" in got["detail"] and "row or column rules" in got["detail"], got
        assert "person-" not in got["detail"] and "1010" not in got["detail"], got
    plain = run(a1, "SELECT CAST(status AS INTEGER) FROM ruled.orders")
    assert isinstance(plain, dict) and "Could not convert string" in plain["detail"], plain
    exc = duckdb.ConversionException("Conversion Error: Could not convert string 'person-4-x' to INT32")
    assert "person-4-x" in duckdb_error(exc).detail
    withheld = duckdb_error(exc, quote_sql=False)
    assert withheld.code == "INVALID_ARGUMENT" and "person-4-x" not in withheld.detail
    assert withheld.detail.startswith("Conversion Error: a value failed")
