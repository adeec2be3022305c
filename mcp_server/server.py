"""The MCP server: the tools and the table resources on the SDK's low-level ``Server``, with
the per-principal call limits and one log event per tool call.

Transport-neutral: the HTTP endpoint (mcp_server/http.py) and ``quiver mcp``
(mcp_server/stdio.py) each pass :func:`build_server` a function that says who is calling
and with which :class:`~mcp_server.backend.Backend`.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
import msgspec
import structlog
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

from catalog import VERSION
from catalog.audit import AuditLog
from catalog.config import McpConfig
from catalog.tables import fold
from mcp_server.backend import Backend
from mcp_server.tools import Answer, ToolBox, ToolError, sql_fingerprint, table_markdown, tool_error

log = structlog.get_logger("mcp")

RESOURCE_PREFIX = "quiver://tables/"

INSTRUCTIONS = (
    "Quiver gives read-only, governed access to warehouse tables. Start with list_tables, then "
    "describe_table; query with run_query (DuckDB SQL, positional parameters, bounded answers "
    "that say when they are truncated); export_query saves a full result as a file. A refusal "
    "names what to change: read its message and retry."
)


@dataclass(frozen=True)
class Caller:
    """Who calls (the label logged, the key the limits count by) and their backend."""

    label: str
    key: str
    backend: Backend


class CallLimiter:
    """``[mcp] calls_per_minute`` (a sliding minute) and ``max_concurrent_calls`` per
    principal: an over-limit call is refused at once, saying which limit and when to retry."""

    def __init__(self, config: McpConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = config.calls_per_minute
        self._concurrent = config.max_concurrent_calls
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, collections.deque[float]] = {}
        self._running: dict[str, int] = {}

    def enter(self, key: str) -> Callable[[], None]:
        now = self._clock()
        with self._lock:
            calls = self._calls.setdefault(key, collections.deque())
            while calls and calls[0] <= now - 60:
                calls.popleft()
            if len(calls) >= self._per_minute:
                wait = max(1, int(calls[0] + 60 - now) + 1)
                raise ToolError(
                    "RESOURCE_EXHAUSTED",
                    f"over the limit of {self._per_minute} tool calls a minute per token "
                    f"([mcp] calls_per_minute); retry in {wait} s",
                )
            running = self._running.get(key, 0)
            if running >= self._concurrent:
                raise ToolError(
                    "RESOURCE_EXHAUSTED",
                    f"over the limit of {self._concurrent} tool calls at once per token "
                    "([mcp] max_concurrent_calls); retry when one of yours has answered",
                )
            calls.append(now)
            self._running[key] = running + 1
            if len(self._calls) > 10_000:  # forget idle principals
                for idle in [k for k, q in self._calls.items() if not q or q[-1] <= now - 60][:1000]:
                    if not self._running.get(idle):
                        self._calls.pop(idle, None)
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._running.get(key, 1) - 1
                if left > 0:
                    self._running[key] = left
                else:
                    self._running.pop(key, None)

        return release


def _result(answer: Answer) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=answer.text)], structured_content=answer.structured
    )


def _error_result(err: ToolError) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=f"{err.code}: {err.detail}")],
        structured_content={"code": err.code, "detail": err.detail},
        is_error=True,
    )


def _record_call(
    audit: AuditLog | None,
    fields: dict[str, Any],
    started: float,
    outcome: str,
    rows: int,
    size: int,
    detail: str | None,
) -> None:
    """One tool call's ``mcp.call`` event and its ``mcp.tool`` audit record (principal, tool,
    SQL fingerprint, rows, bytes, ms, outcome) — the fingerprint only: never the SQL text,
    the arguments or a token."""
    ms = round((time.perf_counter() - started) * 1000, 3)
    extra = {"detail": detail} if detail is not None else {}
    log.info("mcp.call", **fields, outcome=outcome, rows=rows, bytes=size, ms=ms, **extra)
    if audit is not None:
        record = {"sql": fields["sql"], "rows": rows, "bytes": size, "ms": ms}
        audit.record(
            "mcp.tool",
            outcome=outcome,
            actor=fields["principal"],
            target=fields["tool"],
            detail=msgspec.json.encode(record).decode(),
        )


def build_server(
    toolbox: ToolBox,
    caller_of: Callable[[ServerRequestContext[Any, Any]], Caller],
    limiter: CallLimiter,
    audit: AuditLog | None = None,
) -> Server[Any]:
    """The MCP server with Quiver's tools and table resources. Every ``tools/call`` is one
    ``mcp.call`` log event and, given the server's ``audit`` log (``/mcp``; ``quiver mcp`` runs
    in the agent's process and has none), one ``mcp.tool`` audit event — buffered there and
    flushed in batches by housekeeping, never a database write per call."""
    tools = [
        types.Tool(
            name=spec.name,
            title=spec.title,
            description=spec.description,
            input_schema=spec.input_schema,
            output_schema=spec.output_schema,
            annotations=types.ToolAnnotations(
                read_only_hint=spec.name != "export_query", open_world_hint=False
            ),
        )
        for spec in toolbox.specs.values()
    ]

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        caller_of(ctx)  # who asks must be someone (HTTP has checked the token already)
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        caller = caller_of(ctx)
        spec = toolbox.specs.get(params.name)
        arguments = params.arguments or {}
        sql = arguments.get(spec.sql_argument) if spec is not None and spec.sql_argument else None
        started = time.perf_counter()
        fields: dict[str, Any] = {
            "principal": caller.label,
            "tool": params.name[:64],
            "sql": sql_fingerprint(sql) if isinstance(sql, str) else None,
        }

        def done(outcome: str, rows: int = 0, size: int = 0, detail: str | None = None) -> None:
            _record_call(audit, fields, started, outcome, rows, size, detail)

        try:
            release = limiter.enter(caller.key)
        except ToolError as e:
            done(e.code.lower())
            return _error_result(e)
        try:
            answer = await anyio.to_thread.run_sync(toolbox.call, caller.backend, params.name, arguments)
        except Exception as e:
            err = tool_error(e)
            if err is None:
                incident = uuid.uuid4().hex[:12]
                log.exception("mcp.call_failed", **fields, incident=incident)
                err = ToolError(
                    "INTERNAL", f"a fault of Quiver's own (incident {incident}, logged); retry or report it"
                )
                done("internal", detail=f"incident {incident}")
            else:
                done(err.code.lower(), detail=err.detail)
            return _error_result(err)
        finally:
            release()
        done("ok", answer.rows, answer.bytes)
        return _result(answer)

    async def list_resources(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        caller = caller_of(ctx)
        tables = await _refusing(lambda: caller.backend.tables())
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=RESOURCE_PREFIX + t.name,
                    name=t.name,
                    title=t.name,
                    description=t.description or f"{t.rows:,} rows, {len(t.schema)} columns",
                    mime_type="text/markdown",
                )
                for t in tables
            ]
        )

    async def read_resource(
        ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        caller = caller_of(ctx)
        uri = str(params.uri)
        if not uri.startswith(RESOURCE_PREFIX):
            raise MCPError(
                types.INVALID_PARAMS, f"unknown resource {uri[:120]!r}: use {RESOURCE_PREFIX}<schema>.<table>"
            )
        wanted = fold(uri[len(RESOURCE_PREFIX) :])
        tables = await _refusing(lambda: caller.backend.tables())
        for meta in tables:
            if fold(meta.name) == wanted:
                return types.ReadResourceResult(
                    contents=[
                        types.TextResourceContents(
                            uri=uri, mime_type="text/markdown", text=table_markdown(meta)
                        )
                    ]
                )
        # Not readable and absent are one answer, as everywhere (existence never leaks).
        raise MCPError(
            types.INVALID_PARAMS,
            f"resource {uri[:120]!r}: not readable: not in your allowlist or does not exist",
        )

    return Server(
        "quiver",
        version=VERSION,
        title="Quiver",
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


async def _refusing(fn: Callable[[], Any]) -> Any:
    """Run a backend call in a thread; a refusal becomes a protocol error with its sentence."""
    try:
        return await anyio.to_thread.run_sync(fn)
    except Exception as e:
        err = tool_error(e)
        if err is None:
            raise
        raise MCPError(types.INVALID_REQUEST, f"{err.code}: {err.detail}") from None
