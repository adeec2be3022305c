"""The data plane's :class:`~catalog.query_port.QueryRunner`: agent SQL for callers outside
Flight (the control plane's ``POST /v1/query``, exports, artefact refresh), run through the
one query path a ``{"kind": "query"}`` descriptor takes.

The request is encoded as that descriptor's JSON and decoded by
:func:`~flight_server.commands.decode_command`, so its sizes, nesting and fields are checked
by the very code that checks a Flight command; then the planner's checks and guard
(:meth:`Planner.query_part`), then the streamer's run (:meth:`Streamer.run_query`: admission,
timeout, result cache, the exact cut at the row cap).

A run or read given a ``via`` is recorded here, once, in the query log (and so charged to
the swarm's budgets, catalog/query_log.py): refused ones when they are refused, a run when
its caller closes it, with what the caller says it sent. This is the one place every
listener's agent SQL passes, so MCP, ``POST /v1/query`` and exports cannot skip it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pyarrow as pa

from catalog import InvalidArgument, Principal, QuiverError
from catalog.query_log import QueryLog, RemoteWork
from catalog.query_port import RunningQuery
from flight_server import live
from flight_server.admission import Admission
from flight_server.commands import ProfileCommand, QueryCommand, SampleCommand, decode_command
from flight_server.planner import Planner
from flight_server.streams import Streamer

__all__ = ["SqlRunner"]


class SqlRunner:
    """:class:`~catalog.query_port.QueryRunner` on the Flight server's planner, streamer and
    admission path (one of each per process: the limits are shared with Flight)."""

    def __init__(
        self, planner: Planner, streamer: Streamer, admission: Admission, query_log: QueryLog
    ) -> None:
        self._planner = planner
        self._streamer = streamer
        self._admission = admission
        self._log = query_log

    def _recorder(
        self,
        principal: Principal,
        via: str,
        kind: str,
        sql: str | None,
        params: int,
        request_id: str | None = None,
    ) -> Callable[..., None]:
        """One query-log record of a run that began now: call it once, when it ends."""
        started = time.perf_counter()

        def record(
            *,
            tables: Sequence[str] = (),
            rows: int | None = None,
            nbytes: int | None = None,
            code: str | None = None,
            remote: RemoteWork | None = None,
        ) -> None:
            self._log.record(
                principal,
                kind=kind,
                via=via,
                tables=tuple(tables),
                sql=sql,
                params=params,
                rows=rows,
                nbytes=nbytes,
                seconds=time.perf_counter() - started,
                code=code,
                request_id=request_id,
                remote=remote,
            )

        return record

    def run(
        self,
        principal: Principal,
        sql: str,
        params: Sequence[Any] = (),
        max_rows: int | None = None,
        *,
        timeout_seconds: float | None = None,
        via: str | None = None,
        kind: str = "query",
        request_id: str | None = None,
    ) -> RunningQuery:
        if via is None:
            return self._run(principal, sql, params, max_rows, timeout_seconds)
        record = self._recorder(principal, via, kind, sql, len(params), request_id)
        try:
            running = self._run(principal, sql, params, max_rows, timeout_seconds)
        except QuiverError as e:
            record(code=e.code)
            raise
        tables = [t.qualified for t in running.tables]

        def on_close(rows: int | None, nbytes: int | None, code: str | None) -> None:
            record(tables=tables, rows=rows, nbytes=nbytes, code=code, remote=running.remote)

        running.record_with(on_close)
        return running

    def _run(
        self,
        principal: Principal,
        sql: str,
        params: Sequence[Any],
        max_rows: int | None,
        timeout_seconds: float | None,
    ) -> RunningQuery:
        body: dict[str, Any] = {"kind": "query", "sql": sql, "params": list(params)}
        if max_rows is not None:
            body["max_rows"] = max_rows
        try:
            raw = msgspec.json.encode(body)
        except (TypeError, OverflowError) as e:  # a value JSON cannot hold: not a parameter
            raise InvalidArgument(f"field 'params': {e}") from None
        cmd = decode_command(raw)
        assert isinstance(cmd, QueryCommand)
        guarded, part = self._planner.query_part(principal, cmd)
        catalog = self._planner.catalog
        if live.reads_live(catalog, guarded.tables):
            plan = live.query_plan(catalog, guarded, part, self._admission, principal)
            timeout = (
                self._streamer.timeout_for(principal) if timeout_seconds is None else float(timeout_seconds)
            )
            streamer = self._streamer
            return live.run_query(
                catalog, self._admission, streamer.watchdog, principal, plan, timeout, streamer.cache.volatile
            )
        return self._streamer.run_query(
            self._admission, principal, guarded.tables, part, timeout_seconds=timeout_seconds
        )

    def read(self, principal: Principal, command: dict[str, Any], *, via: str | None = None) -> pa.Table:
        """A ``sample`` or ``profile`` command, decoded and checked by the Flight command
        decoder, planned by the planner (allowlist, columns, ``[limits] max_sample_rows``)
        and read by the streamer under admission and the timeout."""
        if via is None:
            return self._read(principal, command)[0]
        kind = command.get("kind")
        record = self._recorder(principal, via, kind if kind in ("sample", "profile") else "unknown", None, 0)
        work = self._log.remote_work(principal)
        try:
            table, tables = self._read(principal, command, work)
        except QuiverError as e:
            record(code=e.code, remote=work)
            raise
        record(tables=tables, rows=table.num_rows, nbytes=table.nbytes, remote=work)
        return table

    def _read(
        self, principal: Principal, command: dict[str, Any], work: RemoteWork | None = None
    ) -> tuple[pa.Table, tuple[str, ...]]:
        try:
            raw = msgspec.json.encode(command)
        except (TypeError, OverflowError) as e:
            raise InvalidArgument(f"command: {e}") from None
        cmd = decode_command(raw)
        if not isinstance(cmd, SampleCommand | ProfileCommand):
            raise InvalidArgument("only 'sample' and 'profile' commands are read this way")
        plan = self._planner.plan(principal, cmd)
        tables = tuple(ref.qualified for ref in plan.tables)
        return self._streamer.read_plan(self._admission, principal, plan, work), tables
