"""Result formats: an Arrow stream of record batches written as Arrow IPC, Parquet, CSV,
NDJSON or one JSON document, batch by batch, into any byte sink.

``POST /v1/query`` streams a result to its client in one of these (control_plane/routes/query.py),
and an export writes one into a file artefact (catalog/exports.py): both hand the batches
of a :class:`~catalog.query_port.RunningQuery` to a :class:`ResultWriter`, which holds at most
one batch, so memory stays bounded whatever the result size. The binary and tabular formats
are pyarrow's own writers (C++, no row ever becomes a Python object); JSON and NDJSON need
text per value, so each batch's columns become Python values there and msgspec encodes them
(NaN and infinities are written as ``null``: JSON has no such numbers).

A result cut at its row cap says so wherever the format has room for it (proto_docs/control_plane.md,
"POST /v1/query"): the last record batch of an Arrow stream carries the custom metadata
``quiver.row_cap`` (the JSON of Flight's cut metadata), a Parquet file's footer carries
``quiver.row_cap`` (``{"max_rows", "reason", "truncated"}``, always), a JSON document ends with
``"truncated"``, ``"max_rows"`` and ``"reason"``. CSV and NDJSON have no room: the HTTP headers
say it when known before the first byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from catalog.errors import InvalidArgument

__all__ = [
    "FORMATS",
    "Chunks",
    "ResultFormat",
    "ResultWriter",
    "RowCapInfo",
    "Sink",
    "by_name",
    "check_schema",
]

#: The custom metadata key (Arrow IPC last batch, Parquet footer) that reports the row cap.
ROW_CAP_KEY = "quiver.row_cap"


@dataclass(frozen=True, slots=True)
class ResultFormat:
    name: str
    media_type: str
    suffix: str


FORMATS: dict[str, ResultFormat] = {
    f.name: f
    for f in (
        ResultFormat("arrow", "application/vnd.apache.arrow.stream", ".arrows"),
        ResultFormat("parquet", "application/vnd.apache.parquet", ".parquet"),
        ResultFormat("csv", "text/csv", ".csv"),
        ResultFormat("ndjson", "application/x-ndjson", ".ndjson"),
        ResultFormat("json", "application/json", ".json"),
    )
}


def by_name(name: str) -> ResultFormat:
    found = FORMATS.get(name)
    if found is None:
        raise InvalidArgument(f"unknown format {name[:40]!r}; use one of: {', '.join(FORMATS)}")
    return found


@dataclass(frozen=True, slots=True)
class RowCapInfo:
    """The row cap of a result and, once known, whether it cut the result."""

    max_rows: int
    reason: str
    truncated: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {"max_rows": self.max_rows, "reason": self.reason, "truncated": self.truncated}


class Sink(Protocol):
    """Where a writer puts bytes: a file opened ``"wb"``, or :class:`Chunks`."""

    def write(self, data: bytes) -> int: ...


class Chunks:
    """A sink that keeps what was written until :meth:`take`: the bytes of the batches a
    writer wrote since the last take, for a streamed HTTP response."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._written = 0
        self.closed = False

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._parts.append(chunk)
        self._written += len(chunk)
        return len(chunk)

    def tell(self) -> int:  # pyarrow's Parquet writer asks where it is
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _unsupported_csv(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_nested(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
        or (pa.types.is_dictionary(t) and _unsupported_csv(t.value_type))
    )


def check_schema(fmt: ResultFormat, schema: pa.Schema) -> None:
    """Refuse, before any byte is written, a result the format cannot hold."""
    if fmt.name != "csv":
        return
    bad = [f"{f.name} ({f.type})" for f in schema if _unsupported_csv(f.type)]
    if bad:
        shown = ", ".join(bad[:5])
        raise InvalidArgument(
            f"CSV cannot hold the column(s) {shown[:200]}: nested and binary values have no CSV "
            "form; ask for Arrow, Parquet, NDJSON or JSON, or cast them to text in the SQL"
        )


def _keys(schema: pa.Schema) -> list[str]:
    """Object keys for the columns: the names, made unique the way DuckDB does (``a``,
    ``a_1``) so that no value is lost to a duplicate key."""
    seen: set[str] = set()
    out = []
    for name in schema.names:
        key, n = name, 0
        while key in seen:
            n += 1
            key = f"{name}_{n}"
        seen.add(key)
        out.append(key)
    return out


def _enc_hook(value: Any) -> Any:
    return str(value)


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook, decimal_format="number")


class ResultWriter:
    """Writes record batches in one format into ``sink``: :meth:`write` per batch, then
    :meth:`finish` with the row cap (which also closes the format's framing)."""

    def __init__(self, fmt: ResultFormat, schema: pa.Schema, sink: Sink) -> None:
        check_schema(fmt, schema)
        self.format = fmt
        self.schema = schema
        self._sink = sink
        self.rows = 0
        self._first = True
        self._pending: pa.RecordBatch | None = None  # Arrow: the last batch carries the cut
        self._keys = _keys(schema)
        self._writer: Any = None
        if fmt.name == "arrow":
            self._writer = pa.ipc.new_stream(sink, schema)
        elif fmt.name == "parquet":
            self._writer = pq.ParquetWriter(sink, schema)
        elif fmt.name == "csv":
            self._writer = pa_csv.CSVWriter(sink, schema)
        elif fmt.name == "json":
            columns = [{"name": k, "type": str(f.type)} for k, f in zip(self._keys, schema, strict=True)]
            sink.write(b'{"columns":' + _ENCODER.encode(columns) + b',"rows":[')

    def write(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        name = self.format.name
        if name == "arrow":
            if self._pending is not None:
                self._writer.write_batch(self._pending)
            self._pending = batch
        elif name in ("parquet", "csv"):
            if batch.num_rows:
                self._writer.write_batch(batch)
        elif batch.num_rows:
            rows = self._rows(batch)
            if name == "ndjson":
                self._sink.write(_ENCODER.encode_lines(rows))
            else:
                text = _ENCODER.encode(rows)[1:-1]
                self._sink.write(text if self._first else b"," + text)
                self._first = False

    def _rows(self, batch: pa.RecordBatch) -> list[dict[str, Any]]:
        columns = [c.to_pylist() for c in batch.columns]
        keys = self._keys
        return [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=True)]

    def finish(self, cap: RowCapInfo) -> None:
        name = self.format.name
        if name == "arrow":
            if cap.truncated:
                meta = {ROW_CAP_KEY: json.dumps(cap.as_dict())}
                last = (
                    self._pending
                    if self._pending is not None
                    else pa.RecordBatch.from_pylist([], self.schema)
                )
                self._writer.write_batch(last, custom_metadata=meta)
            elif self._pending is not None:
                self._writer.write_batch(self._pending)
            self._pending = None
            self._writer.close()
        elif name == "parquet":
            self._writer.add_key_value_metadata({ROW_CAP_KEY: json.dumps(cap.as_dict())})
            self._writer.close()
        elif name == "csv":
            self._writer.close()
        elif name == "json":
            tail = {"row_count": self.rows, **cap.as_dict()}
            self._sink.write(b"]," + _ENCODER.encode(tail)[1:])
