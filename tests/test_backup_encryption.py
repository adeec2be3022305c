"""Encrypted snapshots (``[backup] encryption_key_file``, catalog/snapshot_crypto.py): a real
server writes them, ``quiver restore`` decrypts them, and every damaged or foreign file is
refused with one line while the data directory stays exactly as it was."""

from __future__ import annotations

import base64
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog.backup import MANIFEST
from catalog.snapshot_crypto import CHUNK, HEADER_BYTES, MAGIC, NONCE_BYTES, TAG_BYTES, decrypt_file, load_key
from tests.harness import Server, start_server
from tests.test_backup import _cli, _state_of

RECORD = NONCE_BYTES + CHUNK + TAG_BYTES


def _key_file(path: Path) -> Path:
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def key(tmp_path: Path) -> Path:
    return _key_file(tmp_path / "backup.key")


@pytest.fixture
def enc_server(tmp_path: Path, key: Path) -> Iterator[Server]:
    s = start_server(
        tmp_path / "data",
        backup={"dir": str(tmp_path / "backups"), "encryption_key_file": str(key)},
    )
    # Incompressible rows: the archive spans several encryption records.
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA bulk")
        cur.execute("CREATE TABLE bulk.noise AS SELECT md5(random()::VARCHAR) AS h FROM range(120000)")
    yield s
    s.stop()


def _noise_rows(server: Server) -> int:
    with server.catalog.db.reading() as con:
        return int(con.execute("SELECT count(*) FROM bulk.noise").fetchall()[0][0])


def _restore(data_dir: Path, archive: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return _cli("restore", str(archive), "--data-dir", str(data_dir), capsys=capsys)


def test_encrypted_round_trip_through_the_server(
    enc_server: Server,
    tmp_path: Path,
    key: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = enc_server
    signing = (server.data_dir / "keys" / "signing.pem").read_bytes()
    r = server.http().post("/v1/backup")
    assert r.status_code == 201, r.text
    archive = Path(r.json()["path"])
    assert archive.name.endswith(".tar.gz.enc") and r.json()["name"] == archive.name
    assert archive.stat().st_mode & 0o777 == 0o600
    raw = archive.read_bytes()
    assert raw.startswith(MAGIC) and not raw.startswith(b"\x1f\x8b")
    assert len(raw) > HEADER_BYTES + 2 * RECORD  # more than two records
    assert signing not in raw and server.admin_token.encode() not in raw
    assert [p.name for p in (tmp_path / "backups").iterdir()] == [archive.name]  # no partial left
    rows = _noise_rows(server)
    server.stop()

    # Restore into a wiped data directory with the key from the configuration (env here).
    shutil.rmtree(server.data_dir)
    monkeypatch.setenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE", str(key))
    code, _, err = _restore(server.data_dir, archive, capsys)
    assert code == 0, err
    assert (server.data_dir / "keys" / "signing.pem").read_bytes() == signing
    assert not [p for p in server.data_dir.iterdir() if p.name.startswith(".restore-")]
    again = start_server(server.data_dir)
    try:
        assert _noise_rows(again) == rows == 120000
        assert again.http().get("/v1/swarms").status_code == 200  # the old admin token verifies
    finally:
        again.stop()


def _records(raw: bytes) -> tuple[bytes, list[bytes]]:
    body = raw[HEADER_BYTES:]
    return raw[:HEADER_BYTES], [body[i : i + RECORD] for i in range(0, len(body), RECORD)]


def test_restore_refuses_damaged_or_foreign_encrypted_snapshots(
    enc_server: Server,
    tmp_path: Path,
    key: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = enc_server
    archive = Path(server.http().post("/v1/backup").json()["path"])
    server.stop()
    raw = archive.read_bytes()
    header, records = _records(raw)
    assert len(records) >= 3

    bad = tmp_path / "bad"
    bad.mkdir()
    flipped = bytearray(raw)
    flipped[HEADER_BYTES + RECORD + 1000] ^= 0x01
    cases: dict[str, tuple[bytes, str]] = {
        "tampered": (bytes(flipped), "tampered: record 1 fails authentication"),
        "reordered": (
            header + records[1] + records[0] + b"".join(records[2:]),
            "record 0 fails authentication",
        ),
        "dropped": (header + records[0] + b"".join(records[2:]), "record 1 fails authentication"),
        "truncated-at-record": (header + b"".join(records[:2]), "truncated or tampered: record 1"),
        "truncated-mid-record": (raw[: HEADER_BYTES + RECORD + 500], "truncated or tampered: record 1"),
        "truncated-header": (raw[:20], "truncated: its header is incomplete"),
        "header-only": (header, "truncated: record 0 is incomplete"),
        "trailing-bytes": (raw + records[-1], "fails authentication"),
    }
    monkeypatch.setenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE", str(key))
    before = _state_of(server.data_dir)
    for name, (content, message) in cases.items():
        path = bad / f"{name}.tar.gz.enc"
        path.write_bytes(content)
        code, _, err = _restore(server.data_dir, path, capsys)
        assert code == 1, name
        assert message in err and "nothing was changed" in err, (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert _state_of(server.data_dir) == before, name

    # A wrong key, a malformed key file, no key at all: refused before any record is read.
    other = _key_file(tmp_path / "other.key")
    (tmp_path / "short.key").write_text(base64.b64encode(b"too short").decode())
    for key_file, message in (
        (str(other), "wrong key"),
        (str(tmp_path / "short.key"), "must hold 32 random bytes in base64"),
        (str(tmp_path / "absent.key"), "does not exist"),
        (None, "is an encrypted snapshot: set [backup] encryption_key_file"),
    ):
        if key_file is None:
            monkeypatch.delenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE")
        else:
            monkeypatch.setenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE", key_file)
        code, _, err = _restore(server.data_dir, archive, capsys)
        assert code == 1 and message in err and "nothing was changed" in err, (key_file, err)
        assert _state_of(server.data_dir) == before, key_file

    # The intact file still restores with the right key.
    monkeypatch.setenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE", str(key))
    code, _, err = _restore(server.data_dir, archive, capsys)
    assert code == 0, err


def test_plaintext_snapshots_restore_with_a_key_configured(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(tmp_path / "data", backup={"dir": str(tmp_path / "backups")})
    archive = Path(server.http().post("/v1/backup").json()["path"])
    server.stop()
    assert archive.name.endswith(".tar.gz") and archive.read_bytes()[:2] == b"\x1f\x8b"
    monkeypatch.setenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE", str(key))
    code, _, err = _restore(server.data_dir, archive, capsys)
    assert code == 0, err


def test_a_bad_key_file_fails_the_backup_visibly_and_writes_nothing(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not base64 at all!")
    server = start_server(
        tmp_path / "data",
        backup={"dir": str(tmp_path / "backups"), "encryption_key_file": str(bad_key)},
    )
    try:
        # Said at start-up already, in the log and the banner.
        assert any("backups will fail" in w and "32 random bytes" in w for w in server.runtime.warnings)
        http = server.http()
        r = http.post("/v1/backup")
        assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT", r.text
        assert "must hold 32 random bytes" in r.json()["detail"]
        assert list((tmp_path / "backups").glob("*")) == []
        status = http.get("/v1/status").json()["backup"]
        assert status["last_outcome"] == "failed" and "encryption_key_file" in status["last_error"]
        assert 'quiver_backups_total{outcome="failed"} 1.0' in http.get("/metrics").text

        # Fixed in place: the next backup works without a restart.
        _key_file(bad_key)
        r = http.post("/v1/backup")
        assert r.status_code == 201 and r.json()["name"].endswith(".tar.gz.enc"), r.text
    finally:
        server.stop()


def test_cli_backup_with_a_bad_key_is_one_line_both_ways(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text(base64.b64encode(os.urandom(16)).decode())
    backups = tmp_path / "backups"
    server = start_server(
        tmp_path / "data", backup={"dir": str(backups), "encryption_key_file": str(bad_key)}
    )
    args = ("backup", "--data-dir", str(server.data_dir), "--output", str(backups))
    env = pytest.MonkeyPatch()
    env.setenv("QUIVER_BACKUP_ENCRYPTION_KEY_FILE", str(bad_key))
    try:
        code, _, err = _cli(*args, "--url", server.http_url, capsys=capsys)  # through the server
        assert code == 1 and "must hold 32 random bytes" in err, err
        assert len(err.strip().splitlines()) == 1, err
        server.stop()
        code, _, err = _cli(*args, capsys=capsys)  # directly, server stopped
        assert code == 1 and "must hold 32 random bytes" in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert list(backups.glob("*")) == []
    finally:
        env.undo()
        server.stop()


def test_concurrent_encrypted_backups_each_decrypt(enc_server: Server, tmp_path: Path, key: Path) -> None:
    results: list[tuple[int, str]] = []

    def backup() -> None:
        r = enc_server.http().post("/v1/backup")
        results.append((r.status_code, r.json().get("path", r.text)))

    threads = [threading.Thread(target=backup) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [code for code, _ in results] == [201, 201, 201], results
    paths = {Path(p) for _, p in results}
    assert len(paths) == 3
    secret = load_key(key)
    for i, path in enumerate(sorted(paths)):
        plain = tmp_path / f"plain-{i}.tar.gz"
        decrypt_file(path, plain, secret)
        with tarfile.open(plain) as tar:
            manifest = json.loads(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
        assert manifest["tables"]["bulk.noise"] == 120000
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == sorted(p.name for p in paths)


def test_concurrent_plaintext_backups_never_overwrite_each_other(tmp_path: Path) -> None:
    """Regression: two backups in the same second chose the same name and the second
    os.replace() silently replaced the first, both answering 201 with one path."""
    server = start_server(tmp_path / "data", backup={"dir": str(tmp_path / "backups")})
    try:
        results: list[tuple[int, str]] = []

        def backup() -> None:
            r = server.http().post("/v1/backup")
            results.append((r.status_code, r.json().get("path", r.text)))

        threads = [threading.Thread(target=backup) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [code for code, _ in results] == [201] * 4, results
        paths = {p for _, p in results}
        assert len(paths) == 4, results
        assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == sorted(Path(p).name for p in paths)
    finally:
        server.stop()
