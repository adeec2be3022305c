"""Flight SQL (issue #13): a full scan through the ADBC Flight SQL driver against Quiver's own client.

Both ask one real ``quiver serve`` (subprocess, on the ``bench.t`` table of
``QUIVER_BENCH_ROWS`` rows that tests/bench/bench_flight.py builds) the same query,
``SELECT * FROM bench.t``: ``QuiverClient.query`` as a JSON ``query`` command, and the ADBC
driver's ``cursor.execute`` + ``fetch_arrow_table`` as a Flight SQL prepared statement (the
driver prepares every statement). Each contender also runs with every cache that holds table
data off (a second server), so the figure is the query path's, not the cache's. Target: ADBC
within 10% of QuiverClient.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tests.bench.bench_flight import REPS, ROWS, Row, _build, _say, _settle, _start_quiver

SCAN_SQL = "SELECT * FROM bench.t"
CACHES_OFF = {"QUIVER_CACHE_ENABLED": "false", "QUIVER_CACHE_TABLE_MEMORY_BYTES": "0"}
TARGET = 1.10
#: Only when named (`python -m tests.bench flightsql`): it builds its own copy of bench.t.
DEFAULT = False


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="quiver-bench-flightsql-"))
    try:
        return _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _contenders(stack: contextlib.ExitStack, url: str, token: str) -> dict[str, Callable[[], int]]:
    import adbc_driver_flightsql.dbapi as flight_sql

    from quiver_client import QuiverClient

    client = stack.enter_context(QuiverClient(url, token))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn = flight_sql.connect(
            url, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {token}"}, autocommit=True
        )
    stack.callback(conn.close)
    cur = conn.cursor()
    stack.callback(cur.close)

    def adbc() -> int:
        cur.execute(SCAN_SQL)
        return int(cur.fetch_arrow_table().num_rows)

    return {"quiver_client": lambda: client.query(SCAN_SQL).num_rows, "adbc": adbc}


def _run(work: Path) -> str:
    load_before = os.getloadavg()
    db_path, _, mb = _build(work, [0])
    shutil.copyfile(db_path, work / "off.duckdb")
    medians: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        for server, db, env in (("on", db_path, {}), ("off", work / "off.duckdb", CACHES_OFF)):
            url, tokens, _, _ = _start_quiver(stack, work, f"quiver-{server}", db, env)
            scans = _contenders(stack, url, tokens[0])
            for name, scan in scans.items():  # warm-up and a correctness check
                assert scan() == ROWS, name
            times: dict[str, list[float]] = {name: [] for name in scans}
            for _ in range(REPS):
                for name, scan in scans.items():
                    _settle()
                    started = time.perf_counter()
                    scan()
                    times[name].append(time.perf_counter() - started)
            for name, ts in times.items():
                medians[f"{name}/{server}"] = statistics.median(ts)
                _say(f"scan {name} (caches {server}): {_rate(medians[f'{name}/{server}'])}")
    load_after = os.getloadavg()
    rows = []
    for server, label in (("on", "default configuration"), ("off", "caches holding table data off")):
        ours, theirs = medians[f"quiver_client/{server}"], medians[f"adbc/{server}"]
        ratio = theirs / ours
        rows.append(Row(f"`{SCAN_SQL}`, QuiverClient.query, {label}", _rate(ours)))
        rows.append(
            Row(
                f"`{SCAN_SQL}`, ADBC Flight SQL driver (prepared statement), {label}",
                _rate(theirs),
                "QuiverClient.query, same server",
                f"{ratio:.2f}x the time",
                f"<= {TARGET:.2f}x",
                "yes" if ratio <= TARGET else "no",
            )
        )
    lines = [
        "## Flight SQL: ADBC against QuiverClient (issue #13)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m tests.bench flightsql`. `bench.t`: "
        f"{ROWS:,} rows ({mb:.0f} MB as Arrow). One `quiver serve` subprocess per configuration; both clients "
        f"in the benchmark process, in turn; medians of {REPS} repetitions (0.3 s pause and a GC between). "
        f"Machine load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} "
        f"before, {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after, on {os.cpu_count()} "
        "cores shared with other work: the figures are indicative.",
        "",
        "| measure | figure | compared with | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {r.measure} | {r.figure} | {r.reference} | {r.ratio} | {r.target} | {r.met} |" for r in rows),
    ]
    text = "\n".join(lines)
    _say(text)
    return text


def _rate(seconds: float) -> str:
    return f"{seconds:.3f} s ({ROWS / seconds / 1e6:.1f} M rows/s)"
