"""Exports: a query's result streamed into a file artefact, with its provenance; refresh
re-runs it.

An export (the Flight action ``export``, proto_docs/actions.md) runs agent SQL through the
data plane's one query path (:class:`~catalog.query_port.QueryRunner`: guard, admission slot,
timeout, row cap) and hands the batches, as DuckDB produces them, to a
:class:`~catalog.formats.ResultWriter` writing Parquet, CSV, NDJSON or an Arrow IPC stream
into the artefact store's temporary file (catalog/artefacts.py): nothing is materialised, so a
result larger than memory is exported in the memory of a batch or two. The artefact becomes
visible only when the whole result is written (the store's commit); a failure, a limit or a
refusal keeps nothing.

Provenance (proto_docs/artefacts.md, "Provenance"): the artefact records the SQL as the
caller sent it, its parameters, the principal that ran it (its subject) and the data version
(``_quiver.data_versions``) of every table the query read, taken before it ran. An artefact is
*stale* when one of those tables has a newer version now. Refresh re-runs the recorded SQL as
the same principal — the caller must be it — under that principal's **current** allowlist (the
guard runs again: a table no longer readable is PERMISSION_DENIED and nothing is created) into
a new artefact whose ``parent_id`` is the old one, in the same format; the old one is left as
it was.

Used by the Flight server (flight_server/server.py: ``export``, ``refresh-artefact``) and the
control plane (``POST /v1/artefacts/{id}/refresh``); both reach it as ``catalog.exports``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog

from catalog.artefacts import Artefact, ArtefactStore, ArtefactWriter, Provenance
from catalog.database import SYSTEM_SCHEMA, Database
from catalog.errors import InvalidArgument, PermissionDenied, QuiverError
from catalog.formats import FORMATS, ResultFormat, ResultWriter, RowCapInfo, by_name, check_schema
from catalog.identity import Principal
from catalog.query_port import QueryRunner
from catalog.tables import fold

log = structlog.get_logger(__name__)

EXPORT_FORMATS = ("parquet", "csv", "ndjson", "arrow")


def content_path(artefact_id: str) -> str:
    """Where the control plane serves an artefact's bytes."""
    return f"/v1/artefacts/{artefact_id}/content"


class ExportInfo(msgspec.Struct, kw_only=True):
    """What ``export`` and ``refresh`` answer: the artefact's metadata, where to download it,
    whether its sources changed since, and (for an export just made) its rows and cut."""

    artefact: Artefact
    download: str
    stale: bool | None
    #: Source tables whose data version moved on since the export ran.
    changed: list[str]
    rows: int | None = None
    truncated: bool | None = None
    max_rows: int | None = None


class _ArtefactSink:
    """A file object over an :class:`ArtefactWriter` for pyarrow's writers (they ask where
    they are, and close their sink when they close)."""

    def __init__(self, writer: ArtefactWriter) -> None:
        self._writer = writer
        self._written = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._writer.write(view)
        self._written += len(view)
        return len(view)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True  # the store closes the file at commit


class Exports:
    def __init__(self, store: ArtefactStore, db: Database, runner: Callable[[], QueryRunner]) -> None:
        self._store = store
        self._db = db
        self._runner = runner

    # --- export ---------------------------------------------------------------------------------
    def export(  # noqa: PLR0913  the export's options, keyword-only, passed through from one body
        self,
        principal: Principal,
        sql: str,
        params: Sequence[Any] = (),
        *,
        format: str = "parquet",
        name: str | None = None,
        ttl_seconds: int | None = None,
        max_rows: int | None = None,
        tags: Sequence[str] = (),
        description: str = "",
        parent_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        timeout_seconds: float | None = None,
        via: str | None = None,
    ) -> ExportInfo:
        """Run ``sql`` into a new file artefact (see the module docs). ``progress`` is told
        the rows and bytes written after every batch (it may raise to stop the export:
        nothing is kept); ``timeout_seconds`` replaces the query timeout (async exports).
        ``via``: the runner records the run in the query log as an ``export`` under that
        label (catalog/query_port.py); None: the caller records it (the Flight actions)."""
        fmt = _export_format(format)
        label = name if name is not None else f"export{fmt.suffix}"
        # The artefact is begun first: its name, tags, TTL and the swarm's quota are refused
        # before any query work; the provenance is filled in once the query has started.
        with self._store.begin_write(
            principal,
            "file",
            label,
            media_type=fmt.media_type,
            format=fmt.name,
            tags=tags,
            description=description,
            ttl_seconds=ttl_seconds,
        ) as upload:
            running = self._runner().run(
                principal, sql, params, max_rows, timeout_seconds=timeout_seconds, via=via, kind="export"
            )
            writer: ResultWriter | None = None
            try:
                check_schema(fmt, running.schema)
                upload.provenance = Provenance(
                    sql=sql,
                    params=list(params),
                    principal=principal.subject,
                    source_versions=dict(running.versions),
                    parent_id=parent_id,
                    max_rows=max_rows,
                )
                writer = ResultWriter(fmt, running.schema, _ArtefactSink(upload))
                for batch in running.reader:
                    writer.write(batch)
                    if progress is not None:
                        progress(writer.rows, upload.size)
                cut = bool(running.cut())
                writer.finish(RowCapInfo(running.max_rows, running.reason, cut))
            except BaseException as e:  # the run's record says how it ended (a stop by progress too)
                running.failed(e.code if isinstance(e, QuiverError) else "INTERNAL")
                raise
            finally:
                running.sent(writer.rows if writer is not None else 0, upload.size)
                running.close()
            artefact = upload.commit()
        assert writer is not None  # the with block left through an exception otherwise
        log.info(
            "artefact.exported",
            artefact=artefact.id,
            format=fmt.name,
            rows=writer.rows,
            bytes=artefact.size_bytes,
            truncated=cut,
            parent=parent_id,
        )
        # Stale already if a source changed while the export ran (its versions were read first).
        changed = self.changed_sources(artefact) or []
        artefact = msgspec.structs.replace(artefact, stale=bool(changed))
        return ExportInfo(
            artefact=artefact,
            download=content_path(artefact.id),
            stale=bool(changed),
            changed=changed,
            rows=writer.rows,
            truncated=cut,
            max_rows=running.max_rows,
        )

    # --- provenance -------------------------------------------------------------------------------
    def changed_sources(self, artefact: Artefact) -> list[str] | None:
        """The source tables whose data version is newer now than when ``artefact`` was
        exported (a dropped table counts as changed); None when it has no provenance."""
        prov = artefact.provenance
        if prov is None or prov.source_versions is None:
            return None
        if not prov.source_versions:
            return []
        return _changed(prov.source_versions, self._versions())

    def _versions(self) -> dict[tuple[str, str], int]:
        with self._db.reading() as cur:
            rows = cur.execute(
                f"SELECT schema_name, table_name, version FROM {SYSTEM_SCHEMA}.data_versions"
            ).fetchall()
        return {(fold(s), fold(t)): int(v) for s, t, v in rows}

    def annotate(self, artefacts: list[Artefact]) -> list[Artefact]:
        """``artefacts`` with ``stale`` filled in where they have provenance (the data
        versions are read once for all of them): the store's ``staleness`` hook."""
        now: dict[tuple[str, str], int] | None = None
        out = []
        for a in artefacts:
            if a.provenance is not None and a.provenance.source_versions is not None:
                now = self._versions() if now is None else now
                changed = _changed(a.provenance.source_versions, now)
                a = msgspec.structs.replace(a, stale=bool(changed))
            out.append(a)
        return out

    def describe(self, artefact: Artefact) -> ExportInfo:
        """An artefact's metadata with its download path and whether it is stale."""
        changed = self.changed_sources(artefact)
        if changed is not None:
            artefact = msgspec.structs.replace(artefact, stale=bool(changed))
        return ExportInfo(
            artefact=artefact,
            download=content_path(artefact.id),
            stale=None if changed is None else bool(changed),
            changed=changed or [],
        )

    # --- refresh ----------------------------------------------------------------------------------
    def refresh(
        self,
        principal: Principal,
        artefact_id: str,
        *,
        ttl_seconds: int | None = None,
        via: str | None = None,
    ) -> ExportInfo:
        """Re-run an export's SQL as its principal, under its current allowlist, into a new
        artefact linked to the old one (see the module docs); ``via`` as for :meth:`export`."""
        old = self._store.get(principal, artefact_id)  # NOT_FOUND for an artefact not visible
        prov = old.provenance
        if prov is None or prov.sql is None:
            raise InvalidArgument(
                f"artefact {artefact_id} was not exported from a query, so it has nothing to "
                "re-run; only exports (the export action) can be refreshed"
            )
        if prov.principal != principal.subject:
            raise PermissionDenied(
                f"artefact {artefact_id} was exported by another principal; a refresh re-runs its "
                "query as that principal, so only it may refresh it"
            )
        fmt = FORMATS.get(old.format)
        if fmt is None or fmt.name not in EXPORT_FORMATS:
            raise InvalidArgument(f"artefact {artefact_id} is not in an export format")
        info = self.export(
            principal,
            prov.sql,
            prov.params or [],
            format=fmt.name,
            name=old.name,
            ttl_seconds=ttl_seconds,
            max_rows=prov.max_rows,
            tags=old.tags,
            description=old.description,
            parent_id=old.id,
            via=via,
        )
        return info


def _changed(recorded: dict[str, int], now: dict[tuple[str, str], int]) -> list[str]:
    """The tables of ``recorded`` ("schema.table" → version) whose version is not the one
    recorded now (a newer one, or none: dropped)."""
    out = []
    for table, version in sorted(recorded.items()):
        schema, _, name = table.partition(".")
        if now.get((fold(schema), fold(name))) != version:
            out.append(table)
    return out


def _export_format(name: str) -> ResultFormat:
    if name not in EXPORT_FORMATS:
        raise InvalidArgument(
            f"field 'format': {name[:40]!r} is not an export format; use one of: {', '.join(EXPORT_FORMATS)}"
        )
    return by_name(name)
