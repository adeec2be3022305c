"""``quiver backup`` and ``quiver restore``: the operator's side of catalog.backup.

``quiver backup`` works whether or not the server runs. Stopped, it opens the database
itself. Running (DuckDB lets one process hold the file), it asks the server's control
plane (``POST /v1/backup`` with the admin token from the data directory), because only the
serving process can take a consistent copy then; the archive lands in ``[backup] dir`` and
is moved to ``--output`` when another directory was asked for. This is what the
deployment's backup timer calls, so the TLS case matters: on the VM the control plane
speaks TLS only, with a certificate for the public name, and the CLI calls it on the
loopback address while checking the certificate against that name.
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec

from catalog import Catalog, Config, DatabaseInUse, InvalidArgument, NotFound, Unavailable
from catalog.backup import SnapshotInfo, create_snapshot, restore_snapshot


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")  # noqa: S104 - comparing, not binding


def control_plane_target(config: Config) -> tuple[str, str | None]:
    """The URL of this host's own control plane and the TLS name to verify it by."""
    server = config.server
    host = server.host
    if _wildcard(host):
        host = "::1" if host == "::" else "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    if not config.tls.enabled:
        return f"http://{shown}:{server.http_port}", None
    name = server.advertise_host
    if name is None:
        try:
            ipaddress.ip_address(host)
            name = "localhost"
        except ValueError:
            name = host
    return f"https://{shown}:{server.http_port}", name


def _tls_context(config: Config) -> ssl.SSLContext:
    """System trust plus the server's own certificate file as an anchor, so a self-signed
    certificate is trusted as well as a Let's Encrypt one."""
    context = ssl.create_default_context()
    if config.tls.cert_file:
        context.load_verify_locations(cafile=str(Path(config.tls.cert_file).expanduser()))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def backup_via_server(
    config: Config, *, url: str | None, token_file: Path | None, output: Path | None
) -> SnapshotInfo:
    target_url, tls_name = control_plane_target(config)
    if url is not None:
        target_url, tls_name = url.rstrip("/"), None
    token_path = token_file or config.data_dir / "admin.token"
    try:
        token = token_path.read_text().strip()
    except OSError as e:
        raise NotFound(f"cannot read the admin token ({e}); pass --token-file") from None
    extensions: dict[str, Any] = {"sni_hostname": tls_name} if tls_name else {}
    verify: ssl.SSLContext | bool = _tls_context(config) if target_url.startswith("https:") else True
    # A large database takes a while to copy and compress: no read timeout.
    timeout = httpx.Timeout(10.0, read=None)
    try:
        with httpx.Client(verify=verify, timeout=timeout) as client:
            response = client.post(
                f"{target_url}/v1/backup",
                headers={"authorization": f"Bearer {token}"},
                extensions=extensions,
            )
    except httpx.HTTPError as e:
        raise Unavailable(
            f"the database is in use, and its control plane at {target_url} did not answer: {e}"
        ) from None
    if response.status_code != 201:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        hint = ""
        if response.status_code == 401:
            # The server keeps DATA_DIR/admin.token renewed while it runs, so a refusal means
            # another file or another server's token, not a lapse (proto_docs/configuration.md).
            hint = f" (token from {token_path}: is it this server's data directory?)"
        raise Unavailable(f"POST {target_url}/v1/backup answered {response.status_code}: {detail}{hint}")
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
