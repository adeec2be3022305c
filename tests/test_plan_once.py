"""Plan once (issue #10): GetFlightInfo of a ``query`` command runs the query once, under the
admission path, and when the head of its result is the whole result its DoGet streams that
result from memory — no ``LIMIT 0`` probe, no second planning pass. A result larger than the
head and a failing query are left to DoGet, as before; a query slower than GetFlightInfo's
budget goes on running and is handed over to its ticket's DoGet (tests/test_handover.py). Wire contract: proto_docs/tickets.md (rule 5), proto_docs/descriptors.md.

Real servers on ephemeral ports, real pyarrow.flight clients; the counters read are the
server's own (``Planner.probes``, ``Streamer.executions``, the result cache's stats).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_server.ready import ReadyPool
from flight_server.server import QuiverFlightServer
from tests.harness import FakeClock, Server, call_options, error_info, start_server, wait_until

_fresh = itertools.count(1)


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("planonce"), limits={"query_timeout_seconds": 2})
    yield s
    s.stop()


@pytest.fixture
def fs(server: Server) -> QuiverFlightServer:
    return server.flight_service


@pytest.fixture
def opts(server: Server) -> flight.FlightCallOptions:
    assert server.demo_token is not None
    return call_options(server.demo_token)


def counters(fs: QuiverFlightServer) -> tuple[int, int]:
    return fs.planner.probes, fs.streamer.executions


def test_fresh_point_query_is_planned_once(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    k = 1000 + next(_fresh)
    sql = f"SELECT order_id, amount FROM demo.orders WHERE order_id = {k}"
    probes, runs = counters(fs)
    misses = fs.cache.stats().misses
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert counters(fs) == (probes, runs + 1)  # run at GetFlightInfo, no LIMIT 0 probe
    assert fs.cache.stats().misses == misses + 1
    got = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert counters(fs) == (probes, runs + 1)  # DoGet streamed the held result
    assert got.schema == info.schema
    with server.catalog.db.reading() as cur:
        want = cur.sql(sql).to_arrow_table()
    assert got.equals(want) and got.num_rows == 1
    # The same text again: a result-cache hit at GetFlightInfo (schema) and DoGet (rows).
    hits = fs.cache.stats().hits
    again = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert client.do_get(again.endpoints[0].ticket, opts).read_all().equals(want)
    assert counters(fs) == (probes, runs + 1)
    assert fs.cache.stats().hits == hits + 1
    # GetSchema still never runs the query: it probes.
    assert client.get_schema(cmd(kind="query", sql=sql + " "), opts).schema == info.schema
    assert counters(fs) == (probes + 1, runs + 1)


def test_volatile_ticket_streams_the_held_result_once_then_reruns(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    sql = f"SELECT range AS i, random() AS r FROM range({100 + next(_fresh)})"
    taken = fs.streamer.ready.stats()["taken"]
    probes, runs = counters(fs)
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    ticket = info.endpoints[0].ticket
    first = client.do_get(ticket, opts).read_all()
    assert counters(fs) == (probes, runs + 1) and fs.streamer.ready.stats()["taken"] == taken + 1
    second = client.do_get(ticket, opts).read_all()  # a query ticket runs the query again
    assert counters(fs) == (probes, runs + 2)
    assert first.schema == second.schema == info.schema
    assert first.column("i").equals(second.column("i"))
    assert first.column("r").to_pylist() != second.column("r").to_pylist()  # really run again


def test_cut_result_read_whole_at_info_is_flagged_on_its_stream(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = start_server(tmp_path_factory.mktemp("planonce-cut"), limits={"max_rows": 1000})
    try:
        assert s.demo_token is not None and s.runtime.flight is not None
        opts, client = call_options(s.demo_token), s.flight()
        info = client.get_flight_info(cmd(kind="query", sql="SELECT random() AS r FROM range(5000)"), opts)
        assert json.loads(info.app_metadata)["truncated"] is None
        reader = client.do_get(info.endpoints[0].ticket, opts)
        chunks = []
        while True:
            try:
                chunks.append(reader.read_chunk())
            except StopIteration:
                break
        assert sum(c.data.num_rows for c in chunks) == 1000
        last = json.loads(chunks[-1].app_metadata.to_pybytes())
        assert last == {"truncated": True, "max_rows": 1000, "reason": "server_max_rows"}
        assert s.runtime.flight.streamer.ready.stats()["taken"] >= 1
    finally:
        s.stop()


def test_large_result_is_left_to_doget_and_probed_next_time(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    n = 2_000_000 + next(_fresh)
    sql = f"SELECT range AS i FROM range({n})"  # 16 MB: more than the head
    probes, runs = counters(fs)
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert counters(fs) == (probes, runs + 1)
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().num_rows == n
    assert counters(fs) == (probes, runs + 2)  # DoGet ran it: the head was not the whole result
    # The planner remembers the shape: the next GetFlightInfo probes instead of running it.
    client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert counters(fs) == (probes + 1, runs + 2)
    assert not fs.admission.active()


def test_slow_query_is_handed_over_and_times_out_at_doget(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    """A query slower than GetFlightInfo's budget is not interrupted there: GetFlightInfo
    answers (the schema from the binder: DuckDB has no reader yet) while the run goes on in its
    slot, and the ticket's DoGet takes it over — run once. The query timeout (2 s here) counts
    from GetFlightInfo and is answered at DoGet as DEADLINE_EXCEEDED; then the slot is free."""
    client = server.flight()
    sql = (
        f"SELECT count(*) AS n FROM range(1000000) a, range({1_000_000 + next(_fresh)}) b "
        "WHERE (a.range * b.range) % 7 = 3"
    )
    probes, runs = counters(fs)
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert info.schema.names == ["n"]
    assert counters(fs) == (probes + 1, runs + 1)  # started, still running, probed
    assert fs.admission.streams() == 1  # the run holds its slot
    with pytest.raises(flight.FlightError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "DEADLINE_EXCEEDED"
    assert counters(fs) == (probes + 1, runs + 1)  # DoGet took the run over: not run again
    wait_until(lambda: fs.admission.streams() == 0, what="the slot released")
    assert not fs.admission.active()


def test_failing_query_still_fails_at_doget_with_its_code(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    before = fs.cache.stats().entries
    info = client.get_flight_info(
        cmd(kind="query", sql=f"SELECT {next(_fresh)} AS a, 'x'::INTEGER AS b"), opts
    )
    assert info.schema.names == ["a", "b"]
    with pytest.raises(flight.FlightServerError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "INVALID_ARGUMENT"
    assert fs.cache.stats().entries == before and not fs.admission.active()


def test_failed_values_do_not_mark_a_parameterized_text(
    server: Server, fs: QuiverFlightServer, opts: flight.FlightCallOptions
) -> None:
    """A parameterized text shares the planner's "large or slow" verdict with every value of
    its parameter types. One run that fails (or is starved on a loaded machine) says nothing
    about the next value: the values after it are still run once, at GetFlightInfo, and
    streamed from the held result — not probed and re-run at DoGet for a minute. Nor do
    several in a row: only a result larger than the head marks a text (a slow run is handed
    over to DoGet, so nothing needs remembering)."""
    client = server.flight()
    k = next(_fresh)
    sql = f"SELECT CAST(? AS INTEGER) + {k} AS x"

    def failing() -> None:
        info = client.get_flight_info(cmd(kind="query", sql=sql, params=["nope"]), opts)
        with pytest.raises(flight.FlightError) as caught:
            client.do_get(info.endpoints[0].ticket, opts).read_all()
        assert error_info(caught.value)["code"] == "INVALID_ARGUMENT"

    def value(v: int) -> tuple[int, int]:
        """(runs, results streamed from the one GetFlightInfo held) for one value."""
        runs, taken = fs.streamer.executions, fs.streamer.ready.stats()["taken"]
        info = client.get_flight_info(cmd(kind="query", sql=sql, params=[str(v)]), opts)
        table = client.do_get(info.endpoints[0].ticket, opts).read_all()
        assert table.column("x").to_pylist() == [v + k]
        return fs.streamer.executions - runs, fs.streamer.ready.stats()["taken"] - taken

    assert value(1) == (1, 1)
    failing()
    for v in (2, 3, 4):
        assert value(v) == (1, 1)  # run once at GetFlightInfo, DoGet streamed the held result
    failing()
    failing()  # twice in a row: still not marked
    assert value(5) == (1, 1)
    assert not fs.admission.active()


def test_concurrent_fresh_queries_each_get_their_own_rows(server: Server, fs: QuiverFlightServer) -> None:
    """Eight agents (threads), each GetFlightInfo + DoGet of fresh point queries at once: every answer is
    its own query's row, and afterwards no slot and no held result is left."""
    client_errors: list[BaseException] = []
    base = 5000 + next(_fresh) * 100

    tokens = [call_options(server.mint("agent", "demo", f"planonce-{n}")) for n in range(8)]

    def agent(n: int) -> None:
        client, opts = server.flight(), tokens[n]
        try:
            for j in range(10):
                k = base + n * 10 + j
                info = client.get_flight_info(
                    cmd(kind="query", sql=f"SELECT {k} AS k, {k} * 2 AS twice"), opts
                )
                got = client.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
                assert got == [{"k": k, "twice": 2 * k}], (k, got)
        except BaseException as e:  # reported by the main thread
            client_errors.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not client_errors, client_errors[0]
    assert not fs.admission.active() and fs.admission.streams() == 0
    assert fs.streamer.ready.stats()["bytes"] == 0


def test_concurrent_values_of_one_parameterized_text_some_failing(
    server: Server, fs: QuiverFlightServer
) -> None:
    """Eight agents (threads) send values of one parameterized text at once, every third one
    failing at run time: each failure is INVALID_ARGUMENT at DoGet, each other answer is its own
    value's row — whatever the planner concluded about the text meanwhile — and afterwards no
    slot and no held result is left."""
    client_errors: list[BaseException] = []
    k = next(_fresh)
    sql = f"SELECT CAST(? AS INTEGER) * 2 + {k} AS x"
    tokens = [call_options(server.mint("agent", "demo", f"planonce-p{n}")) for n in range(8)]

    def agent(n: int) -> None:
        client, opts = server.flight(), tokens[n]
        try:
            for j in range(9):
                v = n * 100 + j
                value = "bad" if j % 3 == 2 else str(v)
                info = client.get_flight_info(cmd(kind="query", sql=sql, params=[value]), opts)
                if value == "bad":
                    try:
                        client.do_get(info.endpoints[0].ticket, opts).read_all()
                    except flight.FlightError as e:
                        assert error_info(e)["code"] == "INVALID_ARGUMENT", e
                    else:
                        raise AssertionError(f"{value!r} did not fail")
                else:
                    got = client.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist()
                    assert got == [{"x": 2 * v + k}], (v, got)
        except BaseException as e:  # reported by the main thread
            client_errors.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not client_errors, client_errors[0]
    assert not fs.admission.active() and fs.admission.streams() == 0
    assert fs.streamer.ready.stats()["bytes"] == 0


def test_ready_pool_is_bounded_and_drops_unredeemed_results() -> None:
    batch = pa.record_batch({"v": pa.array(range(100), pa.int64())})
    clock = FakeClock()
    pool = ReadyPool(ttl_seconds=300.0, budget_bytes=2 * batch.nbytes, clock=clock)
    expired = pool.hold(batch.schema, [batch], batch.nbytes, False)
    assert expired is not None
    clock.advance(300.0)  # its ticket has expired
    # The next hold drops the expired, unredeemed one (its DoGet would run the query).
    held = pool.hold(batch.schema, [batch], batch.nbytes, False)
    assert held is not None and expired.take() is None
    assert pool.stats()["bytes"] == batch.nbytes
    assert pool.hold(batch.schema, [batch], batch.nbytes, False) is not None
    assert pool.hold(batch.schema, [batch], batch.nbytes, False) is None  # the budget is full
    assert pool.stats()["refused"] == 1
    taken = held.take()
    assert taken is not None and taken[0].equals(batch) and held.take() is None
    assert pool.stats()["bytes"] == batch.nbytes
