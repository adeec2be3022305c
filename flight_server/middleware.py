"""Authentication and per-call bookkeeping for every Flight RPC.

The middleware reads ``authorization: Bearer <token>`` and verifies it (memory only). It does
not reject by itself: the client's address is known only to the RPC handler
(``context.peer()``), and an authentication failure is audited with it. Every handler
therefore starts with :meth:`QuiverFlightServer._begin`, which raises the stored failure; a
test calls every RPC without a token to keep that promise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.flight as flight
import structlog

from catalog import Catalog, PermissionDenied, Principal, QuiverError, Unauthenticated
from catalog.identity import METRICS_ONLY
from catalog.query_log import RemoteWork
from catalog.tokens import bearer_token
from flight_server import inline
from flight_server.errors import flight_error
from flight_server.limits import Deadline

log = structlog.get_logger("flight_server")

_METHOD_NAMES = {m: m.name.lower() for m in flight.FlightMethod}


@dataclass(slots=True)
class QueryFacts:
    """What the query log records of a data-plane call (catalog/query_log.py), filled in by
    its handler as it learns them; ``failures_only``: recorded only when the call fails (a
    GetFlightInfo that was planned records nothing: its DoGet is the request)."""

    kind: str
    via: str = "flight"
    tables: tuple[str, ...] = ()
    sql: str | None = None
    params: int = 0
    rows: int | None = None
    nbytes: int | None = None
    failures_only: bool = False
    #: What the call ran in Snowflake (live tables): made by flight_server/live.py when it
    #: starts the call's first live query; its query ids go into the record.
    remote: RemoteWork | None = None

    def sent(self, rows: int, nbytes: int) -> None:
        """Count rows and bytes sent (the paths where Python sees the batches or the table)."""
        self.rows = (self.rows or 0) + rows
        self.nbytes = (self.nbytes or 0) + nbytes


def _code(outcome: str) -> str:
    """The error code of a call's outcome: a code as sent (upper case), or, for an exception
    that never went through the handler's mapping (the client went away mid-stream), its
    kind."""
    if outcome.isupper():
        return outcome
    return "CANCELLED" if "Cancel" in outcome else "ERROR"


class _CallRecorder:
    """What every call records: the request metrics — their labelled children looked up once
    per (method, outcome), not on every call (a label lookup takes a lock and hashes the
    labels) — and the ``flight.call`` log record."""

    def __init__(self, catalog: Catalog) -> None:
        self._metrics = catalog.metrics
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._log: Any = None

    @property
    def log(self) -> Any:
        """The logger of the per-call record, bound once: structlog's module-level proxy
        builds a new bound logger on every call (the logging setup does not cache them)."""
        if self._log is None:
            self._log = log.bind()
        return self._log

    def observe(self, name: str, outcome: str, seconds: float) -> None:
        children = self._children.get((name, outcome))
        if children is None:
            m = self._metrics
            children = (m.requests.labels("flight", name, outcome), m.request_seconds.labels("flight", name))
            self._children[(name, outcome)] = children
        children[0].inc()
        children[1].observe(seconds)


class CallState(flight.ServerMiddleware):
    def __init__(
        self,
        catalog: Catalog,
        method: str,
        principal: Principal | None,
        error: QuiverError | None,
        metrics: _CallRecorder | None = None,
    ) -> None:
        self.catalog = catalog
        self.method = method
        self.principal = principal
        self.auth_error = error
        self._metrics = metrics or _CallRecorder(catalog)
        self.request_id = os.urandom(8).hex()
        self.started = time.perf_counter()
        self.action: str | None = None
        self.outcome = "OK"
        self.fields: dict[str, object] = {}
        # Released when the call ends: for DoGet that is when the stream has been sent, has
        # failed, or the client went away (cursor, deadline, concurrency slot).
        self.cleanups: list[Callable[[], None]] = []
        self.deadline: Deadline | None = None
        # Set by the handler of a data-plane call: one query-log record when the call ends.
        self.query: QueryFacts | None = None
        # The x-quiver-inline-bytes header as sent (flight_server/inline.py): read by
        # GetFlightInfo, which refuses a malformed one.
        self.inline: Sequence[str | bytes] | None = None

    def sending_headers(self) -> dict[str, str]:
        return {"x-request-id": self.request_id}

    def call_completed(self, exception: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started
        for cleanup in reversed(self.cleanups):
            try:
                cleanup()
            except Exception as e:  # noqa: BLE001 - one failed release must not skip the others
                log.warning("flight.cleanup_failed", request_id=self.request_id, error=str(e))
        self.cleanups.clear()
        if self.deadline is not None and self.deadline.fired:
            self.outcome = "DEADLINE_EXCEEDED"
        elif exception is not None and self.outcome == "OK":
            self.outcome = type(exception).__name__
        self._metrics.observe(self.action or self.method, self.outcome, seconds)
        self._metrics.log.info(
            "flight.call",
            method=self.method,
            action=self.action,
            principal=self.principal.label if self.principal else None,
            outcome=self.outcome,
            ms=round(seconds * 1000, 3),
            request_id=self.request_id,
            **self.fields,
        )
        facts = self.query
        if (
            facts is not None
            and self.principal is not None
            and not (facts.failures_only and self.outcome == "OK")
        ):
            self.catalog.query_log.record(
                self.principal,
                kind=facts.kind,
                via=facts.via,
                tables=facts.tables,
                sql=facts.sql,
                params=facts.params,
                rows=facts.rows,
                nbytes=facts.nbytes,
                seconds=seconds,
                code=_code(self.outcome),
                request_id=self.request_id,
                remote=facts.remote,
            )


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._metrics = _CallRecorder(catalog)

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> CallState:
        method = _METHOD_NAMES.get(info.method) or str(info.method)  # str(): only when unknown
        principal: Principal | None = None
        error: QuiverError | None = None
        values = [
            v if isinstance(v, str) else v.decode("latin-1") for v in headers.get("authorization") or []
        ]
        try:
            principal = self.catalog.tokens.check(bearer_token(values))
        except Unauthenticated as e:
            error = e
        if principal is not None and principal.is_metrics:
            # Valid, but for GET /metrics only: refused (and audited) like a bad token, and
            # not marked used.
            principal, error = None, PermissionDenied(METRICS_ONLY)
        elif principal is not None:
            self.catalog.tokens.record_use(principal)
        if error is not None and info.method == flight.FlightMethod.GET_SCHEMA:
            # pyarrow cannot send a FlightError from the GetSchema handler (errors.py): refuse
            # here, where it can. The client's address is not known at this point.
            self.catalog.metrics.auth_failures.labels("flight").inc()
            self.catalog.metrics.requests.labels("flight", method, error.code).inc()
            self.catalog.audit.record(
                "auth.failed", outcome="denied", target=f"flight:{method}", detail=error.detail
            )
            raise flight_error(error)
        state = CallState(self.catalog, method, principal, error, self._metrics)
        state.inline = headers.get(inline.HEADER)
        return state
