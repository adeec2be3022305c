"""Flight SQL (issue #13): a full scan through ADBC Flight SQL vs Quiver's own client vs in-process DuckDB, and ROAPI.

Both clients ask one real ``quiver serve`` (subprocess, on the ``bench.t`` table of
``QUIVER_BENCH_ROWS`` rows that tests/bench/bench_flight.py builds) the same query,
``SELECT * FROM bench.t``: ``QuiverClient.query`` as a JSON ``query`` command, and the ADBC
driver's ``cursor.execute`` + ``fetch_arrow_table`` as a Flight SQL prepared statement (the
driver prepares every statement). Each also runs with every cache that holds table data off
(a second server), so the figure is the query path's, not the cache's. Beside them, measured
in the same repetitions: in-process DuckDB's ``.to_arrow_table()`` of the same query on a copy
of the file (the limit), and the same ADBC scan against ROAPI's Flight SQL endpoint on the
same rows (Parquet; tests/bench/bench_flight.py starts it). Target: ADBC within 10% of
QuiverClient; the rest is reported with its ratio.
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

import duckdb

from tests.bench.bench_flight import REPS, ROWS, Row, _build, _say, _settle, _start_quiver, _start_roapi

SCAN_SQL = "SELECT * FROM bench.t"
DUCKDB = "in-process duckdb"
ROAPI = "roapi (adbc)"
CACHES_OFF = {"QUIVER_CACHE_ENABLED": "false", "QUIVER_CACHE_TABLE_MEMORY_BYTES": "0"}
TARGET = 1.10
#: Only when named (`python -m tests.bench flightsql`): it builds its own copy of bench.t and
#: starts two servers and ROAPI, 77 s on 2 shared cores, over the minute a default section may
#: cost; the default run's flight section measures in-process DuckDB and ROAPI already.
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


def _peers(stack: contextlib.ExitStack, work: Path, copy: Path) -> dict[str, Callable[[], int]]:
    """The contenders that are not Quiver: in-process DuckDB on the copy of the file (the
    server holds the original's lock) and ROAPI's Flight SQL endpoint (skipped when roapi is
    not installed)."""
    con = stack.enter_context(duckdb.connect(str(copy), read_only=True))
    peers: dict[str, Callable[[], int]] = {DUCKDB: lambda: con.sql(SCAN_SQL).to_arrow_table().num_rows}
    roapi = _start_roapi(stack, work)
    if roapi is not None:
        peers[ROAPI] = roapi
    return peers


def _run(work: Path) -> str:
    load_before = os.getloadavg()
    db_path, copy, mb = _build(work, [0])
    shutil.copyfile(db_path, work / "off.duckdb")
    medians: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        peers = _peers(stack, work, copy)
        for server, db, env in (("on", db_path, {}), ("off", work / "off.duckdb", CACHES_OFF)):
            url, tokens, _, _ = _start_quiver(stack, work, f"quiver-{server}", db, env)
            # The peers run in the first round only: they do not depend on Quiver's caches.
            scans = {**_contenders(stack, url, tokens[0]), **(peers if server == "on" else {})}
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
                key = name if name in peers else f"{name}/{server}"
                medians[key] = statistics.median(ts)
                _say(f"scan {key}: {_rate(medians[key])}")
    load_after = os.getloadavg()
    text = _report(medians, mb, load_before, load_after)
    _say(text)
    return text


def _report(
    medians: dict[str, float],
    mb: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    duck = medians[DUCKDB]
    rows = [
        Row(
            f"`{SCAN_SQL}`, in-process duckdb `.to_arrow_table()` on a copy of the file",
            _rate(duck),
        )
    ]
    for server, label in (("on", "default configuration"), ("off", "caches holding table data off")):
        ours, theirs = medians[f"quiver_client/{server}"], medians[f"adbc/{server}"]
        ratio = theirs / ours
        rows.append(
            Row(
                f"`{SCAN_SQL}`, QuiverClient.query, {label}",
                _rate(ours),
                "in-process duckdb",
                f"{ours / duck:.2f}x the time",
                "report",
                "-",
            )
        )
        rows.append(
            Row(
                f"`{SCAN_SQL}`, ADBC Flight SQL driver (prepared statement), {label}",
                _rate(theirs),
                "QuiverClient.query, same server (in-process duckdb)",
                f"{ratio:.2f}x the time ({theirs / duck:.2f}x)",
                f"<= {TARGET:.2f}x",
                "yes" if ratio <= TARGET else "no",
            )
        )
    if ROAPI in medians:
        roapi, adbc = medians[ROAPI], medians["adbc/on"]
        rows.append(
            Row(
                "`SELECT * FROM t`, ADBC Flight SQL driver against ROAPI's Flight SQL endpoint (the same rows, "
                "from Parquet, held in memory by ROAPI)",
                _rate(roapi),
                "ADBC against Quiver, default configuration (in-process duckdb)",
                f"{roapi / adbc:.2f}x the time ({roapi / duck:.2f}x)",
                "report",
                "-",
            )
        )
    else:
        rows.append(Row("ADBC against ROAPI's Flight SQL endpoint", "not measured (roapi not installed)"))
    lines = [
        "## Flight SQL: ADBC, QuiverClient, in-process DuckDB and ROAPI (issue #13)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m tests.bench flightsql`. `bench.t`: "
        f"{ROWS:,} rows ({mb:.0f} MB as Arrow). One `quiver serve` subprocess per configuration, in-process "
        "DuckDB on a copy of the file and ROAPI (a subprocess, on a Parquet export of the same rows) beside "
        "the first; every client in the benchmark process, each contender in turn within a repetition; "
        f"medians of {REPS} repetitions (0.3 s pause and a GC between). A ratio is the row's time over the "
        "reference's: below 1 is faster. "
        f"Machine load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} "
        f"before, {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after, on {os.cpu_count()} "
        "cores shared with other work: the figures are indicative.",
        "",
        "| measure | figure | compared with | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {r.measure} | {r.figure} | {r.reference} | {r.ratio} | {r.target} | {r.met} |" for r in rows),
    ]
    return "\n".join(lines)


def _rate(seconds: float) -> str:
    return f"{seconds:.3f} s ({ROWS / seconds / 1e6:.1f} M rows/s)"
