"""Live tables in the query log and the budgets (proto_docs/federation.md, "Costs"): every
request that ran SQL in Snowflake has ``remote = "snowflake"`` and the query ids the emulator
answered for it in its query-log record (GET /v1/queries, ``my-queries``); and
``live_queries_per_day`` counts those requests, refusing one over budget before anything is
sent to Snowflake — checked with the recording proxy (tests/sync_emulator.py), which also
records the ``queryId`` fakesnow answered for each query (a uuid4 per query: the connector's
``sfqid``, so the ids below are the emulator's own, not made up by the test)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.flight as flight
import pytest

from tests.harness import FakeClock, Server, call_options, error_info, flight_query, start_server
from tests.sync_emulator import RECORDER, Emulator, Source
from tests.test_live_tables import _sections, _sync_replicas, orders_source

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def src(emu: Emulator) -> Source:
    return orders_source(emu)


@pytest.fixture(scope="module")
def server(
    emu: Emulator, src: Source, clock: FakeClock, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("liveusage"), demo=False, clock=clock, **_sections(emu, src))
    _sync_replicas(s)
    yield s
    s.stop()


def _swarm(server: Server, prefix: str, budget: dict[str, Any] | None = None) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    http = server.http()
    r = http.post("/v1/swarms", json={"name": name, "tables": ["live.*", "rep.*"]})
    assert r.status_code == 201, r.text
    if budget is not None:
        r = http.put(f"/v1/swarms/{name}/budget", json=budget)
        assert r.status_code == 200, r.text
    return name


def _records(server: Server, agent: str) -> list[dict[str, Any]]:
    """The agent's query-log records, oldest first (GET /v1/queries)."""
    r = server.http().get("/v1/queries", params={"agent": agent, "limit": 100})
    assert r.status_code == 200, r.text
    return list(reversed(r.json()["queries"]))


def _new_ids(before: int) -> list[str]:
    """Query ids the emulator answered since ``before`` (a length of ``RECORDER.answered``),
    for data queries (metadata reads aside)."""
    return [qid for sql, qid in RECORDER.answered[before:] if "information_schema" not in sql.lower()]


def _action(server: Server, token: str, name: str, body: Any = None) -> Any:
    raw = b"" if body is None else json.dumps(body).encode()
    (result,) = list(server.flight().do_action(flight.Action(name, raw), call_options(token)))
    return json.loads(result.body.to_pybytes())


def _fetch(server: Server, token: str, descriptor: flight.FlightDescriptor) -> Any:
    client, opts = server.flight(), call_options(token)
    info = client.get_flight_info(descriptor, opts)
    return [client.do_get(e.ticket, opts).read_all() for e in info.endpoints]


def _cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body))


def _warm(server: Server, token: str) -> None:
    """Read both live tables' descriptions (cached for schema_ttl_seconds), so what a test
    counts below is the requests' own queries."""
    flight_query(
        server, token, "SELECT count(*) AS n FROM live.orders o JOIN live.customers c ON c.id = o.customer_id"
    )


# --- the query log ------------------------------------------------------------------------------
def test_every_request_that_ran_sql_in_snowflake_has_its_query_ids_in_the_query_log(server: Server) -> None:
    swarm = _swarm(server, "qlog")
    token = server.mint("agent", swarm, "ids")
    _warm(server, token)
    records_before = len(_records(server, "ids"))
    steps: list[tuple[str, int]] = []  # (kind, how many Snowflake queries it ran)

    def step(kind: str, n: int, run: Any) -> None:
        before = len(RECORDER.answered)
        run()
        ids = _new_ids(before)
        assert len(ids) == n, (kind, RECORDER.answered[before:])
        steps.append((kind, n))
        got = _records(server, "ids")[-1]
        assert got["kind"] == kind and got["outcome"] == "ok", got
        assert got["remote"] == "snowflake" and got["remote_query_ids"] == ids, got

    step(
        "query", 1, lambda: flight_query(server, token, "SELECT id FROM live.orders WHERE amount > ?", [200])
    )
    mixed = (
        "SELECT c.region, count(*) AS n FROM live.orders o JOIN live.customers c ON c.id = o.customer_id "
        "JOIN rep.customers r ON r.id = c.id WHERE o.amount > 100 AND c.region = 'eu' GROUP BY c.region"
    )
    # Both live tables of a mixed query are pulled: two Snowflake queries, two ids, in order.
    step("query", 2, lambda: flight_query(server, token, mixed))
    step("scan", 1, lambda: _fetch(server, token, flight.FlightDescriptor.for_path("live", "customers")))
    step("sample", 1, lambda: _fetch(server, token, _cmd(kind="sample", table="live.orders", rows=3)))
    step("profile", 1, lambda: _fetch(server, token, _cmd(kind="profile", table="live.customers")))
    # The same live query again within cache_ttl_seconds: nothing runs in Snowflake, and its
    # record says so; a replica's query never ran there.
    before = len(RECORDER.answered)
    flight_query(server, token, "SELECT id FROM live.orders WHERE amount > ?", [200])
    flight_query(server, token, "SELECT id FROM rep.orders WHERE amount > ?", [200])
    assert _new_ids(before) == []
    cached, local = _records(server, "ids")[-2:]
    assert cached["remote"] is None and cached["remote_query_ids"] is None, cached
    assert local["remote"] is None and local["remote_query_ids"] is None, local
    assert len(_records(server, "ids")) == records_before + len(steps) + 2
    # my-queries shows the caller the same.
    mine = _action(server, token, "my-queries", {"limit": 3})["queries"]
    assert [r["remote"] for r in mine] == [None, None, "snowflake"]
    assert mine[2]["kind"] == "profile" and len(mine[2]["remote_query_ids"]) == 1


def test_post_v1_query_and_the_query_port_record_the_snowflake_query_ids(server: Server) -> None:
    swarm = _swarm(server, "qhttp")
    token = server.mint("agent", swarm, "http-ids")
    _warm(server, token)
    http = server.http(token)
    for sql, pulls in (
        ("SELECT status, count(*) AS n FROM live.orders WHERE id < 77 GROUP BY status", 1),
        (
            "SELECT c.region, count(*) AS n FROM live.orders o JOIN rep.customers c ON c.id = o.customer_id "
            "WHERE o.id < 78 GROUP BY c.region",
            1,
        ),
    ):
        before = len(RECORDER.answered)
        r = http.post("/v1/query", json={"sql": sql}, headers={"accept": "application/json"})
        assert r.status_code == 200, r.text
        ids = _new_ids(before)
        assert len(ids) == pulls
        got = _records(server, "http-ids")[-1]
        assert got["via"] == "http" and got["remote"] == "snowflake" and got["remote_query_ids"] == ids
    # What MCP's sample tool calls (catalog/query_port.py ``read``), with a ``via``.
    principal = server.catalog.tokens.verify(token)
    before = len(RECORDER.answered)
    table = server.catalog.require_queries().read(
        principal, {"kind": "sample", "table": "live.customers", "rows": 2}, via="mcp"
    )
    assert table.num_rows == 2
    got = _records(server, "http-ids")[-1]
    assert got["via"] == "mcp" and got["kind"] == "sample"
    assert got["remote_query_ids"] == _new_ids(before) and len(got["remote_query_ids"]) == 1


def test_the_openapi_schema_names_the_new_fields(server: Server) -> None:
    schemas = server.http().get("/schema/openapi.json").json()["components"]["schemas"]

    def props(suffix: str) -> set[str]:
        (name,) = [n for n in schemas if n == suffix or n.endswith("." + suffix) or n.endswith("_" + suffix)]
        return set(schemas[name]["properties"])

    assert {"remote", "remote_query_ids"} <= props("QueryRecord")
    assert "live_queries" in props("Usage")
    assert "live_queries_per_day" in props("Budget")


# --- the budget ----------------------------------------------------------------------------------
def _refused(run: Any) -> dict[str, Any]:
    mark, logins = RECORDER.mark(), RECORDER.logins
    with pytest.raises(flight.FlightError) as raised:
        run()
    # Nothing at all reached Snowflake: no session opened, no query, not even metadata.
    assert RECORDER.since(mark) == [] and RECORDER.logins == logins
    return error_info(raised.value)


def test_live_queries_per_day_refuses_before_anything_is_sent_to_snowflake(server: Server) -> None:
    swarm = _swarm(server, "lbud", {"live_queries_per_day": 2, "per_agent": {"live_queries_per_day": 1}})
    one, two, three = (server.mint("agent", swarm, f"l{i}") for i in (1, 2, 3))
    sql = "SELECT count(*) AS n FROM live.orders WHERE amount > ?"
    refusals = _budget_refusals(server)
    before = RECORDER.mark()
    assert flight_query(server, one, sql, [1]).to_pylist() == [{"n": server_rows(server, 1)}]
    assert len([q for q in RECORDER.since(before) if "information_schema" not in q.lower()]) == 1
    # l1's own live query is spent: every live read is refused, before anything is sent.
    for run in (
        lambda: flight_query(server, one, sql, [2]),
        lambda: _fetch(server, one, flight.FlightDescriptor.for_path("live", "orders")),
        lambda: _fetch(server, one, _cmd(kind="sample", table="live.orders", rows=3)),
        lambda: _fetch(server, one, _cmd(kind="profile", table="live.orders")),
        lambda: flight_query(
            server,
            one,
            "SELECT count(*) AS n FROM live.orders o JOIN rep.customers c ON c.id = o.customer_id",
        ),
    ):
        info = _refused(run)
        assert info["code"] == "RESOURCE_EXHAUSTED", info
        detail = info["detail"]
        assert f"live_queries_per_day of agent {swarm}/l1" in detail and "used 1 of 1" in detail, detail
        assert "resets at" in detail
    assert _budget_refusals(server) == refusals + 5
    # Replicas are not live: l1 still reads them.
    assert flight_query(server, one, "SELECT count(*) AS n FROM rep.orders").num_rows == 1
    # l2 takes the swarm's second; then the swarm's is spent for l3 too, over HTTP as well.
    flight_query(server, two, sql, [3])
    info = _refused(lambda: flight_query(server, three, sql, [4]))
    assert f"live_queries_per_day of swarm {swarm}" in info["detail"] and "used 2 of 2" in info["detail"]
    mark, logins = RECORDER.mark(), RECORDER.logins
    r = server.http(three).post("/v1/query", json={"sql": sql, "params": [5]})
    assert r.status_code == 429 and "live_queries_per_day" in r.json()["detail"], r.text
    assert RECORDER.since(mark) == [] and RECORDER.logins == logins
    # The usage report, the usage action and /metrics count them; refusals counted nothing.
    report = server.http().get(f"/v1/swarms/{swarm}/usage").json()
    assert report["budget"]["live_queries_per_day"] == 2
    assert report["usage"]["live_queries"] == 2
    assert {a: u["live_queries"] for a, u in report["agents"].items()} == {"l1": 1, "l2": 1}
    mine = _action(server, two, "usage")
    assert mine["usage"]["live_queries"] == 2 and mine["agents"]["l2"]["live_queries"] == 1
    metrics = server.http().get("/metrics").text
    assert f'quiver_usage_live_queries{{agent="",swarm="{swarm}"}} 2.0' in metrics
    records = _records(server, "l1")
    assert [r["outcome"] for r in records].count("refused") == 5
    assert all(r["remote"] is None for r in records if r["outcome"] == "refused")


def _budget_refusals(server: Server) -> float:
    for line in server.http().get("/metrics").text.splitlines():
        if line.startswith('quiver_admission_refusals_total{reason="budget"}'):
            return float(line.split()[-1])
    return 0.0


def server_rows(server: Server, above: int) -> int:
    """The replica's answer to the count the live query asks (the same data)."""
    with server.catalog.db.reading() as cur:
        row = cur.execute("SELECT count(*) FROM rep.orders WHERE amount > ?", [above]).fetchone()
    assert row is not None
    return int(row[0])


def test_racing_requests_get_exactly_the_budgets_live_queries(server: Server) -> None:
    swarm = _swarm(server, "lrace", {"live_queries_per_day": 3})
    tokens = [server.mint("agent", swarm, f"r{i}") for i in range(8)]
    _warm(server, server.mint("agent", _swarm(server, "lwarm"), "w"))
    outcomes: list[str] = []
    lock = threading.Lock()
    mark = RECORDER.mark()

    def run(i: int) -> None:
        try:
            flight_query(
                server, tokens[i], "SELECT max(amount) AS m FROM live.orders WHERE id <> ?", [1000 + i]
            )
            result = "ok"
        except flight.FlightError as e:
            result = error_info(e)["code"]
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["RESOURCE_EXHAUSTED"] * 5 + ["ok"] * 3, outcomes
    sent = [q for q in RECORDER.since(mark) if "information_schema" not in q.lower() and "ORDERS" in q]
    assert len(sent) == 3, sent  # the refused five sent nothing
    assert server.http().get(f"/v1/swarms/{swarm}/usage").json()["usage"]["live_queries"] == 3


def test_the_live_budget_resets_at_utc_midnight(server: Server, clock: FakeClock) -> None:
    from tests.test_budgets import next_midnight

    swarm = _swarm(server, "lmid", {"live_queries_per_day": 1})
    token = server.mint("agent", swarm, "night")
    sql = "SELECT min(amount) AS m FROM live.orders WHERE id > ?"
    flight_query(server, token, sql, [10])
    info = _refused(lambda: flight_query(server, token, sql, [11]))
    midnight = next_midnight(clock)
    assert f"resets at {midnight.strftime('%Y-%m-%dT%H:%M:%S')}" in info["detail"], info
    clock.advance(midnight.timestamp() - clock.time())
    token = server.mint("agent", swarm, "night")  # the clock moved: a fresh token
    assert server.http().get(f"/v1/swarms/{swarm}/usage").json()["usage"]["live_queries"] == 0
    flight_query(server, token, sql, [12])
    assert server.http().get(f"/v1/swarms/{swarm}/usage").json()["usage"]["live_queries"] == 1


def test_live_usage_survives_a_restart(emu: Emulator, src: Source, tmp_path: Path) -> None:
    sections = _sections(emu, src)
    s = start_server(tmp_path, demo=False, **sections)
    try:
        swarm = _swarm(s, "lrst", {"live_queries_per_day": 2})
        token = s.mint("agent", swarm, "r")
        flight_query(s, token, "SELECT count(*) AS n FROM live.customers WHERE id > ?", [1])
        s.catalog.maintain()  # the housekeeping pass writes the counters
    finally:
        s.stop()
    again = start_server(tmp_path, demo=False, **sections)
    try:
        report = again.http().get(f"/v1/swarms/{swarm}/usage").json()
        assert report["usage"]["live_queries"] == 1 and report["agents"]["r"]["live_queries"] == 1
        token = again.mint("agent", swarm, "r")
        flight_query(again, token, "SELECT count(*) AS n FROM live.customers WHERE id > ?", [2])
        info = _refused(
            lambda: flight_query(again, token, "SELECT count(*) AS n FROM live.customers WHERE id > 3")
        )
        assert "used 2 of 2" in info["detail"]
    finally:
        again.stop()
