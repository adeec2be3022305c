"""Property-based tests of what Flight SQL decodes (flight_server/flight_sql/wire.py) and of the
Flight SQL RPCs on the wire: random bytes, random type URLs, random message bytes under every
type URL Quiver knows, random filters and actions. Whatever arrives, only a coded refusal comes
out — never a traceback, never INTERNAL — and the detail stays bounded."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog import QuiverError
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.flight_sql import wire
from tests.harness import DETAIL_BOUND, Server, call_options, client_error_info

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it


type_names = st.sampled_from(sorted(wire.MESSAGES)) | st.text(max_size=40)
prefixes = st.sampled_from([wire.TYPE_PREFIX, "type.googleapis.com/", "", "x/arrow.flight.protocol.sql."])
packed_random = st.builds(
    lambda prefix, name, value: any_pb2.Any(type_url=prefix + name, value=value).SerializeToString(),
    prefixes,
    type_names,
    st.binary(max_size=120),
)
raw_messages = st.binary(max_size=200) | packed_random


@settings(max_examples=500, deadline=None)
@given(raw_messages)
def test_unpack_returns_a_message_or_invalid_argument(raw: bytes) -> None:
    try:
        message = wire.unpack(raw)
    except QuiverError as e:
        assert e.code == "INVALID_ARGUMENT" and len(e.detail) <= DETAIL_BOUND
    else:
        assert isinstance(message, Message)
        assert type(message).DESCRIPTOR.name in wire.MESSAGES


@settings(max_examples=200, deadline=None)
@given(raw_messages)
def test_unwrap_ticket_never_fails_but_with_invalid_argument(raw: bytes) -> None:
    try:
        assert isinstance(wire.unwrap_ticket(raw), bytes)
    except QuiverError as e:
        assert e.code == "INVALID_ARGUMENT"


# --- on the wire ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rpc(server: Server) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
    return server.flight(), call_options(server.demo_token)


def packed(message: Message) -> bytes:
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


texts = st.text(max_size=30) | st.sampled_from(["%", "_", "demo", "d%", "\\", "%\\", "orders", "ORD%"])
valid_commands = st.one_of(
    st.builds(
        lambda c, s, t, types, inc: pb.CommandGetTables(
            catalog=c,
            db_schema_filter_pattern=s,
            table_name_filter_pattern=t,
            table_types=types,
            include_schema=inc,
        ),
        texts,
        texts,
        texts,
        st.lists(st.sampled_from(["TABLE", "VIEW", "x", ""]), max_size=3),
        st.booleans(),
    ),
    st.builds(lambda c, s: pb.CommandGetDbSchemas(catalog=c, db_schema_filter_pattern=s), texts, texts),
    st.builds(lambda info: pb.CommandGetSqlInfo(info=info), st.lists(st.integers(0, 2**32 - 1), max_size=5)),
    st.builds(lambda d: pb.CommandGetXdbcTypeInfo(data_type=d), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda t: pb.CommandGetPrimaryKeys(table=t), texts),
    st.builds(lambda q: pb.CommandStatementQuery(query=q), st.text(max_size=60)),
    st.builds(
        lambda h: pb.CommandPreparedStatementQuery(prepared_statement_handle=h), st.binary(max_size=60)
    ),
).map(packed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_messages | valid_commands)
def test_get_flight_info_answers_a_plan_or_a_coded_refusal(
    rpc: tuple[flight.FlightClient, flight.FlightCallOptions], raw: bytes
) -> None:
    client, opts = rpc
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_command(raw), opts)
    except flight.FlightError as e:
        client_error_info(e)
    else:
        assert info.schema is not None
        for endpoint in info.endpoints:
            try:
                client.do_get(endpoint.ticket, opts).read_all()
            except flight.FlightError as e:
                client_error_info(e)


actions = st.sampled_from(
    [
        "CreatePreparedStatement",
        "ClosePreparedStatement",
        "CancelFlightInfo",
        "CloseSession",
        "BeginTransaction",
        "CancelQuery",
        "SetSessionOptions",
    ]
)
bodies = raw_messages | st.builds(
    lambda q: packed(pb.ActionCreatePreparedStatementRequest(query=q)), st.text(max_size=60)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=actions, body=bodies)
def test_flight_sql_actions_answer_or_refuse_with_a_code(
    rpc: tuple[flight.FlightClient, flight.FlightCallOptions], name: str, body: bytes
) -> None:
    client, opts = rpc
    try:
        list(client.do_action(flight.Action(name, body), opts))
    except flight.FlightError as e:
        client_error_info(e)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_messages | valid_commands, values=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))
def test_do_put_refuses_with_a_code(
    rpc: tuple[flight.FlightClient, flight.FlightCallOptions], raw: bytes, values: list[int]
) -> None:
    client, opts = rpc
    table = pa.table({"0": pa.array(values, pa.int64())})
    try:
        writer, reader = client.do_put(flight.FlightDescriptor.for_command(raw), table.schema, opts)
        writer.write_table(table)
        writer.done_writing()
        reader.read()
        writer.close()
    except flight.FlightError as e:
        client_error_info(e)
