"""POST /v1/query on a real server: agent SQL over HTTP through the data plane's one query
path (catalog/query_port.py), streamed in five formats, read back with real readers and
compared with what Flight answers for the same query; refusals with Flight's codes; the
admission path and its slots shared with Flight; a client that goes away gives its slot back."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from tests.harness import Server, call_options, error_info, start_server, wait_until
from tests.test_admission import LONG, hold, long_ticket
from tests.test_dataplane import cmd

ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
CSV = "text/csv"
NDJSON = "application/x-ndjson"
JSON = "application/json"
ALL = (ARROW, PARQUET, CSV, NDJSON, JSON)

ORDERS = "SELECT * FROM demo.orders WHERE order_id > ? ORDER BY order_id LIMIT 700"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("httpquery"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def agent(server: Server) -> httpx.Client:
    return server.http(server.mint("agent", "demo", "http-reader"))


def flight_table(server: Server, sql: str, params: list[Any] | None = None, **extra: Any) -> pa.Table:
    opts = call_options(server.mint("agent", "demo", "flight-reader"))
    client = server.flight()
    info = client.get_flight_info(cmd(kind="query", sql=sql, params=params or [], **extra), opts)
    return client.do_get(info.endpoints[0].ticket, opts).read_all()


def post(client: httpx.Client, accept: str | None, **body: Any) -> httpx.Response:
    headers = {"accept": accept} if accept is not None else {}
    return client.post("/v1/query", json=body, headers=headers)


def idle(server: Server) -> bool:
    flight_server = server.runtime.flight
    assert flight_server is not None
    return flight_server.admission.streams() == 0 and not flight_server.admission.active()


def _plain(value: Any) -> Any:
    """A Flight value as JSON text carries it: ISO times, exact decimals."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _same_json_value(got: Any, want: Any) -> bool:
    if isinstance(want, float):
        return float(got) == want
    if isinstance(want, Decimal):
        return Decimal(str(got)) == want
    return bool(got == _plain(want))


def read_back(response: httpx.Response, schema: pa.Schema) -> list[dict[str, Any]] | pa.Table:
    kind = response.headers["content-type"].split(";")[0]
    data = response.content
    if kind == ARROW:
        return pa.ipc.open_stream(data).read_all()
    if kind == PARQUET:
        return pq.read_table(io.BytesIO(data))
    if kind == CSV:
        types = {f.name: f.type for f in schema}
        return pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(column_types=types))
    if kind == NDJSON:
        return [json.loads(line, parse_float=Decimal) for line in data.splitlines()]
    doc = json.loads(data, parse_float=Decimal)
    return list(doc["rows"])


@pytest.mark.parametrize("accept", ALL)
def test_every_format_reads_back_equal_to_the_flight_result(
    server: Server, agent: httpx.Client, accept: str
) -> None:
    want = flight_table(server, ORDERS, [100])
    r = post(agent, accept, sql=ORDERS, params=[100])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(accept)
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.headers["x-quiver-truncated"] == "false"
    assert r.headers["x-quiver-max-rows-reason"] == "server_max_rows"
    got = read_back(r, want.schema)
    if isinstance(got, pa.Table):
        assert got.schema.names == want.schema.names
        assert got.cast(want.schema).equals(want)
    else:
        rows = want.to_pylist()
        assert len(got) == len(rows) == 700
        for g, w in zip(got, rows, strict=True):
            assert list(g) == list(w)
            assert all(_same_json_value(g[k], w[k]) for k in w), (g, w)


def test_no_accept_or_a_wildcard_is_json_and_q_values_choose(agent: httpx.Client) -> None:
    body = {"sql": "SELECT 42 AS answer"}
    assert post(agent, None, **body).json()["rows"] == [{"answer": 42}]
    assert post(agent, "*/*", **body).headers["content-type"].startswith(JSON)
    r = post(agent, "text/csv;q=0.5, application/vnd.apache.parquet;q=0.9, */*;q=0.1", **body)
    assert r.headers["content-type"] == PARQUET
    assert pq.read_table(io.BytesIO(r.content)).to_pylist() == [{"answer": 42}]
    r = post(agent, "text/*", **body)
    assert r.headers["content-type"].startswith(CSV)
    assert list(csv.reader(io.StringIO(r.text))) == [['"answer"'.strip('"')], ["42"]]


@pytest.mark.parametrize(
    "accept", ["image/png", "text/html", "application/json;q=0", "application/xml, text/plain"]
)
def test_an_unacceptable_format_is_406_and_runs_nothing(
    server: Server, agent: httpx.Client, accept: str
) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    before = flight_server.streamer.executions
    r = post(agent, accept, sql="SELECT 43 AS not_run")
    assert r.status_code == 406
    body = r.json()
    assert body["error"] == "INVALID_ARGUMENT" and ARROW in body["detail"]
    assert len(body["detail"]) < 600
    assert flight_server.streamer.executions == before
    assert idle(server)


def test_a_long_accept_header_is_echoed_bounded(agent: httpx.Client) -> None:
    r = post(agent, "x/" + "y" * 5000, sql="SELECT 1")
    assert r.status_code == 406 and len(r.json()["detail"]) < 600


# --- cut results ---------------------------------------------------------------------------------
@pytest.mark.parametrize("accept", ALL)
def test_a_max_rows_cut_is_flagged_in_the_header(server: Server, agent: httpx.Client, accept: str) -> None:
    r = post(agent, accept, sql="SELECT * FROM demo.orders ORDER BY order_id", max_rows=25)
    assert r.status_code == 200, r.text
    assert r.headers["x-quiver-truncated"] == "true"
    assert r.headers["x-quiver-max-rows"] == "25"
    assert r.headers["x-quiver-max-rows-reason"] == "max_rows"
    want = flight_table(server, "SELECT * FROM demo.orders ORDER BY order_id", max_rows=25)
    got = read_back(r, want.schema)
    assert (got.num_rows if isinstance(got, pa.Table) else len(got)) == 25 == want.num_rows


def test_exactly_max_rows_is_not_a_cut(agent: httpx.Client) -> None:
    r = post(agent, JSON, sql="SELECT range AS v FROM range(10)", max_rows=10)
    assert r.headers["x-quiver-truncated"] == "false"
    doc = r.json()
    assert len(doc["rows"]) == 10 and doc["truncated"] is False and doc["row_count"] == 10


def test_a_cut_of_a_large_result_is_said_at_the_end_of_the_body(agent: httpx.Client) -> None:
    """A result larger than the head streams before its cut is known: the header says
    "unknown"; Arrow's last batch, Parquet's footer and the JSON document's end say it."""
    body = {"sql": "SELECT range AS v FROM range(400000)", "max_rows": 300_000}
    r = post(agent, ARROW, **body)
    assert r.headers["x-quiver-truncated"] == "unknown"
    reader = pa.ipc.open_stream(r.content)
    rows, last = 0, None
    while True:
        try:
            chunk = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            break
        rows += chunk.batch.num_rows
        last = chunk.custom_metadata
    assert rows == 300_000
    assert last is not None
    assert json.loads(last[b"quiver.row_cap"]) == {
        "max_rows": 300_000,
        "reason": "max_rows",
        "truncated": True,
    }
    r = post(agent, PARQUET, **body)
    meta = pq.read_metadata(io.BytesIO(r.content))
    assert meta.num_rows == 300_000
    assert json.loads(meta.metadata[b"quiver.row_cap"])["truncated"] is True
    doc = post(agent, JSON, **body).json()
    assert (len(doc["rows"]), doc["truncated"], doc["reason"]) == (300_000, True, "max_rows")
    lines = post(agent, NDJSON, **body).content.splitlines()
    assert len(lines) == 300_000
    # Not cut: the end says so too.
    r = post(agent, PARQUET, sql="SELECT range AS v FROM range(300000)", max_rows=300_000)
    assert (
        json.loads(pq.read_metadata(io.BytesIO(r.content)).metadata[b"quiver.row_cap"])["truncated"] is False
    )


def test_the_servers_cap_is_the_reason_without_max_rows(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("capped"), limits={"max_rows": 1000})
    try:
        client = s.http(s.mint("agent", "demo", "capped"))
        r = post(client, JSON, sql="SELECT * FROM demo.orders")
        assert r.headers["x-quiver-truncated"] == "true"
        assert r.headers["x-quiver-max-rows-reason"] == "server_max_rows"
        doc = r.json()
        assert len(doc["rows"]) == 1000 and doc["truncated"] is True
        r = post(client, JSON, sql="SELECT 1 AS one", max_rows=1001)
        assert r.status_code == 400 and "between 1 and 1000" in r.json()["detail"]
    finally:
        s.stop()


# --- refusals: Flight's codes, nothing changed -----------------------------------------------------
BAD_SQL = [
    ("SELECT * FROM _quiver.tokens", 403, "PERMISSION_DENIED"),
    ("SELECT * FROM demo.nope", 403, "PERMISSION_DENIED"),
    ("DELETE FROM demo.orders", 403, "PERMISSION_DENIED"),
    ("SELECT * FROM read_csv('/etc/passwd')", 403, "PERMISSION_DENIED"),
    ("SELECT nope FROM demo.orders", 400, "INVALID_ARGUMENT"),
    ("SELEC 1", 400, "INVALID_ARGUMENT"),
    ("SELECT 1; SELECT 2", 400, "INVALID_ARGUMENT"),
    ("", 400, "INVALID_ARGUMENT"),
    ("SELECT CAST('x' AS INTEGER)", 400, "INVALID_ARGUMENT"),
]


def _orders(server: Server) -> int:
    with server.catalog.db.reading() as cur:
        row = cur.execute("SELECT count(*) FROM demo.orders").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(("sql", "status", "code"), BAD_SQL, ids=[b[0][:30] or "empty" for b in BAD_SQL])
def test_refusals_carry_flights_code_and_detail(
    server: Server, agent: httpx.Client, sql: str, status: int, code: str
) -> None:
    rows = _orders(server)
    r = post(agent, ARROW, sql=sql)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    opts = call_options(server.mint("agent", "demo", "http-reader"))
    with pytest.raises(flight.FlightError) as exc:
        info = server.flight().get_flight_info(cmd(kind="query", sql=sql), opts)
        server.flight().do_get(info.endpoints[0].ticket, opts).read_all()
    flight_error = error_info(exc.value)
    assert flight_error["code"] == code
    # The same words; Flight's GetFlightInfo binds through its LIMIT 0 probe, where DuckDB
    # leaves out the "(LINE n: ...)" context that the run itself reports.
    assert body["detail"].startswith(flight_error["detail"])
    assert _orders(server) == rows
    assert idle(server)


def test_missing_and_bad_tokens_are_401_and_audited(server: Server) -> None:
    before = server.http().get("/v1/audit", params={"action": "auth.failed"}).json()
    for client in (server.http(None), server.http("not-a-token")):
        r = client.post("/v1/query", json={"sql": "SELECT 1"})
        assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED"
        assert r.headers["www-authenticate"] == "Bearer"
    server.catalog.audit.flush()
    after = server.http().get("/v1/audit", params={"action": "auth.failed"}).json()
    assert len(after["events"]) >= len(before["events"]) + 2
    assert idle(server)


def test_admin_and_metrics_tokens_are_403(server: Server) -> None:
    r = server.http().post("/v1/query", json={"sql": "SELECT 1"})
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    assert "agent or swarm token" in r.json()["detail"]
    metrics = server.http(server.mint("metrics", None))
    assert metrics.post("/v1/query", json={"sql": "SELECT 1"}).status_code == 403


def test_a_swarm_token_may_query(server: Server) -> None:
    r = post(server.http(server.mint("swarm", "demo")), JSON, sql="SELECT count(*) AS n FROM demo.orders")
    assert r.status_code == 200 and r.json()["rows"] == [{"n": _orders(server)}]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"sql": "SELECT 1", "max_row": 3}, "max_row"),
        ({"sql": "SELECT 1", "max_rows": 0}, "max_rows"),
        ({"sql": "SELECT 1", "max_rows": "3"}, "max_rows"),
        ({"sql": 1}, "sql"),
        ({"params": []}, "sql"),
        (
            {
                "sql": "SELECT ?",
                "params": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            },
            "deep",
        ),
        ({"sql": "SELECT 1", "params": list(range(1001))}, "params"),
        ({"sql": "SELECT " + "1+" * 60_000 + "1"}, "sql"),
    ],
)
def test_bad_bodies_are_400_and_run_nothing(
    server: Server, agent: httpx.Client, body: dict[str, Any], fragment: str
) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    before = flight_server.streamer.executions
    r = agent.post("/v1/query", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "INVALID_ARGUMENT"
    assert fragment in r.json()["detail"] and len(r.json()["detail"]) <= 700
    assert flight_server.streamer.executions == before
    assert idle(server)


def test_not_json_is_415_and_no_body_is_400(agent: httpx.Client) -> None:
    r = agent.post(
        "/v1/query", content=b"sql=SELECT 1", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status_code == 415
    assert agent.post("/v1/query").status_code == 400


def test_csv_refuses_a_nested_column_before_the_first_byte(server: Server, agent: httpx.Client) -> None:
    r = post(agent, CSV, sql="SELECT [1, 2] AS l, 'x'::BLOB AS b")
    assert r.status_code == 400 and "CSV cannot hold" in r.json()["detail"]
    assert idle(server)
    r = post(agent, NDJSON, sql="SELECT [1, 2] AS l, {'k': 3} AS s")
    assert r.json() == {"l": [1, 2], "s": {"k": 3}}


def test_json_keeps_duplicate_names_and_writes_non_finite_floats_as_null(agent: httpx.Client) -> None:
    doc = post(agent, JSON, sql="SELECT 1 AS a, 2 AS a, 'nan'::DOUBLE AS f").json()
    assert doc["rows"] == [{"a": 1, "a_1": 2, "f": None}]


# --- failures while running -------------------------------------------------------------------------
def test_a_query_past_the_timeout_is_504(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("timeout"), limits={"query_timeout_seconds": 1})
    try:
        client = s.http(s.mint("agent", "demo", "slow"))
        r = post(client, JSON, sql="SELECT count(*) FROM range(1000000000000) t(x) WHERE x % 7 = 3")
        assert r.status_code == 504, r.text
        assert r.json()["error"] == "DEADLINE_EXCEEDED"
        assert wait_until(lambda: idle(s), what="the slot of the timed-out query given back")
        assert post(client, JSON, sql="SELECT 5 AS five").json()["rows"] == [{"five": 5}]
    finally:
        s.stop()


# --- admission: the slots are Flight's ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("httpquery-gated"),
        limits={"max_concurrent_queries": 2, "max_concurrent_total": 3, "admission_wait_seconds": 0.5},
    )
    yield s
    s.stop()


def test_a_principal_over_its_share_is_429_like_flight(gated: Server) -> None:
    token = gated.mint("agent", "demo", "busy")
    opts = call_options(token)
    client = gated.flight()
    held = [hold(client, long_ticket(client, opts), opts) for _ in range(2)]
    try:
        r = post(gated.http(token), JSON, sql="SELECT 1 AS one")
        assert r.status_code == 429
        assert r.json()["error"] == "RESOURCE_EXHAUSTED"
        assert "max_concurrent_queries" in r.json()["detail"]
        # Another principal still has its share.
        other = gated.http(gated.mint("agent", "demo", "calm"))
        assert post(other, JSON, sql="SELECT 2 AS two").json()["rows"] == [{"two": 2}]
    finally:
        for reader in held:
            reader.cancel()
    wait_until(lambda: idle(gated), what="held streams released")
    assert post(gated.http(token), JSON, sql="SELECT 1 AS one").status_code == 200


def test_the_global_bound_waits_then_refuses(gated: Server) -> None:
    a, b = (call_options(gated.mint("agent", "demo", n)) for n in ("fill-a", "fill-b"))
    client = gated.flight()
    held = [hold(client, long_ticket(client, a), a) for _ in range(2)]
    held.append(hold(client, long_ticket(client, b), b))
    try:
        r = post(gated.http(gated.mint("agent", "demo", "late")), JSON, sql="SELECT 3 AS three")
        assert r.status_code == 429 and "max_concurrent_total = 3" in r.json()["detail"]
    finally:
        for reader in held:
            reader.cancel()
    wait_until(lambda: idle(gated), what="held streams released")


def test_an_http_stream_holds_a_slot_flight_sees(gated: Server) -> None:
    """Two HTTP streams of one principal fill its share (2): Flight refuses its third query,
    and the slots come back when the streams end."""
    token = gated.mint("agent", "demo", "streamer")
    opts = call_options(token)
    client = gated.flight()
    first, second = gated.http(token), gated.http(token)
    with (
        first.stream("POST", "/v1/query", json={"sql": LONG}, headers={"accept": ARROW}) as r1,
        second.stream("POST", "/v1/query", json={"sql": LONG}, headers={"accept": CSV}) as r2,
    ):
        # Keep the iterators: a dropped one closes its response (httpx), a disconnect.
        chunks1, chunks2 = r1.iter_raw(), r2.iter_raw()
        assert (r1.status_code, r2.status_code) == (200, 200)
        assert next(chunks1) and next(chunks2)
        assert gated.runtime.flight is not None
        assert gated.runtime.flight.admission.active() == {"agent:demo/streamer": 2}
        with pytest.raises(flight.FlightServerError) as exc:
            client.get_flight_info(cmd(kind="query", sql="SELECT 11 AS x"), opts)
        assert error_info(exc.value)["code"] == "RESOURCE_EXHAUSTED"
        assert "max_concurrent_queries" in error_info(exc.value)["detail"]
    wait_until(lambda: idle(gated), what="both HTTP streams' slots given back")
    assert client.do_get(
        client.get_flight_info(cmd(kind="query", sql="SELECT 11 AS x"), opts).endpoints[0].ticket, opts
    ).read_all().column(0).to_pylist() == [11]


def test_a_client_that_disconnects_mid_stream_releases_its_slot(gated: Server) -> None:
    """The client reads a little of a long result and hangs up: the slot, the cursor and
    the deadline are given back, and the principal's share is whole again."""
    token = gated.mint("agent", "demo", "quitter")
    for accept in (ARROW, JSON):
        auth = {"authorization": f"Bearer {token}"}
        with (
            httpx.Client(base_url=gated.http_url, headers=auth) as http,
            http.stream("POST", "/v1/query", json={"sql": LONG}, headers={"accept": accept}) as r,
        ):
            assert r.status_code == 200
            assert r.headers["x-quiver-truncated"] == "unknown"
            chunks = r.iter_raw()
            assert next(chunks)
            assert gated.runtime.flight is not None
            assert gated.runtime.flight.admission.active() == {"agent:demo/quitter": 1}
        wait_until(lambda: idle(gated), what=f"the {accept} stream's slot given back after a disconnect")
    for _ in range(3):  # more than the share of 2: nothing leaked
        assert post(gated.http(token), JSON, sql="SELECT 4 AS four").json()["rows"] == [{"four": 4}]


def test_concurrent_http_queries_get_their_own_rows_or_429(gated: Server) -> None:
    """Eight threads of four principals query at once over HTTP: each answer is that
    query's own rows or a clean 429; nothing is left holding a slot."""
    tokens = [gated.mint("agent", "demo", f"racer{i}") for i in range(4)]
    results: list[tuple[int, int, Any]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with httpx.Client(base_url=gated.http_url, headers={"authorization": f"Bearer {tokens[i % 4]}"}) as c:
            for j in range(5):
                n = 1000 + i * 100 + j
                r = c.post(
                    "/v1/query",
                    json={"sql": "SELECT range AS v FROM range(?)", "params": [n]},
                    headers={"accept": ARROW},
                )
                body = pa.ipc.open_stream(r.content).read_all() if r.status_code == 200 else r.json()
                with lock:
                    results.append((n, r.status_code, body))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 40
    for n, status, body in results:
        if status == 200:
            assert body.column("v").to_pylist() == list(range(n))
        else:
            assert status == 429 and body["error"] == "RESOURCE_EXHAUSTED", body
    assert any(status == 200 for _, status, _ in results)
    wait_until(lambda: idle(gated), what="every slot given back")


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("httpquery-wait"),
        limits={"max_concurrent_total": 1, "admission_wait_seconds": 60},
    )
    yield s
    s.stop()


def test_an_http_query_over_the_global_bound_waits_for_a_slot(patient: Server) -> None:
    a = call_options(patient.mint("agent", "demo", "holder"))
    client = patient.flight()
    held = hold(client, long_ticket(client, a), a)
    got: dict[str, Any] = {}
    http = patient.http(patient.mint("agent", "demo", "waiter"))
    waiter = threading.Thread(target=lambda: got.setdefault("r", post(http, JSON, sql="SELECT 8 AS eight")))
    waiter.start()
    flight_server = patient.runtime.flight
    assert flight_server is not None
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting: the one slot is Flight's
    held.cancel()
    waiter.join(60)
    assert not waiter.is_alive()
    assert got["r"].status_code == 200 and got["r"].json()["rows"] == [{"eight": 8}]
    wait_until(lambda: idle(patient), what="idle")


def test_a_failure_mid_stream_cuts_the_connection_and_frees_the_slot(
    server: Server, agent: httpx.Client
) -> None:
    """A conversion error after the first batches were sent: the status is already 200, so
    the body ends without its last chunk — the client sees an incomplete body, never a
    short one that looks whole — and the slot is given back."""
    sql = (
        "SELECT CASE WHEN range < 2000000 THEN range ELSE CAST('x' || range AS BIGINT) END AS v "
        "FROM range(3000000)"
    )
    with (
        pytest.raises(httpx.RemoteProtocolError),
        agent.stream("POST", "/v1/query", json={"sql": sql}, headers={"accept": ARROW}) as r,
    ):
        assert r.status_code == 200
        for _ in r.iter_raw():
            pass
    wait_until(lambda: idle(server), what="the failed stream's slot given back")
    assert post(agent, JSON, sql="SELECT 6 AS six").json()["rows"] == [{"six": 6}]


def test_queries_waiting_for_admission_do_not_starve_the_other_routes(patient: Server) -> None:
    """More HTTP queries wait for the one slot than the server has worker threads (40):
    they wait on the query route's own pool, so an admin route still answers meanwhile."""
    a = call_options(patient.mint("agent", "demo", "hog"))
    client = patient.flight()
    held = hold(client, long_ticket(client, a), a)
    tokens = [patient.mint("agent", "demo", f"crowd{i}") for i in range(45)]
    answers: list[int] = []

    def wait_for_slot(token: str) -> None:
        with httpx.Client(
            base_url=patient.http_url, headers={"authorization": f"Bearer {token}"}, timeout=120
        ) as c:
            answers.append(c.post("/v1/query", json={"sql": "SELECT 1 AS one"}).status_code)

    crowd = [threading.Thread(target=wait_for_slot, args=(t,)) for t in tokens]
    for t in crowd:
        t.start()
    http = patient.runtime._http
    assert http is not None
    wait_until(lambda: len(http.server_state.connections) >= 45, what="the crowd connected")
    status: dict[str, int] = {}
    admin = threading.Thread(
        target=lambda: status.setdefault("code", patient.http().get("/v1/status").status_code)
    )
    admin.start()
    admin.join(60)
    try:
        assert status.get("code") == 200  # answered while every query still waits for the slot
        assert not answers
    finally:
        held.cancel()
        for t in crowd:
            t.join(120)
    assert answers == [200] * 45
    wait_until(lambda: idle(patient), what="idle")
