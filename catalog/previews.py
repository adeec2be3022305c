"""A bounded look into an artefact: its metadata and its first rows (or first bytes).

MCP's ``read_artefact`` answers this, over HTTP in-process and through ``quiver mcp`` via the
Flight action ``read-artefact`` (proto_docs/actions.md): one function, so both answer the
same. A tabular artefact's head comes from its Arrow IPC file, a Parquet or Arrow export's
from the file's first row group or batch, a CSV or NDJSON export's from its first bytes —
never more than ``rows`` rows or ``max_bytes`` bytes, whatever the artefact's size.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from catalog.artefacts import Artefact, ArtefactStore
from catalog.errors import InvalidArgument
from catalog.identity import Principal

MAX_PREVIEW_ROWS = 100
MAX_PREVIEW_BYTES = 64 * 1024


class Preview(msgspec.Struct, kw_only=True):
    """The head of an artefact: ``rows`` (a list of objects) for tabular content, ``text``
    for text content, neither for other bytes; ``truncated`` when more exists."""

    artefact: Artefact
    columns: list[str] | None = None
    rows: list[dict[str, Any]] | None = None
    text: str | None = None
    truncated: bool = False


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = table.to_pylist()
    return out


def _bounded_rows(
    batches: list[pa.RecordBatch], schema: pa.Schema, rows: int, max_bytes: int
) -> tuple[pa.Table, bool]:
    table = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
    cut = table.num_rows > rows
    table = table.slice(0, rows)
    while table.num_rows > 1 and table.nbytes > max_bytes:
        table = table.slice(0, table.num_rows // 2)
        cut = True
    return table, cut


def preview(
    store: ArtefactStore,
    principal: Principal,
    artefact_id: str,
    rows: int = 10,
    max_bytes: int = MAX_PREVIEW_BYTES,
) -> Preview:
    """The metadata and the head of ``artefact_id`` as ``principal`` sees it (NOT_FOUND when
    not visible, as :meth:`ArtefactStore.get`)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= MAX_PREVIEW_ROWS:
        raise InvalidArgument(f"'rows' must be an integer from 0 to {MAX_PREVIEW_ROWS}")
    art = store.get(principal, artefact_id)
    if art.kind == "table":
        _, reader = store.open_table(principal, artefact_id)
        return _head(art, reader, rows, max_bytes)
    _, content = store.open_content(principal, artefact_id)
    with content:
        if art.format == "parquet":
            parquet = pq.ParquetFile(content)
            batches = next(parquet.iter_batches(batch_size=max(rows, 1) + 1), None)
            head = [batches] if batches is not None else []
            table, cut = _bounded_rows(head, parquet.schema_arrow, rows, max_bytes)
            cut = cut or parquet.metadata.num_rows > table.num_rows
            return Preview(artefact=art, columns=table.column_names, rows=_rows(table), truncated=cut)
        if art.format == "arrow":
            stream = ipc.open_stream(content)
            return _head(art, stream, rows, max_bytes)
        if art.format in ("csv", "ndjson") or art.media_type.startswith("text/"):
            data = content.read(max_bytes + 1)
            text = data[:max_bytes].decode("utf-8", errors="replace")
            lines = text.splitlines()
            cut = len(data) > max_bytes or len(lines) > rows + 1
            keep = rows + 1 if art.format == "csv" else rows  # CSV: the header line too
            return Preview(artefact=art, text="\n".join(lines[:keep]), truncated=cut)
    return Preview(artefact=art, truncated=art.size_bytes > 0)


def _head(art: Artefact, reader: pa.RecordBatchReader, rows: int, max_bytes: int) -> Preview:
    batches: list[pa.RecordBatch] = []
    seen = 0
    more = False
    for batch in reader:
        batches.append(batch)
        seen += batch.num_rows
        if seen > rows:
            more = True
            break
    table, cut = _bounded_rows(batches, reader.schema, rows, max_bytes)
    return Preview(artefact=art, columns=table.column_names, rows=_rows(table), truncated=cut or more)
