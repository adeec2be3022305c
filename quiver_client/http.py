"""``QuiverHTTP(base_url, token)``: file artefacts over the control plane, with the standard
library only (``urllib``), so an agent still installs nothing but ``pyarrow``.

Tabular artefacts travel over Flight (:class:`~quiver_client.QuiverClient`); files — and
downloads of tables in another format — travel over HTTP (proto_docs/artefacts.md, "Over
HTTP"). Uploads and downloads are streamed: a file is sent in chunks from disk and written to
disk as it arrives, never held whole in memory. Every refusal is a
:class:`~quiver_client.QuiverClientError` with the server's stable ``code`` (the ``error`` of
its ``{"error", "detail"}`` body) and ``detail``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import select
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

from quiver_client.client import QuiverClientError

CHUNK_BYTES = 256 * 1024

Source = str | os.PathLike[str] | bytes | BinaryIO


class QuiverHTTP:
    """Artefacts on a Quiver control plane (``http://HOST:8000``) for the holder of ``token``
    (an agent or swarm token; an admin token manages every artefact)."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    # --- uploads and downloads -------------------------------------------------------------

    def upload_file(
        self,
        source: Source,
        *,
        name: str | None = None,
        description: str | None = None,
        tags: Sequence[str] = (),
        ttl_seconds: int | None = None,
        media_type: str | None = None,
    ) -> dict[str, Any]:
        """Store a file artefact from a path, bytes or an open binary file; answers its
        metadata (``id``, ``sha256``, ``size``, ``expires_at`` …). ``name`` defaults to the
        file's name."""
        filename = name
        if isinstance(source, str | os.PathLike):
            filename = filename or Path(source).name
        fields: list[tuple[str, str]] = []
        if name is not None:
            fields.append(("name", name))
        if description is not None:
            fields.append(("description", description))
        if tags:
            fields.append(("tags", ",".join(tags)))
        if ttl_seconds is not None:
            fields.append(("ttl_seconds", str(int(ttl_seconds))))
        boundary = "quiver-" + secrets.token_hex(16)
        head, tail = _form_frame(boundary, fields, filename or "upload", media_type)
        with _opened(source) as (stream, size):
            body: Iterable[bytes] = _chain(head, _read_chunks(stream), tail)
            headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
            if size is not None:
                headers["content-length"] = str(len(head) + size + len(tail))
            return self._upload("/v1/artefacts", headers, body, chunked=size is None)

    def _upload(self, path: str, headers: dict[str, str], body: Iterable[bytes], *, chunked: bool) -> Any:
        """POST a large body with ``Expect: 100-continue``: the server refuses a bad token,
        a body over its limit or a quota before it reads anything, and this client then
        reads that refusal instead of sending the body into a connection the server closes
        (which would end in a reset, not in the server's answer). A server that does not
        answer the expectation within :data:`CONTINUE_WAIT` seconds gets the body anyway."""
        parts = urllib.parse.urlsplit(self.base_url)
        host = parts.hostname or "localhost"
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=self.timeout)
        try:
            conn.putrequest("POST", parts.path.rstrip("/") + path, skip_accept_encoding=True)
            for key, value in {"authorization": f"Bearer {self._token}", **headers}.items():
                conn.putheader(key, value)
            conn.putheader("expect", "100-continue")
            if chunked:
                conn.putheader("transfer-encoding", "chunked")
            conn.endheaders()
            early = _await_continue(conn)
            if early is not None:
                raise early
            try:
                for chunk in body:
                    if chunk:
                        conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    conn.send(b"0\r\n\r\n")
            except OSError:
                pass  # the server stopped reading (a limit passed midway): its answer says why
            response = conn.getresponse()
            data = response.read()
            if response.status >= 400:
                raise _refusal_of(response.status, response.reason, data)
            return json.loads(data)
        except (OSError, http.client.HTTPException) as e:
            raise QuiverClientError("UNAVAILABLE", f"cannot reach {self.base_url}: {e}") from None
        finally:
            conn.close()

    def download(
        self,
        artefact_id: str,
        dest: str | os.PathLike[str] | IO[bytes] | None = None,
        *,
        format: str | None = None,
    ) -> bytes | Path | None:
        """The artefact's content — written to ``dest`` (a path or an open binary file) as
        it arrives (answers the path, or None for a file), or returned as bytes without one. ``format`` (parquet, csv, ndjson,
        arrow) converts a tabular artefact on the server. The stored bytes are checked
        against the artefact's sha256 (its ETag); a mismatch raises ``INTERNAL``."""
        query = {"format": format} if format else None
        with self._open("GET", f"/v1/artefacts/{_quote(artefact_id)}/content", query=query) as response:
            etag = (response.headers.get("etag") or "").strip('"')
            digest = hashlib.sha256()
            if dest is None:
                data = response.read()
                digest.update(data)
                _check_digest(format, etag, digest)
                return data
            if isinstance(dest, str | os.PathLike):
                path = Path(dest)
                partial = path.with_name(path.name + ".part")
                with open(partial, "wb") as f:
                    _copy(response, f, digest)
                _check_digest(format, etag, digest)
                partial.replace(path)
                return path
            _copy(response, dest, digest)
            _check_digest(format, etag, digest)
            return None

    # --- metadata and sharing -------------------------------------------------------------

    def artefact(self, artefact_id: str) -> dict[str, Any]:
        """One artefact's metadata."""
        return self._json("GET", f"/v1/artefacts/{_quote(artefact_id)}")

    def artefacts(
        self,
        *,
        tag: str | None = None,
        name_prefix: str | None = None,
        kind: str | None = None,
        owner: str | None = None,
        swarm: str | None = None,
        page_size: int = 100,
    ) -> list[dict[str, Any]]:
        """Every artefact the caller may see that matches the filters (all pages)."""
        query: dict[str, Any] = {
            k: v
            for k, v in {
                "tag": tag,
                "name_prefix": name_prefix,
                "kind": kind,
                "owner": owner,
                "swarm": swarm,
            }.items()
            if v is not None
        }
        query["limit"] = page_size
        out: list[dict[str, Any]] = []
        while True:
            page = self._json("GET", "/v1/artefacts", query=query)
            out.extend(page["artefacts"])
            if not page.get("next_cursor"):
                return out
            query["cursor"] = page["next_cursor"]

    def delete(self, artefact_id: str) -> None:
        """Delete an artefact (its owner or an admin)."""
        with self._open("DELETE", f"/v1/artefacts/{_quote(artefact_id)}"):
            pass

    def share(self, artefact_id: str, swarm: str, agent: str | None = None) -> dict[str, Any]:
        """Let another swarm (or one agent of it) see the artefact; answers its metadata."""
        return self._json("POST", f"/v1/artefacts/{_quote(artefact_id)}/share", payload=_share(swarm, agent))

    def unshare(self, artefact_id: str, swarm: str, agent: str | None = None) -> dict[str, Any]:
        """Withdraw a share made by :meth:`share`."""
        return self._json(
            "DELETE", f"/v1/artefacts/{_quote(artefact_id)}/share", payload=_share(swarm, agent)
        )

    def extend(self, artefact_id: str, ttl_seconds: int) -> dict[str, Any]:
        """Keep the artefact until now + ``ttl_seconds`` (at most the server's maximum)."""
        return self._json(
            "POST", f"/v1/artefacts/{_quote(artefact_id)}/extend", payload={"ttl_seconds": ttl_seconds}
        )

    # --- transport --------------------------------------------------------------------------

    def _json(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        payload: Any = None,
        body: Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        with self._open(method, path, query=query, payload=payload, body=body, headers=headers) as r:
            return json.loads(r.read())

    def _open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        payload: Any = None,
        body: Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        all_headers = {"authorization": f"Bearer {self._token}", **(headers or {})}
        data: Any = body
        if payload is not None:
            data = json.dumps(payload).encode()
            all_headers["content-type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=all_headers)  # noqa: S310 - the caller's base URL
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as e:
            raise _refusal(e) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise QuiverClientError("UNAVAILABLE", f"cannot reach {self.base_url}: {reason}") from None


def _refusal(e: urllib.error.HTTPError) -> QuiverClientError:
    """The server's ``{"error", "detail"}`` as a :class:`QuiverClientError`."""
    try:
        return _refusal_of(e.code, e.reason, e.read(64 * 1024))
    except OSError:
        return _refusal_of(e.code, e.reason, b"")
    finally:
        e.close()


def _refusal_of(status: int, reason: str, body: bytes) -> QuiverClientError:
    try:
        answer = json.loads(body)
        return QuiverClientError(str(answer["error"]), str(answer["detail"]))
    except (ValueError, KeyError, TypeError):
        return QuiverClientError(
            "INTERNAL" if status >= 500 else "INVALID_ARGUMENT", f"HTTP {status} {reason}"
        )


#: Seconds an upload waits for ``100 Continue`` (or an early refusal) before sending its body
#: anyway, as curl does: a proxy may not pass the expectation on.
CONTINUE_WAIT = 1.0
MAX_EARLY_ANSWER = 64 * 1024


def _await_continue(conn: http.client.HTTPConnection) -> QuiverClientError | None:
    """After the headers of an ``Expect: 100-continue`` request: None when the body should be
    sent (``100 Continue`` came and was consumed, or nothing came in time), else the refusal
    the server answered instead. A final answer before the body is always a refusal; the
    server closes the connection after it, so it is read here (bounded)."""
    sock = conn.sock
    assert sock is not None
    if not select.select([sock], [], [], CONTINUE_WAIT)[0]:
        return None
    received = b""
    while b"\r\n\r\n" not in received and len(received) < MAX_EARLY_ANSWER:
        data = sock.recv(1)  # up to the end of the headers, not a byte further
        if not data:
            break
        received += data
    status_line, _, rest = received.partition(b"\r\n")
    fields = status_line.split(b" ", 2)
    status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    if status == 100:
        return None
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(b":") for line in rest.split(b"\r\n") if line)
    }
    length = min(int(headers.get(b"content-length", b"0") or 0), MAX_EARLY_ANSWER)
    body = b""
    while len(body) < length:
        data = sock.recv(length - len(body))
        if not data:
            break
        body += data
    reason = fields[2].decode("latin-1") if len(fields) > 2 else ""
    return _refusal_of(status, reason, body)


def _share(swarm: str, agent: str | None) -> dict[str, str]:
    return {"swarm": swarm} if agent is None else {"swarm": swarm, "agent": agent}


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _field_quote(value: str) -> str:
    """A value for a quoted ``Content-Disposition`` parameter, escaped as browsers do."""
    return value.replace("\r", "%0D").replace("\n", "%0A").replace('"', "%22")


def _form_frame(
    boundary: str, fields: list[tuple[str, str]], filename: str, media_type: str | None
) -> tuple[bytes, bytes]:
    """The bytes before and after the file's content in a ``multipart/form-data`` body:
    the fields first, then the ``file`` part's headers; after it, the closing boundary."""
    parts = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n')
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{_field_quote(filename)}"\r\n'
        f"Content-Type: {media_type or 'application/octet-stream'}\r\n\r\n"
    )
    return "".join(parts).encode(), f"\r\n--{boundary}--\r\n".encode()


class _opened:
    """``(stream, size)`` of an upload's source; a path is opened and closed here."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._owned: BinaryIO | None = None

    def __enter__(self) -> tuple[BinaryIO, int | None]:
        source = self._source
        if isinstance(source, bytes):
            import io

            return io.BytesIO(source), len(source)
        if isinstance(source, str | os.PathLike):
            self._owned = open(source, "rb")
            return self._owned, os.fstat(self._owned.fileno()).st_size
        try:
            here = source.tell()
            size = source.seek(0, os.SEEK_END) - here
            source.seek(here)
            return source, size
        except (OSError, AttributeError, ValueError):
            return source, None  # not seekable: sent chunked

    def __exit__(self, *exc: object) -> None:
        if self._owned is not None:
            self._owned.close()


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def _chain(head: bytes, middle: Iterable[bytes], tail: bytes) -> Iterator[bytes]:
    yield head
    yield from middle
    yield tail


def _copy(response: Any, dest: IO[bytes], digest: Any) -> None:
    while chunk := response.read(CHUNK_BYTES):
        digest.update(chunk)
        dest.write(chunk)


def _check_digest(fmt: str | None, etag: str, digest: Any) -> None:
    """The stored bytes (no ``format``) must hash to the ETag the server sent."""
    if fmt is None and etag and digest.hexdigest() != etag:
        raise QuiverClientError(
            "INTERNAL", f"the download does not match its sha256 {etag[:16]}…: it was cut or altered; retry"
        )
