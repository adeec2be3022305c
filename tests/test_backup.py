"""Backups taken while serving, and restores: a real server, real DuckDB files, real clients.

The drill of ansible/README.md in miniature: create state (swarm, tokens, a revocation,
data written by concurrent transactions) → back up while a reader streams and a writer
commits → wipe the data directory → restore → a new server has the data, the swarm and the
tokens (the signing key came back too), and the snapshot is transaction-consistent.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest
import structlog

from catalog import Catalog
from catalog.backup import MANIFEST
from quiver.cli import main
from tests.harness import Server, call_options, error_info, start_server, wait_until


def _cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process. It configures structlog to print to the current stderr (the
    capture's, closed after the test): the previous configuration is put back."""
    saved = structlog.get_config()
    try:
        code = main(list(argv))
    finally:
        structlog.configure(**saved)
    out, err = capsys.readouterr()
    return code, out, err


def _state_of(data_dir: Path) -> dict[str, str]:
    """Every file under the data directory with its content hash: "nothing changed"."""
    out = {}
    for path in sorted(data_dir.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(data_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _paired_writes(catalog: Catalog, stop: threading.Event) -> Iterator[int]:
    """Each transaction adds one row to BOTH extra.a and extra.b: a consistent snapshot has
    as many rows in one as in the other."""
    n = 0
    while not stop.is_set():
        with catalog.db.transaction() as cur:
            cur.execute("INSERT INTO extra.a VALUES (?)", [n])
            cur.execute("INSERT INTO extra.b VALUES (?)", [n])
        n += 1
        yield n


@pytest.fixture
def backup_server(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "data", backup={"dir": str(tmp_path / "backups")})
    yield s
    s.stop()


def test_backup_while_serving_then_wipe_and_restore(  # noqa: PLR0915  one scenario from backup to restore, step by step
    backup_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backup_server
    data_dir = server.data_dir
    admin = server.http()
    r = admin.post("/v1/swarms", json={"name": "bk", "tables": ["demo.orders", "extra.*"]})
    assert r.status_code == 201, r.text
    agent = server.mint("agent", swarm="bk", agent="keeper")
    revoked = server.mint("agent", swarm="bk", agent="gone")
    revoked_jti = admin.get("/v1/tokens", params={"swarm": "bk"}).json()["tokens"]
    gone = next(t["jti"] for t in revoked_jti if t["agent"] == "gone")
    assert admin.delete(f"/v1/tokens/{gone}").status_code == 200

    catalog = server.catalog
    with catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA extra")
        cur.execute("CREATE TABLE extra.a (n BIGINT)")
        cur.execute("CREATE TABLE extra.b (n BIGINT)")

    # A reader is mid-stream and a writer commits paired rows while the snapshot is taken.
    client = server.flight()
    opts = call_options(server.admin_token)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), opts)
    reader = client.do_get(info.endpoints[0].ticket, opts)
    first = reader.read_chunk()
    assert first.data.num_rows > 0
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        for n in _paired_writes(catalog, stop):
            written.append(n)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_until(lambda: len(written) >= 20 or not writer.is_alive(), 30, 0.01, what="20 paired writes")
        assert len(written) >= 20, "the writer stopped early"
        r = admin.post("/v1/backup")
    finally:
        stop.set()
        writer.join()
    assert r.status_code == 201, r.text
    snap = r.json()
    archive = Path(snap["path"])
    assert archive.parent == tmp_path / "backups"
    assert archive.is_file() and archive.stat().st_size == snap["bytes"]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == snap["sha256"]
    assert snap["files"] >= 2  # the signing key and the admin token at least
    rest = reader.read_all()
    assert first.data.num_rows + rest.num_rows == 50_000
    audit = admin.get("/v1/audit", params={"action": "backup.create"}).json()["events"]
    assert audit[0]["outcome"] == "ok"
    listed = admin.get("/v1/backups").json()
    assert [s["name"] for s in listed["snapshots"]] == [archive.name]
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert (
        "files/keys/signing.pem" in names
        and "files/keys/mask.key" in names
        and f"database/{server.catalog.db.path.name}" in names
    )
    assert not any(n.startswith(("files/tmp", "files/.", "files/results", "files/cache")) for n in names)

    server.stop()
    shutil.rmtree(data_dir)

    code, out, err = _cli("restore", str(archive), "--data-dir", str(data_dir), capsys=capsys)
    assert code == 0, err
    assert "restored" in out and "previous state" not in out

    restored = start_server(data_dir, demo=False)
    try:
        http = restored.http()
        swarm = http.get("/v1/swarms/bk").json()
        assert swarm["tables"] == ["demo.orders", "extra.*"]
        # The signing key came back: a token minted before the backup still works.
        who = restored.flight()
        names = sorted(
            ".".join(p.decode() for p in fi.descriptor.path)
            for fi in who.list_flights(options=call_options(agent))
        )
        assert names == ["demo.orders", "extra.a", "extra.b"]
        with pytest.raises(flight.FlightUnauthenticatedError) as exc:
            list(who.list_flights(options=call_options(revoked)))
        assert error_info(exc.value)["code"] == "UNAUTHENTICATED"
        with restored.catalog.db.reading() as cur:
            a = cur.execute("SELECT count(*) FROM extra.a").fetchall()[0][0]
            b = cur.execute("SELECT count(*) FROM extra.b").fetchall()[0][0]
            events = cur.execute("SELECT count(*) FROM demo.events").fetchall()[0][0]
        assert a == b and a >= 20
        assert events == 50_000
        # New audit rows continue after the restored ones (the sequence came back too).
        ids = [e["id"] for e in http.get("/v1/audit", params={"limit": 1000}).json()["events"]]
        assert len(ids) == len(set(ids))
    finally:
        restored.stop()


def test_backup_cli_through_running_server_and_directly(
    backup_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backup_server
    out_dir = tmp_path / "shipped"
    code, out, err = _cli(
        "backup",
        "--data-dir",
        str(server.data_dir),
        "--url",
        server.http_url,
        "--output",
        str(out_dir),
        capsys=capsys,
    )
    assert code == 0, err
    path = Path(out.strip())
    assert path.parent == out_dir and path.is_file()
    assert "through the running server" in err
    assert list((tmp_path / "backups").iterdir()) == []  # moved, not copied

    server.stop()
    code, out, err = _cli(
        "backup", "--data-dir", str(server.data_dir), "--output", str(out_dir), capsys=capsys
    )
    assert code == 0, err
    assert "directly" in err
    assert len(list(out_dir.iterdir())) == 2


def test_backup_endpoint_needs_admin(server: Server) -> None:
    before = list(server.catalog.config.backup_dir.glob("*"))
    r = server.http(None).post("/v1/backup")
    assert r.status_code == 401 and r.json()["error"] == "UNAUTHENTICATED"
    r = server.http(server.demo_token).post("/v1/backup")
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    assert list(server.catalog.config.backup_dir.glob("*")) == before


def _tampered(archive: Path, dest: Path, *, member: str, data: bytes) -> Path:
    """A copy of ``archive`` with one member's bytes replaced (manifest untouched)."""
    with tarfile.open(archive) as src, tarfile.open(dest, "w:gz") as out:
        for m in src.getmembers():
            body = src.extractfile(m)
            assert body is not None
            content = data if m.name == member else body.read()
            m.size = len(content)
            out.addfile(m, io.BytesIO(content))
    return dest


def _with_extra_member(archive: Path, dest: Path, name: str) -> Path:
    """A copy whose manifest also lists a member named ``name`` (e.g. a path traversal)."""
    with tarfile.open(archive) as src, tarfile.open(dest, "w:gz") as out:
        for m in src.getmembers():
            body = src.extractfile(m)
            assert body is not None
            content = body.read()
            if m.name == MANIFEST:
                manifest = json.loads(content)
                manifest["members"].append(
                    {"path": name, "bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
                )
                content = json.dumps(manifest).encode()
            m.size = len(content)
            out.addfile(m, io.BytesIO(content))
        evil = tarfile.TarInfo(name)
        evil.size = 1
        out.addfile(evil, io.BytesIO(b"x"))
    return dest


def test_restore_rejects_bad_snapshots_and_changes_nothing(
    backup_server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = backup_server
    archive = Path(server.http().post("/v1/backup").json()["path"])
    data_dir = server.data_dir

    # The server still runs: a restore refuses and touches nothing.
    before = _state_of(tmp_path)
    code, _, err = _cli("restore", str(archive), "--data-dir", str(data_dir), capsys=capsys)
    assert code == 1 and "in use" in err and "nothing was changed" in err
    server.stop()

    bad = tmp_path / "bad"
    bad.mkdir()
    raw = archive.read_bytes()
    (bad / "garbage.tar.gz").write_bytes(b"this is not a snapshot")
    (bad / "truncated.tar.gz").write_bytes(raw[: len(raw) // 2])
    (bad / "plain.tar.gz").write_bytes(_plain_tar())
    _tampered(archive, bad / "tampered.tar.gz", member="files/keys/signing.pem", data=b"not the key")
    _with_extra_member(archive, bad / "escape.tar.gz", "files/../../outside.txt")
    cases = {
        bad / "missing.tar.gz": "snapshot not found",
        bad / "garbage.tar.gz": "not a readable .tar.gz",
        bad / "truncated.tar.gz": "corrupt or truncated",
        bad / "plain.tar.gz": f"has no {MANIFEST}",
        bad / "tampered.tar.gz": "does not match its checksum",
        bad / "escape.tar.gz": "outside the data directory",
    }
    before = _state_of(data_dir)
    for path, message in cases.items():
        code, _, err = _cli("restore", str(path), "--data-dir", str(data_dir), capsys=capsys)
        assert code == 1, path
        assert message in err and "nothing was changed" in err, (path, err)
        assert _state_of(data_dir) == before, path
    assert not (tmp_path / "outside.txt").exists()

    # The good snapshot restores over existing state, which is kept aside.
    code, out, err = _cli("restore", str(archive), "--data-dir", str(data_dir), capsys=capsys)
    assert code == 0, err
    kept = [p for p in data_dir.iterdir() if p.name.startswith(".pre-restore-")]
    assert len(kept) == 1 and str(kept[0]) in out
    assert (kept[0] / "keys" / "signing.pem").read_bytes() == (data_dir / "keys" / "signing.pem").read_bytes()


def _plain_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return buf.getvalue()
