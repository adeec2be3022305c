"""Model Context Protocol for LLM agents (proto_docs/mcp.md).

The tools (``tools.py``) are written once against a small backend protocol (``backend.py``):
served at ``/mcp`` on the control plane's listener with the in-process backend (the data
plane's :class:`~catalog.query_port.QueryRunner` and the catalog; ``http.py``), and by
``quiver mcp`` over stdio with a backend that asks a remote Quiver over Arrow Flight
(``remote.py``, ``stdio.py``).

Dependency rule: this package imports ``catalog`` and ``quiver_client`` only — never
``flight_server`` or ``control_plane``; ``quiver/runtime.py`` hands it the query runner and
mounts it into the control plane's app.
"""
