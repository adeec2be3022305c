"""Quiver's data plane: an Arrow Flight server streaming DuckDB results, and its client."""

from flight_server.client import (
    QuiverClient,
    QuiverClientError,
    TableListing,
    TruncatedResultError,
    TruncatedResultWarning,
)
from flight_server.server import QuiverFlightServer

__all__ = [
    "QuiverClient",
    "QuiverClientError",
    "QuiverFlightServer",
    "TableListing",
    "TruncatedResultError",
    "TruncatedResultWarning",
]
