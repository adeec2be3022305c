"""Uploads cut by a real kill, not a cancel: a client process killed in the middle of a DoPut
(the server keeps nothing and reclaims its temporary file), and the server itself killed
while uploads stream (after a restart nothing is visible and the start-up sweep reclaims the
temporary files)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2

from catalog.artefacts import TEMP_PREFIX
from flight_server.flight_sql import flight_sql_pb2 as pb
from quiver_client import QuiverClient
from tests.harness import ServeProcess, Server, call_options, start_server, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("artefacts"), artefacts={"cleanup_interval_seconds": 0.2})
    assert s.http().post("/v1/swarms", json={"name": "art2", "tables": []}).status_code == 201
    yield s
    s.stop()


def artefact_files(s: Server) -> list[str]:
    return sorted(os.listdir(s.catalog.artefacts.directory))


UPLOADER = """
import sys, pyarrow as pa, pyarrow.flight as flight
url, token, command = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
c = flight.FlightClient(url)
table = pa.table({"x": pa.array(range(10_000), pa.int64())})
opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
d = flight.FlightDescriptor.for_command(command)
w, _ = c.do_put(d, table.schema, opts)
for _ in range(5):
    w.write_table(table)
print("sent", flush=True)
sys.stdin.read()
"""


def _ingest() -> bytes:
    wrapper = any_pb2.Any()
    wrapper.Pack(pb.CommandStatementIngest(table="cut"))
    return wrapper.SerializeToString()


@pytest.mark.parametrize(
    ("agent", "command"), [("cut", b'{"kind": "artefact", "name": "cut"}'), ("cut-ingest", _ingest())]
)
def test_disconnect_midway_keeps_nothing_and_the_janitor_reclaims(
    srv: Server, agent: str, command: bytes
) -> None:
    token = srv.mint("agent", "art2", agent)
    store = srv.catalog.artefacts
    before = [n for n in artefact_files(srv) if not n.startswith(TEMP_PREFIX)]
    proc = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, srv.flight_url, token, command.hex()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "sent"
        # The upload is in progress: its temporary file exists, nothing is visible.
        wait_until(
            lambda: any(n.startswith(TEMP_PREFIX) for n in artefact_files(srv)), what="the upload's temp file"
        )
        assert store.list(srv.catalog.tokens.verify(token)).items == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    wait_until(
        lambda: not any(n.startswith(TEMP_PREFIX) for n in artefact_files(srv)),
        what="the temp file reclaimed",
    )
    assert artefact_files(srv) == before
    assert store.list(srv.catalog.tokens.verify(token)).items == []


def _temp_files(data_dir: Path) -> list[str]:
    directory = data_dir / "artefacts"
    return sorted(n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX)) if directory.is_dir() else []


def _form_upload(url: str, token: str, started: threading.Event, release: threading.Event) -> None:
    """A multipart file upload whose body stops midway until ``release`` (never, here: the
    server is killed under it)."""
    boundary = "killed-server"
    head = (
        f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="half.bin"\r\n\r\n'
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(8):
            yield b"z" * 65_536
        started.set()
        release.wait(60)
        yield f"\r\n--{boundary}--\r\n".encode()

    with contextlib.suppress(httpx.HTTPError):
        httpx.post(
            f"{url}/v1/artefacts",
            content=body(),
            headers={
                "authorization": f"Bearer {token}",
                "content-type": f"multipart/form-data; boundary={boundary}",
            },
            timeout=60,
        )


def test_a_server_killed_mid_upload_keeps_nothing_and_reclaims_the_temp_files_at_start(
    tmp_path: Path,
) -> None:
    """SIGKILL of ``quiver serve`` while a Flight upload and an HTTP upload stream: after a
    restart on the same data directory no artefact is visible (nothing was committed) and the
    start-up sweep removes both temporary files; the store takes new uploads."""
    data = tmp_path / "var"
    serve = ServeProcess(data, "--demo")
    release = threading.Event()
    uploader: threading.Thread | None = None
    try:
        token = (data / "demo-agent.token").read_text().strip()
        client = flight.FlightClient(serve.flight_url)
        table = pa.table({"x": pa.array(range(10_000), pa.int64())})
        command = json.dumps({"kind": "artefact", "name": "cut by a crash"}).encode()
        writer, _ = client.do_put(
            flight.FlightDescriptor.for_command(command), table.schema, call_options(token)
        )
        for _ in range(5):
            writer.write_table(table)
        started = threading.Event()
        uploader = threading.Thread(target=_form_upload, args=(serve.http_url, token, started, release))
        uploader.start()
        assert started.wait(30)
        wait_until(lambda: len(_temp_files(data)) == 2, what="both uploads' temporary files")
        serve.proc.kill()
        assert serve.proc.wait(30) == -signal.SIGKILL
        with contextlib.suppress(flight.FlightError, OSError):
            writer.close()
        client.close()
    finally:
        release.set()
        if uploader is not None:
            uploader.join(60)
        serve.stop()
    left = _temp_files(data)
    assert len(left) == 2, left  # what the crash left behind

    serve = ServeProcess(data, "--demo")
    try:
        admin = httpx.Client(
            base_url=serve.http_url,
            headers={"authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"},
            timeout=30,
        )
        wait_until(lambda: not _temp_files(data), what="the start-up sweep")
        assert admin.get("/v1/artefacts").json()["artefacts"] == []
        section = admin.get("/v1/status").json()["artefacts"]
        assert (section["count"], section["bytes"], section["uploading"]) == (0, 0, 0)
        metrics = admin.get("/metrics").text
        assert 'quiver_artefacts_removed_total{reason="temp_file"} 2.0' in metrics
        assert sorted(os.listdir(data / "artefacts")) == []
        # The store is whole: the same upload now commits and reads back.
        with QuiverClient(serve.flight_url, token) as quiver:
            saved = quiver.put_table(table, "after the crash")
            assert quiver.get_artefact(saved["id"]).equals(table)
        assert [a["id"] for a in admin.get("/v1/artefacts").json()["artefacts"]] == [saved["id"]]
        admin.close()
    finally:
        serve.stop()
