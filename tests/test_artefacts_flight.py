"""Tabular artefacts over Flight (DoPut, GetFlightInfo, DoGet) and in SQL (``artefacts."<id>"``),
against a real server with real clients: pyarrow.flight, quiver_client, and — for the one
thing a conforming Flight client cannot send, a second schema midway through an upload — raw
gRPC frames. A client killed mid-upload: tests/test_artefacts_disconnect.py."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog.artefacts import TEMP_PREFIX
from quiver_client import QuiverClient, QuiverClientError
from tests.harness import Server, call_options, error_info, start_server, wait_until

QUOTA = 3_000_000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("artefacts"),
        artefacts={
            "swarm_quota_bytes": QUOTA,
            "max_upload_bytes": 2_500_000,
            "cleanup_interval_seconds": 0.2,
        },
    )
    http = s.http()
    for name, tables in (("art1", ["demo.customers"]), ("art2", ["demo.customers"]), ("art3", [])):
        assert http.post("/v1/swarms", json={"name": name, "tables": tables}).status_code == 201
    yield s
    s.stop()


def sample_table(rows: int = 50_000) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array(range(1, rows + 1), pa.int64()),
            "score": pa.array([i / 7 if i % 11 else None for i in range(rows)], pa.float64()),
            "label": pa.array([f"row-{i}" if i % 13 else None for i in range(rows)], pa.string()),
            "day": pa.array(
                [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=i % 400) for i in range(rows)]
            ),
            "tags": pa.array([[str(i % 3)] * (i % 3) for i in range(rows)], pa.list_(pa.string())),
        }
    )


def client(s: Server, token: str) -> QuiverClient:
    return QuiverClient(s.flight_url, token)


def artefact_files(s: Server) -> list[str]:
    return sorted(os.listdir(s.catalog.artefacts.directory))


def get_info(s: Server, token: str, artefact_id: str) -> flight.FlightInfo:
    cmd = json.dumps({"kind": "artefact", "id": artefact_id}).encode()
    return s.flight().get_flight_info(flight.FlightDescriptor.for_command(cmd), call_options(token))


def refusal(fn: Any) -> dict[str, Any]:
    with pytest.raises(flight.FlightError) as e:
        fn()
    return error_info(e.value)


def sql(s: Server, token: str, text: str) -> pa.Table:
    return client(s, token).query(text)


def sql_refusal(s: Server, token: str, text: str) -> QuiverClientError:
    with pytest.raises(QuiverClientError) as e:
        client(s, token).query(text)
    return e.value


# --- round trips ------------------------------------------------------------------------------------
def test_round_trip_is_equal_and_stored_under_the_id(srv: Server) -> None:
    token = srv.mint("agent", "art1", "a1")
    data = sample_table()
    passwd = Path("/etc/passwd").read_bytes()
    meta = client(srv, token).put_table(data, "../../etc/passwd", tags=["rt"], description="round trip")
    assert meta["name"] == "../../etc/passwd" and meta["rows"] == data.num_rows
    assert meta["sql_name"] == f'artefacts."{meta["id"]}"'
    assert (srv.catalog.artefacts.directory / meta["id"]).is_file()
    assert not (srv.data_dir / "etc").exists() and Path("/etc/passwd").read_bytes() == passwd
    assert artefact_files(srv).count(meta["id"]) == 1
    got = client(srv, token).get_artefact(meta["id"])
    assert got.equals(data)
    info = get_info(srv, token, meta["id"])
    assert info.total_records == data.num_rows and info.schema.equals(data.schema)
    streamed = client(srv, token).get_artefact_stream(meta["id"]).read_all()
    assert streamed.equals(data)


def test_empty_and_streamed_uploads(srv: Server) -> None:
    token = srv.mint("agent", "art1", "a1")
    empty = pa.table({"x": pa.array([], pa.int32())})
    meta = client(srv, token).put_table(empty, "empty")
    assert meta["rows"] == 0
    assert client(srv, token).get_artefact(meta["id"]).equals(empty)
    data = sample_table(10_000)
    reader = pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=1000))
    meta = client(srv, token).put_table(reader, "streamed")
    assert client(srv, token).get_artefact(meta["id"]).equals(data)


# --- visibility ---------------------------------------------------------------------------------------
def test_visibility_matrix_through_flight_and_sql(srv: Server) -> None:
    owner = srv.mint("agent", "art1", "a1")
    mate = srv.mint("agent", "art1", "a2")
    other = srv.mint("agent", "art2", "b1")
    shared = srv.mint("agent", "art3", "c1")
    shared_mate = srv.mint("agent", "art3", "c2")
    admin = srv.admin_token
    data = pa.table({"customer_id": pa.array([1, 2, 3], pa.int64()), "v": ["x", "y", "z"]})
    meta = client(srv, owner).put_table(data, "visible")
    aid = meta["id"]
    srv.catalog.artefacts.share(srv.catalog.tokens.verify(owner), aid, "art3", "c1")
    missing = "01a00000-0000-7000-8000-000000000000"
    join = (
        'SELECT a.v, c.customer_id FROM artefacts."{id}" AS a '
        "JOIN demo.customers AS c USING (customer_id) ORDER BY a.v"
    )
    for token in (owner, mate, admin, shared):
        assert client(srv, token).get_artefact(aid).equals(data)
        if token != shared:  # art3 may read no warehouse table: the artefact alone
            assert sql(srv, token, join.format(id=aid)).column("v").to_pylist() == ["x", "y", "z"]
        assert sql(srv, token, f'SELECT count(*) AS n FROM artefacts."{aid}"').column("n").to_pylist() == [3]
    for token in (other, shared_mate):
        seen = refusal(lambda t=token: get_info(srv, t, aid))
        never = refusal(lambda t=token: get_info(srv, t, missing))
        assert seen["code"] == never["code"] == "NOT_FOUND"
        assert seen["detail"].replace(aid, missing) == never["detail"]
        # SQL: exactly the refusal of a missing table.
        hidden = sql_refusal(srv, token, f'SELECT * FROM artefacts."{aid}"')
        absent = sql_refusal(srv, token, f'SELECT * FROM artefacts."{missing}"')
        assert hidden.code == absent.code == "PERMISSION_DENIED"
        assert hidden.detail.replace(aid, missing) == absent.detail
        no_table = sql_refusal(srv, token, "SELECT * FROM demo.no_such_table")
        assert no_table.detail.split(":", 1)[1] == absent.detail.split(":", 1)[1]
    # Never a data table: not listed, not allowlistable.
    listed = [f.descriptor.path for f in srv.flight().list_flights(options=call_options(admin))]
    assert all(p[0] != b"artefacts" for p in listed)
    r = srv.http().put("/v1/swarms/art2/allowlist", json={"tables": ["artefacts.*"]})
    assert r.status_code == 400 and "artefacts" in r.json()["detail"]
    assert srv.http().get("/v1/swarms/art2/allowlist").json()["tables"] == ["demo.customers"]


def test_unshare_delete_and_tickets_take_effect_at_once(srv: Server) -> None:
    owner = srv.mint("swarm", "art1")
    reader = srv.mint("agent", "art2", "b1")
    store = srv.catalog.artefacts
    meta = client(srv, owner).put_table(pa.table({"x": [1]}), "shared")
    aid = meta["id"]
    store.share(srv.catalog.tokens.verify(owner), aid, "art2")
    query = f'SELECT x FROM artefacts."{aid}"'
    assert sql(srv, reader, query).column("x").to_pylist() == [1]  # the guard's verdict is cached now
    info = get_info(srv, reader, aid)
    sql_info = srv.flight().get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": query}).encode()),
        call_options(reader),
    )
    store.unshare(srv.catalog.tokens.verify(owner), aid, "art2")
    assert sql_refusal(srv, reader, query).code == "PERMISSION_DENIED"
    ticket_refusal = refusal(
        lambda: srv.flight().do_get(info.endpoints[0].ticket, call_options(reader)).read_all()
    )
    assert ticket_refusal["code"] == "NOT_FOUND"
    sql_ticket = refusal(
        lambda: srv.flight().do_get(sql_info.endpoints[0].ticket, call_options(reader)).read_all()
    )
    assert sql_ticket["code"] == "PERMISSION_DENIED"
    store.delete(srv.catalog.tokens.verify(owner), aid)
    assert sql_refusal(srv, owner, query).code == "PERMISSION_DENIED"
    assert refusal(lambda: get_info(srv, owner, aid))["code"] == "NOT_FOUND"


# --- bad uploads keep nothing -----------------------------------------------------------------------
def _put_refusal(s: Server, token: str, command: Any, data: pa.Table | None = None) -> dict[str, Any]:
    data = data if data is not None else pa.table({"x": [1, 2]})
    raw = command if isinstance(command, bytes) else json.dumps(command).encode()
    descriptor = (
        flight.FlightDescriptor.for_path("demo", "x")
        if command == "PATH"
        else flight.FlightDescriptor.for_command(raw)
    )

    def put() -> None:
        writer, results = s.flight().do_put(descriptor, data.schema, call_options(token))
        try:
            writer.write_table(data)
            writer.done_writing()
            results.read()
        finally:
            writer.close()

    return refusal(put)


def test_bad_uploads_are_refused_and_keep_nothing(srv: Server) -> None:
    token = srv.mint("agent", "art2", "bad")
    store = srv.catalog.artefacts
    before_files, before_usage = artefact_files(srv), store.usage("art2")
    cases: list[tuple[Any, str, str]] = [
        ({"kind": "artefact", "id": "x", "name": "n"}, "INVALID_ARGUMENT", "assigns its id"),
        ({"kind": "artefact"}, "INVALID_ARGUMENT", '"name"'),
        ({"kind": "artefact", "name": ""}, "INVALID_ARGUMENT", "empty"),
        ({"kind": "artefact", "name": "n" * 300}, "INVALID_ARGUMENT", "at most 255"),
        ({"kind": "artefact", "name": "n", "tags": "x"}, "INVALID_ARGUMENT", "tags"),
        ({"kind": "artefact", "name": "n", "tags": ["t"] * 40}, "INVALID_ARGUMENT", "at most 32"),
        ({"kind": "artefact", "name": "n", "ttl_seconds": 0}, "INVALID_ARGUMENT", "at least 1"),
        ({"kind": "artefact", "name": "n", "ttl_seconds": 10**9}, "INVALID_ARGUMENT", "max_ttl_seconds"),
        ({"kind": "artefact", "name": "n", "owner": "admin"}, "INVALID_ARGUMENT", "unknown field"),
        ({"kind": "query", "sql": "SELECT 1"}, "INVALID_ARGUMENT", "DoPut saves"),
        ("PATH", "INVALID_ARGUMENT", "DoPut saves"),
        (b"\xff not json", "INVALID_ARGUMENT", "JSON"),
    ]
    for command, code, words in cases:
        info = _put_refusal(srv, token, command)
        assert info["code"] == code, (command, info)
        assert words in info["detail"], (command, info)
        assert len(info["detail"]) <= 600
    assert artefact_files(srv) == before_files and store.usage("art2") == before_usage
    assert store.list(srv.catalog.tokens.verify(token)).items == []


def test_reading_bad_ids_and_files(srv: Server) -> None:
    token = srv.mint("agent", "art1", "a1")
    for bad in ("../../etc/passwd", "", "x" * 10_000, "01A00000-0000-7000-8000-000000000000"):
        info = refusal(lambda b=bad: get_info(srv, token, b))
        assert info["code"] == "NOT_FOUND" and len(info["detail"]) < 200
    info = refusal(
        lambda: srv.flight().get_flight_info(
            flight.FlightDescriptor.for_command(b'{"kind": "artefact", "id": "x", "name": "y"}'),
            call_options(token),
        )
    )
    assert info["code"] == "INVALID_ARGUMENT" and "DoPut" in info["detail"]
    p = srv.catalog.tokens.verify(token)
    with srv.catalog.artefacts.begin_write(p, "file", "notes") as w:
        w.write(b"not a table")
        f = w.commit()
    info = refusal(lambda: get_info(srv, token, f.id))
    assert info["code"] == "INVALID_ARGUMENT" and "is a file" in info["detail"]
    # In SQL a file is no table: the missing-table refusal.
    assert sql_refusal(srv, token, f'SELECT * FROM artefacts."{f.id}"').code == "PERMISSION_DENIED"


def _varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def _field(num: int, data: bytes) -> bytes:
    return _varint((num << 3) | 2) + _varint(len(data)) + data


def _descriptor_frame(descriptor_cmd: bytes) -> bytes:
    """A FlightData frame that carries only the CMD descriptor (no IPC message)."""
    return _field(1, _varint(1 << 3) + _varint(2) + _field(2, descriptor_cmd))  # type CMD, cmd


def _frames(descriptor_cmd: bytes, *tables: pa.Table) -> list[bytes]:
    """FlightData protobuf frames of one DoPut: the descriptor, then each table's IPC
    messages (schema, batches) — a second table is a second schema midway."""
    messages = []
    for table in tables:
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        source = pa.BufferReader(sink.getvalue())
        while (msg := pa.ipc.read_message(source)) is not None:
            messages.append(
                (msg.metadata.to_pybytes(), msg.body.to_pybytes() if msg.body is not None else b"")
            )
            if source.tell() >= source.size() - 8:  # the end-of-stream marker
                break
    frames = []
    for i, (meta, body) in enumerate(messages):
        frame = (_descriptor_frame(descriptor_cmd) if i == 0 else b"") + _field(2, meta)
        if body:
            frame += _field(1000, body)
        frames.append(frame)
    return frames


def _raw_put(s: Server, token: str, frames: list[bytes]) -> grpc.RpcError:
    """A DoPut of hand-made FlightData frames; answers the server's refusal."""
    channel = grpc.insecure_channel(s.flight_url.removeprefix("grpc://"))
    call = channel.stream_stream(
        "/arrow.flight.protocol.FlightService/DoPut",
        request_serializer=lambda x: x,
        response_deserializer=lambda x: x,
    )
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(call(iter(frames), metadata=[("authorization", f"Bearer {token}")]))
    finally:
        channel.close()
    return e.value


def test_schema_change_midway_keeps_nothing(srv: Server) -> None:
    token = srv.mint("agent", "art2", "midway")
    before = artefact_files(srv)
    frames = _frames(
        b'{"kind": "artefact", "name": "changes"}', sample_table(1000), pa.table({"other": ["a", "b"]})
    )
    refused = _raw_put(srv, token, frames)
    details = dict(refused.trailing_metadata() or ())
    coded = json.loads(details["grpc-status-details-bin"])
    assert coded["code"] == "INVALID_ARGUMENT" and "single schema" in coded["detail"]
    assert artefact_files(srv) == before
    assert srv.catalog.artefacts.list(srv.catalog.tokens.verify(token)).items == []


def test_an_upload_without_a_schema_is_invalid_argument_and_keeps_nothing(srv: Server) -> None:
    """Only the descriptor, no schema message (what a client that gives up before its first
    batch sends): a clear INVALID_ARGUMENT, not INTERNAL, and nothing stored."""
    token = srv.mint("agent", "art2", "noschema")
    store = srv.catalog.artefacts
    before, usage = artefact_files(srv), store.usage("art2")
    refused = _raw_put(srv, token, [_descriptor_frame(b'{"kind": "artefact", "name": "nothing"}')])
    coded = json.loads(dict(refused.trailing_metadata() or ())["grpc-status-details-bin"])
    assert coded["code"] == "INVALID_ARGUMENT" and "no Arrow schema" in coded["detail"]
    assert artefact_files(srv) == before and store.usage("art2") == usage
    assert store.list(srv.catalog.tokens.verify(token)).items == []


def test_a_leftover_temp_file_is_reclaimed_by_the_janitor(srv: Server) -> None:
    leftover = srv.catalog.artefacts.directory / f"{TEMP_PREFIX}01a00000-0000-7000-8000-000000000001-dead"
    leftover.write_bytes(b"a crashed upload")
    removed = srv.catalog.metrics.artefacts_removed.labels("temp_file")
    # The sweep unlinks the file before it counts it: wait for both, or the assertion races it.
    wait_until(lambda: not leftover.exists() and removed._value.get() >= 1, what="the janitor")
    assert not leftover.exists() and removed._value.get() >= 1


# --- quotas -------------------------------------------------------------------------------------------------
def test_quota_refusal_over_flight_leaves_usage_unchanged(srv: Server) -> None:
    token = srv.mint("agent", "art3", "q1")
    store = srv.catalog.artefacts
    big = pa.table({"x": pa.array(range(200_000), pa.int64())})  # 1.6 MB as IPC
    client(srv, token).put_table(big, "first")
    before, files_before = store.usage("art3"), artefact_files(srv)
    with pytest.raises(QuiverClientError) as e:
        client(srv, token).put_table(big, "second", max_chunksize=10_000)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert f"swarm_quota_bytes ({QUOTA})" in e.value.detail and f"uses {before.bytes} bytes" in e.value.detail
    assert store.usage("art3") == before and artefact_files(srv) == files_before
    # One upload above max_upload_bytes, from an admin (no swarm quota): refused the same way.
    with pytest.raises(QuiverClientError) as e:
        client(srv, srv.admin_token).put_table(pa.table({"x": pa.array(range(400_000), pa.int64())}), "huge")
    assert e.value.code == "RESOURCE_EXHAUSTED" and "max_upload_bytes" in e.value.detail
    assert artefact_files(srv) == files_before


def test_concurrent_uploads_race_to_the_quota(srv: Server) -> None:
    """Six agents of one swarm upload 800 kB each at once into a 3 MB quota: some are
    refused, what is kept fits, and every kept one reads back whole."""
    tokens = [srv.mint("agent", "art2", f"race{i}") for i in range(6)]
    store = srv.catalog.artefacts
    start = store.usage("art2").bytes
    data = pa.table({"x": pa.array(range(100_000), pa.int64())})
    barrier = threading.Barrier(len(tokens))
    outcomes: list[Any] = []

    def upload(token: str) -> None:
        barrier.wait()
        try:
            outcomes.append(client(srv, token).put_table(data, "race", max_chunksize=20_000))
        except QuiverClientError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=upload, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if not isinstance(o, dict)]
    assert kept and refused and all(e.code == "RESOURCE_EXHAUSTED" for e in refused)
    usage = store.usage("art2")
    assert usage.bytes <= QUOTA and usage.bytes == start + sum(k["size_bytes"] for k in kept)
    for k in kept:
        assert client(srv, srv.admin_token).get_artefact(k["id"]).equals(data)
        store.delete(srv.catalog.tokens.verify(srv.admin_token), k["id"])
    wait_until(lambda: not any(n.startswith(TEMP_PREFIX) for n in artefact_files(srv)), what="no temp files")


# --- expiry ---------------------------------------------------------------------------------------------------
def test_expiry_removes_content_and_metadata_and_nothing_else(srv: Server) -> None:
    token = srv.mint("agent", "art1", "exp")
    keep = client(srv, token).put_table(pa.table({"k": [1]}), "keep", ttl_seconds=3600)
    gone = client(srv, token).put_table(pa.table({"g": [1]}), "gone", ttl_seconds=1)
    store = srv.catalog.artefacts
    wait_until(
        lambda: not (store.directory / gone["id"]).exists(), what="the janitor removing the expired artefact"
    )
    assert refusal(lambda: get_info(srv, token, gone["id"]))["code"] == "NOT_FOUND"
    assert sql_refusal(srv, token, f'SELECT * FROM artefacts."{gone["id"]}"').code == "PERMISSION_DENIED"
    with srv.catalog.db.reading() as cur:
        assert cur.execute(
            "SELECT count(*) FROM _quiver.artefacts WHERE id = ?", [gone["id"]]
        ).fetchall() == [(0,)]
        left = cur.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'artefacts' AND table_name = ?",
            [gone["id"]],
        ).fetchall()
        assert left == [(0,)]
    assert client(srv, token).get_artefact(keep["id"]).column("k").to_pylist() == [1]
    assert sql(srv, token, f'SELECT k FROM artefacts."{keep["id"]}"').column("k").to_pylist() == [1]


def test_reads_racing_a_delete_never_fail_internally(srv: Server) -> None:
    """Readers (DoGet and SQL, threads on the real server) race the owner deleting the
    artefact: each read either returns the whole table or is refused as not visible."""
    owner = srv.mint("agent", "art1", "racer")
    data = pa.table({"customer_id": pa.array(range(20_000), pa.int64())})
    meta = client(srv, owner).put_table(data, "racing")
    aid = meta["id"]
    outcomes: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def read(kind: str, token: str) -> None:
        quiver = client(srv, token)
        while not stop.is_set():
            try:
                if kind == "flight":
                    ok = quiver.get_artefact(aid).equals(data)
                else:
                    ok = quiver.query(f'SELECT count(*) AS n FROM artefacts."{aid}"').column(
                        "n"
                    ).to_pylist() == [20_000]
                outcome = "ok" if ok else "wrong"
            except QuiverClientError as e:
                outcome = e.code
                if e.code == "INVALID_ARGUMENT" and "does not exist" in e.detail:
                    # Past the guard a moment before the DROP committed: DuckDB's binder says
                    # the table is gone (as for a data table dropped under a query).
                    outcome = "PERMISSION_DENIED"
            with lock:
                outcomes.append(outcome)
            if outcome != "ok":
                return

    # One principal per reader: admission's per-principal share is not what this tests.
    threads = [
        threading.Thread(target=read, args=(k, srv.mint("agent", "art1", f"reader{i}")))
        for i, k in enumerate(("flight", "sql") * 3)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: len(outcomes) >= 12, what="reads before the delete")
    srv.catalog.artefacts.delete(srv.catalog.tokens.verify(owner), aid)
    for t in threads:
        t.join(60)
    stop.set()
    assert set(outcomes) <= {"ok", "NOT_FOUND", "PERMISSION_DENIED"}, sorted(set(outcomes))
    assert outcomes.count("ok") >= 12
    assert {"NOT_FOUND", "PERMISSION_DENIED"} & set(outcomes)


@pytest.mark.parametrize(
    "table",
    [
        pa.table({"h": pa.array([1.0, 2.0], pa.float32()).cast(pa.float16())}),
        pa.table({"d": pa.array([1, 2], pa.int64()).cast(pa.decimal256(50, 2))}),
        pa.table(
            {
                "s": pa.array([{"h": 1.0}], pa.struct([("h", pa.float32())])).cast(
                    pa.struct([("h", pa.float16())])
                )
            }
        ),
        pa.table({}),
    ],
    ids=["float16", "decimal256", "nested-float16", "no-columns"],
)
def test_tables_sql_cannot_read_are_refused_up_front(srv: Server, table: pa.Table) -> None:
    token = srv.mint("agent", "art2", "types")
    before, usage = artefact_files(srv), srv.catalog.artefacts.usage("art2")
    with pytest.raises(QuiverClientError) as e:
        client(srv, token).put_table(table, "odd types")
    assert e.value.code == "INVALID_ARGUMENT", e.value
    # Said before anything was stored, naming the column and what to do.
    assert "column" in e.value.detail and ("cast it" in e.value.detail or "at least one" in e.value.detail)
    assert artefact_files(srv) == before and srv.catalog.artefacts.usage("art2") == usage


def test_dictionaries_that_change_between_batches(srv: Server) -> None:
    token = srv.mint("agent", "art2", "dict")
    first = pa.record_batch({"c": pa.array(["a", "b"]).dictionary_encode()})
    second = pa.record_batch({"c": pa.array(["x", "y", "z"]).dictionary_encode()})
    before, usage = artefact_files(srv), srv.catalog.artefacts.usage("art2")
    # A stream whose dictionary changes midway cannot be one IPC file: refused, nothing kept.
    with pytest.raises(QuiverClientError) as e:
        client(srv, token).put_table(pa.RecordBatchReader.from_batches(first.schema, [first, second]), "dict")
    assert e.value.code == "INVALID_ARGUMENT" and "unify_dictionaries" in e.value.detail
    assert artefact_files(srv) == before and srv.catalog.artefacts.usage("art2") == usage
    # A table of several dictionaries is unified by the client: stored and read back equal.
    table = pa.Table.from_batches([first, second])
    meta = client(srv, token).put_table(table, "dict")
    got = client(srv, token).get_artefact(meta["id"])
    assert got.column("c").to_pylist() == ["a", "b", "x", "y", "z"]
    assert sql(srv, token, f"SELECT count(DISTINCT c) AS n FROM {meta['sql_name']}").column(
        "n"
    ).to_pylist() == [5]


def test_sql_reference_forms(srv: Server) -> None:
    """Every way SQL can name a table reaches an artefact only when the caller may see it."""
    owner = srv.mint("agent", "art1", "forms")
    other = srv.mint("agent", "art2", "forms")
    mine = client(srv, owner).put_table(pa.table({"v": [1, 2, 3]}), "forms")["id"]
    theirs = client(srv, other).put_table(pa.table({"w": [9]}), "theirs")["id"]
    db = srv.catalog.db.catalog_name
    readable = [
        f'SELECT sum(v) AS n FROM artefacts."{mine}"',
        f'SELECT sum(v) AS n FROM ARTEFACTS."{mine.upper()}"',
        f'SELECT sum(v) AS n FROM "{db}".artefacts."{mine}"',
        f'WITH t AS (SELECT * FROM artefacts."{mine}") SELECT sum(v) AS n FROM t',
        f'SELECT n FROM (FROM artefacts."{mine}" SELECT sum(v) AS n)',
    ]
    for text in readable:
        assert sql(srv, owner, text).column("n").to_pylist() == [6], text
    hidden = [
        f'SELECT * FROM artefacts."{theirs}"',
        f'SELECT (SELECT count(*) FROM artefacts."{theirs}") AS n',
        f'SELECT 1 AS n UNION ALL SELECT count(*) FROM artefacts."{theirs}"',
        f'FROM artefacts."{theirs}"',
        f'SELECT * FROM artefacts."{mine}" AS a, LATERAL (SELECT * FROM artefacts."{theirs}") AS b',
        f'SELECT * FROM "{db}".artefacts."{theirs}"',
        f'SELECT * FROM temp.artefacts."{mine}"',
        f'SELECT * FROM system.artefacts."{mine}"',
        f'SELECT * FROM artefacts."{mine}x"',
        "SELECT * FROM artefacts.main",
    ]
    for text in hidden:
        refused = sql_refusal(srv, owner, text)
        assert refused.code == "PERMISSION_DENIED" and "does not exist" in refused.detail, (text, refused)
