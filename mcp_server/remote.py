""":class:`~mcp_server.backend.Backend` over Arrow Flight: what ``quiver mcp`` proxies to.

Every question goes to the remote Quiver with the agent's own token through
:class:`~quiver_client.QuiverClient`, so the remote server decides everything — allowlist,
guard, limits, audit — exactly as for any Flight client. A refusal arrives as a
:class:`~quiver_client.QuiverClientError` with the server's code and sentence, which the
tools answer as the same tool error the HTTP endpoint gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa

from mcp_server.backend import Rows, TableMeta
from quiver_client import QuiverClient, QuiverClientError
from quiver_client.client import TruncatedResultError
from quiver_client.wire import TRUNCATED


class RemoteBackend:
    """The client must report cuts by raising (``on_truncation="raise"``): that is how a
    stream says, after its last batch, that the row cap cut it."""

    def __init__(self, client: QuiverClient) -> None:
        if client.on_truncation != "raise":
            raise ValueError('RemoteBackend needs a QuiverClient with on_truncation="raise"')
        self._client = client

    def tables(self) -> list[TableMeta]:
        return [
            TableMeta(
                name=t.name,
                rows=t.rows,
                schema=t.schema,
                description=t.description,
                columns=t.columns,
                changed_at=datetime.fromisoformat(t.changed_at) if t.changed_at else None,
            )
            for t in self._client.tables()
        ]

    def read(self, command: dict[str, Any]) -> pa.Table:
        fields = {k: v for k, v in command.items() if k != "kind"}
        info = self._client.info(QuiverClient.command(command["kind"], **fields))
        try:
            return self._client.fetch(info)
        except TruncatedResultError as e:  # a percent sample cut at [limits] max_sample_rows
            assert e.result is not None  # fetch() reads the whole cut result
            return e.result

    def query(self, sql: str, params: Sequence[Any], max_rows: int) -> Rows:
        stream = self._client.query_stream(sql, list(params), max_rows)
        state: dict[str, bool | None] = {"cut": None}

        def batches() -> Iterator[pa.RecordBatch]:
            try:
                yield from stream
            except QuiverClientError as e:  # the client raises a cut after the last batch
                if e.code != TRUNCATED:
                    raise
                state["cut"] = True
                return
            state["cut"] = False

        def close() -> None:
            stream.close()

        return Rows(
            pa.RecordBatchReader.from_batches(stream.schema, batches()),
            max_rows,
            lambda: state["cut"],
            close,
        )

    def export(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.action("export", body))

    def artefacts(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.action("list-artefacts", body))

    def read_artefact(self, artefact_id: str, rows: int) -> dict[str, Any]:
        return self._client.read_artefact(artefact_id, rows)


__all__ = ["QuiverClientError", "RemoteBackend"]
