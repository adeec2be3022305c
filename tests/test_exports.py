"""Exports on a real server (catalog/exports.py): a query's result streamed into a file
artefact in four formats, read back equal to the query; provenance (SQL, parameters,
principal, data versions); stale when a source changed; refresh re-runs as the same principal
under its current allowlist, over Flight (QuiverClient) and HTTP; refusals keep nothing."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from catalog import TableRef
from catalog.tables import TableCatalog
from quiver_client import QuiverClient, QuiverClientError
from tests.harness import Server, start_server, wait_until
from tests.test_http_query import _same_json_value, flight_table

ORDERS = "SELECT * FROM demo.orders WHERE order_id > ? ORDER BY order_id LIMIT 900"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("exports"))
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA shop")
        cur.execute("CREATE TABLE shop.items AS SELECT range AS id, 'item ' || range AS label FROM range(5)")
        TableCatalog.bump_version(cur, TableRef("shop", "items"))
        cur.execute("CREATE TABLE shop.prices AS SELECT range AS id, range * 1.5 AS price FROM range(5)")
        TableCatalog.bump_version(cur, TableRef("shop", "prices"))
    r = s.http().post("/v1/swarms", json={"name": "buyers", "tables": ["shop.*", "demo.orders"]})
    assert r.status_code == 201, r.text
    yield s
    s.stop()


def client(server: Server, token: str) -> QuiverClient:
    c = QuiverClient(server.flight_url, token=token)
    server._clients.append(c)
    return c


@pytest.fixture(scope="module")
def demo(server: Server) -> QuiverClient:
    assert server.demo_token is not None
    return client(server, server.demo_token)


def content(server: Server, artefact_id: str) -> bytes:
    """The artefact's bytes as the store keeps them (what GET …/content serves)."""
    admin = server.catalog.tokens.check(server.admin_token)
    _, path = server.catalog.artefacts.content_path(admin, artefact_id)
    return Path(path).read_bytes()


def artefact_count(server: Server) -> int:
    with server.catalog.db.reading() as cur:
        row = cur.execute("SELECT count(*) FROM _quiver.artefacts").fetchone()
    assert row is not None
    return int(row[0])


def stored_files(server: Server) -> set[str]:
    return {p.name for p in (server.data_dir / "artefacts").iterdir()}


def read(fmt: str, data: bytes, schema: pa.Schema) -> pa.Table | list[dict[str, Any]]:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt == "arrow":
        return pa.ipc.open_stream(data).read_all()
    if fmt == "csv":
        types = {f.name: f.type for f in schema}
        return pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(column_types=types))
    return [json.loads(line, parse_float=Decimal) for line in data.splitlines()]


def assert_same(got: pa.Table | list[dict[str, Any]], want: pa.Table) -> None:
    if isinstance(got, pa.Table):
        assert got.schema.names == want.schema.names
        assert got.cast(want.schema).equals(want)
        return
    rows = want.to_pylist()
    assert len(got) == len(rows)
    for g, w in zip(got, rows, strict=True):
        assert list(g) == list(w) and all(_same_json_value(g[k], w[k]) for k in w), (g, w)


MEDIA = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
    "ndjson": "application/x-ndjson",
    "arrow": "application/vnd.apache.arrow.stream",
}


@pytest.mark.parametrize("fmt", list(MEDIA))
def test_an_export_reads_back_equal_to_the_query(server: Server, demo: QuiverClient, fmt: str) -> None:
    want = flight_table(server, ORDERS, [3])
    info = demo.export(ORDERS, [3], format=fmt, name=f"orders.{fmt}", tags=["t1"])
    art = info["artefact"]
    assert art["kind"] == "file" and art["format"] == fmt and art["media_type"] == MEDIA[fmt]
    assert art["name"] == f"orders.{fmt}" and art["tags"] == ["t1"]
    assert info["download"] == f"/v1/artefacts/{art['id']}/content"
    assert (info["rows"], info["truncated"], info["stale"], info["changed"]) == (900, False, False, [])
    assert art["stale"] is False
    version = server.runtime.flight.versions.current()[("demo", "orders")]  # type: ignore[union-attr]
    assert art["provenance"] == {
        "sql": ORDERS,
        "params": [3],
        "principal": "agent:demo/demo-agent",
        "source_versions": {"demo.orders": version},
        "parent_id": None,
        "max_rows": None,
    }
    assert_same(read(fmt, content(server, art["id"]), want.schema), want)


def test_a_table_export_is_every_row_of_the_table(server: Server, demo: QuiverClient) -> None:
    info = demo.export(table="demo.customers", format="arrow")
    want = demo.read("demo.customers")
    got = pa.ipc.open_stream(content(server, info["artefact"]["id"])).read_all()
    assert got.sort_by("customer_id").equals(want.sort_by("customer_id"))
    assert list(info["artefact"]["provenance"]["source_versions"]) == ["demo.customers"]


def test_a_cut_export_says_so(server: Server, demo: QuiverClient) -> None:
    info = demo.export("SELECT * FROM demo.orders ORDER BY order_id", max_rows=40, format="parquet")
    assert (info["rows"], info["truncated"], info["max_rows"]) == (40, True, 40)
    meta = pq.read_metadata(io.BytesIO(content(server, info["artefact"]["id"])))
    assert meta.num_rows == 40
    assert json.loads(meta.metadata[b"quiver.row_cap"]) == {
        "max_rows": 40,
        "reason": "max_rows",
        "truncated": True,
    }


def test_a_refresh_keeps_the_exports_own_max_rows(server: Server, demo: QuiverClient) -> None:
    first = demo.export("SELECT * FROM demo.orders ORDER BY order_id", max_rows=7, format="arrow")
    assert first["artefact"]["provenance"]["max_rows"] == 7
    again = demo.refresh(first["artefact"]["id"])
    assert (again["rows"], again["truncated"], again["max_rows"]) == (7, True, 7)
    assert again["artefact"]["provenance"]["max_rows"] == 7
    assert pa.ipc.open_stream(content(server, again["artefact"]["id"])).read_all().num_rows == 7


def test_a_large_export_streams_through(server: Server, demo: QuiverClient) -> None:
    """Three million rows (larger than the result cache's entries and the head): the
    batches go to the file as DuckDB makes them."""
    info = demo.export("SELECT range AS v, range % 7 AS k FROM range(3000000)", format="parquet")
    assert info["rows"] == 3_000_000 and info["truncated"] is False
    meta = pq.read_metadata(io.BytesIO(content(server, info["artefact"]["id"])))
    assert meta.num_rows == 3_000_000 and meta.num_row_groups >= 2


# --- refusals keep nothing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        ({"query": "SELECT * FROM _quiver.tokens"}, "PERMISSION_DENIED", "not readable"),
        ({"table": "shop.items"}, "PERMISSION_DENIED", "not readable"),
        ({"query": "SELECT nope FROM demo.orders"}, "INVALID_ARGUMENT", "nope"),
        ({"query": "SELECT 1", "table": "demo.orders"}, "INVALID_ARGUMENT", "exactly one"),
        ({}, "INVALID_ARGUMENT", "exactly one"),
        ({"query": "SELECT 1", "format": "xlsx"}, "INVALID_ARGUMENT", "format"),
        ({"query": "SELECT 1", "ttl_seconds": 10**9}, "INVALID_ARGUMENT", "ttl"),
        ({"query": "SELECT 1", "name": ""}, "INVALID_ARGUMENT", "name"),
        ({"query": "SELECT [1] AS l", "format": "csv"}, "INVALID_ARGUMENT", "CSV cannot hold"),
        ({"query": "SELECT 1", "bogus": 1}, "INVALID_ARGUMENT", "bogus"),
        ({"query": "SELECT 1", "max_rows": 0}, "INVALID_ARGUMENT", "max_rows"),
    ],
)
def test_a_refused_export_keeps_nothing(
    server: Server, demo: QuiverClient, body: dict[str, Any], code: str, fragment: str
) -> None:
    count, files = artefact_count(server), stored_files(server)
    with pytest.raises(QuiverClientError) as exc:
        demo.action("export", body)
    assert exc.value.code == code, exc.value
    assert fragment in exc.value.detail.lower() or fragment in exc.value.detail
    assert artefact_count(server) == count and stored_files(server) == files


def test_a_failure_mid_export_keeps_nothing(server: Server, demo: QuiverClient) -> None:
    """The query fails after its first batches were written: the half-written file goes."""
    count, files = artefact_count(server), stored_files(server)
    sql = "SELECT CASE WHEN range < 2000000 THEN range ELSE CAST('x' || range AS BIGINT) END AS v FROM range(3000000)"
    with pytest.raises(QuiverClientError) as exc:
        demo.export(sql, format="csv")
    assert exc.value.code == "INVALID_ARGUMENT" and "Conversion" in exc.value.detail
    assert artefact_count(server) == count and stored_files(server) == files
    flight_server = server.runtime.flight
    assert flight_server is not None and flight_server.admission.streams() == 0


# --- stale and refresh ---------------------------------------------------------------------------------
def _add_item(server: Server, n: int) -> None:
    with server.catalog.db.transaction() as cur:
        cur.execute("INSERT INTO shop.items VALUES (?, ?)", [n, f"item {n}"])
        TableCatalog.bump_version(cur, TableRef("shop", "items"))


def test_a_stale_export_says_so_and_refresh_gives_the_new_answer(server: Server) -> None:
    token = server.mint("agent", "buyers", "b1")
    buyer = client(server, token)
    sql = "SELECT i.id, i.label, p.price FROM shop.items i JOIN shop.prices p USING (id) WHERE i.id >= ? ORDER BY i.id"
    first = buyer.export(sql, [0], format="ndjson", name="items.ndjson")
    old = first["artefact"]
    assert old["stale"] is False
    principal = server.catalog.tokens.check(token)
    assert server.catalog.artefacts.get(principal, old["id"]).stale is False
    with server.catalog.db.transaction() as cur:
        cur.execute("INSERT INTO shop.prices VALUES (5, 7.5)")
        TableCatalog.bump_version(cur, TableRef("shop", "prices"))
    _add_item(server, 5)
    # The metadata, read again, says it is stale (and which sources changed).
    assert server.catalog.artefacts.get(principal, old["id"]).stale is True
    described = server.catalog.exports.describe(server.catalog.artefacts.get(principal, old["id"]))
    assert described.stale is True and described.changed == ["shop.items", "shop.prices"]
    page = server.catalog.artefacts.list(principal)
    assert [a.stale for a in page.items if a.id == old["id"]] == [True]
    refreshed = buyer.refresh(old["id"])
    new = refreshed["artefact"]
    assert new["id"] != old["id"] and new["provenance"]["parent_id"] == old["id"]
    assert new["stale"] is False and refreshed["rows"] == 6
    assert (new["name"], new["format"], new["provenance"]["sql"]) == ("items.ndjson", "ndjson", sql)
    rows = [json.loads(line) for line in content(server, new["id"]).splitlines()]
    assert rows[-1] == {"id": 5, "label": "item 5", "price": 7.5}
    # The old one is as it was: five rows, still stale.
    assert len(content(server, old["id"]).splitlines()) == 5
    assert server.catalog.artefacts.get(principal, old["id"]).stale is True


def test_refresh_after_the_allowlist_is_narrowed_is_refused_and_creates_nothing(server: Server) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "narrowed", "tables": ["shop.*"]}).status_code == 201
    token = server.mint("agent", "narrowed", "n1")
    agent = client(server, token)
    info = agent.export("SELECT * FROM shop.prices ORDER BY id", format="parquet")
    r = http.put("/v1/swarms/narrowed/allowlist", json={"tables": ["shop.items"]})
    assert r.status_code == 200, r.text
    count, files = artefact_count(server), stored_files(server)
    with pytest.raises(QuiverClientError) as exc:
        agent.refresh(info["artefact"]["id"])
    assert exc.value.code == "PERMISSION_DENIED" and "shop.prices" in exc.value.detail
    r = server.http(token).post(f"/v1/artefacts/{info['artefact']['id']}/refresh")
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    assert artefact_count(server) == count and stored_files(server) == files
    # Widened again, the same refresh works.
    assert http.put("/v1/swarms/narrowed/allowlist", json={"tables": ["shop.*"]}).status_code == 200
    again = agent.refresh(info["artefact"]["id"])
    assert again["artefact"]["provenance"]["parent_id"] == info["artefact"]["id"]


def test_refresh_over_http(server: Server) -> None:
    token = server.mint("agent", "buyers", "h1")
    info = client(server, token).export("SELECT count(*) AS n FROM shop.items", format="csv")
    aid = info["artefact"]["id"]
    _add_item(server, 100 + len(aid) % 50)
    r = server.http(token).post(f"/v1/artefacts/{aid}/refresh", json={"ttl_seconds": 600})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["artefact"]["provenance"]["parent_id"] == aid and body["stale"] is False
    assert body["download"] == f"/v1/artefacts/{body['artefact']['id']}/content"
    n_new = int(content(server, body["artefact"]["id"]).decode().splitlines()[1])
    n_old = int(content(server, aid).decode().splitlines()[1])
    assert n_new == n_old + 1


@pytest.mark.parametrize(
    ("who", "status", "code"),
    [
        ("other-agent", 403, "PERMISSION_DENIED"),
        ("other-swarm", 404, "NOT_FOUND"),
        ("none", 401, "UNAUTHENTICATED"),
    ],
)
def test_only_the_exporter_may_refresh(server: Server, who: str, status: int, code: str) -> None:
    owner = client(server, server.mint("agent", "buyers", "owner"))
    aid = owner.export("SELECT 1 AS one", format="csv")["artefact"]["id"]
    count, files = artefact_count(server), stored_files(server)
    tokens = {
        "other-agent": server.mint("agent", "buyers", "someone-else"),
        "other-swarm": server.mint("agent", "demo", "outsider"),
        "none": None,
    }
    r = server.http(tokens[who]).post(f"/v1/artefacts/{aid}/refresh")
    assert (r.status_code, r.json()["error"]) == (status, code)
    assert artefact_count(server) == count and stored_files(server) == files


def test_refresh_of_an_unknown_or_uploaded_artefact(server: Server, demo: QuiverClient) -> None:
    with pytest.raises(QuiverClientError) as exc:
        demo.refresh("01900000-0000-7000-8000-000000000000")
    assert exc.value.code == "NOT_FOUND"
    uploaded = demo.put_table(pa.table({"x": [1, 2]}), name="up")
    with pytest.raises(QuiverClientError) as exc:
        demo.refresh(uploaded["id"])
    assert exc.value.code == "INVALID_ARGUMENT" and "not exported from a query" in exc.value.detail
    r = demo_http(server).post("/v1/artefacts/" + "x" * 5000 + "/refresh")
    assert r.status_code == 404 and len(r.json()["detail"]) < 600


def demo_http(server: Server) -> Any:
    return server.http(server.demo_token)


def test_concurrent_exports_and_refreshes(server: Server) -> None:
    """Threads export and refresh at once: each gets its own artefact with its own rows."""
    token = server.mint("agent", "buyers", "racer")
    base = client(server, token).export("SELECT id FROM shop.items ORDER BY id", format="arrow")
    errors: list[BaseException] = []
    ids: list[str] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            c = QuiverClient(server.flight_url, token=token)
            try:
                if i % 2:
                    got = c.refresh(base["artefact"]["id"])
                    assert got["artefact"]["provenance"]["parent_id"] == base["artefact"]["id"]
                else:
                    got = c.export("SELECT range AS v FROM range(?)", [1000 + i], format="parquet")
                    assert got["rows"] == 1000 + i
                with lock:
                    ids.append(got["artefact"]["id"])
            finally:
                c.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]  # the share is 4
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(set(ids)) == 4


# --- async exports: progress in query-status -------------------------------------------------------
def test_an_async_export_reports_progress_and_its_artefact(server: Server, demo: QuiverClient) -> None:
    answer = demo.action(
        "export", {"query": "SELECT range AS v FROM range(?)", "params": [200_000], "async": True}
    )
    assert answer["state"] == "queued" and answer["kind"] == "export"
    done = demo.wait(answer["id"])
    assert done["state"] == "succeeded", done
    assert done["rows"] == 200_000 and done["bytes"] > 0
    export = done["export"]
    assert export["rows"] == 200_000 and export["artefact"]["provenance"]["params"] == [200_000]
    got = pq.read_table(io.BytesIO(content(server, export["artefact"]["id"])))
    assert got.column("v").to_pylist() == list(range(200_000))
    # An export's id names no result to fetch.
    with pytest.raises(QuiverClientError) as exc:
        demo.result(answer["id"], wait=None)
    assert exc.value.code == "INVALID_ARGUMENT" and "export" in exc.value.detail


def test_an_async_export_can_be_watched_and_cancelled_and_keeps_nothing(server: Server) -> None:
    token = server.mint("agent", "buyers", "watcher")
    watcher = client(server, token)
    count, files = artefact_count(server), stored_files(server)
    answer = watcher.action(
        "export", {"query": "SELECT range AS v FROM range(2000000000)", "format": "csv", "async": True}
    )
    running = wait_until(
        lambda: (s := watcher.status(answer["id"]))["state"] == "running" and s["rows"] > 0 and s,
        what="the export's progress",
    )
    assert running["bytes"] > 0
    watcher.cancel(answer["id"])
    final = watcher.wait(answer["id"])
    assert final["state"] == "cancelled" and final["export"] is None
    assert artefact_count(server) == count
    wait_until(lambda: stored_files(server) == files, what="the partial export removed")
    flight_server = server.runtime.flight
    assert flight_server is not None
    wait_until(lambda: flight_server.admission.streams() == 0, what="the export's slot given back")


def test_an_async_export_is_refused_at_once(demo: QuiverClient) -> None:
    before = demo.action("export", {"query": "SELECT 1 AS one", "async": True})
    demo.wait(before["id"])
    with pytest.raises(QuiverClientError) as exc:
        demo.action("export", {"query": "SELECT * FROM _quiver.tokens", "async": True})
    assert exc.value.code == "PERMISSION_DENIED"
    with pytest.raises(QuiverClientError) as exc:
        demo.action("export", {"query": "SELEC 1", "async": True})
    assert exc.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("body", [{"name": ""}, {"ttl_seconds": 0}, {"tags": ["x" * 500]}])
def test_a_bad_artefact_field_is_refused_before_the_query_runs(
    server: Server, demo: QuiverClient, body: dict[str, Any]
) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    before, count, files = flight_server.streamer.executions, artefact_count(server), stored_files(server)
    with pytest.raises(QuiverClientError) as exc:
        demo.action("export", {"query": "SELECT 12345 AS fresh_text", **body})
    assert exc.value.code == "INVALID_ARGUMENT"
    assert flight_server.streamer.executions == before
    assert artefact_count(server) == count and stored_files(server) == files


def test_exports_and_refreshes_over_the_quota_leave_usage_unchanged(tmp_path: Path) -> None:
    """An export whose result passes the swarm's byte quota midway, and a refresh when the
    swarm keeps its most artefacts: RESOURCE_EXHAUSTED naming the limit, usage, files and
    metadata as before, the query's slot given back."""
    s = start_server(tmp_path / "data", artefacts={"swarm_quota_bytes": 200_000, "swarm_quota_count": 2})
    try:
        assert s.demo_token is not None
        agent = client(s, s.demo_token)
        store = s.catalog.artefacts
        small = agent.export("SELECT status, count(*) AS n FROM demo.orders GROUP BY ALL", format="csv")
        before, count, files = store.usage("demo"), artefact_count(s), stored_files(s)
        with pytest.raises(QuiverClientError) as exc:
            agent.export("SELECT * FROM demo.orders", format="csv")  # ≈1 MB of CSV
        assert exc.value.code == "RESOURCE_EXHAUSTED" and "swarm_quota_bytes (200000)" in exc.value.detail
        assert store.usage("demo") == before and artefact_count(s) == count and stored_files(s) == files
        flight_server = s.runtime.flight
        assert flight_server is not None and flight_server.admission.streams() == 0
        agent.export("SELECT 1 AS one", format="ndjson")  # the second and last one the count allows
        before, count, files = store.usage("demo"), artefact_count(s), stored_files(s)
        with pytest.raises(QuiverClientError) as exc:
            agent.refresh(small["artefact"]["id"])
        assert exc.value.code == "RESOURCE_EXHAUSTED" and "swarm_quota_count (2)" in exc.value.detail
        r = s.http(s.demo_token).post(f"/v1/artefacts/{small['artefact']['id']}/refresh")
        assert r.status_code == 413 and r.json()["error"] == "RESOURCE_EXHAUSTED", r.text
        assert store.usage("demo") == before and artefact_count(s) == count and stored_files(s) == files
    finally:
        s.stop()
