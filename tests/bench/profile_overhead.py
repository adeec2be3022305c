"""Quiver's fixed cost per analytic request, apart from DuckDB's run (issue #10, target 3): not
a test and not part of ``make bench``.

    python -m tests.bench.profile_overhead [ROUNDS]

The queries of tests/bench/bench_analytic.py on a star schema of the same tables and columns
but a few rows each, so that DuckDB's run takes next to nothing and what is left is what does
not grow with the data: DuckDB's parse, bind and plan of a multi-join text (paid in process
too) and Quiver's own work (the guard, the call, authentication, admission, the query log).
Each round sends every query once, with a new text each time (a comment with the round), to
in-process DuckDB (a read-only connection to the server's file) and to a ``quiver serve`` of
this tree through ``QuiverClient`` (the result comes inline: one call), alternating which goes
first. Prints per query the medians of both and their difference, and the median difference
over all queries: the milliseconds a 0.1 s query would need to lose for a 0.97x ratio are
3.1 (0.1 / 0.97 - 0.1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from tests.bench.ab_point import _Server, span
from tests.bench.bench_analytic import QUERIES, STAR_SQL
from tests.bench.bench_flight import ROOT

#: A few rows per table: every join and aggregate runs, on next to no data.
TINY = {"range(2557)": "range(30)", "range(1000000)": "range(40)", "range(200000)": "range(40)"}


def main(argv: list[str]) -> int:
    from quiver_client import QuiverClient

    rounds = int(argv[0]) if argv else 30
    work = Path(tempfile.mkdtemp(prefix="quiver-overhead-"))
    started, load_before = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    inproc: dict[str, list[float]] = {name: [] for name in QUERIES}
    served: dict[str, list[float]] = {name: [] for name in QUERIES}
    try:
        sql = STAR_SQL
        for big, small in TINY.items():
            sql = sql.replace(big, small)
        db = work / "tiny.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute(sql.format(rows=200))
            con.execute("CHECKPOINT")
        shutil.copyfile(db, work / "quiver.duckdb")
        with contextlib.ExitStack() as stack:
            server = _Server(stack, ROOT, work, "quiver", work / "quiver.duckdb", tables="star.*")
            client = stack.enter_context(QuiverClient(server.url, server.token))
            con = stack.enter_context(duckdb.connect(str(db), read_only=True))
            for text in QUERIES.values():  # warm-up: connections, catalog lists, imports
                client.query(text + " -- warm")
                con.sql(text + " -- warm").to_arrow_table()
            for r in range(rounds):
                for name, text in QUERIES.items():
                    fresh = f"{text} -- round {r}"
                    order = ("duckdb", "quiver") if r % 2 == 0 else ("quiver", "duckdb")
                    for who in order:
                        t0 = time.perf_counter()
                        if who == "duckdb":
                            con.sql(fresh).to_arrow_table()
                            inproc[name].append(time.perf_counter() - t0)
                        else:
                            client.query(fresh)
                            served[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# Fixed cost per analytic request, {span(started, load_before, f'{rounds} rounds')}\n")
    print("| query | in-process DuckDB p50 ms | Quiver (QuiverClient) p50 ms | difference ms |")
    print("| --- | --- | --- | --- |")
    gaps = []
    for name in QUERIES:
        a, b = statistics.median(inproc[name]) * 1e3, statistics.median(served[name]) * 1e3
        gaps.append(b - a)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    print(f"\nMedian difference over the {len(QUERIES)} queries: {statistics.median(gaps):+.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
