"""Quiver's fixed cost per analytic request, apart from DuckDB's run (issue #10, target 3): not
a test and not part of ``make bench``.

    python -m tests.bench.profile_overhead [ROUNDS]

The queries of tests/bench/bench_analytic.py on a star schema of the same tables and columns
but a few rows each, so that DuckDB's run takes next to nothing and what is left is what does
not grow with the data: DuckDB's parse, bind and plan of a multi-join text (paid in process
too) and Quiver's own work (the guard, the call, authentication, admission, the query log).
Each round sends every query once, with a new text each time (a comment with the round), to
in-process DuckDB (a read-only connection to a copy of the server's file) two ways, and to a
``quiver serve`` of this tree through ``QuiverClient`` (the result comes inline: one call),
the order turning each round. The two in-process ways: ``con.sql(text).to_arrow_table()``
(the reference bench_analytic and the issue name; DuckDB's relation API, which parses and
binds a text twice) and the engine's submit step the server itself runs a query through
(flight_server/streams.py ``arrow_stream``). Prints per query the medians and Quiver's
difference to each, and the median differences over all queries: the milliseconds a 0.1 s
query would need to lose for a 0.97x ratio are 3.1 (0.1 / 0.97 - 0.1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from tests.bench.ab_point import _Server, span
from tests.bench.bench_analytic import QUERIES, STAR_SQL
from tests.bench.bench_flight import ROOT

#: The three ways a query is sent, each once per query and round.
CONTENDERS = ("relation", "submit", "quiver")
#: A few rows per table: every join and aggregate runs, on next to no data.
TINY = {"range(2557)": "range(30)", "range(1000000)": "range(40)", "range(200000)": "range(40)"}


def main(argv: list[str]) -> int:
    from quiver_client import QuiverClient

    rounds = int(argv[0]) if argv else 30
    work = Path(tempfile.mkdtemp(prefix="quiver-overhead-"))
    started, load_before = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    from flight_server.streams import arrow_stream

    # contender -> query -> seconds per repetition
    times: dict[str, dict[str, list[float]]] = {who: {name: [] for name in QUERIES} for who in CONTENDERS}
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
            run: dict[str, Callable[[str], object]] = {
                "relation": lambda t: con.sql(t).to_arrow_table(),
                "submit": lambda t: arrow_stream(con, t).read_all(),
                "quiver": client.query,
            }
            for text in QUERIES.values():  # warm-up: connections, catalog lists, imports
                for who in CONTENDERS:
                    run[who](text + " -- warm")
            for r in range(rounds):
                for name, text in QUERIES.items():
                    for i in range(len(CONTENDERS)):
                        who = CONTENDERS[(r + i) % len(CONTENDERS)]
                        t0 = time.perf_counter()
                        run[who](f"{text} -- round {r} {who}")
                        times[who][name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# Fixed cost per analytic request, {span(started, load_before, f'{rounds} rounds')}\n")
    print(
        "| query | in-process `con.sql().to_arrow_table()` p50 ms | in-process submit step p50 ms "
        "| Quiver (QuiverClient) p50 ms | Quiver minus relation ms | Quiver minus submit ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    gaps: dict[str, list[float]] = {"relation": [], "submit": []}
    for name in QUERIES:
        p50 = {who: statistics.median(times[who][name]) * 1e3 for who in CONTENDERS}
        for ref in gaps:
            gaps[ref].append(p50["quiver"] - p50[ref])
        print(
            f"| {name} | {p50['relation']:.2f} | {p50['submit']:.2f} | {p50['quiver']:.2f} "
            f"| {p50['quiver'] - p50['relation']:+.2f} | {p50['quiver'] - p50['submit']:+.2f} |"
        )
    print(
        f"\nMedian difference over the {len(QUERIES)} queries: {statistics.median(gaps['relation']):+.2f} ms "
        f"against `con.sql().to_arrow_table()`, {statistics.median(gaps['submit']):+.2f} ms against the submit step"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
