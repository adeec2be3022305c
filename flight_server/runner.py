"""The data plane's :class:`~catalog.query_port.QueryRunner`: agent SQL for callers outside
Flight (the control plane's ``POST /v1/query``, exports, artefact refresh), run through the
one query path a ``{"kind": "query"}`` descriptor takes.

The request is encoded as that descriptor's JSON and decoded by
:func:`~flight_server.commands.decode_command`, so its sizes, nesting and fields are checked
by the very code that checks a Flight command; then the planner's checks and guard
(:meth:`Planner.query_part`), then the streamer's run (:meth:`Streamer.run_query`: admission,
timeout, result cache, the exact cut at the row cap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import pyarrow as pa

from catalog import InvalidArgument, Principal
from catalog.query_port import RunningQuery
from flight_server.admission import Admission
from flight_server.commands import ProfileCommand, QueryCommand, SampleCommand, decode_command
from flight_server.planner import Planner
from flight_server.streams import Streamer

__all__ = ["SqlRunner"]


class SqlRunner:
    """:class:`~catalog.query_port.QueryRunner` on the Flight server's planner, streamer and
    admission path (one of each per process: the limits are shared with Flight)."""

    def __init__(self, planner: Planner, streamer: Streamer, admission: Admission) -> None:
        self._planner = planner
        self._streamer = streamer
        self._admission = admission

    def run(
        self,
        principal: Principal,
        sql: str,
        params: Sequence[Any] = (),
        max_rows: int | None = None,
        *,
        timeout_seconds: float | None = None,
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
        return self._streamer.run_query(
            self._admission, principal, guarded.tables, part, timeout_seconds=timeout_seconds
        )

    def read(self, principal: Principal, command: dict[str, Any]) -> pa.Table:
        """A ``sample`` or ``profile`` command, decoded and checked by the Flight command
        decoder, planned by the planner (allowlist, columns, ``[limits] max_sample_rows``)
        and read by the streamer under admission and the timeout."""
        try:
            raw = msgspec.json.encode(command)
        except (TypeError, OverflowError) as e:
            raise InvalidArgument(f"command: {e}") from None
        cmd = decode_command(raw)
        if not isinstance(cmd, SampleCommand | ProfileCommand):
            raise InvalidArgument("only 'sample' and 'profile' commands are read this way")
        plan = self._planner.plan(principal, cmd)
        return self._streamer.read_plan(self._admission, principal, plan)
