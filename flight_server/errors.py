"""One path for every failure that leaves the Flight listener.

pyarrow's Python server forwards a server traceback with any exception that is not a
``flight.FlightError`` subclass, and cannot send INVALID_ARGUMENT or NOT_FOUND without one.
So every RPC body runs inside :func:`to_flight_error`: Quiver's own errors become the
FlightError of DESIGN.md §5 with ``extra_info`` = ``{"code", "detail"}``; anything else is a
fault of ours, logged with a request id and sent as INTERNAL without internals.
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.flight as flight
import structlog

from catalog.errors import (
    Cancelled,
    DeadlineExceeded,
    PermissionDenied,
    QuiverError,
    Unauthenticated,
)

log = structlog.get_logger(__name__)


def _extra(code: str, detail: str) -> bytes:
    return json.dumps({"code": code, "detail": detail}).encode()


def flight_error(err: QuiverError) -> flight.FlightError:
    extra = _extra(err.code, err.detail)
    if isinstance(err, Unauthenticated):
        return flight.FlightUnauthenticatedError(err.detail, extra_info=extra)
    if isinstance(err, PermissionDenied):
        return flight.FlightUnauthorizedError(err.detail, extra_info=extra)
    if isinstance(err, DeadlineExceeded):
        return flight.FlightTimedOutError(err.detail, extra_info=extra)
    if isinstance(err, Cancelled):
        return flight.FlightCancelledError(err.detail, extra_info=extra)
    if err.code == "UNAVAILABLE":
        return flight.FlightUnavailableError(err.detail, extra_info=extra)
    return flight.FlightServerError(err.detail, extra_info=extra)


def internal_error(exc: BaseException, request_id: str, where: str) -> flight.FlightError:
    log.error("flight.internal_error", where=where, request_id=request_id, exc_info=exc)
    detail = f"internal error (request id {request_id}); the server log has the details"
    return flight.FlightInternalError(detail, extra_info=_extra("INTERNAL", detail))


def hide_tracebacks_from_clients() -> None:
    """pyarrow formats a Python traceback into the status it sends for any exception that is
    not mapped through its FlightError path — and its ``get_schema`` (26.x) maps none, even
    FlightErrors. That text is formatted lazily, after the RPC returned, with the standard
    ``traceback`` module, which honours ``sys.tracebacklimit``. So the Flight server process
    sets it to 0: a client can never receive our stack frames. The process-wide cost is
    that code formatting tracebacks with the default limit prints none; Quiver's own logging
    (quiver.logs) passes an explicit limit and keeps full tracebacks in the server log."""
    sys.tracebacklimit = 0


def schema_error(err: flight.FlightError) -> Exception:
    """The exception for a failed GetSchema: a type pyarrow maps to the closest status
    (INVALID_ARGUMENT, NOT_FOUND, else UNKNOWN), with ``"<CODE>: <detail>"`` as message so a
    client can still branch on the code."""
    try:
        info = json.loads(err.extra_info or b"{}")
    except ValueError:
        info = {}
    code = info.get("code", "INTERNAL")
    detail = info.get("detail", str(err))
    message = f"{code}: {detail}"
    if code == "INVALID_ARGUMENT":
        return pa.ArrowInvalid(message)
    if code == "NOT_FOUND":
        return pa.ArrowKeyError(message)
    return pa.ArrowException(message)


def to_flight_error(exc: BaseException, request_id: str, where: str) -> flight.FlightError:
    if isinstance(exc, flight.FlightError):
        return exc
    if isinstance(exc, QuiverError):
        return flight_error(exc)
    return internal_error(exc, request_id, where)
