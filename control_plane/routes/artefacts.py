"""Artefacts over HTTP: file uploads and downloads, listing, metadata, sharing, lifetime
(proto_docs/artefacts.md, "Over HTTP").

Agent and swarm tokens use these routes for what they may see; admin tokens manage every
artefact. Who may see or change an artefact is decided by the store
(:class:`catalog.artefacts.ArtefactStore`), once: an artefact the caller may not see is a 404
whatever it asks (existence is never revealed); one it sees but does not own is a 403 for
the owner's operations (delete, share, extend). The handlers translate HTTP to store calls.

The upload reads its body as a stream (control_plane/uploads.py) into the store's writer —
the route declares no body model, so Litestar never buffers it — and the download streams
the file, a byte range of it, or a conversion of a table (control_plane/downloads.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import anyio.to_thread
from litestar import MediaType, Request, Response, Router, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIMediaType as MediaTypeSpec
from litestar.openapi.spec import OpenAPIResponse, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Stream

from catalog import Catalog, InvalidArgument, PayloadTooLarge, Principal, QuiverError
from catalog.artefacts import (
    MAX_DESCRIPTION_CHARS,
    MAX_NAME_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    Artefact,
    ArtefactFilter,
    ArtefactKind,
    ArtefactWriter,
)
from catalog.errors import bounded
from control_plane.context import TOKEN, audited
from control_plane.downloads import (
    MEDIA_TYPES,
    FileChunks,
    Format,
    Unsatisfiable,
    byte_range,
    converted,
    disposition,
    etag_of,
    in_threads,
    none_match,
)
from control_plane.models import ArtefactList, ErrorBody, ExtendArtefact, ShareArtefact
from control_plane.uploads import FORM_DATA, FilePart, ThreadedSink, boundary_of, drain, read_form

#: Form fields of an upload besides ``file``, with the bytes each may have (UTF-8: up to four
#: per character of the store's limits, which the store then checks in characters).
UPLOAD_FIELDS = {
    "name": 4 * MAX_NAME_CHARS,
    "description": 4 * MAX_DESCRIPTION_CHARS,
    "tags": 4 * MAX_TAGS * (MAX_TAG_CHARS + 1),
    "ttl_seconds": 32,
}
#: Bytes of a refused upload's body still read (and dropped) before the answer: a client that
#: sends the whole body before it reads (most do; curl's ``Expect: 100-continue`` does not)
#: then gets the refusal instead of a connection reset. A longer rest is not waited for.
DRAIN_BYTES = 4 * 1024 * 1024
#: Bytes a multipart body may have beyond its file: the fields and the parts' headers. A
#: Content-Length above ``max_upload_bytes`` plus this is refused before a byte is read.
FORM_ALLOWANCE = sum(UPLOAD_FIELDS.values()) + 16 * 1024


def _upload_schema() -> Schema:
    """The form's fields. In a form every value is text, so the text fields declare no JSON
    type: a type a form cannot carry (``null``, a number) would arrive as its spelling,
    which is valid text — only their lengths constrain them."""
    return Schema(
        type=OpenAPIType.OBJECT,
        required=["file"],
        properties={
            "name": Schema(
                min_length=1,
                max_length=MAX_NAME_CHARS,
                description="A label (never a path); default: the file part's file name",
            ),
            "description": Schema(max_length=MAX_DESCRIPTION_CHARS),
            "tags": Schema(
                max_length=MAX_TAGS * (MAX_TAG_CHARS + 1),
                description=f"Comma-separated, at most {MAX_TAGS} tags of {MAX_TAG_CHARS} characters",
            ),
            "ttl_seconds": Schema(
                type=OpenAPIType.INTEGER,
                minimum=1,
                description="Lifetime in seconds; default [artefacts] default_ttl_seconds, "
                "at most max_ttl_seconds (422 above)",
            ),
            "file": Schema(
                type=OpenAPIType.STRING,
                format=OpenAPIFormat.BINARY,
                description="The content, after the fields: at least one byte, at most "
                "[artefacts] max_upload_bytes (413 above) and within the swarm's quota (413)",
            ),
        },
        additional_properties=False,
    )


@dataclass
class UploadOperation(Operation):
    """The OpenAPI operation of the upload. Litestar derives a request body from a ``data``
    parameter, which this route must not have (Litestar would read the whole body first), so
    the ``multipart/form-data`` body is declared here."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True, content={FORM_DATA: MediaTypeSpec(schema=_upload_schema())}
        )


@dataclass
class ContentOperation(Operation):
    """The OpenAPI operation of the download: its 200 and 206 answers are the content in the
    artefact's own media type (or the format asked for), and a 304 has no body (416, with the
    error body, is declared with the other errors). Litestar would document the handler's
    ``Response`` as JSON."""

    def __post_init__(self) -> None:
        binary = {"*/*": MediaTypeSpec(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))}
        responses = dict(self.responses or {})
        responses["200"] = OpenAPIResponse(
            description="The content: the stored bytes (the artefact's media type) or, with ?format=, "
            "a tabular artefact converted as it is sent",
            content=binary,
        )
        responses["206"] = OpenAPIResponse(description="One byte range of the stored bytes", content=binary)
        responses["304"] = OpenAPIResponse(description="If-None-Match matched the ETag (sha256)")
        self.responses = responses


_WHOLE_NUMBER = re.compile(r"-?[0-9]{1,18}")


def _ttl(fields: dict[str, str]) -> int | None:
    raw = fields.get("ttl_seconds")
    if raw is None:
        return None
    text = raw.strip()
    if _WHOLE_NUMBER.fullmatch(text) is None:  # ASCII digits only: int() takes "²" and "٣"
        raise InvalidArgument(
            f"form field 'ttl_seconds': {bounded(raw, 40)!r} is not a whole number of seconds"
        )
    return int(text)


def _tags(fields: dict[str, str]) -> list[str]:
    return [t.strip() for t in fields.get("tags", "").split(",") if t.strip()]


@post(
    "/v1/artefacts",
    tags=["artefacts"],
    status_code=201,
    summary="Upload a file artefact: multipart/form-data with optional name, description, tags, "
    "ttl_seconds, then the file part (streamed to disk)",
    request_max_body_size=None,
    operation_class=UploadOperation,
)
async def upload_artefact(
    request: Request[Principal, Any, Any], catalog: NamedDependency[Catalog]
) -> Artefact:
    store = catalog.artefacts
    content_type = request.headers.get("content-type")
    writer: ArtefactWriter | None = None
    sink: ThreadedSink | None = None

    async def open_file(part: FilePart, fields: Mapping[str, str]) -> ThreadedSink:
        nonlocal writer, sink
        if part.filename is None:
            raise InvalidArgument(
                "the 'file' part is not a file: send it with a file name (curl -F file=@path)"
            )
        name = fields.get("name", part.filename)  # a name sent empty is refused, not replaced
        writer = await anyio.to_thread.run_sync(
            lambda: store.begin_write(
                request.user,
                "file",
                name,
                media_type=part.content_type or None,
                description=fields.get("description", ""),
                tags=_tags(dict(fields)),
                ttl_seconds=_ttl(dict(fields)),
            )
        )
        sink = ThreadedSink(writer)
        return sink

    body = request.stream()
    with audited(request, "artefact.create", None, success=False):
        # Refused before a byte of the body is read: not multipart (415), or a declared
        # length that cannot fit (413).
        boundary_of(content_type)
        cap = catalog.config.artefacts.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap + FORM_ALLOWANCE:
            raise PayloadTooLarge(
                f"the upload ({int(declared)} bytes) is larger than [artefacts] max_upload_bytes "
                f"({cap} bytes per artefact); nothing was kept"
            )
        try:
            form = await read_form(body, content_type, fields=UPLOAD_FIELDS, open_file=open_file)
            assert writer is not None and sink is not None
            await sink.flush()
            if form.file_bytes == 0:
                # HTTP's own rule: an empty file part is a mistake (a wrong path in curl -F
                # file=@...), not an artefact.
                raise InvalidArgument("the file part is empty: an uploaded file has at least one byte")
            committed = writer
            return await anyio.to_thread.run_sync(committed.commit)
        except BaseException as e:
            if writer is not None:
                failed = writer
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(failed.abort)
            if isinstance(e, QuiverError):
                await drain(body, DRAIN_BYTES)
            raise


@get(
    "/v1/artefacts",
    sync_to_thread=True,
    tags=["artefacts"],
    summary="Artefacts the caller may see, oldest first, a page at a time (filters: tag, name_prefix, kind, owner, swarm)",
)
def list_artefacts(  # noqa: PLR0913  Litestar injects each query parameter by name
    request: Request[Principal, Any, Any],
    catalog: NamedDependency[Catalog],
    tag: FromQuery[str | None] = None,
    name_prefix: FromQuery[str | None] = None,
    kind: FromQuery[ArtefactKind | None] = None,
    owner: FromQuery[str | None] = None,
    swarm: FromQuery[str | None] = None,
    cursor: FromQuery[str | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
) -> ArtefactList:
    page = catalog.artefacts.list(
        request.user,
        ArtefactFilter(tag=tag, name_prefix=name_prefix, kind=kind, owner=owner, swarm=swarm),
        page_size=limit,
        after=cursor,
    )
    return ArtefactList(artefacts=page.items, next_cursor=page.next)


@get(
    "/v1/artefacts/{artefact_id:str}",
    sync_to_thread=True,
    tags=["artefacts"],
    summary="One artefact's metadata",
)
def get_artefact(
    request: Request[Principal, Any, Any], artefact_id: FromPath[str], catalog: NamedDependency[Catalog]
) -> Artefact:
    return catalog.artefacts.get(request.user, artefact_id)


@get(
    "/v1/artefacts/{artefact_id:str}/content",
    tags=["artefacts"],
    summary="The content, streamed (Range, If-None-Match); ?format= converts a tabular artefact",
    operation_class=ContentOperation,
)
async def artefact_content(
    request: Request[Principal, Any, Any],
    artefact_id: FromPath[str],
    catalog: NamedDependency[Catalog],
    format: FromQuery[Format | None] = None,
) -> Response[Any]:
    store = catalog.artefacts
    artefact = await anyio.to_thread.run_sync(store.get, request.user, artefact_id)
    etag = etag_of(artefact.sha256, format)
    headers = {"etag": etag, "cache-control": "private, no-cache", "x-content-type-options": "nosniff"}
    if format is None:
        headers["accept-ranges"] = "bytes"
    if none_match(request.headers.get("if-none-match"), etag):
        return Response(content=b"", status_code=304, headers=headers)
    headers["content-disposition"] = disposition(artefact.name, artefact.id, format)
    if format is not None:
        _, reader = await anyio.to_thread.run_sync(store.open_table, request.user, artefact_id)
        chunks = converted(reader.schema, reader, format)
        headers["content-type"] = MEDIA_TYPES[format]
        return Stream(in_threads(chunks), headers=headers)
    size = artefact.size_bytes
    try:
        wanted = byte_range(request.headers.get("range"), size, request.headers.get("if-range"), etag)
    except Unsatisfiable:
        headers["content-range"] = f"bytes */{size}"
        body = ErrorBody(
            error="INVALID_ARGUMENT",
            detail=f"the range {bounded(request.headers.get('range'), 60)!r} lies past the end of the "
            f"content ({size} bytes)",
        )
        return Response(content=body, status_code=416, headers=headers, media_type=MediaType.JSON)
    start, length, status = (0, size, 200) if wanted is None else (wanted.start, wanted.length, 206)
    if wanted is not None:
        headers["content-range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    headers["content-length"] = str(length)
    # Set as a header: given as the media type, Litestar would add "; charset=utf-8" to a
    # text/* type, which the uploader never said.
    headers["content-type"] = artefact.media_type
    # Opened now, not when the first chunk is sent: a download that got its headers keeps its
    # bytes even when the artefact is deleted meanwhile.
    _, content = await anyio.to_thread.run_sync(store.open_content, request.user, artefact_id)
    return Stream(
        in_threads(FileChunks(content, start, length)),
        status_code=status,
        headers=headers,
    )


@delete(
    "/v1/artefacts/{artefact_id:str}",
    sync_to_thread=True,
    tags=["artefacts"],
    summary="Delete an artefact (its owner or an admin)",
)
def delete_artefact(
    request: Request[Principal, Any, Any], artefact_id: FromPath[str], catalog: NamedDependency[Catalog]
) -> None:
    with audited(request, "artefact.delete", artefact_id[:200], success=False):
        catalog.artefacts.delete(request.user, artefact_id)


@post(
    "/v1/artefacts/{artefact_id:str}/share",
    sync_to_thread=True,
    tags=["artefacts"],
    status_code=200,
    summary="Share with a swarm, or with one agent of it (its owner or an admin)",
)
def share_artefact(
    request: Request[Principal, Any, Any],
    artefact_id: FromPath[str],
    data: JSONBody[ShareArtefact],
    catalog: NamedDependency[Catalog],
) -> Artefact:
    with audited(request, "artefact.share", _share_target(artefact_id, data), success=False):
        return catalog.artefacts.share(request.user, artefact_id, data.swarm, data.agent)


@delete(
    "/v1/artefacts/{artefact_id:str}/share",
    sync_to_thread=True,
    tags=["artefacts"],
    status_code=200,
    summary="Withdraw a share (the same body as the share)",
)
def unshare_artefact(
    request: Request[Principal, Any, Any],
    artefact_id: FromPath[str],
    data: JSONBody[ShareArtefact],
    catalog: NamedDependency[Catalog],
) -> Artefact:
    with audited(request, "artefact.unshare", _share_target(artefact_id, data), success=False):
        return catalog.artefacts.unshare(request.user, artefact_id, data.swarm, data.agent)


@post(
    "/v1/artefacts/{artefact_id:str}/extend",
    sync_to_thread=True,
    tags=["artefacts"],
    status_code=200,
    summary="Keep an artefact until now + ttl_seconds (at most [artefacts] max_ttl_seconds)",
)
def extend_artefact(
    request: Request[Principal, Any, Any],
    artefact_id: FromPath[str],
    data: JSONBody[ExtendArtefact],
    catalog: NamedDependency[Catalog],
) -> Artefact:
    with audited(request, "artefact.extend", artefact_id[:200], success=False):
        return catalog.artefacts.extend(request.user, artefact_id, data.ttl_seconds)


def _share_target(artefact_id: str, data: ShareArtefact) -> str:
    who = data.swarm if data.agent is None else f"{data.swarm}/{data.agent}"
    return f"{artefact_id} -> {who}"[:200]


ROUTER = Router(
    "/",
    guards=[TOKEN],
    route_handlers=[
        upload_artefact,
        list_artefacts,
        get_artefact,
        artefact_content,
        delete_artefact,
        share_artefact,
        unshare_artefact,
        extend_artefact,
    ],
)
