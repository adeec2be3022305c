"""Streaming ``multipart/form-data`` for file uploads (``POST /v1/artefacts``).

Litestar's own multipart support reads the whole body into memory before the handler runs;
an upload may be gigabytes on a VM of a few, so the upload route declares no body model and
reads ``request.stream()`` itself. Each chunk goes through the sans-IO parser of the
``multipart`` package (the one Litestar itself depends on): small form fields are collected
(bounded), and the bytes of the one ``file`` part are handed to a sink as they arrive —
at most one chunk and the sink's buffer are in memory at any time.

Rules (proto_docs/artefacts.md, "Over HTTP"): the body is ``multipart/form-data`` with a
boundary (415 otherwise); exactly one part named ``file``; the other parts are the fields the
route names, each at most once and within its size; anything else is a 400 naming the part.
A client that goes away mid-body is an :class:`~catalog.InvalidArgument` too; the caller
aborts its sink on every failure, so nothing of a refused upload is kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio.to_thread
import multipart

from catalog import InvalidArgument, QuiverError
from catalog.errors import bounded

FORM_DATA = "multipart/form-data"
#: Header lines of one part and their size: enough for a long file name, not for abuse.
MAX_PART_HEADER_BYTES = 8192
MAX_PART_HEADERS = 8
#: Parts in one body: the file and a handful of fields (a body of a million empty parts
#: must not keep the parser busy).
MAX_PARTS = 16


class UnsupportedMediaType(QuiverError):
    """415: the upload is not ``multipart/form-data`` (a client's mistake, audited as one)."""

    code = "INVALID_ARGUMENT"
    http_status = 415


class FileSink(Protocol):
    """Where the bytes of the ``file`` part go, as they arrive."""

    async def write(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class FilePart:
    """The ``file`` part's own headers: the client's file name and media type, if sent."""

    filename: str | None
    content_type: str | None


@dataclass(slots=True)
class Form:
    """What a multipart body held: the fields (text) and the file part's headers."""

    fields: dict[str, str]
    file: FilePart
    file_bytes: int


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type, or a 415 saying what to send."""
    media_type, options = multipart.parse_options_header(content_type or "")
    if media_type != FORM_DATA:
        shown = bounded(media_type or "none", 60)
        raise UnsupportedMediaType(
            f"send the upload as '{FORM_DATA}' with a 'file' part (got {shown}); e.g. curl -F file=@data.csv"
        )
    boundary = options.get("boundary", "")
    if not boundary or len(boundary) > 200 or any(c in boundary for c in "\r\n"):
        raise UnsupportedMediaType(f"'{FORM_DATA}' needs a boundary parameter of 1-200 characters")
    return boundary.encode("latin-1", "replace")


async def read_form(  # noqa: C901  one pass over the parser's events, each a short strict check
    chunks: AsyncIterator[bytes],
    content_type: str | None,
    *,
    fields: Mapping[str, int],
    open_file: Callable[[FilePart, Mapping[str, str]], Awaitable[FileSink]],
    file_field: str = "file",
) -> Form:
    """Parse a multipart body from ``chunks`` as it arrives.

    ``fields`` names the text fields allowed, each with its maximum size in bytes (UTF-8).
    When the ``file`` part starts, ``open_file`` is awaited with its headers and the fields
    read so far, and the part's bytes are written to the sink it returns; so the fields come
    first (a field after the file part is refused). Returns the fields and the file part
    once the closing boundary has been read; raises :class:`~catalog.InvalidArgument` for a malformed body,
    a part it does not know, a field given twice or too long, a missing file part, or a
    client that disconnected. The caller aborts the sink whenever this raises.
    """
    parser = multipart.PushMultipartParser(
        boundary_of(content_type),
        max_header_size=MAX_PART_HEADER_BYTES,
        max_header_count=MAX_PART_HEADERS,
        max_segment_count=MAX_PARTS,
        strict=True,
    )
    collected: dict[str, str] = {}
    file_part: FilePart | None = None
    file_bytes = 0
    sink: FileSink | None = None
    current: str | None = None  # the field being read, or file_field
    text = bytearray()
    try:
        async for chunk in _chunks(chunks):
            for event in parser.parse(chunk):
                if isinstance(event, multipart.MultipartSegment):
                    current = _part_name(event, fields, collected, file_field, file_part is not None)
                    if file_part is not None and current != file_field:
                        # The sink was opened with the fields read so far: a later field
                        # would be silently ignored.
                        raise InvalidArgument(f"send the form fields before the {file_field!r} part")
                    if current == file_field:
                        file_part = FilePart(filename=event.filename, content_type=event.content_type)
                        sink = await open_file(file_part, dict(collected))
                    text.clear()
                elif event is None:  # the end of a part
                    if current is not None and current != file_field:
                        collected[current] = _field_text(current, bytes(text))
                    current = None
                elif current == file_field:
                    assert sink is not None
                    file_bytes += len(event)
                    await sink.write(event)
                elif current is not None:
                    text += event
                    if len(text) > fields[current]:
                        raise InvalidArgument(
                            f"form field {current!r} is longer than {fields[current]:,} bytes"
                        )
            if parser.closed:
                break
        parser.close()
    except multipart.ParserLimitReached as e:
        raise InvalidArgument(f"multipart body: {e}") from None
    except multipart.MultipartError as e:
        raise InvalidArgument(f"multipart body is malformed: {e}") from None
    if file_part is None:
        raise InvalidArgument(
            f"the upload has no {file_field!r} part: send the content as -F {file_field}=@path"
        )
    return Form(fields=collected, file=file_part, file_bytes=file_bytes)


async def _chunks(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body's non-empty chunks; a client that hangs up mid-body is a 400 (it will not
    read the answer, but the log and the audit say what happened)."""
    from litestar.exceptions import InternalServerException

    try:
        async for chunk in chunks:
            if chunk:
                yield chunk
    except InternalServerException:  # Litestar's word for http.disconnect mid-body
        raise InvalidArgument("the client disconnected before sending the whole body") from None


def _part_name(
    segment: multipart.MultipartSegment,
    fields: Mapping[str, int],
    collected: Mapping[str, str],
    file_field: str,
    have_file: bool,
) -> str:
    name = segment.name or ""
    if name == file_field:
        if have_file:
            raise InvalidArgument(f"the upload has more than one {file_field!r} part: send one file")
        return name
    if name not in fields:
        allowed = ", ".join([file_field, *fields])
        raise InvalidArgument(f"unknown form field {bounded(name, 40)!r}; this route takes: {allowed}")
    if name in collected:
        raise InvalidArgument(f"form field {name!r} is given twice; give it once")
    return name


def _field_text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"form field {name!r} is not UTF-8 text") from None


class SyncWriter(Protocol):
    """A blocking writer of content (the artefact store's)."""

    def write(self, data: bytes) -> Any: ...


class ThreadedSink:
    """A :class:`FileSink` over a blocking writer: chunks are gathered up to ``flush_bytes``
    and written in a worker thread, so disk writes never block the event loop and a stream of
    small chunks costs one thread hop per ``flush_bytes``, not one per chunk."""

    def __init__(self, writer: SyncWriter, flush_bytes: int = 1 << 20) -> None:
        self.writer = writer
        self._flush_bytes = flush_bytes
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= self._flush_bytes:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            await anyio.to_thread.run_sync(self.writer.write, data)


async def drain(chunks: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop what is left of a refused body, up to ``limit`` bytes, so that the
    client, still sending, sees the answer rather than a reset; a client that went away,
    or a body that ends, stops it quietly."""
    left = limit
    try:
        async for chunk in chunks:
            left -= len(chunk)
            if left <= 0:
                return
    except Exception:  # noqa: BLE001 - the refusal is what the client gets, whatever happens here
        return
