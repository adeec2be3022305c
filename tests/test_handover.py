"""Plan once for slow queries (issue #10): GetFlightInfo of a ``query`` command starts the query;
one still running when GetFlightInfo's budget passes keeps running — in its admission slot, on
its cursor, under its query deadline — and the first DoGet of the ticket takes that run over
instead of running the query again. A run nobody takes is stopped and released: its deadline,
an admin's cancel, CancelFlightInfo, server shutdown. Wire contract: proto_docs/tickets.md
(rule 5); code: flight_server/ready.py (``HeldRun``), flight_server/streams.py.

Real servers on ephemeral ports, real DuckDB files, real pyarrow.flight clients and the admin's
HTTP API. GetFlightInfo's budget is made tiny here (``Streamer.INFO_RUN_SECONDS``), so that a
query of a second or two is handed over however loaded the machine is; the counters read are
the server's own (``Streamer.executions``, ``Streamer.held_runs()``, the admission slots).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow.flight as flight
import pytest

from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.server import QuiverFlightServer
from tests.harness import Server, call_options, error_info, start_server, wait_until

_fresh = itertools.count(1)

#: Runs until its query timeout (hours of work): only a timeout or a cancel ends it.
ENDLESS = "SELECT count(*) AS n FROM range(1000000) a, range({k}) b WHERE (a.range * b.range) % 7 = 3"


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def finishing(n: int = 12_000) -> tuple[str, int]:
    """A fresh text of a query that is slow by construction (an ``n`` by ``n`` cross join
    aggregate, about a second) and finishes; its one row's expected value."""
    k = next(_fresh)
    side = n * (n - 1) // 2
    return f"SELECT sum(a.range * b.range) + {k} AS s FROM range({n}) a, range({n}) b", side * side + k


def endless() -> str:
    return ENDLESS.format(k=1_000_000 + next(_fresh))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("handover"), limits={"query_timeout_seconds": 60})
    yield s
    s.stop()


@pytest.fixture
def fs(server: Server, monkeypatch: pytest.MonkeyPatch) -> QuiverFlightServer:
    assert server.runtime.flight is not None
    monkeypatch.setattr(server.runtime.flight.streamer, "INFO_RUN_SECONDS", 0.01)
    return server.runtime.flight


@pytest.fixture
def opts(server: Server) -> flight.FlightCallOptions:
    assert server.demo_token is not None
    return call_options(server.demo_token)


def _running(server: Server) -> list[dict[str, Any]]:
    r = server.http().get("/v1/queries", params={"running": "true"})
    assert r.status_code == 200, r.text
    return list(r.json()["queries"])


def _released(fs: QuiverFlightServer) -> bool:
    return fs.admission.streams() == 0 and fs.streamer.held_runs()["held"] == 0


def test_a_slow_query_is_run_once_and_doget_streams_that_run(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    sql, expected = finishing(20_000)
    runs = fs.streamer.executions
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert info.schema.names == ["s"]
    # GetFlightInfo answered while DuckDB still runs the query, in the slot it holds.
    assert fs.streamer.held_runs() == {"held": 1, "running": 1}
    assert fs.admission.streams() == 1
    (listed,) = [q for q in _running(server) if q["kind"] == "run"]
    assert listed["via"] == "flight" and "range(20000)" in listed["sql"]
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert [int(v) for v in table.column("s").to_pylist()] == [expected]
    assert fs.streamer.executions == runs + 1  # run once: DoGet streamed GetFlightInfo's run
    wait_until(lambda: _released(fs), what="the run released")
    # A second DoGet of the ticket is an ordinary one: here a hit of the result cache the
    # handed-over run filled (with the cache off it would run the query again).
    hits = fs.cache.stats().hits
    again = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert [int(v) for v in again.column("s").to_pylist()] == [expected]
    assert fs.streamer.executions == runs + 1 and fs.cache.stats().hits == hits + 1
    assert _released(fs)


def test_a_handed_over_result_larger_than_the_head_streams_whole_and_cut(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    """A result larger than the head (16 MB) and one cut at the caller's ``max_rows``: the run
    handed over streams on from DuckDB's reader after its head, the cut on its last batch."""
    client = server.flight()
    n = 2_000_000 + next(_fresh)
    sql = f"SELECT range AS i FROM range({n}) ORDER BY (range * 7919) % {n}"
    runs = fs.streamer.executions
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert len(info.endpoints) == 1  # handed over: never split, the run is going
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert table.num_rows == n and fs.streamer.executions == runs + 1
    cut = client.get_flight_info(cmd(kind="query", sql=sql, max_rows=300_000), opts)
    chunks = list(client.do_get(cut.endpoints[0].ticket, opts))
    assert sum(c.data.num_rows for c in chunks) == 300_000
    last = json.loads(chunks[-1].app_metadata.to_pybytes())
    assert last["truncated"] is True and last["max_rows"] == 300_000
    wait_until(lambda: _released(fs), what="the runs released")


def test_an_admin_lists_and_cancels_a_handed_over_run(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    info = client.get_flight_info(cmd(kind="query", sql=endless()), opts)
    (entry,) = [q for q in _running(server) if q["kind"] == "run"]
    assert entry["via"] == "flight" and entry["principal"] == "agent:demo/demo-agent"
    assert entry["id"].startswith("h_") and fs.admission.streams() == 1
    r = server.http().delete(f"/v1/queries/{entry['id']}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": entry["id"], "stopped": True}
    # Released at once, before any DoGet: no slot, no cursor, no longer listed.
    assert _released(fs) and all(q["id"] != entry["id"] for q in _running(server))
    with pytest.raises(flight.FlightCancelledError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "CANCELLED"
    assert _released(fs)


def test_an_admin_cancels_a_run_doget_took_over_as_a_stream(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    info = client.get_flight_info(cmd(kind="query", sql=endless()), opts)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            client.do_get(info.endpoints[0].ticket, opts).read_all()
        except BaseException as e:  # reported by the main thread
            outcome.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    # Taken over: listed once, as the DoGet's stream (no longer as a run).
    entry = wait_until(
        lambda: next((q for q in _running(server) if q["kind"] == "stream"), None), what="the stream"
    )
    assert not [q for q in _running(server) if q["kind"] == "run"]
    assert fs.admission.streams() == 1  # the run's slot: the DoGet took no second one
    r = server.http().delete(f"/v1/queries/{entry['id']}")
    assert r.status_code == 200 and r.json()["stopped"] is True, r.text
    reader.join(60)
    assert not reader.is_alive()
    (error,) = outcome
    assert isinstance(error, flight.FlightCancelledError), error
    wait_until(lambda: _released(fs), what="the run released")


def test_cancel_flight_info_stops_a_handed_over_run_before_its_doget(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    command = pb.CommandStatementQuery(query=endless())
    wrapped = flight.FlightDescriptor.for_command(_any(command))
    info = client.get_flight_info(wrapped, opts)
    assert fs.streamer.held_runs()["held"] == 1
    body = pb.CancelFlightInfoRequest(info=info.serialize()).SerializeToString()
    (result,) = client.do_action(flight.Action("CancelFlightInfo", body), opts)
    status = pb.CancelFlightInfoResult()
    status.ParseFromString(result.body.to_pybytes())
    assert status.status == pb.CANCEL_STATUS_CANCELLED
    assert _released(fs)
    with pytest.raises(flight.FlightCancelledError):
        client.do_get(info.endpoints[0].ticket, opts).read_all()


def _any(message: Any) -> bytes:
    from google.protobuf import any_pb2

    packed = any_pb2.Any()
    packed.Pack(message)
    return packed.SerializeToString()


def test_an_error_after_the_budget_is_answered_at_doget_with_its_code(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    sql, _ = finishing()
    bad = f"SELECT s, 'x'::INTEGER AS b FROM ({sql})"  # fails at run time, after the join
    info = client.get_flight_info(cmd(kind="query", sql=bad), opts)
    assert info.schema.names == ["s", "b"]
    runs = fs.streamer.executions
    with pytest.raises(flight.FlightServerError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "INVALID_ARGUMENT"
    assert fs.streamer.executions == runs  # the run's own error: not run again
    wait_until(lambda: _released(fs), what="the run released")


def test_a_handed_over_querys_probed_schema_is_the_schema_its_doget_streams(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    """The FlightInfo of a run still going has the binder's schema (a ``LIMIT 0`` probe through
    the engine's submit step, as a run: flight_server/planner.py ``query_schema``); for types
    whose Arrow encoding has choices it is exactly the schema DoGet streams."""
    client = server.flight()
    sql, expected = finishing()
    typed = (
        "SELECT s, 1.5::DECIMAL(18, 3) AS d, s::HUGEINT AS h, [1, 2] AS l, {'a': 1, 'b': 'x'} AS st, "
        "TIMESTAMPTZ '2026-01-01 00:00:00+00' AS ts, INTERVAL 1 DAY AS iv, "
        "'0b0f5b6e-3c1d-4c4e-9d6e-1f2a3b4c5d6e'::UUID AS u, 'ab'::BLOB AS bl, DATE '2026-01-02' AS dt "
        f"FROM ({sql})"
    )
    probes = fs.planner.probes
    info = client.get_flight_info(cmd(kind="query", sql=typed), opts)
    assert fs.planner.probes == probes + 1  # handed over before DuckDB returned a reader
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert table.schema == info.schema
    assert [int(v) for v in table.column("s").to_pylist()] == [expected]
    wait_until(lambda: _released(fs), what="the run released")


def test_the_probe_and_the_doget_share_the_runs_slot(server: Server, fs: QuiverFlightServer) -> None:
    """A principal allowed one query at a time: its handed-over query's schema probe and DoGet
    run in the slot the run holds (not refused), and a second query meanwhile is refused."""
    token = server.mint("agent", "demo", "handover-one")
    r = server.http().put("/v1/swarms/demo/limits", json={"per_agent": {"max_concurrent": 1}})
    assert r.status_code == 200, r.text
    try:
        client, opts = server.flight(), call_options(token)
        sql, expected = finishing()
        info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
        with pytest.raises(flight.FlightError) as refused:
            client.get_flight_info(cmd(kind="query", sql=endless()), opts)
        assert error_info(refused.value)["code"] == "RESOURCE_EXHAUSTED"
        table = client.do_get(info.endpoints[0].ticket, opts).read_all()
        assert [int(v) for v in table.column("s").to_pylist()] == [expected]
    finally:
        assert server.http().delete("/v1/swarms/demo/limits").status_code in (200, 204)
    wait_until(lambda: _released(fs), what="the run released")


def test_agents_racing_handed_over_queries_each_get_their_own_rows(
    server: Server, fs: QuiverFlightServer
) -> None:
    tokens = [call_options(server.mint("agent", "demo", f"handover-{n}")) for n in range(6)]
    errors: list[BaseException] = []
    runs = fs.streamer.executions

    def agent(n: int) -> None:
        client, opts = server.flight(), tokens[n]
        try:
            for _ in range(2):
                sql, expected = finishing(3_000)
                info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
                got = client.do_get(info.endpoints[0].ticket, opts).read_all()
                assert [int(v) for v in got.column("s").to_pylist()] == [expected]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert fs.streamer.executions == runs + 12  # each query run once
    wait_until(lambda: _released(fs), what="every run released")
    assert not fs.admission.active()


def test_a_run_nobody_takes_is_released_at_its_deadline_and_shutdown_does_not_hang(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = start_server(tmp_path_factory.mktemp("handover-expiry"), limits={"query_timeout_seconds": 2})
    try:
        fs = s.runtime.flight
        assert fs is not None and s.demo_token is not None
        client, opts = s.flight(), call_options(s.demo_token)
        info = client.get_flight_info(cmd(kind="query", sql=endless()), opts)
        assert fs.admission.streams() == 1
        # The client never calls DoGet: the query deadline (from GetFlightInfo) releases it.
        wait_until(lambda: _released(fs), what="the untaken run released at its deadline")
        assert not [q for q in _running(s) if q["kind"] == "run"]
        # Its DoGet, late, answers the timeout the run met.
        with pytest.raises(flight.FlightError) as caught:
            client.do_get(info.endpoints[0].ticket, opts).read_all()
        assert error_info(caught.value)["code"] == "DEADLINE_EXCEEDED"
        wait_until(lambda: _released(fs), what="released")
        # A run still held at shutdown is stopped: the server stops.
        client.get_flight_info(cmd(kind="query", sql=endless()), opts)
        assert fs.streamer.held_runs()["held"] == 1
    finally:
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        wait_until(lambda: not stopper.is_alive(), what="the server stopped")
    assert fs.streamer.held_runs()["held"] == 0


def test_a_run_nobody_takes_is_released_when_its_ticket_expires(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Tickets that expire before the query timeout: the untaken run goes with its ticket."""
    s = start_server(
        tmp_path_factory.mktemp("handover-ttl"),
        limits={"query_timeout_seconds": 600, "ticket_ttl_seconds": 1},
    )
    try:
        fs = s.runtime.flight
        assert fs is not None and s.demo_token is not None
        client, opts = s.flight(), call_options(s.demo_token)
        client.get_flight_info(cmd(kind="query", sql=endless()), opts)
        assert fs.streamer.held_runs()["held"] == 1 and fs.admission.streams() == 1
        wait_until(lambda: _released(fs), what="the untaken run released with its ticket")
        assert not [q for q in _running(s) if q["kind"] == "run"]
    finally:
        s.stop()


def test_a_handed_over_query_gets_one_query_log_record(server: Server, fs: QuiverFlightServer) -> None:
    """GetFlightInfo started it, DoGet streamed it: one record, with the rows it sent."""
    token = server.mint("agent", "demo", "handover-log")
    client, opts = server.flight(), call_options(token)
    sql, expected = finishing()
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert fs.streamer.held_runs()["held"] == 1
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert [int(v) for v in table.column("s").to_pylist()] == [expected]
    (result,) = client.do_action(flight.Action("my-queries", json.dumps({"limit": 10}).encode()), opts)
    records = json.loads(result.body.to_pybytes())["queries"]
    assert len(records) == 1, records
    (r,) = records
    assert r["kind"] == "query" and r["outcome"] == "ok" and r["rows"] == 1 and r["sql"] == sql
    wait_until(lambda: _released(fs), what="the run released")


def test_a_quick_template_runs_on_the_calling_thread_and_an_overrun_falls_back(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shape template whose run came back within the budget is run on GetFlightInfo's own
    thread next time (no hand-off to a worker: the point query's path). A later text of it
    that overruns is interrupted at the budget and run again by DoGet (the answer is still
    right), and the template is no longer quick: its next slow text is handed over, run once."""
    monkeypatch.setattr(fs.streamer, "INFO_RUN_SECONDS", 0.3)
    client = server.flight()

    def text(m: int) -> tuple[str, int]:  # one template: only the literals' values change
        k = next(_fresh)
        body = f"FROM range(15000) a, range(15000) b WHERE (a.range * b.range) % 7 < 3 AND a.range < {m}"
        (expected,) = duckdb.connect().execute(f"SELECT count(*) + {k} {body}").fetchall()
        return f"SELECT count(*) + {k} AS c {body}", int(expected[0])

    def ask(sql: str) -> tuple[flight.FlightInfo, int]:
        info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
        table = client.do_get(info.endpoints[0].ticket, opts).read_all()
        return info, int(table.column("c")[0].as_py())

    for m in (1, 2, 3):  # the guard parses a shape whole until it knows it, then a hit:
        sql, want = text(m)  # each on a worker, and back within the budget
        assert ask(sql)[1] == want
    quick, runs = fs.streamer.quick_runs, fs.streamer.executions
    sql, want = text(4)
    assert ask(sql)[1] == want
    assert fs.streamer.quick_runs == quick + 1 and fs.streamer.executions == runs + 1
    assert fs.streamer.held_runs()["held"] == 0 and _released(fs)

    overruns, runs = fs.streamer.quick_overruns, fs.streamer.executions
    sql, want = text(15_000)  # 2e8 pairs, a second or more of work: overruns the budget
    assert ask(sql)[1] == want
    assert fs.streamer.quick_overruns == overruns + 1
    assert fs.streamer.executions == runs + 2  # interrupted at the budget, run again by DoGet
    wait_until(lambda: _released(fs), what="the slots released")

    quick, runs = fs.streamer.quick_runs, fs.streamer.executions
    sql, want = text(14_999)
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert fs.streamer.held_runs()["running"] == 1  # no longer quick: handed over
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert int(table.column("c")[0].as_py()) == want
    assert fs.streamer.quick_runs == quick and fs.streamer.executions == runs + 1
    wait_until(lambda: _released(fs), what="the run released")


def test_a_parameterized_text_run_again_is_quick(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``?`` text the guard answers from its text cache has no shape template: its speed is
    remembered by its text, so from its second run on it runs on GetFlightInfo's thread."""
    monkeypatch.setattr(fs.streamer, "INFO_RUN_SECONDS", 0.3)
    client = server.flight()
    sql = f"SELECT ?::BIGINT + {next(_fresh)} AS v"
    got = []
    for value in (1, 2, 3):
        quick = fs.streamer.quick_runs
        info = client.get_flight_info(cmd(kind="query", sql=sql, params=[value]), opts)
        got.append(client.do_get(info.endpoints[0].ticket, opts).read_all().column("v")[0].as_py())
        if value > 1:
            assert fs.streamer.quick_runs == quick + 1
    assert got == [int(sql.split("+ ")[1].split(" ")[0]) + v for v in (1, 2, 3)]
    assert _released(fs)
