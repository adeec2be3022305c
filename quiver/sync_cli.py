"""``quiver sync run [--table T] [--full]`` and ``quiver sync status``.

DuckDB allows one writer per file, so when ``quiver serve`` holds the database file the CLI
asks that server's control plane (``http`` or ``https`` per ``[tls]``, its identity checked
before the admin token from ``DATA_DIR/admin.token`` is sent: quiver/local_client.py) and
polls ``GET /v1/sync`` for the outcome, decoding every answer strictly into the Structs the
server encodes (``catalog/status.py``: a changed answer is a clear error, not a KeyError).
Otherwise it opens the catalog and runs the tables itself.

Exit codes: 0 every selected table succeeded, 1 at least one failed (or the server could not
be reached), 2 a configuration or usage problem.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import msgspec

from catalog import Catalog, Config, DatabaseInUse, Unavailable
from catalog.status import SyncStatus, SyncTable, SyncTriggered
from quiver.local_client import LocalServer, one_line, path_segment, running_server

T = TypeVar("T")


def add_parser(sub: Any, config_args: Any) -> None:
    p = sub.add_parser("sync", help="replicate Snowflake tables ([[sync.tables]])")
    ssub = p.add_subparsers(dest="sync_command", required=True)
    run = ssub.add_parser("run", help="run tables now; exit 0 when every one succeeded")
    config_args(run)
    run.add_argument(
        "--table", action="append", dest="tables", help="schema.table (repeatable; default: all)"
    )
    run.add_argument("--full", action="store_true", help="full reload (accepts a changed source schema)")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for a server-side run")
    status = ssub.add_parser("status", help="state of every replicated table")
    config_args(status)
    status.add_argument("--json", action="store_true", help="print GET /v1/sync's JSON")
    for cmd in (run, status):
        cmd.add_argument("--url", help="control plane URL when the server runs (default: from the config)")
        cmd.add_argument(
            "--token-file", help="admin token when the server runs (default: DATA_DIR/admin.token)"
        )


# --- where to run ---------------------------------------------------------------------------------


class _Remote:
    """The control plane of this data directory's running ``quiver serve``."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.url = server.url

    def status(self) -> SyncStatus:
        return self._decode("GET", "/v1/sync", SyncStatus)

    def trigger(self, table: str, full: bool) -> SyncTriggered:
        path = f"/v1/sync/{path_segment(table)}/run"
        return self._decode("POST", path, SyncTriggered, params={"full": str(full).lower()})

    def _decode(self, method: str, path: str, into: type[T], **kwargs: Any) -> T:
        response = self.server.request(method, path, **kwargs)
        try:
            return msgspec.json.decode(response.content, type=into, strict=True)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise Unavailable(
                f"{method} {self.url}{path} answered a body that is not a {into.__name__}: {one_line(str(e))} "
                "(is the server another version of Quiver?)"
            ) from None

    def close(self) -> None:
        self.server.close()


def _open(config: Config, args: argparse.Namespace) -> tuple[_Remote | None, Catalog | None]:
    """The running server when the database is locked (its identity checked before any
    token is sent), else the catalog opened here (quiver/local_client.py)."""
    token_file = Path(args.token_file) if args.token_file else None
    server = running_server(config, url=args.url, token_file=token_file)
    if server is not None:
        return _Remote(server), None
    try:
        return None, Catalog(config)
    except DatabaseInUse:
        # A server started between the lock check and the open.
        server = running_server(config, url=args.url, token_file=token_file)
        if server is None:
            raise
        return _Remote(server), None


# --- output -------------------------------------------------------------------------------------------


def _summary(table: str, outcome: str, mode: str, rows_read: int, rows_written: int, seconds: float | None, error: str | None, watermark: str | None) -> str:  # fmt: skip
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    if outcome == "ok":
        wm = f", watermark {watermark}" if watermark else ""
        return f"{table}: ok ({mode}) read {rows_read:,} rows, wrote {rows_written:,}{took}{wm}"
    return f"{table}: FAILED{took}: {error}"


class Progress:
    """A progress line (rows, rate, ETA) on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, table: str, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.table = table
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.started = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def __call__(self, rows: int, _nbytes: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < (0.2 if self.tty else self.every):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = rows / elapsed
        if total:
            remaining = max(total - rows, 0)
            eta = f"ETA {remaining / rate:,.0f} s" if rate > 0 else "ETA ?"
            done = min(rows / total, 1.0)
            part = f"{done:6.1%} {rows:,}/{total:,} rows"
        else:
            eta, done, part = "", 0.0, f"{rows:,} rows"
        if self.tty:
            width = 24
            bar = "#" * int(done * width) + "-" * (width - int(done * width))
            self.stream.write(f"\r{self.table} [{bar}] {part} {rate:,.0f} rows/s {eta}   ")
            self.drawn = True
        else:
            self.stream.write(f"{self.table}: {part}, {rate:,.0f} rows/s {eta}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()


# --- commands ---------------------------------------------------------------------------------------


def cmd_sync(args: argparse.Namespace, config: Config) -> int:
    if not config.sync.tables:
        print("quiver: no [[sync.tables]] in the configuration; nothing to sync", file=sys.stderr)
        return 2
    remote, catalog = _open(config, args)
    try:
        if args.sync_command == "status":
            return _status(remote, catalog, config, as_json=args.json)
        return _run(remote, catalog, config, args.tables, args.full, args.timeout)
    finally:
        if catalog is not None:
            catalog.close()
        if remote is not None:
            remote.close()


def _status(remote: _Remote | None, catalog: Catalog | None, config: Config, *, as_json: bool) -> int:
    if remote is not None:
        status = remote.status()
    else:
        from sync import SyncService

        assert catalog is not None
        status = SyncService(catalog, config).status()
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(status), indent=2).decode())
        return 0
    for t in status.tables:
        last = t.last_run
        outcome = "running" if t.running else last.outcome if last else "never run"
        line = f"{t.table:<32} {t.mode:<6} {outcome:<9} watermark={t.watermark or '-'}"
        if last is not None:
            line += f" last={last.started_at} read={last.rows_read:,} wrote={last.rows_written:,}"
        if t.next_run_at:
            line += f" next={t.next_run_at}"
        print(line)
        if last is not None and last.error:
            print(f"    error: {last.error}")
    return 0


def _run(
    remote: _Remote | None,
    catalog: Catalog | None,
    config: Config,
    tables: list[str] | None,
    full: bool,
    timeout: float,
) -> int:
    if remote is not None:
        return _run_remote(remote, tables, full, timeout)
    from sync import SyncService

    assert catalog is not None
    service = SyncService(catalog, config)
    selected = [service.resolve(t) for t in tables] if tables else service.tables
    ok = True
    for key in selected:
        progress = Progress(key)

        def progress_for(_table: str, p: Progress = progress) -> Progress:
            return p

        try:
            (record,) = service.run_now([key], full=full, trigger="cli", progress=progress_for)
        finally:
            progress.close()
        ok = ok and record.outcome == "ok"
        print(
            _summary(key, record.outcome, record.mode, record.rows_read, record.rows_written, record.seconds, record.error, record.watermark),
            flush=True,
        )  # fmt: skip
    return 0 if ok else 1


def _started(t: SyncTable | None) -> str:
    return t.last_run.started_at if t is not None and t.last_run is not None else ""


def _run_remote(remote: _Remote, tables: list[str] | None, full: bool, timeout: float) -> int:
    before = {t.table: t for t in remote.status().tables}
    selected = [t.lower() for t in tables] if tables else list(before)
    baseline: dict[str, str] = {}
    for key in selected:
        baseline[key] = _started(before.get(key))
        remote.trigger(key, full)
    print(f"triggered on the server at {remote.url}: {', '.join(selected)}", file=sys.stderr)
    done: dict[str, SyncTable] = {}
    deadline = time.monotonic() + timeout
    while len(done) < len(selected) and time.monotonic() < deadline:
        time.sleep(0.25)
        for t in remote.status().tables:
            if t.table not in selected or t.table in done or t.running or t.last_run is None:
                continue
            if _started(t) > baseline[t.table] and t.last_run.outcome in ("ok", "failed"):
                done[t.table] = t
    ok = len(done) == len(selected)
    for key in selected:
        finished = done.get(key)
        if finished is None or finished.last_run is None:
            print(f"{key}: no outcome within {timeout:.0f} s (still queued or running on the server)")
            continue
        last = finished.last_run
        seconds = None
        if last.ended_at:
            seconds = (
                datetime.fromisoformat(last.ended_at) - datetime.fromisoformat(last.started_at)
            ).total_seconds()
        ok = ok and last.outcome == "ok"
        print(_summary(key, last.outcome, finished.mode, last.rows_read, last.rows_written, seconds, last.error, finished.watermark))  # fmt: skip
    return 0 if ok else 1
