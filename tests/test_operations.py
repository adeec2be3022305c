"""Operating a long-running server (issue: operations): the admin token the local commands use
is renewed before it expires; a database migrated by a newer release is refused; a busy port
is one line naming it and leaves the database closed; a non-loopback listener without TLS is
warned about; the data dir's files are private and tidy; shutdown is not "stale"."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import httpx
import pyarrow.flight as flight
import pytest

from catalog import Catalog, Unavailable
from catalog.backup import create_snapshot
from catalog.database import DatabaseTooNew, _migrations
from quiver.ops import backup_via_server
from quiver.runtime import is_loopback
from tests.harness import (
    DEMO_SCALE,
    FakeClock,
    ServeProcess,
    call_options,
    make_config,
    start_server,
    wait_until,
)

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

ROOT = Path(__file__).resolve().parent.parent


def _quiver(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUIVER_DEMO_SCALE": str(DEMO_SCALE), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "quiver", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _opens_unlocked(database: Path) -> list[tuple[int, str]]:
    """Open the file read-write (fails while any process holds it) and list its migrations."""
    with duckdb.connect(str(database)) as con:
        return con.sql("SELECT version, name FROM _quiver.schema_migrations ORDER BY version").fetchall()


# --- bug 1: the admin token outlives its lifetime ----------------------------------------------
def test_backup_keeps_working_after_the_first_admin_token_expired(tmp_path: Path) -> None:
    data = tmp_path / "data"
    clock = FakeClock()  # the lifetime passes when the test says so
    tokens = {
        "admin_token_ttl_seconds": 3600,
        "admin_token_renew_fraction": 0.5,
        "last_used_flush_seconds": 0.1,
    }
    server = start_server(data, demo=False, clock=clock, tokens=tokens)
    try:
        path = data / "admin.token"
        first = path.read_text().strip()
        first_jti = server.http(first).get("/v1/whoami").json()["jti"]
        # Not due yet: half of the lifetime is left.
        clock.advance(1800)
        assert server.catalog.ensure_admin_token() is None and path.read_text().strip() == first
        # The server writes a new token before the first one expires ...
        clock.advance(1)
        second = wait_until(
            lambda: (t := path.read_text().strip()) != first and t, what="admin.token to change"
        )
        assert _mode(path) == 0o600
        assert not [p.name for p in data.iterdir() if p.name.startswith(".admin.token")]  # no temp left
        # ... without revoking the old one (a command that just read it finishes with it) ...
        assert server.catalog.tokens.get(first_jti).revoked_at is None
        assert server.http(first).get("/v1/whoami").status_code == 200
        # ... which the server really stops accepting once its lifetime is over.
        clock.advance(1799)
        rejected = server.http(first).get("/v1/whoami")
        assert rejected.status_code == 401 and "expired" in rejected.json()["detail"]
        # The nightly backup, as the timer runs it, still authenticates with the file.
        run = _quiver(
            "backup",
            "--data-dir",
            str(data),
            "--url",
            server.http_url,
            "--output",
            str(tmp_path / "shipped"),
        )
        assert run.returncode == 0, run.stderr
        assert "through the running server" in run.stderr
        assert Path(run.stdout.strip()).is_file()
        current = path.read_text().strip()
        assert current != first
        who = server.http(current).get("/v1/whoami")
        assert who.status_code == 200 and who.json()["kind"] == "admin"
        # Each renewal is audited; the token never reaches the audit log or the file twice.
        events = server.http(current).get("/v1/audit", params={"limit": 1000}).json()["events"]
        renewals = [e for e in events if e["action"] == "token.create" and e["actor"] == "renewal"]
        assert renewals and all(first not in str(e) and second not in str(e) for e in events)
    finally:
        server.stop()


def test_readers_racing_the_renewals_always_get_a_whole_working_token(tmp_path: Path) -> None:
    """Threads read admin.token and call the control plane with it while the server renews
    it several times: every read is a complete token that the server accepts. The renewals
    come from the server's clock moving on (each step makes the file's token due); a step is
    taken only once every reader has used the new token, so no reader can still hold one that
    the clock has since expired (that would be this test's race, not the server's)."""
    data = tmp_path / "data"
    clock = FakeClock()
    tokens = {
        "admin_token_ttl_seconds": 8,
        "admin_token_renew_fraction": 0.75,
        "last_used_flush_seconds": 0.1,
    }
    server = start_server(data, demo=False, clock=clock, tokens=tokens)
    path = data / "admin.token"
    latest: dict[int, str] = {}  # reader -> the token of its last completed call
    failures: list[str] = []
    done = threading.Event()

    def reader(n: int) -> None:
        with httpx.Client(base_url=server.http_url, timeout=30) as http:
            while not done.is_set():
                token = path.read_text().strip()
                r = http.get("/v1/whoami", headers={"authorization": f"Bearer {token}"})
                if r.status_code != 200 or r.json()["kind"] != "admin":
                    failures.append(f"{r.status_code} {r.text[:200]}")
                latest[n] = token

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    seen = [path.read_text().strip()]
    try:
        for t in threads:
            t.start()
        for _ in range(3):
            current = seen[-1]

            def all_current(c: str = current) -> bool:
                assert not failures, failures
                return len(latest) == 4 and set(latest.values()) == {c}

            def renewed(c: str = current) -> str | None:
                assert not failures, failures
                t = path.read_text().strip()
                return t if t and t != c else None

            wait_until(all_current, 60, what="every reader to use the current token")
            clock.advance(2.5)  # 5.5 s of 8 left: less than 0.75 of the lifetime, so due
            seen.append(wait_until(renewed, 60, what="a renewal"))
    finally:
        done.set()
        for t in threads:
            t.join(60)
        server.stop()
    assert failures == [] and len(set(seen)) == 4, (failures, seen)


def test_a_revoked_or_replaced_admin_token_file_is_rewritten(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data, demo=False, tokens={"last_used_flush_seconds": 0.1})
    try:
        path = data / "admin.token"
        first = path.read_text().strip()
        # Not due: the periodic check leaves the file alone, and does not mark it used.
        assert server.catalog.ensure_admin_token() is None
        assert path.read_text().strip() == first
        jti = server.http(first).get("/v1/whoami").json()["jti"]
        assert server.http(first).delete(f"/v1/tokens/{jti}").status_code == 200
        replaced = wait_until(
            lambda: (t := path.read_text().strip()) != first and t, what="a new admin.token"
        )
        assert server.http(replaced).get("/v1/whoami").json()["kind"] == "admin"
        # Garbage written over the file is replaced as well (a valid admin token again).
        path.write_text("not a token\n")
        repaired = wait_until(
            lambda: (t := path.read_text().strip()) not in ("not a token", replaced) and t,
            what="a repaired file",
        )
        assert server.http(repaired).get("/v1/whoami").status_code == 200
        assert _mode(path) == 0o600
    finally:
        server.stop()


# --- bug 2: a database from a newer release -----------------------------------------------------
def test_a_database_migrated_by_a_newer_release_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    Catalog(config).close()
    with duckdb.connect(str(config.database_path)) as con:
        con.execute("INSERT INTO _quiver.schema_migrations (version, name) VALUES (9001, '9001_future')")
    before = _opens_unlocked(config.database_path)
    ours = _migrations()[-1][1]

    with pytest.raises(DatabaseTooNew) as refused:
        Catalog(config)
    detail = refused.value.detail
    assert "9001_future" in detail and ours in detail
    assert "upgrade Quiver" in detail and "quiver restore" in detail
    # Refusing left the file closed, unlocked and unchanged.
    assert _opens_unlocked(config.database_path) == before

    run = _quiver("serve", "--data-dir", str(config.data_dir), "--flight-port", "0", "--http-port", "0")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "Quiver" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("quiver: ") and "9001_future" in last and ours in last
    assert _opens_unlocked(config.database_path) == before


# --- bug 3: busy ports and clear text ------------------------------------------------------------
def _held_port() -> socket.socket:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder


@pytest.mark.parametrize("listener", ["flight", "http"])
def test_a_busy_port_is_one_line_naming_it(tmp_path: Path, listener: str) -> None:
    data = tmp_path / "data"
    config = make_config(data)
    Catalog(config).close()
    before = _opens_unlocked(config.database_path)
    flag = f"--{listener}-port"
    with _held_port() as holder:
        port = holder.getsockname()[1]
        run = _quiver(
            "serve", "--data-dir", str(data), "--flight-port", "0", "--http-port", "0", flag, str(port)
        )
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "Errno" not in run.stderr
    assert "Quiver" not in run.stdout  # no banner: nothing started
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"quiver: port {port} on 127.0.0.1 ") and "already in use" in last
    assert flag in last and f"[server] {listener}_port" in last
    assert _opens_unlocked(config.database_path) == before


def test_a_port_taken_after_the_database_opened_leaves_it_closed(tmp_path: Path) -> None:
    """Both listeners on one port: each is free when checked, the control plane's bind fails
    after the database opened and Flight started; the stop closes and unlocks the database."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    run = _quiver("serve", "--data-dir", str(data), "--flight-port", str(port), "--http-port", str(port))
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"quiver: port {port} on 127.0.0.1 for the control plane is already in use")
    assert "--http-port" in last and "[server] http_port" in last
    assert "quiver.stopped" in run.stderr
    assert _opens_unlocked(data / "quiver.duckdb")  # migrated, closed and unlocked
    assert _mode(data / "quiver.duckdb") == 0o600


def test_a_non_loopback_listener_without_tls_is_warned_about(tmp_path: Path) -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.7", "quiver.example.com"))
    serve = ServeProcess(tmp_path / "data", "--host", "0.0.0.0")
    try:
        banner = "\n".join(serve.banner)
        assert "WARNING: listening on 0.0.0.0 without [tls]: bearer tokens travel in clear text" in banner
        assert httpx.get(f"{serve.http_url}/healthz", timeout=10).status_code == 200
    finally:
        assert serve.stop() == 0
    log = serve.proc.stderr.read()  # type: ignore[union-attr]
    assert "server.cleartext" in log and "clear text" in log
    loopback = start_server(tmp_path / "loopback", demo=False)
    try:
        assert loopback.runtime.warnings == []
    finally:
        loopback.stop()


# --- small items ---------------------------------------------------------------------------------
def test_the_database_is_private_and_no_empty_snapshot_dir_is_left(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # what a login shell usually has
    try:
        catalog = Catalog(make_config(tmp_path / "data"))
    finally:
        os.umask(previous)
    try:
        assert _mode(catalog.db.path) == 0o600
        info = create_snapshot(catalog, tmp_path / "out")
        assert Path(info.path).is_file()
        assert not (catalog.data_dir / ".snapshot").exists()
    finally:
        catalog.close()


def test_shutdown_evictions_are_not_called_stale(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", cache={"table_memory_bytes": 64 * 1024**2})
    try:
        assert server.runtime.flight is not None
        cache = server.runtime.flight.table_cache
        client, opts = server.flight(), call_options(server.admin_token)
        info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "customers"), opts)
        for endpoint in info.endpoints:
            client.do_get(endpoint.ticket, opts).read_all()
        wait_until(lambda: cache.stats().entries >= 1, what="the scanned table to be cached")
    finally:
        server.stop()
    assert cache.evicted["shutdown"] >= 1 and cache.evicted["stale"] == 0


def test_backup_with_a_foreign_token_says_which_file_and_writes_nothing(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", demo=False)
    try:
        config = server.catalog.config
        foreign = tmp_path / "other.token"
        foreign.write_text("eyJ.not.ours\n")
        with pytest.raises(Unavailable) as refused:
            backup_via_server(config, url=server.http_url, token_file=foreign, output=None)
        detail = refused.value.detail
        assert "answered 401" in detail and str(foreign) in detail and "eyJ.not.ours" not in detail
        assert not config.backup_dir.exists() or list(config.backup_dir.iterdir()) == []
    finally:
        server.stop()
