"""QuiverClient against a real server: every method, typed errors, parallel endpoints."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pyarrow as pa
import pytest

from quiver_client import QuiverClient, QuiverClientError, TruncatedResultWarning
from tests.harness import SMALL_SPLIT, Server, start_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("client"), flight=SMALL_SPLIT)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def qc(server: Server) -> Iterator[QuiverClient]:
    assert server.demo_token is not None
    with QuiverClient(server.flight_url, server.demo_token) as client:
        yield client


def duck(server: Server, sql: str) -> pa.Table:
    with server.catalog.db.reading() as cur:
        return cur.sql(sql).to_arrow_table()


def test_tables_and_schema(server: Server, qc: QuiverClient) -> None:
    listing = {t.name: t for t in qc.tables()}
    assert set(listing) == {"demo.customers", "demo.events", "demo.orders"}
    assert listing["demo.orders"].rows == 20_000
    assert qc.schema("demo.orders") == listing["demo.orders"].schema
    assert qc.schema(("demo", "orders")) == duck(server, "SELECT * FROM demo.orders LIMIT 0").schema


def test_read_and_read_stream_fetch_endpoints_in_parallel(server: Server, qc: QuiverClient) -> None:
    want = duck(server, "SELECT * FROM demo.events ORDER BY rowid")
    import pyarrow.flight as flight

    assert len(qc.info(flight.FlightDescriptor.for_path("demo", "events")).endpoints) > 1
    started = threading.active_count()
    assert qc.read("demo.events").equals(want)
    reader = qc.read_stream("demo.events")
    assert reader.schema == want.schema
    assert reader.read_all().equals(want)
    wait_until(lambda: threading.active_count() <= started, 10, 0.02, "no fetch thread left behind")


def test_abandoning_a_parallel_stream_stops_its_fetchers(qc: QuiverClient) -> None:
    before = threading.active_count()
    reader = qc.read_stream("demo.events")
    reader.read_next_batch()
    reader.close()
    del reader
    wait_until(lambda: threading.active_count() <= before, 10, what="the fetchers to stop")


def test_sample_profile_query(server: Server, qc: QuiverClient) -> None:
    first = qc.sample("demo.orders", 3)
    assert first.equals(duck(server, "SELECT * FROM demo.orders LIMIT 3"))
    random_rows = qc.sample("demo.orders", 50, method="random", seed=5, columns=["order_id"])
    assert random_rows.equals(qc.sample("demo.orders", 50, method="random", seed=5, columns=["order_id"]))
    assert qc.sample("demo.events", percent=10, seed=3).num_rows > 0
    profile = qc.profile("demo.customers", columns=["country"])
    assert profile.column("name").to_pylist() == ["country"]
    got = qc.query(
        "SELECT status, count(*) AS n FROM demo.orders WHERE quantity > ? GROUP BY 1 ORDER BY 1", [6]
    )
    assert got.equals(
        duck(server, "SELECT status, count(*) AS n FROM demo.orders WHERE quantity > 6 GROUP BY 1 ORDER BY 1")
    )
    with pytest.warns(TruncatedResultWarning):  # cut at 4 of 10 rows: said so (test_truncation.py)
        assert qc.query("SELECT * FROM range(10)", max_rows=4).num_rows == 4
    assert qc.query_schema("SELECT 1::TINYINT AS t, ?::VARCHAR AS s", ["x"]) == pa.schema(
        [("t", pa.int8()), ("s", pa.string())]
    )
    with qc.query_stream("SELECT range AS i FROM range(300000)") as reader:
        assert sum(b.num_rows for b in reader) == 300_000


def test_async_queries(qc: QuiverClient) -> None:
    query_id = qc.submit("SELECT count(*) AS n FROM demo.orders WHERE amount > ?", [100], max_rows=5)
    assert qc.wait(query_id)["state"] == "succeeded"
    assert qc.result(query_id).column("n")[0].as_py() > 0
    assert qc.result_stream(query_id).read_all().num_rows == 1
    slow = qc.submit("SELECT count(*) FROM range(1000000) a, range(1000000) b")
    cancelled = qc.cancel(slow)
    assert cancelled["cancel_requested"] or cancelled["state"] == "cancelled"
    assert qc.wait(slow)["state"] == "cancelled"
    with pytest.raises(QuiverClientError) as caught:
        qc.result(slow)
    assert caught.value.code == "CANCELLED"
    with pytest.raises(QuiverClientError) as caught:
        qc.status("q_unknown")
    assert caught.value.code == "NOT_FOUND"


def test_whoami_and_refresh(server: Server) -> None:
    with QuiverClient(server.flight_url, server.mint("agent", "demo", "refresher")) as client:
        me = client.whoami()
        assert me["agent"] == "refresher"
        issued = client.refresh_token(600)
        assert issued["jti"] != me["jti"]
        assert client.whoami()["jti"] == issued["jti"]  # the client switched to the new token
        assert set(client.actions()) >= {"whoami", "submit-query"}


@pytest.mark.parametrize(
    ("call", "code", "needle"),
    [
        (lambda c: c.query("SELECT * FROM demo.nope"), "PERMISSION_DENIED", "you may read"),
        (lambda c: c.query("DROP TABLE demo.orders"), "PERMISSION_DENIED", "not allowed"),
        (lambda c: c.query("SELEC 1"), "INVALID_ARGUMENT", "syntax error"),
        (lambda c: c.query("SELECT 1", max_rows=0), "INVALID_ARGUMENT", "max_rows"),
        (lambda c: c.sample("demo.orders", 0), "INVALID_ARGUMENT", "'rows'"),
        (lambda c: c.read("demo.secret"), "PERMISSION_DENIED", "not readable"),
        (lambda c: c.schema("demo.secret"), "PERMISSION_DENIED", "not readable"),
        (lambda c: c.query_schema("SELECT nope FROM demo.orders"), "INVALID_ARGUMENT", "nope"),
        (lambda c: c.read("nodot"), "INVALID_ARGUMENT", "schema.table"),
        (lambda c: c.result("q_unknown", wait=None), "NOT_FOUND", "q_unknown"),
        (lambda c: c.action("nope"), "INVALID_ARGUMENT", "unknown action"),
    ],
)
def test_errors_are_typed(qc: QuiverClient, call: object, code: str, needle: str) -> None:
    with pytest.raises(QuiverClientError) as caught:
        call(qc)  # type: ignore[operator]
    assert caught.value.code == code, caught.value
    assert needle.lower() in caught.value.detail.lower(), caught.value.detail
    assert "Traceback" not in caught.value.detail


def test_bad_token_is_unauthenticated_everywhere(server: Server) -> None:
    with QuiverClient(server.flight_url, "not-a-token") as client:
        for call in (
            client.tables,
            client.whoami,
            lambda: client.schema("demo.orders"),
            lambda: client.read("demo.orders"),
        ):
            with pytest.raises(QuiverClientError) as caught:
                call()
            assert caught.value.code == "UNAUTHENTICATED", caught.value


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (
        QuiverClient(f"grpc://127.0.0.1:{port}", "token", timeout=5) as client,
        pytest.raises(QuiverClientError) as caught,
    ):
        client.tables()
    assert caught.value.code == "UNAVAILABLE" and caught.value.retryable
