"""Property-based tests of what the Flight listener decodes: commands and action bodies, random
shapes, random nesting, random bytes. Whatever arrives, only a coded refusal comes out — a
``QuiverError`` from the decoders, a ``FlightError`` with ``extra_info`` on the wire — never a
traceback, never INTERNAL, and the detail stays bounded."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.flight as flight
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import QuiverError
from flight_server import commands
from tests.harness import DETAIL_BOUND, Server, call_options, client_error_info

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
kinds = st.sampled_from(["query", "sample", "profile", "result", "nope", ""]) | st.text(max_size=10)
fields = st.sampled_from(
    ["sql", "params", "max_rows", "table", "rows", "percent", "method", "seed", "columns", "id"]
)
commands_json = st.builds(
    lambda kind, body: {"kind": kind, **body},
    kinds,
    st.dictionaries(fields | st.text(max_size=8), json_values, max_size=5),
)


def nested(depth: int, opener: str) -> bytes:
    closer = {"[": "]", "{": "}"}[opener]
    inner = '{"a": ' if opener == "{" else "["
    return (inner * depth + "1" + closer * depth).encode()


deep_bytes = st.builds(nested, st.integers(0, 4000), st.sampled_from(["[", "{"]))
raw_commands = (
    st.binary(max_size=200)
    | commands_json.map(lambda c: json.dumps(c).encode())
    | deep_bytes
    | st.builds(
        lambda depth: b'{"kind": "query", "sql": "SELECT ?", "params": [' + nested(depth, "[") + b"]}",
        st.integers(0, 3000),
    )
)


@settings(max_examples=400, deadline=None)
@given(raw_commands)
def test_decoding_a_command_returns_a_command_or_a_quiver_error(raw: bytes) -> None:
    try:
        decoded = commands.decode_command(raw)
    except QuiverError as e:
        assert e.code == "INVALID_ARGUMENT" and len(e.detail) <= DETAIL_BOUND
    else:
        assert isinstance(
            decoded,
            commands.QueryCommand | commands.SampleCommand | commands.ProfileCommand | commands.ResultCommand,
        )


BODY_TYPES = (commands.QueryCommand, commands.QueryIdBody, commands.RefreshBody)


@settings(max_examples=400, deadline=None)
@given(
    raw=raw_commands
    | st.dictionaries(fields | st.text(max_size=8), json_values, max_size=5).map(
        lambda d: json.dumps(d).encode()
    ),
    body=st.sampled_from(BODY_TYPES),
)
def test_decoding_an_action_body_returns_its_struct_or_a_quiver_error(raw: bytes, body: type[Any]) -> None:
    """The one action-body decoder (commands.decode_body): the Struct, or INVALID_ARGUMENT
    with a bounded detail."""
    try:
        decoded = commands.decode_body(raw, body, "some-action")
    except QuiverError as e:
        assert e.code == "INVALID_ARGUMENT" and len(e.detail) <= DETAIL_BOUND
    else:
        assert isinstance(decoded, body)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | deep_bytes)
def test_json_depth_never_fails(raw: bytes) -> None:
    assert commands.json_depth(raw) >= 0


# --- on the wire ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wire(server: Server) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
    return server.flight(), call_options(server.demo_token)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_commands)
def test_get_flight_info_answers_a_plan_or_a_coded_refusal(
    wire: tuple[flight.FlightClient, flight.FlightCallOptions], raw: bytes
) -> None:
    client, opts = wire
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_command(raw), opts)
    except flight.FlightError as e:
        client_error_info(e)
    else:
        assert info.schema is not None


action_names = st.sampled_from(
    ["submit-query", "query-status", "cancel-query", "refresh-token", "whoami"]
) | st.text(max_size=300)
action_bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(
        st.sampled_from(["sql", "params", "id", "max_rows", "ttl_seconds"]), json_values, max_size=3
    ).map(lambda v: json.dumps(v).encode())
    | deep_bytes
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=action_names, body=action_bodies)
def test_do_action_answers_json_or_a_coded_refusal(
    wire: tuple[flight.FlightClient, flight.FlightCallOptions], name: str, body: bytes
) -> None:
    client, opts = wire
    if name == "refresh-token":  # would rotate the demo token the other tests use
        name = "refresh-token-not-sent"
    try:
        results = list(client.do_action(flight.Action(name, body), opts))
    except flight.FlightError as e:
        client_error_info(e)
    else:
        for result in results:
            json.loads(result.body.to_pybytes())
