"""Small results inline in GetFlightInfo: a point query in one round trip.

A ``query`` command's GetFlightInfo runs the query and often reads its whole result already
(flight_server/streams.py ``run_at_info``); its DoGet then only streams those rows from memory
— a second round trip that costs a point query about a millisecond on this machine
(tests/bench/PROFILE.md, section 13). A client that says it can take the result in the
FlightInfo (the ``x-quiver-inline-bytes`` header: how many bytes it accepts) gets it there:
the endpoint's ``app_metadata`` holds the whole result as an Arrow IPC stream, and there is
nothing left to fetch. Only clients that ask get it, so every other Flight client sees the
same FlightInfo as before; the endpoint's ticket stays valid all the same (a DoGet of it
runs the query again, or answers from the result cache).

What is inlined is exactly what the DoGet would have streamed, under the same guard,
admission and limits — the query ran in GetFlightInfo's admission slot — and the request is
recorded in the query log (and charged to the budgets) by GetFlightInfo, with its rows and
bytes, since no DoGet will record it. A result that was cut at its row cap, one still running
after GetFlightInfo's wait, a split plan, or one larger than asked, is not inlined: those go
the usual way.

Each result sent inline is counted, with the bytes of its IPC stream (``Streamer.inline``):
``quiver_inline_results_total`` and ``quiver_inline_bytes_total`` on /metrics, ``inlined`` and
``inlined_bytes`` under "queries" of /v1/status, and ``inline=<bytes>`` in the ``flight.call``
log line.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from catalog import InvalidArgument
from catalog.errors import bounded
from quiver_client.wire import INLINE_HEADER as HEADER
from quiver_client.wire import INLINE_MAX_BYTES as MAX_BYTES


def requested(values: Sequence[str | bytes] | None) -> int:
    """How many bytes of Arrow data the client accepts inline (0: it did not ask), at most
    :data:`MAX_BYTES`. A value that is not a whole number of bytes is the client's mistake,
    refused with INVALID_ARGUMENT (the header is echoed bounded)."""
    if not values:
        return 0
    raw = values[-1]
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit() and len(stripped) <= 12):
        raise InvalidArgument(
            f"header {HEADER} must be a whole number of bytes (0: none; the server inlines at most "
            f"{MAX_BYTES}), got {bounded(text)}"
        )
    return min(int(stripped), MAX_BYTES)


#: The writer's options, built once: ``pa.ipc.new_stream`` without them reads two environment
#: variables (the legacy-format defaults) on every call, a third of a small result's encoding
#: time. These are the defaults themselves.
_OPTIONS = pa.ipc.IpcWriteOptions()


def encode(schema: pa.Schema, batches: Sequence[pa.RecordBatch]) -> bytes:
    """The Arrow IPC stream of a whole result: what the endpoint's ``app_metadata`` holds."""
    sink = pa.BufferOutputStream()
    with pa.ipc.RecordBatchStreamWriter(sink, schema, options=_OPTIONS) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()
