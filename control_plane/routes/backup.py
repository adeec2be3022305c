"""Backups (admin): a consistent snapshot of the catalog and data files, taken while serving.

The snapshot is written into ``[backup] dir`` on the server's own disk — never a path
chosen by the caller — and the deployment's backup timer ships it elsewhere.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Router, get, post
from litestar.di import NamedDependency

from catalog import Catalog, Principal
from catalog.backup import SnapshotInfo, create_snapshot, list_snapshots
from control_plane.context import ADMIN, audited


class SnapshotEntry(msgspec.Struct, kw_only=True):
    """One archive of ``catalog.backup.list_snapshots`` (which answers plain dicts)."""

    name: str
    path: str
    bytes: int


class SnapshotList(msgspec.Struct, kw_only=True):
    directory: str
    snapshots: list[SnapshotEntry]


@post(
    "/v1/backup",
    sync_to_thread=True,
    tags=["backup"],
    status_code=201,
    summary="Take a snapshot now (database, signing key, artefacts) into [backup] dir",
)
def create_backup(
    request: Request[Principal, Any, Any],
    catalog: NamedDependency[Catalog],
) -> SnapshotInfo:
    with audited(request, "backup.create", str(catalog.config.backup_dir)):
        return create_snapshot(catalog)


@get("/v1/backups", sync_to_thread=True, tags=["backup"], summary="Snapshots in [backup] dir, newest first")
def list_backups(catalog: NamedDependency[Catalog]) -> SnapshotList:
    directory = catalog.config.backup_dir
    return SnapshotList(
        directory=str(directory),
        snapshots=msgspec.convert(list_snapshots(directory), list[SnapshotEntry]),
    )


ROUTER = Router("/", guards=[ADMIN], route_handlers=[create_backup, list_backups])
