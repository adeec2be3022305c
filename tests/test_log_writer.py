"""The background log writer (quiver/logs.py ``LogWriter``): every record arrives, in the
order it was logged, none is lost at a clean stop, and a full queue drops (and counts)
records instead of blocking the thread that logs or growing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import httpx
import pyarrow.flight as flight
import pytest

from quiver.logs import LogWriter, _chain, redact
from tests.harness import ServeProcess, call_options

pytestmark = pytest.mark.slow  # subprocess servers

ROOT = Path(__file__).resolve().parents[1]


def _json_render() -> Any:
    import structlog

    return _chain([redact, structlog.processors.JSONRenderer()])


class _Reader(threading.Thread):
    """Reads a pipe to its end, in the background (a server's stderr, a writer's pipe)."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self._file = os.fdopen(fd, "r")
        self.text = ""

    def run(self) -> None:
        self.text = self._file.read()


def test_records_from_racing_threads_all_arrive_in_each_threads_order(tmp_path: Path) -> None:
    """Eight threads log 500 numbered records each at once; after ``close`` the stream holds
    all 4,000, each thread's in the order it logged them, every one rendered by the writer
    (redaction included)."""
    out = tmp_path / "log.jsonl"
    with out.open("w") as stream:
        writer = LogWriter(stream, _json_render())

        def logger(t: int) -> None:
            for i in range(500):
                writer.submit("info", {"event": "n", "thread": t, "i": i, "token": "secret"})

        threads = [threading.Thread(target=logger, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        writer.close()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4000 and writer.dropped == 0
    for t in range(8):
        assert [r["i"] for r in records if r["thread"] == t] == list(range(500))
    assert {r["token"] for r in records} == {"[redacted]"}


def test_flush_writes_everything_queued_before_it(tmp_path: Path) -> None:
    out = tmp_path / "log.jsonl"
    with out.open("w") as stream:
        writer = LogWriter(stream, _json_render())
        for i in range(100):
            writer.submit("info", {"event": "n", "i": i})
        writer.submit_line('{"event": "preformatted"}')
        assert writer.flush()
        lines = out.read_text().splitlines()
        assert [json.loads(line).get("i") for line in lines] == [*range(100), None]
        writer.close()
        writer.submit("info", {"event": "after close"})  # dropped and counted, not written
    assert writer.dropped == 1
    assert "after close" not in out.read_text()


def test_a_full_queue_drops_and_counts_without_blocking_or_growing() -> None:
    """The writer's stream blocks (a pipe nobody reads: its buffer fills); the thread that
    logs goes on at once, the queue never holds more than its bound, the excess is counted,
    and once the stream drains every kept record is written in order, then one
    ``log.dropped`` line with the count."""
    read_fd, write_fd = os.pipe()
    stream = os.fdopen(write_fd, "w")
    writer = LogWriter(stream, _json_render(), max_records=200)
    big = "x" * 2000  # a 64 KiB pipe buffer holds ~30 of these: the writer blocks soon
    longest = 0

    def flood() -> None:
        nonlocal longest
        for i in range(5000):
            writer.submit("info", {"event": "n", "i": i, "pad": big})
            longest = max(longest, writer.pending)

    logger = threading.Thread(target=flood)
    logger.start()
    logger.join(60)
    assert not logger.is_alive(), "submit blocked on a full queue"
    assert longest <= 200
    assert writer.dropped > 0
    dropped = writer.dropped
    reader = _Reader(read_fd)
    reader.start()  # the stream drains now
    writer.close()
    stream.close()
    reader.join(60)
    records = [json.loads(line) for line in reader.text.splitlines()]
    kept = [r["i"] for r in records if r["event"] == "n"]
    assert kept == sorted(kept) and len(kept) == 5000 - dropped
    assert [r["records"] for r in records if r["event"] == "log.dropped"] == [dropped]


_SCRIPT = textwrap.dedent(
    """
    import structlog, threading
    from quiver import logs

    logs.configure("json", "info")
    log = structlog.get_logger("t")
    try:
        raise KeyError("the handled one")
    except KeyError:
        log.exception("failed")  # rendered later, in the writer thread
    try:
        raise ValueError("a later one")
    except ValueError:
        pass
    for i in range(2000):
        log.info("n", i=i)
    # no flush: the process's normal exit writes what is queued
    """
)


def test_exit_flushes_and_exceptions_are_taken_where_they_are_handled() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records[0]["event"] == "failed" and "KeyError: 'the handled one'" in records[0]["exception"]
    assert [r["i"] for r in records[1:]] == list(range(2000))


def test_a_served_calls_records_all_reach_the_log_by_a_clean_stop(tmp_path: Path) -> None:
    """Eight threads race Flight calls against a real ``quiver serve``; after SIGTERM its
    stderr holds one ``flight.call`` record per call (the last ones written by the stop's
    flush), and ``/metrics`` reports no dropped record."""
    serve = ServeProcess(
        tmp_path / "data",
        "--demo",
        env={"QUIVER_SERVER_LOG_FORMAT": "json", "QUIVER_SERVER_LOG_LEVEL": "info"},
    )
    assert serve.proc.stderr is not None
    reader = _Reader(os.dup(serve.proc.stderr.fileno()))
    reader.start()
    try:
        token = (tmp_path / "data" / "demo-agent.token").read_text().strip()
        admin = (tmp_path / "data" / "admin.token").read_text().strip()
        calls = 40

        def agent() -> None:
            client = flight.FlightClient(serve.flight_url)
            opts = call_options(token)
            for _ in range(calls):
                list(client.do_action(flight.Action("whoami", b""), opts))
            client.close()

        threads = [threading.Thread(target=agent) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        metrics = httpx.get(f"{serve.http_url}/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert metrics.status_code == 200
        assert "quiver_log_records_dropped_total 0.0" in metrics.text
    finally:
        code = serve.stop()
    assert code == 0
    serve.proc.stderr.close()
    reader.join(60)
    records = [json.loads(line) for line in reader.text.splitlines() if line.startswith("{")]
    whoami = [r for r in records if r.get("event") == "flight.call" and r.get("action") == "whoami"]
    assert len(whoami) == 8 * calls
    assert len({r["request_id"] for r in whoami}) == 8 * calls
    assert any(r.get("event") == "quiver.stopped" for r in records)
    assert not any(r.get("event") == "log.dropped" for r in records)
