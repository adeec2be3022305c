"""In-process DuckDB in a process of its own: the A/A reference of the analytic benchmark
(tests/bench/bench_analytic.py).

A ``quiver serve`` is a separate process with its own DuckDB instance; in-process DuckDB in
the benchmark process is another. Two fresh processes running the same DuckDB plans on
copies of the same file differ by themselves — on this 2-core VM a ~0.1 s query's median
moved between 93 and 133 ms from one fresh process to the next (tests/bench/PROFILE.md,
section 12) — so a per-query ratio of two processes carries that spread, whoever serves.
This process is the second DuckDB with nothing of Quiver in it: the ratio of in-process
DuckDB to it is the spread an A/A comparison shows, beside the one against Quiver.

    python -m tests.bench.plain_duckdb FILE

reads one JSON object per line on stdin, ``{"sql": ...}``, runs it as the benchmark's
in-process reference does (``con.sql(sql).to_arrow_table()`` on a ``read_only`` connection)
and answers one line, ``{"seconds": ..., "rows": ...}`` (the time of that call alone: the
pipe is not counted), or ``{"error": ...}``. Ends at end of input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb


class PlainDuckdb:
    """The benchmark's side: a ``plain_duckdb`` subprocess on ``path``."""

    def __init__(self, path: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.plain_duckdb", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.pid = self._proc.pid

    def query(self, sql: str) -> tuple[float, int]:
        """DuckDB's seconds for ``sql`` in that process, and the rows."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"sql": sql}) + "\n")
        self._proc.stdin.flush()
        answer = json.loads(self._proc.stdout.readline() or '{"error": "the process ended"}')
        if "error" in answer:
            raise RuntimeError(f"plain DuckDB process: {answer['error']}")
        return float(answer["seconds"]), int(answer["rows"])

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def main(path: str) -> int:
    con = duckdb.connect(path, read_only=True)
    for line in sys.stdin:
        try:
            sql = json.loads(line)["sql"]
            started = time.perf_counter()
            rows = con.sql(sql).to_arrow_table().num_rows
            answer: dict[str, object] = {"seconds": time.perf_counter() - started, "rows": rows}
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
