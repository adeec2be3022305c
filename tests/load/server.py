"""The server under load: a real ``quiver serve --demo`` subprocess on ephemeral ports of
127.0.0.1, started under an address-space cap, watched for its death, its RSS sampled.

Why a cap: a server that a hostile query makes allocate without bound must crash (and be
reported as crashed) rather than take the machine's memory from everything else on it. The
cap is ``RLIMIT_AS`` set in the child before ``exec`` (``0`` disables it).

Why a log file, not pipes: under load the server logs every call; a pipe nobody drains fills
up and blocks the server, which would measure the harness, not Quiver.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.harness import DEMO_SCALE, wait_until

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
START_TIMEOUT_SECONDS = 180.0
RSS_INTERVAL_SECONDS = 0.25


def proc_status(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``VmSize`` and ``VmPeak`` of ``pid`` in bytes (Linux ``/proc/<pid>/status``);
    empty once the process is gone."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "VmPeak"):
            out[key] = int(value.split()[0]) * 1024
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat``); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def exit_description(code: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL (-9)``: a negative Popen code is a signal."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name} ({code})"
    return f"exit code {code}"


class LoadServer:
    """``quiver serve --demo`` in a subprocess; :meth:`stop` ends it (SIGTERM, then SIGKILL).

    A monitor thread polls the process and samples its memory every
    ``RSS_INTERVAL_SECONDS``; when the process dies it records when and how, and calls
    ``on_death`` (the load run uses it to stop its agents at once instead of letting them
    time out one call after another)."""

    def __init__(
        self,
        work: Path,
        *,
        scale: float = DEMO_SCALE,
        settings: dict[str, str] | None = None,
        memory_cap_bytes: int = 6 * GIB,
    ) -> None:
        self.work = work
        self.data_dir = work / "data"
        self.log_path = work / "server.log"
        self.memory_cap_bytes = memory_cap_bytes
        env = {
            **os.environ,
            "QUIVER_DEMO_SCALE": str(scale),
            "QUIVER_SERVER_LOG_FORMAT": "json",
            **{f"QUIVER_{k.replace('.', '_').upper()}": v for k, v in (settings or {}).items()},
        }
        args = [sys.executable, "-m", "quiver", "serve", "--demo", "--data-dir", str(self.data_dir)]
        args += ["--host", "127.0.0.1", "--flight-port", "0", "--http-port", "0"]
        cap = memory_cap_bytes

        def limit() -> None:  # runs in the child, before exec
            if cap > 0:
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, preexec_fn=limit
            )
        self.pid = self.proc.pid
        self.flight_url, self.http_url = self._wait_banner()
        self.admin_token = (self.data_dir / "admin.token").read_text().strip()
        self.started_at = time.monotonic()
        #: When the load began (time.monotonic()); death times are told from it once set.
        self.load_started: float | None = None
        self.died_at: float | None = None  # time.monotonic() of an unasked-for exit
        self.exit_code: int | None = None
        self.samples: list[tuple[float, int]] = []  # (seconds after started_at, VmRSS bytes)
        self.last_status: dict[str, int] = {}
        self.last_cpu = 0.0  # CPU seconds at the last sample
        self.on_death: Callable[[], None] | None = None
        self._stopping = False
        self._monitor_stop = threading.Event()
        self._monitor = threading.Thread(target=self._sample, name="load-server-rss", daemon=True)
        self._monitor.start()
        # A thread blocked in wait() learns of a death at once (polling would let the agents
        # spin against a dead port until the next poll).
        self._waiter = threading.Thread(target=self._wait, name="load-server-wait", daemon=True)
        self._waiter.start()

    # --- start ---------------------------------------------------------------------------
    def _wait_banner(self) -> tuple[str, str]:
        def banner() -> tuple[str, str] | None:
            text = self.log_path.read_text(errors="replace")
            flight_url = http_url = ""
            for line in text.splitlines():
                if "Arrow Flight:" in line:
                    flight_url = line.split("Arrow Flight:")[1].strip()
                if "Control plane:" in line:
                    http_url = line.split("Control plane:")[1].split()[0]
            if "Stop with Ctrl-C" in text and flight_url and http_url:
                return flight_url, http_url
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"quiver serve {exit_description(self.proc.returncode)} before serving:\n"
                    + self.log_tail()
                )
            return None

        try:
            return wait_until(banner, START_TIMEOUT_SECONDS, 0.1, what="the banner")
        except AssertionError:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(
                f"quiver serve did not serve within {START_TIMEOUT_SECONDS:g} s:\n{self.log_tail()}"
            ) from None

    # --- watching ------------------------------------------------------------------------
    def _wait(self) -> None:
        code = self.proc.wait()
        if not self._stopping:
            self.died_at = time.monotonic()
            self.exit_code = code
            if self.on_death is not None:
                self.on_death()

    def _sample(self) -> None:
        while not self._monitor_stop.is_set() and self.proc.poll() is None:
            status = proc_status(self.pid)
            if "VmRSS" in status:
                self.last_status = status
                self.samples.append((time.monotonic() - self.started_at, status["VmRSS"]))
            cpu = proc_cpu_seconds(self.pid)
            if cpu is not None:
                self.last_cpu = cpu
            self._monitor_stop.wait(RSS_INTERVAL_SECONDS)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_now(self) -> float:
        cpu = proc_cpu_seconds(self.pid)
        return self.last_cpu if cpu is None else cpu

    def rss_now(self) -> int:
        return proc_status(self.pid).get("VmRSS", 0)

    def death(self) -> str | None:
        """``server died at t=12.3s into the load, killed by SIGKILL (-9)``, or None while it
        lives (or after a stop it was asked for)."""
        if self.died_at is None or self.exit_code is None:
            return None
        if self.load_started is not None:
            when = f"t={self.died_at - self.load_started:.1f}s into the load"
        else:
            when = f"t={self.died_at - self.started_at:.1f}s after start, before the load"
        return f"server died at {when}, {exit_description(self.exit_code)}"

    def log_tail(self, lines: int = 15, width: int = 300) -> str:
        """The last lines of the server's log, each cut to ``width`` characters."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return "\n".join(line if len(line) <= width else line[:width] + " …" for line in tail)

    def logged_errors(self, width: int = 160) -> dict[str, int]:
        """The server's own error events during the run, counted by event and the last line
        of their exception (``flight.internal_error: RuntimeError: can't start new thread``):
        what lies behind the INTERNAL answers the agents got."""
        counts: Counter[str] = Counter()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        for line in lines:
            if not line.startswith("{") or '"level": "error"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            last = str(event.get("exception") or "").strip().splitlines()[-1:] or [""]
            key = f"{event.get('event')}: {last[0]}".strip().rstrip(":")
            counts[key if len(key) <= width else key[:width] + " …"] += 1
        return dict(counts.most_common())

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.http_url, headers={"authorization": f"Bearer {self.admin_token}"}, timeout=30
        )

    # --- stop ----------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a clean stop: checkpoint and close), SIGKILL after ``timeout``; the exit
        code. A server that had already died keeps its death on record."""
        self._stopping = self.died_at is None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._monitor_stop.set()
        with contextlib.suppress(RuntimeError):
            self._monitor.join(5)
            self._waiter.join(5)
        return code
