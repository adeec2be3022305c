"""Limits on a real server: the query timeout really interrupts DuckDB while others are served,
and the per-principal concurrency cap refuses, then frees, slots."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow.flight as flight
import pytest

from quiver_client import QuiverClient, QuiverClientError
from tests.harness import SMALL_SPLIT, Server, call_options, error_info, start_server, wait_until

# A blocking aggregate over a 10^12-row cross join: hours of work if nothing stops it.
RUNAWAY = "SELECT count(*) AS n FROM range(1000000) a, range(1000000) b WHERE (a.range * b.range) % 7 = 3"
# The same cross join streamed: rows trickle out, so the interrupt comes mid-stream.
# random() makes it volatile, so it bypasses the result cache (and its Python tee).
TRICKLE_VOLATILE = (
    "SELECT a.range AS x, b.range AS y, random() AS r FROM range(1000000) a, range(1000000) b "
    "WHERE (a.range * b.range) % 1000003 = 1"
)
TRICKLE = "SELECT a.range AS x, b.range AS y FROM range(1000000) a, range(1000000) b WHERE (a.range * b.range) % 1000003 = 1"


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("timeouts"), limits={"query_timeout_seconds": 2, "max_rows": 100_000}
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("capped"), limits={"max_concurrent_queries": 2}, flight=SMALL_SPLIT
    )
    yield s
    s.stop()


def _wait_idle(server: Server, timeout: float = 20.0) -> None:
    """Until no stream holds a concurrency slot (the server frees it when the call ends)."""
    assert server.runtime.flight is not None
    admission = server.runtime.flight.admission
    wait_until(lambda: not admission.active(), timeout, what="every stream's slot to be freed")


# --- timeout ----------------------------------------------------------------------------------------
def test_runaway_query_is_interrupted_while_others_are_served(slow: Server) -> None:
    runaway_opts = call_options(slow.mint("agent", "demo", "runaway"))
    client = slow.flight()
    info = client.get_flight_info(cmd(kind="query", sql=RUNAWAY), runaway_opts)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            client.do_get(info.endpoints[0].ticket, runaway_opts).read_all()
            outcome["error"] = None
        except flight.FlightError as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    other, opts = slow.flight(), call_options(slow.demo_token)
    served_meanwhile = 0
    while thread.is_alive():
        got = other.get_flight_info(cmd(kind="query", sql="SELECT count(*) AS n FROM demo.orders"), opts)
        assert other.do_get(got.endpoints[0].ticket, opts).read_all().column("n")[0].as_py() == 20_000
        served_meanwhile += 1
    thread.join()
    assert served_meanwhile >= 1
    err = outcome["error"]
    assert type(err) is flight.FlightTimedOutError, repr(err)
    info_ = error_info(err)
    assert info_["code"] == "DEADLINE_EXCEEDED" and "query_timeout_seconds" in info_["detail"]
    _wait_idle(slow)
    # DuckDB really stopped: the server answers at once and holds no stream for the query.
    assert other.do_get(
        other.get_flight_info(cmd(kind="query", sql="SELECT 1 AS one"), opts).endpoints[0].ticket, opts
    )


def test_timeout_mid_stream_through_the_cache_is_deadline_exceeded(slow: Server) -> None:
    client, opts = slow.flight(), call_options(slow.demo_token)
    info = client.get_flight_info(cmd(kind="query", sql=TRICKLE), opts)
    with pytest.raises(flight.FlightTimedOutError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "DEADLINE_EXCEEDED"
    _wait_idle(slow)


def test_timeout_mid_stream_of_a_volatile_query(slow: Server) -> None:
    """Not cached, but under the row cap like every query: its head is read in the handler and
    the rest streamed through the cap's cut (flight_server/streams.py), so the interrupt is a
    coded DEADLINE_EXCEEDED for a raw client too; the Quiver client names it the same."""
    client, opts = slow.flight(), call_options(slow.demo_token)
    info = client.get_flight_info(cmd(kind="query", sql=TRICKLE_VOLATILE), opts)
    with pytest.raises(flight.FlightTimedOutError) as caught:
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert error_info(caught.value)["code"] == "DEADLINE_EXCEEDED"
    assert "Traceback" not in str(caught.value)
    assert slow.demo_token is not None  # a demo server
    with QuiverClient(slow.flight_url, slow.demo_token) as qc, pytest.raises(QuiverClientError) as typed:
        qc.query(TRICKLE_VOLATILE)
    assert typed.value.code == "DEADLINE_EXCEEDED"
    _wait_idle(slow)


def test_samples_and_profiles_are_under_the_timeout_too(slow: Server) -> None:
    client, opts = slow.flight(), call_options(slow.demo_token)
    info = client.get_flight_info(
        cmd(kind="sample", table="demo.events", rows=10, method="random", seed=1), opts
    )
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().num_rows == 10
    assert slow.runtime.flight is not None
    assert slow.runtime.flight.admission.active() == {}


# --- concurrency cap --------------------------------------------------------------------------------
def _hold(client: flight.FlightClient, opts: flight.FlightCallOptions) -> flight.FlightStreamReader:
    """A stream that stays open: a large result of which the client reads one batch."""
    info = client.get_flight_info(cmd(kind="query", sql="SELECT range AS v FROM range(200000000)"), opts)
    reader = client.do_get(info.endpoints[0].ticket, opts)
    reader.read_chunk()
    return reader


def test_concurrency_cap_per_principal(capped: Server) -> None:
    alice = call_options(capped.mint("agent", "demo", "alice"))
    bob = call_options(capped.mint("agent", "demo", "bob"))
    client = capped.flight()
    info = client.get_flight_info(cmd(kind="query", sql="SELECT 1 AS one"), alice)
    held = [_hold(client, alice), _hold(client, alice)]
    try:
        with pytest.raises(flight.FlightServerError) as caught:
            client.do_get(info.endpoints[0].ticket, alice).read_all()
        assert error_info(caught.value)["code"] == "RESOURCE_EXHAUSTED"
        assert "limit is 2 per principal" in error_info(caught.value)["detail"]
        # Planning is admitted the same way: a new query is not even planned.
        with pytest.raises(flight.FlightServerError) as planning:
            client.get_flight_info(cmd(kind="query", sql="SELECT 3 AS not_planned_yet"), alice)
        assert error_info(planning.value)["code"] == "RESOURCE_EXHAUSTED"
        # Another principal is not affected.
        other = client.get_flight_info(cmd(kind="query", sql="SELECT 2 AS two"), bob)
        assert client.do_get(other.endpoints[0].ticket, bob).read_all().num_rows == 1
    finally:
        for reader in held:
            reader.cancel()
    # The slots are freed when the streams end (here: cancelled by the client).
    _wait_idle(capped)
    assert client.do_get(info.endpoints[0].ticket, alice).read_all().num_rows == 1


def test_endpoints_of_one_flightinfo_share_one_slot(capped: Server) -> None:
    alice = call_options(capped.mint("agent", "demo", "alice2"))
    client = capped.flight()
    held = _hold(client, alice)  # one of the two slots
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), alice)
        assert len(info.endpoints) >= 3
        readers = [client.do_get(e.ticket, alice) for e in info.endpoints]  # all open at once
        assert sum(r.read_all().num_rows for r in readers) == 50_000
    finally:
        held.cancel()
    _wait_idle(capped)


# --- the server's row cap -----------------------------------------------------------------------------
def test_the_server_row_cap_is_cut_from_the_stream(slow: Server) -> None:
    """Without max_rows, [limits] max_rows (100,000 here) is cut from the stream rather than
    wrapped around the SQL: a result read whole in the handler, and one streamed on."""
    client, opts = slow.flight(), call_options(slow.demo_token)
    for sql in (
        "SELECT range AS i FROM range(150000)",  # ~1 MB: cut while the handler reads its head
        "SELECT range AS i, repeat('x', 60) AS s FROM range(300000)",  # cut while streaming
    ):
        for _ in range(2):  # the second time from the result cache: the same rows
            info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
            got = client.do_get(info.endpoints[0].ticket, opts).read_all()
            assert got.num_rows == 100_000
            assert got.column("i").to_pylist() == list(range(100_000))
        explicit = client.get_flight_info(cmd(kind="query", sql=sql, max_rows=7), opts)
        assert client.do_get(explicit.endpoints[0].ticket, opts).read_all().num_rows == 7
    _wait_idle(slow)


def test_queries_after_a_timeout_run_normally(slow: Server) -> None:
    """Cursors are reused between requests; one whose query was interrupted never is."""
    client, opts = slow.flight(), call_options(slow.demo_token)
    info = client.get_flight_info(cmd(kind="query", sql=TRICKLE), opts)
    with pytest.raises(flight.FlightTimedOutError):
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    for i in range(20):
        info = client.get_flight_info(cmd(kind="query", sql="SELECT ? * 2 AS v", params=[i]), opts)
        assert client.do_get(info.endpoints[0].ticket, opts).read_all().column("v").to_pylist() == [2 * i]
    _wait_idle(slow)
