"""Quiver's data plane: an Arrow Flight server streaming DuckDB results.

The agent client is the package :mod:`quiver_client` (only ``pyarrow`` needed); it is
re-exported here for code written before it had a package of its own. Importing this
package imports the server (DuckDB, ``catalog``); an agent imports ``quiver_client``.
"""

from flight_server.server import QuiverFlightServer
from quiver_client import (
    QuiverClient,
    QuiverClientError,
    TableListing,
    TruncatedResultError,
    TruncatedResultWarning,
)

__all__ = [
    "QuiverClient",
    "QuiverClientError",
    "QuiverFlightServer",
    "TableListing",
    "TruncatedResultError",
    "TruncatedResultWarning",
]
