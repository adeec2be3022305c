"""The Flight listener: Quiver's data plane.

Python decides, C++ moves the rows: every stream is a DuckDB Arrow ``RecordBatchReader``
handed to Flight, never a Python loop over batches or rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow.flight as flight
import structlog

from catalog import Catalog, InvalidArgument, Principal, TableRef
from flight_server.errors import hide_tracebacks_from_clients, schema_error, to_flight_error
from flight_server.middleware import AuthMiddlewareFactory, CallState
from flight_server.tickets import TicketStore

log = structlog.get_logger("flight_server")

T = TypeVar("T")
BATCH_ROWS = 122_880

ACTIONS: dict[str, str] = {
    "whoami": "Who you are: {kind, swarm, agent, jti, expires_at, tables} as JSON.",
    "refresh-token": 'A new token for the same identity. Body (optional): {"ttl_seconds": N}.',
}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()


class QuiverFlightServer(flight.FlightServerBase):
    def __init__(
        self,
        catalog: Catalog,
        location: str,
        *,
        tls_certificates: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(
            location,
            middleware={"quiver": AuthMiddlewareFactory(catalog)},
            tls_certificates=tls_certificates or [],
        )
        self.catalog = catalog
        self.tickets = TicketStore()
        hide_tracebacks_from_clients()

    # --- one entry for every RPC: authentication, audit of failures, error mapping ------
    def _state(self, context: flight.ServerCallContext) -> CallState:
        state = context.get_middleware("quiver")
        assert isinstance(state, CallState)
        return state

    def _begin(self, context: flight.ServerCallContext) -> tuple[CallState, Principal]:
        state = self._state(context)
        if state.principal is None:
            self.catalog.metrics.auth_failures.labels("flight").inc()
            self.catalog.audit.record(
                "auth.failed",
                outcome="denied",
                target=f"flight:{state.method}",
                client=context.peer(),
                request_id=state.request_id,
                detail=state.auth_error.detail if state.auth_error else None,
            )
            assert state.auth_error is not None
            raise state.auth_error
        return state, state.principal

    def _run(
        self, context: flight.ServerCallContext, where: str, fn: Callable[[Principal, CallState], T]
    ) -> T:
        state = self._state(context)
        try:
            _, principal = self._begin(context)
            return fn(principal, state)
        except Exception as exc:  # noqa: BLE001 - every failure is mapped, none leaks a traceback
            err = to_flight_error(exc, state.request_id, where)
            extra = getattr(err, "extra_info", None)
            if extra:
                try:
                    state.outcome = json.loads(extra)["code"]
                except (ValueError, KeyError, TypeError):
                    state.outcome = "ERROR"
            raise err from None

    # --- listing ------------------------------------------------------------------------
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        def run(principal: Principal, state: CallState) -> list[flight.FlightInfo]:
            refs = self.catalog.policy.readable_tables(principal)
            infos = self.catalog.tables.describe(refs)
            state.fields["tables"] = len(infos)
            return [
                flight.FlightInfo(
                    info.schema,
                    flight.FlightDescriptor.for_path(info.ref.schema, info.ref.name),
                    [],
                    info.rows,
                    -1,
                )
                for info in infos
            ]

        return iter(self._run(context, "list_flights", run))

    # --- describing -----------------------------------------------------------------------
    def _resolve_path(self, principal: Principal, descriptor: flight.FlightDescriptor) -> TableRef:
        if descriptor.descriptor_type != flight.DescriptorType.PATH:
            raise InvalidArgument(
                "command descriptors are not supported by this server yet; use a PATH descriptor "
                "[schema, table]"
            )
        path = [p.decode() if isinstance(p, bytes) else p for p in descriptor.path]
        if len(path) != 2 or not all(path):
            raise InvalidArgument(f"a PATH descriptor is [schema, table], got {path!r}")
        return self.catalog.policy.require_readable(principal, path[0], path[1])

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        def run(principal: Principal, state: CallState) -> flight.FlightInfo:
            ref = self._resolve_path(principal, descriptor)
            (info,) = self.catalog.tables.describe([ref])
            state.fields["table"] = ref.qualified
            ticket = self.tickets.issue(principal, ("scan", ref))
            endpoint = flight.FlightEndpoint(ticket, [])
            return flight.FlightInfo(info.schema, descriptor, [endpoint], info.rows, -1)

        return self._run(context, "get_flight_info", run)

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        def run(principal: Principal, state: CallState) -> flight.SchemaResult:
            ref = self._resolve_path(principal, descriptor)
            with self.catalog.db.reading() as cur:
                schema = cur.sql(f"SELECT * FROM {ref.sql} LIMIT 0").to_arrow_table().schema
            return flight.SchemaResult(schema)

        try:
            return self._run(context, "get_schema", run)
        except flight.FlightError as err:
            raise schema_error(err) from None

    # --- streaming ------------------------------------------------------------------------
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        def run(principal: Principal, state: CallState) -> flight.FlightDataStream:
            _kind, ref = self.tickets.redeem(principal, ticket.ticket)
            # The allowlist may have changed since the ticket was issued.
            ref = self.catalog.policy.require_readable(principal, ref.schema, ref.name)
            state.fields["table"] = ref.qualified
            # The reader owns its cursor's result: the cursor is released with the stream.
            reader = self.catalog.db.cursor().sql(f"SELECT * FROM {ref.sql}").to_arrow_reader(BATCH_ROWS)
            return flight.RecordBatchStream(reader)

        return self._run(context, "do_get", run)

    # --- actions --------------------------------------------------------------------------
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return self._run(context, "list_actions", lambda p, s: list(ACTIONS.items()))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[bytes]:
        def run(principal: Principal, state: CallState) -> list[bytes]:
            state.action = action.type
            body = action.body.to_pybytes() if action.body is not None else b""
            if action.type == "whoami":
                return [_json(self.whoami(principal))]
            if action.type == "refresh-token":
                ttl = _parse_body(body).get("ttl_seconds")
                issued = self.catalog.tokens.refresh(principal, ttl)
                return [_json({f: getattr(issued, f) for f in issued.__struct_fields__})]
            raise InvalidArgument(f"unknown action {action.type!r}; available: {', '.join(sorted(ACTIONS))}")

        return iter(self._run(context, "do_action", run))

    def whoami(self, principal: Principal) -> dict[str, Any]:
        return {
            "kind": principal.kind,
            "swarm": principal.swarm,
            "agent": principal.agent,
            "jti": principal.jti,
            "expires_at": principal.expires_at.isoformat(),
            "tables": self.catalog.policy.readable_names(principal),
        }

    # --- not offered (yet) -------------------------------------------------------------
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        def run(principal: Principal, state: CallState) -> None:
            raise InvalidArgument("DoPut is not offered by this server")

        self._run(context, "do_put", run)

    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        def run(principal: Principal, state: CallState) -> None:
            raise InvalidArgument("DoExchange is not offered by this server")

        self._run(context, "do_exchange", run)


def _parse_body(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("action body must be a JSON object") from None
    if not isinstance(obj, dict):
        raise InvalidArgument("action body must be a JSON object")
    return obj
