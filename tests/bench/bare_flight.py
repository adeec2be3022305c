"""A bare ``pyarrow.flight`` server for the benchmark's reference figures: no auth, no SQL,
no DuckDB — Arrow tables held in memory, each streamed as one endpoint.

    python -m tests.bench.bare_flight PORT NAME=FILE.arrow [NAME=FILE.arrow ...]

Each file (Arrow IPC file format) is read into memory at start; a descriptor ``CMD NAME``
answers one endpoint whose ticket streams that table, ``CMD NAME/N`` answers N endpoints,
each streaming one contiguous slice. Prints ``ready`` when serving.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.flight as flight


class BareServer(flight.FlightServerBase):
    def __init__(self, location: str, tables: dict[str, pa.Table]) -> None:
        super().__init__(location)
        self.tables = tables

    def _table(self, name: str) -> pa.Table:
        table = self.tables.get(name)
        if table is None:
            raise flight.FlightServerError(f"no table {name!r}")
        return table

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        name, _, parts = descriptor.command.decode().partition("/")
        table = self._table(name)
        n = int(parts or 1)
        endpoints = [flight.FlightEndpoint(f"{name}/{i}/{n}".encode(), []) for i in range(n)]
        return flight.FlightInfo(table.schema, descriptor, endpoints, table.num_rows, table.nbytes)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        name, i, n = ticket.ticket.decode().split("/")
        table = self._table(name)
        start, stop = table.num_rows * int(i) // int(n), table.num_rows * (int(i) + 1) // int(n)
        return flight.RecordBatchStream(table.slice(start, stop - start))


def main(argv: list[str]) -> int:
    port = int(argv[0])
    tables = {}
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        with pa.OSFile(path, "rb") as f:
            tables[name] = pa.ipc.open_file(f).read_all()
    server = BareServer(f"grpc+tcp://127.0.0.1:{port}", tables)
    print("ready", flush=True)
    server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
