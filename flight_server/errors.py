"""One path for every failure that leaves the Flight listener.

pyarrow's Python server forwards a server traceback with any exception that is not a
``flight.FlightError`` subclass, and cannot send INVALID_ARGUMENT or NOT_FOUND without one.
So every RPC body's failure goes through :func:`map_exception` (and :func:`classify`, the one
classification of a failure, shared with the async path): Quiver's own errors become the
FlightError of proto_docs/errors.md with ``extra_info`` = ``{"code", "detail"}``
(:func:`quiver_client.wire.encode_error`, which the client decodes); anything else is a
fault of ours, logged with a request id and sent as INTERNAL without internals.

:func:`install_traceback_filter` is installed by the server when it starts
(``QuiverFlightServer.__init__``), never at import: importing this module changes nothing.
"""

from __future__ import annotations

import errno
import re
import traceback
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import structlog

from catalog.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    QuiverError,
    ResourceExhausted,
    Unauthenticated,
    bounded,
)
from quiver_client.wire import decode_error, encode_error

log = structlog.get_logger(__name__)


def flight_error(err: QuiverError) -> flight.FlightError:
    extra = encode_error(err.code, err.detail)
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
    return flight.FlightInternalError(detail, extra_info=encode_error("INTERNAL", detail))


# --- DuckDB's errors ------------------------------------------------------------------------
# Errors the caller's SQL or data causes: the message is DuckDB's own, which names the
# problem precisely (line, column, candidate columns).
_CALLER_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.ParserException,
    duckdb.SyntaxException,
    duckdb.BinderException,
    duckdb.CatalogException,
    duckdb.ConversionException,
    duckdb.OutOfRangeException,
    duckdb.TypeMismatchException,
    duckdb.InvalidInputException,
    duckdb.InvalidTypeException,
    duckdb.NotImplementedException,
    duckdb.ConstraintException,
    duckdb.DataError,
    duckdb.ProgrammingError,
)
#: DuckDB's message prefixes → its exception classes. A DuckDB failure raised while Arrow
#: pulls from DuckDB's stream arrives as an Arrow or OS error carrying DuckDB's message; this
#: turns it back into the exception DuckDB would have raised, so that every path classifies
#: one failure the same way (:func:`classify`).
_PREFIX_CLASSES: dict[str, type[duckdb.Error]] = {
    "Parser Error": duckdb.ParserException,
    "Syntax Error": duckdb.SyntaxException,
    "Binder Error": duckdb.BinderException,
    "Catalog Error": duckdb.CatalogException,
    "Conversion Error": duckdb.ConversionException,
    "Out of Range Error": duckdb.OutOfRangeException,
    "Type Mismatch Error": duckdb.TypeMismatchException,
    "Invalid Input Error": duckdb.InvalidInputException,
    "Invalid type Error": duckdb.InvalidTypeException,
    "Not implemented Error": duckdb.NotImplementedException,
    "Constraint Error": duckdb.ConstraintException,
    "Permission Error": duckdb.PermissionException,
    "INTERRUPT Error": duckdb.InterruptException,
    "Out of Memory Error": duckdb.OutOfMemoryException,
}
_SUGGESTION = re.compile(r"\s*Did you mean[^\n]*", re.IGNORECASE)


_LINE = re.compile(r"^LINE (\d+):(.*)$")
_CANDIDATES = re.compile(r"\s*Candidate (?:bindings|tables): .*$")
_MAX_MESSAGE_CHARS = 4000


def _clean(message: str, line_offset: int = 0, *, quote_sql: bool = True) -> str:
    """DuckDB's message on one line, without catalog suggestions: "Did you mean …" may name a
    table the caller may not read, and existence must never leak (proto_docs/errors.md).

    DuckDB's ``LINE n: <text>`` context (and caret line) is folded into ``(LINE n: <text>)``;
    ``line_offset`` corrects ``n`` when Quiver wrapped the caller's SQL (max_rows).
    ``quote_sql=False`` drops that context and DuckDB's candidate names: the SQL run was
    rewritten to read ruled tables through their views, and its text (row filters, bound
    values, masks) and the names in scope inside a view are not the caller's to see."""
    message = message[:_MAX_MESSAGE_CHARS]  # DuckDB can quote megabytes of the caller's SQL
    lines = [ln for ln in _SUGGESTION.sub("", message).strip().splitlines() if ln.strip()]
    if not lines:
        return message.strip()
    head, context = lines[0].strip(), None
    for ln in lines[1:]:
        m = _LINE.match(ln.strip())
        if m:
            n = max(1, int(m.group(1)) - line_offset)
            context = f"LINE {n}: {m.group(2).strip()}"
            break
        if not set(ln.strip()) <= {"^"}:
            head = f"{head} {ln.strip()}"
    if not quote_sql:
        # DuckDB's candidates are the names in scope where binding failed: inside a view, its
        # table's own columns, the excluded ones included.
        return _CANDIDATES.sub("", head)
    return f"{head} ({context})" if context else head


#: Lines Quiver puts before the caller's SQL when it caps the rows (flight_server.plans.limited).
WRAP_LINES = 1

#: DuckDB errors whose message can quote a stored value (a cast that failed on it, a value out
#: of range, ``error(col)``): for a query rewritten to read ruled tables the message is withheld.
_VALUE_ERRORS: tuple[type[BaseException], ...] = (
    duckdb.ConversionException,
    duckdb.OutOfRangeException,
    duckdb.InvalidInputException,
    duckdb.DataError,
)
_WITHHELD = (
    "{kind}: a value failed an expression of your query (a cast, a range, error()); DuckDB's message "
    "is withheld because the query reads a table through row or column rules, and the value it "
    "quotes could belong to a row the rules hide. Find the value with try_cast() or a narrower filter"
)


def duckdb_error(
    exc: duckdb.Error,
    *,
    timed_out: bool = False,
    timeout_seconds: float = 0.0,
    wrapped: bool = False,
    quote_sql: bool = True,
) -> QuiverError:
    """The QuiverError for a DuckDB failure, with DuckDB's message where it helps the caller."""
    if isinstance(exc, duckdb.InterruptException):
        if timed_out:
            return DeadlineExceeded(
                f"query interrupted after {timeout_seconds:g} s, the query timeout ([limits] "
                "query_timeout_seconds, or your swarm's limits: proto_docs/limits.md): "
                "narrow it (filters, LIMIT, fewer joins) or submit it with the submit-query action"
            )
        return Cancelled("query interrupted (cancelled, or the server is shutting down)")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return ResourceExhausted(
            f"the query needs more memory than the server allows ({_clean(str(exc))}); "
            "narrow it or aggregate first"
        )
    if isinstance(exc, duckdb.PermissionException):
        return PermissionDenied(_clean(str(exc), quote_sql=quote_sql))
    if not quote_sql and isinstance(exc, _VALUE_ERRORS):
        # DuckDB evaluates a view's row filter before the caller's expressions in every plan
        # tried, but nothing guarantees that order; the value is not worth the risk.
        return InvalidArgument(_WITHHELD.format(kind=_error_kind(exc)))
    if isinstance(exc, _CALLER_ERRORS):
        return InvalidArgument(_clean(str(exc), WRAP_LINES if wrapped else 0, quote_sql=quote_sql))
    return _Internal(exc)


def _error_kind(exc: duckdb.Error) -> str:
    """DuckDB's class of error in words ("Conversion Error"), without its message."""
    head = str(exc).split(":", 1)[0].strip()
    return head if head.endswith("Error") and len(head) <= 40 else type(exc).__name__


class _Internal(QuiverError):
    """A DuckDB failure that is ours (I/O, internal): logged, never sent."""

    code = "INTERNAL"

    def __init__(self, cause: BaseException) -> None:
        super().__init__("internal error")
        self.cause = cause


#: Arrow's limit on type nesting (the C data interface refuses deeper schemas).
MAX_TYPE_DEPTH = 64


def _depth(t: pa.DataType) -> int:
    if t.num_fields == 0:
        return 1
    return 1 + max(_depth(t.field(i).type) for i in range(t.num_fields))


def check_result_type(schema: pa.Schema) -> None:
    """Refuse a result whose type Arrow cannot carry end to end (nested too deeply)."""
    for f in schema:
        if _depth(f.type) > MAX_TYPE_DEPTH:
            raise InvalidArgument(
                f"column {bounded(f.name, 60)!r} has a type nested more than {MAX_TYPE_DEPTH} levels "
                "deep, more than Arrow Flight can carry; flatten it (unnest, or cast to VARCHAR/JSON)"
            )


def resource_error(exc: BaseException) -> QuiverError | None:
    """The caller-facing error for a failure that is the caller's request, not a fault of
    ours, but arrives as a Python or Arrow exception: memory (the address-space bound,
    catalog/resources.py), nesting beyond what Python or Arrow can decode or carry."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return ResourceExhausted(
            "the request needs more memory than the server allows ([limits] address_space_limit); "
            "narrow it or aggregate first"
        )
    if isinstance(exc, RecursionError):
        return InvalidArgument("the request is nested too deeply to process; flatten it")
    if isinstance(exc, pa.ArrowException):
        message = str(exc)
        if "Recursion level" in message or "nesting depth" in message.lower():
            return InvalidArgument(
                f"the result's type is nested more than {MAX_TYPE_DEPTH} levels deep, more than "
                "Arrow Flight can carry; flatten it (unnest, or cast to VARCHAR/JSON)"
            )
        if "Out of Memory" in message or "bad allocation" in message or "std::bad_alloc" in message:
            return ResourceExhausted(
                f"the query needs more memory than the server allows ({_clean(message)}); "
                "narrow it or aggregate first"
            )
    return None


def as_duckdb_error(exc: BaseException) -> duckdb.Error | None:
    """The DuckDB exception an Arrow/OS error stands for, from the message DuckDB put in it."""
    if isinstance(exc, duckdb.Error):
        return exc
    message = str(exc).strip()[:_MAX_MESSAGE_CHARS]
    prefix = message.partition(": ")[0]
    cls = _PREFIX_CLASSES.get(prefix)
    return cls(message) if cls is not None else None


def classify(
    exc: BaseException,
    *,
    timed_out: bool = False,
    timeout_seconds: float = 0.0,
    wrapped: bool = False,
    quote_sql: bool = True,
) -> QuiverError | None:
    """The one classification of a failure: the caller-facing QuiverError, or None when it is
    a fault of Quiver's own (to be logged and answered INTERNAL). Used by every path that runs
    agent SQL — planning, DoGet and its Python-fed streams, async queries — so one SQL fault
    gets one code wherever it happens."""
    if isinstance(exc, _Internal):
        return None
    if isinstance(exc, QuiverError):
        return exc
    duck = as_duckdb_error(exc)
    if duck is not None:
        err = duckdb_error(
            duck, timed_out=timed_out, timeout_seconds=timeout_seconds, wrapped=wrapped, quote_sql=quote_sql
        )
        return None if isinstance(err, _Internal) else err
    return resource_error(exc)


def map_exception(exc: BaseException, request_id: str, where: str, **duck: Any) -> flight.FlightError:
    """Every failure of an RPC body → the FlightError a client sees."""
    if isinstance(exc, flight.FlightError):
        return exc
    err = classify(exc, **duck)
    if err is None:
        return internal_error(exc.cause if isinstance(exc, _Internal) else exc, request_id, where)
    return flight_error(err)


# --- GetSchema: pyarrow cannot send a FlightError from it -----------------------------------------
# pyarrow's Python server converts FlightErrors to Flight statuses in every RPC callback except
# GetSchema (apache/arrow #43556 is the client-side twin: its get_schema does not raise
# FlightErrors either). An exception leaving get_schema becomes a generic status whose message
# carries a Python traceback of the server. So, for GetSchema only:
#   * authentication is refused in the middleware's start_call, which does convert FlightErrors
#     (UNAUTHENTICATED with extra_info, like every other RPC);
#   * every other refusal is raised as a :class:`SchemaCallError` whose message starts with the
#     stable code ("INVALID_ARGUMENT: ...") and whose Python base class gives the closest gRPC
#     status (ValueError → INVALID_ARGUMENT, KeyError → NOT_FOUND, otherwise UNKNOWN);
#   * :func:`install_traceback_filter` keeps the traceback out of that message: pyarrow formats
#     the "Detail" with ``traceback.format_exception``, which for these errors (and only these)
#     yields the one-line message instead of the server's stack.
class SchemaCallError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        self.message = f"{code}: {detail}"
        super().__init__(self.message)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class _SchemaInvalid(SchemaCallError, ValueError):
    pass


class _SchemaNotFound(SchemaCallError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


def schema_call_error(err: flight.FlightError) -> SchemaCallError:
    """The GetSchema form of a FlightError built by :func:`map_exception`."""
    code, detail = decode_error(err.extra_info) or ("INTERNAL", "internal error")
    cls = {"INVALID_ARGUMENT": _SchemaInvalid, "NOT_FOUND": _SchemaNotFound}.get(code, SchemaCallError)
    return cls(code, detail)


_installed = False


def install_traceback_filter() -> None:
    """Make ``traceback.format_exception`` render a :class:`SchemaCallError` as its one-line
    message (see above); every other exception is formatted exactly as before."""
    global _installed
    if _installed:
        return
    original = traceback.format_exception

    def format_exception(
        exc: Any, /, value: Any = _SENTINEL, tb: Any = _SENTINEL, **kwargs: Any
    ) -> list[str]:
        shown = exc if value is _SENTINEL else value
        if isinstance(shown, SchemaCallError):
            return [str(shown)]
        args = [exc] + [a for a in (value, tb) if a is not _SENTINEL]
        return original(*args, **kwargs)

    traceback.format_exception = format_exception  # type: ignore[assignment]
    _installed = True


_SENTINEL: Any = object()


# --- errors in the middle of a stream fed by Python -------------------------------------------------
# DuckDB's C stream reports a failure after the first batch as an Arrow error (OSError,
# ArrowInvalid) whose message is DuckDB's own ("Conversion Error: …", "INTERRUPT Error: …"):
# :func:`classify` reads it back into DuckDB's exception.


def stream_error(
    exc: BaseException,
    request_id: str,
    *,
    timed_out: bool,
    timeout_seconds: float,
    wrapped: bool = False,
    quote_sql: bool = True,
) -> flight.FlightError:
    """The FlightError for a failure raised while a Python generator feeds a stream."""
    return map_exception(
        exc,
        request_id,
        "do_get.stream",
        timed_out=timed_out,
        timeout_seconds=timeout_seconds,
        wrapped=wrapped,
        quote_sql=quote_sql,
    )
