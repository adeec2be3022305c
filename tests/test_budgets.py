"""Usage budgets (proto_docs/governance.md, "Budgets") on a real server: refused before any
work with the budget, the usage and the reset time named; per-agent limits; the usage views
(HTTP, the ``usage`` action, /metrics); counting across a restart; the reset at UTC midnight
through the injectable clock; bad budgets refused with nothing saved; concurrent requests
counted exactly and concurrent admin writes serialized."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.harness import QUIET, FakeClock, Server, call_options, error_info, flight_sql_connect, start_server
from tests.test_dataplane import cmd


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("budgets"), clock=clock, tokens=QUIET)
    yield s
    s.stop()


def new_swarm(server: Server, prefix: str) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    admin = server.http()
    assert admin.post("/v1/swarms", json={"name": name, "tables": ["demo.*"]}).status_code == 201
    return name


def put_budget(server: Server, swarm: str, body: Any) -> httpx.Response:
    return server.http().put(f"/v1/swarms/{swarm}/budget", json=body)


def fetch(server: Server, token: str, descriptor: flight.FlightDescriptor) -> pa.Table:
    client, opts = server.flight(), call_options(token)
    info = client.get_flight_info(descriptor, opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def query(server: Server, token: str, n: int = 1) -> pa.Table:
    return fetch(server, token, cmd(kind="query", sql="SELECT range AS i FROM range(?)", params=[n]))


def usage(server: Server, swarm: str) -> dict[str, Any]:
    r = server.http().get(f"/v1/swarms/{swarm}/usage")
    assert r.status_code == 200, r.text
    return dict(r.json())


def next_midnight(clock: FakeClock) -> datetime:
    now = datetime.fromtimestamp(clock.time(), UTC)
    return datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)


def test_a_spent_budget_refuses_before_any_work(server: Server, clock: FakeClock) -> None:
    swarm = new_swarm(server, "q")
    assert put_budget(server, swarm, {"queries_per_day": 3}).status_code == 200
    token = server.mint("agent", swarm, "a")
    for _ in range(3):
        query(server, token)
    streamer = server.runtime.flight.streamer if server.runtime.flight else None
    assert streamer is not None
    ran = streamer.executions
    with pytest.raises(flight.FlightError) as e:
        server.flight().get_flight_info(cmd(kind="query", sql="SELECT 42 AS x"), call_options(token))
    info = error_info(e.value)
    assert isinstance(e.value, flight.FlightServerError | flight.FlightError)
    assert info["code"] == "RESOURCE_EXHAUSTED"
    reset = next_midnight(clock).strftime("%Y-%m-%dT%H:%M:%S")
    assert f"budget queries_per_day of swarm {swarm} is spent: used 3 of 3 today" in info["detail"]
    assert reset in info["detail"]
    assert streamer.executions == ran  # refused before DuckDB ran anything
    # The same refusal over HTTP: 429 with the same words, and on every other path.
    r = server.http(token).post("/v1/query", json={"sql": "SELECT 1 AS one"})
    assert r.status_code == 429 and "queries_per_day" in r.json()["detail"]
    with pytest.raises(flight.FlightError) as e:
        list(
            server.flight().do_action(
                flight.Action("export", b'{"query": "SELECT 1 AS one"}'), call_options(token)
            )
        )
    assert error_info(e.value)["code"] == "RESOURCE_EXHAUSTED"
    # Refusals are not spent: the usage is still 3.
    assert usage(server, swarm)["usage"]["queries"] == 3


def test_a_refusal_reads_like_the_usage_view_and_is_logged_as_asked(server: Server) -> None:
    """The refusal's reset time is written as ``resets_at`` is (``…T00:00:00Z``, as documented),
    and a GetFlightInfo refused by the budget before its command was decoded is still recorded
    with what it asked (its kind, its SQL), not as ``unknown``; nothing is charged."""
    swarm = new_swarm(server, "said")
    assert put_budget(server, swarm, {"per_agent": {"queries_per_day": 1}}).status_code == 200
    token = server.mint("agent", swarm, "a")
    query(server, token)
    client, opts = server.flight(), call_options(token)
    asked = [
        cmd(kind="query", sql="SELECT 42 AS x WHERE ? > 0", params=[1]),
        flight.FlightDescriptor.for_path("demo", "orders"),
        cmd(kind="sample", table="demo.orders", rows=3),
        cmd(kind="profile", table="demo.orders"),
        flight.FlightDescriptor.for_command(b"{not json"),
    ]
    resets = usage(server, swarm)["resets_at"]
    assert resets.endswith("T00:00:00Z")
    for descriptor in asked:
        with pytest.raises(flight.FlightError) as e:
            client.get_flight_info(descriptor, opts)
        info = error_info(e.value)
        assert info["code"] == "RESOURCE_EXHAUSTED"
        assert info["detail"] == (
            f"budget queries_per_day of agent {swarm}/a is spent: used 1 of 1 today; it resets at {resets}"
        )
    # A Flight SQL client prepares first: refused there, the prepare is the record.
    with (
        flight_sql_connect(server, token) as conn,
        conn.cursor() as cur,
        pytest.raises(Exception, match="budget queries_per_day"),
    ):
        cur.execute("SELECT 43 AS y")
    log = server.http().get("/v1/queries", params={"swarm": swarm, "outcome": "refused"}).json()["queries"]
    assert [(q["kind"], q["via"], q["sql"], q["params"], q["error_code"]) for q in reversed(log)] == [
        ("query", "flight", "SELECT 42 AS x WHERE ? > 0", 1, "RESOURCE_EXHAUSTED"),
        ("scan", "flight", None, 0, "RESOURCE_EXHAUSTED"),
        ("sample", "flight", None, 0, "RESOURCE_EXHAUSTED"),
        ("profile", "flight", None, 0, "RESOURCE_EXHAUSTED"),
        ("unknown", "flight", None, 0, "RESOURCE_EXHAUSTED"),  # it does not decode: nothing to say
        ("query", "flight-sql", "SELECT 43 AS y", 0, "RESOURCE_EXHAUSTED"),
    ]
    assert usage(server, swarm)["usage"]["queries"] == 1  # refusals are not spent


def test_per_agent_limits_leave_the_other_agents_alone(server: Server) -> None:
    swarm = new_swarm(server, "pa")
    assert put_budget(server, swarm, {"per_agent": {"rows_per_day": 10}}).status_code == 200
    greedy, modest = server.mint("agent", swarm, "greedy"), server.mint("agent", swarm, "modest")
    assert query(server, greedy, 10).num_rows == 10
    with pytest.raises(flight.FlightError) as e:
        query(server, greedy, 1)
    detail = error_info(e.value)["detail"]
    assert f"budget rows_per_day of agent {swarm}/greedy is spent: used 10 of 10" in detail
    assert query(server, modest, 3).num_rows == 3
    report = usage(server, swarm)
    assert report["usage"]["rows"] == 13 and report["usage"]["queries"] == 2
    assert report["agents"]["greedy"]["rows"] == 10 and report["agents"]["modest"]["rows"] == 3
    assert report["budget"] == {"per_agent": {"rows_per_day": 10}}
    # The usage action: an agent sees its swarm's total and its own entry, not its peers'.
    raw = next(iter(server.flight().do_action(flight.Action("usage", b""), call_options(modest))))
    mine = json.loads(raw.body.to_pybytes())
    assert mine["swarm"] == swarm and mine["usage"]["rows"] == 13
    assert set(mine["agents"]) == {"modest"}
    # /metrics exports the counters.
    text = server.http().get("/metrics").text
    assert f'quiver_usage_rows{{agent="greedy",swarm="{swarm}"}} 10.0' in text
    assert f'quiver_usage_queries{{agent="",swarm="{swarm}"}} 2.0' in text


def test_bytes_and_seconds_budgets_are_counted(server: Server) -> None:
    swarm = new_swarm(server, "bs")
    assert put_budget(server, swarm, {"bytes_per_day": 1}).status_code == 200
    token = server.mint("agent", swarm, "b")
    query(server, token, 5)  # admitted with 0 bytes spent; spends more than 1
    assert usage(server, swarm)["usage"]["bytes"] > 1
    with pytest.raises(flight.FlightError) as e:
        query(server, token, 5)
    assert "bytes_per_day" in error_info(e.value)["detail"]
    assert put_budget(server, swarm, {"query_seconds_per_day": 0}).status_code == 200
    with pytest.raises(flight.FlightError) as e:
        query(server, token, 5)
    assert "query_seconds_per_day" in error_info(e.value)["detail"]
    assert put_budget(server, swarm, {}).status_code == 200  # no limits at all
    assert query(server, token, 5).num_rows == 5


def test_the_budget_resets_at_utc_midnight(server: Server, clock: FakeClock) -> None:
    swarm = new_swarm(server, "mid")
    assert put_budget(server, swarm, {"queries_per_day": 1}).status_code == 200
    token = server.mint("agent", swarm, "night")
    query(server, token)
    with pytest.raises(flight.FlightError):
        query(server, token)
    before = usage(server, swarm)
    midnight = next_midnight(clock)
    assert before["resets_at"].startswith(midnight.strftime("%Y-%m-%dT%H:%M:%S"))
    # One second before midnight: still spent.
    clock.advance(midnight.timestamp() - clock.time() - 1)
    with pytest.raises(flight.FlightError):
        query(server, token)
    clock.advance(1)  # midnight
    token = server.mint("agent", swarm, "night")  # the clock moved: a fresh token
    after = usage(server, swarm)
    assert after["day"] == midnight.date().isoformat() and after["usage"]["queries"] == 0
    query(server, token)
    assert usage(server, swarm)["usage"]["queries"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"queries_per_day": -1},
        {"rows_per_day": 1.5},
        {"bytes_per_day": "10"},
        {"queries_per_day": True},
        {"queries_per_dya": 5},
        {"per_agent": {"rows_per_day": -3}},
        {"per_agent": {"per_agent": {}}},
        {"per_agent": 5},
        {"rows_per_day": 2**70},
        {"live_queries_per_day": -1},
        {"live_queries_per_day": "3"},
        {"per_agent": {"live_queries_per_day": 0.5}},
        {"live_query_per_day": 3},
    ],
)
def test_bad_budgets_are_refused_and_nothing_is_saved(server: Server, body: Any) -> None:
    swarm = new_swarm(server, "bad")
    assert put_budget(server, swarm, {"queries_per_day": 7}).status_code == 200
    r = put_budget(server, swarm, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "INVALID_ARGUMENT" and len(r.text) < 2000
    assert usage(server, swarm)["budget"] == {"queries_per_day": 7}
    with server.catalog.db.reading() as cur:
        stored = cur.execute("SELECT body FROM _quiver.budgets WHERE swarm = ?", [swarm]).fetchone()
    assert stored is not None and json.loads(stored[0]) == {"queries_per_day": 7}


def stored_budgets(server: Server, swarm: str) -> list[Any]:
    with server.catalog.db.reading() as cur:
        rows = cur.execute("SELECT body FROM _quiver.budgets WHERE swarm = ?", [swarm]).fetchall()
    return [json.loads(r[0]) for r in rows]


def test_budget_routes_refuse_what_is_not_theirs(server: Server) -> None:
    before = usage(server, "demo")
    r = put_budget(server, "ghost-swarm", {"queries_per_day": 1})
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", r.text
    r = server.http().get("/v1/swarms/ghost-swarm/usage")
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", r.text
    # The refused PUT created neither the swarm nor a budget row for it.
    assert not server.catalog.swarms.exists("ghost-swarm") and stored_budgets(server, "ghost-swarm") == []
    r = server.http().put("/v1/swarms/demo/budget", content=b"[1]")
    assert r.status_code in (400, 415) and r.json()["error"] == "INVALID_ARGUMENT", r.text
    nosy = server.mint("agent", "demo", "nosy")
    agent = server.http(nosy)
    r = agent.put("/v1/swarms/demo/budget", json={"queries_per_day": 0})
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED", r.text
    r = agent.get("/v1/swarms/demo/usage")
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED", r.text
    # Nothing saved, nothing charged: demo's budget and usage read back as before.
    assert usage(server, "demo") == before and before["budget"] == {}
    assert stored_budgets(server, "demo") == []
    # The refused agent's token still queries (a refused admin call costs it nothing).
    assert query(server, nosy).num_rows == 1


def test_concurrent_requests_are_counted_exactly(server: Server) -> None:
    swarm = new_swarm(server, "race")
    assert put_budget(server, swarm, {"queries_per_day": 10_000}).status_code == 200
    tokens = [server.mint("agent", swarm, f"r{i}") for i in range(6)]
    errors: list[BaseException] = []

    def hammer(token: str) -> None:
        try:
            for i in range(1, 9):
                query(server, token, i)
                r = server.http(token).post("/v1/query", json={"sql": "SELECT range AS i FROM range(2)"})
                assert r.status_code == 200
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    report = usage(server, swarm)
    assert report["usage"]["queries"] == 6 * 16
    assert report["usage"]["rows"] == 6 * (sum(range(1, 9)) + 8 * 2)
    for i in range(6):
        assert report["agents"][f"r{i}"]["queries"] == 16


def test_racing_refusals_are_each_recorded_as_asked(server: Server) -> None:
    """Threads of one spent swarm racing GetFlightInfo: every call refused, each refusal one
    query-log record naming its own SQL, nothing charged."""
    swarm = new_swarm(server, "refusals")
    assert put_budget(server, swarm, {"queries_per_day": 0}).status_code == 200
    tokens = [server.mint("agent", swarm, f"x{i}") for i in range(4)]
    codes: list[str] = []
    errors: list[BaseException] = []

    def hammer(n: int, token: str) -> None:
        try:
            client, opts = server.flight(), call_options(token)
            for i in range(6):
                with pytest.raises(flight.FlightError) as e:
                    client.get_flight_info(cmd(kind="query", sql=f"SELECT {n * 10 + i} AS v"), opts)
                codes.append(error_info(e.value)["code"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(n, t)) for n, t in enumerate(tokens)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert codes == ["RESOURCE_EXHAUSTED"] * 24
    log = server.http().get("/v1/queries", params={"swarm": swarm, "limit": 100}).json()["queries"]
    assert sorted(q["sql"] for q in log) == sorted(
        f"SELECT {n * 10 + i} AS v" for n in range(4) for i in range(6)
    )
    assert {(q["kind"], q["outcome"], q["error_code"]) for q in log} == {
        ("query", "refused", "RESOURCE_EXHAUSTED")
    }
    assert usage(server, swarm)["usage"]["queries"] == 0


def test_concurrent_budget_writes_serialize(server: Server) -> None:
    swarm = new_swarm(server, "puts")
    bodies = [{"queries_per_day": n, "per_agent": {"rows_per_day": n * 10}} for n in range(1, 13)]
    statuses: list[int] = []

    def put(body: dict[str, Any]) -> None:
        statuses.append(put_budget(server, swarm, body).status_code)

    threads = [threading.Thread(target=put, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * len(bodies)
    served = usage(server, swarm)["budget"]
    assert served in bodies
    with server.catalog.db.reading() as cur:
        rows = cur.execute("SELECT body FROM _quiver.budgets WHERE swarm = ?", [swarm]).fetchall()
    assert [json.loads(r[0]) for r in rows] == [served]  # memory is what committed


def test_usage_survives_a_restart(tmp_path: Path) -> None:
    s = start_server(tmp_path, tokens=QUIET)
    try:
        swarm = new_swarm(s, "restart")
        assert put_budget(s, swarm, {"queries_per_day": 3}).status_code == 200
        token = s.mint("agent", swarm, "r")
        query(s, token, 4)
        query(s, token, 4)
        s.catalog.maintain()  # the housekeeping pass: one batch of counters written
    finally:
        s.stop()
    again = start_server(tmp_path, tokens=QUIET)
    try:
        report = usage(again, swarm)
        assert report["usage"]["queries"] == 2 and report["usage"]["rows"] == 8
        assert report["agents"]["r"]["queries"] == 2
        token = again.mint("agent", swarm, "r")
        query(again, token)
        with pytest.raises(flight.FlightError) as e:
            query(again, token)
        assert "used 3 of 3" in error_info(e.value)["detail"]
    finally:
        again.stop()


def test_a_cached_result_is_refused_at_get_flight_info_too(server: Server) -> None:
    swarm = new_swarm(server, "cached")
    assert put_budget(server, swarm, {"queries_per_day": 1}).status_code == 200
    token = server.mint("agent", swarm, "c")
    descriptor = cmd(kind="query", sql="SELECT 7 AS seven")
    fetch(server, token, descriptor)  # now in the result cache: GetFlightInfo needs no slot
    with pytest.raises(flight.FlightError) as e:
        server.flight().get_flight_info(descriptor, call_options(token))
    assert "queries_per_day" in error_info(e.value)["detail"]
    refused = server.catalog.query_log.query(agent="c", swarm=swarm).queries[0]
    assert refused.outcome == "refused" and refused.error_code == "RESOURCE_EXHAUSTED"


def test_a_deleted_swarm_takes_its_budget_and_counters(server: Server) -> None:
    swarm = new_swarm(server, "gone")
    assert put_budget(server, swarm, {"queries_per_day": 1}).status_code == 200
    query(server, server.mint("agent", swarm, "g"))
    assert server.http().delete(f"/v1/swarms/{swarm}").status_code in (200, 204)
    assert server.http().post("/v1/swarms", json={"name": swarm, "tables": ["demo.*"]}).status_code == 201
    report = usage(server, swarm)
    assert report["budget"] == {} and report["usage"]["queries"] == 0
    query(server, server.mint("agent", swarm, "g"))  # no budget now
    server.catalog.maintain()
    with server.catalog.db.reading() as cur:
        assert cur.execute("SELECT count(*) FROM _quiver.budgets WHERE swarm = ?", [swarm]).fetchone() == (0,)
