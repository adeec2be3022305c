"""Flight SQL on the Flight port (wire contract: proto_docs/flight-sql.md).

Standard clients — the ADBC Flight SQL driver (Python, pandas, polars), JDBC, DBeaver — send
protobuf ``Any`` messages of ``arrow.flight.protocol.sql`` where Quiver's agents send JSON
commands. This package turns them into what the rest of the data plane already does: the
same tokens, allowlists, SQL guard, admission path, limits and tickets, with no second query
path. One concern per module:

* :mod:`~flight_server.flight_sql.wire` — ``Any`` in and out: type URLs → messages, tickets,
  action bodies (protoc's :mod:`~flight_server.flight_sql.flight_sql_pb2`, from
  proto_docs/flight_sql.proto by ``make proto``);
* :mod:`~flight_server.flight_sql.dispatch` — which message goes where, and what is refused
  (Quiver is read-only);
* :mod:`~flight_server.flight_sql.statements` — statement queries and prepared statements,
  planned by :class:`~flight_server.planner.Planner` like a ``{"kind": "query"}`` command;
* :mod:`~flight_server.flight_sql.metadata` — SqlInfo, catalogs, schemas, tables, types and
  keys, listing only what the caller may read;

``CancelFlightInfo`` interrupts the running streams of one FlightInfo through
:mod:`flight_server.running`, which also stops a query whose client went away.
"""

from flight_server.flight_sql.dispatch import ACTIONS, FlightSql
from flight_server.flight_sql.wire import is_flight_sql

__all__ = ["ACTIONS", "FlightSql", "is_flight_sql"]
