"""What the MCP tools need from a Quiver, as a small protocol with two implementations.

The tools (mcp_server/tools.py) are written once against :class:`Backend`. Over HTTP the
control plane's process serves them with :class:`LocalBackend` — the data plane's query path
(:class:`~catalog.query_port.QueryRunner`: guard, admission, timeout, row cap) and the
catalog, for one verified principal. ``quiver mcp`` serves them over stdio with
:class:`~mcp_server.remote.RemoteBackend`, which asks a remote Quiver the same questions
over Arrow Flight with the agent's token. Both answer in the same types, so a tool answers
the same through either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import msgspec
import pyarrow as pa

from catalog import Catalog, Principal
from catalog.artefacts import ArtefactFilter
from catalog.previews import preview
from catalog.query_port import QueryRunner

#: The query log's ``via`` of what the MCP tools run in-process (proto_docs/governance.md).
VIA = "mcp"


@dataclass(frozen=True, slots=True)
class TableMeta:
    """A readable table as the tools describe it."""

    name: str
    rows: int
    schema: pa.Schema
    description: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    #: When its data last changed (None: unknown, e.g. over Flight or never recorded).
    changed_at: datetime | None = None


@dataclass(eq=False)
class Rows:
    """A running query: its batches, whether the row cap cut it (known once read to the end,
    or at once), and ``close`` to give back what it holds."""

    reader: pa.RecordBatchReader
    max_rows: int
    cut: Callable[[], bool | None]
    close: Callable[[], None]
    #: Told what the tool sent (rows, bytes) and a failure's code before ``close``: the
    #: query-log record of the run (catalog/query_port.py). Over Flight the server counts.
    sent: Callable[[int, int], None] = lambda _rows, _nbytes: None
    failed: Callable[[str], None] = lambda _code: None


class Backend(Protocol):
    """One caller's view of a Quiver: every answer is what that caller may read."""

    def tables(self) -> list[TableMeta]: ...

    def read(self, command: dict[str, Any]) -> pa.Table:
        """A ``sample`` or ``profile`` command (proto_docs/descriptors.md), whole."""
        ...

    def query(self, sql: str, params: Sequence[Any], max_rows: int) -> Rows: ...

    def export(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Flight ``export`` action's body and answer (proto_docs/actions.md)."""
        ...

    def artefacts(self, body: dict[str, Any]) -> dict[str, Any]:
        """``list-artefacts``' body and answer."""
        ...

    def read_artefact(self, artefact_id: str, rows: int) -> dict[str, Any]:
        """``read-artefact``'s answer."""
        ...


def _plain(value: Any) -> Any:
    """A msgspec Struct as the plain JSON-able value Flight answers would decode to."""
    return msgspec.json.decode(msgspec.json.encode(value))


class LocalBackend:
    """:class:`Backend` in the server's own process, for one verified principal."""

    def __init__(self, catalog: Catalog, runner: QueryRunner, principal: Principal) -> None:
        self._catalog = catalog
        self._runner = runner
        self.principal = principal

    def tables(self) -> list[TableMeta]:
        catalog = self._catalog
        refs = catalog.policy.readable_tables(self.principal)
        texts = catalog.descriptions.of(refs)
        changed = catalog.descriptions.freshness(refs)
        out = []
        for info in catalog.policy.describe(self.principal, refs):  # a ruled table: its view's
            text = texts[info.ref.key()].only(info.schema.names)
            out.append(
                TableMeta(
                    name=info.ref.qualified,
                    rows=info.rows,
                    schema=info.schema,
                    description=text.table,
                    columns=text.columns,
                    changed_at=changed.get(info.ref.key()),
                )
            )
        return out

    def read(self, command: dict[str, Any]) -> pa.Table:
        return self._runner.read(self.principal, command, via=VIA)

    def query(self, sql: str, params: Sequence[Any], max_rows: int) -> Rows:
        # The tool's own row count (its default included) within the caller's cap: a swarm's
        # limits may set it below [mcp] default_rows (catalog/limits.py), and a request for
        # more than the cap is refused, not cut.
        max_rows = min(max_rows, self._catalog.limits.limits_for(self.principal).max_rows)
        running = self._runner.run(self.principal, sql, params, max_rows, via=VIA)
        return Rows(
            running.reader, running.max_rows, running.cut, running.close, running.sent, running.failed
        )

    def export(self, body: dict[str, Any]) -> dict[str, Any]:
        info = self._catalog.exports.export(
            self.principal,
            body["query"],
            body.get("params", []),
            format=body.get("format", "parquet"),
            name=body.get("name"),
            max_rows=body.get("max_rows"),
            via=VIA,
        )
        return dict(_plain(info))

    def artefacts(self, body: dict[str, Any]) -> dict[str, Any]:
        page = self._catalog.artefacts.list(
            self.principal,
            ArtefactFilter(kind=body.get("kind"), tag=body.get("tag")),
            page_size=body.get("page_size", 100),
            after=body.get("after"),
        )
        return dict(_plain(page))

    def read_artefact(self, artefact_id: str, rows: int) -> dict[str, Any]:
        return dict(_plain(preview(self._catalog.artefacts, self.principal, artefact_id, rows)))
