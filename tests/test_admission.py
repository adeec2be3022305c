"""The admission path on a real server (flight_server/admission.py): every RPC that plans or
runs agent SQL takes a slot — per principal and globally — and runs under the query timeout;
copies of one ticket's stream count one by one; planning is refused like running."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.harness import Server, call_options, error_info, start_server
from tests.test_dataplane import cmd, refused, schema_refused

# A result that streams for a long time: a client that reads one batch holds its stream open.
LONG = "SELECT range AS v FROM range(200000000)"


def action(client: flight.FlightClient, name: str, body: Any, opts: flight.FlightCallOptions) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return json.loads(next(iter(client.do_action(flight.Action(name, raw), opts))).body.to_pybytes())


def hold(client: flight.FlightClient, ticket: flight.Ticket, opts: flight.FlightCallOptions) -> Any:
    """Open the stream of ``ticket`` and read one batch: the stream stays running."""
    reader = client.do_get(ticket, opts)
    reader.read_chunk()
    return reader


def long_ticket(client: flight.FlightClient, opts: flight.FlightCallOptions) -> flight.Ticket:
    return client.get_flight_info(cmd(kind="query", sql=LONG), opts).endpoints[0].ticket


def wait_idle(server: Server) -> None:
    from tests.test_dataplane_limits import _wait_idle

    _wait_idle(server)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("admission"),
        limits={"max_concurrent_queries": 2, "max_concurrent_total": 3, "admission_wait_seconds": 0.5},
    )
    yield s
    s.stop()


# --- defect: the cap counted FlightInfos, not streams -------------------------------------------------
def test_one_ticket_redeemed_at_once_counts_every_copy(gated: Server) -> None:
    """Six concurrent DoGets of one query ticket (each re-runs the query): two run, four are
    refused, and /v1/status counts the two streams."""
    opts = call_options(gated.mint("agent", "demo", "reuser"))
    client = gated.flight()
    ticket = long_ticket(client, opts)
    held, refusals = [], []
    try:
        for _ in range(6):
            try:
                held.append(hold(client, ticket, opts))
            except flight.FlightServerError as e:
                refusals.append(error_info(e))
        assert len(held) == 2 and len(refusals) == 4
        assert {r["code"] for r in refusals} == {"RESOURCE_EXHAUSTED"}
        assert all("limit is 2 per principal" in r["detail"] for r in refusals)
        status = gated.http().get("/v1/status").json()["queries"]
        assert status["streaming"] == 2 and status["queries"] == 2
        assert status["limits"]["max_concurrent_total"] == 3
    finally:
        for reader in held:
            reader.cancel()
    wait_idle(gated)
    assert gated.http().get("/v1/status").json()["queries"]["streaming"] == 0


def test_distinct_endpoints_of_one_flightinfo_still_share_a_slot(gated: Server) -> None:
    """A parallel scan is one query: its endpoints together take one slot."""
    opts = call_options(gated.mint("agent", "demo", "scanner"))
    client = gated.flight()
    held = hold(client, long_ticket(client, opts), opts)  # one of the two slots
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), opts)
        readers = [client.do_get(e.ticket, opts) for e in info.endpoints]
        assert sum(r.read_all().num_rows for r in readers) == 50_000
    finally:
        held.cancel()
    wait_idle(gated)


# --- defect: planning ran outside the gate ------------------------------------------------------------
def test_planning_is_admitted_on_every_rpc_that_plans(gated: Server) -> None:
    """With both of a principal's slots running, GetFlightInfo, GetSchema and submit-query of
    a new SQL text are refused before DuckDB binds anything, and nothing is queued."""
    opts = call_options(gated.mint("agent", "demo", "planner"))
    client = gated.flight()
    flight_server = gated.runtime.flight
    assert flight_server is not None
    held = [hold(client, long_ticket(client, opts), opts) for _ in range(2)]
    queued_before = flight_server.queries.stats()
    try:
        refused(
            client,
            opts,
            lambda: client.get_flight_info(cmd(kind="query", sql="SELECT 41 AS fresh_text"), opts),
            flight.FlightServerError,
            "RESOURCE_EXHAUSTED",
            "max_concurrent_queries",
        )
        schema_refused(
            client,
            opts,
            lambda: client.get_schema(cmd(kind="query", sql="SELECT 42 AS fresh_text"), opts),
            "RESOURCE_EXHAUSTED",
            "max_concurrent_queries",
        )
        refused(
            client,
            opts,
            lambda: action(client, "submit-query", {"sql": "SELECT 43 AS fresh_text"}, opts),
            flight.FlightServerError,
            "RESOURCE_EXHAUSTED",
            "max_concurrent_queries",
        )
        assert flight_server.queries.stats() == queued_before
    finally:
        for reader in held:
            reader.cancel()
    wait_idle(gated)
    # Once the slots are free the same texts plan and run.
    info = client.get_flight_info(cmd(kind="query", sql="SELECT 41 AS fresh_text"), opts)
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().column(0).to_pylist() == [41]


def test_the_global_bound_refuses_after_its_wait(gated: Server) -> None:
    """Three streams of two principals fill the server (max_concurrent_total = 3): a third
    principal waits admission_wait_seconds, then gets RESOURCE_EXHAUSTED; its own share is
    untouched, so it is served once a stream ends."""
    a, b, c = (call_options(gated.mint("agent", "demo", name)) for name in ("ga", "gb", "gc"))
    client = gated.flight()
    ticket = client.get_flight_info(cmd(kind="query", sql="SELECT 7 AS seven"), c).endpoints[0].ticket
    held = [hold(client, long_ticket(client, a), a) for _ in range(2)]
    held.append(hold(client, long_ticket(client, b), b))
    try:
        # Planning a new text is admitted globally too.
        refused(
            client,
            c,
            lambda: client.get_flight_info(cmd(kind="query", sql="SELECT 9 AS nine"), c),
            flight.FlightServerError,
            "RESOURCE_EXHAUSTED",
            "max_concurrent_total = 3",
        )
        detail = refused(
            client,
            c,
            lambda: client.do_get(ticket, c).read_all(),
            flight.FlightServerError,
            "RESOURCE_EXHAUSTED",
            "max_concurrent_total = 3",
        )
        assert "retry" in detail
    finally:
        for reader in held:
            reader.cancel()
    wait_idle(gated)
    assert client.do_get(ticket, c).read_all().column(0).to_pylist() == [7]


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("admission-wait"),
        limits={"max_concurrent_total": 1, "admission_wait_seconds": 60},
    )
    yield s
    s.stop()


def test_a_call_over_the_global_bound_waits_for_a_slot(patient: Server) -> None:
    """Back-pressure, not an error: a burst beyond the bound is served as slots free up."""
    a, b = (
        call_options(patient.mint("agent", "demo", "pa")),
        call_options(patient.mint("agent", "demo", "pb")),
    )
    client = patient.flight()
    flight_server = patient.runtime.flight
    assert flight_server is not None
    ticket = client.get_flight_info(cmd(kind="query", sql="SELECT 8 AS eight"), b).endpoints[0].ticket
    held = hold(client, long_ticket(client, a), a)
    got: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: got.setdefault("rows", client.do_get(ticket, b).read_all()))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # still waiting: the one slot is taken
    held.cancel()
    waiter.join(30)
    assert not waiter.is_alive() and got["rows"].column(0).to_pylist() == [8]
    assert flight_server.admission.streams() == 0


# --- status ----------------------------------------------------------------------------------------
def test_status_shows_the_admission_limits(gated: Server) -> None:
    limits = gated.http().get("/v1/status").json()["queries"]["limits"]
    assert limits == {
        "query_timeout_seconds": 30.0,
        "max_concurrent_queries": 2,
        "max_concurrent_total": 3,
        "max_rows": 10_000_000,
        "swarms_with_limits": 0,
    }


# --- defect: values built from constants while planning (critical) ---------------------------------
CONSTANT_HEAVY = [
    "SELECT length(range(150000000)) AS v",
    "SELECT length(repeat('x', 1000000000)) AS v",
    "SELECT length(repeat(repeat('x', 100000), 100000)) AS v",
    "SELECT length(lpad('x', 1000000000, 'y')) AS v",
    "SELECT length(printf('%1000000000d', 1)) AS v",
    "WITH t AS (SELECT 1000000000 AS n) SELECT length(repeat('x', (SELECT n FROM t))) AS v",
    "SELECT length(repeat('x', CAST('1000000000' AS INTEGER))) AS v",
]


def test_values_built_from_constants_are_refused_before_anything_is_planned(server: Server) -> None:
    """One GetFlightInfo of ``length(range(150000000))`` once OOM-killed a 4 GiB server:
    DuckDB builds such values while binding, outside memory_limit and the interrupt. Every
    RPC that plans refuses them first, and the process's peak memory does not move."""
    import resource

    client, opts = server.flight(), call_options(server.demo_token)
    flight_server = server.runtime.flight
    assert flight_server is not None
    queued_before = flight_server.queries.stats()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for sql in CONSTANT_HEAVY:
        with pytest.raises(flight.FlightError) as caught:
            client.get_flight_info(cmd(kind="query", sql=sql), opts)
        assert error_info(caught.value)["code"] in ("PERMISSION_DENIED", "INVALID_ARGUMENT"), sql
        with pytest.raises(pa.ArrowException) as schema:  # GetSchema's form of a refusal (errors.py)
            client.get_schema(cmd(kind="query", sql=sql), opts)
        assert (
            str(schema.value)
            .removeprefix("Unknown error: ")
            .startswith(("PERMISSION_DENIED: ", "INVALID_ARGUMENT: "))
        )
        with pytest.raises(flight.FlightError) as submitted:
            action(client, "submit-query", {"sql": sql}, opts)
        assert error_info(submitted.value)["code"] in ("PERMISSION_DENIED", "INVALID_ARGUMENT"), sql
    assert flight_server.queries.stats() == queued_before
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert grown < 256 * 1024**2, f"peak memory grew by {grown / 1024**2:.0f} MiB"
