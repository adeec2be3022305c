"""Flight SQL statements: ``CommandStatementQuery`` and prepared statements.

Both are planned exactly like a ``{"kind": "query"}`` command — :meth:`Planner.query
<flight_server.planner.Planner.query>`: the same limits, guard, admission path, row cap and
cut, result cache and tickets — so Flight SQL adds no second query path.

Prepared statements. ``CreatePreparedStatement`` checks the SQL with the guard at once (a
refusal is immediate), takes its result schema from DuckDB's binder (the ``LIMIT 0`` probe of
GetSchema) and answers an opaque handle: a grant of :class:`~flight_server.tickets.TicketStore`
bound to the caller's principal that expires like a ticket (``[limits] ticket_ttl_seconds``).
Handles are immutable: binding parameters (DoPut on ``CommandPreparedStatementQuery``, one
row) issues a *new* handle carrying them, answered in ``DoPutPreparedStatementResult``, and
retires the one it was given — the spec's stateless prepared statements ("any previous handles
for this prepared statement should be considered invalid"). So a bind never changes what
another request reads, of two binds of one handle at once exactly one wins (the other is
NOT_FOUND), and a statement executed many times holds one live handle, not one per execution.
The ADBC driver prepares every statement, with or without parameters, and follows the new
handle.

Each principal holds at most :attr:`Statements.max_handles` live handles: the handles of all
principals share one bounded store, and without a share of its own a single agent creating
statements in a loop would push everyone else's out of it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from catalog import InvalidArgument, NotFound, Principal, QuiverError, ResourceExhausted
from flight_server import commands as cmds
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.flight_sql.wire import pack
from flight_server.planner import Planner
from flight_server.plans import Plan
from flight_server.tickets import TicketStore

#: A parameter batch (DoPut) larger than a JSON command is refused, as a command would be.
MAX_BIND_BYTES = cmds.MAX_COMMAND_BYTES
#: Batches a parameter stream may have: one row needs one; empty batches do not count as bytes.
MAX_BIND_BATCHES = 64
#: Every this many handles issued, the bookkeeping of principals whose handles all expired goes.
SWEEP_EVERY = 1_000


@dataclass(frozen=True, slots=True)
class Prepared:
    """What a prepared statement handle grants: the SQL, its bound parameters (if any) and
    how many it takes."""

    sql: str
    param_count: int
    params: tuple[Any, ...] | None = None


class Statements:
    #: Live prepared statement handles one principal may hold (CONTRIBUTING: per-principal
    #: shares, as for queries and async queries).
    max_handles = 1_000

    def __init__(self, planner: Planner, ttl_seconds: float) -> None:
        self.planner = planner
        self.ttl = ttl_seconds
        self.handles: TicketStore[Prepared] = TicketStore(ttl_seconds)
        # subject -> its live handles, oldest first, with when each expires (time.monotonic()).
        self._held: dict[str, OrderedDict[bytes, float]] = {}
        self._lock = threading.Lock()
        self._holds = 0

    def _hold(self, principal: Principal, prepared: Prepared) -> bytes:
        """Issue a handle for ``prepared`` within the principal's share."""
        now = time.monotonic()
        with self._lock:
            self._holds += 1
            if self._holds % SWEEP_EVERY == 0:  # principals that stopped coming back
                self._held = {s: h for s, h in self._held.items() if h and next(reversed(h.values())) > now}
            held = self._held.setdefault(principal.subject, OrderedDict())
            while held and next(iter(held.values())) <= now:  # expired: oldest first (one TTL)
                held.popitem(last=False)
            if len(held) >= self.max_handles:
                raise ResourceExhausted(
                    f"you hold {len(held)} open prepared statements, the limit per principal; close "
                    f"some (ClosePreparedStatement) or let them expire ({self.ttl:g} s after their "
                    "creation or last bind)"
                )
            handle, grant = self.handles.issue(principal, prepared)
            held[handle] = grant.expires
            return handle

    def _redeem(self, principal: Principal, handle: bytes) -> Prepared:
        """The handle's statement; NOT_FOUND in a prepared statement's words (the store's own
        speaks of tickets), PERMISSION_DENIED for another principal's."""
        try:
            return self.handles.redeem(principal, handle)
        except NotFound:
            raise NotFound(
                f"unknown, expired or retired prepared statement handle: handles live {self.ttl:g} s from "
                "their creation or bind, a bind answers a new one (use it), and they do not survive a "
                "restart; prepare the statement again (CreatePreparedStatement)"
            ) from None

    def _release(self, principal: Principal, handle: bytes) -> bool:
        """Retire ``handle`` if it is the principal's and still live; whether it was."""
        with self._lock:
            held = self._held.get(principal.subject)
            if held is not None:
                held.pop(handle, None)
                if not held:
                    del self._held[principal.subject]
            return self.handles.revoke(principal, handle)

    # --- queries --------------------------------------------------------------------------
    def query(self, principal: Principal, sql: str, params: tuple[Any, ...], *, execute: bool) -> Plan:
        """The plan of one query: :meth:`Planner.query`, as for a ``query`` command."""
        command = cmds.QueryCommand(sql=sql, params=list(params))
        return self.planner.query(principal, command, execute=execute)

    def prepared(self, principal: Principal, handle: bytes, *, execute: bool) -> Plan:
        """GetFlightInfo / GetSchema of ``CommandPreparedStatementQuery``. GetFlightInfo runs
        the query, so it needs the parameters bound; GetSchema only binds it, with any
        parameter not bound yet as NULL (as ``dataset_schema`` was made)."""
        prepared = self._redeem(principal, handle)
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
        cmds.check_query(command, self.planner.limits.max_rows)
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
        handle = self._hold(principal, Prepared(sql, count))
        return pack(
            pb.ActionCreatePreparedStatementResult(
                prepared_statement_handle=handle, dataset_schema=dataset, parameter_schema=parameters
            )
        )

    def close(self, principal: Principal, handle: bytes) -> None:
        """``ClosePreparedStatement``: forget the handle. Closing an unknown, expired or
        already closed handle is not an error (the action is idempotent)."""
        self._release(principal, handle)

    # --- DoPut: bind parameters -------------------------------------------------------------------
    def bind(self, principal: Principal, handle: bytes, reader: flight.MetadataRecordBatchReader) -> bytes:
        """DoPut of parameters on ``CommandPreparedStatementQuery``: one row, one value per
        parameter, in order. Answers the raw ``DoPutPreparedStatementResult`` bytes with the
        new handle that carries them; the one given is retired (a refused bind leaves it as
        it was)."""
        prepared = self._redeem(principal, handle)
        batches: list[pa.RecordBatch] = []
        size = 0
        try:
            for count, chunk in enumerate(reader, start=1):
                if count > MAX_BIND_BATCHES:
                    raise InvalidArgument(
                        f"the parameter stream has more than {MAX_BIND_BATCHES} batches; bind one row of values"
                    )
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
        if not self._release(principal, handle):
            raise NotFound(
                "this prepared statement handle was replaced by another bind (or closed) meanwhile: "
                "use the handle that bind answered, or prepare the statement again"
            )
        new_handle = self._hold(principal, Prepared(prepared.sql, prepared.param_count, params))
        return pb.DoPutPreparedStatementResult(prepared_statement_handle=new_handle).SerializeToString()
