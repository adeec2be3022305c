"""Backups and restores of a Quiver data directory.

A snapshot is one ``quiver-<UTC time>.tar.gz`` holding everything a restore needs:

- ``database/<name>.duckdb``: the whole DuckDB catalog (data tables and the ``_quiver``
  system schema: swarms, allowlists, token records, audit, data versions), copied by
  :meth:`Database.snapshot` in one transaction while the server keeps serving;
- ``files/…``: every other file of the data directory — the signing key (without it every
  token issued before the backup would be invalid after a restore), the key of hash masks
  (without it every masked value would change), the admin token —
  frozen by hard links right after the database copy, so a file replaced or deleted while
  the archive is written is still archived whole; artefact content (``artefacts/<id>``)
  for exactly the artefacts whose metadata the database copy holds, frozen while the
  artefact store unlinks nothing (its ``content_lock``), so a restore has neither metadata
  without content nor content without metadata;
- ``manifest.json`` (last): format, Quiver version, migrations, tables with row counts,
  and the size and SHA-256 of every member.

Left out: process-local directories -- DuckDB's spill space (``tmp``), async query results
(``results``) and the result cache (``cache``), whose index lives in memory and whose files
Quiver deletes at start-up -- the backups themselves, and dot-names (staging areas, partial
files, the state a restore set aside).

With ``[backup] encryption_key_file`` set, the archive is written encrypted as it is
produced, ``quiver-<UTC time>.tar.gz.enc`` (AES-256-GCM in authenticated records, format in
catalog/snapshot_crypto.py); a restore recognises such a file by its first bytes and first
decrypts it whole into its private staging area, so a wrong key, a truncated or a tampered
file is refused before anything is unpacked. Plaintext snapshots restore as before.

A restore is checked completely before anything is touched — the archive reads, every
member matches its checksum, no member escapes the data directory, the database opens
and has the row counts of the manifest, and its migrations are ones this Quiver knows —
and refuses while a server holds the database. Only then is the current state moved
aside into ``DATA_DIR/.pre-restore-<time>/`` (kept, never deleted) and the snapshot put
in its place. A bad snapshot therefore changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tarfile
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

import duckdb
import msgspec
import structlog

from catalog.config import Config
from catalog.core import SNAPSHOT_STAGING, VERSION, Catalog
from catalog.database import SYSTEM_SCHEMA, _migrations, quote_ident
from catalog.errors import DatabaseInUse, InvalidArgument, NotFound
from catalog.snapshot_crypto import ENC_SUFFIX, EncryptingWriter, decrypt_file, is_encrypted, load_key

log = structlog.get_logger(__name__)

FORMAT = "quiver-snapshot/1"
MANIFEST = "manifest.json"
DB_DIR = "database"
FILES_DIR = "files"
SUFFIX = ".tar.gz"
CHUNK = 1 << 20
# Artefact content (catalog/artefacts.py): archived for exactly the artefacts whose metadata
# the database copy holds, never by walking the directory (see _artefact_files).
ARTEFACTS_DIR = "artefacts"
# Process-local directories, meaningless in a restore: DuckDB's spill space, and the async
# query results and result cache, whose index lives in memory (Quiver deletes their files
# at start-up).
_SKIP_TOP = {"tmp", "results", "cache"}


class MemberInfo(msgspec.Struct, kw_only=True):
    path: str
    bytes: int
    sha256: str


class Manifest(msgspec.Struct, kw_only=True):
    format: str
    quiver_version: str
    created_at: datetime
    database: str
    migrations: list[int]
    tables: dict[str, int]
    members: list[MemberInfo]


class SnapshotInfo(msgspec.Struct, kw_only=True):
    """What ``POST /v1/backup`` and ``quiver backup`` answer."""

    path: str
    name: str
    bytes: int
    sha256: str
    created_at: datetime
    tables: int
    rows: int
    files: int


class RestoreReport(msgspec.Struct, kw_only=True):
    snapshot: str
    created_at: datetime
    database: str
    tables: int
    rows: int
    files: int
    previous_state: str | None


# --- taking a snapshot -------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Feeds tarfile while computing the SHA-256 of what it reads."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.digest.update(data)
        return data


def _table_rows(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    rows: dict[str, int] = {}
    names = con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() "
        "WHERE database_name = current_database() ORDER BY ALL"
    ).fetchall()
    for schema, table in names:
        counted = con.execute(f"SELECT count(*) FROM {quote_ident(schema)}.{quote_ident(table)}").fetchall()
        rows[f"{schema}.{table}"] = int(counted[0][0])
    return rows


def _migration_versions(con: duckdb.DuckDBPyConnection) -> list[int]:
    found = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = 'schema_migrations'",
        [SYSTEM_SCHEMA],
    ).fetchall()
    if not found[0][0]:
        raise InvalidArgument(f"the snapshot's database has no {SYSTEM_SCHEMA}.schema_migrations table")
    got = con.execute(f"SELECT version FROM {SYSTEM_SCHEMA}.schema_migrations ORDER BY version").fetchall()
    return [int(v) for (v,) in got]


def _data_files(data_dir: Path, skip: set[Path]) -> Iterator[Path]:
    """Regular files of the data directory worth restoring, as paths relative to it."""
    for root, dirs, files in os.walk(data_dir):
        here = Path(root)
        rel_root = here.relative_to(data_dir)
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".")
            and (here / d).resolve() not in skip
            and not (rel_root == Path(".") and (d in _SKIP_TOP or d == ARTEFACTS_DIR))
        )
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or path.resolve() in skip or not path.is_file() or path.is_symlink():
                continue
            yield path.relative_to(data_dir)


def _artefact_ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Ids of the artefacts the snapshot's database holds (none before migration 0005)."""
    found = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = 'artefacts'",
        [SYSTEM_SCHEMA],
    ).fetchall()
    if not found[0][0]:
        return []
    rows = con.execute(f"SELECT id FROM {SYSTEM_SCHEMA}.artefacts ORDER BY id").fetchall()
    return [str(r[0]) for r in rows]


def _freeze(src: Path, dst: Path) -> bool:
    """Hard-link (or, across file systems, copy) one file into the staging area; False if
    it vanished meanwhile (an artefact deleted between listing and freezing)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            shutil.copy2(src, dst)
        except FileNotFoundError:
            return False
    return True


def _partial_of(archive: Path) -> Path:
    return archive.with_name("." + archive.name + ".partial")


def _reserve_archive(out_dir: Path, suffix: str) -> tuple[Path, Path]:
    """Choose the archive's name and claim it: its partial file is created exclusively
    (0600), so two backups in the same second (concurrent ``POST /v1/backup``) never pick
    the same name and the second never replaces the first. The name is re-checked after
    the claim, which closes the gap where another backup published it meanwhile."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    n = 0
    while True:
        archive = out_dir / (f"quiver-{stamp}{suffix}" if n == 0 else f"quiver-{stamp}-{n}{suffix}")
        n += 1
        partial = _partial_of(archive)
        if archive.exists():
            continue
        try:
            os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        if archive.exists():
            partial.unlink(missing_ok=True)
            continue
        return archive, partial


@contextlib.contextmanager
def _archive_writer(partial: Path, key: bytes | None) -> Iterator[tarfile.TarFile]:
    """A gzip'd tar written to ``partial`` (claimed, 0600, by :func:`_reserve_archive`),
    through an :class:`EncryptingWriter` when there is a key: the plaintext never reaches
    the disk."""
    fd = os.open(partial, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as raw:
        if key is None:
            with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=6) as tar:
                yield tar
        else:
            writer = EncryptingWriter(raw, key)
            with tarfile.open(fileobj=writer, mode="w:gz", compresslevel=6) as tar:
                yield tar
            writer.close()
        raw.flush()
        os.fsync(raw.fileno())


def _add(tar: tarfile.TarFile, path: Path, arcname: str) -> MemberInfo:
    info = tar.gettarinfo(str(path), arcname)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        tar.addfile(info, reader)
    return MemberInfo(path=arcname, bytes=info.size, sha256=reader.digest.hexdigest())


def create_snapshot(catalog: Catalog, out_dir: Path | None = None) -> SnapshotInfo:
    """Write a snapshot archive of ``catalog``'s data directory into ``out_dir`` (default
    ``[backup] dir``) and return what was written. Safe while the server serves.

    Every attempt, however it was asked for (``POST /v1/backup``, ``quiver backup``), ends in
    the backup metrics and the "backup" section of ``/v1/status`` (catalog/metrics.py), so a
    failing nightly backup is visible, not silent."""
    try:
        info = _create_snapshot(catalog, out_dir)
    except BaseException as e:
        catalog.backups.record("failed", error=getattr(e, "detail", None) or str(e) or type(e).__name__)
        raise
    catalog.backups.record("ok", snapshot=info.name)
    return info


def _create_snapshot(catalog: Catalog, out_dir: Path | None) -> SnapshotInfo:
    config = catalog.config
    out_dir = (out_dir or config.backup_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = catalog.data_dir
    key_file = config.backup_key_file
    # Read first: a missing or malformed key fails the backup before any work is done.
    key = load_key(key_file) if key_file is not None else None
    staging = data_dir / SNAPSHOT_STAGING / f"files-{os.getpid()}-{time.monotonic_ns()}"
    archive, partial = _reserve_archive(out_dir, SUFFIX + ENC_SUFFIX if key is not None else SUFFIX)
    db_name = config.database_path.name
    started = time.perf_counter()
    created_at = datetime.now(UTC)
    try:
        # Artefact content is unlinked only outside this lock (catalog/artefacts.py), and it
        # is held from before the database copy until the content of every artefact the copy
        # holds is frozen: a restore never has metadata without its content.
        with catalog.artefacts.content_lock, catalog.db.snapshot() as db_copy:
            # Verify the copy on its own before archiving it: it opens, and its tables and
            # migrations are what the manifest will promise.
            with contextlib.closing(duckdb.connect(str(db_copy), read_only=True)) as check:
                tables = _table_rows(check)
                migrations = _migration_versions(check)
                artefact_ids = _artefact_ids(check)
            skip = {
                out_dir,
                config.database_path,
                config.database_path.with_name(db_name + ".wal"),
                (data_dir / SNAPSHOT_STAGING).resolve(),
            }
            skip = {p.resolve() for p in skip}
            frozen: list[tuple[Path, str]] = []
            for rel in _data_files(data_dir, skip):
                if _freeze(data_dir / rel, staging / rel):
                    frozen.append((staging / rel, f"{FILES_DIR}/{rel.as_posix()}"))
            for aid in artefact_ids:
                rel = Path(ARTEFACTS_DIR) / aid
                if not _freeze(data_dir / rel, staging / rel):
                    # Removed behind Quiver's back: the restored janitor drops the metadata.
                    log.warning("backup.artefact_content_missing", artefact=aid)
                    continue
                frozen.append((staging / rel, f"{FILES_DIR}/{rel.as_posix()}"))
            members: list[MemberInfo] = []
            with _archive_writer(partial, key) as tar:
                members.append(_add(tar, db_copy, f"{DB_DIR}/{db_name}"))
                for path, arcname in frozen:
                    members.append(_add(tar, path, arcname))
                manifest = Manifest(
                    format=FORMAT,
                    quiver_version=VERSION,
                    created_at=created_at,
                    database=db_name,
                    migrations=migrations,
                    tables=tables,
                    members=members,
                )
                body = msgspec.json.format(msgspec.json.encode(manifest), indent=2)
                info = tarfile.TarInfo(MANIFEST)
                info.size = len(body)
                info.mtime = int(created_at.timestamp())
                info.mode = 0o600
                tar.addfile(info, io.BytesIO(body))
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        catalog.db.tidy_snapshot_dir()
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    result = SnapshotInfo(
        path=str(archive),
        name=archive.name,
        bytes=archive.stat().st_size,
        sha256=digest.hexdigest(),
        created_at=created_at,
        tables=len(tables),
        rows=sum(tables.values()),
        files=len(members) - 1,
    )
    log.info(
        "backup.created",
        path=result.path,
        bytes=result.bytes,
        tables=result.tables,
        rows=result.rows,
        files=result.files,
        encrypted=key is not None,
        ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return result


def list_snapshots(directory: Path) -> list[dict[str, Any]]:
    """Snapshot archives in ``directory``, newest first (by name, which is the UTC time)."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.name.startswith("quiver-") and (p.name.endswith(SUFFIX) or p.name.endswith(SUFFIX + ENC_SUFFIX))
    ]
    return [
        {"name": p.name, "path": str(p), "bytes": p.stat().st_size}
        for p in sorted(found, key=lambda p: p.name, reverse=True)
    ]


# --- restoring ---------------------------------------------------------------------------------


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise InvalidArgument(f"not a Quiver snapshot: member {name!r} points outside the data directory")
    return path


def _read_manifest(tar: tarfile.TarFile) -> Manifest:
    try:
        member = tar.getmember(MANIFEST)
    except KeyError:
        raise InvalidArgument(f"not a Quiver snapshot: it has no {MANIFEST}") from None
    extracted = tar.extractfile(member)
    if extracted is None:
        raise InvalidArgument(f"not a Quiver snapshot: {MANIFEST} is not a file")
    try:
        manifest = msgspec.json.decode(extracted.read(), type=Manifest)
    except msgspec.DecodeError as e:
        raise InvalidArgument(f"not a Quiver snapshot: {MANIFEST} is invalid: {e}") from None
    if manifest.format != FORMAT:
        raise InvalidArgument(
            f"unsupported snapshot format {manifest.format!r}; this Quiver reads {FORMAT!r}"
        )
    return manifest


def _unpack(archive: Path, into: Path) -> Manifest:
    """Extract and verify every member; raise InvalidArgument on any mismatch."""
    try:
        tar = tarfile.open(archive, "r:gz")  # noqa: SIM115 - closed by the `with tar` below
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InvalidArgument(f"not a Quiver snapshot: {archive} is not a readable .tar.gz ({e})") from None
    with tar:
        try:
            manifest = _read_manifest(tar)
            expected = {m.path: m for m in manifest.members}
            seen: set[str] = set()
            for member in tar:
                if member.name == MANIFEST:
                    continue
                if member.name not in expected:
                    raise InvalidArgument(
                        f"not a Quiver snapshot: member {member.name!r} is not in the manifest"
                    )
                if not member.isfile():
                    raise InvalidArgument(
                        f"not a Quiver snapshot: member {member.name!r} is not a regular file"
                    )
                rel = _safe_member(member.name)
                target = into.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                digest = hashlib.sha256()
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                want = expected[member.name]
                if digest.hexdigest() != want.sha256 or target.stat().st_size != want.bytes:
                    raise InvalidArgument(f"snapshot is corrupt: {member.name} does not match its checksum")
                seen.add(member.name)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise InvalidArgument(f"snapshot is corrupt or truncated: {e}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise InvalidArgument(f"snapshot is incomplete: missing {', '.join(missing)}")
    return manifest


def _check_database(path: Path, manifest: Manifest) -> None:
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise InvalidArgument(f"snapshot is corrupt: its database does not open ({e})") from None
    with contextlib.closing(con):
        try:
            tables = _table_rows(con)
            migrations = _migration_versions(con)
        except duckdb.Error as e:
            raise InvalidArgument(f"snapshot is corrupt: its database cannot be read ({e})") from None
    if tables != manifest.tables:
        raise InvalidArgument("snapshot is corrupt: its tables or row counts differ from the manifest")
    known = {v for v, _, _ in _migrations()}
    unknown = sorted(set(migrations) - known)
    if unknown:
        raise InvalidArgument(
            f"snapshot was taken by a newer Quiver (migrations {unknown} are unknown here); "
            "upgrade Quiver before restoring it"
        )


def _ensure_not_in_use(database: Path) -> None:
    """Refuse while a server holds the database: another process holds its file lock; a
    server in this process (tests) shows as a cached instance or a locked configuration."""
    if not database.exists():
        return
    message = f"{database} is in use: stop `quiver serve` first"
    try:
        con = duckdb.connect(str(database))
    except duckdb.ConnectionException:
        raise DatabaseInUse(message) from None
    except duckdb.Error as e:
        if "lock" in str(e).lower():
            raise DatabaseInUse(message) from None
        # A damaged current database is exactly what a restore is for: it is set aside.
        log.warning("backup.current_database_unreadable", error=str(e))
        return
    with contextlib.closing(con):
        if con.execute("SELECT current_setting('lock_configuration')").fetchall() == [(True,)]:
            raise DatabaseInUse(message)


def _owner_of(path: Path) -> tuple[int, int] | None:
    """When root restores, restored files go to the data directory's owner (the service
    user), not to root."""
    if os.geteuid() != 0:
        return None
    st = path.stat()
    return st.st_uid, st.st_gid


def _check_layout(staging: Path, manifest: Manifest, data_dir: Path, backup_dir: Path) -> None:
    """The unpacked snapshot must fit the data directory without overwriting what a
    restore keeps (backups, dot-names, the spill directory)."""
    if PurePosixPath(manifest.database).name != manifest.database or manifest.database.startswith("."):
        raise InvalidArgument(f"not a Quiver snapshot: bad database name {manifest.database!r}")
    if not (staging / DB_DIR / manifest.database).is_file():
        raise InvalidArgument("snapshot is incomplete: it holds no database")
    for entry in _top_level(staging):
        if entry.name not in (DB_DIR, FILES_DIR):
            raise InvalidArgument(f"not a Quiver snapshot: unexpected member {entry.name!r}")
    for entry in _top_level(staging / DB_DIR):
        if entry.name != manifest.database:
            raise InvalidArgument(f"not a Quiver snapshot: unexpected member {DB_DIR}/{entry.name}")
    for entry in _top_level(staging / FILES_DIR):
        if (
            entry.name.startswith(".")
            or entry.name in _SKIP_TOP
            or (data_dir / entry.name).resolve() == backup_dir.resolve()
        ):
            raise InvalidArgument(f"not a Quiver snapshot: it would overwrite {entry.name!r}")


def restore_snapshot(config: Config, archive: Path) -> RestoreReport:
    """Replace the data directory of ``config`` with the snapshot ``archive``.

    The server must be stopped. Nothing is changed unless the whole snapshot verifies."""
    archive = archive.expanduser().resolve()
    if not archive.is_file():
        raise NotFound(f"snapshot not found: {archive}")
    data_dir = config.data_dir
    database = config.database_path
    _ensure_not_in_use(database)
    data_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    staging = data_dir / f".restore-{stamp}-{os.getpid()}"
    staging.mkdir(mode=0o700)
    try:
        if is_encrypted(archive):
            key_file = config.backup_key_file
            if key_file is None:
                raise InvalidArgument(
                    f"{archive.name} is an encrypted snapshot: set [backup] encryption_key_file "
                    "to the key it was written with"
                )
            # Decrypted whole (and so authenticated whole) before anything is unpacked.
            plain = staging / ".decrypted.tar.gz"
            decrypt_file(archive, plain, load_key(key_file))
            manifest = _unpack(plain, staging)
            plain.unlink()
        else:
            manifest = _unpack(archive, staging)
        _check_layout(staging, manifest, data_dir, config.backup_dir)
        staged_db = staging / DB_DIR / manifest.database
        _check_database(staged_db, manifest)
        # Everything verified: set the current state aside, then move the snapshot in.
        owner = _owner_of(data_dir)
        previous = data_dir / f".pre-restore-{stamp}"
        moved = _set_aside(data_dir, database, previous, config.backup_dir)
        try:
            restored = []
            for entry in _top_level(staging / FILES_DIR):
                os.replace(entry, data_dir / entry.name)
                restored.append(data_dir / entry.name)
            database.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staged_db), str(database))
            restored.append(database)
            for path in restored:
                _chown_tree(path, owner)
        except OSError:
            log.error("backup.restore_failed", previous_state=str(previous))
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not moved:
        with contextlib.suppress(OSError):
            previous.rmdir()
    report = RestoreReport(
        snapshot=str(archive),
        created_at=manifest.created_at,
        database=str(database),
        tables=len(manifest.tables),
        rows=sum(manifest.tables.values()),
        files=len(manifest.members) - 1,
        previous_state=str(previous) if moved else None,
    )
    log.info("backup.restored", snapshot=report.snapshot, previous_state=report.previous_state)
    return report


def _top_level(root: Path) -> list[Path]:
    return sorted(root.iterdir()) if root.is_dir() else []


def _chown_tree(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    os.chown(path, *owner)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), *owner)


def _set_aside(data_dir: Path, database: Path, previous: Path, backup_dir: Path) -> int:
    """Move the current state (database, WAL, data files) into ``previous``; return how
    many entries moved. Backups, dot-names and DuckDB's spill directory stay."""
    previous.mkdir(mode=0o700, exist_ok=True)
    moved = 0
    keep = {backup_dir.resolve(), previous.resolve()}
    for path in (database, database.with_name(database.name + ".wal")):
        if path.exists():
            shutil.move(str(path), str(previous / path.name))
            moved += 1
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith(".") or entry.name in _SKIP_TOP or entry.resolve() in keep:
            continue
        os.replace(entry, previous / entry.name)
        moved += 1
    return moved
