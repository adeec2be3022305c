"""Server memory while a large result streams (issue #10, target 6).

Not in the default ``make bench`` run (it streams gigabytes): run it with
``python -m tests.bench memory``.

Two measurements against real ``quiver serve`` subprocesses (default configuration otherwise),
the server's resident set read from ``/proc/<pid>/status`` (``VmRSS``, sampled every 10 ms by
a thread of the benchmark process; ``VmHWM``, the kernel's own peak, read at the end):

- a 10,000,000-row result (``QUIVER_BENCH_SLOW_ROWS``; ~40 bytes a row as Arrow) read by a slow
  client that sleeps ``QUIVER_BENCH_SLOW_SLEEP`` seconds (default 0.05) between batches: the
  RSS growth above the idle server must stay within 256 MB;
- a generated result of several GB (``QUIVER_BENCH_BIG_ROWS`` rows of ~200 bytes, default
  20,000,000: about 4 GB) streamed to the end by a client reading as fast as it can, from a
  server under ``[limits] memory_limit`` of ``QUIVER_BENCH_BIG_MEMORY_LIMIT_MB`` (default 512,
  DuckDB's own bound) with ``max_rows`` raised so that the result is not cut. A result larger
  than the machine's memory (23 GB here, shared by five engineers) is not run; a bounded peak
  RSS on a result eight times the memory limit shows the same property.

Both results come from ``FROM range(n)`` (allowed by the guard: rows stream at run time under
the query's limits), so no multi-GB table is written to disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from tests.bench.bench_agent import Quiver, _start
from tests.bench.bench_flight import TABLE_SQL, _say

DEFAULT = False

SLOW_ROWS = int(os.environ.get("QUIVER_BENCH_SLOW_ROWS", "10000000"))
SLOW_SLEEP = float(os.environ.get("QUIVER_BENCH_SLOW_SLEEP", "0.05"))
BIG_ROWS = int(os.environ.get("QUIVER_BENCH_BIG_ROWS", "20000000"))
BIG_MEMORY_LIMIT_MB = int(os.environ.get("QUIVER_BENCH_BIG_MEMORY_LIMIT_MB", "512"))
BIG_MEMORY_LIMIT = f"{BIG_MEMORY_LIMIT_MB}MB"
SLOW_SQL = "SELECT i AS id, hash(i) AS h, i * 0.5 AS x, 'row-' || i::VARCHAR AS s FROM range({rows}) t(i)"
BIG_SQL = "SELECT i AS id, repeat('x', 190) || i::VARCHAR AS s FROM range({rows}) t(i)"
GROWTH_TARGET_MB = 256
LONG = {"QUIVER_LIMITS_QUERY_TIMEOUT_SECONDS": "1800", "QUIVER_LIMITS_TICKET_TTL_SECONDS": "1800"}


def _rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class _Sampler:
    """The peak of a process's VmRSS, sampled every 10 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = _rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_kb = max(self.peak_kb, _rss_kb(self.pid))

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Stream:
    rows: int
    batches: int
    gb: float
    seconds: float
    baseline_mb: float
    peak_mb: float
    hwm_mb: float
    end_mb: float


def _stream(q: Quiver, template: str, rows: int, sleep: float) -> Stream:
    """Read one query's result batch by batch (sleeping between batches), sampling the
    server's RSS from before GetFlightInfo to after the last batch."""
    # Idle baseline: after a small query of the same shape has run (cursors, guard, pools).
    q.client.query(template.format(rows=1000))
    sql = template.format(rows=rows)
    time.sleep(1.0)
    baseline = _rss_kb(q.pid)
    got = batches = nbytes = 0
    started = time.perf_counter()
    with _Sampler(q.pid) as sampler:
        info = q.info(q.query_cmd(sql))
        for endpoint in info.endpoints:
            reader = q.raw.do_get(endpoint.ticket, q.opts)
            while True:
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    break
                got += chunk.data.num_rows
                nbytes += chunk.data.nbytes
                batches += 1
                if sleep:
                    time.sleep(sleep)
    seconds = time.perf_counter() - started
    end = _rss_kb(q.pid)
    return Stream(
        rows,
        batches,
        nbytes / 1e9,
        seconds,
        baseline / 1024,
        sampler.peak_kb / 1024,
        _rss_kb(q.pid, "VmHWM") / 1024,
        end / 1024,
    )


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="quiver-bench-memory-"))
    try:
        return _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path) -> str:
    load_before = os.getloadavg()
    for name in ("slow", "big"):
        with duckdb.connect(str(work / f"{name}.duckdb")) as con:
            con.execute(TABLE_SQL.format(rows=1000))
    with contextlib.ExitStack() as stack:
        slow = _start(stack, work, "quiver-slow", work / "slow.duckdb", LONG)
        s = _stream(slow, SLOW_SQL, SLOW_ROWS, SLOW_SLEEP)
        _say(f"slow client, {s.rows:,} rows: {json.dumps(s.__dict__)}")
        assert s.rows == SLOW_ROWS, s.rows
        stack.close()
        env = {
            **LONG,
            "QUIVER_LIMITS_MEMORY_LIMIT": BIG_MEMORY_LIMIT,
            "QUIVER_LIMITS_MAX_ROWS": str(10 * BIG_ROWS),
        }
        big = _start(stack, work, "quiver-big", work / "big.duckdb", env)
        b = _stream(big, BIG_SQL, BIG_ROWS, 0.0)
        _say(f"big result, {b.rows:,} rows: {json.dumps(b.__dict__)}")
        assert b.rows == BIG_ROWS, b.rows
    load_after = os.getloadavg()
    growth = s.peak_mb - s.baseline_mb
    big_growth, big_bound = b.peak_mb - b.baseline_mb, BIG_MEMORY_LIMIT_MB + GROWTH_TARGET_MB
    lines = [
        "## Server memory under large results (issue #10, target 6)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m tests.bench memory` (not in the "
        "default run). `quiver serve` runs as a subprocess (default configuration: result cache on, "
        "hot-table cache on); its RSS is read from `/proc/<pid>/status` — `VmRSS` sampled every 10 ms from "
        "GetFlightInfo to the last batch, `VmHWM` (the kernel's peak since start) at the end; the baseline "
        "is the idle server after a small query of the same shape. Results are generated by `FROM range(n)`. "
        "Machine load average (1/5/15 min) "
        f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after, on {os.cpu_count()} cores.",
        "",
        "| measure | result | client | server RSS baseline → peak (growth) | VmHWM | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| slow client: `{SLOW_SQL.format(rows=SLOW_ROWS)}` | {s.rows:,} rows, {s.batches} batches, "
        f"{s.gb:.2f} GB as Arrow | sleeps {SLOW_SLEEP:g} s per batch; {s.seconds:.1f} s | "
        f"{s.baseline_mb:.0f} → {s.peak_mb:.0f} MB (+{growth:.0f} MB) | {s.hwm_mb:.0f} MB | "
        f"growth <= {GROWTH_TARGET_MB} MB | {'yes' if growth <= GROWTH_TARGET_MB else 'no'} |",
        f"| large result: `{BIG_SQL.format(rows=BIG_ROWS)}`, `[limits] memory_limit = "
        f"{BIG_MEMORY_LIMIT}` | {b.rows:,} rows, {b.batches} batches, {b.gb:.2f} GB as Arrow | as fast "
        f"as it reads; {b.seconds:.1f} s ({b.gb / b.seconds * 1e3:.0f} MB/s) | {b.baseline_mb:.0f} → "
        f"{b.peak_mb:.0f} MB (+{big_growth:.0f} MB) | {b.hwm_mb:.0f} MB | streams to the end; growth <= "
        f"memory_limit + {GROWTH_TARGET_MB} MB | {'yes' if b.rows == BIG_ROWS and big_growth <= big_bound else 'no'} |",
    ]
    text = "\n".join(lines)
    _say(text)
    return text
