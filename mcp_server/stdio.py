"""``quiver mcp``: the MCP tools over stdio, proxied to a remote Quiver over Arrow Flight.

A local MCP client (a desktop assistant, an IDE) starts this as a subprocess; every tool
call becomes Flight calls to the remote server with the agent's token
(:class:`~mcp_server.remote.RemoteBackend`), so the remote server's allowlist, guard, limits
and logs apply exactly as for any Flight client, and the answers are those ``/mcp`` gives.
The token is read from a file (never from the command line, where ``ps`` shows it) and is
never logged. stdout carries the protocol; logs go to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server

from catalog.config import McpConfig
from mcp_server.remote import RemoteBackend
from mcp_server.server import Caller, CallLimiter, build_server
from mcp_server.tools import ToolBox
from quiver_client import QuiverClient


def read_token(path: Path) -> str:
    token = path.expanduser().read_text().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def serve(
    url: str,
    token: str,
    config: McpConfig,
    *,
    http_url: str | None = None,
    tls_root_certs: bytes | None = None,
    timeout: float | None = None,
) -> None:
    """Serve MCP on stdin/stdout until the client closes them."""
    client = QuiverClient(url, token, on_truncation="raise", tls_root_certs=tls_root_certs, timeout=timeout)
    caller = Caller("stdio", "stdio", RemoteBackend(client))

    def caller_of(_ctx: ServerRequestContext[Any, Any]) -> Caller:
        return caller

    toolbox = ToolBox(config, download_base=lambda: http_url)
    server = build_server(toolbox, caller_of, CallLimiter(config))

    async def run() -> None:
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    try:
        anyio.run(run)
    finally:
        client.close()
