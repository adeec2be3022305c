"""Encryption of snapshots that leave the machine (``[backup] encryption_key_file``).

A snapshot holds the signing key and the admin token: anyone who reads one can mint tokens.
When ``[backup] encryption_key_file`` names a key, ``quiver backup`` (and ``POST
/v1/backup``) write ``quiver-<time>.tar.gz.enc`` instead of the ``.tar.gz``: the same
archive, encrypted and authenticated with AES-256-GCM while it is written, so neither the
plaintext archive nor the whole database ever sits in memory or on disk at once. ``quiver
restore`` recognises the format by its magic bytes and decrypts with the same key file.

The key file holds 32 random bytes, base64-encoded (``openssl rand -base64 32``); the
operator generates it once, keeps it in the Ansible Vault and the role writes it 0600.
Lose it and the encrypted snapshots are lost with it.

Format ``quiver-snapshot-enc/1`` (all integers big-endian)::

    header  = MAGIC (8 bytes: b"QVSNENC1")
              | chunk_size (4)          plaintext bytes per record (1 MiB)
              | salt (16)               random per file
              | key_check (16)          HKDF(key, salt, "quiver-snapshot-enc/1 check")
    record  = nonce (12, random) | AES-256-GCM(file_key, nonce, chunk, aad) (len(chunk) + 16)
    aad     = header | index (8) | final (1: 0x01 on the last record, else 0x00)
    file_key = HKDF-SHA256(key, salt, "quiver-snapshot-enc/1 data", 32 bytes)

Every record but the last carries exactly ``chunk_size`` plaintext bytes; the last carries
0 to ``chunk_size`` bytes and is marked final. Binding the index and the final flag (and
the header) into every tag means records cannot be reordered, dropped, duplicated, spliced
from another file or cut off at a record boundary without the tag failing, and bytes after
the final record are refused. ``key_check`` tells a wrong key apart from a damaged file.

Decryption authenticates each record before any of its bytes are written, and a restore
decrypts the whole file into its private staging directory before unpacking anything, so
a damaged or foreign file restores nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import os
import struct
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from catalog.errors import InvalidArgument

MAGIC = b"QVSNENC1"
FORMAT = "quiver-snapshot-enc/1"
ENC_SUFFIX = ".enc"
KEY_BYTES = 32
SALT_BYTES = 16
CHECK_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
CHUNK = 1 << 20
_HEADER = struct.Struct(f">8sI{SALT_BYTES}s{CHECK_BYTES}s")
HEADER_BYTES = _HEADER.size
# A reader never allocates more than this for one record, whatever a header claims.
MAX_CHUNK = 16 << 20


def load_key(path: Path) -> bytes:
    """The 32-byte key in ``path`` (base64 text, surrounding whitespace ignored)."""
    try:
        text = path.expanduser().read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"[backup] encryption_key_file {path} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"[backup] encryption_key_file {path} cannot be read ({e.strerror})") from None
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise InvalidArgument(
            f"[backup] encryption_key_file {path} must hold {KEY_BYTES} random bytes in base64 "
            "(e.g. `openssl rand -base64 32`)"
        )
    return key


def _derive(key: bytes, salt: bytes, purpose: bytes, length: int) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=salt, info=FORMAT.encode() + b" " + purpose
    ).derive(key)


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


def is_encrypted(path: Path) -> bool:
    """Whether ``path`` starts like an encrypted snapshot (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class EncryptingWriter(io.RawIOBase):
    """A write-only file object that encrypts what it is given into ``out`` in records of
    ``chunk_size`` bytes; :meth:`close` writes the final record. Buffers one chunk."""

    def __init__(self, out: IO[bytes], key: bytes, *, chunk_size: int = CHUNK) -> None:
        if not 0 < chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}")
        self._out = out
        salt = os.urandom(SALT_BYTES)
        self._header = _HEADER.pack(MAGIC, chunk_size, salt, _derive(key, salt, b"check", CHECK_BYTES))
        self._aead = AESGCM(_derive(key, salt, b"data", KEY_BYTES))
        self._chunk = chunk_size
        self._buffer = bytearray()
        self._index = 0
        self._done = False
        out.write(self._header)

    def writable(self) -> bool:
        return True

    def _emit(self, chunk: bytes, final: bool) -> None:
        nonce = os.urandom(NONCE_BYTES)
        self._out.write(nonce + self._aead.encrypt(nonce, chunk, _aad(self._header, self._index, final)))
        self._index += 1

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._done:
            raise ValueError("write to a closed EncryptingWriter")
        self._buffer += data
        # Keep at least one byte back: the last record is only known at close().
        while len(self._buffer) > self._chunk:
            self._emit(bytes(self._buffer[: self._chunk]), final=False)
            del self._buffer[: self._chunk]
        return len(data)

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._emit(bytes(self._buffer), final=True)
            self._buffer.clear()
            self._out.flush()
        super().close()


def decrypt_file(source: Path, dest: Path, key: bytes) -> int:
    """Decrypt ``source`` into a new file ``dest`` (0600) and return the plaintext size.

    Raises InvalidArgument with one line for a wrong key, a truncated or a tampered file;
    ``dest`` is removed then."""
    try:
        with (
            open(source, "rb") as f,
            open(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out,
        ):
            return _decrypt(f, out, key)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _decrypt(f: IO[bytes], out: IO[bytes], key: bytes) -> int:
    header = f.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or not header.startswith(MAGIC):
        raise InvalidArgument("encrypted snapshot is truncated: its header is incomplete")
    _, chunk_size, salt, check = _HEADER.unpack(header)
    if not 0 < chunk_size <= MAX_CHUNK:
        raise InvalidArgument("encrypted snapshot is corrupt: bad chunk size in its header")
    if not hmac.compare_digest(check, _derive(key, salt, b"check", CHECK_BYTES)):
        raise InvalidArgument(
            "encrypted snapshot does not match [backup] encryption_key_file: wrong key (or a damaged header)"
        )
    aead = AESGCM(_derive(key, salt, b"data", KEY_BYTES))
    record = NONCE_BYTES + chunk_size + TAG_BYTES
    total = 0
    index = 0
    current = f.read(record)
    while True:
        if len(current) < NONCE_BYTES + TAG_BYTES:
            raise InvalidArgument(f"encrypted snapshot is truncated: record {index} is incomplete")
        following = f.read(record) if len(current) == record else b""
        final = not following
        try:
            plain = aead.decrypt(current[:NONCE_BYTES], current[NONCE_BYTES:], _aad(header, index, final))
        except InvalidTag:
            what = "truncated or tampered" if final else "tampered"
            raise InvalidArgument(
                f"encrypted snapshot is {what}: record {index} fails authentication"
            ) from None
        out.write(plain)
        total += len(plain)
        if final:
            break
        current = following
        index += 1
    out.flush()
    os.fsync(out.fileno())
    return total
