"""The query log (proto_docs/governance.md) on a real server: one record per data-plane
request — scans, samples, profiles, queries, exports, POST /v1/query, Flight SQL — refusals
too; written in batches (a burst of requests costs one write); GET /v1/queries with its
filters and pages; ``my-queries`` shows only the caller's; literal redaction; retention;
concurrent requests each get exactly one record."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog.sqlguard import redact_literals
from tests.harness import QUIET, Server, call_options, error_info, flight_sql_connect, start_server
from tests.test_dataplane import cmd

ORDERS = "SELECT order_id, amount FROM demo.orders WHERE order_id <= ? ORDER BY order_id"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("querylog"), tokens=QUIET)
    yield s
    s.stop()


def action(server: Server, token: str, name: str, body: Any = None) -> Any:
    raw = b"" if body is None else json.dumps(body).encode()
    results = list(server.flight().do_action(flight.Action(name, raw), call_options(token)))
    return json.loads(results[0].body.to_pybytes())


def fetch(server: Server, token: str, descriptor: flight.FlightDescriptor) -> pa.Table:
    client, opts = server.flight(), call_options(token)
    info = client.get_flight_info(descriptor, opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def mine(server: Server, token: str, limit: int = 50) -> list[dict[str, Any]]:
    return list(action(server, token, "my-queries", {"limit": limit})["queries"])


def test_a_query_gets_one_record_with_what_it_read(server: Server) -> None:
    token = server.mint("agent", "demo", "q-one")
    table = fetch(server, token, cmd(kind="query", sql=ORDERS, params=[25]))
    records = mine(server, token)
    assert len(records) == 1, records  # GetFlightInfo + DoGet: one request, one record
    (r,) = records
    assert r["kind"] == "query" and r["via"] == "flight" and r["outcome"] == "ok"
    assert r["principal"] == "agent:demo/q-one" and r["swarm"] == "demo" and r["agent"] == "q-one"
    assert r["tables"] == ["demo.orders"]
    assert r["sql"] == ORDERS and r["params"] == 1
    assert r["rows"] == table.num_rows == 25
    assert r["bytes"] > 0 and r["ms"] >= 0 and r["error_code"] is None


def test_scans_samples_profiles_and_exports_are_recorded(server: Server) -> None:
    token = server.mint("agent", "demo", "kinds")
    fetch(server, token, flight.FlightDescriptor.for_path("demo", "customers"))
    fetch(server, token, cmd(kind="sample", table="demo.orders", rows=5))
    fetch(server, token, cmd(kind="profile", table="demo.orders", columns=["amount"]))
    exported = action(server, token, "export", {"query": "SELECT 1 AS one", "format": "csv"})
    records = mine(server, token)
    by_kind = {r["kind"]: r for r in records}
    assert sorted(by_kind) == ["export", "profile", "sample", "scan"], records
    assert by_kind["scan"]["tables"] == ["demo.customers"]
    assert by_kind["sample"]["tables"] == ["demo.orders"]
    # A sample and a first scan stream DuckDB's reader from C++: not counted (the docs say so).
    assert by_kind["sample"]["rows"] is None and by_kind["scan"]["rows"] is None
    assert by_kind["profile"]["rows"] == 1  # one profile row per column asked for
    assert by_kind["export"]["sql"] == "SELECT 1 AS one"
    assert by_kind["export"]["rows"] == exported["rows"] == 1
    assert by_kind["export"]["bytes"] == exported["artefact"]["size_bytes"]
    assert all(r["outcome"] == "ok" for r in records)


def test_refusals_are_recorded_with_their_code(server: Server) -> None:
    token = server.mint("agent", "demo", "refused")
    client, opts = server.flight(), call_options(token)
    with pytest.raises(flight.FlightError) as e:
        client.get_flight_info(cmd(kind="query", sql="SELECT * FROM secret.spread"), opts)
    denied = error_info(e.value)["code"]
    with pytest.raises(flight.FlightError):
        client.get_flight_info(cmd(kind="query", sql="DELETE FROM demo.orders"), opts)
    with pytest.raises(flight.FlightError):
        client.get_flight_info(cmd(kind="sample", table="demo.orders", rows=-1), opts)
    with pytest.raises(flight.FlightError):
        list(client.do_get(flight.Ticket(b"not-a-ticket"), opts).read_all())
    with pytest.raises(flight.FlightError):
        action(server, token, "submit-query", {"sql": "SELEC 1"})
    records = mine(server, token)
    assert len(records) == 5, records
    assert all(r["outcome"] == "refused" and r["error_code"] for r in records), records
    newest_first = list(reversed(records))
    assert newest_first[0]["sql"] == "SELECT * FROM secret.spread"
    assert newest_first[0]["error_code"] == denied
    assert newest_first[1]["sql"] == "DELETE FROM demo.orders"
    assert newest_first[2]["kind"] == "sample"
    assert newest_first[3]["kind"] == "unknown"  # a ticket that grants nothing names no plan
    assert newest_first[4]["kind"] == "query" and newest_first[4]["sql"] == "SELEC 1"
    # A refused request never wrote anything but its record.
    assert server.catalog.query_log.pending() == 0


def test_http_query_is_recorded_refused_or_run(server: Server) -> None:
    token = server.mint("agent", "demo", "http")
    http = server.http(token)
    ok = http.post("/v1/query", json={"sql": ORDERS, "params": [10]}, headers={"accept": "text/csv"})
    assert ok.status_code == 200
    bad = http.post("/v1/query", json={"sql": "SELECT * FROM secret.spread"})
    assert bad.status_code == 403, bad.text
    newest, oldest = mine(server, token)
    assert oldest["via"] == "http" and oldest["outcome"] == "ok" and oldest["rows"] == 10
    assert oldest["bytes"] == len(ok.content) and oldest["tables"] == ["demo.orders"]
    assert newest["outcome"] == "refused" and newest["error_code"] == bad.json()["error"]
    assert newest["sql"] == "SELECT * FROM secret.spread"


def test_flight_sql_statements_are_recorded(server: Server) -> None:
    token = server.mint("agent", "demo", "adbc")
    with (
        flight_sql_connect(server, token) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT count(*) AS n FROM demo.orders")
        (n,) = cur.fetchall()[0]
    with server.catalog.db.reading() as db:
        assert (n,) == db.execute("SELECT count(*) FROM demo.orders").fetchone()
    queries = [r for r in mine(server, token) if r["kind"] == "query"]
    assert len(queries) == 1, queries
    assert queries[0]["via"] == "flight-sql" and queries[0]["tables"] == ["demo.orders"]
    assert queries[0]["sql"] == "SELECT count(*) AS n FROM demo.orders"


def test_a_flight_sql_statement_refused_at_prepare_is_recorded(server: Server) -> None:
    """ADBC and JDBC prepare every statement first: a statement the guard refuses there never
    reaches GetFlightInfo, so the prepare's refusal is its one record (a prepare that succeeds
    records nothing: its statement's DoGet does)."""
    token = server.mint("agent", "demo", "adbc-refused")
    with (
        flight_sql_connect(server, token) as conn,
        conn.cursor() as cur,
    ):
        with pytest.raises(Exception, match="not readable"):
            cur.execute("SELECT * FROM _quiver.tokens")
        cur.execute("SELECT 1 AS one")
        assert cur.fetchall() == [(1,)]
    records = mine(server, token)
    assert [(r["kind"], r["via"], r["outcome"], r["sql"]) for r in reversed(records)] == [
        ("query", "flight-sql", "refused", "SELECT * FROM _quiver.tokens"),
        ("query", "flight-sql", "ok", "SELECT 1 AS one"),
    ], records
    assert records[-1]["error_code"] == "PERMISSION_DENIED"


def test_records_are_written_in_batches(server: Server) -> None:
    log = server.catalog.query_log
    log.flush()
    writes = log.writes
    token = server.mint("agent", "demo", "burst")
    for i in range(20):
        fetch(server, token, cmd(kind="query", sql="SELECT ? AS i", params=[i]))
    # Twenty requests, no write yet: all of them wait in memory for the next flush.
    assert log.pending() >= 20
    assert log.writes == writes
    assert len(mine(server, token)) == 20
    assert log.writes == writes + 1  # one transaction for the whole burst


def test_my_queries_shows_only_the_callers_own(server: Server) -> None:
    alice, bob = server.mint("agent", "demo", "alice"), server.mint("agent", "demo", "bob")
    fetch(server, alice, cmd(kind="query", sql="SELECT 'alice' AS who"))
    fetch(server, bob, cmd(kind="query", sql="SELECT 'bob' AS who"))
    assert [r["sql"] for r in mine(server, alice)] == ["SELECT 'alice' AS who"]
    assert [r["sql"] for r in mine(server, bob)] == ["SELECT 'bob' AS who"]


@pytest.mark.parametrize("body", [{"limit": 0}, {"limit": 1001}, {"limit": "5"}, {"limt": 5}, [1]])
def test_my_queries_refuses_a_bad_body(server: Server, body: Any) -> None:
    token = server.mint("agent", "demo", f"badbody-{os.urandom(4).hex()}")
    fetch(server, token, cmd(kind="query", sql="SELECT 1 AS x"))
    with pytest.raises(flight.FlightError) as e:
        action(server, token, "my-queries", body)
    assert error_info(e.value)["code"] == "INVALID_ARGUMENT"
    assert len(mine(server, token)) == 1  # nothing recorded, nothing lost


def test_admin_listing_filters_and_pages(server: Server) -> None:
    swarm = "logged"
    admin = server.http()
    assert admin.post("/v1/swarms", json={"name": swarm}).status_code == 201
    assert admin.put(f"/v1/swarms/{swarm}/allowlist", json={"tables": ["demo.orders"]}).status_code == 200
    before = datetime.now(UTC) - timedelta(seconds=1)
    a1, a2 = server.mint("agent", swarm, "p1"), server.mint("agent", swarm, "p2")
    for i in range(7):
        fetch(
            server,
            a1,
            cmd(kind="query", sql="SELECT order_id FROM demo.orders WHERE order_id = ?", params=[i]),
        )
    fetch(server, a2, flight.FlightDescriptor.for_path("demo", "orders"))
    with pytest.raises(flight.FlightError):
        fetch(server, a2, flight.FlightDescriptor.for_path("demo", "customers"))

    def page(**params: Any) -> dict[str, Any]:
        r = admin.get("/v1/queries", params={"swarm": swarm, **params})
        assert r.status_code == 200, r.text
        return dict(r.json())

    everything = page(limit=1000)["queries"]
    assert len(everything) == 9
    assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)
    assert len(page(agent="p1")["queries"]) == 7
    assert [r["kind"] for r in page(agent="p2")["queries"]] == ["scan", "scan"]
    assert len(page(table="demo.orders")["queries"]) == 8
    refused = page(outcome="refused")["queries"]
    assert len(refused) == 1 and refused[0]["agent"] == "p2"
    assert len(page(since=before.isoformat())["queries"]) == 9
    assert page(until=before.isoformat())["queries"] == []
    # Pages of 4: newest first, no record twice, none missed.
    seen, cursor = [], None
    while True:
        got = page(limit=4, **({"cursor": cursor} if cursor else {}))
        seen += [r["id"] for r in got["queries"]]
        cursor = got["next_cursor"]
        if cursor is None:
            break
    assert seen == [r["id"] for r in everything]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": "many"},
        {"outcome": "maybe"},
        {"since": "yesterday"},
        {"cursor": -1},
        {"swarm": "x" * 201},
        {"principal": "agent:x/y"},
    ],
)
def test_admin_listing_refuses_bad_filters(server: Server, params: dict[str, Any]) -> None:
    admin = server.http()
    before = admin.get("/v1/queries", params={"limit": 1000}).json()
    r = admin.get("/v1/queries", params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "INVALID_ARGUMENT"
    assert len(r.text) < 2000  # the echo of a bad value is bounded
    # A refused listing records nothing and loses nothing.
    assert admin.get("/v1/queries", params={"limit": 1000}).json() == before


def test_admin_listing_is_admin_only(server: Server) -> None:
    token = server.mint("agent", "demo", "nosy")
    agent = server.http(token)
    r = agent.get("/v1/queries")
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED", r.text
    r = httpx.get(f"{server.http_url}/v1/queries")
    assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED", r.text
    # The refused agent's own log is untouched and its token still queries.
    assert mine(server, token) == []
    fetch(server, token, cmd(kind="query", sql="SELECT 1 AS x"))
    assert len(mine(server, token)) == 1


def test_concurrent_requests_get_one_record_each(server: Server) -> None:
    swarm = "racers"
    admin = server.http()
    assert admin.post("/v1/swarms", json={"name": swarm}).status_code == 201
    assert admin.put(f"/v1/swarms/{swarm}/allowlist", json={"tables": ["demo.*"]}).status_code == 200
    tokens = [server.mint("agent", swarm, f"r{i}") for i in range(6)]
    errors: list[BaseException] = []

    def hammer(token: str) -> None:
        try:
            for i in range(8):
                fetch(server, token, cmd(kind="query", sql="SELECT ? AS i", params=[i]))
                r = server.http(token).post("/v1/query", json={"sql": "SELECT 1 AS one"})
                assert r.status_code == 200
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    records = admin.get("/v1/queries", params={"swarm": swarm, "limit": 1000}).json()["queries"]
    assert len(records) == 6 * 16
    assert len({r["request_id"] for r in records}) == 6 * 16
    for i in range(6):
        assert sum(r["agent"] == f"r{i}" for r in records) == 16


def test_retention_deletes_old_records(server: Server) -> None:
    log = server.catalog.query_log
    token = server.mint("agent", "demo", "old")
    fetch(server, token, cmd(kind="query", sql="SELECT 2 AS two"))
    log.flush()
    assert len(mine(server, token)) == 1
    with server.catalog.db.reading() as cur:
        (held,) = cur.execute("SELECT count(*) FROM _quiver.query_log").fetchone() or (0,)
    report = server.catalog.retention.run(now=datetime.now(UTC) + timedelta(days=31))
    # Every record is older than the cutoff: all of them go, and the report counts them.
    assert report.query_records == held >= 1
    assert mine(server, token) == []


def test_redacted_literals_never_reach_the_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("redact"), query_log={"redact_literals": True}, tokens=QUIET)
    try:
        token = s.mint("agent", "demo", "secretive")
        sql = "SELECT order_id FROM demo.orders WHERE status = 'hush-hush' AND amount > 12.5 -- 'note'"
        fetch(s, token, cmd(kind="query", sql=sql))
        http = s.http(token)
        assert http.post("/v1/query", json={"sql": "SELECT 'pin-4711' AS p"}).status_code == 200
        newest, oldest = mine(s, token)
        assert oldest["sql"] == "SELECT order_id FROM demo.orders WHERE status = ? AND amount > ? -- 'note'"
        assert newest["sql"] == "SELECT ? AS p"
        stored = s.catalog.db.reading()
        with stored as cur:
            texts = [r[0] for r in cur.execute("SELECT sql_text FROM _quiver.query_log").fetchall()]
        assert not any("hush-hush" in t or "pin-4711" in t for t in texts if t)
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("sql", "redacted"),
    [
        ("SELECT 1", "SELECT ?"),
        (
            "SELECT * FROM t WHERE a = 'it''s' AND b IN (1, 2.5)",
            "SELECT * FROM t WHERE a = ? AND b IN (?, ?)",
        ),
        ('SELECT "it\'s 1" FROM t', 'SELECT "it\'s 1" FROM t'),  # an identifier is not a literal
        ("SELECT x FROM t -- 'kept: a comment'", "SELECT x FROM t -- 'kept: a comment'"),
        ("SELECT E'\\n', 1e10, $$dollar$$", "SELECT ?, ?, ?"),
        ("SELECT ?", "SELECT ?"),
    ],
)
def test_redact_literals_uses_the_tokenizer(sql: str, redacted: str) -> None:
    assert redact_literals(sql) == redacted


_FLUSH_IMPORTS = """
import sys, tempfile
from pathlib import Path
import pyarrow.flight as flight
from tests.harness import call_options, start_server
from tests.test_dataplane import cmd

s = start_server(Path(tempfile.mkdtemp()), demo=True)
try:
    token = s.mint("agent", "demo", "flush")
    client, opts = flight.FlightClient(s.flight_url), call_options(token)
    info = client.get_flight_info(cmd(kind="query", sql="SELECT 42 AS x"), opts)
    for e in info.endpoints:
        client.do_get(e.ticket, opts).read_all()
    before = set(sys.modules)
    written = s.catalog.query_log.flush(), s.catalog.budgets.flush()
    print("WRITTEN", written)
    print("NEW", sorted({m.split(".")[0] for m in set(sys.modules) - before}))
finally:
    s.stop()
"""


@pytest.mark.slow  # a fresh interpreter
def test_a_flush_of_the_query_log_and_the_usage_counters_imports_nothing() -> None:
    """The batched writes of every request's records convert Python values without pyarrow,
    whose first conversion of a Python list imports pandas (~90 MB resident, ~0.2 s): every
    server that served one query paid that at its first flush (catalog/database.py
    ``insert_columns``). A fresh interpreter: this test process has imported everything."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _FLUSH_IMPORTS],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    written = next(x for x in lines if x.startswith("WRITTEN "))
    assert written == "WRITTEN (1, 2)", written  # one record; the agent's and the swarm's counters
    new = next(x for x in lines if x.startswith("NEW "))
    assert new == "NEW []", new


def test_a_flushed_record_keeps_every_value(server: Server) -> None:
    """Every column of a record survives the batched write: NULLs, empty and non-empty
    lists, a timestamp with its zone, quotes in the SQL text."""
    from catalog.query_log import QueryRecord

    log = server.catalog.query_log
    log.flush()
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    records = [
        QueryRecord(
            occurred_at=at,
            principal="agent:s/a",
            swarm="s",
            agent="a",
            kind="query",
            via="flight",
            tables=["demo.orders", "demo.customers"],
            sql="SELECT 'it''s' -- x",
            params=2,
            rows=None,
            bytes=7,
            ms=1.25,
            outcome="ok",
            error_code=None,
            request_id="r-1",
            remote="snowflake",
            remote_query_ids=["q1", "q2"],
        ),
        QueryRecord(
            occurred_at=at,
            principal="admin:x",
            swarm=None,
            agent=None,
            kind="scan",
            via="http",
            tables=[],
            sql=None,
            params=0,
            rows=3,
            bytes=None,
            ms=0.0,
            outcome="refused",
            error_code="PERMISSION_DENIED",
            request_id=None,
            remote=None,
            remote_query_ids=None,
        ),
    ]
    for r in records:
        log._buffer.add(r)
    assert log.flush() == 2
    got = log.query(since=at, until=at + timedelta(seconds=1), limit=500).queries
    assert len(got) == 2 and all(r.id is not None for r in got)
    assert sorted((msgspec.structs.replace(r, id=None) for r in got), key=lambda r: r.principal) == sorted(
        records, key=lambda r: r.principal
    )
