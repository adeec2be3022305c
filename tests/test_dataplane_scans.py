"""Large reads through DuckDB: scans split into parallel endpoints that never mix data
versions, and a 1M-row stream that leaves the server's memory flat. The hot-table cache is
off here (its own tests are in test_scan_cache.py), so every scan takes the DuckDB path."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import TableRef
from catalog.tables import TableCatalog
from tests.harness import SMALL_SPLIT, Server, call_options, error_info, start_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Split small tables too, so the 50,000-row demo.events becomes several endpoints.
    s = start_server(tmp_path_factory.mktemp("scans"), cache={"table_memory_bytes": 0}, flight=SMALL_SPLIT)
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA scratch")
        cur.execute("CREATE TABLE scratch.t AS SELECT range AS id, range * 2 AS v FROM range(45000)")
        TableCatalog.bump_version(cur, TableRef("scratch", "t"))
    yield s
    s.stop()


def _endpoints(
    client: flight.FlightClient, opts: flight.FlightCallOptions, schema: str, table: str
) -> flight.FlightInfo:
    return client.get_flight_info(flight.FlightDescriptor.for_path(schema, table), opts)


def test_large_scan_is_split_and_reassembles_in_order(server: Server) -> None:
    client, opts = server.flight(), call_options(server.demo_token)
    info = _endpoints(client, opts, "demo", "events")
    assert 4 <= len(info.endpoints) <= 8
    assert info.total_records == 50_000
    parts = [client.do_get(e.ticket, opts).read_all() for e in info.endpoints]
    assert all(p.num_rows > 0 for p in parts)
    got = pa.concat_tables(parts)
    with server.catalog.db.reading() as cur:
        want = cur.sql("SELECT * FROM demo.events ORDER BY rowid").to_arrow_table()
    assert got.equals(want)


def test_a_column_named_rowid_keeps_a_scan_in_one_piece(server: Server) -> None:
    """A split by ``rowid`` would filter the column instead of DuckDB's row id (the column
    hides it): rows with negative values fell out of every part, the rest came back in the
    column's order."""
    with server.catalog.db.transaction() as cur:
        cur.execute(
            "CREATE TABLE scratch.rid AS SELECT (hash(range) % 100000)::BIGINT - 50000 AS rowid, "
            "range AS x FROM range(45000)"
        )
        TableCatalog.bump_version(cur, TableRef("scratch", "rid"))
    client, opts = server.flight(), call_options(server.admin_token)
    info = _endpoints(client, opts, "scratch", "rid")
    assert len(info.endpoints) == 1
    got = pa.concat_tables(client.do_get(e.ticket, opts).read_all() for e in info.endpoints)
    with server.catalog.db.reading() as cur:
        assert got.equals(cur.sql("SELECT * FROM scratch.rid").to_arrow_table())


def test_small_tables_stay_one_endpoint(server: Server) -> None:
    client, opts = server.flight(), call_options(server.demo_token)
    assert len(_endpoints(client, opts, "demo", "customers").endpoints) == 1


def test_a_version_change_between_endpoints_is_unavailable(server: Server) -> None:
    client, opts = server.flight(), call_options(server.admin_token)
    info = _endpoints(client, opts, "scratch", "t")
    assert len(info.endpoints) >= 2
    first = client.do_get(info.endpoints[0].ticket, opts).read_all()
    with server.catalog.db.transaction() as cur:
        cur.execute("UPDATE scratch.t SET v = v + 1 WHERE id = 0")
        TableCatalog.bump_version(cur, TableRef("scratch", "t"))
    for endpoint in info.endpoints:  # every endpoint, also the one already read
        with pytest.raises(flight.FlightUnavailableError) as caught:
            client.do_get(endpoint.ticket, opts).read_all()
        assert error_info(caught.value)["code"] == "UNAVAILABLE"
        assert "call GetFlightInfo again" in error_info(caught.value)["detail"]
    # A fresh FlightInfo reads the new version, consistently.
    again = _endpoints(client, opts, "scratch", "t")
    table = pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in again.endpoints])
    assert table.num_rows == 45_000 and table.column("v")[0].as_py() == 1
    assert first.column("v")[0].as_py() == 0


def test_a_change_without_a_version_bump_is_caught_too(server: Server) -> None:
    """A writer that forgets to bump the version still changes the row count or largest rowid."""
    client, opts = server.flight(), call_options(server.admin_token)
    info = _endpoints(client, opts, "scratch", "t")
    with server.catalog.db.transaction() as cur:
        cur.execute("INSERT INTO scratch.t VALUES (45000, 90000)")
    with pytest.raises(flight.FlightUnavailableError):
        client.do_get(info.endpoints[-1].ticket, opts).read_all()
    with server.catalog.db.transaction() as cur:
        cur.execute("DELETE FROM scratch.t WHERE id = 45000")
        TableCatalog.bump_version(cur, TableRef("scratch", "t"))


def test_parallel_fetch_by_the_client(server: Server) -> None:
    from quiver_client import QuiverClient

    assert server.demo_token is not None  # a demo server
    with QuiverClient(server.flight_url, server.demo_token) as qc:
        table = qc.read("demo.events")
        streamed = qc.read_stream("demo.events").read_all()
    with server.catalog.db.reading() as cur:
        want = cur.sql("SELECT * FROM demo.events ORDER BY rowid").to_arrow_table()
    assert table.equals(want)
    assert streamed.equals(want)


# --- memory: a 1M-row stream through a client in another process ---------------------------------
READER = """
import json, sys
import pyarrow.flight as flight
url, token, sql = sys.argv[1], sys.argv[2], sys.argv[3]
opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
client = flight.FlightClient(url)
info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql}).encode()), opts)
rows = 0
nbytes = 0
for e in info.endpoints:
    for chunk in client.do_get(e.ticket, opts):
        rows += chunk.data.num_rows
        nbytes += chunk.data.nbytes
print(json.dumps({"rows": rows, "bytes": nbytes}))
"""


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_million_row_stream_keeps_server_memory_flat(server: Server) -> None:
    # ~230 MB of Arrow data; generated by DuckDB on the fly (no table behind it).
    sql = "SELECT range AS id, repeat('x', 200) || range::VARCHAR AS payload FROM range(1000000)"
    # Warm up the server's one-time allocations (gRPC threads, DuckDB and Arrow pools).
    warm = subprocess.run(
        [
            sys.executable,
            "-c",
            READER,
            server.flight_url,
            server.admin_token,
            sql.replace("1000000", "100000"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert warm.returncode == 0, warm.stderr[-2000:]
    baseline = _rss()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", READER, server.flight_url, server.admin_token, sql],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        done.set()
        sampler.join()
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["rows"] == 1_000_000
    assert result["bytes"] > 200_000_000
    growth = peak - baseline
    print(
        f"server RSS: baseline {baseline / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB while streaming {result['bytes'] / 1e6:.0f} MB"
    )
    assert growth < 150 * 1024 * 1024, f"server RSS grew by {growth / 1e6:.0f} MB while streaming"
