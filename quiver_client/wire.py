"""The wire constants that the server and the client share (proto_docs/errors.md,
proto_docs/descriptors.md "Cut results").

They live in the client package because it depends on nothing but the standard library and
``pyarrow``: the server imports them from here (``flight_server.errors``,
``flight_server.truncation``), the client never imports the server. One definition, so the
two sides cannot drift apart.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Final, Literal, get_args

# --- errors: a FlightError's extra_info is {"code": CODE, "detail": "one sentence"} ---------
#: Every ``code`` a Quiver server sends in ``extra_info`` (proto_docs/errors.md).
ErrorCode = Literal[
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "CANCELLED",
    "UNAVAILABLE",
    "INTERNAL",
]
ERROR_CODES: Final[tuple[str, ...]] = get_args(ErrorCode)
#: The client's own code for a result cut at a row cap (``on_truncation="raise"``): no
#: server sends it.
TRUNCATED: Final = "TRUNCATED"


def encode_error(code: str, detail: str) -> bytes:
    """A FlightError's ``extra_info``."""
    return json.dumps({"code": code, "detail": detail}).encode()


def decode_error(extra_info: bytes | None) -> tuple[str, str] | None:
    """``(code, detail)`` from a FlightError's ``extra_info``, or None when it carries none."""
    if not extra_info:
        return None
    try:
        info = json.loads(extra_info)
        return str(info["code"]), str(info["detail"])
    except (ValueError, KeyError, TypeError):
        return None


# --- cut results: the row cap in app_metadata ------------------------------------------------
#: Why a result has a row cap (the ``reason`` key): the server's ``[limits] max_rows``, the
#: caller's own ``max_rows``, or ``[limits] max_sample_rows`` for a percent sample.
CapReason = Literal["server_max_rows", "max_rows", "max_sample_rows"]
CAP_REASONS: Final[tuple[str, ...]] = get_args(CapReason)
KEY_MAX_ROWS: Final = "max_rows"
KEY_REASON: Final = "reason"
KEY_TRUNCATED: Final = "truncated"


# Plans are made by the thousand per second with the same few caps: encode each once.
@lru_cache(maxsize=256)
def info_metadata(max_rows: int, reason: str, truncated: bool | None) -> bytes:
    """A FlightInfo's ``app_metadata`` when a row cap applies: ``{"max_rows", "reason",
    "truncated"}`` (``truncated`` null when only the stream can tell)."""
    return json.dumps({KEY_MAX_ROWS: max_rows, KEY_REASON: reason, KEY_TRUNCATED: truncated}).encode()


@lru_cache(maxsize=256)
def stream_metadata(max_rows: int, reason: str) -> bytes:
    """The ``app_metadata`` of the last record batch of a stream that was cut."""
    return json.dumps({KEY_TRUNCATED: True, KEY_MAX_ROWS: max_rows, KEY_REASON: reason}).encode()


def decode_row_cap(raw: bytes) -> dict[str, Any] | None:
    """The row cap in ``app_metadata`` bytes, or None when there is none."""
    if not raw:
        return None
    try:
        cap = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(cap, dict) or not isinstance(cap.get(KEY_MAX_ROWS), int):
        return None
    return cap


# --- inline results (proto_docs/descriptors.md, "Small results inline") ----------------------
#: The GetFlightInfo header by which a client takes a small query result inline: the most bytes
#: of Arrow data it accepts. The result then arrives as the Arrow IPC stream in the endpoint's
#: ``app_metadata``, and no DoGet is needed.
INLINE_HEADER: Final = "x-quiver-inline-bytes"
#: The most a server inlines, whatever a client asks: a quarter of gRPC's default 4 MiB
#: receive limit, so the FlightInfo always fits a default client.
INLINE_MAX_BYTES: Final = 1 << 20
