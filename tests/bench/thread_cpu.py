"""Which threads of a ``quiver serve`` burn CPU per fresh-text point query
(tests/bench/PROFILE.md, section 9).

    python -m tests.bench.thread_cpu ROOT [CALLS]

A ``quiver serve`` from the tree ROOT on a 1,000,000-row ``bench.t`` (tests/bench/ab_point.py),
a warm-up, five idle seconds (what the server spends doing nothing), then CALLS (default
3000) fresh-text point queries from a raw pyarrow.flight client, one at a time. Before and
after, ``/proc/<pid>/task/*/stat`` (utime + stime of every thread) and ``/proc/<pid>/stat``
(the process: threads that ended meanwhile included), the threads' read at once after the
last answer (gRPC ends idle threads of its pool soon after). Threads are named by their kernel name
(``comm``: gRPC names its own) and, for Python's, by ``py-spy dump`` when py-spy is there.
Prints CPU ms per query per thread, the process total, the client's CPU per query and the
load average. Counters tick at 10 ms: over 3000 queries that is 0.003 ms per query.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import duckdb

from tests.bench.ab_point import FRESH, _cpu_seconds, _Server
from tests.bench.bench_flight import TABLE_SQL

ROWS = 1_000_000


def _threads(pid: int) -> dict[int, float]:
    """utime + stime (seconds) of every live thread of ``pid``."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _names(pid: int) -> dict[int, str]:
    """Thread id -> a name: Python's (py-spy dump), else the kernel's ``comm``."""
    names: dict[int, str] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            names[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(spy).exists():
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, check=False)
        for m in re.finditer(r'^Thread (0x[0-9A-Fa-f]+|\d+) \([^)]*\): "([^"]*)"', dump.stdout, re.M):
            names[int(m.group(1), 0)] = f"python: {m.group(2)}"
    return names


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve()
    calls = int(argv[1]) if len(argv) > 1 else 3000
    work = Path(tempfile.mkdtemp(prefix="quiver-thread-cpu-"))
    try:
        db = work / "a.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute(TABLE_SQL.format(rows=ROWS))
            con.execute("CHECKPOINT")
        with contextlib.ExitStack() as stack:
            s = _Server(stack, root, work, "server", db)
            keys = random.Random(20261202).sample(range(ROWS), calls + 300)
            for k in keys[calls:]:  # warm-up: gRPC threads, cursors, the shape caches, first flushes
                s.one(FRESH.format(k=k), None)
            time.sleep(6)  # past a housekeeping pass (the first query-log flush)
            idle0 = _cpu_seconds(s.pid)
            time.sleep(5)
            idle = (_cpu_seconds(s.pid) - idle0) / 5
            before, process0, client0 = _threads(s.pid), _cpu_seconds(s.pid), time.process_time()
            started = time.perf_counter()
            for k in keys[:calls]:
                s.one(FRESH.format(k=k), None)
            wall = time.perf_counter() - started
            client = time.process_time() - client0
            # At once: gRPC ends the threads of its pool that go idle, and an ended thread's
            # counters are gone (its CPU is then only in the process's).
            after, names = _threads(s.pid), _names(s.pid)
            process = _cpu_seconds(s.pid) - process0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by_name: dict[str, float] = defaultdict(float)
    for tid, cpu in after.items():
        spent = cpu - before.get(tid, 0.0)
        if spent > 0:
            by_name[names.get(tid, "?")] += spent
    counted = sum(by_name.values())
    print(
        f"# {time.strftime('%H:%M:%S', time.gmtime())} UTC, {root}, {calls} fresh-text point queries, load "
        f"{tuple(round(x, 2) for x in os.getloadavg())}: wall {wall / calls * 1e3:.3f} ms/query, server "
        f"process {process / calls * 1e3:.3f} ms CPU/query (idle: {idle * 1e3:.1f} ms CPU/s), client "
        f"{client / calls * 1e3:.3f} ms CPU/query\n"
    )
    print("| thread (Python name, else kernel name) | CPU ms per query |")
    print("| --- | --- |")
    for name, spent in sorted(by_name.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {spent / calls * 1e3:.3f} |")
    ended, started_threads = len(set(before) - set(after)), len(set(after) - set(before))
    print(
        f"| threads that ended meanwhile (process minus live threads; {ended} ended, "
        f"{started_threads} started) | {(process - counted) / calls * 1e3:.3f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
