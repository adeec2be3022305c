"""Quiver's control plane: the Litestar HTTP app — admin routes, status and health, file
artefacts, and agent SQL over HTTP (``POST /v1/query``); see proto_docs/control_plane.md."""

from control_plane.app import create_app

__all__ = ["create_app"]
