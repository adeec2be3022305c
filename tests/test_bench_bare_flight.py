"""The benchmark's bare Flight server (tests/bench/bare_flight.py) answers SQL from a DuckDB
file the way bench_agent's scaling reference needs: GetFlightInfo plans nothing, DoGet runs
the text, and an unknown name is a Flight error, not a crash."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.bench.bare_flight import BareServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[flight.FlightClient]:
    db = tmp_path / "bare.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("CREATE TABLE t AS SELECT i AS id, i * 2 AS v FROM range(100) r(i)")
    read = duckdb.connect(str(db), read_only=True)
    table = pa.table({"a": list(range(10))})
    srv = BareServer("grpc+tcp://127.0.0.1:0", {"small": table}, {"db": read})
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    client = flight.FlightClient(f"grpc://127.0.0.1:{srv.port}")
    try:
        yield client
    finally:
        client.close()
        srv.shutdown()
        thread.join(10)
        read.close()


def test_sql_runs_at_do_get_on_each_thread_cursor(server: flight.FlightClient) -> None:
    infos = [
        server.get_flight_info(
            flight.FlightDescriptor.for_command(f"db:SELECT v FROM t WHERE id = {k}".encode())
        )
        for k in range(8)
    ]
    assert all(len(i.endpoints) == 1 and i.schema == pa.schema([]) for i in infos)

    results: dict[int, list[int]] = {}

    def get(k: int) -> None:
        reader = server.do_get(infos[k].endpoints[0].ticket)
        results[k] = reader.read_all().column("v").to_pylist()

    threads = [threading.Thread(target=get, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {k: [2 * k] for k in range(8)}


def test_tables_still_split_into_slices(server: flight.FlightClient) -> None:
    info = server.get_flight_info(flight.FlightDescriptor.for_command(b"small/3"))
    parts = [server.do_get(e.ticket).read_all() for e in info.endpoints]
    assert pa.concat_tables(parts).column("a").to_pylist() == list(range(10))


@pytest.mark.parametrize("command", [b"nodb:SELECT 1", b"nosuch", b"nosuch/2"])
def test_unknown_names_are_flight_errors(server: flight.FlightClient, command: bytes) -> None:
    with pytest.raises(flight.FlightServerError, match="no table"):
        server.get_flight_info(flight.FlightDescriptor.for_command(command))
