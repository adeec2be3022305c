"""``quiver backup`` and ``quiver restore``: the operator's side of catalog.backup.

``quiver backup`` works whether or not the server runs. Stopped, it opens the database
itself. Running (DuckDB lets one process hold the file), it asks the server's control
plane (``POST /v1/backup`` with the admin token from the data directory), because only the
serving process can take a consistent copy then; the archive lands in ``[backup] dir`` and
is moved to ``--output`` when another directory was asked for. This is what the
deployment's backup timer calls, so the TLS case matters: on the VM the control plane
speaks TLS only, with a certificate for the public name, and the CLI calls it on the
loopback address while checking the certificate against that name. Finding, verifying and
authenticating to the server is quiver/local_client.py's job, shared with the other commands.

With ``[backup] encryption_key_file`` set, both paths write ``quiver-<time>.tar.gz.enc`` and
``quiver restore`` decrypts it with the same key (catalog/snapshot_crypto.py); every refusal,
a wrong key included, is one line ending in "nothing was changed".
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import httpx
import msgspec

from catalog import Catalog, Config, DatabaseInUse, InvalidArgument, NotFound
from catalog.backup import SnapshotInfo, create_snapshot, restore_snapshot
from quiver.local_client import LocalServer, control_plane_target

__all__ = ["backup_via_server", "cmd_backup", "cmd_restore", "control_plane_target"]


def backup_via_server(
    config: Config, *, url: str | None, token_file: Path | None, output: Path | None
) -> SnapshotInfo:
    """``POST /v1/backup`` on this data directory's running server (identity checked before
    the admin token is sent, see quiver/local_client.py), then move the archive to ``output``."""
    # A large database takes a while to copy and compress: no read timeout.
    timeout = httpx.Timeout(10.0, read=None)
    with LocalServer(config, url=url, token_file=token_file, timeout=timeout) as server:
        response = server.request("POST", "/v1/backup")
    info = msgspec.json.decode(response.content, type=SnapshotInfo)
    if output is not None:
        output = output.expanduser().resolve()
        current = Path(info.path)
        if current.parent != output:
            output.mkdir(parents=True, exist_ok=True)
            moved = output / current.name
            partial = output / f".{current.name}.partial"
            shutil.copy2(current, partial)
            partial.replace(moved)
            current.unlink()
            info = msgspec.structs.replace(info, path=str(moved))
    return info


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    output = Path(args.output) if args.output else None
    if not config.database_path.exists():
        raise NotFound(f"no database at {config.database_path}: nothing to back up")
    try:
        catalog = Catalog(config)
    except DatabaseInUse:
        token_file = Path(args.token_file) if args.token_file else None
        info = backup_via_server(config, url=args.url, token_file=token_file, output=output)
        how = "through the running server"
    else:
        try:
            info = create_snapshot(catalog, output)
        finally:
            catalog.close()
        how = "directly (server stopped)"
    print(info.path)
    print(
        f"snapshot {info.name}: {info.bytes} bytes, {info.tables} tables, {info.rows} rows, "
        f"{info.files} files, sha256 {info.sha256}, taken {how}",
        file=sys.stderr,
    )
    return 0


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    try:
        report = restore_snapshot(config, Path(args.snapshot))
    except DatabaseInUse as e:
        print(f"quiver: {e}; nothing was changed", file=sys.stderr)
        return 1
    except (InvalidArgument, NotFound) as e:
        print(f"quiver: {e.detail}; nothing was changed", file=sys.stderr)
        return 1
    print(
        f"restored {report.snapshot} (taken {report.created_at.isoformat()}): {report.tables} tables, "
        f"{report.rows} rows, {report.files} files into {report.database}"
    )
    if report.previous_state:
        print(f"the previous state was kept in {report.previous_state} (delete it when satisfied)")
    return 0
