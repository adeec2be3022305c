"""Quiver's control plane: a Litestar app for admins."""

from control_plane.app import create_app

__all__ = ["create_app"]
