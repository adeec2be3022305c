"""Client mistakes that once reached the server as INTERNAL or overflowed gRPC's headers: each
is now a coded refusal with a bounded detail, and the server keeps serving.

Covered: commands, parameters and action bodies nested thousands deep (RecursionError in the
decoders), result types nested deeper than Arrow carries, megabyte error texts (DuckDB quoting
``$1000000``; long action names and query ids echoed), and a PATH descriptor that is not
UTF-8 (refused by gRPC itself: see proto_docs/errors.md)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.flight as flight
import pytest

from catalog.errors import MAX_DETAIL_CHARS
from tests.harness import Server, call_options, error_info
from tests.test_dataplane import raw, refused, schema_refused, still_serving

#: Longest detail a client can get: the cap plus the "… (N more characters)" suffix.
DETAIL_BOUND = MAX_DETAIL_CHARS + 40


@pytest.fixture(scope="module")
def client(server: Server) -> flight.FlightClient:
    return server.flight()


@pytest.fixture(scope="module")
def opts(server: Server) -> flight.FlightCallOptions:
    return call_options(server.demo_token)


def nested_list(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def query_command(sql: str, params: str = "[]") -> bytes:
    return f'{{"kind": "query", "sql": {json.dumps(sql)}, "params": {params}}}'.encode()


def action(client: flight.FlightClient, name: str, body: bytes, opts: flight.FlightCallOptions) -> Any:
    return list(client.do_action(flight.Action(name, body), opts))


DEEP_COMMANDS = [
    pytest.param(query_command("SELECT ? AS v", "[" + nested_list(5000) + "]"), id="params-5000-deep"),
    pytest.param(query_command("SELECT ? AS v", "[" + nested_list(40) + "]"), id="params-40-deep"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, id="array-100000-deep"),
    pytest.param(
        b'{"kind": "query", "sql": "SELECT 1", "x": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3001, id="objects"
    ),
]


@pytest.mark.parametrize("body", DEEP_COMMANDS)
def test_deeply_nested_commands_are_invalid_argument(
    client: flight.FlightClient, opts: flight.FlightCallOptions, body: bytes
) -> None:
    detail = refused(
        client,
        opts,
        lambda: client.get_flight_info(raw(body), opts),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
    )
    assert "levels deep" in detail and len(detail) <= DETAIL_BOUND
    schema_refused(
        client, opts, lambda: client.get_schema(raw(body), opts), "INVALID_ARGUMENT", "levels deep"
    )


def test_parameters_nested_within_the_bound_still_bind(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    info = client.get_flight_info(raw(query_command("SELECT ? AS v", "[" + nested_list(8) + "]")), opts)
    value = client.do_get(info.endpoints[0].ticket, opts).read_all().column("v")[0].as_py()
    for _ in range(8):
        value = value[0]
    assert value == 1


@pytest.mark.parametrize("name", ["submit-query", "query-status", "cancel-query", "refresh-token"])
def test_deeply_nested_action_bodies_are_invalid_argument(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions, name: str
) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    before = flight_server.queries.stats()
    body = b'{"sql": "SELECT 1", "params": [' + nested_list(5000).encode() + b"]}"
    detail = refused(
        client, opts, lambda: action(client, name, body, opts), flight.FlightServerError, "INVALID_ARGUMENT"
    )
    assert "levels deep" in detail
    assert flight_server.queries.stats() == before  # nothing queued


def test_result_types_nested_deeper_than_arrow_are_invalid_argument(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    sql = f"SELECT {nested_list(70)} AS x"
    detail = refused(
        client,
        opts,
        lambda: client.get_flight_info(raw(query_command(sql)), opts),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "nested more than 64 levels",
    )
    assert len(detail) <= DETAIL_BOUND
    schema_refused(
        client,
        opts,
        lambda: client.get_schema(raw(query_command(sql)), opts),
        "INVALID_ARGUMENT",
        "64 levels",
    )
    flight_server = server.runtime.flight
    assert flight_server is not None
    before = flight_server.queries.stats()
    refused(
        client,
        opts,
        lambda: action(client, "submit-query", json.dumps({"sql": sql}).encode(), opts),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "64 levels",
    )
    assert flight_server.queries.stats() == before
    # Within Arrow's bound the same shape works.
    info = client.get_flight_info(raw(query_command(f"SELECT {nested_list(20)} AS x")), opts)
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().num_rows == 1


# --- bounded error text -------------------------------------------------------------------------------
def test_a_huge_parameter_reference_gets_a_short_coded_error(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    """``$1000000`` made DuckDB write 7.9 MB of error; gRPC dropped it and the client saw no code."""
    body = query_command("SELECT $1000000 AS v", "[1]")
    with pytest.raises(flight.FlightError) as caught:
        client.get_flight_info(raw(body), opts)
    info = error_info(caught.value)
    assert info["code"] in ("INVALID_ARGUMENT", "PERMISSION_DENIED")
    assert len(info["detail"]) <= DETAIL_BOUND
    still_serving(client, opts)


def test_long_action_names_and_ids_are_not_echoed_whole(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    detail = refused(
        client,
        opts,
        lambda: action(client, "x" * 100_000, b"", opts),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
    )
    assert "unknown action" in detail and "more characters" in detail and len(detail) <= DETAIL_BOUND
    for name in ("query-status", "cancel-query"):
        body = json.dumps({"id": "q" * 100_000}).encode()
        detail = refused(
            client,
            opts,
            lambda body=body, name=name: action(client, name, body, opts),
            flight.FlightServerError,
            "NOT_FOUND",
        )
        assert len(detail) <= DETAIL_BOUND
    body = json.dumps({"id": "q_x", "y" * 100_000: 1}).encode()
    detail = refused(
        client,
        opts,
        lambda: action(client, "query-status", body, opts),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
    )
    assert len(detail) <= DETAIL_BOUND


def test_long_sql_errors_are_bounded(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    """DuckDB quotes the caller's SQL in its messages; the detail stays short."""
    sql = "SELECT " + " + ".join(["nope_column"] * 5000)
    with pytest.raises(flight.FlightError) as caught:
        client.get_flight_info(raw(query_command(sql)), opts)
    assert len(error_info(caught.value)["detail"]) <= DETAIL_BOUND
    still_serving(client, opts)


# --- a PATH that is not UTF-8 -------------------------------------------------------------------------
def test_a_path_descriptor_that_is_not_utf8_does_not_hurt_the_server(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    """gRPC's own protobuf parser refuses the request before Quiver sees it (string fields must
    be UTF-8), so the status is gRPC's, without Quiver's extra_info; the server keeps serving
    and no traceback is sent."""
    with pytest.raises(flight.FlightError) as caught:
        client.get_flight_info(flight.FlightDescriptor.for_path(b"\xff\xfe", b"x"), opts)
    assert "Traceback" not in str(caught.value)
    still_serving(client, opts)
