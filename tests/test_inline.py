"""Small results inline in GetFlightInfo (issue #10, target 2): a client that sends
``x-quiver-inline-bytes`` gets a small query result in the endpoint's ``app_metadata`` — one
round trip instead of two — and every other client sees the FlightInfo it always did.
Wire contract: proto_docs/descriptors.md ("Small results inline"); code:
flight_server/inline.py, flight_server/streams.py (``Streamer.inline``).

Real server on ephemeral ports, real DuckDB file, real pyarrow.flight clients, Quiver's own
client and the admin's HTTP API. Each test checks the rows against a second path (the DoGet of
the same ticket, or in-process DuckDB), and what the server counted (the query log, budgets,
``Streamer.inlined``, ``Streamer.executions``, and the ``quiver_inline_*`` metrics and
"queries" of /v1/status an operator reads).
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from prometheus_client.parser import text_string_to_metric_families

from catalog.status import Status
from flight_server.server import QuiverFlightServer
from quiver_client import QuiverClient, QuiverClientError, TruncatedResultError
from quiver_client.wire import INLINE_HEADER, INLINE_MAX_BYTES
from tests.harness import Server, call_options, error_info

_fresh = itertools.count(1)


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def inline_options(token: str, value: str | int) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(
        headers=[
            (b"authorization", f"Bearer {token}".encode()),
            (INLINE_HEADER.encode(), str(value).encode()),
        ],
        timeout=30,
    )


def point() -> tuple[str, int]:
    """A fresh point query on a demo table (a text no earlier test sent) and its order id."""
    k = 1000 + next(_fresh)
    return f"SELECT * FROM demo.orders WHERE order_id = {k}", k


def inlined(info: flight.FlightInfo) -> pa.Table | None:
    (endpoint,) = info.endpoints
    if not endpoint.app_metadata:
        return None
    return pa.ipc.open_stream(pa.py_buffer(endpoint.app_metadata)).read_all()


@pytest.fixture
def fs(server: Server) -> QuiverFlightServer:
    """The server's Flight service, whose counters the tests read (``server``: conftest.py)."""
    return server.flight_service


def my_queries(server: Server, token: str) -> list[dict[str, Any]]:
    (result,) = server.flight().do_action(
        flight.Action("my-queries", json.dumps({"limit": 50}).encode()), call_options(token)
    )
    return list(json.loads(result.body.to_pybytes())["queries"])


def test_a_point_query_comes_back_in_its_flight_info_and_is_recorded_once(
    server: Server, fs: QuiverFlightServer
) -> None:
    """The whole result is in the endpoint's app_metadata, equal to what the ticket's DoGet
    streams; the request is one query-log record with its rows, made by GetFlightInfo."""
    token = server.mint("agent", "demo", f"inline-{secrets.token_hex(3)}")
    client = server.flight()
    sql, k = point()
    before = fs.streamer.inlined
    info = client.get_flight_info(cmd(kind="query", sql=sql), inline_options(token, INLINE_MAX_BYTES))
    table = inlined(info)
    assert table is not None and fs.streamer.inlined == before + 1
    assert table.schema == info.schema and table.column("order_id").to_pylist() == [k]
    assert json.loads(info.app_metadata)["truncated"] is False  # known whole: not cut
    records = my_queries(server, token)
    assert [(r["kind"], r["outcome"], r["rows"], r["sql"]) for r in records] == [("query", "ok", 1, sql)]
    assert records[0]["bytes"] > 0
    # The ticket still works, for a client that ignores the inline rows: the same rows.
    again = client.do_get(info.endpoints[0].ticket, call_options(token)).read_all()
    assert again.equals(table)
    assert len(my_queries(server, token)) == 2


def inline_counts(server: Server) -> tuple[float, float, int, int]:
    """What an operator reads: ``quiver_inline_results_total`` and ``quiver_inline_bytes_total``
    from GET /metrics, ``inlined`` and ``inlined_bytes`` from "queries" of GET /v1/status."""
    http = server.http()
    metrics = http.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics.text)
        for sample in family.samples
    }
    r = http.get("/v1/status")
    assert r.status_code == 200, r.text
    queries = msgspec.json.decode(r.content, type=Status, strict=True).queries
    assert not isinstance(queries, msgspec.UnsetType)
    return (
        samples["quiver_inline_results_total"],
        samples["quiver_inline_bytes_total"],
        queries.inlined,
        queries.inlined_bytes,
    )


def test_an_inlined_result_is_counted_on_metrics_and_status(server: Server) -> None:
    """One inlined query: the counters went up by one, and the bytes by the size of the IPC
    stream in the endpoint's app_metadata; /metrics and /v1/status agree."""
    results, sent, count, count_bytes = inline_counts(server)
    assert (results, sent) == (count, count_bytes)
    sql, k = point()
    info = server.flight().get_flight_info(
        cmd(kind="query", sql=sql), inline_options(server.agent_token, INLINE_MAX_BYTES)
    )
    table = inlined(info)
    assert table is not None and table.column("order_id").to_pylist() == [k]
    size = len(info.endpoints[0].app_metadata)
    assert size > 0
    assert inline_counts(server) == (results + 1, sent + size, count + 1, count_bytes + size)


def test_a_result_not_inlined_is_not_counted(server: Server) -> None:
    """No header, a header of 0, or a result larger than asked: fetched by DoGet as before,
    and neither counter moved."""
    before = inline_counts(server)
    client = server.flight()
    token = server.agent_token
    for opts in (call_options(token), inline_options(token, 0)):
        sql, k = point()
        info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
        assert inlined(info) is None
        assert client.do_get(info.endpoints[0].ticket, opts).read_all().column("order_id").to_pylist() == [k]
    opts = inline_options(token, 64)
    k = next(_fresh)
    big = client.get_flight_info(cmd(kind="query", sql=f"SELECT range + {k} AS i FROM range(1000)"), opts)
    assert inlined(big) is None
    assert client.do_get(big.endpoints[0].ticket, opts).read_all().num_rows == 1000
    assert inline_counts(server) == before


def test_without_the_header_nothing_changes(server: Server, fs: QuiverFlightServer) -> None:
    """A client that does not ask gets no app_metadata on its endpoint (the FlightInfo of
    every other Flight client); a header of 0 is not asking."""
    client = server.flight()
    before = fs.streamer.inlined
    for opts in (call_options(server.agent_token), inline_options(server.agent_token, 0)):
        sql, k = point()
        info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
        assert inlined(info) is None
        table = client.do_get(info.endpoints[0].ticket, opts).read_all()
        assert table.column("order_id").to_pylist() == [k]
    assert fs.streamer.inlined == before


def test_what_is_not_inlined_goes_the_usual_way(server: Server, fs: QuiverFlightServer) -> None:
    """Larger than asked, cut at its row cap, or a table scan: no inline rows, and the DoGets
    give the whole answer as before (a cut one says so)."""
    client, opts = server.flight(), inline_options(server.agent_token, 64)
    before = fs.streamer.inlined
    k = next(_fresh)
    big = client.get_flight_info(cmd(kind="query", sql=f"SELECT range + {k} AS i FROM range(1000)"), opts)
    assert inlined(big) is None
    assert client.do_get(big.endpoints[0].ticket, opts).read_all().num_rows == 1000

    opts = inline_options(server.agent_token, INLINE_MAX_BYTES)
    cut_sql = f"SELECT range + {k} AS i FROM range(100)"
    cut = client.get_flight_info(cmd(kind="query", sql=cut_sql, max_rows=10), opts)
    assert inlined(cut) is None
    assert client.do_get(cut.endpoints[0].ticket, opts).read_all().num_rows == 10
    with QuiverClient(server.flight_url, server.agent_token, on_truncation="raise") as c:
        with pytest.raises(TruncatedResultError) as e:
            c.query(cut_sql + " ", max_rows=10)
        assert e.value.result is not None and e.value.result.num_rows == 10

    scan = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "orders"), opts)
    assert not any(e.app_metadata for e in scan.endpoints)  # a scan is streamed, never inlined
    assert fs.streamer.inlined == before


def test_a_cached_result_is_inlined_too(server: Server, fs: QuiverFlightServer) -> None:
    """The same text again is a result-cache hit: inlined from the cache, counted as a hit."""
    client, opts = server.flight(), inline_options(server.agent_token, INLINE_MAX_BYTES)
    sql, k = point()
    first = inlined(client.get_flight_info(cmd(kind="query", sql=sql), opts))
    hits = fs.streamer.cache.hits
    second = inlined(client.get_flight_info(cmd(kind="query", sql=sql), opts))
    assert first is not None and second is not None and second.equals(first)
    assert fs.streamer.cache.hits == hits + 1
    assert second.column("order_id").to_pylist() == [k]


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "12 34", "9" * 40, "", "0x10"])
def test_a_malformed_header_is_refused_before_any_work(
    server: Server, fs: QuiverFlightServer, value: str
) -> None:
    """INVALID_ARGUMENT naming the header (the value echoed bounded); nothing ran, nothing
    was held, no query recorded as spent."""
    token = server.mint("agent", "demo", f"bad-{secrets.token_hex(3)}")
    sql, _ = point()
    ran, inl, held = fs.streamer.executions, fs.streamer.inlined, fs.streamer.held_runs()
    opts = inline_options(token, value)
    with pytest.raises(flight.FlightServerError) as e:
        server.flight().get_flight_info(cmd(kind="query", sql=sql), opts)
    info = error_info(e.value)
    assert info["code"] == "INVALID_ARGUMENT" and INLINE_HEADER in info["detail"]
    assert len(info["detail"]) < 300 and "Traceback" not in str(e.value)
    assert (fs.streamer.executions, fs.streamer.inlined, fs.streamer.held_runs()) == (ran, inl, held)
    assert fs.admission.streams() == 0
    assert all(r["outcome"] != "ok" for r in my_queries(server, token))


def test_a_larger_ask_is_capped_at_the_server_s_limit(server: Server) -> None:
    """A client may ask for more than the server inlines: it gets at most 1 MiB inline."""
    client, opts = server.flight(), inline_options(server.agent_token, 10**11)
    k = next(_fresh)
    small = inlined(client.get_flight_info(cmd(kind="query", sql=f"SELECT {k} AS k"), opts))
    assert small is not None and small.column("k").to_pylist() == [k]
    rows = 300_000  # 2.4 MB of BIGINT: over the server's limit
    big = client.get_flight_info(cmd(kind="query", sql=f"SELECT range + {k} AS i FROM range({rows})"), opts)
    assert inlined(big) is None
    assert client.do_get(big.endpoints[0].ticket, opts).read_all().num_rows == rows


def test_rules_apply_to_inline_rows(server: Server) -> None:
    """A ruled table's inline rows are the rows the rules let through, masked: the same as
    the two-call path gives, and never the clear values."""
    admin = server.http()
    swarm = f"inline-rules-{secrets.token_hex(3)}"
    rule = {"table": "demo.customers", "row_filter": "country = 'NL'", "mask": {"email": "hash"}}
    assert admin.post("/v1/swarms", json={"name": swarm, "tables": [rule]}).status_code == 201
    token = server.mint("agent", swarm, "a")
    client = server.flight()
    sql = f"SELECT customer_id, email, country FROM demo.customers ORDER BY customer_id LIMIT {5 + next(_fresh)}"
    table = inlined(
        client.get_flight_info(cmd(kind="query", sql=sql), inline_options(token, INLINE_MAX_BYTES))
    )
    info = client.get_flight_info(cmd(kind="query", sql=sql + " "), call_options(token))
    assert inlined(info) is None
    two_calls = client.do_get(info.endpoints[0].ticket, call_options(token)).read_all()
    assert table is not None and table.num_rows > 0 and table.equals(two_calls)
    assert set(table.column("country").to_pylist()) == {"NL"}
    everyone = "SELECT customer_id, email FROM demo.customers WHERE country = 'NL'"
    clear = client.get_flight_info(cmd(kind="query", sql=everyone), call_options(server.admin_token))
    clear_rows = client.do_get(clear.endpoints[0].ticket, call_options(server.admin_token)).read_all()
    clear_emails = {r["customer_id"]: r["email"] for r in clear_rows.to_pylist()}
    shown = [r for r in table.to_pylist() if r["email"] is not None]
    assert shown and all(r["email"] != clear_emails[r["customer_id"]] for r in shown)


def test_inline_queries_spend_the_budgets(server: Server) -> None:
    """An inlined query is charged like any other: a queries_per_day budget of 2 refuses the
    third, and the rows are counted."""
    admin = server.http()
    swarm = f"inline-budget-{secrets.token_hex(3)}"
    assert admin.post("/v1/swarms", json={"name": swarm, "tables": ["demo.*"]}).status_code == 201
    assert admin.put(f"/v1/swarms/{swarm}/budget", json={"queries_per_day": 2}).status_code == 200
    token = server.mint("agent", swarm, "a")
    client, opts = server.flight(), inline_options(token, INLINE_MAX_BYTES)
    for _ in range(2):
        sql, _k = point()
        assert inlined(client.get_flight_info(cmd(kind="query", sql=sql), opts)) is not None
    with pytest.raises(flight.FlightError) as e:
        client.get_flight_info(cmd(kind="query", sql=point()[0]), opts)
    assert error_info(e.value)["code"] == "RESOURCE_EXHAUSTED"
    used = admin.get(f"/v1/swarms/{swarm}/usage").json()["usage"]
    assert used["queries"] == 2 and used["rows"] == 2


def test_quiver_client_takes_small_results_inline(server: Server, fs: QuiverFlightServer) -> None:
    """QuiverClient asks by default (``query`` and ``query_stream``), and not with
    ``inline_bytes=0``; the rows are the same either way, and it refuses a bad setting."""
    sql, k = point()
    with QuiverClient(server.flight_url, server.agent_token) as c:
        before = fs.streamer.inlined
        assert c.query(sql).column("order_id").to_pylist() == [k]
        assert c.query_stream(sql + " ").read_all().column("order_id").to_pylist() == [k]
        assert fs.streamer.inlined == before + 2
        assert c.query("SELECT range AS i FROM range(100000)").num_rows == 100_000  # 800 kB: inline
        assert c.query("SELECT range AS i FROM range(200000)").num_rows == 200_000  # 1.6 MB: fetched
        assert fs.streamer.inlined == before + 3
    with QuiverClient(server.flight_url, server.agent_token, inline_bytes=0) as c:
        before = fs.streamer.inlined
        assert c.query(sql + "  ").column("order_id").to_pylist() == [k]
        assert fs.streamer.inlined == before
    for bad in (-1, "1", 1.5):
        with pytest.raises(ValueError, match="inline_bytes"):
            QuiverClient(server.flight_url, server.agent_token, inline_bytes=bad)  # type: ignore[arg-type]


def test_a_malformed_inline_result_is_a_client_error() -> None:
    """An endpoint whose app_metadata is not an Arrow stream (never sent by Quiver) is a
    QuiverClientError naming it, not a pyarrow exception."""
    info = flight.FlightInfo(
        pa.schema([("x", pa.int64())]),
        flight.FlightDescriptor.for_command(b"{}"),
        [flight.FlightEndpoint(b"t", [], app_metadata=b"not arrow")],
        -1,
        -1,
    )
    with QuiverClient("grpc://127.0.0.1:1", "token") as c, pytest.raises(QuiverClientError) as e:
        c.fetch(info)
    assert e.value.code == "INTERNAL" and "not an Arrow stream" in e.value.detail
