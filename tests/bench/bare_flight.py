"""A bare ``pyarrow.flight`` server for the benchmark's reference figures: no auth, no guard,
no cache — Arrow tables held in memory, each streamed as one endpoint, and optionally a
DuckDB file that answers SQL.

    python -m tests.bench.bare_flight PORT NAME=FILE.arrow [NAME=FILE.duckdb ...]

Each ``.arrow`` file (Arrow IPC file format) is read into memory at start; a descriptor
``CMD NAME`` answers one endpoint whose ticket streams that table, ``CMD NAME/N`` answers N
endpoints, each streaming one contiguous slice. Each ``.duckdb`` file is opened (read-only:
the benchmark gives the server its own copy); a descriptor ``CMD NAME:SQL`` answers one
endpoint at once, without running or planning anything (its schema is empty), and its DoGet
runs the SQL on the serving thread's own cursor and streams the result. That is the least a
Flight server in Python can do per point query, the reference for how far 8 concurrent
agents can scale a SQL service on this machine (tests/bench/bench_agent.py). Prints
``ready`` when serving.
"""

from __future__ import annotations

import sys
import threading

import duckdb
import pyarrow as pa
import pyarrow.flight as flight


class BareServer(flight.FlightServerBase):
    def __init__(
        self,
        location: str,
        tables: dict[str, pa.Table],
        databases: dict[str, duckdb.DuckDBPyConnection] | None = None,
    ) -> None:
        super().__init__(location)
        self.tables = tables
        self.databases = databases or {}
        # One cursor per gRPC thread and database: DuckDB connections are not shared by threads.
        self.local = threading.local()

    def _table(self, name: str) -> pa.Table:
        table = self.tables.get(name)
        if table is None:
            raise flight.FlightServerError(f"no table {name!r}")
        return table

    def _cursor(self, name: str) -> duckdb.DuckDBPyConnection:
        con = self.databases.get(name)
        if con is None:
            raise flight.FlightServerError(f"no database {name!r}")
        cursors: dict[str, duckdb.DuckDBPyConnection] = self.local.__dict__.setdefault("cursors", {})
        if name not in cursors:
            cursors[name] = con.cursor()
        return cursors[name]

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        command = descriptor.command.decode()
        db, sep, _ = command.partition(":")
        if sep and db in self.databases:  # SQL: run nothing here, DoGet runs it
            endpoint = flight.FlightEndpoint(command.encode(), [])
            return flight.FlightInfo(pa.schema([]), descriptor, [endpoint], -1, -1)
        name, _, parts = command.partition("/")
        table = self._table(name)
        n = int(parts or 1)
        endpoints = [flight.FlightEndpoint(f"{name}/{i}/{n}".encode(), []) for i in range(n)]
        return flight.FlightInfo(table.schema, descriptor, endpoints, table.num_rows, table.nbytes)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        text = ticket.ticket.decode()
        db, sep, sql = text.partition(":")
        if sep and db in self.databases:
            return flight.RecordBatchStream(self._cursor(db).sql(sql).to_arrow_table())
        name, i, n = text.split("/")
        table = self._table(name)
        start, stop = table.num_rows * int(i) // int(n), table.num_rows * (int(i) + 1) // int(n)
        return flight.RecordBatchStream(table.slice(start, stop - start))


def main(argv: list[str]) -> int:
    port = int(argv[0])
    tables = {}
    databases = {}
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        if path.endswith(".duckdb"):
            databases[name] = duckdb.connect(path, read_only=True)
            continue
        with pa.OSFile(path, "rb") as f:
            tables[name] = pa.ipc.open_file(f).read_all()
    server = BareServer(f"grpc+tcp://127.0.0.1:{port}", tables, databases)
    print("ready", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
