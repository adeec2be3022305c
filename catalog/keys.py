"""Signing keys: the Ed25519 key that signs new tokens, and the previous keys that still
verify tokens signed before a rotation, published together as a JWKS so other services can
verify Quiver's tokens without a private key.

Layout of ``DATA_DIR/keys`` (every file 0600; backed up with the rest of the data directory):

- ``signing.pem`` — the active key (PKCS#8 PEM), created at first start; it signs every new
  token, and its ``kid`` (the RFC 7638 thumbprint) is in each token's header;
- ``previous/<kid>.json`` — a key replaced by ``quiver keys rotate``: its *public* half only
  (the private half is destroyed at rotation, so a previous key can never sign again) and
  the expiry of the last token it signed. It verifies until then (plus ``[tokens]
  leeway_seconds``); after that, the next start or housekeeping pass deletes the file and the
  key leaves the JWKS (:meth:`KeyRing.retire_expired`).

Rotation writes the previous key's file first, then replaces ``signing.pem`` atomically, so a
crash in between leaves the old key active (and a stale ``previous`` entry of the active key,
which loading ignores). See proto_docs/authentication.md, "Signing keys".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from catalog.errors import ConfigError

log = structlog.get_logger(__name__)

SIGNING_FILE = "signing.pem"
PREVIOUS_DIR = "previous"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _thumbprint(x: str) -> str:
    # RFC 7638 thumbprint: members in lexicographic order, no whitespace.
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def _jwk(x: str, kid: str) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def write_private_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600 from the start) so that a concurrent reader
    sees the old content or the new, never a partial file, and a crash leaves one of them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


MASK_KEY_FILE = "mask.key"


def load_or_create_mask_key(directory: Path) -> str:
    """The key of ``hash`` masks (catalog/views.py ``mask_expression``): 32 random bytes as 64
    hex characters in ``directory/mask.key`` (0600), made at the first start and kept — in
    backups too, as every key file — so a masked value stays the same across restarts and
    restores. Not derived from the signing key: that one rotates, and a rotation must not
    change every masked value. A file that is not a key stops the start (like a broken
    signing key): guessing a new one would silently change every masked value."""
    path = directory / MASK_KEY_FILE
    if not path.exists():
        write_private(path, secrets.token_hex(32).encode())
    text = path.read_text().strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"{path} is not a mask key (64 hexadecimal characters); restore it from a backup")
    return text


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class SigningKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public: Ed25519PublicKey = private.public_key()
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.x = _b64url(raw)
        self.kid = _thumbprint(self.x)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} is not an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        write_private(path, _pem(key))
        return cls(key)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [_jwk(self.x, self.kid)]}


class PreviousKey(msgspec.Struct, kw_only=True):
    """A rotated-out key as stored in ``keys/previous/<kid>.json`` (public half only)."""

    kid: str
    x: str
    rotated_at: datetime
    # The latest expiry of a token it signed (None: it signed none that is still unrevoked).
    last_token_expires_at: datetime | None


class KeyInfo(msgspec.Struct, kw_only=True):
    """One key as ``quiver keys list`` shows it."""

    kid: str
    status: str  # "active" (signs and verifies) or "previous" (verifies only)
    rotated_at: datetime | None
    verifies_until: datetime | None


class KeyRing:
    """The active signing key and the previous keys that still verify, selected by ``kid``.

    Reads (:meth:`public_key`, :meth:`jwks`) take no lock: :meth:`rotate` and
    :meth:`retire_expired` replace the whole mapping at once."""

    def __init__(self, directory: Path, active: SigningKey, previous: list[PreviousKey]) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self.active = active
        self._previous: dict[str, tuple[PreviousKey, Ed25519PublicKey]] = {
            p.kid: (p, Ed25519PublicKey.from_public_bytes(_b64url_decode(p.x)))
            for p in previous
            if p.kid != active.kid
        }

    @classmethod
    def load_or_create(cls, directory: Path) -> KeyRing:
        active = SigningKey.load_or_create(directory / SIGNING_FILE)
        previous: list[PreviousKey] = []
        folder = directory / PREVIOUS_DIR
        if folder.is_dir():
            for path in sorted(folder.glob("*.json")):
                try:
                    entry = msgspec.json.decode(path.read_bytes(), type=PreviousKey)
                    raw = _b64url_decode(entry.x)
                    if len(raw) != 32 or _thumbprint(entry.x) != entry.kid:
                        raise ValueError("its kid is not the thumbprint of its key")
                except (OSError, ValueError, msgspec.DecodeError) as e:
                    # Not fatal: tokens it would verify are refused, everything else works.
                    log.warning("keys.previous_unreadable", path=str(path), error=str(e)[:200])
                    continue
                previous.append(entry)
        return cls(directory, active, previous)

    def public_key(self, kid: str) -> Ed25519PublicKey | None:
        """The key that verifies tokens whose header names ``kid``, or None."""
        if kid == self.active.kid:
            return self.active.public
        found = self._previous.get(kid)
        return found[1] if found else None

    def previous(self) -> list[PreviousKey]:
        return [p for p, _ in self._previous.values()]

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """Every key that still verifies: the active one first, then previous ones, newest first."""
        keys = [_jwk(self.active.x, self.active.kid)]
        for p in sorted(self.previous(), key=lambda p: p.rotated_at, reverse=True):
            keys.append(_jwk(p.x, p.kid))
        return {"keys": keys}

    def describe(self, leeway_seconds: int = 0) -> list[KeyInfo]:
        out = [KeyInfo(kid=self.active.kid, status="active", rotated_at=None, verifies_until=None)]
        for p in sorted(self.previous(), key=lambda p: p.rotated_at, reverse=True):
            until = p.last_token_expires_at or p.rotated_at
            out.append(
                KeyInfo(
                    kid=p.kid,
                    status="previous",
                    rotated_at=p.rotated_at,
                    verifies_until=until + timedelta(seconds=leeway_seconds),
                )
            )
        return out

    def rotate(self, last_token_expires_at: datetime | None, *, retire_previous: bool = False) -> SigningKey:
        """Make a new key the active one; the current one becomes a previous key that verifies
        until ``last_token_expires_at`` (the latest expiry of a token it signed). With
        ``retire_previous`` (a leaked key) no previous key is kept: every token signed before
        is refused from now on. The caller guarantees that no token is signed meanwhile (it
        holds the database: the server is stopped, or this is the server)."""
        with self._lock:
            old = self.active
            new = SigningKey(Ed25519PrivateKey.generate())
            folder = self.directory / PREVIOUS_DIR
            previous = dict(self._previous)
            if not retire_previous:
                entry = PreviousKey(
                    kid=old.kid,
                    x=old.x,
                    rotated_at=datetime.now(UTC),
                    last_token_expires_at=last_token_expires_at,
                )
                folder.mkdir(mode=0o700, exist_ok=True)
                write_private_atomic(folder / f"{old.kid}.json", msgspec.json.encode(entry))
                previous[old.kid] = (entry, old.public)
            write_private_atomic(self.directory / SIGNING_FILE, _pem(new.private))
            if retire_previous:
                for stale in folder.glob("*.json") if folder.is_dir() else ():
                    stale.unlink(missing_ok=True)
                previous = {}
            self._previous = previous
            self.active = new
        log.info(
            "keys.rotated",
            kid=new.kid,
            previous_kid=old.kid,
            previous_retired=retire_previous,
            previous_verifies_until=(
                None
                if retire_previous or last_token_expires_at is None
                else last_token_expires_at.isoformat()
            ),
        )
        return new

    def retire_expired(self, now: datetime, leeway_seconds: int) -> list[str]:
        """Delete the previous keys whose last token expired (plus the leeway) before ``now``;
        return their kids. A key that cannot be deleted from disk stays (retried next pass)."""
        leeway = timedelta(seconds=leeway_seconds)
        retired: list[str] = []
        with self._lock:
            previous = dict(self._previous)
            for kid, (entry, _) in self._previous.items():
                until = (entry.last_token_expires_at or entry.rotated_at) + leeway
                if until > now:
                    continue
                try:
                    (self.directory / PREVIOUS_DIR / f"{kid}.json").unlink(missing_ok=True)
                except OSError as e:
                    log.warning("keys.retire_failed", kid=kid, error=str(e)[:200])
                    continue
                del previous[kid]
                retired.append(kid)
            self._previous = previous
        for kid in retired:
            log.info("keys.retired", kid=kid)
        return retired
