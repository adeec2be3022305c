"""``POST /v1/query``: agent SQL over plain HTTP, streamed in the format ``Accept`` asks for.

The query runs through the data plane's one query path (:attr:`catalog.Catalog.queries`,
catalog/query_port.py): the same checks, guard, admission slot, timeout, row cap and result
cache as a Flight ``{"kind": "query"}``, and the same error codes (control_plane/errors.py
maps them to statuses). Everything that can be refused is refused before the first byte:
the run reads the head of the result before it returns, so a binder error, a refusal, a
full admission gate or a timeout while the head is read is a JSON error with its status.

The body is streamed with chunked transfer, one chunk per record batch, written by
catalog/formats.py; memory holds a batch or two whatever the result size, and a client that
reads slowly slows DuckDB down (the ASGI server waits for the socket to drain). The run's
admission slot, cursor and deadline are given back when the body ends, fails, or the client
goes away (the generator's ``finally``, and the response's background task as a backstop).

A cut result says so: the headers carry the row cap and ``X-Quiver-Truncated`` (``true`` /
``false`` when the run read the whole result before answering, ``unknown`` for a result
still streaming), and the formats that have room for it say it at the end (catalog/formats.py).
HTTP/1.1 trailers would be the place for the late answer, but the ASGI server does not send
them; proto_docs/control_plane.md says where to look per format.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import structlog
from litestar import Request, Router, post
from litestar.background_tasks import BackgroundTask
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from catalog import Catalog, Principal, QuiverError
from catalog.formats import FORMATS, Chunks, ResultFormat, ResultWriter, RowCapInfo
from catalog.query_port import RunningQuery
from control_plane.context import AGENT, request_id
from control_plane.errors import NotAcceptable, StreamAborted
from control_plane.models import QueryBody

log = structlog.get_logger("control_plane")

#: The format a wildcard (or no ``Accept``) gets, then the others in the order a tie goes.
PREFERENCE = ("json", "arrow", "parquet", "csv", "ndjson")


def _query_threads(request: Request[Any, Any, Any], catalog: Catalog) -> anyio.CapacityLimiter:
    """Worker threads for starting queries (the run: admission, which may wait up to
    ``[limits] admission_wait_seconds`` for a slot, then the head): a pool of the app's own,
    so that queries waiting for admission never take the threads the other routes run on.
    As many as the server admits at once; more would only wait, and wait here, in line. Only
    the run uses it: a query holding a slot never needs it again (its batches and its close
    run on the shared pool, briefly each), so a waiting run never blocks the slot it waits
    for. Made on first use, in the app's event loop."""
    state = request.app.state
    limiter = state.get("query_threads")
    if limiter is None:
        limiter = state["query_threads"] = anyio.CapacityLimiter(catalog.config.limits.max_concurrent_total)
    return limiter


#: The query log's ``via`` of this route's runs (proto_docs/governance.md).
VIA = "http"

HEADER_MAX_ROWS = "x-quiver-max-rows"
HEADER_REASON = "x-quiver-max-rows-reason"
HEADER_TRUNCATED = "x-quiver-truncated"


def _ranges(accept: str) -> list[tuple[str, str, float]]:
    """``Accept`` as (type, subtype, q) media ranges; a malformed q counts as 0."""
    out = []
    for item in accept.split(",")[:64]:
        media, *params = item.strip().split(";")
        kind, _, sub = media.strip().lower().partition("/")
        if not kind or not sub:
            continue
        q = 1.0
        for p in params:
            name, _, value = p.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        out.append((kind, sub, q))
    return out


def negotiate(accept: str | None) -> ResultFormat:
    """The format ``Accept`` prefers (RFC 9110: the most specific matching range gives a
    format its q; ties go to :data:`PREFERENCE`); 406 when none of the five is acceptable."""
    if accept is None or not accept.strip():
        return FORMATS[PREFERENCE[0]]
    ranges = _ranges(accept)
    best: tuple[float, int] | None = None
    chosen = None
    for rank, name in enumerate(PREFERENCE):
        kind, _, sub = FORMATS[name].media_type.partition("/")
        q, specificity = 0.0, -1
        for rk, rs, rq in ranges:
            if (rk, rs) == (kind, sub):
                level = 2
            elif (rk, rs) in ((kind, "*"), ("*", "*")):
                level = 1 if rk == kind else 0
            else:
                continue
            if level > specificity:
                q, specificity = rq, level
        if q > 0 and (best is None or q > best[0]):
            best, chosen = (q, rank), name
    if chosen is None:
        offered = ", ".join(FORMATS[n].media_type for n in PREFERENCE)
        raise NotAcceptable(
            f"no acceptable result format in Accept {accept[:100]!r}; this route sends: {offered}"
        )
    return FORMATS[chosen]


def _headers(running: RunningQuery) -> dict[str, str]:
    truncated = running.cut()
    return {
        HEADER_MAX_ROWS: str(running.max_rows),
        HEADER_REASON: running.reason,
        HEADER_TRUNCATED: "unknown" if truncated is None else str(truncated).lower(),
        "cache-control": "no-store",
    }


class _Body:
    """The response body: one chunk per record batch, written in the chosen format."""

    def __init__(self, running: RunningQuery, fmt: ResultFormat, rid: str) -> None:
        self.running = running
        self._bytes = 0
        self._failed: str | None = None
        self._chunks = Chunks()
        self._writer = ResultWriter(fmt, running.schema, self._chunks)
        self._done = False
        self._rid = rid

    def step(self) -> bytes | None:
        """The next chunk (blocking: runs in a worker thread), or None after the last."""
        if self._done:
            return None
        running = self.running
        try:
            batch = running.reader.read_next_batch()
        except StopIteration:
            self._done = True
            cut = running.cut()
            self._writer.finish(RowCapInfo(running.max_rows, running.reason, bool(cut)))
        else:
            self._writer.write(batch)
        return self._chunks.take()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while True:
                chunk = await anyio.to_thread.run_sync(self.step)
                if chunk is None:
                    return
                if chunk:
                    self._bytes += len(chunk)
                    yield chunk
        except QuiverError as e:
            self._failed = e.code
            # Mid-stream: the status is sent. The connection is dropped without the final
            # chunk, so the client sees an incomplete body, never a short one passed as whole.
            log.warning("http.query.failed_mid_stream", code=e.code, detail=e.detail, request_id=self._rid)
            raise StreamAborted(e.code) from None
        finally:
            # What was sent and how it ended go into the run's query-log record, which the
            # runner writes on close (catalog/query_port.py): one record per request.
            self.running.sent(self._writer.rows, self._bytes)
            code = self._failed or (None if self._done else "CANCELLED")
            if code is not None:
                self.running.failed(code)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.running.close)
            log.info(
                "http.query.finished",
                format=self._writer.format.name,
                rows=self._writer.rows,
                complete=self._done,  # false: failed midway, or the client went away
                truncated=self.running.cut(),
                tables=[t.qualified for t in self.running.tables],
                request_id=self._rid,
            )


@post(
    "/v1/query",
    tags=["query"],
    status_code=200,
    summary="Run agent SQL; the result streams as Arrow IPC, Parquet, CSV, NDJSON or JSON (Accept)",
    description=(
        "The fields of a Flight query command. The same guard, limits and error codes as Flight; "
        "a cut result says so in X-Quiver-Truncated (true, false or unknown while streaming) and, "
        "for Arrow, Parquet and JSON, at the end of the body. Agent and swarm tokens only."
    ),
)
async def run_query(
    request: Request[Principal, Any, Any],
    data: JSONBody[QueryBody],
    catalog: NamedDependency[Catalog],
) -> Stream:
    started = time.perf_counter()
    principal = request.user
    rid = request_id(request)
    try:
        fmt = negotiate(request.headers.get("accept"))
        runner = catalog.require_queries()
    except QuiverError as e:
        # Refused before the query port: recorded here. Everything from the run on is
        # recorded by the runner, once (catalog/query_port.py, ``via``).
        catalog.query_log.record(
            principal,
            kind="query",
            via=VIA,
            sql=data.sql,
            params=len(data.params or ()),
            seconds=time.perf_counter() - started,
            code=e.code,
            request_id=rid,
        )
        raise
    threads = _query_threads(request, catalog)
    run = functools.partial(runner.run, via=VIA, request_id=rid)
    running = await anyio.to_thread.run_sync(
        run, principal, data.sql, data.params, data.max_rows, limiter=threads
    )
    try:
        body = _Body(running, fmt, rid)
    except BaseException as e:
        running.failed(e.code if isinstance(e, QuiverError) else "INTERNAL")
        running.close()  # e.g. CSV asked for a nested column: nothing was sent
        raise
    return Stream(
        body,
        media_type=fmt.media_type,
        headers=_headers(running),
        background=BackgroundTask(running.close),
    )


ROUTER = Router("/", route_handlers=[run_query], guards=[AGENT])
