"""Artefacts over HTTP (proto_docs/artefacts.md, "Over HTTP"): uploads streamed into the store,
downloads with ranges, validators and conversions, listing, visibility, sharing, lifetime —
against a real server with httpx (and raw sockets where a client must misbehave)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.parquet as pq
import pytest

from catalog import Principal
from catalog.errors import MAX_DETAIL_CHARS
from tests.harness import Server, start_server, wait_until

MiB = 1024 * 1024
CAP = 2 * MiB  # [artefacts] max_upload_bytes of the server below
QUOTA = 64 * MiB  # [artefacts] swarm_quota_bytes (its own test has a server of its own)
MAX_TTL = 7 * 86_400


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A demo server with small upload limits, and swarms ``red`` and ``blue`` besides ``demo``."""
    s = start_server(
        tmp_path_factory.mktemp("artefacts-http"),
        artefacts={
            "max_upload_bytes": CAP,
            "swarm_quota_bytes": QUOTA,
            "max_ttl_seconds": MAX_TTL,
            "default_ttl_seconds": 3600,
        },
    )
    for name in ("red", "blue"):
        assert s.http().post("/v1/swarms", json={"name": name}).status_code == 201
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokens(server: Server) -> dict[str, str]:
    """The principals of the visibility matrix."""
    return {
        "owner": server.mint("agent", "demo", "owner"),
        "peer": server.mint("agent", "demo", "peer"),  # same swarm, another agent
        "swarm": server.mint("swarm", "demo"),  # the owner's swarm token
        "red": server.mint("agent", "red", "r1"),  # another swarm
        "red2": server.mint("agent", "red", "r2"),
        "blue": server.mint("agent", "blue", "b1"),
        "admin": server.admin_token,
    }


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert "Traceback" not in body["detail"] and len(body["detail"]) <= MAX_DETAIL_CHARS + 40
    return str(body["detail"])


def _upload(
    http: httpx.Client,
    content: bytes | Any,
    *,
    filename: str = "data.bin",
    media_type: str = "application/octet-stream",
    **fields: Any,
) -> httpx.Response:
    data = {k: str(v) for k, v in fields.items()}
    return http.post("/v1/artefacts", data=data, files={"file": (filename, content, media_type)})


def _stored(server: Server) -> dict[str, Any]:
    """What the store holds, durably and in memory: metadata rows, shares, content files
    (temporary ones included) and the index."""
    with server.catalog.db.reading() as cur:
        rows = cur.execute("SELECT id, expires_at FROM _quiver.artefacts ORDER BY id").fetchall()
        shares = cur.execute(
            "SELECT artefact_id, swarm, agent FROM _quiver.artefact_shares ORDER BY ALL"
        ).fetchall()
    files = sorted(p.name for p in server.catalog.artefacts.directory.iterdir())
    return {"rows": rows, "shares": shares, "files": files, "index": server.catalog.artefacts.content_ids()}


def _principal(server: Server, token: str) -> Principal:
    return server.catalog.tokens.verify(token)


# --- round trips ---------------------------------------------------------------------------------


def test_a_file_round_trips_with_its_sha256(server: Server, tokens: dict[str, str]) -> None:
    """Larger than the 1 MiB JSON limit: the route reads its body as a stream."""
    content = os.urandom(CAP - 1000)
    http = server.http(tokens["owner"])
    r = _upload(
        http, content, filename="report.csv", media_type="text/csv", tags="q3, finance", description="d"
    )
    assert r.status_code == 201, r.text
    art = r.json()
    assert art["kind"] == "file" and art["name"] == "report.csv" and art["media_type"] == "text/csv"
    assert art["sha256"] == hashlib.sha256(content).hexdigest() and art["size_bytes"] == len(content)
    assert art["tags"] == ["q3", "finance"] and art["description"] == "d"
    assert art["owner"] == "agent:demo/owner" and art["swarm"] == "demo"
    assert r.headers["content-type"].startswith("application/json")

    got = http.get(f"/v1/artefacts/{art['id']}/content")
    assert got.status_code == 200
    assert hashlib.sha256(got.content).hexdigest() == art["sha256"]
    assert got.headers["content-type"] == "text/csv"  # as uploaded: no charset the uploader never said
    assert got.headers["content-length"] == str(len(content))
    assert got.headers["etag"] == f'"{art["sha256"]}"'
    assert got.headers["accept-ranges"] == "bytes"
    assert (
        got.headers["content-disposition"]
        == "attachment; filename=\"report.csv\"; filename*=UTF-8''report.csv"
    )
    assert http.get(f"/v1/artefacts/{art['id']}").json() == art


def test_the_name_field_wins_and_a_path_like_name_is_only_a_label(
    server: Server, tokens: dict[str, str]
) -> None:
    http = server.http(tokens["owner"])
    r = _upload(http, b"secret?", filename="x.txt", name='../../etc/pass"wd\\evil')
    assert r.status_code == 201, r.text
    art = r.json()
    assert art["name"] == '../../etc/pass"wd\\evil'
    assert (server.catalog.artefacts.directory / art["id"]).read_bytes() == b"secret?"
    got = http.get(f"/v1/artefacts/{art['id']}/content")
    cd = got.headers["content-disposition"]
    assert cd.startswith('attachment; filename="') and "/" not in cd and "\\" not in cd and ".." not in cd
    assert cd.count('"') == 2  # the quote in the name does not end the parameter early


def test_a_non_ascii_file_name_is_kept_and_encoded(server: Server, tokens: dict[str, str]) -> None:
    http = server.http(tokens["owner"])
    art = _upload(http, b"x", name="résumé 2026.txt").json()
    cd = http.get(f"/v1/artefacts/{art['id']}/content").headers["content-disposition"]
    assert cd == "attachment; filename=\"r_sum_ 2026.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%202026.txt"


# --- ranges and validators --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranged(server: Server, tokens: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    content = bytes(range(256)) * 40  # 10,240 bytes
    r = _upload(server.http(tokens["owner"]), content, filename="r.bin")
    assert r.status_code == 201, r.text
    return r.json(), content


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-16", 10224, 10239),
        ("bytes=10230-99999", 10230, 10239),
    ],
)
def test_a_single_range_is_206(
    server: Server,
    tokens: dict[str, str],
    ranged: tuple[dict[str, Any], bytes],
    header: str,
    start: int,
    end: int,
) -> None:
    art, content = ranged
    r = server.http(tokens["peer"]).get(f"/v1/artefacts/{art['id']}/content", headers={"range": header})
    assert r.status_code == 206
    assert r.content == content[start : end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(content)}"
    assert r.headers["content-length"] == str(end - start + 1)
    assert r.headers["etag"] == f'"{art["sha256"]}"'


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=20000-30000", "bytes=-0"])
def test_an_unsatisfiable_range_is_416(
    server: Server, tokens: dict[str, str], ranged: tuple[dict[str, Any], bytes], header: str
) -> None:
    art, content = ranged
    r = server.http(tokens["owner"]).get(f"/v1/artefacts/{art['id']}/content", headers={"range": header})
    assert "past the end" in _error(r, 416, "INVALID_ARGUMENT")
    assert r.headers["content-range"] == f"bytes */{len(content)}"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-5", "bytes=9-3", "bytes=abc", "bytes=-"])
def test_several_or_malformed_ranges_get_the_whole_content(
    server: Server, tokens: dict[str, str], ranged: tuple[dict[str, Any], bytes], header: str
) -> None:
    art, content = ranged
    r = server.http(tokens["owner"]).get(f"/v1/artefacts/{art['id']}/content", headers={"range": header})
    assert r.status_code == 200 and r.content == content


def test_if_none_match_is_304_and_if_range_guards_the_range(
    server: Server, tokens: dict[str, str], ranged: tuple[dict[str, Any], bytes]
) -> None:
    art, content = ranged
    http = server.http(tokens["owner"])
    url = f"/v1/artefacts/{art['id']}/content"
    etag = http.get(url).headers["etag"]
    for header in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = http.get(url, headers={"if-none-match": header})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert http.get(url, headers={"if-none-match": '"other"'}).status_code == 200
    r = http.get(url, headers={"range": "bytes=0-3", "if-range": etag})
    assert (r.status_code, r.content) == (206, content[:4])
    r = http.get(url, headers={"range": "bytes=0-3", "if-range": '"changed"'})
    assert (r.status_code, r.content) == (200, content)


# --- tables: the stored IPC file and conversions ------------------------------------------------


@pytest.fixture(scope="module")
def table_artefact(server: Server, tokens: dict[str, str]) -> tuple[dict[str, Any], pa.Table]:
    """A tabular artefact of several batches (as a DoPut would store it), of types each format
    must carry: integers, text with commas and quotes, nulls, dates, timestamps, decimals."""
    import datetime as dt
    import decimal

    n = 20_000
    table = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "label": pa.array([f'row "{i}", ok' if i % 7 else None for i in range(n)]),
            "day": pa.array([dt.date(2026, 1, 1) + dt.timedelta(days=i % 365) for i in range(n)]),
            "at": pa.array(
                [dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i) for i in range(n)]
            ),
            "amount": pa.array([decimal.Decimal(i) / 100 for i in range(n)], pa.decimal128(12, 2)),
        }
    )
    store = server.catalog.artefacts
    with store.begin_write(
        _principal(server, tokens["owner"]), "table", "orders extract", schema=table.schema
    ) as w:
        for batch in table.to_batches(max_chunksize=7_000):
            w.write_batch(batch)
        art = w.commit()
    meta = server.http(tokens["owner"]).get(f"/v1/artefacts/{art.id}").json()
    return meta, table


def test_a_table_downloads_as_its_arrow_file(
    server: Server, tokens: dict[str, str], table_artefact: Any
) -> None:
    art, table = table_artefact
    r = server.http(tokens["peer"]).get(f"/v1/artefacts/{art['id']}/content")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/vnd.apache.arrow.file"
    assert hashlib.sha256(r.content).hexdigest() == art["sha256"]
    assert pa_ipc.open_file(pa.py_buffer(r.content)).read_all().equals(table)


def _read_back(fmt: str, data: bytes, schema: pa.Schema) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data))
    if fmt == "arrow":
        return pa_ipc.open_stream(data).read_all()
    if fmt == "csv":
        options = pa_csv.ConvertOptions(column_types=schema, strings_can_be_null=True)
        return pa_csv.read_csv(io.BytesIO(data), convert_options=options)
    rows = [json.loads(line) for line in data.splitlines()]
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [
        ("parquet", "application/vnd.apache.parquet"),
        ("csv", "text/csv; charset=utf-8"),
        ("ndjson", "application/x-ndjson"),
        ("arrow", "application/vnd.apache.arrow.stream"),
    ],
)
def test_a_table_converts_on_the_fly_and_reads_back_equal(
    server: Server, tokens: dict[str, str], table_artefact: Any, fmt: str, media_type: str
) -> None:
    art, table = table_artefact
    http = server.http(tokens["owner"])
    url = f"/v1/artefacts/{art['id']}/content"
    with http.stream("GET", url, params={"format": fmt}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == media_type
        assert "content-length" not in r.headers  # streamed as it is encoded
        assert r.headers["etag"] == f'"{art["sha256"]}.{fmt}"'
        assert r.headers["content-disposition"].startswith(f'attachment; filename="orders extract.{fmt}')
        chunks = list(r.iter_raw())
    data = b"".join(chunks)
    back = _read_back(fmt, data, table.schema)
    if fmt == "ndjson":
        assert back.num_rows == table.num_rows
        first = json.loads(data.split(b"\n", 1)[0])
        assert first == {
            "id": 0,
            "label": None,
            "day": "2026-01-01",
            "at": "2026-01-01T00:00:00Z",
            "amount": 0.0,
        }
        assert back.column("id").to_pylist() == table.column("id").to_pylist()
        assert back.column("label").to_pylist() == table.column("label").to_pylist()
    else:
        assert back.equals(table), fmt
    r = http.get(url, params={"format": fmt}, headers={"if-none-match": f'"{art["sha256"]}.{fmt}"'})
    assert r.status_code == 304
    # A conversion takes no range: the whole representation.
    r = http.get(url, params={"format": fmt}, headers={"range": "bytes=0-9"})
    assert r.status_code == 200 and r.content == data


def test_format_is_refused_for_a_file_and_unknown_formats(server: Server, tokens: dict[str, str]) -> None:
    http = server.http(tokens["owner"])
    art = _upload(http, b"a,b\n1,2\n", filename="t.csv", media_type="text/csv").json()
    detail = _error(
        http.get(f"/v1/artefacts/{art['id']}/content", params={"format": "csv"}), 400, "INVALID_ARGUMENT"
    )
    assert "not a table" in detail
    detail = _error(
        http.get(f"/v1/artefacts/{art['id']}/content", params={"format": "xlsx"}), 400, "INVALID_ARGUMENT"
    )
    assert "format" in detail


# --- refused uploads keep nothing ---------------------------------------------------------------


def _boundary_body(*parts: tuple[str, dict[str, str], bytes], boundary: str = "BOUNDARY") -> bytes:
    out = b""
    for name, extra, content in parts:
        disp = f'form-data; name="{name}"' + "".join(f'; {k}="{v}"' for k, v in extra.items())
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


FORM = {"content-type": "multipart/form-data; boundary=BOUNDARY"}


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (_boundary_body(("file", {"filename": "e.txt"}, b"")), FORM, 400, "empty"),
        (_boundary_body(("name", {}, b"x")), FORM, 400, "no 'file' part"),
        (_boundary_body(("colour", {}, b"red"), ("file", {"filename": "a"}, b"1")), FORM, 400, "unknown form field 'colour'"),
        (_boundary_body(("name", {}, b"a"), ("name", {}, b"b"), ("file", {"filename": "a"}, b"1")), FORM, 400, "twice"),
        (_boundary_body(("file", {"filename": "a"}, b"1"), ("name", {}, b"late")), FORM, 400, "before the 'file' part"),
        (_boundary_body(("file", {"filename": "a"}, b"1"), ("file", {"filename": "b"}, b"2")), FORM, 400, "more than one"),
        (_boundary_body(("ttl_seconds", {}, b"soon"), ("file", {"filename": "a"}, b"1")), FORM, 400, "ttl_seconds"),
        (_boundary_body(("ttl_seconds", {}, "²".encode()), ("file", {"filename": "a"}, b"1")), FORM, 400, "ttl_seconds"),
        (_boundary_body(("name", {}, b"\xff\xfe"), ("file", {"filename": "a"}, b"1")), FORM, 400, "UTF-8"),
        (_boundary_body(("name", {}, b"bad\x01name"), ("file", {"filename": "a"}, b"1")), FORM, 400, "control characters"),
        (_boundary_body(("tags", {}, ",".join(f"t{i}" for i in range(40)).encode()), ("file", {"filename": "a"}, b"1")), FORM, 400, "tags"),
        (b"--BOUNDARY\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nno end", FORM, 400, "multipart"),
        (_boundary_body(("file", {}, b"1")), FORM, 400, "not a file"),
        (_boundary_body(("name", {}, b""), ("file", {"filename": "a"}, b"1")), FORM, 400, "name must not be empty"),
        (b"garbage" * 20, FORM, 400, "multipart"),
        (b"x", {"content-type": "application/json"}, 415, "multipart/form-data"),
        (b"x", {}, 415, "multipart/form-data"),
        (b"x", {"content-type": "multipart/form-data"}, 415, "boundary"),
    ],
    ids=[
        "empty-file", "no-file", "unknown-field", "field-twice", "field-after-file", "two-files",
        "ttl-not-a-number", "ttl-superscript", "field-not-utf8", "control-chars", "too-many-tags", "unterminated",
        "not-a-file", "empty-name", "garbage", "json", "no-content-type", "no-boundary",
    ],
)  # fmt: skip
def test_a_refused_upload_is_a_clear_4xx_and_keeps_nothing(
    server: Server, tokens: dict[str, str], body: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    before = _stored(server)
    r = server.http(tokens["owner"]).post("/v1/artefacts", content=body, headers=headers)
    detail = _error(r, status, "INVALID_ARGUMENT")
    assert words in detail, detail
    assert _stored(server) == before


@pytest.mark.parametrize(("ttl", "status"), [(MAX_TTL + 1, 422), (0, 400), (-5, 400)])
def test_a_ttl_out_of_range_is_refused_and_keeps_nothing(
    server: Server, tokens: dict[str, str], ttl: int, status: int
) -> None:
    before = _stored(server)
    r = _upload(server.http(tokens["owner"]), b"payload", ttl_seconds=ttl)
    assert "ttl_seconds" in _error(r, status, "INVALID_ARGUMENT")
    assert _stored(server) == before


def test_an_upload_over_the_cap_is_413_and_keeps_nothing(server: Server, tokens: dict[str, str]) -> None:
    before = _stored(server)
    http = server.http(tokens["owner"])
    # Declared too large: refused from its Content-Length before a byte of the body is
    # read — the client here sends none, and gets the answer.
    url = urlsplit(server.http_url)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(
            (
                f"POST /v1/artefacts HTTP/1.1\r\nhost: {url.netloc}\r\nauthorization: Bearer {tokens['owner']}\r\n"
                f"content-type: multipart/form-data; boundary=B\r\ncontent-length: {100 * CAP}\r\n\r\n"
            ).encode()
        )
        answer = b""
        while b"}" not in answer and (data := sock.recv(65536)):
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"] == "RESOURCE_EXHAUSTED" and b"max_upload_bytes" in body
    assert _stored(server) == before

    # Streamed without a length (chunked): refused at the byte that passes the cap.
    def chunked() -> Iterator[bytes]:
        yield b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="big"\r\n\r\n'
        for _ in range(CAP // (64 * 1024) + 2):
            yield b"y" * (64 * 1024)
        yield b"\r\n--BOUNDARY--\r\n"

    r = http.post("/v1/artefacts", content=chunked(), headers=FORM)
    assert "max_upload_bytes" in _error(r, 413, "RESOURCE_EXHAUSTED")
    assert _stored(server) == before


def test_a_token_is_checked_before_the_body(server: Server) -> None:
    before = _stored(server)
    for token in (None, "garbage"):
        r = server.http(token).post("/v1/artefacts", content=b"\xff" * 5000, headers=FORM)
        _error(r, 401, "UNAUTHENTICATED")
    r = server.http(server.mint("metrics", swarm=None)).post("/v1/artefacts", content=b"x", headers=FORM)
    _error(r, 403, "PERMISSION_DENIED")
    assert _stored(server) == before


def test_a_client_that_disconnects_mid_upload_leaves_nothing(server: Server, tokens: dict[str, str]) -> None:
    """The body is cut after a megabyte of a declared two: the writer is aborted, its
    temporary file removed, nothing listed."""
    before = _stored(server)
    url = urlsplit(server.http_url)
    head = b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="cut.bin"\r\n\r\n'
    declared = len(head) + CAP - 4096 + len(b"\r\n--BOUNDARY--\r\n")
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(
            (
                f"POST /v1/artefacts HTTP/1.1\r\nhost: {url.netloc}\r\nauthorization: Bearer {tokens['owner']}\r\n"
                f"content-type: multipart/form-data; boundary=BOUNDARY\r\ncontent-length: {declared}\r\n\r\n"
            ).encode()
            + head
        )
        for _ in range(16):
            sock.sendall(b"z" * (64 * 1024))
        # The server is writing: a temporary file exists while the upload runs.
        wait_until(
            lambda: [f for f in server.catalog.artefacts.directory.iterdir() if f.name.startswith(".tmp-")],
            what="the upload's temporary file",
        )
    wait_until(lambda: _stored(server) == before, what="the cut upload to leave nothing behind")
    http = server.http(tokens["owner"])
    assert not [a for a in http.get("/v1/artefacts").json()["artefacts"] if a["name"] == "cut.bin"]


def test_memory_stays_bounded_while_a_large_upload_streams(tmp_path: Path) -> None:
    """64 MiB through the route with Python's allocations traced (the server runs in this
    process): the peak stays far below the upload's size."""
    s = start_server(tmp_path / "data", demo=False, artefacts={"max_upload_bytes": 128 * MiB})
    try:
        http = s.http()
        chunk = os.urandom(256 * 1024)
        digest = hashlib.sha256()

        def body() -> Iterator[bytes]:
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n\r\n'
            for _ in range(256):
                digest.update(chunk)
                yield chunk
            yield b"\r\n--B--\r\n"

        tracemalloc.start()
        try:
            r = http.post(
                "/v1/artefacts", content=body(), headers={"content-type": "multipart/form-data; boundary=B"}
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 201, r.text
        assert r.json()["size_bytes"] == 64 * MiB and r.json()["sha256"] == digest.hexdigest()
        assert peak < 16 * MiB, peak
    finally:
        s.stop()


# --- quotas ----------------------------------------------------------------------------------------


def test_the_swarm_quota_is_413_naming_limit_and_usage_and_races_keep_it(tmp_path: Path) -> None:
    s = start_server(
        tmp_path / "data", demo=False, artefacts={"max_upload_bytes": MiB, "swarm_quota_bytes": 3 * MiB}
    )
    try:
        assert s.http().post("/v1/swarms", json={"name": "q"}).status_code == 201
        tokens = [s.mint("agent", "q", f"a{i}") for i in range(6)]
        barrier = threading.Barrier(len(tokens))

        def go(token: str) -> httpx.Response:
            http = s.http(token)
            barrier.wait()
            return _upload(http, b"q" * (MiB - 10))

        with ThreadPoolExecutor(len(tokens)) as pool:
            answers = list(pool.map(go, tokens))
        kept = [r for r in answers if r.status_code == 201]
        refused = [r for r in answers if r.status_code != 201]
        assert len(kept) == 3, [r.text for r in answers]
        for r in refused:
            detail = _error(r, 413, "RESOURCE_EXHAUSTED")
            assert "swarm_quota_bytes" in detail and str(3 * MiB) in detail
        usage = s.catalog.artefacts.usage("q")
        assert usage.bytes == 3 * (MiB - 10) and usage.count == 3
        assert not [f for f in s.catalog.artefacts.directory.iterdir() if f.name.startswith(".tmp-")]
        # And a further upload names the usage the swarm has now.
        detail = _error(_upload(s.http(tokens[0]), b"1" * 100), 413, "RESOURCE_EXHAUSTED")
        assert f"{3 * (MiB - 10)} bytes" in detail
    finally:
        s.stop()


# --- visibility, ownership, sharing ----------------------------------------------------------


def _owned(server: Server, tokens: dict[str, str], name: str, **fields: Any) -> dict[str, Any]:
    r = _upload(server.http(tokens["owner"]), name.encode(), name=name, **fields)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _listed(server: Server, token: str, **query: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        params = {**query, "limit": 50, **({"cursor": cursor} if cursor else {})}
        page = server.http(token).get("/v1/artefacts", params=params).json()
        ids += [a["id"] for a in page["artefacts"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def _sees(server: Server, token: str, art_id: str) -> bool:
    http = server.http(token)
    meta = http.get(f"/v1/artefacts/{art_id}")
    content = http.get(f"/v1/artefacts/{art_id}/content")
    listed = art_id in _listed(server, token)
    if meta.status_code == 404:
        _error(meta, 404, "NOT_FOUND")
        _error(content, 404, "NOT_FOUND")
        assert not listed
        return False
    assert meta.status_code == 200 and content.status_code == 200 and listed
    return True


def test_the_visibility_matrix(server: Server, tokens: dict[str, str]) -> None:
    art = _owned(server, tokens, "matrix")
    seen = {who: _sees(server, token, art["id"]) for who, token in tokens.items()}
    assert seen == {
        "owner": True,
        "peer": True,
        "swarm": True,
        "red": False,
        "red2": False,
        "blue": False,
        "admin": True,
    }

    owner = server.http(tokens["owner"])
    r = owner.post(f"/v1/artefacts/{art['id']}/share", json={"swarm": "red", "agent": "r1"})
    assert r.status_code == 200 and r.json()["shares"] == [{"swarm": "red", "agent": "r1"}]
    seen = {who: _sees(server, token, art["id"]) for who, token in tokens.items()}
    assert seen == {
        "owner": True,
        "peer": True,
        "swarm": True,
        "red": True,
        "red2": False,
        "blue": False,
        "admin": True,
    }

    r = owner.post(f"/v1/artefacts/{art['id']}/share", json={"swarm": "blue"})
    assert r.status_code == 200
    assert {who for who, token in tokens.items() if _sees(server, token, art["id"])} == set(tokens) - {"red2"}

    r = owner.request("DELETE", f"/v1/artefacts/{art['id']}/share", json={"swarm": "red", "agent": "r1"})
    assert r.status_code == 200 and r.json()["shares"] == [{"swarm": "blue", "agent": None}]
    assert {who for who, token in tokens.items() if _sees(server, token, art["id"])} == set(tokens) - {
        "red",
        "red2",
    }


def test_an_unknown_id_and_an_invisible_one_get_the_same_answer(
    server: Server, tokens: dict[str, str]
) -> None:
    art = _owned(server, tokens, "hidden")
    red = server.http(tokens["red"])
    unknown = "0190a000-0000-7000-8000-000000000000"
    for path in ("", "/content"):
        a = _error(red.get(f"/v1/artefacts/{art['id']}{path}"), 404, "NOT_FOUND")
        b = _error(red.get(f"/v1/artefacts/{unknown}{path}"), 404, "NOT_FOUND")
        assert a.replace(art["id"], unknown) == b
    _error(red.get("/v1/artefacts/" + "x" * 5000), 404, "NOT_FOUND")  # bounded echo


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("DELETE", "", None),
        ("POST", "/share", {"swarm": "blue"}),
        ("DELETE", "/share", {"swarm": "blue"}),
        ("POST", "/extend", {"ttl_seconds": 60}),
    ],
)
def test_who_may_manage_an_artefact(
    server: Server, tokens: dict[str, str], method: str, suffix: str, body: dict[str, Any] | None
) -> None:
    """403 for a reader who is not its owner (the peer, or an agent it is shared with); 404 for
    one who cannot see it; changed by nobody of them."""
    art = _owned(server, tokens, f"managed{suffix}")
    owner = server.http(tokens["owner"])
    assert owner.post(f"/v1/artefacts/{art['id']}/share", json={"swarm": "blue"}).status_code == 200
    before = _stored(server)
    for who, status, code in (
        ("peer", 403, "PERMISSION_DENIED"),
        ("blue", 403, "PERMISSION_DENIED"),
        ("red", 404, "NOT_FOUND"),
    ):
        r = server.http(tokens[who]).request(method, f"/v1/artefacts/{art['id']}{suffix}", json=body)
        _error(r, status, code)
    assert _stored(server) == before
    # The owner's swarm token may, and admins may (each on an artefact of its own).
    for who in ("swarm", "admin"):
        other = _owned(server, tokens, f"managed-by-{who}{suffix}")
        assert owner.post(f"/v1/artefacts/{other['id']}/share", json={"swarm": "blue"}).status_code == 200
        r = server.http(tokens[who]).request(method, f"/v1/artefacts/{other['id']}{suffix}", json=body)
        assert r.status_code == (204 if (method, suffix) == ("DELETE", "") else 200), (who, r.text)


def test_delete_removes_metadata_and_content(server: Server, tokens: dict[str, str]) -> None:
    art = _owned(server, tokens, "to-delete")
    path = server.catalog.artefacts.directory / art["id"]
    assert path.exists()
    r = server.http(tokens["owner"]).delete(f"/v1/artefacts/{art['id']}")
    assert r.status_code == 204
    assert not path.exists()
    _error(server.http(tokens["owner"]).get(f"/v1/artefacts/{art['id']}"), 404, "NOT_FOUND")
    _error(server.http(tokens["owner"]).delete(f"/v1/artefacts/{art['id']}"), 404, "NOT_FOUND")
    events = server.catalog.audit.query(action="artefact.delete", limit=10_000)
    assert any(e.target == art["id"] and e.outcome == "ok" for e in events)


def test_sharing_with_an_unknown_swarm_is_404_and_changes_nothing(
    server: Server, tokens: dict[str, str]
) -> None:
    art = _owned(server, tokens, "share-unknown")
    before = _stored(server)
    owner = server.http(tokens["owner"])
    detail = _error(
        owner.post(f"/v1/artefacts/{art['id']}/share", json={"swarm": "nowhere"}), 404, "NOT_FOUND"
    )
    assert "nowhere" in detail
    detail = _error(
        owner.post(f"/v1/artefacts/{art['id']}/share", json={"swarm": "x" * 5000}), 400, "INVALID_ARGUMENT"
    )
    # A share that does not exist cannot be withdrawn.
    _error(
        owner.request("DELETE", f"/v1/artefacts/{art['id']}/share", json={"swarm": "red"}), 404, "NOT_FOUND"
    )
    for bad in ({}, {"swarm": 5}, {"swarm": "red", "agnet": "x"}):
        _error(owner.post(f"/v1/artefacts/{art['id']}/share", json=bad), 400, "INVALID_ARGUMENT")
    assert _stored(server) == before
    assert owner.get(f"/v1/artefacts/{art['id']}").json()["shares"] == []


def test_extend_moves_the_expiry_and_past_the_maximum_changes_nothing(
    server: Server, tokens: dict[str, str]
) -> None:
    art = _owned(server, tokens, "extend", ttl_seconds=60)
    owner = server.http(tokens["owner"])
    url = f"/v1/artefacts/{art['id']}/extend"
    before = _stored(server)
    assert "max_ttl_seconds" in _error(
        owner.post(url, json={"ttl_seconds": MAX_TTL + 1}), 422, "INVALID_ARGUMENT"
    )
    for bad in (
        {"ttl_seconds": 0},
        {"ttl_seconds": -1},
        {"ttl_seconds": "60"},
        {"ttl_seconds": 1.5},
        {},
        {"ttl": 60},
    ):
        _error(owner.post(url, json=bad), 400, "INVALID_ARGUMENT")
    assert _stored(server) == before
    assert owner.get(f"/v1/artefacts/{art['id']}").json()["expires_at"] == art["expires_at"]

    r = owner.post(url, json={"ttl_seconds": MAX_TTL})
    assert r.status_code == 200, r.text
    created = datetime.fromisoformat(art["created_at"])
    moved = datetime.fromisoformat(r.json()["expires_at"])
    assert (moved - created).total_seconds() >= MAX_TTL
    assert owner.get(f"/v1/artefacts/{art['id']}").json()["expires_at"] == r.json()["expires_at"]


# --- listing ----------------------------------------------------------------------------------------


def test_list_filters_and_pages(server: Server, tokens: dict[str, str]) -> None:
    mine = [_owned(server, tokens, f"lst-{i:02d}", tags="lst" + (",odd" if i % 2 else "")) for i in range(7)]
    red = _upload(server.http(tokens["red"]), b"r", name="lst-red", tags="lst").json()
    ids = [a["id"] for a in mine]
    assert [i for i in _listed(server, tokens["peer"], tag="lst")] == ids
    assert _listed(server, tokens["peer"], tag="odd") == ids[1::2]
    assert _listed(server, tokens["admin"], tag="lst") == [*ids, red["id"]]
    assert _listed(server, tokens["admin"], tag="lst", swarm="red") == [red["id"]]
    assert _listed(server, tokens["admin"], name_prefix="lst-0") == ids
    assert _listed(server, tokens["admin"], name_prefix="lst-r") == [red["id"]]
    assert _listed(server, tokens["admin"], tag="lst", owner="agent:red/r1") == [red["id"]]
    assert _listed(server, tokens["admin"], tag="lst", kind="table") == []
    # Pages of 3 cover everything exactly once.
    http = server.http(tokens["peer"])
    seen: list[str] = []
    cursor = None
    while True:
        page = http.get(
            "/v1/artefacts", params={"tag": "lst", "limit": 3, **({"cursor": cursor} if cursor else {})}
        ).json()
        assert len(page["artefacts"]) <= 3
        seen += [a["id"] for a in page["artefacts"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids


@pytest.mark.parametrize(
    "query",
    [
        {"limit": 0},
        {"limit": 100_000},
        {"limit": "x"},
        {"cursor": "not-an-id"},
        {"kind": "folder"},
        {"tagg": "x"},
    ],
)
def test_bad_list_queries_are_400(server: Server, tokens: dict[str, str], query: dict[str, Any]) -> None:
    _error(server.http(tokens["owner"]).get("/v1/artefacts", params=query), 400, "INVALID_ARGUMENT")


# --- races --------------------------------------------------------------------------------------


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)

    def go(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def test_concurrent_share_unshare_and_delete_leave_a_consistent_state(
    server: Server, tokens: dict[str, str]
) -> None:
    for round_ in range(4):
        art = _owned(server, tokens, f"race-{round_}")
        aid = art["id"]

        def act(i: int, aid: str = aid, round_: int = round_) -> int:
            http = server.http(tokens["owner"] if i % 2 else tokens["swarm"])
            target = {"swarm": ("red", "blue")[i % 2]}
            if i == 7 and round_ % 2 == 0:
                return http.delete(f"/v1/artefacts/{aid}").status_code
            if i % 3 == 0:
                return http.request("DELETE", f"/v1/artefacts/{aid}/share", json=target).status_code
            return http.post(f"/v1/artefacts/{aid}/share", json=target).status_code

        statuses = _race(8, act)
        assert set(statuses) <= {200, 204, 404}, statuses
        stored = _stored(server)
        db_shares = sorted((s, a) for x, s, a in stored["shares"] if x == aid)
        meta = server.http(tokens["admin"]).get(f"/v1/artefacts/{aid}")
        if round_ % 2 == 0:
            # Deleted: gone everywhere, shares included; no content left.
            _error(meta, 404, "NOT_FOUND")
            assert db_shares == [] and aid not in stored["files"] and aid not in stored["index"]
            assert aid not in [r[0] for r in stored["rows"]]
        else:
            assert meta.status_code == 200
            memory = sorted((s["swarm"], s["agent"]) for s in meta.json()["shares"])
            assert memory == db_shares
            for who, swarm in (("red", "red"), ("blue", "blue")):
                assert _sees(server, tokens[who], aid) == ((swarm, None) in db_shares)


def test_concurrent_uploads_and_downloads(server: Server, tokens: dict[str, str]) -> None:
    payloads = [os.urandom(100_000 + i) for i in range(8)]

    def up_and_down(i: int) -> tuple[str, str]:
        http = server.http(tokens["owner"])
        art = _upload(http, payloads[i], name=f"par-{i}").json()
        got = http.get(f"/v1/artefacts/{art['id']}/content").content
        return art["sha256"], hashlib.sha256(got).hexdigest()

    for sent, got in _race(8, up_and_down):
        assert sent == got


# --- the Python client (quiver_client.http, stdlib only) ------------------------------------------


def test_the_http_client_round_trips_files_and_manages_them(
    server: Server, tokens: dict[str, str], tmp_path: Path
) -> None:
    from quiver_client import QuiverClientError, QuiverHTTP

    owner = QuiverHTTP(server.http_url, tokens["owner"])
    source = tmp_path / "notes ü.txt"
    source.write_bytes(os.urandom(CAP - 50_000))
    art = owner.upload_file(source, tags=["client", "notes"], description="from a path", ttl_seconds=600)
    assert art["name"] == "notes ü.txt" and art["tags"] == ["client", "notes"]
    assert art["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    # Downloads: to a path (written as it arrives, checked against the sha256), to bytes.
    saved = owner.download(art["id"], tmp_path / "copy.txt")
    assert saved == tmp_path / "copy.txt" and saved.read_bytes() == source.read_bytes()
    assert not (tmp_path / "copy.txt.part").exists()
    assert owner.download(art["id"]) == source.read_bytes()
    # From bytes and from an open file, with a media type.
    small = owner.upload_file(b"a,b\n1,2\n", name="inline.csv", media_type="text/csv", tags=["client"])
    assert small["media_type"] == "text/csv"
    with open(source, "rb") as f:
        third = owner.upload_file(f, name="from-file", tags=["client"])
    assert third["size_bytes"] == source.stat().st_size
    # A stream of unknown length (a pipe) goes chunked.
    read_end, write_end = os.pipe()

    def feed() -> None:
        os.write(write_end, b"p" * 300_000)
        os.close(write_end)

    feeder = threading.Thread(target=feed)
    feeder.start()
    with os.fdopen(read_end, "rb") as pipe:
        piped = owner.upload_file(pipe, name="piped", tags=["client"])
    feeder.join()
    assert piped["size_bytes"] == 300_000 and piped["sha256"] == hashlib.sha256(b"p" * 300_000).hexdigest()

    listed = [a["id"] for a in owner.artefacts(tag="client", page_size=2)]
    assert listed == [art["id"], small["id"], third["id"], piped["id"]]
    assert owner.artefact(art["id"]) == art

    red = QuiverHTTP(server.http_url, tokens["red"])
    with pytest.raises(QuiverClientError) as e:
        red.download(art["id"])
    assert e.value.code == "NOT_FOUND"
    shared = owner.share(art["id"], "red")
    assert shared["shares"] == [{"swarm": "red", "agent": None}]
    assert red.download(art["id"]) == source.read_bytes()
    assert owner.unshare(art["id"], "red")["shares"] == []
    with pytest.raises(QuiverClientError) as e:
        red.artefact(art["id"])
    assert e.value.code == "NOT_FOUND"

    extended = owner.extend(art["id"], MAX_TTL)
    assert extended["expires_at"] > art["expires_at"]
    with pytest.raises(QuiverClientError) as e:
        owner.extend(art["id"], MAX_TTL + 1)
    assert e.value.code == "INVALID_ARGUMENT" and "max_ttl_seconds" in e.value.detail
    with pytest.raises(QuiverClientError) as e:
        owner.upload_file(b"x" * (CAP + 1), name="too big")
    assert e.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(QuiverClientError) as e:
        QuiverHTTP(server.http_url, tokens["peer"]).delete(art["id"])
    assert e.value.code == "PERMISSION_DENIED"
    owner.delete(art["id"])
    with pytest.raises(QuiverClientError) as e:
        owner.artefact(art["id"])
    assert e.value.code == "NOT_FOUND"


def test_the_http_client_converts_tables(server: Server, tokens: dict[str, str], table_artefact: Any) -> None:
    from quiver_client import QuiverHTTP

    art, table = table_artefact
    client = QuiverHTTP(server.http_url, tokens["peer"])
    assert pq.read_table(io.BytesIO(client.download(art["id"], format="parquet"))).equals(table)  # type: ignore[arg-type]
    sink = io.BytesIO()
    assert client.download(art["id"], sink, format="arrow") is None
    assert pa_ipc.open_stream(sink.getvalue()).read_all().equals(table)


def test_the_http_client_reports_an_unreachable_server() -> None:
    from quiver_client import QuiverClientError, QuiverHTTP

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(QuiverClientError) as e:
        QuiverHTTP(f"http://127.0.0.1:{port}", "t", timeout=5).artefacts()
    assert e.value.code == "UNAVAILABLE"


# --- downloads that end early, and audit ---------------------------------------------------------


def _open_fds_on(path: Path) -> list[str]:
    """This process's file descriptors on ``path`` (the server runs in-process)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                out.append(fd)
        except OSError:
            continue
    return out


@pytest.mark.parametrize("fmt", [None, "csv", "parquet"])
def test_a_client_that_leaves_mid_download_releases_the_file(
    server: Server, tokens: dict[str, str], table_artefact: Any, fmt: str | None
) -> None:
    art, _ = table_artefact
    path = server.catalog.artefacts.directory / art["id"]
    params = {"format": fmt} if fmt else {}
    baseline = len(_open_fds_on(path))
    with (
        server.http(tokens["owner"]) as http,
        http.stream("GET", f"/v1/artefacts/{art['id']}/content", params=params) as r,
    ):
        assert r.status_code == 200
        next(r.iter_raw(1024))
    wait_until(lambda: len(_open_fds_on(path)) <= baseline, what="the download's file to be closed")
    # And the server still serves it whole.
    assert server.http(tokens["owner"]).get(f"/v1/artefacts/{art['id']}/content").status_code == 200


def test_a_download_under_way_survives_a_delete(server: Server, tokens: dict[str, str]) -> None:
    content = os.urandom(CAP - 10_000)
    owner = server.http(tokens["owner"])
    art = _upload(owner, content, name="deleted-while-read").json()
    with (
        server.http(tokens["peer"]) as reader,
        reader.stream("GET", f"/v1/artefacts/{art['id']}/content") as r,
    ):
        chunks = r.iter_raw(64 * 1024)
        first = next(chunks)
        assert owner.delete(f"/v1/artefacts/{art['id']}").status_code == 204
        got = first + b"".join(chunks)
    assert hashlib.sha256(got).hexdigest() == art["sha256"]
    _error(owner.get(f"/v1/artefacts/{art['id']}/content"), 404, "NOT_FOUND")


def test_refused_writes_are_audited_with_the_request_id(server: Server, tokens: dict[str, str]) -> None:
    art = _owned(server, tokens, "audited")
    peer = server.http(tokens["peer"])
    r = peer.delete(f"/v1/artefacts/{art['id']}")
    _error(r, 403, "PERMISSION_DENIED")
    r2 = _upload(server.http(tokens["owner"]), b"x", ttl_seconds=MAX_TTL + 1)
    _error(r2, 422, "INVALID_ARGUMENT")
    r3 = server.http(tokens["owner"]).post(
        "/v1/artefacts", content=b"{}", headers={"content-type": "application/json"}
    )
    _error(r3, 415, "INVALID_ARGUMENT")
    server.catalog.audit.flush()
    refused = {e.request_id: e for e in server.catalog.audit.query(limit=100_000) if e.outcome != "ok"}
    denied = refused[r.headers["x-request-id"]]
    assert (denied.action, denied.actor, denied.target) == ("artefact.delete", "agent:demo/peer", art["id"])
    assert denied.outcome == "permission_denied"
    bad_ttl = refused[r2.headers["x-request-id"]]
    assert (bad_ttl.action, bad_ttl.actor) == ("artefact.create", "agent:demo/owner")
    not_multipart = refused[r3.headers["x-request-id"]]
    assert (not_multipart.action, not_multipart.outcome) == ("artefact.create", "invalid_argument")
    # A committed write has one record (the store's), not two.
    created = [
        e
        for e in server.catalog.audit.query(action="artefact.create", limit=100_000)
        if e.target == art["id"]
    ]
    assert len(created) == 1 and created[0].outcome == "ok"


def test_concurrent_extends_leave_memory_and_database_agreeing(
    server: Server, tokens: dict[str, str]
) -> None:
    art = _owned(server, tokens, "extend-race")
    ttls = [600 * (i + 1) for i in range(8)]

    def extend(i: int) -> dict[str, Any]:
        http = server.http(tokens["owner"] if i % 2 else tokens["admin"])
        r = http.post(f"/v1/artefacts/{art['id']}/extend", json={"ttl_seconds": ttls[i]})
        assert r.status_code == 200, r.text
        return dict(r.json())

    answers = _race(8, extend)
    served = server.http(tokens["owner"]).get(f"/v1/artefacts/{art['id']}").json()["expires_at"]
    with server.catalog.db.reading() as cur:
        row = cur.execute("SELECT expires_at FROM _quiver.artefacts WHERE id = ?", [art["id"]]).fetchone()
    assert row is not None
    (stored,) = row
    assert datetime.fromisoformat(served) == stored
    assert served in [a["expires_at"] for a in answers]


def test_the_http_client_reads_early_refusals_of_large_uploads(
    server: Server, tokens: dict[str, str]
) -> None:
    """The server refuses a bad token or a declared size before reading the body; the client
    (``Expect: 100-continue``) reads that answer instead of a connection reset, which it
    would report as UNAVAILABLE, a retryable code."""
    from quiver_client import QuiverClientError, QuiverHTTP

    before = _stored(server)
    big = b"x" * (8 * CAP)
    with pytest.raises(QuiverClientError) as e:
        QuiverHTTP(server.http_url, "garbage").upload_file(big, name="big")
    assert e.value.code == "UNAUTHENTICATED"
    with pytest.raises(QuiverClientError) as e:
        QuiverHTTP(server.http_url, tokens["owner"]).upload_file(big, name="big")
    assert e.value.code == "RESOURCE_EXHAUSTED" and "max_upload_bytes" in e.value.detail
    # Without a length (a pipe): refused at the byte past the cap, mid-body.
    read_end, write_end = os.pipe()

    def feed() -> None:
        try:
            for _ in range(4 * CAP // 65536):
                os.write(write_end, b"y" * 65536)
        except OSError:
            pass  # the client stopped reading the pipe
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed)
    feeder.start()
    with pytest.raises(QuiverClientError) as e, os.fdopen(read_end, "rb") as pipe:
        QuiverHTTP(server.http_url, tokens["owner"]).upload_file(pipe, name="piped-big")
    feeder.join()
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert _stored(server) == before


def test_an_expired_artefact_is_not_found_on_every_route_at_once(
    server: Server, tokens: dict[str, str]
) -> None:
    """Past its TTL, before the janitor's next pass: NOT_FOUND on every HTTP route and over
    Flight (a ticket issued before the expiry included), the missing-table refusal in SQL,
    refresh and extend refused (an expired artefact cannot be revived) — with the words of an
    id that never existed — and nothing is listed."""
    from quiver_client import QuiverClient, QuiverClientError

    unknown = "0190a000-0000-7000-8000-000000000000"
    owner = server.http(tokens["owner"])
    with QuiverClient(server.flight_url, tokens["owner"]) as quiver:
        table = quiver.put_table(pa.table({"x": [1, 2]}), "brief table", ttl_seconds=1)
        exported = quiver.export("SELECT count(*) AS n FROM demo.customers", ttl_seconds=1)["artefact"]
        info = quiver.info(quiver.command("artefact", id=table["id"]))  # its ticket, before the expiry
    assert owner.post(f"/v1/artefacts/{table['id']}/share", json={"swarm": "red"}).status_code == 200
    last = max(datetime.fromisoformat(a["expires_at"]) for a in (table, exported))
    wait_until(lambda: datetime.now(last.tzinfo) > last, what="the expiry")
    for aid in (table["id"], exported["id"]):
        for who in ("owner", "peer", "red", "admin"):
            http = server.http(tokens[who])
            for path in ("", "/content"):
                detail = _error(http.get(f"/v1/artefacts/{aid}{path}"), 404, "NOT_FOUND")
                assert detail.replace(aid, unknown) == _error(
                    http.get(f"/v1/artefacts/{unknown}{path}"), 404, "NOT_FOUND"
                )
            assert aid not in [a["id"] for a in http.get("/v1/artefacts").json()["artefacts"]]
        for method, suffix, body in (
            ("DELETE", "", None),
            ("POST", "/share", {"swarm": "blue"}),
            ("DELETE", "/share", {"swarm": "red"}),
            ("POST", "/extend", {"ttl_seconds": 3600}),
            ("POST", "/refresh", None),
        ):
            _error(owner.request(method, f"/v1/artefacts/{aid}{suffix}", json=body), 404, "NOT_FOUND")
        for who in ("owner", "red"):
            with QuiverClient(server.flight_url, tokens[who]) as quiver:
                with pytest.raises(QuiverClientError) as e:
                    quiver.get_artefact(aid)
                assert e.value.code == "NOT_FOUND"
                with pytest.raises(QuiverClientError) as e:
                    quiver.refresh(aid)
                assert e.value.code == "NOT_FOUND"
    with QuiverClient(server.flight_url, tokens["red"]) as quiver:
        with pytest.raises(QuiverClientError) as e:
            quiver.query(f"SELECT * FROM {table['sql_name']}")
        assert e.value.code == "PERMISSION_DENIED" and "does not exist" in e.value.detail
    with QuiverClient(server.flight_url, tokens["owner"]) as quiver:
        with pytest.raises(QuiverClientError) as e:
            quiver.fetch(info)
        assert e.value.code == "NOT_FOUND"
