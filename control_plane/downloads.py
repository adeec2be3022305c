"""Downloads of artefact content (``GET /v1/artefacts/{id}/content``): validators, ranges, the
file name a browser saves, and tabular conversions, all streamed.

HTTP semantics follow RFC 9110: the ETag is the content's sha256 (strong: the bytes never
change under an id), ``If-None-Match`` answers 304, one ``bytes=`` range answers 206 (an
unsatisfiable one 416 with ``Content-Range: bytes */size``), ``If-Range`` falls back to the
whole content when it no longer matches. Several ranges, or a malformed ``Range``, are
ignored (the whole content, 200), which the RFC allows. A converted download
(``?format=``) is a different representation: its ETag is the sha256 with the format as a
suffix, and it takes no range (its length is not known before it is written).

Conversions read the stored Arrow IPC file batch by batch and write each batch through
pyarrow's own writer (Parquet, CSV, Arrow IPC stream) — or, for NDJSON, which pyarrow does not
write, as one JSON object per row — so memory holds one batch and its encoding, never the
table (proto_docs/artefacts.md, "Over HTTP").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import msgspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
import structlog

log = structlog.get_logger("control_plane")

T = TypeVar("T")

Format = Literal["parquet", "csv", "ndjson", "arrow"]

MEDIA_TYPES: dict[str, str] = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv; charset=utf-8",
    "ndjson": "application/x-ndjson",
    "arrow": "application/vnd.apache.arrow.stream",
}
EXTENSIONS: dict[str, str] = {"parquet": ".parquet", "csv": ".csv", "ndjson": ".ndjson", "arrow": ".arrows"}

#: Bytes read from a file per chunk sent.
CHUNK_BYTES = 256 * 1024
#: Rows converted at a time: a stored batch larger than this is sliced, so one encoded
#: chunk stays small whatever the writer of the artefact chose.
CONVERT_ROWS = 32_768


# --- validators and ranges --------------------------------------------------------------------


def etag_of(sha256: str, fmt: str | None = None) -> str:
    """The strong ETag of the stored bytes, or of one conversion of them."""
    return f'"{sha256}"' if fmt is None else f'"{sha256}.{fmt}"'


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag`` (weak comparison, as RFC 9110 says for
    this header): then the answer is 304."""
    if not if_none_match:
        return False
    tags = _tags(if_none_match)
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Unsatisfiable(Exception):
    """A single, well-formed range that lies wholly past the end of the content (416)."""


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def byte_range(header: str | None, size: int, if_range: str | None, etag: str) -> ByteRange | None:
    """The one range to send, or None for the whole content. Raises :class:`Unsatisfiable`
    for a range that starts at or past ``size`` (or a zero-length suffix)."""
    if not header:
        return None
    if if_range is not None and if_range.strip() != etag:  # changed (or a date): send it all
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None:  # several ranges, another unit, or malformed: ignored
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(size - n, 0), size - 1)
    start = int(first)
    if last and int(last) < start:  # invalid: ignored
        return None
    if start >= size:
        raise Unsatisfiable
    end = int(last) if last else size - 1
    return ByteRange(start, min(end, size - 1))


# --- Content-Disposition ---------------------------------------------------------------------

_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\/:*?<>|;]+')


def disposition(name: str | None, fallback: str, fmt: str | None = None) -> str:
    """``attachment`` with a file name safe to save: no directory part, no control
    characters, quotes or separators, at most 150 characters; an ASCII ``filename`` for old
    clients and the exact UTF-8 name as ``filename*`` (RFC 6266). A converted download gets
    the format's extension."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", unicodedata.normalize("NFC", base)).strip(" .")
    if not base:
        base = fallback
    if fmt is not None:
        stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
        base = stem + EXTENSIONS[fmt]
    base = base[:150]
    ascii_name = base.encode("ascii", "replace").decode().replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base, safe='')}"


# --- streaming --------------------------------------------------------------------------------


class FileChunks(Iterator[bytes]):
    """``length`` bytes of the open file ``f`` from ``start``, in chunks; :meth:`close` (at
    the end, or when the client goes away — even before the first chunk) closes the file.
    An open file keeps its content when the artefact is deleted meanwhile (POSIX)."""

    def __init__(self, f: IO[bytes], start: int, length: int) -> None:
        self._f = f
        self._start: int | None = start
        self._left = length

    def __next__(self) -> bytes:
        if self._left <= 0:
            self.close()
            raise StopIteration
        if self._start is not None:
            self._f.seek(self._start)
            self._start = None
        data = self._f.read(min(CHUNK_BYTES, self._left))
        if not data:
            self.close()
            raise OSError(f"the content ended {self._left} bytes early")
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._f.close()


_DONE = object()


async def in_threads(iterator: Iterator[T]) -> AsyncIterator[T]:
    """``iterator`` advanced in a worker thread, so that disk reads and encoding never block
    the event loop. Unlike Litestar's own wrapper, an error (pyarrow's are ValueErrors) is
    raised, never taken for the end: the server then breaks the connection and the client
    sees a cut download, not a short one that looks whole."""

    def step() -> Any:
        return next(iterator, _DONE)

    try:
        while True:
            item = await anyio.to_thread.run_sync(step)
            if item is _DONE:
                return
            yield item
    except Exception as e:
        log.warning("artefact.download_failed", error=str(e)[:300])
        raise
    finally:
        # Also when the client went away and the response's task is cancelled: the file (or
        # the memory map) is closed now, not whenever the collector gets to it.
        close = getattr(iterator, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


class _Chunks:
    """A write-only file for pyarrow's writers: what they write is collected, then taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._parts.append(b)
        return len(b)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _slices(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for offset in range(0, max(batch.num_rows, 1), CONVERT_ROWS):
            yield batch.slice(offset, CONVERT_ROWS)


def _json_default(value: Any) -> Any:
    return str(value)


def converted(schema: pa.Schema, batches: Iterable[pa.RecordBatch], fmt: Format) -> Iterator[bytes]:
    """The table of ``batches`` encoded as ``fmt``, one chunk per (sliced) batch."""
    if fmt == "ndjson":
        encoder = msgspec.json.Encoder(enc_hook=_json_default, decimal_format="number")
        for batch in _slices(batches):
            rows = batch.to_pylist()
            if rows:
                yield b"".join(encoder.encode(row) + b"\n" for row in rows)
        return
    sink = _Chunks()
    stream = pa.PythonFile(sink, mode="w")
    open_writer: dict[str, Callable[[], Any]] = {
        "parquet": lambda: pq.ParquetWriter(stream, schema),
        "csv": lambda: pa_csv.CSVWriter(stream, schema),
        "arrow": lambda: pa_ipc.new_stream(stream, schema),
    }
    writer = open_writer[fmt]()
    try:
        for batch in _slices(batches):
            if batch.num_rows:
                writer.write_batch(batch)
            data = sink.take()
            if data:
                yield data
    finally:
        writer.close()
    tail = sink.take()
    if tail:
        yield tail
