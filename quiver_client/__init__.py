"""Quiver's agent client: ``QuiverClient(url, token)`` over plain ``pyarrow.flight``
(proto_docs/client.md), and ``QuiverHTTP(base_url, token)`` for file artefacts over the control
plane with the standard library (proto_docs/artefacts.md).

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
from quiver_client.http import QuiverHTTP

__all__ = [
    "QuiverClient",
    "QuiverClientError",
    "QuiverHTTP",
    "TableListing",
    "TruncatedResultError",
    "TruncatedResultWarning",
    "client_error",
    "row_cap",
]
