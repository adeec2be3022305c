"""A client process killed in the middle of a DoPut (a real disconnect, not a cancel): the
server keeps nothing and its temporary file is reclaimed — for an artefact upload and for a
Flight SQL ingest, which run the same upload loop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from google.protobuf import any_pb2

from catalog.artefacts import TEMP_PREFIX
from flight_server.flight_sql import flight_sql_pb2 as pb
from tests.harness import Server, start_server, wait_until

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
