"""Flight SQL statements: ``CommandStatementQuery`` and prepared statements.

Both are planned exactly like a ``{"kind": "query"}`` command — :meth:`Planner.query
<flight_server.planner.Planner.query>`: the same limits, guard, admission path, row cap and
cut, result cache and tickets — so Flight SQL adds no second query path.

Prepared statements. ``CreatePreparedStatement`` checks the SQL with the guard at once (a
refusal is immediate), takes its result schema from DuckDB's binder (the ``LIMIT 0`` probe of
GetSchema) and answers an opaque handle: a grant of :class:`~flight_server.tickets.TicketStore`
bound to the caller's principal that expires like a ticket (``[limits] ticket_ttl_seconds``).
Handles are immutable: binding parameters (DoPut on ``CommandPreparedStatementQuery``, one
row) issues a *new* handle carrying them, answered in ``DoPutPreparedStatementResult`` as the
spec allows, so two binds of one statement never race. The ADBC driver prepares every
statement, with or without parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from catalog import InvalidArgument, Principal, QuiverError
from flight_server import commands as cmds
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.flight_sql.wire import pack
from flight_server.planner import Planner
from flight_server.plans import Plan
from flight_server.tickets import TicketStore

#: A parameter batch (DoPut) larger than a JSON command is refused, as a command would be.
MAX_BIND_BYTES = cmds.MAX_COMMAND_BYTES


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a prepared statement handle grants: the SQL, its bound parameters (if any) and
    how many it takes."""

    sql: str
    param_count: int
    params: tuple[Any, ...] | None = None


class Statements:
    def __init__(self, planner: Planner, ttl_seconds: float) -> None:
        self.planner = planner
        self.handles: TicketStore[Prepared] = TicketStore(ttl_seconds)

    # --- queries --------------------------------------------------------------------------
    def query(self, principal: Principal, sql: str, params: tuple[Any, ...], *, execute: bool) -> Plan:
        """The plan of one query: :meth:`Planner.query`, as for a ``query`` command."""
        command = cmds.QueryCommand(sql=sql, params=list(params))
        return self.planner.query(principal, command, execute=execute)

    def prepared(self, principal: Principal, handle: bytes, *, execute: bool) -> Plan:
        """GetFlightInfo / GetSchema of ``CommandPreparedStatementQuery``. GetFlightInfo runs
        the query, so it needs the parameters bound; GetSchema only binds it, with any
        parameter not bound yet as NULL (as ``dataset_schema`` was made)."""
        prepared = self.handles.redeem(principal, handle)
        if prepared.param_count and prepared.params is None:
            if not execute:  # GetSchema before a bind: the schema with the parameters NULL
                return self.query(principal, prepared.sql, (None,) * prepared.param_count, execute=False)
            raise InvalidArgument(
                f"this prepared statement takes {prepared.param_count} parameter(s): bind them first "
                "(DoPut of one row on CommandPreparedStatementQuery)"
            )
        return self.query(principal, prepared.sql, prepared.params or (), execute=execute)

    # --- CreatePreparedStatement / ClosePreparedStatement -------------------------------------
    def create(self, principal: Principal, sql: str) -> bytes:
        """``CreatePreparedStatement``: the packed ``ActionCreatePreparedStatementResult``."""
        command = cmds.QueryCommand(sql=sql)
        cmds.check_query(command, self.planner.limits)
        guarded = self.planner.check_sql(principal, sql)
        count = guarded.param_count
        dataset = b""
        try:
            # Unbound parameters are NULLs for the binder: the schema of most statements
            # with parameters, and none (an empty dataset_schema) when NULL does not bind.
            schema = self.planner.query_schema(principal, guarded, (None,) * count)
            dataset = schema.serialize().to_pybytes()
        except InvalidArgument:
            if not count:
                raise
        parameters = b""
        if count:
            # DuckDB does not tell parameter types before they are bound: each is "any" (null).
            fields = [pa.field(f"${i + 1}", pa.null()) for i in range(count)]
            parameters = pa.schema(fields).serialize().to_pybytes()
        handle, _ = self.handles.issue(principal, Prepared(sql, count))
        return pack(
            pb.ActionCreatePreparedStatementResult(
                prepared_statement_handle=handle, dataset_schema=dataset, parameter_schema=parameters
            )
        )

    def close(self, principal: Principal, handle: bytes) -> None:
        """``ClosePreparedStatement``: forget the handle. Closing an unknown, expired or
        already closed handle is not an error (the action is idempotent)."""
        self.handles.revoke(principal, handle)

    # --- DoPut: bind parameters -------------------------------------------------------------------
    def bind(self, principal: Principal, handle: bytes, reader: flight.MetadataRecordBatchReader) -> bytes:
        """DoPut of parameters on ``CommandPreparedStatementQuery``: one row, one value per
        parameter, in order. Answers the raw ``DoPutPreparedStatementResult`` bytes with the
        new handle that carries them (the old one stays as it was)."""
        prepared = self.handles.redeem(principal, handle)
        batches: list[pa.RecordBatch] = []
        size = 0
        try:
            for chunk in reader:
                if chunk.data is None:
                    continue
                size += chunk.data.nbytes
                if size > MAX_BIND_BYTES:
                    raise InvalidArgument(
                        f"the bound parameters are more than {MAX_BIND_BYTES} bytes; bind one row of values"
                    )
                batches.append(chunk.data)
        except QuiverError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise InvalidArgument(f"the parameter stream could not be read: {str(e)[:200]}") from None
        table = pa.Table.from_batches(batches, schema=reader.schema)
        if table.num_rows != 1:
            raise InvalidArgument(
                f"bind exactly one row of parameters per query; got {table.num_rows} rows "
                "(run the statement once per parameter set)"
            )
        if table.num_columns != prepared.param_count:
            raise InvalidArgument(
                f"the statement takes {prepared.param_count} parameter(s); {table.num_columns} were bound"
            )
        # By position (the columns' names are the client's: "0", "1", … for ADBC).
        params = tuple(table.column(i)[0].as_py() for i in range(table.num_columns))
        new_handle, _ = self.handles.issue(principal, Prepared(prepared.sql, prepared.param_count, params))
        return pb.DoPutPreparedStatementResult(prepared_statement_handle=new_handle).SerializeToString()
