"""Quiver's domain errors: one vocabulary of failure shared by every listener.

Each error carries a stable ``code`` that clients branch on and a ``detail`` sentence that
says what to change. The Flight server maps them to ``FlightError`` subclasses with
``extra_info``; the control plane maps them to HTTP statuses and a JSON body. Nothing below
this module knows about either transport.
"""

from __future__ import annotations

from typing import ClassVar

#: The longest ``detail`` sent to a caller. Details echo what the caller sent (a name, an id)
#: and DuckDB's messages (which can quote megabytes of SQL): gRPC refuses headers past 16 KiB,
#: and a client that gets no status at all cannot branch on a code.
MAX_DETAIL_CHARS = 600


def bounded(value: object, limit: int = 80) -> str:
    """``value`` as text of at most about ``limit`` characters, for echoing in a message."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


class QuiverError(Exception):
    """A refusal or failure whose text is safe to show to the caller (at most
    :data:`MAX_DETAIL_CHARS` of it: longer details are cut, saying so)."""

    code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500

    def __init__(self, detail: str) -> None:
        detail = bounded(detail, MAX_DETAIL_CHARS)
        super().__init__(detail)
        self.detail = detail


class Unauthenticated(QuiverError):
    code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(QuiverError):
    code = "PERMISSION_DENIED"
    http_status = 403


class InvalidArgument(QuiverError):
    code = "INVALID_ARGUMENT"
    http_status = 400


class Unprocessable(QuiverError):
    """Well-formed but semantically out of range (e.g. a TTL above the maximum)."""

    code = "INVALID_ARGUMENT"
    http_status = 422


class NotFound(QuiverError):
    code = "NOT_FOUND"
    http_status = 404


class Conflict(QuiverError):
    code = "ALREADY_EXISTS"
    http_status = 409


class WriteConflict(Conflict):
    """A write lost to a concurrent one (a DuckDB transaction conflict) and was not applied;
    retrying the request is safe."""

    code = "ABORTED"


class ResourceExhausted(QuiverError):
    code = "RESOURCE_EXHAUSTED"
    http_status = 429


class PayloadTooLarge(QuiverError):
    code = "RESOURCE_EXHAUSTED"
    http_status = 413


class DeadlineExceeded(QuiverError):
    code = "DEADLINE_EXCEEDED"
    http_status = 504


class Cancelled(QuiverError):
    code = "CANCELLED"
    http_status = 409


class Unavailable(QuiverError):
    """Transient: retrying later may succeed (e.g. a table changed between endpoints)."""

    code = "UNAVAILABLE"
    http_status = 503


class ConfigError(Exception):
    """A configuration problem, reported as one line naming the key and what is allowed."""


class DatabaseInUse(Exception):
    """Another process holds the DuckDB file (DuckDB allows one read-write process)."""
