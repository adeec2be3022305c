"""Which Flight SQL message goes where, and what Quiver refuses.

The server (flight_server/server.py) hands every Flight SQL descriptor, DoPut and action here;
the answers are the data plane's own: a :class:`~flight_server.plans.Plan` whose endpoints are
Quiver's tickets (wrapped as ``TicketStatementQuery`` for Flight SQL clients), and every refusal
a :class:`~catalog.QuiverError` that leaves through flight_server/errors.py with the codes of
proto_docs/errors.md.

Quiver's warehouse is read-only: updates (``CommandStatementUpdate``,
``CommandPreparedStatementUpdate``), transactions and savepoints are PERMISSION_DENIED, and so is
any statement the SQL guard does not accept as a query. Bulk ingest (``CommandStatementIngest``)
writes nothing of the warehouse: it saves a new tabular artefact owned by the caller
(:mod:`~flight_server.flight_sql.ingest`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.flight as flight

from catalog import Catalog, InvalidArgument, PermissionDenied, Principal
from catalog.errors import bounded
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.flight_sql import wire
from flight_server.flight_sql.ingest import ingest, update_result
from flight_server.flight_sql.metadata import Metadata
from flight_server.flight_sql.statements import Statements
from flight_server.middleware import QueryFacts
from flight_server.planner import Planner
from flight_server.plans import Plan
from flight_server.running import RunningStreams
from flight_server.tickets import TicketStore

READ_ONLY = (
    "Quiver is read-only: it answers queries (one SELECT-class statement) and metadata, never "
    "updates, DDL or transactions"
)
INGEST_AT_DOPUT = (
    "CommandStatementIngest is a DoPut: send the rows with it and they are saved as a new tabular "
    "artefact (proto_docs/flight-sql.md)"
)

#: Flight SQL actions (DoAction) and what they do here; ListActions shows them.
ACTIONS: dict[str, str] = {
    "CreatePreparedStatement": (
        "Flight SQL: prepare a query (body: Any(ActionCreatePreparedStatementRequest)); answers "
        "Any(ActionCreatePreparedStatementResult) with a handle bound to your token's principal that "
        "expires like a ticket (proto_docs/flight-sql.md)."
    ),
    "ClosePreparedStatement": (
        "Flight SQL: forget a prepared statement handle (body: Any(ActionClosePreparedStatementRequest))."
    ),
    "CancelFlightInfo": (
        "Flight SQL / Flight: cancel the running query of a FlightInfo (body: CancelFlightInfoRequest); "
        "answers CancelFlightInfoResult."
    ),
    "CloseSession": "Flight SQL / Flight: end a session (Quiver keeps no session state); answers CloseSessionResult.",
    "GetSessionOptions": (
        "Flight SQL / Flight: the session's options: catalog (the DuckDB database) and schema (main, "
        "where unqualified names resolve); answers GetSessionOptionsResult."
    ),
    "SetSessionOptions": (
        "Flight SQL / Flight: Quiver keeps no session, so nothing can be changed: each option is answered "
        "INVALID_NAME or INVALID_VALUE in SetSessionOptionsResult (setting the current value is accepted)."
    ),
}
#: Flight SQL actions refused because Quiver is read-only (transactions) or has no such thing.
_REFUSED_ACTIONS = {
    "BeginTransaction": READ_ONLY,
    "EndTransaction": READ_ONLY,
    "BeginSavepoint": READ_ONLY,
    "EndSavepoint": READ_ONLY,
}
#: Flight SQL / Flight actions Quiver knows but does not offer: INVALID_ARGUMENT with what to do.
_NOT_OFFERED = {
    "CancelQuery": "CancelQuery is deprecated by Flight SQL and not offered: use CancelFlightInfo",
    "CreatePreparedSubstraitPlan": "Substrait plans are not accepted: send SQL (CreatePreparedStatement)",
}


def _no_transaction(message: Any) -> None:
    if message.HasField("transaction_id"):
        raise PermissionDenied(f"{READ_ONLY}; send the request without a transaction_id")


def _refuse_writes(message: Any) -> None:
    if isinstance(message, pb.CommandStatementUpdate | pb.CommandPreparedStatementUpdate):
        raise PermissionDenied(f"{READ_ONLY} ({type(message).DESCRIPTOR.name} is refused)")
    if isinstance(message, pb.CommandStatementIngest):
        raise InvalidArgument(INGEST_AT_DOPUT)


class FlightSql:
    """The Flight SQL side of one server: its statements, prepared handles and listings."""

    def __init__(
        self, catalog: Catalog, planner: Planner, tickets: TicketStore[Any], running: RunningStreams
    ) -> None:
        ttl = float(catalog.config.limits.ticket_ttl_seconds)
        self.tickets = tickets
        self.running = running
        self.artefacts = catalog.artefacts
        self.statements = Statements(planner, ttl)
        self.metadata = Metadata(catalog)

    # --- GetFlightInfo / GetSchema ---------------------------------------------------------------
    def plan(self, principal: Principal, raw: bytes, *, execute: bool) -> Plan:
        """The plan of a Flight SQL command (``execute``: GetFlightInfo; else GetSchema)."""
        message = wire.unpack(raw)
        if isinstance(message, pb.CommandStatementQuery):
            _no_transaction(message)
            return self.statements.query(principal, message.query, (), execute=execute)
        if isinstance(message, pb.CommandPreparedStatementQuery):
            return self.statements.prepared(principal, message.prepared_statement_handle, execute=execute)
        if isinstance(message, wire.METADATA_COMMANDS):
            return self.metadata.plan(principal, message)
        _refuse_writes(message)
        raise InvalidArgument(
            f"{type(message).DESCRIPTOR.name} is not a command for GetFlightInfo or GetSchema "
            "(proto_docs/flight-sql.md)"
        )

    # --- DoPut ------------------------------------------------------------------------------------------
    def do_put(
        self,
        principal: Principal,
        raw: bytes,
        reader: flight.MetadataRecordBatchReader,
        cancelled: Callable[[], bool],
        fields: dict[str, object],
    ) -> bytes:
        """DoPut of a Flight SQL command: parameters for a prepared query (the answer is the
        raw ``DoPutPreparedStatementResult``, not packed in Any), or an ingest saved as a new
        tabular artefact (the raw ``DoPutUpdateResult``); anything else is refused. ``fields``
        are the call's log fields: an ingest names the artefact it saved."""
        message = wire.unpack(raw)
        if isinstance(message, pb.CommandPreparedStatementQuery):
            return self.statements.bind(principal, message.prepared_statement_handle, reader)
        if isinstance(message, pb.CommandStatementIngest):
            _no_transaction(message)
            fields["kind"] = "ingest"
            artefact = ingest(self.artefacts, principal, message, reader, cancelled)
            fields["target"] = f"artefact:{artefact.id}"
            fields["rows"] = artefact.rows
            return update_result(artefact)
        _refuse_writes(message)
        raise InvalidArgument(
            f"DoPut takes parameters for a CommandPreparedStatementQuery or rows for a "
            f"CommandStatementIngest; {type(message).DESCRIPTOR.name} is not accepted (Quiver is read-only)"
        )

    # --- DoAction ---------------------------------------------------------------------------------------
    def handles(self, action: str) -> bool:
        return action in ACTIONS or action in _REFUSED_ACTIONS or action in _NOT_OFFERED

    def do_action(
        self, principal: Principal, action: str, body: bytes, facts: QueryFacts | None = None
    ) -> list[bytes]:
        """One Flight SQL action; ``facts``: the query-log record of a ``CreatePreparedStatement``
        (recorded if it is refused), given the statement's text once it is decoded."""
        if action in _REFUSED_ACTIONS:
            raise PermissionDenied(_REFUSED_ACTIONS[action])
        if action == "CreatePreparedStatement":
            request = wire.unpack_as(body, pb.ActionCreatePreparedStatementRequest, action)
            if facts is not None:
                facts.sql = request.query
            _no_transaction(request)
            return [self.statements.create(principal, request.query)]
        if action == "ClosePreparedStatement":
            close = wire.unpack_as(body, pb.ActionClosePreparedStatementRequest, action)
            self.statements.close(principal, close.prepared_statement_handle)
            return []
        if action == "CancelFlightInfo":
            return [self.cancel(principal, body)]
        if action == "CloseSession":
            return [pb.CloseSessionResult(status=pb.CloseSessionResult.CLOSED).SerializeToString()]
        if action == "GetSessionOptions":
            options = {
                name: pb.SessionOptionValue(string_value=value) for name, value in self._session().items()
            }
            return [pb.GetSessionOptionsResult(session_options=options).SerializeToString()]
        if action == "SetSessionOptions":
            return [self.set_session_options(body)]
        raise InvalidArgument(
            f"{_NOT_OFFERED.get(action, f'Flight SQL action {bounded(action, 40)!r} is not supported')} "
            "(proto_docs/flight-sql.md)"
        )

    def _session(self) -> dict[str, str]:
        """What a session would hold, fixed: the one catalog, and the schema unqualified names
        resolve to (DuckDB's ``main``; the guard then asks the allowlist as for any name)."""
        return {"catalog": self.metadata.catalog_name, "schema": "main"}

    def set_session_options(self, body: bytes) -> bytes:
        """``SetSessionOptions``: nothing can change (no sessions). Setting an option to the value
        it has is accepted; any other value is INVALID_VALUE, any other name INVALID_NAME — in the
        result, as the spec has it, not as an error."""
        request = wire.parse_plain(body, pb.SetSessionOptionsRequest, "SetSessionOptions")
        current = self._session()
        errors: dict[str, pb.SetSessionOptionsResult.Error] = {}
        for name, value in request.session_options.items():
            if name not in current:
                errors[name] = pb.SetSessionOptionsResult.Error(value=pb.SetSessionOptionsResult.INVALID_NAME)
            elif value.WhichOneof("option_value") != "string_value" or value.string_value != current[name]:
                errors[name] = pb.SetSessionOptionsResult.Error(
                    value=pb.SetSessionOptionsResult.INVALID_VALUE
                )
        return pb.SetSessionOptionsResult(errors=errors).SerializeToString()

    def cancel(self, principal: Principal, body: bytes) -> bytes:
        """``CancelFlightInfo``: the FlightInfo's tickets name it; only the caller's own
        tickets are honoured (another principal's ticket is refused by the ticket store)."""
        request = wire.parse_plain(body, pb.CancelFlightInfoRequest, "CancelFlightInfo")
        try:
            info = flight.FlightInfo.deserialize(request.info)
        except Exception:  # noqa: BLE001 - pyarrow raises several kinds for bad bytes
            raise InvalidArgument("CancelFlightInfo: the request does not hold a valid FlightInfo") from None
        groups: set[str] = set()
        for endpoint in info.endpoints:
            payload = self.tickets.redeem(principal, wire.unwrap_ticket(endpoint.ticket.ticket))
            groups.add(payload.group)
        if not groups:
            raise InvalidArgument("CancelFlightInfo: the FlightInfo has no endpoints to cancel")
        done = self.running.cancel(groups)
        status = pb.CANCEL_STATUS_CANCELLED if done else pb.CANCEL_STATUS_CANCELLING
        return pb.CancelFlightInfoResult(status=status).SerializeToString()
