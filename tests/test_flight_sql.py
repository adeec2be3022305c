"""Flight SQL on the Flight port (proto_docs/flight-sql.md) through the real ADBC Flight SQL
driver and through raw pyarrow.flight calls, against a real server: queries, parameters,
metadata, partitions, pandas, read-only refusals, bad input, principal-bound handles,
CancelFlightInfo, and threads racing the same endpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from catalog import TableRef
from catalog.tables import TableCatalog
from flight_server.flight_sql import flight_sql_pb2 as pb
from tests.harness import Server, call_options, error_info, start_server, wait_until

AUTH = "adbc.flight.sql.authorization_header"
LONG_QUERY = "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE (a.range * b.range) % 7 = 3"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A long query timeout, so that only CancelFlightInfo stops the long query.
    s = start_server(tmp_path_factory.mktemp("flightsql"), limits={"query_timeout_seconds": 120})
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA secret")
        cur.execute("CREATE TABLE secret.salaries AS SELECT range AS id, range * 1000 AS pay FROM range(10)")
        TableCatalog.bump_version(cur, TableRef("secret", "salaries"))
    yield s
    s.stop()


def connect(server: Server, token: str | None = None, **kwargs: Any) -> Any:
    token = token if token is not None else server.demo_token
    return flight_sql.connect(
        server.flight_url, db_kwargs={AUTH: f"Bearer {token}"}, autocommit=True, **kwargs
    )


@pytest.fixture(scope="module")
def conn(server: Server) -> Iterator[Any]:
    c = connect(server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def client(server: Server) -> flight.FlightClient:
    return server.flight()


@pytest.fixture(scope="module")
def opts(server: Server) -> flight.FlightCallOptions:
    return call_options(server.demo_token)


def packed(message: Message) -> bytes:
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def sql_cmd(message: Message) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(packed(message))


def fetch(
    client: flight.FlightClient, descriptor: flight.FlightDescriptor, opts: flight.FlightCallOptions
) -> pa.Table:
    info = client.get_flight_info(descriptor, opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def refusal(call: Any) -> tuple[type[BaseException], str, str]:
    try:
        call()
    except flight.FlightError as e:
        info = error_info(e)
        return type(e), info["code"], info["detail"]
    raise AssertionError("expected a refusal")


def order_count(server: Server) -> int:
    with server.catalog.db.reading() as cur:
        return int(cur.execute("SELECT count(*) FROM demo.orders").fetchone()[0])  # type: ignore[index]


# --- the ADBC driver ------------------------------------------------------------------------------
def test_execute_fetch_arrow_table_and_fetchall(conn: Any, server: Server) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 42 AS answer, 'x' AS letter")
        assert cur.fetch_arrow_table().to_pylist() == [{"answer": 42, "letter": "x"}]
        cur.execute("SELECT count(*) AS n FROM demo.orders")
        assert cur.fetchall() == [(order_count(server),)]
        cur.execute("SELECT order_id FROM demo.orders ORDER BY order_id LIMIT 3")
        assert [r[0] for r in cur.fetchall()] == [1, 2, 3]


def test_parameters(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT order_id, status FROM demo.orders WHERE order_id = ?", (7,))
        assert [r[0] for r in cur.fetchall()] == [7]
        cur.execute("SELECT ? + 1 AS n, ?::VARCHAR AS s", (41, "hello"))
        assert cur.fetchall() == [(42, "hello")]
        # The same prepared text, new values: each execute binds its own.
        for i in (3, 5, 8):
            cur.execute("SELECT order_id FROM demo.orders WHERE order_id = ?", (i,))
            assert cur.fetchall() == [(i,)]


def test_a_large_result_streams_whole(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT * FROM demo.events")
        table = cur.fetch_arrow_table()
    assert table.num_rows == 50_000


def test_get_objects_lists_only_what_the_caller_may_read(conn: Any) -> None:
    objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
    assert [c["catalog_name"] for c in objects] == ["quiver"]
    schemas = {s["db_schema_name"]: s for s in objects[0]["catalog_db_schemas"]}
    assert set(schemas) == {"demo"}  # secret.salaries exists, but is not the agent's to see
    tables = {t["table_name"]: t for t in schemas["demo"]["db_schema_tables"]}
    assert {"orders", "customers", "events"} <= set(tables)
    columns = [c["column_name"] for c in tables["orders"]["table_columns"]]
    assert columns[:2] == ["order_id", "customer_id"]
    # Patterns: % and _ as in SQL LIKE.
    filtered = conn.adbc_get_objects(depth="tables", table_name_filter="ord_r%").read_all().to_pylist()
    names = [t["table_name"] for s in filtered[0]["catalog_db_schemas"] for t in s["db_schema_tables"]]
    assert names == ["orders"]


def test_get_table_schema_types_and_info(conn: Any, server: Server) -> None:
    schema = conn.adbc_get_table_schema("orders", db_schema_filter="demo")
    with server.catalog.db.reading() as cur:
        expected = cur.sql("SELECT * FROM demo.orders LIMIT 0").to_arrow_table().schema
    assert schema.names == expected.names
    assert [f.type for f in schema] == [f.type for f in expected]
    assert conn.adbc_get_table_types() == ["TABLE"]
    info = conn.adbc_get_info()
    assert info["vendor_name"] == "Quiver"
    assert info["vendor_arrow_version"] == pa.__version__
    assert info["vendor_version"]
    # A table the agent may not read is absent, exactly like one that does not exist.
    with pytest.raises(adbc_driver_manager.Error):
        conn.adbc_get_table_schema("salaries", db_schema_filter="secret")


def test_execute_schema_and_prepare(conn: Any) -> None:
    with conn.cursor() as cur:
        schema = cur.adbc_execute_schema("SELECT order_id, status FROM demo.orders")
        assert schema.names == ["order_id", "status"]
        parameters = cur.adbc_prepare("SELECT order_id FROM demo.orders WHERE order_id = ? AND status = ?")
        assert len(parameters) == 2


def test_execute_partitions(conn: Any) -> None:
    with conn.cursor() as cur:
        partitions, schema = cur.adbc_execute_partitions(
            "SELECT order_id FROM demo.orders WHERE order_id < 4"
        )
        assert schema.names == ["order_id"]
        rows = []
        for partition in partitions:
            cur.adbc_read_partition(partition)
            rows += [r[0] for r in cur.fetchall()]
    assert sorted(rows) == [1, 2, 3]


def test_pandas_read_sql(conn: Any) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.read_sql("SELECT order_id, status FROM demo.orders ORDER BY order_id LIMIT 5", conn)
    assert list(frame.columns) == ["order_id", "status"]
    assert frame["order_id"].tolist() == [1, 2, 3, 4, 5]


def test_polars_read_database(conn: Any) -> None:
    pl = pytest.importorskip("polars")
    frame = pl.read_database(
        "SELECT order_id, status FROM demo.orders ORDER BY order_id LIMIT 5", connection=conn
    )
    assert frame.columns == ["order_id", "status"]
    assert frame["order_id"].to_list() == [1, 2, 3, 4, 5]


def test_no_token_is_unauthenticated(server: Server) -> None:
    bare = flight_sql.connect(server.flight_url, autocommit=True)
    try:
        with bare.cursor() as cur, pytest.raises(adbc_driver_manager.Error) as e:
            cur.execute("SELECT 1")
        assert "UNAUTHENTICATED" in str(e.value) or "Unauthenticated" in str(e.value)
    finally:
        bare.close()
    with (
        connect(server, token="not-a-token") as bad,
        bad.cursor() as cur,
        pytest.raises(adbc_driver_manager.Error),
    ):
        cur.execute("SELECT 1")


def test_writes_are_refused_and_change_nothing(conn: Any, server: Server) -> None:
    before = order_count(server)
    with conn.cursor() as cur:
        for sql in (
            "INSERT INTO demo.orders (order_id) VALUES (999999)",
            "DELETE FROM demo.orders",
            "CREATE TABLE demo.x AS SELECT 1",
            "BEGIN TRANSACTION",
        ):
            with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
                cur.execute(sql)
            assert "read-only" in str(e.value), str(e.value)
            assert "Traceback" not in str(e.value)
        # executemany is ADBC's update path (CommandPreparedStatementUpdate): refused too.
        with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
            cur.executemany("SELECT ? AS v", [(1,), (2,)])
        assert "Quiver is read-only" in str(e.value)
    assert order_count(server) == before


def test_forbidden_tables_are_refused_like_json_commands(conn: Any) -> None:
    with conn.cursor() as cur:
        for sql in ("SELECT * FROM secret.salaries", "SELECT * FROM secret.nope"):
            with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
                cur.execute(sql)
            assert "not readable: not in your allowlist or does not exist" in str(e.value)


def test_ingest_never_touches_a_warehouse_table(conn: Any, server: Server) -> None:
    """Ingest saves a new artefact (tests/test_flight_sql_ingest.py); appending to a warehouse
    table is refused and the table is unchanged."""
    data = pa.table({"order_id": [1, 2]})
    before = order_count(server)
    with conn.cursor() as cur, pytest.raises(adbc_driver_manager.Error) as e:
        cur.adbc_ingest("orders", data, mode="append", db_schema_name="demo")
    assert "artefacts are immutable" in str(e.value), str(e.value)
    assert order_count(server) == before  # nothing replaced or appended
    with server.catalog.db.reading() as cur2:
        assert cur2.execute("SELECT count(*) FROM demo.orders WHERE order_id IN (1, 2)").fetchone() == (2,)


# --- raw Flight SQL over pyarrow.flight: the wire itself -----------------------------------------
def test_statement_query_round_trip(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    descriptor = sql_cmd(pb.CommandStatementQuery(query="SELECT 1 AS one"))
    info = client.get_flight_info(descriptor, opts)
    ticket = any_pb2.Any()
    ticket.ParseFromString(info.endpoints[0].ticket.ticket)
    assert ticket.type_url == "type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery"
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist() == [{"one": 1}]
    assert client.get_schema(descriptor, opts).schema.names == ["one"]
    # The row cap is reported as for a JSON query command.
    assert json.loads(info.app_metadata)["reason"] == "server_max_rows"


def test_json_commands_are_unchanged(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps({"kind": "query", "sql": "SELECT 2 AS two"}).encode()
    )
    info = client.get_flight_info(descriptor, opts)
    assert info.endpoints[0].ticket.ticket.startswith(b"qv1.")
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().to_pylist() == [{"two": 2}]


def test_sql_info_is_a_dense_union(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    wanted = [
        pb.FLIGHT_SQL_SERVER_NAME,
        pb.FLIGHT_SQL_SERVER_READ_ONLY,
        pb.FLIGHT_SQL_SERVER_TRANSACTION,
        pb.FLIGHT_SQL_SERVER_BULK_INGESTION,
        pb.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED,
        9999,
    ]
    table = fetch(client, sql_cmd(pb.CommandGetSqlInfo(info=wanted)), opts)
    assert table.schema.field("info_name").type == pa.uint32()
    assert pa.types.is_union(table.schema.field("value").type)
    assert table.schema.field("value").type.mode == "dense"
    values = dict(zip(table.column("info_name").to_pylist(), table.column("value").to_pylist(), strict=True))
    assert values == {
        pb.FLIGHT_SQL_SERVER_NAME: "Quiver",
        pb.FLIGHT_SQL_SERVER_READ_ONLY: True,
        pb.FLIGHT_SQL_SERVER_TRANSACTION: pb.SQL_SUPPORTED_TRANSACTION_NONE,
        pb.FLIGHT_SQL_SERVER_BULK_INGESTION: True,  # ingest saves a new artefact
        pb.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED: False,
    }  # 9999 is not a code Quiver knows: no row
    everything = fetch(client, sql_cmd(pb.CommandGetSqlInfo()), opts)
    assert pb.FLIGHT_SQL_SERVER_CANCEL in everything.column("info_name").to_pylist()


def test_metadata_listings(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    assert fetch(client, sql_cmd(pb.CommandGetCatalogs()), opts).to_pylist() == [{"catalog_name": "quiver"}]
    schemas = fetch(client, sql_cmd(pb.CommandGetDbSchemas(db_schema_filter_pattern="%")), opts)
    assert schemas.column("db_schema_name").to_pylist() == ["demo"]
    tables = fetch(
        client, sql_cmd(pb.CommandGetTables(db_schema_filter_pattern="de_o", include_schema=True)), opts
    )
    assert "salaries" not in tables.column("table_name").to_pylist()
    orders = tables.filter(pa.compute.equal(tables.column("table_name"), "orders"))
    schema = pa.ipc.read_schema(pa.py_buffer(orders.column("table_schema")[0].as_py()))
    assert schema.names[0] == "order_id"
    meta = schema.field("amount").metadata
    assert meta[b"ARROW:FLIGHT:SQL:TYPE_NAME"] == b"DECIMAL(12,2)"  # DuckDB's name, as JDBC tools show it
    assert (meta[b"ARROW:FLIGHT:SQL:PRECISION"], meta[b"ARROW:FLIGHT:SQL:SCALE"]) == (b"12", b"2")
    assert meta[b"ARROW:FLIGHT:SQL:TABLE_NAME"] == b"orders"
    assert schema.field("status").metadata[b"ARROW:FLIGHT:SQL:TYPE_NAME"] == b"VARCHAR"
    assert fetch(client, sql_cmd(pb.CommandGetTables(catalog="other")), opts).num_rows == 0
    assert fetch(client, sql_cmd(pb.CommandGetTables(table_types=["VIEW"])), opts).num_rows == 0
    assert fetch(client, sql_cmd(pb.CommandGetTables(table_name_filter_pattern="ORDERS")), opts).num_rows == 1
    assert (
        fetch(client, sql_cmd(pb.CommandGetTables(table_name_filter_pattern="ord\\_rs")), opts).num_rows == 0
    )
    assert fetch(client, sql_cmd(pb.CommandGetTableTypes()), opts).to_pylist() == [{"table_type": "TABLE"}]
    types = fetch(client, sql_cmd(pb.CommandGetXdbcTypeInfo()), opts)
    assert "VARCHAR" in types.column("type_name").to_pylist()
    assert types.column("data_type").to_pylist() == sorted(types.column("data_type").to_pylist())
    only = fetch(client, sql_cmd(pb.CommandGetXdbcTypeInfo(data_type=pb.XDBC_BIGINT)), opts)
    assert only.column("type_name").to_pylist() == ["BIGINT"]
    for message in (
        pb.CommandGetPrimaryKeys(table="orders"),
        pb.CommandGetExportedKeys(table="orders"),
        pb.CommandGetImportedKeys(table="orders"),
        pb.CommandGetCrossReference(pk_table="customers", fk_table="orders"),
    ):
        keys = fetch(client, sql_cmd(message), opts)
        assert keys.num_rows == 0
        assert "key_sequence" in keys.schema.names
        assert client.get_schema(sql_cmd(message), opts).schema == keys.schema


def test_an_admin_sees_every_schema(server: Server, client: flight.FlightClient) -> None:
    admin = call_options(server.admin_token)
    names = fetch(client, sql_cmd(pb.CommandGetDbSchemas()), admin).column("db_schema_name").to_pylist()
    assert names == ["demo", "secret"]  # never _quiver


def test_a_withdrawn_permission_hides_columns_at_do_get(server: Server, client: flight.FlightClient) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "fsql-narrow", "tables": ["demo.*"]}).status_code == 201
    token = server.mint("agent", "fsql-narrow", "n1")
    opts = call_options(token)
    info = client.get_flight_info(sql_cmd(pb.CommandGetTables(include_schema=True)), opts)
    assert (
        http.put("/v1/swarms/fsql-narrow/allowlist", json={"tables": ["demo.customers"]}).status_code == 200
    )
    _cls, code, _ = refusal(lambda: client.do_get(info.endpoints[0].ticket, opts).read_all())
    assert code == "PERMISSION_DENIED"
    names = fetch(client, sql_cmd(pb.CommandGetTables()), opts).column("table_name").to_pylist()
    assert names == ["customers"]


BAD_COMMANDS: list[tuple[bytes, str]] = [
    (b"\n\x7ftype.googleapis.com/arrow.flight.protocol.sql.X", "not a valid protobuf Any"),
    (b"\n\x2etype.googleapis.com/arrow.flight.protocol.sql.", "is not supported by Quiver"),
    (packed(pb.CommandGetCatalogs())[:-1] + b"\xff", "not a valid"),
    (
        any_pb2.Any(
            type_url="type.googleapis.com/arrow.flight.protocol.sql.CommandNope", value=b""
        ).SerializeToString(),
        "is not supported by Quiver",
    ),
    (
        any_pb2.Any(
            type_url="type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery",
            value=b"\x0a\xff\xff",
        ).SerializeToString(),
        "not a valid CommandStatementQuery",
    ),
    (packed(pb.TicketStatementQuery(statement_handle=b"x")), "not a command for GetFlightInfo"),
    (packed(pb.CommandStatementQuery(query="")), "field 'sql' is empty"),
    (packed(pb.CommandStatementQuery(query="SELEC 1")), "syntax error"),
    (
        packed(pb.CommandPreparedStatementQuery(prepared_statement_handle=b"qv1.nope")),
        "unknown, expired or retired prepared statement handle",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), BAD_COMMANDS, ids=range(len(BAD_COMMANDS)))
def test_bad_commands_get_clear_errors(
    client: flight.FlightClient, opts: flight.FlightCallOptions, server: Server, raw: bytes, expected: str
) -> None:
    tickets = len(server.runtime.flight.tickets) if server.runtime.flight else 0
    _cls, code, detail = refusal(
        lambda: client.get_flight_info(flight.FlightDescriptor.for_command(raw), opts)
    )
    assert code in ("INVALID_ARGUMENT", "NOT_FOUND"), (code, detail)
    assert expected in detail, detail
    assert len(detail) <= 600 and "Traceback" not in detail
    assert (len(server.runtime.flight.tickets) if server.runtime.flight else 0) == tickets


def test_updates_transactions_and_ingest_in_a_transaction_are_refused(
    client: flight.FlightClient, opts: flight.FlightCallOptions, server: Server
) -> None:
    before = order_count(server)

    def put(message: Message) -> None:
        writer, reader = client.do_put(sql_cmd(message), pa.schema([("x", pa.int64())]), opts)
        writer.write_table(pa.table({"x": [1]}))
        writer.done_writing()
        reader.read()
        writer.close()

    for message in (
        pb.CommandStatementUpdate(query="DELETE FROM demo.orders"),
        pb.CommandPreparedStatementUpdate(prepared_statement_handle=b"qv1.x"),
    ):
        cls, code, detail = refusal(lambda m=message: put(m))
        assert (cls, code) == (flight.FlightUnauthorizedError, "PERMISSION_DENIED")
        assert "Quiver is read-only" in detail
        cls, code, detail = refusal(lambda m=message: client.get_flight_info(sql_cmd(m), opts))
        assert code == "PERMISSION_DENIED" and "read-only" in detail
    ingest = pb.CommandStatementIngest(table="orders", schema="demo", transaction_id=b"t1")
    cls, code, detail = refusal(lambda: put(ingest))
    assert code == "PERMISSION_DENIED" and "read-only" in detail
    for name in ("BeginTransaction", "EndTransaction", "BeginSavepoint", "EndSavepoint"):
        cls, code, detail = refusal(lambda n=name: list(client.do_action(flight.Action(n, b""), opts)))
        assert code == "PERMISSION_DENIED" and "read-only" in detail
    query = pb.CommandStatementQuery(query="SELECT 1", transaction_id=b"t1")
    assert refusal(lambda: client.get_flight_info(sql_cmd(query), opts))[1] == "PERMISSION_DENIED"
    # A JSON command on DoPut is still refused as before.
    json_put = flight.FlightDescriptor.for_command(b'{"kind": "query", "sql": "SELECT 1"}')
    assert refusal(lambda: client.do_put(json_put, pa.schema([("x", pa.int64())]), opts)[1].read())[1] == (
        "INVALID_ARGUMENT"
    )
    assert order_count(server) == before


def create_prepared(
    client: flight.FlightClient, opts: flight.FlightCallOptions, sql: str
) -> pb.ActionCreatePreparedStatementResult:
    body = packed(pb.ActionCreatePreparedStatementRequest(query=sql))
    (result,) = client.do_action(flight.Action("CreatePreparedStatement", body), opts)
    wrapper = any_pb2.Any()
    wrapper.ParseFromString(result.body.to_pybytes())
    out = pb.ActionCreatePreparedStatementResult()
    assert wrapper.Unpack(out)
    return out


def bind(
    client: flight.FlightClient, opts: flight.FlightCallOptions, handle: bytes, table: pa.Table
) -> bytes:
    descriptor = sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=handle))
    writer, reader = client.do_put(descriptor, table.schema, opts)
    writer.write_table(table)
    writer.done_writing()
    answer = reader.read()
    writer.close()
    assert answer is not None
    result = pb.DoPutPreparedStatementResult()
    result.ParseFromString(answer.to_pybytes())  # raw bytes, not packed in Any
    return result.prepared_statement_handle


def test_prepared_statements_on_the_wire(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    prepared = create_prepared(client, opts, "SELECT order_id FROM demo.orders WHERE order_id = ?")
    assert pa.ipc.read_schema(pa.py_buffer(prepared.dataset_schema)).names == ["order_id"]
    assert len(pa.ipc.read_schema(pa.py_buffer(prepared.parameter_schema))) == 1
    handle = prepared.prepared_statement_handle
    query = sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=handle))
    _cls, code, detail = refusal(lambda: client.get_flight_info(query, opts))
    assert code == "INVALID_ARGUMENT" and "bind them first" in detail
    assert client.get_schema(query, opts).schema.names == ["order_id"]  # binds it, NULL for "?"
    # Bad binds: refused, and the handle is as it was.
    empty = pa.array([], pa.int64())
    for table, expected in (
        (pa.table({"0": [1, 2]}), "exactly one row"),
        (pa.table({"0": empty}), "exactly one row"),
        (pa.table({"0": [1], "1": [2]}), "takes 1 parameter"),
        (pa.table({"0": pa.chunked_array([empty] * 100 + [pa.array([1])])}), "more than 64 batches"),
        (pa.table({"0": ["x" * (2 << 20)]}), "more than 1048576 bytes"),
    ):
        _cls, code, detail = refusal(lambda t=table: bind(client, opts, handle, t))
        assert code == "INVALID_ARGUMENT" and expected in detail, detail
    bound = bind(client, opts, handle, pa.table({"0": [11]}))
    rows = fetch(client, sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=bound)), opts)
    assert rows.to_pylist() == [{"order_id": 11}]
    # A bind retires the handle it was given (the spec's stateless prepared statements) ...
    assert refusal(lambda: client.get_flight_info(query, opts))[1] == "NOT_FOUND"
    assert refusal(lambda: bind(client, opts, handle, pa.table({"0": [12]})))[1] == "NOT_FOUND"
    # ... and a bind of the new one answers a newer one again.
    rebound = bind(client, opts, bound, pa.table({"0": [12]}))
    assert fetch(
        client, sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=rebound)), opts
    ).to_pylist() == [{"order_id": 12}]
    bound = rebound
    # Bound to the principal: another agent's token cannot use it.
    other = call_options(server.mint("agent", "demo", "fsql-other"))
    bound_query = sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=bound))
    assert refusal(lambda: client.get_flight_info(bound_query, other))[1] == "PERMISSION_DENIED"
    # Closed: gone (closing again is harmless; another principal's close changes nothing).
    close = packed(pb.ActionClosePreparedStatementRequest(prepared_statement_handle=bound))
    assert list(client.do_action(flight.Action("ClosePreparedStatement", close), other)) == []
    assert fetch(client, bound_query, opts).num_rows == 1
    for _ in range(2):
        assert list(client.do_action(flight.Action("ClosePreparedStatement", close), opts)) == []
    assert refusal(lambda: client.get_flight_info(bound_query, opts))[1] == "NOT_FOUND"
    # A refused statement is refused at prepare, before any handle exists.
    _cls, code, _detail = refusal(lambda: create_prepared(client, opts, "SELECT * FROM secret.salaries"))
    assert code == "PERMISSION_DENIED"
    body = packed(pb.CommandGetCatalogs())
    _cls, code, detail = refusal(
        lambda: list(client.do_action(flight.Action("CreatePreparedStatement", body), opts))
    )
    assert code == "INVALID_ARGUMENT" and "ActionCreatePreparedStatementRequest" in detail


def test_close_session_and_list_actions(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    (result,) = client.do_action(flight.Action("CloseSession", b""), opts)
    status = pb.CloseSessionResult()
    status.ParseFromString(result.body.to_pybytes())
    assert status.status == pb.CloseSessionResult.CLOSED
    names = {a.type for a in client.list_actions(opts)}
    assert {"CreatePreparedStatement", "ClosePreparedStatement", "CancelFlightInfo", "CloseSession"} <= names


def test_every_flight_sql_rpc_needs_a_token(client: flight.FlightClient) -> None:
    anonymous = call_options(None)
    descriptor = sql_cmd(pb.CommandGetCatalogs())
    assert refusal(lambda: client.get_flight_info(descriptor, anonymous))[1] == "UNAUTHENTICATED"
    body = packed(pb.ActionCreatePreparedStatementRequest(query="SELECT 1"))
    assert refusal(lambda: list(client.do_action(flight.Action("CreatePreparedStatement", body), anonymous)))[
        1
    ] == ("UNAUTHENTICATED")


def test_cancel_flight_info_stops_a_running_query(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    info = client.get_flight_info(sql_cmd(pb.CommandStatementQuery(query=LONG_QUERY)), opts)
    outcome: list[Any] = []

    def read() -> None:
        try:
            client.do_get(info.endpoints[0].ticket, opts).read_all()
            outcome.append("finished")
        except flight.FlightError as e:
            outcome.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: flight_server.admission.streams() >= 1, what="the query's stream running")
    # Another agent cannot cancel it: the tickets are not theirs.
    other = call_options(server.mint("agent", "demo", "fsql-canceller"))
    body = pb.CancelFlightInfoRequest(info=info.serialize()).SerializeToString()
    assert refusal(lambda: list(client.do_action(flight.Action("CancelFlightInfo", body), other)))[1] == (
        "PERMISSION_DENIED"
    )
    (result,) = client.do_action(flight.Action("CancelFlightInfo", body), opts)
    status = pb.CancelFlightInfoResult()
    status.ParseFromString(result.body.to_pybytes())
    assert status.status == pb.CANCEL_STATUS_CANCELLED
    reader.join(30)
    assert not reader.is_alive()
    (error,) = outcome
    assert isinstance(error, flight.FlightCancelledError), error
    assert error_info(error)["code"] == "CANCELLED"
    wait_until(lambda: flight_server.admission.streams() == 0, what="the slot released")
    # The cancelled FlightInfo's tickets are refused, not run again.
    _cls, code, _ = refusal(lambda: client.do_get(info.endpoints[0].ticket, opts).read_all())
    assert code == "CANCELLED"
    bad = refusal(lambda: list(client.do_action(flight.Action("CancelFlightInfo", b"\xff\xff"), opts)))
    assert bad[1] == "INVALID_ARGUMENT"


def test_adbc_cancel_stops_the_running_query(server: Server) -> None:
    """The ADBC driver's cancel() cancels its gRPC call; the DoGet handler, blocked in DuckDB,
    must still stop the query (it used to run on until it finished, holding its slot)."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    abandoned = flight_server.running.abandoned
    with connect(server) as c, c.cursor() as cur:
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                cur.execute(LONG_QUERY)
                cur.fetchall()
            except BaseException as e:
                outcome.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        wait_until(lambda: flight_server.running._running, what="the query's DoGet running")
        cur.adbc_cancel()
        thread.join(30)
        assert outcome and "CANCELLED" in str(outcome[0]), outcome
    wait_until(lambda: flight_server.admission.streams() == 0, timeout=20, what="the query interrupted")
    assert flight_server.running.abandoned == abandoned + 1


def test_a_client_that_goes_away_stops_its_json_query(server: Server, client: flight.FlightClient) -> None:
    """Not Flight SQL only: a JSON command's DoGet whose client gives up (its deadline) is
    interrupted too, instead of running until the query timeout."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps({"kind": "query", "sql": LONG_QUERY}).encode()
    )
    info = client.get_flight_info(descriptor, call_options(server.demo_token))
    impatient = call_options(server.demo_token, timeout=1.0)
    with pytest.raises(flight.FlightTimedOutError):
        client.do_get(info.endpoints[0].ticket, impatient).read_all()
    wait_until(lambda: flight_server.admission.streams() == 0, timeout=20, what="the query interrupted")


def test_threads_race_prepare_bind_and_fetch(server: Server) -> None:
    errors: list[BaseException] = []
    # One agent per thread: a principal's own share is max_concurrent_queries (4), and six
    # threads of one principal would be refused by design (RESOURCE_EXHAUSTED).
    tokens = [server.mint("agent", "demo", f"fsql-race-{n}") for n in range(6)]

    def agent(n: int) -> None:
        try:
            with connect(server, token=tokens[n]) as c, c.cursor() as cur:
                for i in range(5):
                    key = n * 10 + i + 1
                    cur.execute("SELECT order_id FROM demo.orders WHERE order_id = ?", (key,))
                    assert cur.fetchall() == [(key,)]
                    cur.execute("SELECT count(*) FROM demo.customers")
                    assert cur.fetchall()[0][0] == 1000
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_readme_snippet_runs(server: Server, tmp_path: Path) -> None:
    """README.md's Flight SQL example, verbatim, in a fresh interpreter against the server."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- flightsql:start -->\n```python\n(.*?)```\n<!-- flightsql:end -->", readme, re.S)
    assert block, "README.md lost its flightsql markers"
    assert "adbc_driver_flightsql.dbapi.connect(" in block.group(1)
    assert '"adbc.flight.sql.authorization_header": f"Bearer {token}"' in block.group(1)
    token_file = tmp_path / "token"
    token_file.write_text(f"{server.demo_token}\n")
    env = {**os.environ, "QUIVER_URL": server.flight_url, "QUIVER_TOKEN_FILE": str(token_file)}
    run = subprocess.run(
        [sys.executable, "-c", block.group(1)], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "('" in run.stdout and "'customer_id': 1" in run.stdout, run.stdout
    assert "Warning" not in run.stderr, run.stderr


# --- LIKE patterns: the spec's filter semantics, in linear time --------------------------------
def test_like_patterns_match_duckdb_like() -> None:
    """Quiver's matcher agrees with DuckDB's own LIKE ... ESCAPE '\\' (ASCII-case-folded
    both sides) on generated names and patterns."""
    import duckdb
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from catalog.tables import fold
    from flight_server.flight_sql.metadata import like_match, like_pattern

    con = duckdb.connect()
    names = st.text(alphabet="abAB_%\\x", max_size=8)
    patterns = st.text(alphabet="aAbB_%\\x", max_size=8).filter(
        lambda p: not (len(p) - len(p.rstrip("\\"))) % 2  # DuckDB refuses a trailing lone escape
    )

    @settings(max_examples=400, deadline=None)
    @given(names, patterns)
    def check(name: str, pattern: str) -> None:
        expected = con.execute("SELECT ? LIKE ? ESCAPE '\\'", [fold(name), fold(pattern)]).fetchone()
        assert like_match(like_pattern(pattern), name) == expected[0], (name, pattern)  # type: ignore[index]

    check()


def test_a_pathological_pattern_is_answered(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    """A filter made of many % and _ used to be a regex, whose backtracking is exponential in
    them: this request never came back (and held a server thread and a core)."""
    pattern = "%_" * 400 + "x"
    descriptor = sql_cmd(pb.CommandGetTables(table_name_filter_pattern=pattern))
    assert fetch(client, descriptor, opts).num_rows == 0
    too_long = sql_cmd(pb.CommandGetTables(table_name_filter_pattern="%" * 1001))
    _cls, code, detail = refusal(lambda: client.get_flight_info(too_long, opts))
    assert code == "INVALID_ARGUMENT" and "at most 1000" in detail


def test_concurrent_binds_never_mix(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    """Threads binding different values at once: each statement's bind gives it a handle of its
    own that reads its own row; of threads binding one handle at once exactly one wins, the
    others get NOT_FOUND (the handle was retired by the winner), never another's values."""
    sql = "SELECT order_id FROM demo.orders WHERE order_id = ?"
    results: dict[int, Any] = {}
    shared = create_prepared(client, opts, sql).prepared_statement_handle

    def worker(key: int, handle: bytes | None) -> None:
        own = server.flight()
        try:
            if handle is None:
                handle = create_prepared(own, opts, sql).prepared_statement_handle
            bound = bind(own, opts, handle, pa.table({"0": [key]}))
            query = sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=bound))
            results[key] = fetch(own, query, opts).to_pylist()
        except flight.FlightError as e:
            results[key] = error_info(e)["code"]

    def race(keys: range, handle: bytes | None) -> None:
        # At most max_concurrent_queries (4) of one principal at once: 4 threads a round.
        threads = [threading.Thread(target=worker, args=(key, handle)) for key in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    race(range(1, 5), None)  # four statements of their own
    assert results == {k: [{"order_id": k}] for k in range(1, 5)}
    results.clear()
    race(range(5, 9), shared)  # one handle, four binds at once
    winners = {k: v for k, v in results.items() if v != "NOT_FOUND"}
    assert len(winners) == 1, results
    ((key, rows),) = winners.items()
    assert rows == [{"order_id": key}]


def test_prepared_statements_per_principal_are_bounded(server: Server, client: flight.FlightClient) -> None:
    """One principal cannot fill the store every principal's handles share."""
    assert server.runtime.flight is not None
    statements = server.runtime.flight.sql.statements
    opts = call_options(server.mint("agent", "demo", "fsql-hoarder"))
    others = call_options(server.mint("agent", "demo", "fsql-neighbour"))
    saved = statements.max_handles
    statements.max_handles = 3
    try:
        handles = [create_prepared(client, opts, "SELECT 1").prepared_statement_handle for _ in range(3)]
        cls, code, detail = refusal(lambda: create_prepared(client, opts, "SELECT 1"))
        assert (cls, code) == (flight.FlightServerError, "RESOURCE_EXHAUSTED")
        assert "close some (ClosePreparedStatement)" in detail
        assert create_prepared(client, others, "SELECT 1").prepared_statement_handle  # a share of its own
        close = packed(pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handles[0]))
        assert list(client.do_action(flight.Action("ClosePreparedStatement", close), opts)) == []
        assert create_prepared(client, opts, "SELECT 2").prepared_statement_handle
        # The handles still held work as before.
        query = sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=handles[1]))
        assert fetch(client, query, opts).to_pylist() == [{"1": 1}]
    finally:
        statements.max_handles = saved


def test_handles_expire(tmp_path: Path) -> None:
    """A prepared statement handle lives as long as a ticket: afterwards NOT_FOUND."""
    s = start_server(tmp_path / "data", limits={"ticket_ttl_seconds": 0.5})
    try:
        client, opts = s.flight(), call_options(s.demo_token)
        prepared = create_prepared(client, opts, "SELECT 1 AS one")
        query = sql_cmd(
            pb.CommandPreparedStatementQuery(prepared_statement_handle=prepared.prepared_statement_handle)
        )
        assert fetch(client, query, opts).to_pylist() == [{"one": 1}]

        def code() -> str:
            try:
                client.get_flight_info(query, opts)
                return "OK"
            except flight.FlightError as e:
                return str(error_info(e)["code"])

        wait_until(lambda: code() == "NOT_FOUND", what="the handle to expire")
    finally:
        s.stop()


def test_secrets_never_reach_the_log(server: Server, capfd: pytest.CaptureFixture[str]) -> None:
    """A Flight SQL session logs neither the token nor a prepared statement handle or ticket."""
    client, opts = server.flight(), call_options(server.demo_token)
    prepared = create_prepared(client, opts, "SELECT ? AS v")
    bound = bind(client, opts, prepared.prepared_statement_handle, pa.table({"0": ["secret-value"]}))
    info = client.get_flight_info(
        sql_cmd(pb.CommandPreparedStatementQuery(prepared_statement_handle=bound)), opts
    )
    client.do_get(info.endpoints[0].ticket, opts).read_all()
    with connect(server) as c, c.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchall()
    out, err = capfd.readouterr()
    logged = out + err
    assert "flight.call" in logged  # the calls were logged ...
    assert server.demo_token is not None and server.demo_token not in logged  # ... without secrets
    for handle in (prepared.prepared_statement_handle, bound):
        assert handle.decode() not in logged
    assert info.endpoints[0].ticket.ticket[-43:].decode() not in logged


def test_the_generated_module_matches_the_proto(tmp_path: Path) -> None:
    """flight_server/flight_sql/flight_sql_pb2.py(i) is what `make proto` makes of
    proto_docs/flight_sql.proto: a change to one without the other fails here."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{root / 'proto_docs'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(root / "proto_docs" / "flight_sql.proto"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for name in ("flight_sql_pb2.py", "flight_sql_pb2.pyi"):
        committed = (root / "flight_server" / "flight_sql" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} is stale: run make proto"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CancelQuery", "use CancelFlightInfo"),
        ("CreatePreparedSubstraitPlan", "Substrait plans are not accepted"),
    ],
)
def test_actions_not_offered_say_what_to_use(
    client: flight.FlightClient, opts: flight.FlightCallOptions, name: str, expected: str
) -> None:
    cls, code, detail = refusal(lambda: list(client.do_action(flight.Action(name, b"\x0a\x00"), opts)))
    assert (cls, code) == (flight.FlightServerError, "INVALID_ARGUMENT")
    assert expected in detail, detail


def test_json_commands_that_mention_flight_sql_stay_json(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    """A JSON command may start with a newline (byte 0x0a, like an Any's first tag) and quote
    a Flight SQL type URL: it is still a JSON command."""
    sql = "SELECT 'type.googleapis.com/arrow.flight.protocol.sql.X' AS u"
    raw = b"\n" + json.dumps({"sql": sql, "kind": "query"}).encode()
    rows = fetch(client, flight.FlightDescriptor.for_command(raw), opts).to_pylist()
    assert rows == [{"u": "type.googleapis.com/arrow.flight.protocol.sql.X"}]
    long_name = any_pb2.Any(
        type_url="type.googleapis.com/arrow.flight.protocol.sql." + "N" * 200
    ).SerializeToString()
    _cls, code, detail = refusal(
        lambda: client.get_flight_info(flight.FlightDescriptor.for_command(long_name), opts)
    )
    assert code == "INVALID_ARGUMENT" and "is not supported by Quiver" in detail  # a 2-byte length


def test_session_options(conn: Any, client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    """No sessions: the catalog and schema are fixed, reported, and cannot be changed."""
    assert conn.adbc_current_catalog == "quiver"
    assert conn.adbc_current_db_schema == "main"
    conn.adbc_current_catalog = "quiver"  # the value it has: accepted
    with pytest.raises(adbc_driver_manager.Error) as e:
        conn.adbc_current_db_schema = "demo"
    assert "invalid value" in str(e.value)
    request = pb.SetSessionOptionsRequest(
        session_options={
            "timezone": pb.SessionOptionValue(string_value="UTC"),
            "schema": pb.SessionOptionValue(),
        }
    )
    (result,) = client.do_action(flight.Action("SetSessionOptions", request.SerializeToString()), opts)
    answer = pb.SetSessionOptionsResult()
    answer.ParseFromString(result.body.to_pybytes())
    assert {k: v.value for k, v in answer.errors.items()} == {
        "timezone": pb.SetSessionOptionsResult.INVALID_NAME,
        "schema": pb.SetSessionOptionsResult.INVALID_VALUE,
    }
    bad = refusal(lambda: list(client.do_action(flight.Action("SetSessionOptions", b"\xff"), opts)))
    assert bad[1] == "INVALID_ARGUMENT"
    assert conn.adbc_current_db_schema == "main"  # unchanged
