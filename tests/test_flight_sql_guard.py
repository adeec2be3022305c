"""The allowlist and the SQL guard hold through Flight SQL exactly as through JSON commands:
the project's escape corpus (tests/test_sqlguard.py, on its own tables) runs against one real
server both ways — a ``{"kind": "query"}`` command, a Flight SQL ``CommandStatementQuery`` and
a Flight SQL ``CreatePreparedStatement`` (what the ADBC driver sends) — and every statement
gets the same answer on every path, with nothing written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from flight_server.flight_sql import flight_sql_pb2 as pb
from tests.harness import Server, call_options, error_info, start_server
from tests.test_sqlguard import FUNCTION_ESCAPES, MALFORMED, SETUP, STATEMENTS, TABLE_ESCAPES

# (family, SQL, the code the guard gives it: the corpus's own expectation)
CORPUS = (
    [("table", sql, "PERMISSION_DENIED") for sql, _ in TABLE_ESCAPES]
    + [("function", sql, cls.code) for sql, cls, _ in FUNCTION_ESCAPES]
    + [("statement", sql, "PERMISSION_DENIED") for sql, _ in STATEMENTS]
    + [("malformed", sql, "INVALID_ARGUMENT") for sql, _ in MALFORMED]
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("flightsql-guard"), demo=False)
    with s.catalog.db.transaction() as cur:
        cur.execute(SETUP)
    http = s.http()
    assert http.post("/v1/swarms", json={"name": "analysts", "tables": ["demo.*"]}).status_code == 201
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> flight.FlightClient:
    return server.flight()


@pytest.fixture(scope="module")
def opts(server: Server) -> flight.FlightCallOptions:
    return call_options(server.mint("agent", "analysts", "guard-a1"))


def packed(message: Message) -> bytes:
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def outcome(call: Any) -> tuple[str, Any]:
    """("OK", rows) or (code, detail)."""
    try:
        return "OK", call()
    except flight.FlightError as e:
        info = error_info(e)
        return info["code"], info["detail"]


def fetch(
    client: flight.FlightClient, descriptor: flight.FlightDescriptor, opts: flight.FlightCallOptions
) -> Any:
    info = client.get_flight_info(descriptor, opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints]).to_pylist()


def tables_digest(server: Server) -> list[Any]:
    with server.catalog.db.reading() as cur:
        return cur.execute(
            "SELECT schema_name, table_name, estimated_size FROM duckdb_tables() ORDER BY ALL"
        ).fetchall()


@pytest.mark.parametrize(
    ("family", "sql", "code"), CORPUS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(CORPUS)]
)
def test_the_guard_holds_the_same_through_flight_sql(
    server: Server,
    client: flight.FlightClient,
    opts: flight.FlightCallOptions,
    family: str,
    sql: str,
    code: str,
) -> None:
    before = tables_digest(server)
    as_json = outcome(
        lambda: fetch(
            client,
            flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql}).encode()),
            opts,
        )
    )
    as_statement = outcome(
        lambda: fetch(
            client, flight.FlightDescriptor.for_command(packed(pb.CommandStatementQuery(query=sql))), opts
        )
    )
    body = packed(pb.ActionCreatePreparedStatementRequest(query=sql))
    as_prepared = outcome(
        lambda: list(client.do_action(flight.Action("CreatePreparedStatement", body), opts))
    )
    assert as_json[0] != "OK", f"the corpus statement was accepted: {sql}"
    assert as_statement == as_json
    assert as_prepared == as_json
    assert as_json[0] == code, (family, as_json)
    assert tables_digest(server) == before


def test_the_corpus_is_the_guard_tests_own() -> None:
    assert len(CORPUS) >= 100
