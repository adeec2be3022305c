"""Flight SQL through a second, independent client: `flightsql-dbapi` 0.2.2 (InfluxData's
pure-Python DB-API over pyarrow.flight), against a real server (proto_docs/flight-sql.md,
"flightsql-dbapi"): queries as rows and as Arrow equal to DuckDB's answer, parameters,
refusals with the same code and detail as a JSON command, authentication, a metadata listing
that shows only the allowlist, and threads racing one endpoint.

Two things of the package decide how this module is built, both outside Quiver's code:

- The package registers its own copy of the Flight SQL messages in protobuf's default
  descriptor pool, as Quiver's ``flight_server/flight_sql/flight_sql_pb2.py`` does, so the two
  cannot be imported into one process (``duplicate symbol 'arrow.flight.protocol.sql.…'``).
  The client therefore runs in a child process, tests/flightsql_dbapi_driver.py, and this
  module never imports the package (the test asserting that is below).
- Its cursor reads only the first endpoint of a FlightInfo (``info.endpoints[0]``): a result
  Quiver splits into parallel endpoints (proto_docs/descriptors.md, "Split queries") comes back
  short through ``cursor.execute``, whole through the client's ``execute`` + DoGet of every
  endpoint.
- Its copy of the messages predates the spec's stateless prepared statements: a bind by DoPut
  ignores the ``DoPutPreparedStatementResult`` that carries the bound handle and runs the
  handle it was given, which Quiver retired at the bind. ``cursor.execute(sql, params)``
  therefore fails with ``NOT_FOUND``; parameters work when the client runs the answered
  handle (the driver's ``bound``, the package's own record builder and messages otherwise).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import TableRef
from catalog.tables import TableCatalog
from tests.flightsql_dbapi_driver import read_frame, write_frame
from tests.harness import SMALL_SPLIT, Server, call_options, error_info, start_server

pytestmark = pytest.mark.slow  # a client subprocess

ROOT = Path(__file__).resolve().parents[1]
ORDERS_SQL = (
    "SELECT order_id, customer_id, ordered_at, status, amount, quantity FROM demo.orders ORDER BY order_id"
)
NOT_READABLE = "not readable: not in your allowlist or does not exist"
#: The page's flightsql-dbapi examples: fenced ```python flightsql-dbapi, so that
#: tests/test_dataplane_docs.py (which runs ```python blocks in its own process, beside the
#: server) leaves them to this module.
DOC_BLOCK = re.compile(r"^```python flightsql-dbapi\n(.*?)^```", re.DOTALL | re.MULTILINE)


class Driver:
    """The child process that holds the flightsql-dbapi client (tests/flightsql_dbapi_driver.py)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.flightsql_dbapi_driver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )

    def call(self, op: str, **kwargs: Any) -> tuple[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        write_frame(self.proc.stdin, (op, kwargs))
        status, value = read_frame(self.proc.stdout)
        return str(status), value

    def ok(self, op: str, **kwargs: Any) -> Any:
        status, value = self.call(op, **kwargs)
        assert status == "ok", value
        return value

    def refused(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """The client's exception: its class name, message and Quiver's ``{"code", "detail"}``."""
        status, value = self.call(op, **kwargs)
        assert status == "error", f"expected a refusal, got {value!r}"
        assert "Traceback" not in value["message"] and "INTERNAL" not in value["message"], value
        info = json.loads(value["extra_info"]) if value["extra_info"] else None
        return {"type": value["type"], "message": value["message"], "info": info}

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Small split thresholds, so that demo.events (50,000 rows) is served as several endpoints.
    s = start_server(tmp_path_factory.mktemp("flightsql-dbapi"), flight=SMALL_SPLIT)
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA secret")
        cur.execute("CREATE TABLE secret.salaries AS SELECT range AS id, range * 1000 AS pay FROM range(10)")
        TableCatalog.bump_version(cur, TableRef("secret", "salaries"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


@pytest.fixture(scope="module")
def port(server: Server) -> int:
    return int(server.flight_url.rsplit(":", 1)[1])


def duckdb_rows(server: Server, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with server.catalog.db.reading() as cur:
        return cur.execute(sql, params or []).fetchall()


def duckdb_arrow(server: Server, sql: str, params: list[Any] | None = None) -> pa.Table:
    with server.catalog.db.reading() as cur:
        return cur.sql(sql, params=params).to_arrow_table()


def live_handles(server: Server) -> dict[str, int]:
    """Live prepared statement handles per principal, as the server counts them against the
    share of 1,000 (flight_server/flight_sql/statements.py)."""
    assert server.runtime.flight is not None
    held = server.runtime.flight.sql.statements._held
    return {subject: len(handles) for subject, handles in held.items() if handles}


def salaries(server: Server) -> list[tuple[Any, ...]]:
    return duckdb_rows(server, "SELECT * FROM secret.salaries ORDER BY id")


def test_this_process_never_imports_the_package() -> None:
    # The reason for the child process: both copies of the messages in one pool fail.
    assert "flightsql" not in sys.modules
    probe = subprocess.run(
        [sys.executable, "-c", "import flight_server.flight_sql.flight_sql_pb2\nimport flightsql"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode != 0
    assert "duplicate symbol 'arrow.flight.protocol.sql." in probe.stderr


def test_rows_and_arrow_equal_duckdb(driver: Driver, port: int, server: Server) -> None:
    expected = duckdb_rows(server, ORDERS_SQL)
    assert len(expected) > 100
    got = driver.ok("dbapi", port=port, token=server.agent_token, sql=ORDERS_SQL)
    assert got["names"] == ["order_id", "customer_id", "ordered_at", "status", "amount", "quantity"]
    # The package converts through pandas: timestamps arrive as pandas.Timestamp (equal to
    # DuckDB's datetime), decimals as Decimal.
    assert [tuple(r) for r in got["rows"]] == expected
    assert isinstance(got["rows"][0][4], Decimal)

    table = driver.ok("arrow", port=port, token=server.agent_token, sql=ORDERS_SQL)
    want = duckdb_arrow(server, ORDERS_SQL)
    assert table.schema.equals(want.schema), (table.schema, want.schema)
    assert table.equals(want)

    one = driver.ok("dbapi", port=port, token=server.agent_token, sql="SELECT 42 AS answer, 'x' AS letter")
    assert one == {"rows": [[42, "x"]], "names": ["answer", "letter"]}


def test_parameters_through_the_answered_handle(driver: Driver, port: int, server: Server) -> None:
    sql = (
        "SELECT order_id, status FROM demo.orders "
        "WHERE order_id <= ? AND status <> ? AND amount > ? AND ? ORDER BY order_id"
    )
    params = [40, "returned", 100.5, True]
    before = live_handles(server)
    table = driver.ok("bound", port=port, token=server.agent_token, sql=sql, params=params)
    expected = duckdb_arrow(server, sql, params)
    assert expected.num_rows > 0
    assert table.to_pylist() == expected.to_pylist()
    assert live_handles(server) == before  # the bound handle was closed: nothing left behind


def test_dbapi_parameters_are_not_found_and_change_nothing(driver: Driver, port: int, server: Server) -> None:
    """The package's cursor runs the handle it bound, which the bind retired: a clear
    NOT_FOUND that says to use the answered handle, never INTERNAL; nothing changes."""
    before = duckdb_rows(server, ORDERS_SQL)
    token = server.mint(agent="dbapi-params")
    handles = live_handles(server)
    sql = "SELECT order_id FROM demo.orders WHERE order_id < ? ORDER BY 1"
    refusal = driver.refused("dbapi", port=port, token=token, sql=sql, params=[3])
    assert refusal["type"] == "FlightServerError", refusal
    assert refusal["info"]["code"] == "NOT_FOUND", refusal
    assert "a bind answers a new one (use it)" in refusal["info"]["detail"]
    assert duckdb_rows(server, ORDERS_SQL) == before
    # The handle the bind answered is never closed by the package: it stays live, in the
    # principal's share, until it expires (proto_docs/flight-sql.md says so).
    after = live_handles(server)
    grown = {s: n for s, n in after.items() if n != handles.get(s, 0)}
    assert list(grown.values()) == [1], (handles, after)
    # The same client, without parameters, still works.
    got = driver.ok(
        "dbapi",
        port=port,
        token=server.agent_token,
        sql="SELECT order_id FROM demo.orders WHERE order_id < 3 ORDER BY 1",
    )
    assert got["rows"] == [[1], [2]]


def test_refused_tables_match_json_commands(driver: Driver, port: int, server: Server) -> None:
    client = server.flight()
    opts = call_options(server.agent_token)
    before = salaries(server)
    for sql in ("SELECT * FROM secret.salaries", "SELECT * FROM secret.nope", "SELECT * FROM _quiver.tokens"):
        with pytest.raises(flight.FlightUnauthorizedError) as e:
            cmd = json.dumps({"kind": "query", "sql": sql}).encode()
            client.get_flight_info(flight.FlightDescriptor.for_command(cmd), opts)
        json_info = error_info(e.value)
        assert json_info["code"] == "PERMISSION_DENIED"
        assert NOT_READABLE in json_info["detail"]
        for op in ("dbapi", "arrow"):
            refusal = driver.refused(op, port=port, token=server.agent_token, sql=sql)
            assert refusal["type"] == "FlightUnauthorizedError", refusal
            assert refusal["info"] == json_info, (op, sql)
    assert salaries(server) == before


def test_authentication(driver: Driver, port: int, server: Server) -> None:
    # No token: the package still sends a header, `Bearer None` (or `Bearer ` for "").
    for token, detail in (
        (None, "invalid token"),
        ("", "malformed authorization header"),
        ("x.y", "invalid token"),
    ):
        refusal = driver.refused("arrow", port=port, token=token, sql="SELECT 1")
        assert refusal["type"] == "FlightUnauthenticatedError", refusal
        assert refusal["info"]["code"] == "UNAUTHENTICATED"
        assert refusal["info"]["detail"].startswith(detail), refusal
    # No header at all (the same call over pyarrow.flight): the same code.
    with pytest.raises(flight.FlightUnauthenticatedError) as e:
        cmd = json.dumps({"kind": "query", "sql": "SELECT 1"}).encode()
        server.flight().get_flight_info(flight.FlightDescriptor.for_command(cmd), call_options(None))
    assert error_info(e.value)["code"] == "UNAUTHENTICATED"
    # A revoked token is refused as well.
    token = server.mint(agent="dbapi-revoked")
    assert driver.ok("arrow", port=port, token=token, sql="SELECT 1 AS one").to_pylist() == [{"one": 1}]
    http = server.http()
    jti = next(t["jti"] for t in http.get("/v1/tokens").json()["tokens"] if t.get("agent") == "dbapi-revoked")
    assert http.delete(f"/v1/tokens/{jti}").status_code == 200
    refusal = driver.refused("arrow", port=port, token=token, sql="SELECT 1")
    assert refusal["info"]["code"] == "UNAUTHENTICATED", refusal
    # User and password go into a Flight Handshake, which Quiver does not offer (tokens only):
    # pyarrow's own UNIMPLEMENTED, no credentials echoed.
    refusal = driver.refused("basic", port=port, user="admin", password="hunter2-secret")
    assert refusal["type"] == "ArrowNotImplementedError", refusal
    assert "hunter2-secret" not in refusal["message"]


def test_metadata_shows_only_the_allowlist(driver: Driver, port: int, server: Server) -> None:
    got = driver.ok("tables", port=port, token=server.agent_token)
    assert got["table_names"] == ["customers", "events", "orders"]  # never secret.*, never _quiver.*
    assert got["schema_names"] == ["demo"]
    listing: pa.Table = got["listing"]
    assert set(listing.column("db_schema_name").to_pylist()) == {"demo"}
    orders = duckdb_rows(
        server,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'demo' AND table_name = 'orders' ORDER BY ordinal_position",
    )
    assert [c["name"] for c in got["columns"]] == [r[0] for r in orders]

    # A narrower swarm sees only its table.
    http = server.http()
    r = http.post(
        "/v1/swarms", json={"name": "dbapi-narrow", "description": "one table", "tables": ["demo.orders"]}
    )
    assert r.status_code == 201, r.text
    narrow = server.mint(swarm="dbapi-narrow", agent="n1")
    got = driver.ok("tables", port=port, token=narrow)
    assert got["table_names"] == ["orders"]
    refusal = driver.refused("arrow", port=port, token=narrow, sql="SELECT * FROM demo.customers")
    assert refusal["info"]["code"] == "PERMISSION_DENIED"


def test_threads_race_one_query(driver: Driver, port: int, server: Server) -> None:
    tokens = [server.mint(agent=f"dbapi-race-{i}") for i in range(6)]
    sql = (
        "SELECT status, count(*) AS n, sum(amount) AS total FROM demo.orders GROUP BY status ORDER BY status"
    )
    expected = duckdb_arrow(server, sql)
    answers = driver.ok("race", port=port, tokens=tokens, sql=sql, rounds=5)
    assert len(answers) == len(tokens)
    for answer in answers:
        assert isinstance(answer, list), answer  # not an exception's description
        assert all(t.equals(expected) for t in answer)


def test_cursor_reads_only_the_first_endpoint(driver: Driver, port: int, server: Server) -> None:
    """The package's limitation, pinned so that the docs stay true: a split result comes back
    whole over every endpoint, and short through the cursor."""
    sql = "SELECT * FROM demo.events"
    total = duckdb_rows(server, "SELECT count(*) FROM demo.events")[0][0]
    parts = driver.ok("endpoints", port=port, token=server.agent_token, sql=sql)
    assert len(parts) > 1 and sum(parts) == total
    whole = driver.ok("arrow", port=port, token=server.agent_token, sql=sql)
    assert sorted(whole.column("event_id").to_pylist()) == [
        r[0] for r in duckdb_rows(server, "SELECT event_id FROM demo.events ORDER BY 1")
    ]
    short = driver.ok("dbapi", port=port, token=server.agent_token, sql=sql)
    assert len(short["rows"]) == parts[0] < total


def test_the_docs_example_runs(server: Server) -> None:
    blocks = DOC_BLOCK.findall((ROOT / "proto_docs" / "flight-sql.md").read_text())
    assert blocks, "proto_docs/flight-sql.md has no flightsql-dbapi example"
    env = {**os.environ, "QUIVER_URL": server.flight_url, "QUIVER_TOKEN": server.agent_token}
    for i, block in enumerate(blocks):
        run = subprocess.run(
            [sys.executable, "-c", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, f"example {i + 1} failed:\n{run.stderr[-4000:]}\n{block}"


def test_a_second_authorization_header_is_refused(driver: Driver, port: int, server: Server) -> None:
    """The package's ``metadata=`` adds headers after its own ``authorization``: a second one
    made the credentials ambiguous, and the server took the first without a word. Refused
    now, whichever of the two is valid, and the valid token is not marked used."""
    token = server.mint(agent="dbapi-two-headers")
    for own, extra in ((token, "Bearer garbage"), ("garbage", f"Bearer {token}"), (token, f"Bearer {token}")):
        refusal = driver.refused(
            "arrow", port=port, token=own, sql="SELECT 1 AS one", metadata={"authorization": extra}
        )
        assert refusal["type"] == "FlightUnauthenticatedError", refusal
        assert refusal["info"]["code"] == "UNAUTHENTICATED"
        assert refusal["info"]["detail"].startswith("several authorization headers"), refusal
        assert token not in refusal["message"]
    # Over pyarrow.flight too, and the token was never used.
    headers = [(b"authorization", f"Bearer {token}".encode())] * 2
    with pytest.raises(flight.FlightUnauthenticatedError) as e:
        cmd = json.dumps({"kind": "query", "sql": "SELECT 1"}).encode()
        server.flight().get_flight_info(
            flight.FlightDescriptor.for_command(cmd), flight.FlightCallOptions(headers=headers)
        )
    assert error_info(e.value)["code"] == "UNAUTHENTICATED"
    server.catalog.maintain()  # flush buffered last-used times
    record = next(
        t for t in server.http().get("/v1/tokens").json()["tokens"] if t["agent"] == "dbapi-two-headers"
    )
    assert record["last_used_at"] is None
    # One header still works.
    assert driver.ok("arrow", port=port, token=token, sql="SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_http_and_mcp_refuse_two_authorization_headers_too(server: Server) -> None:
    """The same rule on every listener (catalog.tokens.bearer_token): the control plane and
    /mcp took the first header as Flight did."""
    swarms = server.http().get("/v1/swarms").json()
    for pair in ((server.admin_token, "garbage"), ("garbage", server.admin_token)):
        headers = [("authorization", f"Bearer {t}") for t in pair]
        r = httpx.get(f"{server.http_url}/v1/swarms", headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["detail"].startswith("several authorization headers (2)")
        r = httpx.post(
            f"{server.http_url}/v1/swarms",
            headers=headers,
            json={"name": "two-headers", "description": "never", "tables": ["demo.*"]},
        )
        assert r.status_code == 401, r.text
        mcp = [("authorization", f"Bearer {t}") for t in (server.agent_token, server.agent_token)]
        r = httpx.post(
            f"{server.http_url}/mcp",
            headers=[*mcp, ("accept", "application/json, text/event-stream")],
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        )
        assert r.status_code == 401, r.text
    assert server.http().get("/v1/swarms").json() == swarms  # nothing created
