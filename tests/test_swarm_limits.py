"""Per-swarm (and per-agent) limits (proto_docs/limits.md, "Per-swarm limits") on a real
server: ``PUT``/``GET``/``DELETE /v1/swarms/{name}/limits``; each override applies to the next
request without a restart — concurrency per agent and per swarm on top of the global slots,
calls per minute (a token bucket, moved with the injected clock), the row cap and the query
timeout, over Flight and ``POST /v1/query``; bad bodies are 422 with nothing saved; concurrent
writes serialize with memory equal to what committed; the limits survive a restart and go
with their swarm."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.harness import QUIET, FakeClock, Server, call_options, error_info, start_server, wait_until
from tests.test_dataplane import cmd

# Streams for a long time: a client that reads one batch holds its stream (and slot) open.
LONG = "SELECT range AS v FROM range(200000000)"
# A blocking aggregate over a 10^12-row cross join: runs until the timeout interrupts it.
RUNAWAY = "SELECT count(*) AS n FROM range(1000000) a, range(1000000) b WHERE (a.range * b.range) % 7 = 3"

LIMITS = {
    "max_rows_ceiling": 20_000_000,  # max_rows: the default 10,000,000
    "query_timeout_seconds": 20,
    "query_timeout_ceiling_seconds": 40,
    "max_concurrent_queries": 3,
    "max_concurrent_total": 12,
}
# A small global cap, so that a cut (and its loosening up to the ceiling) is cheap to see.
SMALL_ROWS = {**LIMITS, "max_rows": 1000, "max_rows_ceiling": 5000}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, clock: FakeClock) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("swarm-limits"), clock=clock, limits=LIMITS, tokens=QUIET)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("swarm-rows"), limits=SMALL_ROWS, tokens=QUIET)
    yield s
    s.stop()


def new_swarm(server: Server, prefix: str) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    r = server.http().post("/v1/swarms", json={"name": name, "tables": ["demo.*"]})
    assert r.status_code == 201, r.text
    return name


def put_limits(server: Server, swarm: str, body: Any) -> httpx.Response:
    return server.http().put(f"/v1/swarms/{swarm}/limits", json=body)


def saved(server: Server, swarm: str) -> dict[str, Any]:
    r = server.http().get(f"/v1/swarms/{swarm}/limits")
    assert r.status_code == 200, r.text
    return dict(r.json())


def stored(server: Server, swarm: str) -> Any:
    with server.catalog.db.reading() as cur:
        rows = cur.execute("SELECT body FROM _quiver.swarm_limits WHERE swarm = ?", [swarm]).fetchall()
    return [json.loads(r[0]) for r in rows]


def fetch(server: Server, token: str, descriptor: flight.FlightDescriptor) -> pa.Table:
    client, opts = server.flight(), call_options(token)
    info = client.get_flight_info(descriptor, opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def hold(server: Server, token: str) -> flight.FlightStreamReader:
    """A long query's stream, opened and one batch read: it holds its slot until cancelled."""
    client, opts = server.flight(), call_options(token)
    ticket = client.get_flight_info(cmd(kind="query", sql=LONG), opts).endpoints[0].ticket
    reader = client.do_get(ticket, opts)
    reader.read_chunk()
    return reader


def refusal(call: Any) -> dict[str, Any]:
    with pytest.raises(flight.FlightError) as caught:
        call()
    assert "Traceback" not in str(caught.value)
    return error_info(caught.value)


def slots(server: Server) -> int:
    assert server.runtime.flight is not None
    return sum(server.runtime.flight.admission.active().values())


def wait_idle(server: Server) -> None:
    assert server.runtime.flight is not None
    admission = server.runtime.flight.admission
    wait_until(lambda: not admission.active(), 20, what="every stream's slot to be freed")


# --- the routes -----------------------------------------------------------------------------------
def test_put_get_delete_and_what_applies(server: Server) -> None:
    swarm = new_swarm(server, "crud")
    empty = saved(server, swarm)
    assert empty["limits"] == {}
    assert empty["effective"] == {
        "max_rows": 10_000_000,
        "query_timeout_seconds": 20.0,
        "max_concurrent_queries": 3,
        "swarm_max_concurrent": None,
        "calls_per_minute": None,
        "swarm_calls_per_minute": None,
    }
    body = {
        "max_rows": 4000,
        "query_timeout_seconds": 2.5,
        "max_concurrent": 5,
        "calls_per_minute": 600,
        "per_agent": {"max_rows": 10, "max_concurrent": 1, "calls_per_minute": 60},
    }
    r = put_limits(server, swarm, body)
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == body
    # The swarm token: the swarm's keys; an agent: per_agent, then the swarm's (the timeout).
    assert r.json()["effective"]["max_rows"] == 4000
    assert r.json()["effective"]["max_concurrent_queries"] == 3
    agent = r.json()["effective_per_agent"]
    assert agent["max_rows"] == 10 and agent["query_timeout_seconds"] == 2.5
    assert agent["max_concurrent_queries"] == 1 and agent["swarm_max_concurrent"] == 5
    assert agent["calls_per_minute"] == 60 and agent["swarm_calls_per_minute"] == 600
    assert saved(server, swarm) == r.json()
    assert stored(server, swarm) == [body]
    # A PUT replaces the whole body: absent keys go back to the default.
    assert put_limits(server, swarm, {"max_rows": 7}).json()["limits"] == {"max_rows": 7}
    assert stored(server, swarm) == [{"max_rows": 7}]
    r = server.http().delete(f"/v1/swarms/{swarm}/limits")
    assert r.status_code == 200 and r.json()["limits"] == {}
    assert stored(server, swarm) == [] and saved(server, swarm)["effective"]["max_rows"] == 10_000_000
    server.catalog.audit.flush()
    events = server.http().get("/v1/audit", params={"limit": 1000}).json()["events"]
    mine = [(e["action"], e["outcome"]) for e in events if e.get("target") == swarm]
    assert ("limits.put", "ok") in mine and ("limits.delete", "ok") in mine


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"max_rows": -1}, ">= 1"),
        ({"max_rows": 0}, ">= 1"),
        ({"max_concurrent": 0}, ">= 1"),
        ({"calls_per_minute": 0}, ">= 1"),
        ({"query_timeout_seconds": 0}, "> 0"),
        ({"query_timeout_seconds": -2.5}, "> 0"),
        ({"max_rows": 1.5}, "Expected `int"),
        ({"max_rows": "10"}, "Expected `int"),
        ({"calls_per_minute": True}, "Expected `int"),
        ({"query_timeout_seconds": "2"}, "Expected `float"),
        ({"max_rows": 2**70}, "invalid limits"),
        ({"max_row": 5}, "unknown field"),
        ({"per_agent": {"max_rows": -3}}, "per_agent"),
        ({"per_agent": {"per_agent": {}}}, "unknown field"),
        ({"per_agent": 5}, "per_agent"),
        ({"max_rows": 20_000_001}, "above the ceiling 20000000"),
        ({"per_agent": {"max_rows": 30_000_000}}, "per_agent.max_rows 30000000 is above the ceiling"),
        ({"query_timeout_seconds": 41}, "above the ceiling 40"),
        ({"max_concurrent": 13}, "max_concurrent_total (12)"),
        ({"per_agent": {"max_concurrent": 4}}, "max_concurrent_queries (3)"),
    ],
)
def test_bad_limits_are_refused_and_nothing_is_saved(server: Server, body: Any, needle: str) -> None:
    swarm = new_swarm(server, "bad")
    good = {"max_rows": 99, "per_agent": {"calls_per_minute": 7}}
    assert put_limits(server, swarm, good).status_code == 200
    before = saved(server, swarm)
    r = put_limits(server, swarm, body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "INVALID_ARGUMENT" and len(r.text) < 2000
    assert needle in r.json()["detail"], r.json()["detail"]
    assert saved(server, swarm) == before
    assert stored(server, swarm) == [good]


def test_limits_routes_refuse_what_is_not_theirs(server: Server) -> None:
    before = saved(server, "demo")
    for r in (
        put_limits(server, "ghost-swarm", {"max_rows": 1}),
        server.http().get("/v1/swarms/ghost-swarm/limits"),
        server.http().delete("/v1/swarms/ghost-swarm/limits"),
    ):
        assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", r.text
    assert stored(server, "ghost-swarm") == [] and not server.catalog.swarms.exists("ghost-swarm")
    admin = server.http()
    r = admin.put("/v1/swarms/demo/limits", content=b"{")
    assert r.status_code in (400, 415) and r.json()["error"] == "INVALID_ARGUMENT", r.text
    # Not a JSON object: the gate's 400 (the body's declared type), nothing saved.
    r = admin.put("/v1/swarms/demo/limits", json=[1, 2])
    assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT" and "object" in r.json()["detail"]
    nosy = server.mint("agent", "demo", "nosy")
    agent = server.http(nosy)
    for r in (
        agent.put("/v1/swarms/demo/limits", json={"max_rows": 1}),
        agent.get("/v1/swarms/demo/limits"),
        agent.delete("/v1/swarms/demo/limits"),
    ):
        assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED", r.text
    assert stored(server, "demo") == [] and saved(server, "demo") == before
    # The refused agent's token still queries.
    assert fetch(server, nosy, cmd(kind="query", sql="SELECT 1 AS one")).num_rows == 1


def test_the_openapi_schema_names_the_limits_structs(server: Server) -> None:
    schema = server.http(None).get("/schema/openapi.json").json()
    op = schema["paths"]["/v1/swarms/{name}/limits"]["put"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) >= {"max_rows", "query_timeout_seconds", "max_concurrent", "per_agent"}
    assert "422" in op["responses"]
    out = json.dumps(op["responses"]["200"])
    assert "SwarmLimitsOut" in out


# --- concurrency ------------------------------------------------------------------------------
def test_per_agent_concurrency_refuses_the_second_query_while_a_peer_runs(server: Server) -> None:
    swarm = new_swarm(server, "conc")
    ann, bob = server.mint("agent", swarm, "ann"), server.mint("agent", swarm, "bob")
    held = [hold(server, ann)]
    try:
        # No override yet: the global per-principal bound (3) lets ann run a second one.
        held.append(hold(server, ann))
        for reader in held[1:]:
            reader.cancel()
        del held[1:]
        wait_until(lambda: slots(server) == 1, 20, what="the cancelled stream's slot")
        assert put_limits(server, swarm, {"per_agent": {"max_concurrent": 1}}).status_code == 200
        # The next request: ann's second query is refused, at planning and with a sentence ...
        info = refusal(
            lambda: server.flight().get_flight_info(
                cmd(kind="query", sql="SELECT 1 AS fresh_one"), call_options(ann)
            )
        )
        assert info["code"] == "RESOURCE_EXHAUSTED"
        assert "limit is 1 per principal" in info["detail"] and "per_agent.max_concurrent" in info["detail"]
        assert f"/v1/swarms/{swarm}/limits" in info["detail"]
        # ... over HTTP too (429) ...
        r = server.http(ann).post("/v1/query", json={"sql": "SELECT 2 AS two"})
        assert r.status_code == 429 and "per_agent.max_concurrent" in r.json()["detail"]
        # ... while bob, of the same swarm, still runs his (and holds one).
        assert fetch(server, bob, cmd(kind="query", sql="SELECT 3 AS three")).num_rows == 1
        held.append(hold(server, bob))
    finally:
        for reader in held:
            reader.cancel()
    wait_idle(server)
    assert fetch(server, ann, cmd(kind="query", sql="SELECT 4 AS four")).num_rows == 1


def test_a_swarm_wide_bound_counts_all_its_principals_together(server: Server) -> None:
    swarm = new_swarm(server, "fleet")
    tokens = [server.mint("agent", swarm, f"f{i}") for i in range(3)]
    swarm_token = server.mint("swarm", swarm)
    outsider = server.mint("agent", "demo", "outsider")
    assert put_limits(server, swarm, {"max_concurrent": 2}).status_code == 200
    held = [hold(server, tokens[0]), hold(server, tokens[1])]
    try:
        for token in (tokens[2], swarm_token):
            # Refused at GetFlightInfo when it plans, else at DoGet (a text planned a moment
            # ago needs no planning: proto_docs/limits.md).
            info = refusal(lambda t=token: hold(server, t))
            assert info["code"] == "RESOURCE_EXHAUSTED"
            assert f"of swarm {swarm}: 2 are running and its limit is 2" in info["detail"]
        # Another swarm is not affected.
        assert fetch(server, outsider, cmd(kind="query", sql="SELECT 5 AS five")).num_rows == 1
        # A slot given back is the swarm's again: the third agent runs now.
        held[0].cancel()
        held.pop(0)
        wait_until(lambda: slots(server) == 1, 20, what="the cancelled stream's slot")
        held.append(hold(server, tokens[2]))
    finally:
        for reader in held:
            reader.cancel()
    wait_idle(server)
    # The refusals changed nothing: the limits read back as set, and the swarm token runs.
    assert stored(server, swarm) == [{"max_concurrent": 2}]
    assert fetch(server, swarm_token, cmd(kind="query", sql="SELECT 6 AS six")).num_rows == 1


def test_racing_agents_never_exceed_the_swarm_bound(server: Server) -> None:
    """Six agents of one swarm race long queries against a swarm bound of 2: at every moment
    at most two run, and exactly the rest are refused with the swarm's sentence."""
    swarm = new_swarm(server, "race")
    assert put_limits(server, swarm, {"max_concurrent": 2}).status_code == 200
    tokens = [server.mint("agent", swarm, f"r{i}") for i in range(6)]
    readers: list[flight.FlightStreamReader] = []
    refusals: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(tokens))

    def race(token: str) -> None:
        start.wait()
        try:
            reader = hold(server, token)
            with lock:
                readers.append(reader)
        except flight.FlightError as e:
            with lock:
                refusals.append(error_info(e)["detail"])

    threads = [threading.Thread(target=race, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(readers) == 2, (len(readers), refusals)
        assert len(refusals) == 4 and all(f"of swarm {swarm}" in d for d in refusals)
        assert slots(server) == 2
    finally:
        for reader in readers:
            reader.cancel()
    wait_idle(server)
    # Every agent, refused or not, runs again once the slots are free; the limits are as set.
    assert stored(server, swarm) == [{"max_concurrent": 2}]
    for token in tokens:
        assert fetch(server, token, cmd(kind="query", sql="SELECT 7 AS seven")).num_rows == 1


# --- calls per minute -----------------------------------------------------------------------------
def test_calls_per_minute_refuse_before_any_work_and_refill_with_the_clock(
    server: Server, clock: FakeClock
) -> None:
    swarm = new_swarm(server, "rate")
    token = server.mint("agent", swarm, "chatty")
    assert put_limits(server, swarm, {"calls_per_minute": 3}).status_code == 200
    agent = server.http(token)
    for i in range(3):
        r = agent.post("/v1/query", json={"sql": f"SELECT {i} AS i"})
        assert r.status_code == 200, r.text
    assert server.runtime.flight is not None
    ran = server.runtime.flight.streamer.executions
    r = agent.post("/v1/query", json={"sql": "SELECT 99 AS i"})
    assert r.status_code == 429
    detail = r.json()["detail"]
    assert f"over the limit of 3 calls a minute for swarm {swarm}" in detail
    assert "calls_per_minute" in detail and "retry in 20 s" in detail
    info = refusal(
        lambda: server.flight().get_flight_info(cmd(kind="query", sql="SELECT 98 AS i"), call_options(token))
    )
    assert info["code"] == "RESOURCE_EXHAUSTED" and "retry in 20 s" in info["detail"]
    assert server.runtime.flight.streamer.executions == ran  # nothing ran
    # The bucket refills at 3 a minute: 20 s gives one call back, not more.
    clock.advance(20)
    assert agent.post("/v1/query", json={"sql": "SELECT 5 AS i"}).status_code == 200
    assert agent.post("/v1/query", json={"sql": "SELECT 6 AS i"}).status_code == 429
    # The limit is the swarm's: another agent of the swarm shares it ...
    peer = server.http(server.mint("agent", swarm, "peer"))
    assert peer.post("/v1/query", json={"sql": "SELECT 7 AS i"}).status_code == 429
    # ... and cleared, it no longer applies (the next request).
    assert server.http().delete(f"/v1/swarms/{swarm}/limits").status_code == 200
    assert peer.post("/v1/query", json={"sql": "SELECT 8 AS i"}).status_code == 200
    # The refusals are in the query log, and counted by reason on /metrics.
    metrics = server.http().get("/metrics").text
    line = next(
        x for x in metrics.splitlines() if x.startswith('quiver_admission_refusals_total{reason="rate"}')
    )
    assert float(line.split()[-1]) >= 3  # HTTP, Flight, HTTP after the refill
    records = server.catalog.query_log.query(agent="chatty", swarm=swarm).queries
    assert any(q.outcome == "refused" and q.error_code == "RESOURCE_EXHAUSTED" for q in records)


def test_per_agent_calls_per_minute_leave_the_peers_alone(server: Server, clock: FakeClock) -> None:
    swarm = new_swarm(server, "prate")
    assert put_limits(server, swarm, {"per_agent": {"calls_per_minute": 2}}).status_code == 200
    greedy, modest = server.mint("agent", swarm, "greedy"), server.mint("agent", swarm, "modest")
    # A Flight query is GetFlightInfo and one DoGet: two calls.
    assert fetch(server, greedy, cmd(kind="query", sql="SELECT 1 AS one")).num_rows == 1
    info = refusal(lambda: fetch(server, greedy, cmd(kind="query", sql="SELECT 2 AS two")))
    assert info["code"] == "RESOURCE_EXHAUSTED"
    assert "each agent of the swarm" in info["detail"] and "per_agent.calls_per_minute" in info["detail"]
    assert "retry in 30 s" in info["detail"]
    assert fetch(server, modest, cmd(kind="query", sql="SELECT 3 AS three")).num_rows == 1
    clock.advance(60)
    assert fetch(server, greedy, cmd(kind="query", sql="SELECT 4 AS four")).num_rows == 1


# --- rows and time --------------------------------------------------------------------------------
def test_a_max_rows_override_cuts_like_the_global_cap(small: Server) -> None:
    server = small
    swarm = new_swarm(server, "rows")
    agent, swarm_token = server.mint("agent", swarm, "reader"), server.mint("swarm", swarm)
    demo = server.agent_token
    sql = "SELECT range AS i FROM range(3000)"
    # The global cap (1000) cuts a demo agent's result; the result cache holds that cut one.
    assert fetch(server, demo, cmd(kind="query", sql=sql)).num_rows == 1000
    assert fetch(server, agent, cmd(kind="query", sql=sql)).num_rows == 1000
    assert put_limits(server, swarm, {"max_rows": 2500, "per_agent": {"max_rows": 7}}).status_code == 200
    # Loosened up to the ceiling for the swarm token, tightened for its agents: the next request.
    info = server.flight().get_flight_info(cmd(kind="query", sql=sql), call_options(swarm_token))
    cut = json.loads(info.app_metadata)
    assert cut["max_rows"] == 2500 and cut["reason"] == "server_max_rows"
    assert fetch(server, swarm_token, cmd(kind="query", sql=sql)).num_rows == 2500
    got = fetch(server, agent, cmd(kind="query", sql=sql))
    assert got.num_rows == 7
    assert fetch(server, demo, cmd(kind="query", sql=sql)).num_rows == 1000  # not another's cut
    # The same cut over HTTP, with the same headers as the global cap.
    r = server.http(agent).post(
        "/v1/query", json={"sql": sql}, headers={"accept": "application/vnd.apache.arrow.stream"}
    )
    assert r.status_code == 200 and r.headers["x-quiver-max-rows"] == "7"
    assert r.headers["x-quiver-max-rows-reason"] == "server_max_rows"
    # A caller's own max_rows above its cap is refused, naming the key that set the cap.
    info_ = refusal(
        lambda: server.flight().get_flight_info(cmd(kind="query", sql=sql, max_rows=8), call_options(agent))
    )
    assert info_["code"] == "INVALID_ARGUMENT"
    assert "between 1 and 7" in info_["detail"] and "per_agent.max_rows" in info_["detail"]
    assert fetch(server, agent, cmd(kind="query", sql=sql, max_rows=5)).num_rows == 5


def test_a_timeout_override_interrupts_through_the_same_path(server: Server) -> None:
    swarm = new_swarm(server, "time")
    agent = server.mint("agent", swarm, "slow")
    assert put_limits(server, swarm, {"query_timeout_seconds": 0.5}).status_code == 200
    client, opts = server.flight(), call_options(agent)
    info = client.get_flight_info(cmd(kind="query", sql=RUNAWAY), opts)
    with pytest.raises(flight.FlightTimedOutError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    detail = error_info(caught.value)
    assert detail["code"] == "DEADLINE_EXCEEDED" and "after 0.5 s" in detail["detail"]
    r = server.http(agent).post("/v1/query", json={"sql": RUNAWAY})
    assert r.status_code == 504 and "after 0.5 s" in r.json()["detail"]
    # Per agent beats the swarm's.
    assert (
        put_limits(
            server, swarm, {"query_timeout_seconds": 30, "per_agent": {"query_timeout_seconds": 0.25}}
        ).status_code
        == 200
    )
    r = server.http(agent).post("/v1/query", json={"sql": RUNAWAY})
    assert r.status_code == 504 and "after 0.25 s" in r.json()["detail"]
    wait_idle(server)


# --- lifetime ---------------------------------------------------------------------------------------
def test_concurrent_limit_writes_serialize(server: Server) -> None:
    swarm = new_swarm(server, "puts")
    bodies = [{"max_rows": n, "per_agent": {"calls_per_minute": n}} for n in range(1, 13)]
    statuses: list[int] = []
    start = threading.Barrier(len(bodies) + 2)

    def put(body: dict[str, Any]) -> None:
        start.wait()
        statuses.append(put_limits(server, swarm, body).status_code)

    def clear() -> None:
        start.wait()
        statuses.append(server.http().delete(f"/v1/swarms/{swarm}/limits").status_code)

    threads = [threading.Thread(target=put, args=(b,)) for b in bodies]
    threads += [threading.Thread(target=clear) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * (len(bodies) + 2)
    served = saved(server, swarm)["limits"]
    assert served in [*bodies, {}]
    assert stored(server, swarm) == ([served] if served else [])  # memory is what committed
    # ... and so is what the data plane applies.
    rows = fetch(server, server.mint("swarm", swarm), cmd(kind="query", sql="SELECT range FROM range(100)"))
    assert rows.num_rows == served.get("max_rows", 100)


def test_limits_survive_a_restart_and_go_with_their_swarm(tmp_path: Path) -> None:
    s = start_server(tmp_path, limits=SMALL_ROWS, tokens=QUIET)
    try:
        swarm = new_swarm(s, "kept")
        body = {"max_rows": 4000, "per_agent": {"max_rows": 3}}
        assert put_limits(s, swarm, body).status_code == 200
    finally:
        s.stop()
    # Restarted with a lower ceiling: what was saved is kept, and held to the new ceiling.
    again = start_server(tmp_path, limits={**SMALL_ROWS, "max_rows_ceiling": 2000}, tokens=QUIET)
    try:
        assert saved(again, swarm)["limits"] == body
        assert saved(again, swarm)["effective"]["max_rows"] == 2000
        wide = again.mint("swarm", swarm)
        assert fetch(again, wide, cmd(kind="query", sql="SELECT range FROM range(3000)")).num_rows == 2000
        token = again.mint("agent", swarm, "k")
        assert fetch(again, token, cmd(kind="query", sql="SELECT range FROM range(10)")).num_rows == 3
        assert again.http().delete(f"/v1/swarms/{swarm}").status_code in (200, 204)
        assert stored(again, swarm) == []
        assert again.http().post("/v1/swarms", json={"name": swarm, "tables": ["demo.*"]}).status_code == 201
        assert saved(again, swarm)["limits"] == {}
        token = again.mint("agent", swarm, "k")
        assert fetch(again, token, cmd(kind="query", sql="SELECT range FROM range(10)")).num_rows == 10
    finally:
        again.stop()


def test_status_counts_the_swarms_with_limits(small: Server) -> None:
    def status() -> dict[str, Any]:
        return dict(small.http().get("/v1/status").json()["queries"]["limits"])

    before = status()["swarms_with_limits"]
    swarm = new_swarm(small, "status")
    assert put_limits(small, swarm, {"calls_per_minute": 100}).status_code == 200
    assert status() == {
        "query_timeout_seconds": 20.0,
        "max_concurrent_queries": 3,
        "max_concurrent_total": 12,
        "max_rows": 1000,
        "swarms_with_limits": before + 1,
    }
    assert small.http().delete(f"/v1/swarms/{swarm}/limits").status_code == 200
    assert status()["swarms_with_limits"] == before


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        (
            {"max_rows": 1000, "max_rows_ceiling": 999},
            "limits.max_rows_ceiling (999) is below limits.max_rows (1000)",
        ),
        (
            {"query_timeout_seconds": 30, "query_timeout_ceiling_seconds": 10},
            "limits.query_timeout_ceiling_seconds (10) is below limits.query_timeout_seconds (30)",
        ),
    ],
)
def test_a_ceiling_below_its_limit_is_refused_at_start(
    tmp_path: Path, limits: dict[str, Any], needle: str
) -> None:
    from catalog.config import ConfigError, load_config

    path = tmp_path / "quiver.toml"
    path.write_text("[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items()))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert needle in str(caught.value)


def test_mcp_run_query_reads_under_the_swarms_row_cap(server: Server) -> None:
    """MCP's run_query asks for its own default rows (``[mcp] default_rows``, 100): under a
    swarm cap below that it answers the cap's rows and says so, instead of refusing every
    call for a max_rows the agent never chose."""
    from tests.test_mcp import ok, tool

    swarm = new_swarm(server, "mcp")
    token = server.mint("agent", swarm, "llm")
    assert put_limits(server, swarm, {"per_agent": {"max_rows": 4}}).status_code == 200
    answer = ok(
        tool(server, "run_query", {"sql": "SELECT range AS i FROM range(50)", "format": "json"}, token)
    )
    assert answer["rows_returned"] == 4 and answer["truncated"] and answer["max_rows"] == 4
    # Within the cap, the tool's own max_rows still applies.
    answer = ok(tool(server, "run_query", {"sql": "SELECT range AS i FROM range(50)", "max_rows": 2}, token))
    assert answer["rows_returned"] == 2 and answer["max_rows"] == 2


def action(server: Server, token: str, name: str, body: Any) -> Any:
    raw = json.dumps(body).encode()
    result = next(iter(server.flight().do_action(flight.Action(name, raw), call_options(token))))
    return json.loads(result.body.to_pybytes())


def test_an_async_query_is_cut_at_the_swarms_row_cap(server: Server) -> None:
    swarm = new_swarm(server, "async")
    token = server.mint("agent", swarm, "bg")
    assert put_limits(server, swarm, {"per_agent": {"max_rows": 3}}).status_code == 200
    query = action(server, token, "submit-query", {"sql": "SELECT range AS i FROM range(40)"})

    def finished() -> dict[str, Any] | None:
        status = action(server, token, "query-status", {"id": query["id"]})
        return status if status["state"] == "succeeded" else None

    status = wait_until(finished, 30, what="the async query")
    assert status["max_rows"] == 3 and status["max_rows_reason"] == "server_max_rows"
    assert status["truncated"] is True and status["rows"] == 3


def test_racing_calls_never_pass_the_rate(server: Server) -> None:
    """Twelve threads of one swarm call at once against 5 calls a minute (the clock stands
    still): exactly five pass, the rest are 429 with the rate's sentence."""
    swarm = new_swarm(server, "burst")
    assert put_limits(server, swarm, {"calls_per_minute": 5}).status_code == 200
    clients = [server.http(server.mint("agent", swarm, f"b{i}")) for i in range(12)]
    start = threading.Barrier(len(clients))
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def call(client: httpx.Client) -> None:
        start.wait()
        r = client.post("/v1/query", json={"sql": "SELECT 1 AS one"})
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=call, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 5 + [429] * 7, [(r.status_code, r.text[:200]) for r in answers]
    assert all("calls a minute" in r.json()["detail"] for r in answers if r.status_code == 429)


def test_flight_sql_statements_run_under_the_swarms_limits(server: Server) -> None:
    """Flight SQL plans onto the same planner and admission: the row cap and the rate apply."""
    from adbc_driver_manager import OperationalError as adbc_error

    from tests.test_flight_sql import connect

    swarm = new_swarm(server, "fsql")
    token = server.mint("agent", swarm, "bi")
    assert put_limits(server, swarm, {"per_agent": {"max_rows": 6}}).status_code == 200
    conn = connect(server, token)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT range AS i FROM range(100)")
            assert cur.fetch_arrow_table().num_rows == 6
        # Statement calls count against the rate like any other (GetFlightInfo, DoGet).
        assert put_limits(server, swarm, {"per_agent": {"calls_per_minute": 2}}).status_code == 200
        with conn.cursor() as cur:
            cur.execute("SELECT 1 AS one")
            assert cur.fetch_arrow_table().num_rows == 1
            # RESOURCE_EXHAUSTED travels as a FlightServerError (gRPC UNKNOWN: errors.md), its
            # sentence intact.
            with pytest.raises(adbc_error, match=r"per_agent\.calls_per_minute"):
                cur.execute("SELECT 2 AS two")
                cur.fetch_arrow_table()
    finally:
        conn.close()


def test_limit_writes_racing_the_swarms_deletion_leave_nothing_behind(server: Server) -> None:
    """PUTs racing the swarm's DELETE: each PUT either committed before the deletion (which
    then took it) or found no swarm (404); never a 500, and neither the database nor memory
    keeps limits of a swarm that is gone."""
    swarm = new_swarm(server, "doomed")
    start = threading.Barrier(9)
    statuses: list[int] = []
    lock = threading.Lock()

    def put(n: int) -> None:
        start.wait()
        code = put_limits(server, swarm, {"max_rows": n}).status_code
        with lock:
            statuses.append(code)

    def remove() -> None:
        start.wait()
        code = server.http().delete(f"/v1/swarms/{swarm}").status_code
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=put, args=(n,)) for n in range(1, 9)]
    threads.append(threading.Thread(target=remove))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) <= {200, 204, 404}, statuses
    assert server.http().get(f"/v1/swarms/{swarm}/limits").status_code == 404
    assert stored(server, swarm) == []
    assert server.http().post("/v1/swarms", json={"name": swarm, "tables": ["demo.*"]}).status_code == 201
    assert saved(server, swarm)["limits"] == {}  # memory holds nothing of the old swarm


def test_a_swarm_bound_set_while_its_agents_run_counts_what_runs(server: Server) -> None:
    """The bound applies to the next request and counts the swarm's queries already running,
    including those admitted before the swarm had limits."""
    swarm = new_swarm(server, "late")
    early, late = server.mint("agent", swarm, "early"), server.mint("agent", swarm, "late")
    held = [hold(server, early)]  # admitted while the swarm had no limits
    try:
        assert put_limits(server, swarm, {"max_concurrent": 1}).status_code == 200
        info = refusal(lambda: hold(server, late))
        assert info["code"] == "RESOURCE_EXHAUSTED"
        assert f"of swarm {swarm}: 1 are running and its limit is 1" in info["detail"]
    finally:
        for reader in held:
            reader.cancel()
    wait_idle(server)
    held = [hold(server, late)]  # the slot is free again
    for reader in held:
        reader.cancel()
    wait_idle(server)


def test_every_swarm_route_refuses_a_missing_swarm_with_one_bounded_sentence(server: Server) -> None:
    """The swarm, its allowlist, attributes, limits, budget and usage: one 404 sentence
    (catalog/swarms.no_such_swarm) with the name echoed bounded; nothing is created."""
    name = "g" * 300
    http = server.http()
    answers = [
        http.get(f"/v1/swarms/{name}"),
        http.get(f"/v1/swarms/{name}/allowlist"),
        http.put(f"/v1/swarms/{name}/attributes", json={"a": 1}),
        http.get(f"/v1/swarms/{name}/limits"),
        http.put(f"/v1/swarms/{name}/limits", json={"max_rows": 5}),
        http.put(f"/v1/swarms/{name}/budget", json={"queries_per_day": 5}),
        http.get(f"/v1/swarms/{name}/usage"),
    ]
    details = set()
    for r in answers:
        assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", r.text
        details.add(r.json()["detail"])
    (detail,) = details
    assert detail.endswith("(220 more characters)' does not exist; GET /v1/swarms lists them"), detail
    assert not server.catalog.swarms.exists(name) and stored(server, name) == []
