"""Quiver: fast, governed, read-only warehouse data for fleets of AI agents."""

from catalog import VERSION as __version__

__all__ = ["__version__"]
