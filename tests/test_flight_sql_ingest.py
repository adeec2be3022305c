"""Flight SQL ingest (``CommandStatementIngest``, ADBC's ``adbc_ingest``) saves a new tabular
artefact owned by the caller (proto_docs/flight-sql.md, "Ingest"), against a real server with
the real ADBC driver and raw pyarrow.flight: round trips through SQL and Flight, the listing
under schema ``artefacts``, visibility across swarms, append/replace refused, limits and
quotas keeping nothing, bad inputs, and threads racing the swarm's quota."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from catalog import NotFound
from catalog.artefacts import ArtefactFilter
from catalog.identity import Principal
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.flight_sql.ingest import TEMPORARY_TTL_SECONDS
from tests.harness import Server, call_options, error_info, start_server

AUTH = "adbc.flight.sql.authorization_header"
QUOTA_BYTES = 2_000_000
MAX_UPLOAD = 1_500_000
_Options = pb.CommandStatementIngest.TableDefinitionOptions


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("ingest"),
        artefacts={"swarm_quota_bytes": QUOTA_BYTES, "max_upload_bytes": MAX_UPLOAD},
    )
    http = s.http()
    for name in ("ing1", "ing2", "ing3", "ingrace"):
        assert http.post("/v1/swarms", json={"name": name, "tables": []}).status_code == 201
    yield s
    s.stop()


def connect(s: Server, token: str) -> Any:
    return flight_sql.connect(s.flight_url, db_kwargs={AUTH: f"Bearer {token}"}, autocommit=True)


def sample(rows: int = 5_000) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "score": pa.array([i / 3 if i % 7 else None for i in range(rows)], pa.float64()),
            "label": pa.array([f"r{i}" if i % 5 else None for i in range(rows)], pa.string()),
        }
    )


def packed(message: Message) -> bytes:
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def raw_ingest(s: Server, token: str, message: pb.CommandStatementIngest, table: pa.Table) -> bytes:
    """A DoPut of ``message`` with ``table``'s batches; the PutResult's app_metadata."""
    client = s.flight()
    descriptor = flight.FlightDescriptor.for_command(packed(message))
    writer, reader = client.do_put(descriptor, table.schema, call_options(token))
    for batch in table.to_batches(max_chunksize=1_000):
        writer.write_batch(batch)
    writer.done_writing()
    answer = reader.read()
    writer.close()
    assert answer is not None
    return answer.to_pybytes()


def refusal(fn: Any) -> dict[str, Any]:
    with pytest.raises(flight.FlightError) as e:
        fn()
    info = error_info(e.value)
    assert len(info["detail"]) <= 600 and "Traceback" not in info["detail"]
    return info


def principal(s: Server, token: str) -> Principal:
    return s.catalog.tokens.verify(token)


def state(s: Server, swarm: str) -> tuple[list[str], list[str], int, int]:
    """What an ingest may change: the store's ids, its files, the swarm's usage."""
    store = s.catalog.artefacts
    usage = store.usage(swarm)
    return sorted(store._index), sorted(os.listdir(store.directory)), usage.bytes, usage.count


def listed_ids(conn: Any) -> list[str]:
    objects = conn.adbc_get_objects(depth="tables", db_schema_filter="artefacts").read_all().to_pylist()
    return [
        t["table_name"]
        for c in objects
        for sch in c["catalog_db_schemas"] or []
        if sch["db_schema_name"] == "artefacts"
        for t in sch["db_schema_tables"] or []
    ]


# --- round trips -------------------------------------------------------------------------------------
def test_adbc_ingest_round_trips_through_sql_and_flight(srv: Server) -> None:
    token = srv.mint("agent", "ing1", "a1")
    data = sample()
    with connect(srv, token) as conn:
        before = set(listed_ids(conn))
        with conn.cursor() as cur:
            count = cur.adbc_ingest(
                "scores", data, mode="create", db_schema_name="mine", catalog_name="quiver"
            )
        assert count == data.num_rows
        (new_id,) = set(listed_ids(conn)) - before
        with conn.cursor() as cur:
            cur.execute(f'SELECT * FROM artefacts."{new_id}" ORDER BY id')
            assert cur.fetch_arrow_table().equals(data)
        assert conn.adbc_get_table_schema(new_id, db_schema_filter="artefacts").names == data.schema.names
        # A reader streams batch by batch (how a table larger than the driver's 16 MiB message fits).
        reader = pa.RecordBatchReader.from_batches(data.schema, data.to_batches(max_chunksize=700))
        with conn.cursor() as cur:
            assert cur.adbc_ingest("streamed", reader) == data.num_rows
        (streamed_id,) = set(listed_ids(conn)) - before - {new_id}
        with conn.cursor() as cur:
            cur.execute(f'SELECT * FROM artefacts."{streamed_id}" ORDER BY id')
            assert cur.fetch_arrow_table().equals(data)
    meta = srv.catalog.artefacts.get(principal(srv, token), new_id)
    assert meta.name == "quiver.mine.scores" and meta.kind == "table" and meta.rows == data.num_rows
    assert meta.owner == "agent:ing1/a1" and meta.swarm == "ing1"
    assert meta.expires_at - meta.created_at == timedelta(
        seconds=srv.catalog.config.artefacts.default_ttl_seconds
    )
    # The artefact DoGet reads the same rows back, as uploaded.
    cmd = json.dumps({"kind": "artefact", "id": new_id}).encode()
    client = srv.flight()
    info = client.get_flight_info(flight.FlightDescriptor.for_command(cmd), call_options(token))
    assert info.total_records == data.num_rows
    assert client.do_get(info.endpoints[0].ticket, call_options(token)).read_all().equals(data)


def test_raw_ingest_answers_do_put_update_result_and_temporary_is_short_lived(srv: Server) -> None:
    token = srv.mint("agent", "ing1", "a2")
    data = sample(2_500)
    ids = set(srv.catalog.artefacts._index)
    answer = raw_ingest(srv, token, pb.CommandStatementIngest(table="t", temporary=True), data)
    result = pb.DoPutUpdateResult()
    result.ParseFromString(answer)  # raw bytes, not packed in Any, as the spec has it
    assert result.record_count == data.num_rows
    (new_id,) = set(srv.catalog.artefacts._index) - ids
    meta = srv.catalog.artefacts.get(principal(srv, token), new_id)
    assert meta.name == "t" and meta.rows == data.num_rows
    assert meta.expires_at - meta.created_at == timedelta(seconds=TEMPORARY_TTL_SECONDS)
    # An empty upload is a table of no rows, counted as such.
    empty = pa.table({"x": pa.array([], pa.int32())})
    result.ParseFromString(raw_ingest(srv, token, pb.CommandStatementIngest(table="empty"), empty))
    assert result.record_count == 0


# --- visibility ---------------------------------------------------------------------------------------
def test_another_swarm_cannot_see_an_ingested_table(srv: Server) -> None:
    owner = srv.mint("agent", "ing2", "a1")
    mate = srv.mint("agent", "ing2", "a2")
    other = srv.mint("agent", "ing3", "a1")
    with connect(srv, owner) as conn, conn.cursor() as cur:
        before = set(listed_ids(conn))
        cur.adbc_ingest("private", sample(100))
        (new_id,) = set(listed_ids(conn)) - before
    with connect(srv, mate) as conn, conn.cursor() as cur:  # the owner's swarm sees it
        assert new_id in listed_ids(conn)
        cur.execute(f'SELECT count(*) FROM artefacts."{new_id}"')
        assert cur.fetchone() == (100,)
    with connect(srv, other) as conn, conn.cursor() as cur:
        assert new_id not in listed_ids(conn)
        # A swarm that sees no tabular artefact is not shown the schema at all.
        schemas = conn.adbc_get_objects(depth="db_schemas").read_all().to_pylist()
        assert "artefacts" not in [
            sch["db_schema_name"] for c in schemas for sch in c["catalog_db_schemas"] or []
        ]
        with pytest.raises(adbc_driver_manager.ProgrammingError) as e:
            cur.execute(f'SELECT * FROM artefacts."{new_id}"')
        assert "not readable: not in your allowlist or does not exist" in str(e.value)
    cmd = json.dumps({"kind": "artefact", "id": new_id}).encode()
    info = refusal(
        lambda: srv.flight().get_flight_info(flight.FlightDescriptor.for_command(cmd), call_options(other))
    )
    assert info["code"] == "NOT_FOUND"


def test_table_listing_rechecks_an_artefact_at_do_get(srv: Server) -> None:
    """A listing with include_schema shows columns: an artefact deleted between GetFlightInfo
    and DoGet is refused at DoGet, as a warehouse table whose grant was withdrawn."""
    token = srv.mint("agent", "ing2", "a3")
    with connect(srv, token) as conn, conn.cursor() as cur:
        before = set(listed_ids(conn))
        cur.adbc_ingest("doomed", sample(10))
        (new_id,) = set(listed_ids(conn)) - before
    client = srv.flight()
    tables = pb.CommandGetTables(
        db_schema_filter_pattern="artefacts", table_name_filter_pattern=new_id, include_schema=True
    )
    info = client.get_flight_info(flight.FlightDescriptor.for_command(packed(tables)), call_options(token))
    assert info.total_records == 1
    srv.catalog.artefacts.delete(principal(srv, token), new_id)
    detail = refusal(lambda: client.do_get(info.endpoints[0].ticket, call_options(token)).read_all())
    assert detail["code"] == "PERMISSION_DENIED"


# --- modes and bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["append", "replace", "create_append"])
def test_append_and_replace_are_refused_and_keep_nothing(srv: Server, mode: str) -> None:
    token = srv.mint("agent", "ing1", "a3")
    with connect(srv, token) as conn, conn.cursor() as cur:
        cur.adbc_ingest("kept", sample(10))
        before = state(srv, "ing1")
        with pytest.raises(adbc_driver_manager.Error) as e:
            cur.adbc_ingest("kept", sample(10), mode=mode)
        assert "artefacts are immutable" in str(e.value) and "mode='create'" in str(e.value)
    assert state(srv, "ing1") == before


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (_Options(if_exists=_Options.TABLE_EXISTS_OPTION_APPEND), "appending"),
        (_Options(if_exists=_Options.TABLE_EXISTS_OPTION_REPLACE), "replacing"),
        (_Options(if_not_exist=_Options.TABLE_NOT_EXIST_OPTION_FAIL), "existing table"),
    ],
    ids=["if_exists-append", "if_exists-replace", "if_not_exist-fail"],
)
def test_raw_definition_options_refused_with_invalid_argument(
    srv: Server, options: pb.CommandStatementIngest.TableDefinitionOptions, words: str
) -> None:
    token = srv.mint("agent", "ing1", "a4")
    before = state(srv, "ing1")
    message = pb.CommandStatementIngest(table="t", table_definition_options=options)
    info = refusal(lambda: raw_ingest(srv, token, message, sample(10)))
    assert info["code"] == "INVALID_ARGUMENT" and words in info["detail"]
    assert state(srv, "ing1") == before


def test_bad_ingests_are_clean_errors_and_keep_nothing(srv: Server) -> None:
    token = srv.mint("agent", "ing1", "a5")
    data = sample(10)
    cases: list[tuple[pb.CommandStatementIngest, pa.Table, str, str]] = [
        (pb.CommandStatementIngest(table=""), data, "INVALID_ARGUMENT", "needs a table name"),
        (pb.CommandStatementIngest(table="a\nb"), data, "INVALID_ARGUMENT", "control characters"),
        (pb.CommandStatementIngest(table="x" * 5_000), data, "INVALID_ARGUMENT", "at most 255"),
        (pb.CommandStatementIngest(table="t", transaction_id=b"tx"), data, "PERMISSION_DENIED", "read-only"),
        (pb.CommandStatementIngest(table="t", options={"k" * 500: "v"}), data, "INVALID_ARGUMENT", "option"),
        (
            pb.CommandStatementIngest(table="t"),
            pa.table({"h": pa.array([1.0], pa.float16())}),
            "INVALID_ARGUMENT",
            "float16",
        ),
        (pb.CommandStatementIngest(table="t"), pa.table({}), "INVALID_ARGUMENT", "column"),
    ]
    before = state(srv, "ing1")
    for message, table, code, words in cases:
        info = refusal(lambda m=message, t=table: raw_ingest(srv, token, m, t))
        assert info["code"] == code and words in info["detail"], (message, info)
        assert state(srv, "ing1") == before
    # An ingest is a DoPut: GetFlightInfo of one is refused, not run.
    descriptor = flight.FlightDescriptor.for_command(packed(pb.CommandStatementIngest(table="t")))
    info = refusal(lambda: srv.flight().get_flight_info(descriptor, call_options(token)))
    assert info["code"] == "INVALID_ARGUMENT" and "DoPut" in info["detail"]
    # A metrics token may not save artefacts.
    metrics = srv.mint("metrics", None, None)
    info = refusal(lambda: raw_ingest(srv, metrics, pb.CommandStatementIngest(table="t"), data))
    assert info["code"] == "PERMISSION_DENIED"
    assert state(srv, "ing1") == before


# --- limits and quota ----------------------------------------------------------------------------------
def test_size_limit_and_quota_refusals_keep_nothing(srv: Server) -> None:
    token = srv.mint("agent", "ing3", "a2")
    big = sample(120_000)  # several MB as Arrow: above max_upload_bytes
    before = state(srv, "ing3")
    with connect(srv, token) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as e:
            cur.adbc_ingest("too big", big)
        assert "max_upload_bytes" in str(e.value)
        assert state(srv, "ing3") == before
        info = refusal(lambda: raw_ingest(srv, token, pb.CommandStatementIngest(table="too big"), big))
        assert info["code"] == "RESOURCE_EXHAUSTED"
        assert state(srv, "ing3") == before
        # Fill the quota with uploads below the limit, then one more is refused.
        chunk = sample(25_000)
        saved = 0
        while True:
            try:
                cur.adbc_ingest("part", chunk)
            except adbc_driver_manager.Error as e2:
                assert "swarm_quota_bytes" in str(e2)
                break
            saved += 1
            assert saved < 50
        assert saved >= 1
        full = state(srv, "ing3")
        assert full[2] <= QUOTA_BYTES and full[3] == before[3] + saved
        info = refusal(lambda: raw_ingest(srv, token, pb.CommandStatementIngest(table="more"), chunk))
        assert info["code"] == "RESOURCE_EXHAUSTED"
        assert state(srv, "ing3") == full


def test_concurrent_ingests_race_to_the_quota(srv: Server) -> None:
    """Eight agents of one swarm ingest at once into a quota that holds only some: every call
    either saves a whole artefact or is refused RESOURCE_EXHAUSTED, and what is kept is exactly
    what succeeded, within the quota."""
    tokens = [srv.mint("agent", "ingrace", f"r{i}") for i in range(8)]
    data = sample(20_000)
    outcomes: list[int | str] = []
    lock = threading.Lock()
    go = threading.Barrier(len(tokens))

    def run(token: str) -> None:
        go.wait()
        try:
            result = pb.DoPutUpdateResult()
            result.ParseFromString(raw_ingest(srv, token, pb.CommandStatementIngest(table="race"), data))
            outcome: int | str = result.record_count
        except flight.FlightError as e:
            outcome = error_info(e)["code"]
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    saved = [o for o in outcomes if o == data.num_rows]
    assert len(outcomes) == len(tokens)
    assert set(outcomes) <= {data.num_rows, "RESOURCE_EXHAUSTED"}, outcomes
    assert saved and len(saved) < len(tokens)
    _, files, used, count = state(srv, "ingrace")
    assert count == len(saved) and used <= QUOTA_BYTES
    admin = principal(srv, srv.admin_token)
    kept = srv.catalog.artefacts.list(admin, ArtefactFilter(swarm="ingrace"), page_size=100).items
    assert len(kept) == len(saved) and all(a.rows == data.num_rows for a in kept)
    assert not [f for f in files if f.startswith(".tmp-")]


def test_table_listings_race_ingests_and_deletes(srv: Server) -> None:
    """GetTables with include_schema while other threads ingest and delete artefacts of the
    same swarm: every listing answers (an artefact gone since it was listed is left out, never
    INTERNAL), and every row it shows carries its schema."""
    token = srv.mint("agent", "ing2", "race-list")
    me = principal(srv, token)
    stop = threading.Event()
    errors: list[str] = []
    data = sample(50)

    def churn() -> None:
        while not stop.is_set():
            try:
                result = pb.DoPutUpdateResult()
                result.ParseFromString(raw_ingest(srv, token, pb.CommandStatementIngest(table="churn"), data))
                for art in srv.catalog.artefacts.list(me, ArtefactFilter(name="churn"), page_size=100).items:
                    with contextlib.suppress(NotFound):  # the other churner deleted it first
                        srv.catalog.artefacts.delete(me, art.id)
            except Exception as e:
                errors.append(repr(e))

    tables = pb.CommandGetTables(db_schema_filter_pattern="artefacts", include_schema=True)
    descriptor = flight.FlightDescriptor.for_command(packed(tables))
    workers = [threading.Thread(target=churn) for _ in range(2)]
    for w in workers:
        w.start()
    answered = 0
    try:
        client = srv.flight()
        for _ in range(40):
            try:
                info = client.get_flight_info(descriptor, call_options(token))
                listing = client.do_get(info.endpoints[0].ticket, call_options(token)).read_all()
            except flight.FlightError as e:
                # Deleted between GetFlightInfo and DoGet: the re-check's refusal, nothing else.
                assert error_info(e)["code"] == "PERMISSION_DENIED", error_info(e)
                continue
            answered += 1
            for row in listing.to_pylist():  # every artefact of this swarm is a sample() table
                assert row["db_schema_name"] == "artefacts"
                assert pa.ipc.read_schema(pa.py_buffer(row["table_schema"])).names == data.schema.names
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert errors == [] and answered > 0
