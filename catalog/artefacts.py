"""The artefact store: tables and files that agents save and share (proto_docs/artefacts.md).

An artefact is immutable content plus metadata. The content lives in
``DATA_DIR/artefacts/<id>``, named by its id only — the client's ``name`` is a label stored in
the metadata and never touches a path, so ``../../etc/passwd`` is just a name. The id is a
UUIDv7 generated here (unguessable: 74 random bits beside the time).

Writing (:meth:`ArtefactStore.begin_write`) streams: bytes (files) or record batches (tables,
written as an Arrow IPC *file*, so a reader memory-maps it) go to a temporary file
``.tmp-<id>-<random>`` in the same directory, counted and hashed as they arrive, and checked
against ``[artefacts] max_upload_bytes`` and the swarm's quota while they stream.
:meth:`ArtefactWriter.commit` fsyncs the file; for a table it loads a copy of the rows into
``artefacts."<id>"`` for SQL (in a transaction of its own, before the admin-write lock, so a
large copy never holds up admin writes; nobody can name that table before the metadata
exists); then, under the lock, it checks the quota again, renames the file to ``<id>``, and
only then commits the metadata. Any failure before that, or
:meth:`ArtefactWriter.abort`, removes the temporary file: nothing is ever visible half
written. Writes that change metadata (commit, delete, share, unshare, extend, sweep) run
through the one admin-write lock (catalog/writes.py) and update the in-memory index while
still holding it, so memory always equals what committed, and visibility checks on the hot
path (get, the SQL guard) never touch the database.

Visibility: the owner's swarm (every token of that swarm instance), the swarms and agents it
is shared with, and admins. Anyone else gets NOT_FOUND for an id, exactly as for an id that
never existed, and the SQL guard's refusal for a missing table. Managing (delete, share,
unshare, extend) is for the owner itself, its swarm's swarm token, and admins; a reader who
may not manage gets PERMISSION_DENIED. An expired artefact is invisible at once, before the
janitor removes it.

SQL: a tabular artefact is read in guarded SQL as ``artefacts."<id>"`` (:func:`sql_name`).
The schema ``artefacts`` is not a data schema: ``TableCatalog`` never lists it, allowlists may
not name it, and ``Policy`` resolves and allows a reference to it only through
:meth:`ArtefactStore.readable_table` — the caller's visible tabular artefacts — so anyone else
gets the refusal of a missing table.

The janitor (:meth:`ArtefactStore.sweep`, run by ``quiver serve`` at start and every
``cleanup_interval_seconds``) removes expired artefacts (metadata, SQL copy and content),
temporary files of writers that are not running, content without metadata, metadata
without content, and SQL copies without metadata; it logs, counts (``quiver_artefacts_removed_total``) and audits what it
removed.

Public API (stable; other components build on it — add, do not rename):

- ``ArtefactStore.begin_write(principal, kind, name, *, schema=None, media_type=None,
  format=None, tags=(), description="", ttl_seconds=None, provenance=None) -> ArtefactWriter``
- ``ArtefactWriter.write(bytes)`` (files), ``.write_batch(batch)`` / ``.write_table(table)``
  (tables), ``.commit() -> Artefact``, ``.abort()``; also a context manager that aborts on
  an exception and leaves committing to the caller.
- ``get(principal, id) -> Artefact``, ``open_content(principal, id) -> (Artefact, BinaryIO)``,
  ``open_table(principal, id) -> (Artefact, pa.RecordBatchReader)``,
  ``table_schema(principal, id) -> (Artefact, pa.Schema)``, ``table_info(principal, id) ->
  (Artefact, pa.Schema, rows)`` (tables, and Parquet and Arrow-stream files:
  ``TABULAR_FILE_FORMATS``), ``content_path(principal, id)``,
  ``list(principal, ArtefactFilter, page_size=, after=) -> ArtefactPage``,
  ``delete(principal, id)``, ``share(principal, id, swarm, agent=None)`` /
  ``unshare(...)``, ``extend(principal, id, ttl_seconds)`` (above the maximum:
  ``Unprocessable``, 422), ``sweep(now) -> SweepReport``, ``usage(swarm) -> Usage``,
  ``status() -> ArtefactsStatus``, ``readable_table(principal, name)`` (the SQL guard's
  resolution of ``artefacts."<id>"``).
- Errors: ``NotFound`` (invisible or unknown id), ``PermissionDenied`` (visible, may not
  manage), ``InvalidArgument`` / ``Unprocessable`` (bad input), ``PayloadTooLarge``
  (``RESOURCE_EXHAUSTED``, HTTP 413: a limit or quota). Helpers: ``is_artefact_id``,
  ``check_name``, ``check_tags``, ``check_table_schema``, ``sql_name``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import structlog

from catalog.audit import AuditLog
from catalog.config import ArtefactsConfig
from catalog.database import ARTEFACT_SCHEMA, SYSTEM_SCHEMA, Database, quote_ident
from catalog.errors import (
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    Unprocessable,
    bounded,
)
from catalog.identity import Principal
from catalog.metrics import Metrics
from catalog.status import ArtefactsStatus
from catalog.swarms import check_swarm_name
from catalog.tables import TableRef, fold
from catalog.writes import AdminWrites

log = structlog.get_logger(__name__)

ArtefactKind = Literal["table", "file"]
KINDS: tuple[str, ...] = ("table", "file")
TABLE_MEDIA_TYPE = "application/vnd.apache.arrow.file"
TABLE_FORMAT = "arrow-ipc-file"
#: File formats read as a table (Flight ``{"kind": "artefact"}``, ``content?format=``):
#: Parquet (schema and row count from its footer) and an Arrow IPC stream. CSV and NDJSON
#: carry no schema, so they are only downloaded.
TABULAR_FILE_FORMATS = ("parquet", "arrow")
#: Rows per record batch read from a Parquet file (at most a row group is decoded at once).
PARQUET_BATCH_ROWS = 65_536
FILE_MEDIA_TYPE = "application/octet-stream"
TEMP_PREFIX = ".tmp-"

MAX_NAME_CHARS = 255
MAX_DESCRIPTION_CHARS = 4096
MAX_TAGS = 32
MAX_TAG_CHARS = 64
MAX_PAGE = 1000
_MEDIA_TYPE_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
_FORMAT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_CHUNK = 1024 * 1024


def new_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds (ids sort by creation, which keeps
    pages stable), the version and variant, and 74 random bits from ``secrets``."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


def is_artefact_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.match(value) is not None


def not_found(artefact_id: object) -> NotFound:
    """The one answer for an id that does not exist, expired, or is not visible to the caller."""
    return NotFound(f"artefact {bounded(artefact_id, 40)!r} not found (or not visible to you)")


# --- the public types -----------------------------------------------------------------------------
class Share(msgspec.Struct, frozen=True, kw_only=True):
    """A share: the whole swarm (``agent`` None) or one agent of it."""

    swarm: str
    agent: str | None = None


class Column(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: str


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Where an exported artefact came from (set by the export path; all optional)."""

    sql: str | None = None
    params: list[Any] | None = None
    principal: str | None = None
    source_versions: dict[str, int] | None = None
    parent_id: str | None = None
    # The export's own max_rows (a refresh applies it again); None: the server's cap.
    max_rows: int | None = None


@contextlib.contextmanager
def _unreadable(art: Artefact) -> Iterator[None]:
    """An Arrow error reading ``art``'s content (an upload declared ``parquet`` that is not
    one) becomes INVALID_ARGUMENT naming the artefact, never INTERNAL."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise InvalidArgument(
            f"artefact {art.id}'s content is not a readable {bounded(art.format, 64)} file: "
            f"{bounded(str(exc), 200)}"
        ) from None


def _closing_reader(
    art: Artefact, schema: pa.Schema, batches: Iterator[pa.RecordBatch], resource: Any
) -> pa.RecordBatchReader:
    """A reader of ``batches`` that closes ``resource`` (a memory map, a Parquet file) when
    the stream ends, is abandoned or fails; content found corrupt midway (an uploaded file
    whose footer is sound but a page is not) is INVALID_ARGUMENT, as at the start."""

    def stream() -> Iterator[pa.RecordBatch]:
        try:
            with _unreadable(art):
                yield from batches
        finally:
            resource.close()

    return pa.RecordBatchReader.from_batches(schema, stream())


class Artefact(msgspec.Struct, frozen=True, kw_only=True):
    """An artefact's metadata, as every listener answers it (JSON with msgspec)."""

    id: str
    name: str
    kind: ArtefactKind
    media_type: str
    format: str
    size_bytes: int
    sha256: str
    rows: int | None
    columns: list[Column] | None
    tags: list[str]
    description: str
    owner: str
    owner_kind: str
    owner_agent: str | None
    swarm: str | None
    created_at: datetime
    expires_at: datetime
    shares: list[Share]
    provenance: Provenance | None = None
    # The reference form for SQL (tables only): artefacts."<id>".
    sql_name: str | None = None
    # An export's sources changed since it ran (catalog/exports.py); None without provenance.
    # Worked out when the metadata is read (ArtefactStore.staleness), never stored.
    stale: bool | None = None


class ArtefactFilter(msgspec.Struct, frozen=True, kw_only=True):
    kind: ArtefactKind | None = None
    tag: str | None = None
    name: str | None = None  # exact name
    swarm: str | None = None  # owner's swarm
    owner: str | None = None  # the owner's label: agent:s/a, swarm:s, admin:…
    name_prefix: str | None = None  # names that start with it


class ArtefactPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Artefact]
    # Pass as ``after`` for the next page; None on the last one.
    next: str | None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    swarm: str
    bytes: int
    count: int
    quota_bytes: int
    quota_count: int


class SweepReport(msgspec.Struct, kw_only=True):
    expired: list[str] = msgspec.field(default_factory=list)
    temp_files: list[str] = msgspec.field(default_factory=list)
    orphan_content: list[str] = msgspec.field(default_factory=list)
    orphan_metadata: list[str] = msgspec.field(default_factory=list)
    # SQL copies without metadata (an upload that failed between copying and committing).
    orphan_tables: list[str] = msgspec.field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            len(self.expired)
            + len(self.temp_files)
            + len(self.orphan_content)
            + len(self.orphan_metadata)
            + len(self.orphan_tables)
        )


class _Record(msgspec.Struct, kw_only=True):
    """What the index holds per artefact: the public metadata plus the owner's instance."""

    artefact: Artefact
    swarm_id: str | None
    share_ids: dict[tuple[str, str | None], str | None]  # (swarm, agent) -> swarm instance


# --- validation -----------------------------------------------------------------------------------
def _check_text(value: object, field: str, limit: int, *, empty_ok: bool, multiline: bool = False) -> str:
    """A bounded text without control characters (a description may hold newlines and tabs)."""
    if not isinstance(value, str):
        raise InvalidArgument(f"artefact {field} must be a string")
    if not empty_ok and not value.strip():
        raise InvalidArgument(f"artefact {field} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(
            f"artefact {field} is {len(value)} characters long; at most {limit} are allowed"
        )
    allowed = "\n\t" if multiline else ""
    if any(ord(c) < 32 and c not in allowed for c in value) or "\x7f" in value:
        raise InvalidArgument(f"artefact {field} {bounded(value)!r} contains control characters")
    return value


def check_name(name: object) -> str:
    """A plain label of 1-255 characters without control characters; slashes and dots are
    allowed (it is never a path)."""
    return _check_text(name, "name", MAX_NAME_CHARS, empty_ok=False)


def check_tags(tags: object) -> list[str]:
    if not isinstance(tags, list | tuple):
        raise InvalidArgument("artefact tags must be a list of strings")
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"an artefact has at most {MAX_TAGS} tags, got {len(tags)}")
    out: list[str] = []
    for tag in tags:
        text = _check_text(tag, "tag", MAX_TAG_CHARS, empty_ok=False)
        if text not in out:
            out.append(text)
    return out


def _check_kind(kind: object) -> ArtefactKind:
    if kind == "table":
        return "table"
    if kind == "file":
        return "file"
    raise InvalidArgument(f"artefact kind {bounded(kind, 40)!r} is not valid: use 'table' or 'file'")


def _unsupported(t: pa.DataType) -> str | None:
    """Why SQL (DuckDB) cannot hold a column of type ``t``, looking inside nested types."""
    if pa.types.is_float16(t):
        return "float16 (half float): cast it to float32"
    if isinstance(t, pa.Decimal256Type) and t.precision > 38:
        return f"{t} (more than 38 digits): cast it to decimal128 or string"
    if isinstance(t, pa.Decimal256Type):
        return f"{t}: cast it to decimal128({t.precision}, {t.scale})"
    children: list[pa.DataType] = []
    if isinstance(t, pa.ListType | pa.LargeListType | pa.FixedSizeListType):
        children = [t.value_type]
    elif isinstance(t, pa.MapType):
        children = [t.key_type, t.item_type]
    elif isinstance(t, pa.StructType | pa.UnionType):
        children = [t.field(i).type for i in range(t.num_fields)]
    elif isinstance(t, pa.DictionaryType):
        children = [t.value_type]
    for child in children:
        why = _unsupported(child)
        if why is not None:
            return why
    return None


def check_table_schema(schema: object) -> pa.Schema:
    """A table artefact's schema, refused up front (before a byte is stored) when SQL could
    not hold it: no columns, or a type DuckDB does not read."""
    if not isinstance(schema, pa.Schema):
        raise InvalidArgument("a table artefact needs its Arrow schema")
    if len(schema) == 0:
        raise InvalidArgument("a table artefact needs at least one column")
    for f in schema:
        why = _unsupported(f.type)
        if why is not None:
            raise InvalidArgument(f"column {bounded(f.name, 60)!r} has a type tables cannot hold: {why}")
    return schema


def _columns(schema: pa.Schema) -> list[Column]:
    return [Column(name=f.name, type=str(f.type)) for f in schema]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Sink:
    """The file object under the IPC writer (and under raw writes): counts and hashes every
    byte on its way to the temporary file, and refuses the byte that passes a limit."""

    def __init__(self, f: IO[bytes], check: Callable[[int], None]) -> None:
        self._f = f
        self._check = check
        self.size = 0
        self.digest = hashlib.sha256()
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._check(self.size + len(view))
        self._f.write(view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        # pyarrow closes its sink when the IPC writer closes; the store closes the file.
        self.closed = True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size


class ArtefactWriter:
    """One artefact being written (see the module docs). Not thread-safe: one writer per
    upload. Use as a context manager: an exception aborts it; leaving the block without
    :meth:`commit` aborts it too."""

    def __init__(  # noqa: PLR0913  the writer holds one upload's whole context, given once by begin_write
        self,
        store: ArtefactStore,
        principal: Principal,
        *,
        artefact_id: str,
        kind: ArtefactKind,
        name: str,
        media_type: str,
        fmt: str,
        tags: list[str],
        description: str,
        ttl_seconds: int,
        schema: pa.Schema | None,
        provenance: Provenance | None,
    ) -> None:
        self.store = store
        self.principal = principal
        self.id = artefact_id
        self.kind = kind
        self.name = name
        self.media_type = media_type
        self.format = fmt
        self.tags = tags
        self.description = description
        self.ttl_seconds = ttl_seconds
        self.schema = schema
        self.provenance = provenance
        self.rows = 0
        self.temp_path = store.directory / f"{TEMP_PREFIX}{artefact_id}-{secrets.token_hex(4)}"
        # Registered before the file exists: the janitor never takes it for a leftover.
        store._writer_started(self)
        try:
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            store._writer_done(self)
            raise
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._sink = _Sink(self._file, self._check_size)
        self._ipc: ipc.RecordBatchFileWriter | None = None
        self._done = False
        self._over: PayloadTooLarge | None = None
        if kind == "table":
            if schema is None:
                self._discard()
                raise InvalidArgument("a table artefact needs its Arrow schema")
            try:
                self._ipc = ipc.new_file(self._sink, schema)
            except (pa.ArrowException, OSError) as e:
                self._discard()
                raise InvalidArgument(
                    f"the table's schema cannot be written: {bounded(str(e), 200)}"
                ) from None

    # --- streaming ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        sink: _Sink | None = getattr(self, "_sink", None)  # None until the file is open
        return sink.size if sink is not None else 0

    def _check_size(self, size: int) -> None:
        refusal = self.store._over_limit(self.principal, size, streaming=self)
        if refusal is not None:
            self._over = refusal
            raise refusal

    def _fail(self, exc: BaseException) -> None:
        self.abort()
        if self._over is not None:
            raise self._over from None
        raise exc

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes to a file artefact."""
        self._require_open()
        if self.kind != "file":
            self.abort()
            raise InvalidArgument("a table artefact takes record batches, not bytes")
        try:
            self._sink.write(data)
        except BaseException as e:  # noqa: BLE001 - aborted, then re-raised whatever it was
            self._fail(e)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        """Append one record batch to a table artefact; a batch of another schema aborts the
        upload (nothing is kept)."""
        self._require_open()
        if self._ipc is None or self.schema is None:
            self.abort()
            raise InvalidArgument("a file artefact takes bytes, not record batches")
        if not batch.schema.equals(self.schema):
            self.abort()
            raise InvalidArgument(
                "the upload changed its schema midway (a batch's schema differs from the first); "
                "nothing was kept: send one schema per artefact"
            )
        try:
            self._check_size(self._sink.size + batch.nbytes)
            self._ipc.write_batch(batch)
        except pa.ArrowInvalid as e:
            # What the client sent cannot be one IPC file: a dictionary-encoded column whose
            # dictionary changed between batches is the case in practice.
            self._fail(
                InvalidArgument(
                    f"the batch cannot be stored ({bounded(str(e), 160)}); a dictionary-encoded column "
                    "must keep one dictionary for the whole upload (pyarrow: table.unify_dictionaries()) "
                    "or be sent decoded. Nothing was kept"
                )
            )
        except BaseException as e:  # noqa: BLE001 - aborted, then re-raised whatever it was
            self._fail(e)
        self.rows += batch.num_rows

    def write_table(self, table: pa.Table) -> None:
        for batch in table.to_batches():
            self.write_batch(batch)

    def _require_open(self) -> None:
        if self._done:
            raise InvalidArgument("this artefact upload is already committed or aborted")

    # --- the end -------------------------------------------------------------------------------
    def commit(self) -> Artefact:
        """Make the artefact durable and visible (see the module docs), or raise and keep
        nothing."""
        self._require_open()
        try:
            if self._ipc is not None:
                self._ipc.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except BaseException as e:  # noqa: BLE001 - aborted, then re-raised whatever it was
            self._fail(e)
        try:
            artefact = self.store._commit(self)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.store._writer_done(self)
        return artefact

    def abort(self) -> None:
        """Discard everything written; safe to call more than once."""
        if self._done:
            return
        self._done = True
        self._discard()

    def _discard(self) -> None:
        with contextlib.suppress(Exception):
            if self._ipc is not None:
                self._ipc.close()
        with contextlib.suppress(Exception):
            self._file.close()
        self.temp_path.unlink(missing_ok=True)
        self.store._writer_done(self)

    def __enter__(self) -> ArtefactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class ArtefactStore:
    def __init__(
        self,
        db: Database,
        config: ArtefactsConfig,
        directory: Path,
        writes: AdminWrites,
        *,
        swarm_instance: Callable[[str], str | None],
        audit: AuditLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._db = db
        self.config = config
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        self.writes = writes
        self._swarm_instance = swarm_instance
        self._audit = audit
        self._metrics = metrics
        self._index: dict[str, _Record] = {}
        # Writers still running (id -> temporary file): the janitor leaves their temporary
        # file and their SQL table alone.
        self._active: dict[str, ArtefactWriter] = {}
        self._active_lock = threading.Lock()
        # Fills in ``stale`` of exported artefacts as their metadata is read (set by the
        # catalog to catalog/exports.py's ``annotate``): get() and list() answer through it.
        self.staleness: Callable[[list[Artefact]], list[Artefact]] | None = None
        # Held while content files are unlinked, and by a backup while it freezes content
        # beside its database copy (catalog/backup.py): a backup never misses the content of
        # an artefact its metadata holds.
        self.content_lock = threading.RLock()
        self._load()

    # --- loading ------------------------------------------------------------------------------
    _COLUMNS = (
        "id, name, kind, media_type, format, size_bytes, sha256, rows, arrow_schema, tags, description, "
        "owner, owner_kind, owner_agent, swarm, swarm_id, created_at, expires_at, prov_sql, prov_params, "
        "prov_principal, prov_versions, parent_id, prov_max_rows"
    )

    def _load(self) -> None:
        with self.writes.lock, self._db.reading() as cur:
            rows = cur.execute(f"SELECT {self._COLUMNS} FROM {SYSTEM_SCHEMA}.artefacts").fetchall()
            shares = cur.execute(
                f"SELECT artefact_id, swarm, swarm_id, agent FROM {SYSTEM_SCHEMA}.artefact_shares "
                "ORDER BY created_at"
            ).fetchall()
            index = {r[0]: self._record(r) for r in rows}
            for aid, swarm, swarm_id, agent in shares:
                rec = index.get(aid)
                if rec is not None:
                    rec.share_ids[(swarm, agent)] = swarm_id
            for rec in index.values():
                rec.artefact = self._with_shares(rec)
            self._index = index

    @staticmethod
    def _record(row: tuple[Any, ...]) -> _Record:
        (aid, name, kind, media_type, fmt, size, sha, rows, schema_ipc, tags, description, owner, owner_kind,
         owner_agent, swarm, swarm_id, created, expires, p_sql, p_params, p_principal, p_versions,
         parent, p_max_rows) = row  # fmt: skip
        columns = None
        if schema_ipc is not None:
            columns = _columns(ipc.read_schema(pa.py_buffer(bytes(schema_ipc))))
        provenance = None
        if any(v is not None for v in (p_sql, p_params, p_principal, p_versions, parent)):
            provenance = Provenance(
                sql=p_sql,
                params=msgspec.json.decode(p_params) if p_params else None,
                principal=p_principal,
                source_versions=msgspec.json.decode(p_versions) if p_versions else None,
                parent_id=parent,
                max_rows=None if p_max_rows is None else int(p_max_rows),
            )
        artefact = Artefact(
            id=aid,
            name=name,
            kind=kind,
            media_type=media_type,
            format=fmt,
            size_bytes=int(size),
            sha256=sha,
            rows=None if rows is None else int(rows),
            columns=columns,
            tags=list(tags or []),
            description=description,
            owner=owner,
            owner_kind=owner_kind,
            owner_agent=owner_agent,
            swarm=swarm,
            created_at=created.astimezone(UTC),
            expires_at=expires.astimezone(UTC),
            shares=[],
            provenance=provenance,
            sql_name=sql_name(aid) if kind == "table" else None,
        )
        return _Record(artefact=artefact, swarm_id=swarm_id, share_ids={})

    @staticmethod
    def _with_shares(rec: _Record) -> Artefact:
        shares = [Share(swarm=s, agent=a) for s, a in rec.share_ids]
        return msgspec.structs.replace(rec.artefact, shares=shares)

    # --- visibility -----------------------------------------------------------------------------
    @staticmethod
    def _sees(principal: Principal, rec: _Record, now: datetime) -> bool:
        if rec.artefact.expires_at <= now:
            return False
        if principal.is_admin:
            return True
        swarm = principal.swarm
        if swarm is None or principal.is_metrics:
            return False
        art = rec.artefact
        if art.swarm == swarm and _same_instance(rec.swarm_id, principal.swarm_id):
            return True
        for (s, agent), sid in rec.share_ids.items():
            if s != swarm or not _same_instance(sid, principal.swarm_id):
                continue
            if agent is None or (principal.kind == "agent" and principal.agent == agent):
                return True
        return False

    @staticmethod
    def _manages(principal: Principal, rec: _Record) -> bool:
        if principal.is_admin:
            return True
        art = rec.artefact
        if (
            art.swarm is None
            or art.swarm != principal.swarm
            or not _same_instance(rec.swarm_id, principal.swarm_id)
        ):
            return False
        if principal.kind == "swarm":
            return True
        return art.owner_kind == "agent" and principal.kind == "agent" and principal.agent == art.owner_agent

    def _visible(self, principal: Principal, artefact_id: object) -> _Record:
        key = artefact_id.lower() if isinstance(artefact_id, str) else artefact_id
        if not is_artefact_id(key):
            raise not_found(artefact_id)
        assert isinstance(key, str)
        rec = self._index.get(key)
        if rec is None or not self._sees(principal, rec, datetime.now(UTC)):
            raise not_found(artefact_id)
        return rec

    def _managed(self, principal: Principal, artefact_id: object, what: str) -> _Record:
        rec = self._visible(principal, artefact_id)
        if not self._manages(principal, rec):
            raise PermissionDenied(
                f"you may read artefact {rec.artefact.id} but not {what} it: only its owner, "
                "its swarm's swarm token and admins may"
            )
        return rec

    # --- reading -----------------------------------------------------------------------------------
    def get(self, principal: Principal, artefact_id: str) -> Artefact:
        """The artefact's metadata, or NOT_FOUND when it does not exist, expired or is not
        visible to ``principal`` (the same answer, so existence never leaks)."""
        return self._annotated([self._visible(principal, artefact_id).artefact])[0]

    def _annotated(self, items: list[Artefact]) -> list[Artefact]:
        if self.staleness is None or not any(a.provenance is not None for a in items):
            return items
        return self.staleness(items)

    def content_path(self, principal: Principal, artefact_id: str) -> tuple[Artefact, Path]:
        rec = self._visible(principal, artefact_id)
        return rec.artefact, self.directory / rec.artefact.id

    def open_content(self, principal: Principal, artefact_id: str) -> tuple[Artefact, IO[bytes]]:
        """The metadata and an open binary file of the content (the caller closes it). An
        open file stays readable when the artefact is deleted meanwhile."""
        art, path = self.content_path(principal, artefact_id)
        try:
            return art, open(path, "rb")
        except FileNotFoundError:
            raise not_found(artefact_id) from None

    def _tabular(self, principal: Principal, artefact_id: str) -> tuple[Artefact, Path, str]:
        """The artefact, its content path and how its rows are stored: ``"table"`` (an Arrow
        IPC file), or a file in one of :data:`TABULAR_FILE_FORMATS` (an export or an upload
        declared so). Visibility is :meth:`content_path`'s (NOT_FOUND when not visible)."""
        art, path = self.content_path(principal, artefact_id)
        if art.kind == "table":
            return art, path, "table"
        if art.format in TABULAR_FILE_FORMATS:
            return art, path, art.format
        raise InvalidArgument(
            f"artefact {art.id} is a file (format {bounded(art.format, 64)}, {bounded(art.media_type, 100)}), "
            f"not a table: only tables and {' and '.join(TABULAR_FILE_FORMATS)} files are read as "
            "tables; download its content instead"
        )

    def table_info(self, principal: Principal, artefact_id: str) -> tuple[Artefact, pa.Schema, int]:
        """A tabular artefact's Arrow schema and row count: from the IPC or Parquet file's
        footer, or an Arrow stream's messages."""
        art, path, how = self._tabular(principal, artefact_id)
        try:
            if how == "parquet":
                with _unreadable(art), pq.ParquetFile(str(path), memory_map=True) as parquet:
                    return art, parquet.schema_arrow, parquet.metadata.num_rows
            with pa.memory_map(str(path), "r") as source, _unreadable(art):
                if how == "arrow":
                    # A stream has no footer: count its batches' rows (memory-mapped, the
                    # buffers are never copied or decoded).
                    stream = ipc.open_stream(source)
                    return art, stream.schema, sum(batch.num_rows for batch in stream)
                return art, ipc.open_file(source).schema, art.rows or 0
        except FileNotFoundError:
            raise not_found(artefact_id) from None

    def table_schema(self, principal: Principal, artefact_id: str) -> tuple[Artefact, pa.Schema]:
        """A tabular artefact's Arrow schema (:meth:`table_info`)."""
        art, schema, _ = self.table_info(principal, artefact_id)
        return art, schema

    def open_table(self, principal: Principal, artefact_id: str) -> tuple[Artefact, pa.RecordBatchReader]:
        """A tabular artefact as a stream of its record batches, read as they are sent: a
        table's memory-mapped IPC file, a Parquet file a row group's batches at a time, an
        Arrow stream from a memory map — nothing is loaded up front, so memory stays bounded
        by a batch whatever the size. The file is closed when the stream ends."""
        art, path, how = self._tabular(principal, artefact_id)
        try:
            if how == "parquet":
                with _unreadable(art):
                    parquet = pq.ParquetFile(str(path), memory_map=True)
                batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
                return art, _closing_reader(art, parquet.schema_arrow, batches, parquet)
            source = pa.memory_map(str(path), "r")
        except FileNotFoundError:
            raise not_found(artefact_id) from None
        try:
            with _unreadable(art):
                if how == "arrow":
                    stream = ipc.open_stream(source)
                    return art, _closing_reader(art, stream.schema, iter(stream), source)
                reader = ipc.open_file(source)
        except BaseException:
            source.close()
            raise
        parts = (reader.get_batch(i) for i in range(reader.num_record_batches))
        return art, _closing_reader(art, reader.schema, parts, source)

    def list(
        self,
        principal: Principal,
        filters: ArtefactFilter | None = None,
        *,
        page_size: int = 100,
        after: str | None = None,
    ) -> ArtefactPage:
        """The artefacts ``principal`` may see, oldest first (ids sort by creation), one page
        at a time: pass the page's ``next`` as ``after``."""
        if not isinstance(page_size, int) or not 1 <= page_size <= MAX_PAGE:
            raise InvalidArgument(f"page size must be 1 to {MAX_PAGE}")
        if after is not None and not is_artefact_id(after):
            raise InvalidArgument(
                f"'after' {bounded(after, 40)!r} is not an artefact id from a previous page"
            )
        f = filters or ArtefactFilter()
        now = datetime.now(UTC)
        found = []
        for aid in sorted(self._index):
            if after is not None and aid <= after:
                continue
            rec = self._index.get(aid)
            if rec is None or not self._sees(principal, rec, now):
                continue
            art = rec.artefact
            if (
                (f.kind is not None and art.kind != f.kind)
                or (f.tag is not None and f.tag not in art.tags)
                or (f.name is not None and art.name != f.name)
                or (f.swarm is not None and art.swarm != f.swarm)
                or (f.name_prefix is not None and not art.name.startswith(f.name_prefix))
                or (f.owner is not None and art.owner != f.owner)
            ):
                continue
            found.append(art)
            if len(found) > page_size:
                break
        more = len(found) > page_size
        items = self._annotated(found[:page_size])
        return ArtefactPage(items=items, next=items[-1].id if more else None)

    def readable_table(self, principal: Principal, name: str) -> TableRef | None:
        """``artefacts."<name>"`` for the SQL guard and the policy: the table when ``name`` is
        the id of a tabular artefact ``principal`` may see, else None (the caller answers
        exactly as for a missing table)."""
        aid = fold(name)
        rec = self._index.get(aid)
        if rec is None or rec.artefact.kind != "table" or not self._sees(principal, rec, datetime.now(UTC)):
            return None
        return TableRef(ARTEFACT_SCHEMA, aid)

    def usage(self, swarm: str) -> Usage:
        size, count = self._usage_of(swarm)
        return Usage(
            swarm=swarm,
            bytes=size,
            count=count,
            quota_bytes=self.config.swarm_quota_bytes,
            quota_count=self.config.swarm_quota_count,
        )

    def _usage_of(self, swarm: str) -> tuple[int, int]:
        """Bytes and count of the swarm's live artefacts: those of its current instance (a
        swarm deleted and re-created under its name starts from zero) that have not expired
        (expired ones, invisible already and soon swept, do not count against its quota)."""
        size = count = 0
        now = datetime.now(UTC)
        instance = self._swarm_instance(swarm)
        for rec in list(self._index.values()):
            art = rec.artefact
            if art.swarm == swarm and art.expires_at > now and _same_instance(rec.swarm_id, instance):
                size += rec.artefact.size_bytes
                count += 1
        return size, count

    # --- writing -------------------------------------------------------------------------------
    def begin_write(  # noqa: PLR0913  the artefact's metadata, keyword-only
        self,
        principal: Principal,
        kind: str,
        name: str,
        *,
        schema: pa.Schema | None = None,
        media_type: str | None = None,
        format: str | None = None,
        tags: Sequence[str] = (),
        description: str = "",
        ttl_seconds: int | None = None,
        provenance: Provenance | None = None,
    ) -> ArtefactWriter:
        """Start an upload (see the module docs). Everything a client sent is checked here,
        before a byte is written: kind, name, tags, description, media type, TTL, and the
        swarm's artefact count."""
        if principal.is_metrics or (not principal.is_admin and principal.swarm is None):
            raise PermissionDenied("this token may not save artefacts")
        k = _check_kind(kind)
        name = check_name(name)
        tag_list = check_tags(list(tags) if isinstance(tags, tuple) else tags)
        description = _check_text(
            description, "description", MAX_DESCRIPTION_CHARS, empty_ok=True, multiline=True
        )
        ttl = self._check_ttl(self.config.default_ttl_seconds if ttl_seconds is None else ttl_seconds)
        if k == "table":
            if media_type not in (None, TABLE_MEDIA_TYPE) or format not in (None, TABLE_FORMAT):
                raise InvalidArgument(
                    f"a table artefact is stored as {TABLE_MEDIA_TYPE} ({TABLE_FORMAT}); "
                    "leave media_type and format unset"
                )
            schema = check_table_schema(schema)
            mt, fmt = TABLE_MEDIA_TYPE, TABLE_FORMAT
        else:
            if schema is not None:
                raise InvalidArgument("a file artefact has no Arrow schema")
            mt = media_type if media_type is not None else FILE_MEDIA_TYPE
            if not isinstance(mt, str) or not _MEDIA_TYPE_RE.match(mt):
                raise InvalidArgument(f"media type {bounded(mt, 60)!r} is not valid: use type/subtype")
            fmt = format if format is not None else "binary"
            if not isinstance(fmt, str) or not _FORMAT_RE.match(fmt):
                raise InvalidArgument(
                    f"format {bounded(fmt, 60)!r} is not valid: 1-64 characters of letters, digits, '_.+-'"
                )
        if principal.swarm is not None and not principal.is_admin:
            _, count = self._usage_of(principal.swarm)
            if count + 1 > self.config.swarm_quota_count:
                raise PayloadTooLarge(self._quota_detail(principal.swarm, "count", 0))
        writer = ArtefactWriter(
            self,
            principal,
            artefact_id=new_id(),
            kind=k,
            name=name,
            media_type=mt,
            fmt=fmt,
            tags=tag_list,
            description=description,
            ttl_seconds=ttl,
            schema=schema,
            provenance=provenance,
        )
        return writer

    def _writer_started(self, writer: ArtefactWriter) -> None:
        with self._active_lock:
            self._active[writer.id] = writer

    def _writer_done(self, writer: ArtefactWriter) -> None:
        with self._active_lock:
            self._active.pop(writer.id, None)

    def _check_ttl(self, ttl: object) -> int:
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1:
            raise InvalidArgument("ttl_seconds must be a whole number of seconds, at least 1")
        if ttl > self.config.max_ttl_seconds:
            raise Unprocessable(
                f"ttl_seconds {ttl} is above the maximum of {self.config.max_ttl_seconds} "
                "([artefacts] max_ttl_seconds); nothing was changed"
            )
        return ttl

    def _in_flight(self, swarm: str, besides: ArtefactWriter) -> int:
        """Bytes the swarm's other running uploads have written so far: they count while
        streaming, so parallel uploads cannot each fill the disk up to the quota."""
        with self._active_lock:
            writers = list(self._active.values())
        return sum(
            w.size
            for w in writers
            if w is not besides and not w.principal.is_admin and w.principal.swarm == swarm
        )

    def _quota_detail(self, swarm: str, which: str, size: int, in_flight: int = 0) -> str:
        used, count = self._usage_of(swarm)
        cfg = self.config
        if which == "count":
            return (
                f"swarm {swarm!r} already keeps {count} artefacts, the most [artefacts] swarm_quota_count "
                f"({cfg.swarm_quota_count}) allows; delete some first. Nothing was kept"
            )
        running = f", and its other uploads in progress hold {in_flight} more" if in_flight else ""
        return (
            f"this upload ({size} bytes so far) would take swarm {swarm!r} to {used + in_flight + size} bytes, "
            f"above [artefacts] swarm_quota_bytes ({cfg.swarm_quota_bytes}); it uses {used} bytes in {count} "
            f"artefacts now{running}. Nothing was kept"
        )

    def _over_limit(
        self, principal: Principal, size: int, *, streaming: ArtefactWriter | None = None
    ) -> PayloadTooLarge | None:
        """The refusal for an upload of ``size`` bytes, or None. While ``streaming``, the
        swarm's other running uploads count too; at commit only what is kept counts (the
        others may still fail)."""
        cfg = self.config
        if size > cfg.max_upload_bytes:
            return PayloadTooLarge(
                f"the upload passed [artefacts] max_upload_bytes ({cfg.max_upload_bytes} bytes per "
                "artefact); nothing was kept"
            )
        if principal.swarm is not None and not principal.is_admin:
            used, _ = self._usage_of(principal.swarm)
            in_flight = self._in_flight(principal.swarm, streaming) if streaming is not None else 0
            if used + in_flight + size > cfg.swarm_quota_bytes:
                return PayloadTooLarge(self._quota_detail(principal.swarm, "bytes", size, in_flight))
        return None

    def _commit(self, w: ArtefactWriter) -> Artefact:
        p = w.principal
        now = datetime.now(UTC)
        sha = w._sink.digest.hexdigest()
        size = w.size
        schema_ipc = w.schema.serialize().to_pybytes() if w.schema is not None else None
        owner_kind = "admin" if p.is_admin else p.kind
        swarm = None if p.is_admin else p.swarm
        swarm_id = None if p.is_admin else p.swarm_id
        prov = w.provenance
        final = self.directory / w.id
        row = [
            w.id,
            w.name,
            w.kind,
            w.media_type,
            w.format,
            size,
            sha,
            w.rows if w.kind == "table" else None,
            schema_ipc,
            w.tags,
            w.description,
            p.label,
            owner_kind,
            p.agent if p.kind == "agent" else None,
            swarm,
            swarm_id,
            now,
            now + timedelta(seconds=w.ttl_seconds),
            prov.sql if prov else None,
            msgspec.json.encode(prov.params).decode() if prov and prov.params is not None else None,
            prov.principal if prov else None,
            msgspec.json.encode(prov.source_versions).decode()
            if prov and prov.source_versions is not None
            else None,
            prov.parent_id if prov else None,
            prov.max_rows if prov else None,
        ]

        def insert(cur: duckdb.DuckDBPyConnection) -> None:
            cur.execute(
                f"INSERT INTO {SYSTEM_SCHEMA}.artefacts ({self._COLUMNS}) VALUES ({', '.join('?' * len(row))})",
                row,
            )

        refusal = self._commit_refusal(p, size)
        if refusal is not None:
            raise refusal
        if w.kind == "table":
            # Before the admin-write lock: copying a large table takes a while, and admin
            # writes (token mints among them) must not wait for it. Nobody can name the table
            # until its metadata commits; the janitor drops it if that never happens.
            self._load_sql_copy(w.id, w.temp_path)
        try:
            with self.writes.lock:
                # Checked again under the lock: two uploads of one swarm racing to the last
                # bytes of its quota cannot both be kept.
                refusal = self._commit_refusal(p, size)
                if refusal is not None:
                    raise refusal
                os.replace(w.temp_path, final)
                _fsync_dir(self.directory)
                try:
                    self.writes.run("save the artefact", insert)
                except BaseException:
                    final.unlink(missing_ok=True)
                    raise
                rec = self._record(tuple(row))
                self._index[w.id] = rec
                artefact = rec.artefact
        except BaseException:
            if w.kind == "table":
                self._drop_sql_copy(w.id)
            raise
        log.info(
            "artefact.saved",
            artefact=w.id,
            kind=w.kind,
            bytes=size,
            rows=artefact.rows,
            owner=p.label,
        )
        if self._audit is not None:
            self._audit.record("artefact.create", outcome="ok", actor=p.label, target=w.id)
        return artefact

    def _commit_refusal(self, p: Principal, size: int) -> PayloadTooLarge | None:
        refusal = self._over_limit(p, size)
        if refusal is None and p.swarm is not None and not p.is_admin:
            _, count = self._usage_of(p.swarm)
            if count + 1 > self.config.swarm_quota_count:
                refusal = PayloadTooLarge(self._quota_detail(p.swarm, "count", size))
        return refusal

    def _load_sql_copy(self, artefact_id: str, path: Path) -> None:
        """Copy a tabular artefact into ``artefacts."<id>"`` in a transaction of its own.
        Quiver reads the IPC file itself (memory-mapped) and hands DuckDB the Arrow stream;
        the locked-down database never opens a file."""
        source = pa.memory_map(str(path), "r")
        try:
            reader = ipc.open_file(source)
            stream = pa.RecordBatchReader.from_batches(
                reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
            )
            view = f"quiver_artefact_load_{secrets.token_hex(6)}"
            try:
                with self._db.transaction() as cur:
                    cur.register(view, stream)
                    try:
                        cur.execute(f"CREATE TABLE {sql_name(artefact_id)} AS SELECT * FROM {view}")
                    finally:
                        cur.unregister(view)
            except (
                duckdb.InvalidInputException,
                duckdb.NotImplementedException,
                duckdb.ConversionException,
            ) as e:
                raise InvalidArgument(
                    f"the table cannot be loaded for SQL ({bounded(str(e), 200)}); nothing was kept"
                ) from None
        finally:
            source.close()

    def _drop_sql_copy(self, artefact_id: str) -> None:
        try:
            with self._db.transaction() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {sql_name(artefact_id)}")
        except duckdb.Error as e:  # the janitor drops it later
            log.warning("artefact.drop_failed", artefact=artefact_id, error=str(e)[:200])

    def _sql_tables(self) -> Sequence[str]:
        with self._db.reading() as cur:
            rows = cur.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "AND schema_name = ?",
                [ARTEFACT_SCHEMA],
            ).fetchall()
        return [str(r[0]) for r in rows]

    # --- managing ------------------------------------------------------------------------------
    def delete(self, principal: Principal, artefact_id: str) -> None:
        rec = self._managed(principal, artefact_id, "delete")
        with self.writes.lock:
            self._still_live(rec.artefact.id, artefact_id)
            self._remove([rec.artefact.id], "delete the artefact")
        self._unlink([rec.artefact.id])
        log.info("artefact.deleted", artefact=rec.artefact.id, actor=principal.label)
        if self._audit is not None:
            self._audit.record("artefact.delete", outcome="ok", actor=principal.label, target=rec.artefact.id)

    def _still_live(self, aid: str, artefact_id: object) -> _Record:
        """The record of ``aid`` for a write, checked again under the admin-write lock: a
        write that was let through while the artefact was live, then waited for the lock,
        must not touch it if it was deleted, swept or expired meanwhile (an expired artefact
        is never extended back to life, nor re-shared). Callers hold the lock."""
        current = self._index.get(aid)
        if current is None or current.artefact.expires_at <= datetime.now(UTC):
            raise not_found(artefact_id)
        return current

    def _remove(self, ids: Sequence[str], what: str) -> None:
        """Metadata, shares and SQL copies of ``ids`` in one transaction, then the index.
        Callers hold the admin-write lock and unlink the content afterwards."""

        def drop(cur: duckdb.DuckDBPyConnection) -> None:
            for aid in ids:
                cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.artefact_shares WHERE artefact_id = ?", [aid])
                cur.execute(f"DELETE FROM {SYSTEM_SCHEMA}.artefacts WHERE id = ?", [aid])
                cur.execute(f"DROP TABLE IF EXISTS {sql_name(aid)}")

        self.writes.run(what, drop)
        for aid in ids:
            self._index.pop(aid, None)

    def _unlink(self, ids: Sequence[str]) -> None:
        with self.content_lock:
            for aid in ids:
                (self.directory / aid).unlink(missing_ok=True)

    def share(self, principal: Principal, artefact_id: str, swarm: str, agent: str | None = None) -> Artefact:
        """Let another swarm (``agent`` None) or one agent of a swarm read the artefact.
        Sharing again is a no-op."""
        rec = self._managed(principal, artefact_id, "share")
        swarm, agent = self._check_share_target(swarm, agent)
        instance = self._swarm_instance(swarm)
        if instance is None:
            raise NotFound(f"swarm {bounded(swarm)!r} does not exist; nothing was shared")
        aid = rec.artefact.id
        with self.writes.lock:
            current = self._still_live(aid, artefact_id)
            if current.share_ids.get((swarm, agent), "") == instance:
                return current.artefact

            def insert(cur: duckdb.DuckDBPyConnection) -> None:
                cur.execute(
                    f"DELETE FROM {SYSTEM_SCHEMA}.artefact_shares WHERE artefact_id = ? AND swarm = ? "
                    "AND agent IS NOT DISTINCT FROM ?",
                    [aid, swarm, agent],
                )
                cur.execute(
                    f"INSERT INTO {SYSTEM_SCHEMA}.artefact_shares VALUES (?, ?, ?, ?, ?, ?)",
                    [aid, swarm, instance, agent, datetime.now(UTC), principal.label],
                )

            self.writes.run("share the artefact", insert)
            # Replaced, never mutated: readers iterate the shares without a lock.
            current.share_ids = {**current.share_ids, (swarm, agent): instance}
            current.artefact = self._with_shares(current)
            out = current.artefact
        if self._audit is not None:
            target = f"{aid} -> {swarm}" + (f"/{agent}" if agent else "")
            self._audit.record("artefact.share", outcome="ok", actor=principal.label, target=target)
        return out

    def unshare(
        self, principal: Principal, artefact_id: str, swarm: str, agent: str | None = None
    ) -> Artefact:
        """Withdraw a share (NOT_FOUND when there is no such share; nothing changes)."""
        rec = self._managed(principal, artefact_id, "unshare")
        swarm, agent = self._check_share_target(swarm, agent)
        aid = rec.artefact.id
        with self.writes.lock:
            current = self._still_live(aid, artefact_id)
            if (swarm, agent) not in current.share_ids:
                who = swarm + (f"/{agent}" if agent else "")
                raise NotFound(f"artefact {aid} is not shared with {bounded(who)!r}; nothing was changed")

            def remove(cur: duckdb.DuckDBPyConnection) -> None:
                cur.execute(
                    f"DELETE FROM {SYSTEM_SCHEMA}.artefact_shares WHERE artefact_id = ? AND swarm = ? "
                    "AND agent IS NOT DISTINCT FROM ?",
                    [aid, swarm, agent],
                )

            self.writes.run("unshare the artefact", remove)
            current.share_ids = {k: v for k, v in current.share_ids.items() if k != (swarm, agent)}
            current.artefact = self._with_shares(current)
            out = current.artefact
        if self._audit is not None:
            self._audit.record("artefact.unshare", outcome="ok", actor=principal.label, target=aid)
        return out

    @staticmethod
    def _check_share_target(swarm: object, agent: object) -> tuple[str, str | None]:
        name = check_swarm_name(swarm)  # type: ignore[arg-type]
        if agent is not None:
            agent = _check_text(agent, "share's agent", 128, empty_ok=False)
        return name, agent

    def extend(self, principal: Principal, artefact_id: str, ttl_seconds: int) -> Artefact:
        """Expire the artefact ``ttl_seconds`` from now (above ``max_ttl_seconds``: 422,
        nothing changed)."""
        rec = self._managed(principal, artefact_id, "extend")
        ttl = self._check_ttl(ttl_seconds)
        aid = rec.artefact.id
        expires = datetime.now(UTC) + timedelta(seconds=ttl)
        with self.writes.lock:
            current = self._still_live(aid, artefact_id)
            self.writes.run(
                "extend the artefact",
                lambda cur: cur.execute(
                    f"UPDATE {SYSTEM_SCHEMA}.artefacts SET expires_at = ? WHERE id = ?", [expires, aid]
                ),
            )
            current.artefact = msgspec.structs.replace(current.artefact, expires_at=expires)
            out = current.artefact
        if self._audit is not None:
            self._audit.record("artefact.extend", outcome="ok", actor=principal.label, target=aid)
        return out

    # --- the janitor -----------------------------------------------------------------------------
    def sweep(self, now: datetime | None = None) -> SweepReport:  # noqa: C901  one pass over four kinds of leftovers, each a short branch
        """Remove expired artefacts and every orphan (see the module docs); returns what was
        removed. Serialized with commits by the admin-write lock, so content that a commit
        has just renamed is never mistaken for an orphan."""
        now = now or datetime.now(UTC)
        report = SweepReport()
        with self.writes.lock:
            expired = sorted(aid for aid, rec in self._index.items() if rec.artefact.expires_at <= now)
            present = set()
            for entry in os.scandir(self.directory):
                name = entry.name
                if name.startswith(TEMP_PREFIX):
                    path = Path(entry.path)
                    with self._active_lock:
                        running = any(w.temp_path == path for w in self._active.values())
                    if not running:
                        path.unlink(missing_ok=True)
                        report.temp_files.append(name)
                elif name in self._index:
                    present.add(name)
                elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    Path(entry.path).unlink(missing_ok=True)
                    report.orphan_content.append(name)
            missing = sorted(aid for aid in self._index if aid not in present and aid not in expired)
            gone = expired + missing
            # Tables listed before the running writers: a writer that starts after the listing
            # has no table in it.
            tables = self._sql_tables()
            with self._active_lock:
                writing = set(self._active)
            stray = sorted(t for t in tables if t not in self._index and t not in writing)
            if gone or stray:
                self._remove(gone + stray, "remove expired and orphaned artefacts")
            report.orphan_tables = stray
            report.expired = expired
            report.orphan_metadata = missing
        self._unlink(expired)
        if report.total:
            log.info(
                "artefact.swept",
                expired=len(report.expired),
                temp_files=len(report.temp_files),
                orphan_content=len(report.orphan_content),
                orphan_metadata=len(report.orphan_metadata),
                orphan_tables=len(report.orphan_tables),
            )
            if self._metrics is not None:
                counter = self._metrics.artefacts_removed
                for reason, items in (
                    ("expired", report.expired),
                    ("temp_file", report.temp_files),
                    ("orphan_content", report.orphan_content),
                    ("orphan_metadata", report.orphan_metadata),
                    ("orphan_table", report.orphan_tables),
                ):
                    if items:
                        counter.labels(reason).inc(len(items))
            if self._audit is not None:
                for reason, items in (
                    ("expired", report.expired),
                    ("orphan_content", report.orphan_content),
                    ("orphan_metadata", report.orphan_metadata),
                ):
                    for aid in items:
                        self._audit.record(
                            "artefact.sweep", outcome="ok", actor="janitor", target=aid, detail=reason
                        )
        return report

    def run_sweep(self) -> None:
        """The janitor thread's pass: a failure is logged and retried next time."""
        try:
            self.sweep()
        except Exception as e:  # noqa: BLE001 - the janitor must never kill its thread
            log.warning("artefact.sweep_failed", error=str(e)[:300])

    def status(self) -> ArtefactsStatus:
        """GET /v1/status "artefacts": what is kept and what is being uploaded."""
        records = list(self._index.values())
        with self._active_lock:
            uploading = len(self._active)
        return ArtefactsStatus(
            count=len(records),
            bytes=sum(r.artefact.size_bytes for r in records),
            tables=sum(1 for r in records if r.artefact.kind == "table"),
            uploading=uploading,
        )

    def content_ids(self) -> Sequence[str]:
        """Ids whose content is committed now (for backups)."""
        return sorted(self._index)


def _same_instance(recorded: str | None, held: str | None) -> bool:
    """An artefact of a swarm deleted and re-created under its name is not the new swarm's."""
    return recorded is None or held is None or recorded == held


def sql_name(artefact_id: str) -> str:
    """The documented SQL reference form of a tabular artefact: ``artefacts."<id>"``."""
    return f"{ARTEFACT_SCHEMA}.{quote_ident(artefact_id)}"
