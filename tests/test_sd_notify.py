"""systemd's notify protocol, as the unit's ``Type=notify`` and ``WatchdogSec=`` use it: a
real ``quiver serve`` with ``NOTIFY_SOCKET`` pointing at an AF_UNIX datagram socket bound
here says READY=1 once both listeners accept, WATCHDOG=1 repeatedly while it runs, and
STOPPING=1 on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quiver.runtime import sd_notify, watchdog_interval
from tests.harness import start_server

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer.
    folder = tempfile.mkdtemp(prefix="qn-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _receive(sock: socket.socket, timeout: float) -> str | None:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        return None


def _accepts(url: str) -> bool:
    host, port = url.rsplit("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5):
        return True


def test_serve_notifies_ready_watchdog_and_stopping(
    notify_socket: tuple[socket.socket, str], tmp_path: Path
) -> None:
    sock, path = notify_socket
    log = tmp_path / "quiver.log"
    env = {
        **os.environ,
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "600000",  # pings every 0.3 s
        "QUIVER_SERVER_LOG_FORMAT": "json",
    }
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quiver",
                "serve",
                "--data-dir",
                str(tmp_path / "data"),
                "--flight-port",
                "0",
                "--http-port",
                "0",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        first = _receive(sock, 90)
        assert first == "READY=1", (first, log.read_text()[-3000:])
        # READY=1 is sent only after both listeners accept: connect to both right away.
        started = next(
            json.loads(line) for line in log.read_text().splitlines() if '"quiver.started"' in line
        )
        assert _accepts(started["flight"]) and _accepts(started["http"])

        pings = [_receive(sock, 30) for _ in range(3)]
        assert pings == ["WATCHDOG=1"] * 3, (pings, log.read_text()[-3000:])

        proc.send_signal(signal.SIGTERM)
        states = []
        while (state := _receive(sock, 60)) is not None and state != "STOPPING=1":
            states.append(state)
        assert state == "STOPPING=1", (states, log.read_text()[-3000:])
        assert set(states) <= {"WATCHDOG=1"}
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_watchdog_pings_stop_when_a_listener_stops_accepting(
    notify_socket: tuple[socket.socket, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that still runs but no longer serves Flight must not keep feeding the
    watchdog: systemd then kills and restarts it (WatchdogSec=)."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a pass every 0.2 s
    server = start_server(tmp_path / "data", demo=False)
    try:
        assert _receive(sock, 30) == "READY=1"
        assert [_receive(sock, 30) for _ in range(2)] == ["WATCHDOG=1"] * 2
        assert server.runtime.flight is not None
        server.runtime.flight.shutdown()
        # A pass that began before the shutdown may still ping once; then silence for
        # ten passes' worth.
        late = []
        while (state := _receive(sock, 2)) is not None:
            late.append(state)
            assert len(late) <= 2, late
        assert set(late) <= {"WATCHDOG=1"}
    finally:
        server.stop()
    assert _receive(sock, 5) == "STOPPING=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    assert sd_notify("READY=1", environ={}) is False
    assert watchdog_interval({}) is None


def test_abstract_socket_address() -> None:
    """systemd may name an abstract socket (``@name``): the leading @ stands for a NUL."""
    name = f"quiver-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0" + name)
    try:
        assert sd_notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert _receive(abstract, 5) == "READY=1"
    finally:
        abstract.close()


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    """A socket that went away is logged, never raised: telling systemd is best effort."""
    assert sd_notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "60000000"}) == 30.0
    mine = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 30.0
    # Another process's watchdog (inherited environment) is not ours to feed.
    assert watchdog_interval({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
