"""Quiver's agent client: ``QuiverClient(url, token)`` over plain ``pyarrow.flight``
(proto_docs/client.md).

A package of its own so that an agent installs and imports only ``pyarrow``: nothing here
imports the server (``flight_server``), DuckDB or ``catalog``, and importing it changes no
process-wide state. :mod:`quiver_client.wire` holds the wire constants the server shares.
"""

from quiver_client.client import (
    QuiverClient,
    QuiverClientError,
    TableListing,
    TruncatedResultError,
    TruncatedResultWarning,
    client_error,
    row_cap,
)

__all__ = [
    "QuiverClient",
    "QuiverClientError",
    "TableListing",
    "TruncatedResultError",
    "TruncatedResultWarning",
    "client_error",
    "row_cap",
]
