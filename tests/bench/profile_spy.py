"""py-spy profiles of a real ``quiver serve`` (a subprocess) under two workloads: fresh-text
point queries and query-command full scans (tests/bench/PROFILE.md).

    python -m tests.bench.profile_spy [OUT_DIR]

Needs ``py-spy`` (the dev extra) and the right to attach to a child process (root, or
``kernel.yama.ptrace_scope = 0``). For each workload py-spy samples every thread of the
server (``--native``: DuckDB's and Arrow's C++ frames too) while a client in this process
runs it; the raw stacks (and a flame graph SVG) go to OUT_DIR (default a temp dir), and a
summary prints the share of samples under the frames that matter. Samples of idle threads
(gRPC's pollers, the control plane's event loop) are left out (py-spy's default).
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb

from tests.bench.bench_agent import Quiver, _start
from tests.bench.bench_flight import TABLE_SQL

ROWS = 5_000_000
POINTS = 1500
SCANS = 8


def _record(pid: int, out: Path, fmt: str, work: threading.Thread) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args = [spy, "record", "--pid", str(pid), "--native", "--rate", "200", "--format", fmt, "-o", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    work.start()
    work.join()
    proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
    _, err = proc.communicate(timeout=60)
    if proc.returncode not in (0, -2) and not out.exists():
        raise RuntimeError(f"py-spy failed: {err.decode()[-500:]}")


def summarize(path: Path, top: int = 45) -> str:
    """Inclusive share of samples per frame (function name and file), from py-spy's raw format."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            name = re.sub(r":\d+\)$", ")", frame.strip())
            names.append(name)
        for name in dict.fromkeys(names):
            inclusive[name] += n
        leaf[names[-1]] += n
    lines = [f"samples {total}", "", "| inclusive | frame |", "| --- | --- |"]
    for name, n in inclusive.most_common(top):
        lines.append(f"| {100 * n / total:.1f}% | `{name[:140]}` |")
    lines += ["", "| self (leaf) | frame |", "| --- | --- |"]
    for name, n in leaf.most_common(20):
        lines.append(f"| {100 * n / total:.1f}% | `{name[:140]}` |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="quiver-spy-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="quiver-spy-work-"))
    try:
        with duckdb.connect(str(work / "w.duckdb")) as con:
            con.execute(TABLE_SQL.format(rows=ROWS))
            con.execute("CHECKPOINT")
        with contextlib.ExitStack() as stack:
            q: Quiver = _start(stack, work, "quiver", work / "w.duckdb", {})
            rng = random.Random(11)
            keys = rng.sample(range(ROWS), POINTS + 50)
            for k in keys[POINTS:]:
                q.client.query(f"SELECT * FROM bench.t WHERE id = {k}")

            def points() -> None:
                for k in keys[:POINTS]:
                    q.client.query(f"SELECT * FROM bench.t WHERE id = {k}")

            def scans() -> None:
                for _ in range(SCANS):
                    q.client.query("SELECT * FROM bench.t")

            for name, fn in (("point", points), ("scan", scans)):
                for fmt, suffix in (("raw", "txt"), ("flamegraph", "svg")):
                    _record(q.pid, out_dir / f"{name}.{suffix}", fmt, threading.Thread(target=fn))
                print(f"\n### py-spy, {name} workload\n")
                print(summarize(out_dir / f"{name}.txt"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nraw stacks and flame graphs in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
