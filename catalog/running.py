"""The queries running now, of every principal, and the interface through which the control
plane lists and cancels them (``GET /v1/queries?running=true``, ``DELETE /v1/queries/{id}``:
proto_docs/governance.md, "Running queries").

The data plane runs them (Flight DoGet streams, async queries, the runs of
``POST /v1/query`` and exports); the control plane may import
only ``catalog``, so the protocol and its answer live here and ``quiver/runtime.py`` hands
``create_app`` the data plane's implementation explicitly.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import msgspec

from catalog.errors import bounded

#: A running query's SQL is shown at most this long (the rest is cut, saying so).
MAX_RUNNING_SQL_CHARS = 2_000
#: At most this many tables are named per running query.
MAX_RUNNING_TABLES = 50

RunningKind = Literal["stream", "async", "run"]


class RunningQueryInfo(msgspec.Struct, kw_only=True):
    """One query running now. ``id`` is what ``DELETE /v1/queries/{id}`` takes: ``s_…`` for
    a Flight DoGet stream (cancelling it cancels its whole FlightInfo, as CancelFlightInfo
    does), the async query's own ``q_…`` id for ``submit-query`` and async exports, ``h_…``
    for a run of agent SQL outside Flight (``POST /v1/query``, a synchronous export)."""

    id: str
    principal: str
    kind: RunningKind
    #: What the request is: query, scan, sample, profile, result, artefact, export.
    what: str
    sql: str | None
    tables: list[str]
    started_at: str
    #: Rows produced so far, where the server sees them (None: not known while it runs).
    rows: int | None
    via: str


class RunningQueryList(msgspec.Struct, kw_only=True):
    """``GET /v1/queries?running=true``. ``running`` (always true) is what tells this answer
    from the query log's page (``QueryPage``) in the OpenAPI schema, where both are the
    route's answer."""

    running: Literal[True]
    queries: list[RunningQueryInfo]


class QueryCancelled(msgspec.Struct, kw_only=True):
    """``DELETE /v1/queries/{id}``: ``stopped`` is whether it had ended when the answer was
    sent (it is interrupted until it does)."""

    id: str
    stopped: bool


def shown_sql(sql: str | None) -> str | None:
    """A running query's SQL as listed: whitespace collapsed, bounded."""
    if sql is None:
        return None
    return bounded(" ".join(sql.split()), MAX_RUNNING_SQL_CHARS)


def shown_tables(tables: tuple[str, ...] | list[str]) -> list[str]:
    return list(tables[:MAX_RUNNING_TABLES])


@runtime_checkable
class RunningQueries(Protocol):
    """Every running query of the process, and cancelling one by its id (admin only: the
    control plane's guard)."""

    def list(self) -> list[RunningQueryInfo]: ...

    def cancel(self, query_id: str) -> bool | None:
        """Interrupt the query ``query_id``; None when no query of that id is running, else
        whether it had stopped when this returned."""
        ...
