"""Per-call costs that concurrent agents share: the stream watcher asks gRPC about calls that
have lasted a poll interval only, not about every DoGet as it starts (flight_server/running.py),
and a started server's objects are out of the garbage collector's full passes
(quiver/runtime.py ``_freeze_startup_objects``). Both hold the GIL while they work; the rest
of the watcher's contract (a client that left is interrupted) is tested in
tests/test_flight_sql.py and tests/test_running_queries.py."""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

import pyarrow.flight as flight

from tests.harness import Server, call_options, start_server


def test_racing_point_queries_are_not_polled_by_the_stream_watcher(server: Server) -> None:
    """Eight agents race 25 point queries each. Their DoGets stream a result read at
    GetFlightInfo and end at once: the watcher (running throughout) asks about far fewer of
    them than there were — it used to be woken by every DoGet and ask each new call."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    tokens = [server.mint(agent=f"watch-{n}") for n in range(8)]  # a principal each: 4 at once
    before = flight_server.running.polls
    dogets = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def agent(n: int) -> None:
        nonlocal dogets
        client = flight.FlightClient(server.flight_url)
        opts = call_options(tokens[n])
        try:
            for i in range(25):
                sql = f"SELECT customer_id FROM demo.customers WHERE customer_id = {n * 100 + i + 1}"
                body = json.dumps({"kind": "query", "sql": sql}).encode()
                info = client.get_flight_info(flight.FlightDescriptor.for_command(body), opts)
                for endpoint in info.endpoints:
                    assert client.do_get(endpoint.ticket, opts).read_all().num_rows == 1
                    with lock:
                        dogets += 1
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors[:1]
    assert dogets == 200
    assert flight_server.running.polls - before < dogets // 2


def test_a_started_server_freezes_its_objects_and_a_stop_unfreezes_them(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data")
    try:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # modules, the catalog, both listeners
        http = srv.http()
        assert http.get("/healthz").status_code == 200  # requests run as before
    finally:
        srv.stop()
    assert gc.get_freeze_count() == 0


def test_a_lone_agent_s_dogets_do_not_wake_the_stream_watcher(server: Server) -> None:
    """One agent's point queries, one after the other: each DoGet starts on an idle server.
    The watcher lingers between them in poll-sized waits and is not woken by each DoGet (it
    used to be: a thread switch per query), so it wakes on its own clock — about once per poll
    interval — far fewer times than there were DoGets. Its contract is unchanged: a stream
    tracked meanwhile is still listed and cancellable (tests/test_running_queries.py)."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    client = flight.FlightClient(server.flight_url)
    opts = call_options(server.mint(agent="lone"))
    try:
        # A first query starts the watcher; the count starts after it.
        body = json.dumps({"kind": "query", "sql": "SELECT 1 AS one"}).encode()
        info = client.get_flight_info(flight.FlightDescriptor.for_command(body), opts)
        client.do_get(info.endpoints[0].ticket, opts).read_all()
        before = flight_server.running.wakes
        dogets = 0
        for i in range(150):
            sql = f"SELECT customer_id FROM demo.customers WHERE customer_id = {i % 50 + 1}"
            body = json.dumps({"kind": "query", "sql": sql, "params": []}).encode()
            info = client.get_flight_info(flight.FlightDescriptor.for_command(body), opts)
            for endpoint in info.endpoints:
                assert client.do_get(endpoint.ticket, opts).read_all().num_rows == 1
                dogets += 1
        assert dogets == 150
        assert flight_server.running.wakes - before < dogets // 2
    finally:
        client.close()
