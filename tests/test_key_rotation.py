"""Signing-key rotation (catalog/keys.py, ``quiver keys``): a new key signs new tokens, the
previous one verifies until its last token expires and is then retired, the JWKS lists every
key that verifies, and the token's ``kid`` header selects the key. Real servers, real files,
the real CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from catalog import Catalog
from catalog.keys import PREVIOUS_DIR, SigningKey
from quiver.cli import main
from tests.harness import Server, call_options, error_info, make_config, start_server


def _kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def _jwks_kids(server: Server) -> list[str]:
    return [k["kid"] for k in server.http(None).get("/.well-known/jwks.json").json()["keys"]]


def _flight_ok(server: Server, token: str) -> bool:
    import pyarrow.flight as flight

    try:
        list(server.flight().list_flights(options=call_options(token)))
    except flight.FlightUnauthenticatedError:
        return False
    return True


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in-process. It points structlog at the capture's stderr (closed after the
    test): the previous configuration is put back."""
    capsys.readouterr()
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        rc = main(list(argv))
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err.strip()


def _rotate(data: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return _cli(capsys, "keys", "rotate", "--data-dir", str(data))


def _key_files(data: Path) -> dict[str, bytes]:
    keys = data / "keys"
    return {str(p.relative_to(keys)): p.read_bytes() for p in sorted(keys.rglob("*")) if p.is_file()}


def test_rotate_keeps_old_tokens_signs_new_ones_with_the_new_kid_and_retires_the_old_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    server = start_server(data)
    try:
        old_kid = _kid(server.admin_token)
        agent = server.mint("agent", "demo", "before")
        assert _kid(agent) == old_kid and _jwks_kids(server) == [old_kid]
        old_admin = server.admin_token
    finally:
        server.stop()

    rc, new_kid, err = _rotate(data, capsys)
    assert rc == 0 and new_kid and new_kid != old_kid
    assert old_kid in err and "verifies until" in err
    assert (data / "keys" / PREVIOUS_DIR / f"{old_kid}.json").stat().st_mode & 0o777 == 0o600
    assert (data / "keys" / "signing.pem").stat().st_mode & 0o777 == 0o600
    # admin.token was re-signed with the new key at once: local commands never need the old one.
    assert _kid((data / "admin.token").read_text().strip()) == new_kid

    server = start_server(data)
    try:
        assert _jwks_kids(server) == [new_kid, old_kid]
        assert _flight_ok(server, agent), "a token signed before the rotation must still verify"
        assert server.http(old_admin).get("/v1/status").status_code == 200
        fresh = server.mint("agent", "demo", "after")
        assert _kid(fresh) == new_kid and _flight_ok(server, fresh)
        # A refresh of an old token is signed by the new key.
        r = server.http(agent).post("/v1/tokens/refresh", json={})
        assert r.status_code in (200, 201), r.text
        assert _kid(r.json()["token"]) == new_kid

        # Housekeeping retires the old key only once its last token has expired.
        catalog = server.catalog
        (previous,) = catalog.keys.previous()
        last = previous.last_token_expires_at
        assert last is not None and last >= datetime.fromtimestamp(
            jwt.decode(agent, options={"verify_signature": False})["exp"], UTC
        )
        assert catalog.tokens.retire_keys(now=last - timedelta(seconds=1)) == []
        assert _jwks_kids(server) == [new_kid, old_kid]
        assert catalog.tokens.retire_keys(now=last + timedelta(seconds=1)) == [old_kid]
        assert _jwks_kids(server) == [new_kid]
        assert not (data / "keys" / PREVIOUS_DIR / f"{old_kid}.json").exists()
        # (The old tokens have not really expired in this test: retiring the key is what
        # makes them fail, with a message that says why -- verified before or not.)
        r = server.http(old_admin).get("/v1/status")
        assert r.status_code == 401 and "retired signing key" in r.json()["detail"]
        assert server.http().get("/v1/status").status_code == 200  # the renewed admin token
    finally:
        server.stop()
    # A restart does not bring the retired key back.
    server = start_server(data)
    try:
        assert _jwks_kids(server) == [new_kid]
    finally:
        server.stop()


def test_a_previous_key_whose_tokens_expired_is_retired_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    config = make_config(data)
    Catalog(config).close()
    rc, new_kid, _ = _rotate(data, capsys)
    assert rc == 0
    entry = next((data / "keys" / PREVIOUS_DIR).glob("*.json"))
    old_kid = entry.stem
    # The previous key's last token expired long ago (written as the rotation would have).
    import msgspec

    from catalog.keys import PreviousKey

    stored = msgspec.json.decode(entry.read_bytes(), type=PreviousKey)
    past = datetime.now(UTC) - timedelta(days=1)
    entry.write_bytes(msgspec.json.encode(msgspec.structs.replace(stored, last_token_expires_at=past)))
    catalog = Catalog(config)
    try:
        assert [k["kid"] for k in catalog.tokens.jwks["keys"]] == [new_kid]
        assert not entry.exists() and old_kid != new_kid
    finally:
        catalog.close()


def test_rotate_while_the_server_runs_refuses_in_one_line_and_changes_nothing(fresh_server: Server) -> None:
    data = fresh_server.data_dir
    before = _key_files(data)
    jwks = fresh_server.http(None).get("/.well-known/jwks.json").json()
    admin = (data / "admin.token").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "quiver", "keys", "rotate", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "stop it" in lines[0] and "Nothing was changed" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _key_files(data) == before
    assert fresh_server.http(None).get("/.well-known/jwks.json").json() == jwks
    assert (data / "admin.token").read_text() == admin
    assert fresh_server.http().get("/v1/status").status_code == 200


def test_keys_list_shows_the_active_and_previous_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    rc, _, err = _cli(capsys, "keys", "list", "--data-dir", str(data))
    assert rc == 1 and "no signing key" in err
    Catalog(make_config(data)).close()
    first = SigningKey.load_or_create(data / "keys" / "signing.pem").kid
    rc, second, _ = _rotate(data, capsys)
    assert rc == 0
    rc, out, _ = _cli(capsys, "keys", "list", "--data-dir", str(data), "--json")
    assert rc == 0
    listed = json.loads(out)
    assert [(k["kid"], k["status"]) for k in listed] == [(second, "active"), (first, "previous")]
    assert listed[1]["verifies_until"] is not None
    rc, text, _ = _cli(capsys, "keys", "list", "--data-dir", str(data))
    assert rc == 0
    assert second in text and first in text and "previous" in text


def _forge(key: Ed25519PrivateKey, headers: dict[str, Any]) -> str:
    now = int(datetime.now(UTC).timestamp())
    claims = {
        "iss": "quiver",
        "sub": "admin",
        "jti": "f" * 32,
        "iat": now,
        "exp": now + 600,
        "kind": "admin",
        "root": "f" * 32,
        "sid": None,
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers=headers)


def _records(server: Server) -> list[tuple[Any, ...]]:
    """The token records, without the "last used" times (the admin token's changes)."""
    listed = server.http().get("/v1/tokens", params={"include_inactive": True}).json()["tokens"]
    return sorted((t["jti"], t["kind"], t["expires_at"], t["revoked_at"]) for t in listed)


def test_the_kid_selects_the_key_and_foreign_kids_are_refused_cleanly(server: Server) -> None:
    """A token naming a key Quiver does not hold, or naming Quiver's key but signed by
    another, is 401 with a clear message (never echoing the kid); nothing changes."""
    active = _kid(server.admin_token)
    stranger = Ed25519PrivateKey.generate()
    before = _records(server)
    cases = {
        "unknown kid": (_forge(stranger, {"kid": "x" * 300}), "does not hold"),
        "our kid, other key": (_forge(stranger, {"kid": active}), "signature invalid"),
        "no kid, other key": (_forge(stranger, {}), "signature invalid"),
    }
    for name, (token, message) in cases.items():
        r = server.http(token).get("/v1/status")
        assert r.status_code == 401, name
        detail = r.json()["detail"]
        assert message in detail and "xxxx" not in detail and len(detail) < 300, (name, detail)
        with pytest.raises(Exception) as exc:
            list(server.flight().list_flights(options=call_options(token)))
        assert error_info(exc.value)["code"] == "UNAUTHENTICATED", name
    assert _records(server) == before


def test_tokens_minted_while_rotating_verify_and_the_previous_key_covers_its_own(tmp_path: Path) -> None:
    """Mints race a rotation on one catalog: each token is signed by the old key (and counted
    in its verify-until) or by the new one, and every one verifies afterwards."""
    catalog = Catalog(make_config(tmp_path / "data"))
    try:
        catalog.swarms.create("race", tables=[])
        tokens: list[Any] = []
        errors: list[BaseException] = []
        start = threading.Barrier(5)

        def mint() -> None:
            start.wait()
            try:
                for i in range(15):
                    tokens.append(
                        catalog.tokens.mint(None, "agent", swarm="race", agent=f"a{i}", ttl_seconds=60 + i)
                    )
            except BaseException as e:
                errors.append(e)

        def rotate() -> None:
            start.wait()
            catalog.rotate_signing_key(actor="test")

        threads = [threading.Thread(target=mint) for _ in range(4)] + [threading.Thread(target=rotate)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        (previous,) = catalog.keys.previous()
        new = catalog.keys.active.kid
        assert {_kid(t.token) for t in tokens} <= {previous.kid, new}
        for issued in tokens:
            assert catalog.tokens.check(issued.token).jti == issued.jti
            if _kid(issued.token) == previous.kid:
                assert previous.last_token_expires_at is not None
                assert issued.expires_at <= previous.last_token_expires_at
    finally:
        catalog.close()


def test_an_unreadable_previous_key_file_is_skipped_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    catalog = Catalog(make_config(data))
    catalog.ensure_admin_token()  # a live token of the first key keeps it verifying
    catalog.close()
    assert _rotate(data, capsys)[0] == 0
    (data / "keys" / PREVIOUS_DIR / "garbage.json").write_text("{not json")
    server = start_server(data, demo=False)
    try:
        assert len(_jwks_kids(server)) == 2
        assert server.http().get("/v1/status").status_code == 200
    finally:
        server.stop()


def test_the_server_re_signs_an_admin_token_file_signed_by_a_previous_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin.token signed by a previous key (put back by hand, or from a copy) is replaced
    at start-up, long before that key retires: local commands never depend on it."""
    data = tmp_path / "data"
    server = start_server(data, demo=False)
    old_admin = server.admin_token
    server.stop()
    assert _rotate(data, capsys)[0] == 0
    (data / "admin.token").write_text(old_admin + "\n")
    server = start_server(data, demo=False)
    try:
        written = (data / "admin.token").read_text().strip()
        assert written != old_admin and _kid(written) == server.catalog.keys.active.kid
        assert server.http(written).get("/v1/status").status_code == 200
        assert server.http(old_admin).get("/v1/status").status_code == 200  # still verifies
    finally:
        server.stop()


def test_a_snapshot_carries_the_previous_keys_so_old_tokens_verify_after_a_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from catalog.backup import create_snapshot, restore_snapshot

    data = tmp_path / "data"
    server = start_server(data)
    agent = server.mint("agent", "demo", "restored")
    server.stop()
    assert _rotate(data, capsys)[0] == 0
    config = make_config(data)
    catalog = Catalog(config)
    try:
        kids = [k["kid"] for k in catalog.tokens.jwks["keys"]]
        archive = Path(create_snapshot(catalog, tmp_path / "out").path)
    finally:
        catalog.close()
    other = tmp_path / "other"
    restore_snapshot(make_config(other), archive)
    server = start_server(other, demo=False)
    try:
        assert _jwks_kids(server) == kids
        assert _flight_ok(server, agent)
    finally:
        server.stop()


def test_rotate_retire_previous_refuses_every_older_token_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a leak: no previous key is kept (those of earlier rotations neither), so every
    token signed before is refused; the re-signed admin.token works."""
    data = tmp_path / "data"
    server = start_server(data)
    leaked = server.mint("agent", "demo", "leaked")
    server.stop()
    assert _rotate(data, capsys)[0] == 0  # an earlier, ordinary rotation
    rc, kid, err = _cli(capsys, "keys", "rotate", "--retire-previous", "--data-dir", str(data))
    assert rc == 0 and "refused" in err
    assert list((data / "keys" / PREVIOUS_DIR).glob("*.json")) == []
    server = start_server(data, demo=False)
    try:
        assert _jwks_kids(server) == [kid]
        r = server.http(leaked).get("/v1/whoami")
        assert r.status_code == 401 and "retired signing key" in r.json()["detail"]
        assert not _flight_ok(server, leaked)
        assert server.http().get("/v1/status").status_code == 200
        assert _kid(server.admin_token) == kid
        events = server.http().get("/v1/audit", params={"action": "keys.rotate"}).json()["events"]
        assert [e["detail"] for e in events] == ["previous keys retired", None]
    finally:
        server.stop()
