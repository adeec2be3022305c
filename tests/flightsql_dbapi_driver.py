"""The `flightsql-dbapi` client in a process of its own, for tests/test_flight_sql_dbapi.py.

Why a separate process: flightsql-dbapi ships its own generated copy of the Flight SQL
protobuf messages and registers it in protobuf's default descriptor pool, as Quiver's
``flight_server/flight_sql/flight_sql_pb2.py`` does; the two files define the same symbols
(``arrow.flight.protocol.sql.*``), so whichever is imported second fails with ``TypeError:
Couldn't build proto file into descriptor pool: duplicate symbol``. A test process holds
Quiver's server (and its module), so the client runs here, a fresh interpreter that imports
nothing of Quiver (proto_docs/flight-sql.md, "flightsql-dbapi").

The protocol is pickled frames on stdin/stdout, each an 8-byte big-endian length and the
pickle: a request ``(operation, kwargs)`` is answered ``("ok", value)`` or ``("error",
{"type", "message", "extra_info"})`` with the client's exception as raised (a FlightError's
class name and its ``extra_info`` bytes), so the test asserts on exactly what a user of the
package sees. Only the test that started the process writes to its stdin.
"""

from __future__ import annotations

import pickle
import struct
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

import pyarrow as pa

_LENGTH = struct.Struct(">Q")


def read_frame(stream: IO[bytes]) -> Any:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError
    (n,) = _LENGTH.unpack(head)
    return pickle.loads(stream.read(n))  # frames come from the test that started us


def write_frame(stream: IO[bytes], value: Any) -> None:
    body = pickle.dumps(value)
    stream.write(_LENGTH.pack(len(body)) + body)
    stream.flush()


def _client(port: int, token: str | None, **kwargs: Any) -> Any:
    from flightsql import FlightSQLClient

    return FlightSQLClient(host="127.0.0.1", port=port, token=token, insecure=True, **kwargs)


def dbapi(port: int, token: str | None, sql: str, params: list[Any] | None = None) -> dict[str, Any]:
    """The DB-API path: ``connect(client).cursor().execute(sql, params).fetchall()``."""
    from flightsql import connect

    client = _client(port, token)
    try:
        with connect(client) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return {"rows": cur.fetchall(), "names": [d[0] for d in cur.description or []]}
    finally:
        client.close()


def arrow(port: int, token: str | None, sql: str, metadata: dict[str, str] | None = None) -> pa.Table:
    """The client's Arrow path: ``execute`` (CommandStatementQuery) then DoGet of every endpoint."""
    client = _client(port, token, metadata=metadata)
    try:
        info = client.execute(sql)
        return pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints])
    finally:
        client.close()


def endpoints(port: int, token: str | None, sql: str) -> list[int]:
    """The rows of each endpoint of the statement's FlightInfo, in order."""
    client = _client(port, token)
    try:
        info = client.execute(sql)
        return [client.do_get(e.ticket).read_all().num_rows for e in info.endpoints]
    finally:
        client.close()


def bound(port: int, token: str, sql: str, params: list[Any]) -> pa.Table:
    """Parameters the way the spec's stateless prepared statements need: ``prepare``, bind by
    DoPut with the package's own record builder, then run the handle the bind answered. The
    package's ``PreparedStatement.execute`` reads nothing of the bind's answer (its copy of
    the messages predates ``DoPutPreparedStatementResult``), so the answer is decoded here:
    field 1, ``prepared_statement_handle`` (bytes)."""
    from flightsql.client import flight_descriptor
    from flightsql.dbapi import ParameterRecordBuilder
    from flightsql.flightsql_pb2 import CommandPreparedStatementQuery

    client = _client(port, token)
    try:
        with client.prepare(sql) as stmt:
            record = ParameterRecordBuilder(params).build_record()
            desc = flight_descriptor(CommandPreparedStatementQuery(prepared_statement_handle=stmt.handle))
            writer, reader = client.client.do_put(desc, record.schema, stmt.options)
            writer.write(record)
            writer.done_writing()
            answer = reader.read()
            writer.close()
            stmt.handle = _handle_of(answer.to_pybytes())  # closed on exit: the live handle
            cmd = CommandPreparedStatementQuery(prepared_statement_handle=stmt.handle)
            info = client.client.get_flight_info(flight_descriptor(cmd), stmt.options)
            return pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints])
    finally:
        client.close()


def _handle_of(answer: bytes) -> bytes:
    """``DoPutPreparedStatementResult.prepared_statement_handle``: tag 0x0a, a varint length,
    the bytes (the message's only field)."""
    if not answer or answer[0] != 0x0A:
        raise ValueError(f"not a DoPutPreparedStatementResult: {answer[:16]!r}")
    length, shift, i = 0, 0, 1
    while True:
        byte = answer[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return answer[i : i + length]
        shift += 7


def tables(port: int, token: str, schema: str | None = None) -> dict[str, Any]:
    """Metadata: the connection's table and schema names, and the raw ``get_tables`` listing."""
    from flightsql import connect

    client = _client(port, token)
    try:
        with connect(client) as conn:
            info = client.get_tables(include_schema=True, db_schema_filter_pattern=schema)
            listing = pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints])
            return {
                "table_names": conn.flightsql_get_table_names(schema),
                "schema_names": conn.flightsql_get_schema_names(),
                "listing": listing,
                "columns": conn.flightsql_get_columns("orders", "demo"),
            }
    finally:
        client.close()


def basic(port: int, user: str, password: str) -> None:
    """User and password: the package sends them in a Flight Handshake."""
    _client(port, None, user=user, password=password).close()


def race(port: int, tokens: list[str], sql: str, rounds: int) -> list[Any]:
    """Threads, one client each, running the same query ``rounds`` times at once: every
    answer (a table, or the exception's description) in thread order."""
    barrier = threading.Barrier(len(tokens))
    out: list[Any] = [None] * len(tokens)

    def worker(i: int) -> None:
        barrier.wait()
        try:
            out[i] = [arrow(port, tokens[i], sql) for _ in range(rounds)]
        except Exception as e:
            out[i] = _describe(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


OPERATIONS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (dbapi, arrow, endpoints, bound, tables, basic, race)
}


def _describe(e: BaseException) -> dict[str, Any]:
    return {"type": type(e).__name__, "message": str(e)[:4000], "extra_info": getattr(e, "extra_info", None)}


def main() -> None:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing but frames on the real stdout
    while True:
        try:
            op, kwargs = read_frame(stdin)
        except EOFError:
            return
        try:
            write_frame(stdout, ("ok", OPERATIONS[op](**kwargs)))
        except Exception as e:
            write_frame(stdout, ("error", _describe(e)))


if __name__ == "__main__":
    main()
