"""Cut results say so: the row caps of a result and the metadata that reports a cut.

A result can be cut at a row cap: the server's ``[limits] max_rows`` (reason
``server_max_rows``), the caller's own ``max_rows`` (reason ``max_rows``) or
``[limits] max_sample_rows`` for a percent sample (reason ``max_sample_rows``). An agent that
reads a cut answer as the whole answer draws wrong conclusions, so a cut is never silent
(wire contract: proto_docs/descriptors.md, "Cut results"):

- the FlightInfo's ``app_metadata`` is :meth:`RowCap.info_metadata` whenever a cap applies:
  ``{"max_rows", "reason", "truncated"}`` (``truncated`` is null when only the stream can tell,
  true/false when it is already known: the result of an async query);
- the last record batch of a stream that was cut carries :meth:`RowCap.stream_metadata` as its
  ``app_metadata``: ``{"truncated": true, "max_rows", "reason"}``. A stream that was not cut
  carries no metadata.

"Cut" is exact: Quiver reads one row more than the cap (DuckDB's ``LIMIT cap + 1``, or one
batch beyond the cap when the cap is cut from the stream) and flags the result only when that
row existed — a result of exactly ``max_rows`` rows is not flagged.

The metadata's keys, reasons and encoding are :mod:`quiver_client.wire`'s: the client reads
what the server writes from one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from quiver_client.wire import CapReason, info_metadata, stream_metadata

__all__ = ["CapReason", "RowCap"]


@dataclass(frozen=True, slots=True)
class RowCap:
    """At most ``max_rows`` rows, because of ``reason``; ``truncated`` when already known."""

    max_rows: int
    reason: CapReason
    truncated: bool | None = None

    def info_metadata(self) -> bytes:
        """The FlightInfo's ``app_metadata``."""
        return info_metadata(self.max_rows, self.reason, self.truncated)

    def stream_metadata(self) -> bytes:
        """The ``app_metadata`` of the last batch of a cut stream."""
        return stream_metadata(self.max_rows, self.reason)
