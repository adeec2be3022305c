"""The data plane's wire contract on a real server: descriptors, every bad input, tickets,
authentication of every RPC, actions. Each refusal asserts the Flight error class AND the
``extra_info`` code, that no traceback leaks, and that the server answers the next call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog import TableRef
from catalog.tables import TableCatalog
from flight_server.tickets import flight_endpoint
from tests.harness import FakeClock, Server, call_options, error_info, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("dataplane"))
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA secret")
        cur.execute(
            "CREATE TABLE secret.salaries AS SELECT range AS id, range * 1000 AS salary FROM range(10)"
        )
        TableCatalog.bump_version(cur, TableRef("secret", "salaries"))
        # Several row groups, so that DuckDB's threads split the sampling work.
        cur.execute("CREATE TABLE secret.spread AS SELECT range AS id, hash(range) AS h FROM range(400000)")
        TableCatalog.bump_version(cur, TableRef("secret", "spread"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> flight.FlightClient:
    return server.flight()


@pytest.fixture(scope="module")
def opts(server: Server) -> flight.FlightCallOptions:
    return call_options(server.demo_token)


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def raw(data: bytes) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(data)


def fetch(
    client: flight.FlightClient, descriptor: flight.FlightDescriptor, opts: flight.FlightCallOptions
) -> pa.Table:
    info = client.get_flight_info(descriptor, opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def still_serving(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    who = json.loads(next(iter(client.do_action(flight.Action("whoami", b""), opts))).body.to_pybytes())
    assert who["kind"] in ("agent", "admin")


def refused(
    client: flight.FlightClient,
    opts: flight.FlightCallOptions,
    call: Any,
    error: type[flight.FlightError],
    code: str,
    *needles: str,
) -> str:
    with pytest.raises(flight.FlightError) as caught:
        call()
    exc = caught.value
    assert type(exc) is error, f"{type(exc).__name__}: {exc}"
    info = error_info(exc)
    assert info["code"] == code, info
    assert "Traceback" not in str(exc) and "Traceback" not in info["detail"]
    for needle in needles:
        assert needle.lower() in info["detail"].lower(), info["detail"]
    still_serving(client, opts)
    return str(info["detail"])


def schema_refused(
    client: flight.FlightClient, opts: flight.FlightCallOptions, call: Any, code: str, *needles: str
) -> str:
    """GetSchema cannot carry a FlightError through pyarrow (flight_server/errors.py): the
    server puts the code first in the message, and never a traceback."""
    with pytest.raises(pa.ArrowException) as caught:
        call()
    message = str(caught.value)
    assert not isinstance(caught.value, flight.FlightError)
    assert message.removeprefix("Unknown error: ").startswith(f"{code}: "), message
    assert "Traceback" not in message and ".py" not in message, message
    for needle in needles:
        assert needle.lower() in message.lower(), message
    still_serving(client, opts)
    return message


# --- descriptors that work ---------------------------------------------------------------------
def test_path_scan_info_schema_and_rows(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    descriptor = flight.FlightDescriptor.for_path("demo", "orders")
    info = client.get_flight_info(descriptor, opts)
    assert info.total_records == 20_000
    assert len(info.endpoints) == 1
    assert info.endpoints[0].ticket.ticket.startswith(b"qv1.")
    assert info.endpoints[0].expiration_time is not None
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert table.schema == info.schema
    assert table.num_rows == 20_000
    assert client.get_schema(descriptor, opts).schema == info.schema


def test_path_is_case_insensitive_like_duckdb(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    info = client.get_flight_info(flight.FlightDescriptor.for_path("DEMO", "Customers"), opts)
    assert info.total_records == 1_000


def test_query_with_params_and_max_rows(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    sql = "SELECT order_id, amount FROM demo.orders WHERE customer_id = ? AND amount > $2 ORDER BY order_id"
    got = fetch(client, cmd(kind="query", sql=sql, params=[7, 10]), opts)
    with server.catalog.db.reading() as cur:
        want = cur.sql(
            "SELECT order_id, amount FROM demo.orders WHERE customer_id = 7 AND amount > 10 ORDER BY order_id"
        ).to_arrow_table()
    assert got.equals(want)
    capped = fetch(
        client, cmd(kind="query", sql="SELECT * FROM range(100) ORDER BY range DESC", max_rows=3), opts
    )
    assert capped.column(0).to_pylist() == [99, 98, 97]


def test_query_info_does_not_run_the_query(server: Server, client: flight.FlightClient) -> None:
    # Running this would take hours; GetFlightInfo and GetSchema answer at once from the binder
    # (a call that ran it would hit the calls' 20 s deadline: DEADLINE_EXCEEDED, not a result).
    sql = "SELECT count(*) AS n FROM range(1000000000000) a, range(1000000000000) b"
    opts = call_options(server.demo_token, timeout=20)
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    schema = client.get_schema(cmd(kind="query", sql=sql), opts).schema
    assert info.schema.names == ["n"] and schema == info.schema
    assert info.total_records == -1


def test_first_n_sample_and_columns(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    d = cmd(kind="sample", table="demo.orders", rows=5, columns=["ORDER_ID", "status"])
    info = client.get_flight_info(d, opts)
    assert info.total_records == 5
    assert info.schema.names == ["order_id", "status"]
    got = client.do_get(info.endpoints[0].ticket, opts).read_all()
    with server.catalog.db.reading() as cur:
        want = cur.sql("SELECT order_id, status FROM demo.orders LIMIT 5").to_arrow_table()
    assert got.equals(want)


@pytest.mark.parametrize(
    "body",
    [
        {"percent": 5, "seed": 42},
        {"rows": 300, "method": "random", "seed": 7},
        {"rows": 300, "method": "random", "seed": 7, "columns": ["event_id", "page"]},
    ],
)
def test_random_samples_are_reproducible_with_a_seed(
    client: flight.FlightClient, opts: flight.FlightCallOptions, body: dict[str, Any]
) -> None:
    first = fetch(client, cmd(kind="sample", table="demo.events", **body), opts)
    again = fetch(client, cmd(kind="sample", table="demo.events", **body), opts)
    assert first.num_rows > 0 and first.equals(again)
    other = fetch(client, cmd(kind="sample", table="demo.events", **{**body, "seed": 1234}), opts)
    assert not other.equals(first)
    if "rows" in body:
        assert first.num_rows == body["rows"]
    else:
        assert 0.03 * 50_000 < first.num_rows < 0.07 * 50_000


@pytest.mark.parametrize("threads", [1, 4])
def test_random_samples_match_duckdb_whatever_its_thread_count(server: Server, threads: int) -> None:
    """The server (2 threads here) draws exactly what an independent DuckDB draws with 1 or 4
    threads: bernoulli and reservoir samples with a seed do not depend on threads."""
    import duckdb

    admin = call_options(server.admin_token)
    client = server.flight()
    with server.catalog.db.reading() as cur:
        data = cur.sql("SELECT * FROM secret.spread").to_arrow_table()
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.register("data", data)
    con.execute("CREATE TABLE t AS SELECT * FROM data")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"percent": 3, "seed": 42}, "SELECT * FROM t USING SAMPLE 3 PERCENT (bernoulli, 42)"),
        (
            {"rows": 500, "method": "random", "seed": 7},
            "SELECT * FROM t USING SAMPLE 500 ROWS (reservoir, 7)",
        ),
    ]
    for body, sql in cases:
        got = fetch(client, cmd(kind="sample", table="secret.spread", **body), admin)
        assert got.equals(con.sql(sql).to_arrow_table()), body


def test_random_sample_rows_are_the_same_whatever_the_columns(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    every = fetch(client, cmd(kind="sample", table="demo.events", percent=2, seed=9), opts)
    ids = fetch(
        client, cmd(kind="sample", table="demo.events", percent=2, seed=9, columns=["event_id"]), opts
    )
    assert ids.column("event_id").equals(every.column("event_id"))


def test_profile_descriptor(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    info = client.get_flight_info(cmd(kind="profile", table="demo.orders"), opts)
    assert info.total_records == 8
    profile = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert profile.column("name").to_pylist()[0] == "order_id"
    assert profile.num_rows == 8
    some = fetch(client, cmd(kind="profile", table="demo.orders", columns=["amount"]), opts)
    assert some.column("name").to_pylist() == ["amount"]


def test_list_flights_shows_only_readable_tables(
    server: Server, client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    names = {".".join(p.decode() for p in f.descriptor.path) for f in client.list_flights(options=opts)}
    assert names == {"demo.customers", "demo.events", "demo.orders"}
    admin = {
        ".".join(p.decode() for p in f.descriptor.path)
        for f in client.list_flights(options=call_options(server.admin_token))
    }
    assert "secret.salaries" in admin and not any(n.startswith("_quiver") for n in admin)


# --- bad commands --------------------------------------------------------------------------------
BAD_COMMANDS: list[tuple[bytes, str]] = [
    (b"not json at all", "not valid UTF-8 JSON"),
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"query"', "JSON object"),
    (b"{}", 'no "kind"'),
    (b'{"kind": "nope"}', "unknown kind 'nope'"),
    (b'{"kind": "query", "sql": "SELECT 1", "bogus": 1}', "unknown field 'bogus'"),
    (b'{"kind": "query", "sql": 1}', "'sql'"),
    (b'{"kind": "query"}', "needs the field 'sql'"),
    (b'{"kind": "query", "sql": "SELECT 1", "params": {"a": 1}}', "'params'"),
    (b'{"kind": "query", "sql": "SELECT 1", "max_rows": "10"}', "'max_rows'"),
    (b'{"kind": "query", "sql": "SELECT 1", "max_rows": 0}', "'max_rows' must be between 1"),
    (b'{"kind": "query", "sql": "SELECT 1", "max_rows": -5}', "'max_rows' must be between 1"),
    (b'{"kind": "query", "sql": "SELECT 1", "max_rows": 100000000000}', "'max_rows' must be between 1"),
    (b'{"kind": "query", "sql": "   "}', "'sql' is empty"),
    (b'{"kind": "sample", "table": "demo.orders"}', "exactly one of 'rows'"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 5, "percent": 5}', "exactly one of 'rows'"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": "5"}', "'rows'"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 2.5}', "'rows'"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 0}', "'rows' must be between 1"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": -3}', "'rows' must be between 1"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 1000000000}', "max_sample_rows"),
    (b'{"kind": "sample", "table": "demo.orders", "percent": 0}', "(0, 100]"),
    (b'{"kind": "sample", "table": "demo.orders", "percent": -1}', "(0, 100]"),
    (b'{"kind": "sample", "table": "demo.orders", "percent": 100.5}', "(0, 100]"),
    (
        b'{"kind": "sample", "table": "demo.orders", "percent": 5, "method": "first"}',
        "percent sample is random",
    ),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 5, "method": "fancy"}', "'method'"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 5, "seed": 3}', "'seed' applies to random"),
    (b'{"kind": "sample", "table": "demo.orders", "percent": 5, "seed": -3}', "'seed'"),
    (b'{"kind": "sample", "table": "demo.orders", "rows": 5, "columns": []}', "'columns' is empty"),
    (
        b'{"kind": "sample", "table": "demo.orders", "rows": 5, "columns": ["nope"]}',
        "unknown column(s) 'nope'",
    ),
    (
        b'{"kind": "sample", "table": "demo.orders", "rows": 5, "columns": ["status", "STATUS"]}',
        "more than once",
    ),
    (b'{"kind": "sample", "table": "orders", "rows": 5}', '"schema.table"'),
    (b'{"kind": "profile", "table": "demo.orders", "columns": ["nope"]}', "unknown column(s)"),
    (b'{"kind": "profile"}', "needs the field 'table'"),
    (b'{"kind": "result"}', "needs the field 'id'"),
]


@pytest.mark.parametrize(
    ("body", "needle"), BAD_COMMANDS, ids=[b.decode("latin-1")[:60] for b, _ in BAD_COMMANDS]
)
def test_bad_commands_are_invalid_argument(
    client: flight.FlightClient, opts: flight.FlightCallOptions, body: bytes, needle: str
) -> None:
    refused(
        client,
        opts,
        lambda: client.get_flight_info(raw(body), opts),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        needle,
    )
    # GetSchema refuses exactly the same commands.
    schema_refused(client, opts, lambda: client.get_schema(raw(body), opts), "INVALID_ARGUMENT", needle)


def test_percent_sample_above_the_row_limit_is_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("small-limit"), limits={"max_sample_rows": 1000})
    try:
        client, opts = s.flight(), call_options(s.demo_token)
        detail = refused(
            client,
            opts,
            lambda: client.get_flight_info(cmd(kind="sample", table="demo.events", percent=10), opts),
            flight.FlightServerError,
            "INVALID_ARGUMENT",
            "max_sample_rows",
        )
        assert "percent <= 2" in detail
        ok = fetch(client, cmd(kind="sample", table="demo.events", percent=1.5, seed=1), opts)
        assert 0 < ok.num_rows <= 1000
    finally:
        s.stop()


def test_bad_paths(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    for path in (["demo"], ["demo", "orders", "x"], ["", "orders"]):
        refused(
            client,
            opts,
            lambda p=path: client.get_flight_info(flight.FlightDescriptor.for_path(*p), opts),
            flight.FlightServerError,
            "INVALID_ARGUMENT",
            "[schema, table]",
        )


def test_flight_sql_commands_are_served_on_the_same_port(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    # A Flight SQL CommandStatementQuery (protobuf Any): served like a query command
    # (tests/test_flight_sql.py covers Flight SQL itself).
    any_msg = b"\nCtype.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery\x12\x0a\n\x08SELECT 1"
    assert fetch(client, raw(any_msg), opts).to_pylist() == [{"1": 1}]


# --- tables that are absent or not allowed: one answer ---------------------------------------------
@pytest.mark.parametrize(
    "table", ["secret.salaries", "demo.nope", "nope.nope", "_quiver.tokens", "SECRET.Salaries"]
)
def test_unknown_and_forbidden_tables_get_the_same_refusal(
    client: flight.FlightClient, opts: flight.FlightCallOptions, table: str
) -> None:
    schema, name = table.split(".")
    schema_refused(
        client,
        opts,
        lambda: client.get_schema(flight.FlightDescriptor.for_path(schema, name), opts),
        "PERMISSION_DENIED",
        "not readable: not in your allowlist or does not exist",
    )
    calls = [
        lambda: client.get_flight_info(flight.FlightDescriptor.for_path(schema, name), opts),
        lambda: client.get_flight_info(cmd(kind="sample", table=table, rows=1), opts),
        lambda: client.get_flight_info(cmd(kind="profile", table=table), opts),
        lambda: client.get_flight_info(cmd(kind="query", sql=f"SELECT * FROM {table}"), opts),
    ]
    for call in calls:
        detail = refused(
            client,
            opts,
            call,
            flight.FlightUnauthorizedError,
            "PERMISSION_DENIED",
            "not readable: not in your allowlist or does not exist",
        )
        assert "salary" not in detail and "Did you mean" not in detail


# --- SQL through the server (the guard's own corpus is tests/test_sqlguard*.py) ---------------------
SQL_REFUSALS: list[tuple[str, type[flight.FlightError], str, str]] = [
    ("hello world", flight.FlightServerError, "INVALID_ARGUMENT", "syntax error"),
    ("SELEC 1", flight.FlightServerError, "INVALID_ARGUMENT", "syntax error"),
    ("SELECT 1; SELECT 2", flight.FlightServerError, "INVALID_ARGUMENT", "statements"),
    ("DELETE FROM demo.orders", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "not allowed"),
    ("DROP TABLE demo.orders", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "not allowed"),
    ("CREATE TABLE demo.x AS SELECT 1", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "not allowed"),
    (
        "COPY demo.orders TO '/tmp/orders.csv'",
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "not allowed",
    ),
    ("ATTACH '/tmp/x.duckdb' AS x", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "not allowed"),
    ("PRAGMA database_list", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "not allowed"),
    ("SET threads = 1", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "not allowed"),
    (
        "SELECT current_setting('threads')",
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "current_setting",
    ),
    (
        "SELECT * FROM read_csv('/etc/passwd')",
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "read_csv",
    ),
    ("SELECT * FROM duckdb_tables()", flight.FlightUnauthorizedError, "PERMISSION_DENIED", "duckdb_tables"),
    (
        "SELECT * FROM information_schema.tables",
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "not readable",
    ),
    (
        "WITH x AS (SELECT * FROM secret.salaries) SELECT * FROM demo.orders, x",
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "secret.salaries",
    ),
    ("SELECT nope FROM demo.orders", flight.FlightServerError, "INVALID_ARGUMENT", "nope"),
    (
        "SELECT * FROM demo.orders WHERE order_id = ?",
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "parameter",
    ),
]


@pytest.mark.parametrize(
    ("sql", "error", "code", "needle"), SQL_REFUSALS, ids=[s[0][:50] for s in SQL_REFUSALS]
)
def test_sql_refusals(
    server: Server,
    client: flight.FlightClient,
    opts: flight.FlightCallOptions,
    sql: str,
    error: type[flight.FlightError],
    code: str,
    needle: str,
) -> None:
    refused(
        client, opts, lambda: client.get_flight_info(cmd(kind="query", sql=sql), opts), error, code, needle
    )
    with server.catalog.db.reading() as cur:
        assert cur.execute("SELECT count(*) FROM demo.orders").fetchall()[0][0] == 20_000


def test_runtime_sql_errors_are_invalid_argument_on_doget(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    info = client.get_flight_info(cmd(kind="query", sql="SELECT 1 AS a,\n 'x'::INTEGER AS b"), opts)
    detail = refused(
        client,
        opts,
        lambda: client.do_get(info.endpoints[0].ticket, opts).read_all(),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "Could not convert",
    )
    assert "LINE 2:" in detail  # the caller's own line numbers, though max_rows wraps the SQL
    info = client.get_flight_info(cmd(kind="query", sql="SELECT ?::INTEGER AS v", params=["abc"]), opts)
    refused(
        client,
        opts,
        lambda: client.do_get(info.endpoints[0].ticket, opts).read_all(),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "abc",
    )


# --- tickets --------------------------------------------------------------------------------------
def test_unknown_ticket_is_not_found(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    for ticket in (b"", b"garbage", b"qv1.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"):
        refused(
            client,
            opts,
            lambda t=ticket: client.do_get(flight.Ticket(t), opts).read_all(),
            flight.FlightServerError,
            "NOT_FOUND",
            "GetFlightInfo again",
        )


def test_foreign_ticket_is_refused(server: Server, client: flight.FlightClient) -> None:
    alice = call_options(server.mint("agent", "demo", "alice"))
    bob = call_options(server.mint("agent", "demo", "bob"))
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "customers"), alice)
    refused(
        client,
        bob,
        lambda: client.do_get(info.endpoints[0].ticket, bob).read_all(),
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "another principal",
    )
    # The owner still can, and a refreshed token of the same agent too.
    assert client.do_get(info.endpoints[0].ticket, alice).read_all().num_rows == 1_000
    fresh = json.loads(
        next(iter(client.do_action(flight.Action("refresh-token", b""), alice))).body.to_pybytes()
    )
    again = client.do_get(info.endpoints[0].ticket, call_options(fresh["token"])).read_all()
    assert again.num_rows == 1_000


def test_expired_ticket_is_not_found(clocked_server: Server, clock: FakeClock) -> None:
    """A ticket lives ``[limits] ticket_ttl_seconds`` on the server's clock: redeemable (more
    than once) until then, NOT_FOUND from then on -- and the endpoint says when."""
    client = clocked_server.flight()
    opts = call_options(clocked_server.mint("agent", "demo", "ticket-expiry", ttl_seconds=3600))
    ttl = clocked_server.catalog.config.limits.ticket_ttl_seconds
    issued_at = clock.time()
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "customers"), opts)
    (endpoint,) = info.endpoints
    assert endpoint.expiration_time.value == int((issued_at + ttl) * 1e6) * 1000
    clock.advance(ttl - 1)
    assert client.do_get(endpoint.ticket, opts).read_all().num_rows == 1_000
    assert client.do_get(endpoint.ticket, opts).read_all().num_rows == 1_000
    clock.advance(1)
    refused(
        client,
        opts,
        lambda: client.do_get(endpoint.ticket, opts).read_all(),
        flight.FlightServerError,
        "NOT_FOUND",
        "expired",
    )


def test_allowlist_is_checked_again_at_doget(server: Server, client: flight.FlightClient) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "narrowing", "tables": ["demo.*"]}).status_code == 201
    opts = call_options(server.mint("agent", "narrowing", "n1"))
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "orders"), opts)
    assert http.put("/v1/swarms/narrowing/allowlist", json={"tables": ["demo.customers"]}).status_code == 200
    refused(
        client,
        opts,
        lambda: client.do_get(info.endpoints[0].ticket, opts).read_all(),
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "not readable",
    )


def test_unknown_result_id_is_not_found(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    refused(
        client,
        opts,
        lambda: client.get_flight_info(cmd(kind="result", id="q_doesnotexist"), opts),
        flight.FlightServerError,
        "NOT_FOUND",
    )
    body = json.dumps({"id": "q_doesnotexist"}).encode()
    for action in ("query-status", "cancel-query"):
        refused(
            client,
            opts,
            lambda a=action: list(client.do_action(flight.Action(a, body), opts)),
            flight.FlightServerError,
            "NOT_FOUND",
        )


# --- authentication of every RPC --------------------------------------------------------------------
def _every_rpc(client: flight.FlightClient, opts: flight.FlightCallOptions) -> list[tuple[str, Any]]:
    descriptor = flight.FlightDescriptor.for_path("demo", "orders")

    def do_put() -> None:
        writer, _ = client.do_put(descriptor, pa.schema([("a", pa.int64())]), opts)
        writer.write_table(pa.table({"a": [1]}))
        writer.close()

    def do_exchange() -> None:
        writer, reader = client.do_exchange(descriptor, opts)
        writer.close()
        reader.read_all()

    return [
        ("ListFlights", lambda: list(client.list_flights(options=opts))),
        ("GetFlightInfo", lambda: client.get_flight_info(descriptor, opts)),
        ("GetSchema", lambda: client.get_schema(descriptor, opts)),
        ("DoGet", lambda: client.do_get(flight.Ticket(b"qv1.whatever"), opts).read_all()),
        ("DoPut", do_put),
        ("DoAction", lambda: list(client.do_action(flight.Action("whoami", b""), opts))),
        ("ListActions", lambda: list(client.list_actions(opts))),
        ("DoExchange", do_exchange),
    ]


@pytest.mark.parametrize("token", [None, "not-a-jwt", "Bearer", "eyJhbGciOiJIUzI1NiJ9.e30.x"])
def test_every_rpc_requires_a_valid_token(
    server: Server, client: flight.FlightClient, token: str | None
) -> None:
    bad = call_options(token)
    for name, call in _every_rpc(client, bad):
        if name == "GetSchema":
            # The server answers UNAUTHENTICATED (with extra_info) from its middleware, but
            # pyarrow's client get_schema turns every status into a plain OSError
            # (apache/arrow #43556); the status is still recognisable.
            with pytest.raises(OSError, match=r"\. Detail: Unauthenticated"):
                call()
            continue
        with pytest.raises(flight.FlightError) as caught:
            call()
        exc = caught.value
        assert type(exc) is flight.FlightUnauthenticatedError, f"{name}: {type(exc).__name__} {exc}"
        assert error_info(exc)["code"] == "UNAUTHENTICATED", name
    still_serving(client, call_options(server.demo_token))


def test_put_of_a_path_and_exchange_are_refused_for_valid_tokens(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    """DoPut saves only artefacts (tests/test_artefacts_flight.py): a PATH is refused."""
    calls = dict(_every_rpc(client, opts))
    refused(
        client,
        opts,
        calls["DoPut"],
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "DoPut saves a tabular artefact",
    )
    refused(client, opts, calls["DoExchange"], flight.FlightServerError, "INVALID_ARGUMENT", "not offered")


# --- actions ---------------------------------------------------------------------------------------
def test_list_actions_describes_every_action(
    client: flight.FlightClient, opts: flight.FlightCallOptions
) -> None:
    actions = {a.type: a.description for a in client.list_actions(opts)}
    assert set(actions) == {
        "whoami",
        "refresh-token",
        "submit-query",
        "query-status",
        "cancel-query",
        "my-queries",
        "usage",
        "export",
        "refresh-artefact",
        "list-artefacts",
        "read-artefact",
        # Flight SQL's (proto_docs/flight-sql.md)
        "CreatePreparedStatement",
        "ClosePreparedStatement",
        "CancelFlightInfo",
        "CloseSession",
        "GetSessionOptions",
        "SetSessionOptions",
    }
    assert all(len(d) > 20 for d in actions.values())


def test_bad_actions(client: flight.FlightClient, opts: flight.FlightCallOptions) -> None:
    refused(
        client,
        opts,
        lambda: list(client.do_action(flight.Action("nope", b""), opts)),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "unknown action",
        "whoami",
    )
    for body in (b"{", b'{"ttl_seconds": "x"}', b'{"bogus": 1}'):
        refused(
            client,
            opts,
            lambda b=body: list(client.do_action(flight.Action("refresh-token", b), opts)),
            flight.FlightServerError,
            "INVALID_ARGUMENT",
            "ttl_seconds",
        )
    refused(
        client,
        opts,
        lambda: list(
            client.do_action(flight.Action("submit-query", b'{"sql": "DROP TABLE demo.orders"}'), opts)
        ),
        flight.FlightUnauthorizedError,
        "PERMISSION_DENIED",
        "not allowed",
    )
    refused(
        client,
        opts,
        lambda: list(
            client.do_action(flight.Action("submit-query", b'{"sql": "SELECT 1", "max_rows": 0}'), opts)
        ),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "max_rows",
    )
    refused(
        client,
        opts,
        lambda: list(
            client.do_action(flight.Action("submit-query", b'{"sql": "SELECT nope FROM demo.orders"}'), opts)
        ),
        flight.FlightServerError,
        "INVALID_ARGUMENT",
        "nope",
    )


def test_arrow_stream_runs_queries_like_the_public_api(server: Server) -> None:
    """flight_server.streams.arrow_stream hands statements to DuckDB's submit step (no
    relation): the same rows, types and errors as ``cur.sql(q, params).to_arrow_reader()``."""
    import duckdb

    from flight_server.streams import arrow_stream

    cases: list[tuple[str, list[Any]]] = [
        ("SELECT * FROM demo.orders ORDER BY order_id", []),
        ("SELECT * FROM demo.events WHERE event_id > ? ORDER BY event_id LIMIT 100", [49_000]),
        (
            "SELECT ?::DECIMAL(10, 2) AS d, ? AS s, ?::DATE AS day, [1, 2] AS l, {'a': 1} AS st",
            [1.5, "x", "2024-01-02"],
        ),
        ("SELECT NULL AS n, 'é' AS e", []),
    ]
    with server.catalog.db.reading() as cur:
        for sql, params in cases:
            got = arrow_stream(cur, sql, params).read_all()
            want = cur.sql(sql, params=params or None).to_arrow_table()
            assert got.equals(want), sql
        for bad in ("SELECT 'x'::INTEGER", "SELECT nope FROM demo.orders"):
            with pytest.raises(duckdb.Error) as ours:
                arrow_stream(cur, bad).read_all()
            with pytest.raises(duckdb.Error) as theirs:
                cur.sql(bad).to_arrow_table()
            assert type(ours.value) is type(theirs.value)


@settings(max_examples=300, deadline=None)
@given(
    ticket=st.binary(min_size=0, max_size=300),
    expires_at=st.floats(min_value=-(2**33), max_value=2**33, allow_nan=False, allow_infinity=False),
    app_metadata=st.binary(min_size=0, max_size=300),
)
def test_endpoints_built_from_protobuf_equal_pyarrow_s(
    ticket: bytes, expires_at: float, app_metadata: bytes
) -> None:
    """GetFlightInfo builds each endpoint from its protobuf encoding (flight_server/tickets.py
    ``flight_endpoint``, cheaper than pyarrow's constructor): the same message, ticket and
    expiry — whole microseconds — as ``flight.FlightEndpoint(ticket, [], expiration_time=...)``,
    for every ticket length (one- and two-byte varints), time (with and without nanos) and
    ``app_metadata`` (an inline result, or none)."""
    ns = int(expires_at * 1e6) * 1000
    want = flight.FlightEndpoint(
        ticket, [], expiration_time=pa.scalar(ns, type=pa.timestamp("ns")), app_metadata=app_metadata
    )
    got = flight_endpoint(ticket, expires_at, app_metadata)
    assert got == want
    assert got.serialize() == want.serialize()
    assert got.ticket.ticket == ticket and got.locations == []
    assert got.app_metadata == app_metadata
    assert got.expiration_time is not None and got.expiration_time.value == ns
