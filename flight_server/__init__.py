"""Quiver's data plane: an Arrow Flight server streaming DuckDB results."""

from flight_server.server import QuiverFlightServer

__all__ = ["QuiverFlightServer"]
