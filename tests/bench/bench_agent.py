"""The agent query path (issue #10): ``query`` commands, fresh SQL text, first requests.

Agents do not repeat a parameterized text against a warm cache: an LLM writes new SQL with
literal values each time, as a ``query`` command. This module measures that path beside the
same references as tests/bench/bench_flight.py (whose harness it reuses: the ``bench.t``
table of ``QUIVER_BENCH_ROWS`` rows, in-process DuckDB on a copy of the file, the bare
``pyarrow.flight`` server, ROAPI's Flight SQL through the ADBC driver, real ``quiver serve``
subprocesses):

- full scan as a ``query`` command (``SELECT * FROM bench.t``; the client fetches the
  FlightInfo's endpoints in parallel) with the default configuration and with every cache
  that holds table data off (``[cache] enabled = false``, ``table_memory_bytes = 0``);
- the first PATH scan after start against the uncached PATH scan;
- point queries: fresh text (a new literal each call), the same text repeated, a ``?``
  parameter, ``SELECT <n> AS x`` — p50/p99 against the floor measured in the same run (bare
  Flight GetFlightInfo+DoGet round trip + DuckDB's own time for the same text);
- 8 concurrent agents against 1: fresh-text point queries (queries/s) and query-command scans.

Every row says whether a cache was warm, read from the server's cache counters around the
measurement (``/v1/status``), not assumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec

import duckdb
import httpx
import pyarrow as pa
import pyarrow.flight as flight

from tests.bench.bench_flight import (
    CLIENTS,
    REPS,
    ROWS,
    Row,
    _build,
    _concurrently,
    _free_port,
    _ms,
    _pct,
    _process,
    _say,
    _settle,
    _start_quiver,
    _start_roapi,
)

P = ParamSpec("P")
POINTS = int(os.environ.get("QUIVER_BENCH_POINTS", "300"))
SCAN_SQL = "SELECT * FROM bench.t"
FRESH_SQL = "SELECT * FROM bench.t WHERE id = {k}"
PARAM_SQL = "SELECT * FROM bench.t WHERE id = ?"
CONST_SQL = "SELECT {k} AS x"
#: Every cache that holds table data off: the result cache and the hot-table cache.
CACHES_OFF = {"QUIVER_CACHE_ENABLED": "false", "QUIVER_CACHE_TABLE_MEMORY_BYTES": "0"}


@dataclass
class Quiver:
    """One ``quiver serve`` subprocess and the clients that talk to it."""

    name: str
    url: str
    tokens: list[str]
    pid: int
    http: httpx.Client
    client: Any  # quiver_client.QuiverClient
    raw: flight.FlightClient
    opts: flight.FlightCallOptions
    #: perf_counter() when the server listened and its swarm and tokens were made.
    ready: float = 0.0

    def counters(self) -> dict[str, int]:
        """The result cache's and the hot-table cache's hit counters, to tell warm from cold."""
        cache = self.http.get("/v1/status").json().get("cache") or {}
        tables = cache.get("tables") or {}
        return {"result_hits": int(cache.get("hits") or 0), "table_hits": int(tables.get("hits") or 0)}

    def idle_load(self, table: str, timeout: float = 120.0) -> float:
        """Wait (polling /v1/status, no Flight call: a call would make it yield) until the
        hot-table cache's idle fill has loaded ``table``; the seconds it took, or -1 when
        the server does not fill when idle."""
        started = time.perf_counter()
        deadline = started + timeout
        while time.perf_counter() < deadline:
            tables = (self.http.get("/v1/status").json().get("cache") or {}).get("tables") or {}
            if tables.get("fill_mode") != "idle":
                return -1.0
            if table in {t["table"] for t in tables.get("tables") or ()}:
                return time.perf_counter() - started
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: {table} was not loaded within {timeout} s")

    def info(self, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        return self.raw.get_flight_info(descriptor, self.opts)

    def query_cmd(self, sql: str, params: list[Any] | None = None) -> flight.FlightDescriptor:
        body: dict[str, Any] = {"kind": "query", "sql": sql}
        if params:
            body["params"] = params
        return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def _warm(before: dict[str, int], after: dict[str, int]) -> str:
    """What the cache counters say about a measurement."""
    hits = {k: after[k] - before[k] for k in before}
    used = [f"{k.removesuffix('_hits')} cache {v} hits" for k, v in hits.items() if v]
    return "warm: " + ", ".join(used) if used else "no cache hit"


def _start(
    stack: contextlib.ExitStack,
    work: Path,
    name: str,
    db: Path,
    env: dict[str, str],
    tables: tuple[str, ...] = ("bench.*",),
) -> Quiver:
    from quiver_client import QuiverClient

    url, tokens, pid, http = _start_quiver(stack, work, name, db, env, tables)
    client = stack.enter_context(QuiverClient(url, tokens[0]))
    raw = flight.FlightClient(url)
    stack.callback(raw.close)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {tokens[0]}".encode())])
    return Quiver(name, url, tokens, pid, http, client, raw, opts, time.perf_counter())


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="quiver-bench-agent-"))
    try:
        return _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path) -> str:
    load_before = os.getloadavg()
    rng = random.Random(20261201)
    # Distinct keys: every fresh-text query is a text no server has seen.
    keys = rng.sample(range(ROWS), 4 * POINTS + 200)
    db_path, copy, mb = _build(work, keys)
    shutil.copyfile(db_path, work / "off.duckdb")
    rows: list[Row] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        con = stack.enter_context(duckdb.connect(str(copy)))
        # The bare server: the 5M-row table and the 1-row answer of a point query.
        port = _free_port()
        args = [sys.executable, "-m", "tests.bench.bare_flight", str(port)]
        args += [f"big={work / 't.arrow'}", f"tiny={work / 'tiny.arrow'}"]
        stack.enter_context(_process(args, work / "bare.log", "bare flight server", port))
        bare = flight.FlightClient(f"grpc://127.0.0.1:{port}")
        stack.callback(bare.close)
        pool = stack.enter_context(ThreadPoolExecutor(CLIENTS))
        roapi = _start_roapi(stack, work)
        on = _start(stack, work, "quiver", db_path, {})
        off = _start(stack, work, "quiver-off", work / "off.duckdb", CACHES_OFF)

        rows += _first_path_scan(on, off)
        rows += _scans(con, bare, pool, roapi, on, off, notes)
        rows += _points(con, bare, on, off, keys[: 4 * POINTS])
        rows += _concurrency(on, off, keys[4 * POINTS :])
        status = on.http.get("/v1/status").json().get("cache")
    load_after = os.getloadavg()
    return _report(rows, notes, mb, status, load_before, load_after)


# --- scans -----------------------------------------------------------------------------------------


def _first_path_scan(on: Quiver, off: Quiver) -> list[Row]:
    """Target 4: the first PATH scan after start against the uncached PATH scan (the
    caches-off server, median of REPS). With the default config the first scan streams as
    an uncached one and only queues the table; the hot-table cache loads it while the server
    is idle (flight_server/table_cache.py "IdleFiller"), which is waited for here."""
    before = on.counters()
    started = time.perf_counter()
    after_start = started - on.ready
    assert on.client.read("bench.t").num_rows == ROWS
    first = time.perf_counter() - started
    warm = _warm(before, on.counters())
    _say(
        f"first PATH scan after start: {first:.3f} s ({warm}; {after_start:.1f} s after the server was ready)"
    )
    # The default config loads the table while the data plane is idle: wait for it here, so
    # that the load competes with no measurement that follows (the other server's scans).
    loaded = on.idle_load("bench.t")
    if loaded >= 0:
        _say(f"hot-table cache: bench.t loaded while idle, {loaded:.2f} s after the first scan ended")
    # The caches-off server's own first scan: DuckDB's buffer pool is cold there too (a fresh
    # DuckDB reads a table 2-3x slower the first time, in process as well), so this is the
    # first scan's like-for-like reference; it also warms the OS page cache, as for every
    # other contender.
    _settle()
    started = time.perf_counter()
    off.client.read("bench.t")
    cold_off = time.perf_counter() - started
    off_after = started - off.ready
    _say(f"first PATH scan after start, caches off: {cold_off:.3f} s ({off_after:.1f} s after it was ready)")
    times = []
    for _ in range(REPS):
        _settle()
        started = time.perf_counter()
        off.client.read("bench.t")
        times.append(time.perf_counter() - started)
    uncached = statistics.median(times)
    _say(f"PATH scan, caches off: {uncached:.3f} s")
    ratio = uncached / first
    return [
        Row(
            f"first PATH scan after start (default config; {warm}; {after_start:.1f} s after ready; 1 sample)",
            _rate(first),
            f"uncached PATH scan (caches off) {_rate(uncached)}",
            f"{ratio:.2f}x",
            ">= 1.00x",
            _met(ratio >= 1.0),
        ),
        Row(
            "the same, against the caches-off server's own first PATH scan "
            f"(DuckDB cold in both; {warm}; that one {off_after:.1f} s after ready; 1 sample)",
            _rate(first),
            f"first PATH scan, caches off {_rate(cold_off)}",
            f"{cold_off / first:.2f}x",
            "report",
            "-",
        ),
    ]


def _scans(
    con: duckdb.DuckDBPyConnection,
    bare: flight.FlightClient,
    pool: ThreadPoolExecutor,
    roapi: Callable[[], int] | None,
    on: Quiver,
    off: Quiver,
    notes: list[str],
) -> list[Row]:
    """Target 1: ``SELECT * FROM bench.t`` as a query command, every contender in turn."""
    single = bare.get_flight_info(flight.FlightDescriptor.for_command(b"big")).endpoints[0].ticket
    split = bare.get_flight_info(flight.FlightDescriptor.for_command(f"big/{CLIENTS}".encode())).endpoints
    endpoints = {q.name: len(q.info(q.query_cmd(SCAN_SQL)).endpoints) for q in (on, off)}
    scans: dict[str, Callable[[], int]] = {
        "duckdb": lambda: con.sql(SCAN_SQL).to_arrow_table().num_rows,
        "bare1": lambda: bare.do_get(single).read_all().num_rows,
        "bareN": lambda: (
            pa.concat_tables(pool.map(lambda e: bare.do_get(e.ticket).read_all(), split)).num_rows
        ),
        "on": lambda: on.client.query(SCAN_SQL).num_rows,
        "off": lambda: off.client.query(SCAN_SQL).num_rows,
        "path_off": lambda: off.client.read("bench.t").num_rows,
    }
    if roapi is not None:
        scans["roapi"] = roapi
    # The first query-command scan of each server, alone: a first request.
    first: dict[str, float] = {}
    warmth: dict[str, str] = {}
    for q in (on, off):
        _settle()
        before = q.counters()
        started = time.perf_counter()
        assert scans[q.name.replace("quiver-off", "off").replace("quiver", "on")]() == ROWS
        first[q.name] = time.perf_counter() - started
        warmth[q.name] = _warm(before, q.counters())
    for name, scan in scans.items():  # warm-up and a correctness check
        assert scan() == ROWS, name
    times: dict[str, list[float]] = {name: [] for name in scans}
    before_all = {q.name: q.counters() for q in (on, off)}
    for _ in range(REPS):
        for name, scan in scans.items():
            _settle()
            started = time.perf_counter()
            scan()
            times[name].append(time.perf_counter() - started)
    warm_on = _warm(before_all["quiver"], on.counters())
    warm_off = _warm(before_all["quiver-off"], off.counters())
    s = {name: statistics.median(ts) for name, ts in times.items()}
    for name, v in s.items():
        _say(f"scan {name}: {_rate(v)}")
    duck = s["duckdb"]
    out = [
        Row(
            "full scan, in-process duckdb `SELECT * FROM bench.t` `.to_arrow_table()` (the limit)",
            _rate(duck),
        ),
        Row(
            f"query command `{SCAN_SQL}`, default config, {endpoints['quiver']} endpoint(s), "
            f"QuiverClient.query ({warm_on})",
            _rate(s["on"]),
            "in-process duckdb",
            f"{duck / s['on']:.2f}x",
            ">= 0.85x",
            _met(duck / s["on"] >= 0.85),
        ),
        Row(
            f"the same, its first request after start ({warmth['quiver']}; 1 sample)",
            _rate(first["quiver"]),
            "in-process duckdb",
            f"{duck / first['quiver']:.2f}x",
            ">= 0.85x",
            _met(duck / first["quiver"] >= 0.85),
        ),
        Row(
            f"query command, caches off (`[cache] enabled = false`, `table_memory_bytes = 0`), "
            f"{endpoints['quiver-off']} endpoint(s) ({warm_off})",
            _rate(s["off"]),
            "in-process duckdb",
            f"{duck / s['off']:.2f}x",
            ">= 0.75x",
            _met(duck / s["off"] >= 0.75),
        ),
        Row(
            f"the same, its first request after start ({warmth['quiver-off']}; 1 sample)",
            _rate(first["quiver-off"]),
            "in-process duckdb",
            f"{duck / first['quiver-off']:.2f}x",
            ">= 0.75x",
            _met(duck / first["quiver-off"] >= 0.75),
        ),
        Row(
            f"PATH scan, caches off ({len(off.info(flight.FlightDescriptor.for_path('bench', 't')).endpoints)} "
            "parallel endpoints, rowid ranges; for comparison)",
            _rate(s["path_off"]),
            "in-process duckdb",
            f"{duck / s['path_off']:.2f}x",
            "report",
            "-",
        ),
        Row(
            "full scan, bare pyarrow.flight, 1 stream, table in memory",
            _rate(s["bare1"]),
            "query command (default; caches off) vs bare 1 stream",
            f"{s['bare1'] / s['on']:.2f}x; {s['bare1'] / s['off']:.2f}x (bare / duckdb {duck / s['bare1']:.2f}x)",
            "report",
            "-",
        ),
        Row(
            f"full scan, bare pyarrow.flight, {CLIENTS} parallel endpoints",
            _rate(s["bareN"]),
            f"query command (default; caches off) vs bare {CLIENTS} endpoints",
            f"{s['bareN'] / s['on']:.2f}x; {s['bareN'] / s['off']:.2f}x (bare / duckdb {duck / s['bareN']:.2f}x)",
            "report",
            "-",
        ),
    ]
    if "roapi" in s:
        r = s["roapi"]
        out.append(
            Row(
                "full scan, ROAPI Flight SQL (ADBC driver), same rows from Parquet",
                _rate(r),
                "query command (default; caches off) vs ROAPI",
                f"{r / s['on']:.2f}x; {r / s['off']:.2f}x",
                ">= 2.5x",
                _met(r / s["off"] >= 2.5),
            )
        )
    else:
        out.append(Row("full scan, ROAPI Flight SQL", "not measured (roapi not installed)"))
    if endpoints["quiver"] > 1:
        notes.append(
            "`SELECT * FROM bench.t` is a plain projection of one table, so it is split into rowid-range "
            "endpoints like a PATH scan (flight_server/planner.py `_split_query`); on the default server "
            "the table is held by the hot-table cache (loaded while idle after the first PATH scan), so the query is "
            "served from memory without running (`_cached_query`)."
        )
    if endpoints["quiver"] == 1:
        notes.append(
            'A query command is planned as one endpoint (flight_server/planner.py: "splitting '
            'arbitrary SQL is not sound"), so "endpoints fetched in parallel" is one stream: '
            "the client's parallel fetch has nothing to parallelize."
        )
    return out


# --- point queries -----------------------------------------------------------------------------------


def _points(  # noqa: C901, PLR0915  one benchmark target, measured step by step
    con: duckdb.DuckDBPyConnection, bare: flight.FlightClient, on: Quiver, off: Quiver, keys: list[int]
) -> list[Row]:
    """Target 2: point queries, each key against each contender in turn."""
    from flight_server.streams import arrow_stream

    n = len(keys) // 4
    fresh_keys, const_keys = keys[:n], keys[n : 2 * n]
    repeat_key = keys[2 * n]

    def bare_rt() -> None:
        info = bare.get_flight_info(flight.FlightDescriptor.for_command(b"tiny"))
        bare.do_get(info.endpoints[0].ticket).read_all()

    def split(q: Quiver, sql: str, params: list[Any] | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        info = q.info(q.query_cmd(sql, params))
        t1 = time.perf_counter()
        for e in info.endpoints:
            q.raw.do_get(e.ticket, q.opts).read_all()
        return t1 - t0, time.perf_counter() - t1

    timed: dict[str, list[float]] = {}

    def clock(name: str, fn: Callable[P, object], *args: P.args, **kwargs: P.kwargs) -> None:
        """Time ``fn(*args)``: the loop's values are passed, not bound as lambda defaults."""
        started = time.perf_counter()
        fn(*args, **kwargs)
        timed.setdefault(name, []).append(time.perf_counter() - started)

    # Warm-up: connections, DuckDB's buffers for the table, the guard's function list.
    for k in keys[-20:]:
        con.sql(FRESH_SQL.format(k=k + 1)).to_arrow_table()
        bare_rt()
        on.client.query(FRESH_SQL.format(k=k + 2))
        off.client.query(FRESH_SQL.format(k=k + 3))
    warmth: dict[str, str] = {}

    def group(label: str, q: Quiver, body: Callable[[], None]) -> None:
        before = q.counters()
        body()
        warmth[label] = _warm(before, q.counters())

    def fresh_round() -> None:
        for k in fresh_keys:
            sql = FRESH_SQL.format(k=k)
            clock("bare", bare_rt)
            clock("duck", lambda sql: con.sql(sql).to_arrow_table(), sql)
            clock("duck_submit", lambda sql: arrow_stream(con, sql).read_all(), sql)
            clock("fresh_on", on.client.query, sql)
            clock("fresh_off", lambda k: off.client.query(FRESH_SQL.format(k=k + 1)), k)
            info_s, get_s = split(on, FRESH_SQL.format(k=k + 2), None)
            timed.setdefault("fresh_info", []).append(info_s)
            timed.setdefault("fresh_get", []).append(get_s)

    before_on, before_off = on.counters(), off.counters()
    fresh_round()
    warmth["fresh_on"] = _warm(before_on, on.counters())
    warmth["fresh_off"] = _warm(before_off, off.counters())

    def repeat_round() -> None:
        sql = FRESH_SQL.format(k=repeat_key)
        for _ in fresh_keys:
            clock("duck_repeat", lambda: con.sql(sql).to_arrow_table())
            clock("repeat_on", lambda: on.client.query(sql))

    group("repeat_on", on, repeat_round)

    def repeat_off() -> None:
        sql = FRESH_SQL.format(k=repeat_key)
        for _ in fresh_keys:
            clock("repeat_off", lambda: off.client.query(sql))

    group("repeat_off", off, repeat_off)

    def param_round() -> None:
        for k in fresh_keys:
            clock("duck_param", lambda k: con.sql(PARAM_SQL, params=[k + 5]).to_arrow_table(), k)
            clock("param_on", lambda k: on.client.query(PARAM_SQL, [k + 5]), k)
            info_s, get_s = split(on, PARAM_SQL, [k + 6])
            timed.setdefault("param_info", []).append(info_s)
            timed.setdefault("param_get", []).append(get_s)

    group("param_on", on, param_round)

    def const_round() -> None:
        for k in const_keys:
            clock("duck_const", lambda k: con.sql(CONST_SQL.format(k=k)).to_arrow_table(), k)
            clock("const_on", lambda k: on.client.query(CONST_SQL.format(k=k)), k)

    group("const_on", on, const_round)

    p50 = {name: _pct(ts, 50) for name, ts in timed.items()}
    p99 = {name: _pct(ts, 99) for name, ts in timed.items()}
    for name in timed:
        _say(f"point {name}: p50 {_ms(p50[name])}, p99 {_ms(p99[name])}")
    floor = p50["bare"] + p50["duck"]
    floor_repeat = p50["bare"] + p50["duck_repeat"]
    floor_param = p50["bare"] + p50["duck_param"]
    floor_const = p50["bare"] + p50["duck_const"]

    def point_row(label: str, name: str, fl: float, duck: str, target: float | None) -> Row:
        gap = p50[name] - fl
        return Row(
            f"{label} ({warmth[name]})",
            f"p50 {_ms(p50[name])}, p99 {_ms(p99[name])}",
            f"floor: bare round trip {_ms(p50['bare'])} + duckdb {duck} {_ms(fl - p50['bare'])} = {_ms(fl)}",
            f"gap {gap * 1e3:+.3f} ms",
            f"<= +{target:.1f} ms" if target is not None else "report",
            _met(gap <= target / 1e3) if target is not None else "-",
        )

    return [
        point_row(
            f"point query, fresh text `{FRESH_SQL.format(k='<new k>')}`, default config",
            "fresh_on",
            floor,
            "same text",
            1.0,
        ),
        point_row("the same, caches off", "fresh_off", floor, "same text", 1.0),
        Row(
            "fresh text, GetFlightInfo p50 / DoGet p50 (raw pyarrow client, default config)",
            f"{_ms(p50['fresh_info'])} / {_ms(p50['fresh_get'])}",
            f"bare round trip {_ms(p50['bare'])}; duckdb Arrow {_ms(p50['duck'])}, "
            f"submit step {_ms(p50['duck_submit'])}",
            "",
            "report",
            "-",
        ),
        point_row(
            "point query, the same text repeated, default config", "repeat_on", floor_repeat, "same text", 0.5
        ),
        point_row(
            "the same text repeated, caches off (the guard's and binder's planning caches, which hold no "
            "table data, stay on)",
            "repeat_off",
            floor_repeat,
            "same text",
            0.5,
        ),
        point_row(
            f"point query, parameterized `{PARAM_SQL}`, new value each call (guard and schema of the text "
            "cached)",
            "param_on",
            floor_param,
            "same",
            0.5,
        ),
        Row(
            "parameterized, GetFlightInfo p50 / DoGet p50 (raw pyarrow client)",
            f"{_ms(p50['param_info'])} / {_ms(p50['param_get'])}",
            "",
            "",
            "report",
            "-",
        ),
        point_row(
            f"`{CONST_SQL.format(k='<new n>')}`, fresh text", "const_on", floor_const, "same text", None
        ),
    ]


# --- concurrency --------------------------------------------------------------------------------------


def _concurrency(on: Quiver, off: Quiver, keys: list[int]) -> list[Row]:
    """Target 5: 8 agents (one token each: the concurrency cap is per principal) against 1."""
    from quiver_client import QuiverClient

    out = []
    per = max(20, len(keys) // CLIENTS)
    for q in (on, off):
        clients = [QuiverClient(q.url, t) for t in q.tokens]
        try:

            def points(cl: Any, i: int, base: int = 0) -> None:
                for j in range(per):
                    # New text every call, distinct across agents and rounds.
                    cl.query(FRESH_SQL.format(k=(keys[(i * per + j) % len(keys)] + base) % ROWS))

            before = q.counters()
            one = _concurrently(clients[:1], lambda cl, i: points(cl, i, 11))
            many = _concurrently(clients, lambda cl, i: points(cl, i, 23))
            warm = _warm(before, q.counters())
            qps1, qpsn = per / one, CLIENTS * per / many
            _say(f"{q.name}: point queries {CLIENTS} agents {qpsn:.0f} q/s vs 1 agent {qps1:.0f} q/s")
            out.append(
                Row(
                    f"{CLIENTS} concurrent agents, fresh-text point queries, {q.name} ({warm})",
                    f"{qpsn:.0f} queries/s aggregate",
                    f"1 agent: {qps1:.0f} queries/s",
                    f"{qpsn / qps1:.2f}x",
                    ">= 1.8x",
                    _met(qpsn / qps1 >= 1.8),
                )
            )
            before = q.counters()
            one_scan = _concurrently(clients[:1], lambda cl, _i: cl.query(SCAN_SQL))
            many_scan = _concurrently(clients, lambda cl, _i: cl.query(SCAN_SQL))
            warm = _warm(before, q.counters())
            r1, rn = ROWS / one_scan, CLIENTS * ROWS / many_scan
            _say(
                f"{q.name}: query-command scans {CLIENTS} agents {rn / 1e6:.1f} vs 1 agent {r1 / 1e6:.1f} M rows/s"
            )
            out.append(
                Row(
                    f"{CLIENTS} concurrent agents, query-command full scans, {q.name} ({warm})",
                    f"{rn / 1e6:.1f} M rows/s aggregate",
                    f"1 agent: {r1 / 1e6:.1f} M rows/s",
                    f"{rn / r1:.2f}x",
                    "report",
                    "-",
                )
            )
        finally:
            for cl in clients:
                with contextlib.suppress(Exception):
                    cl.close()
    return out


# --- the report ------------------------------------------------------------------------------------------


def _rate(s: float) -> str:
    return f"{s:.3f} s ({ROWS / s / 1e6:.1f} M rows/s)"


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def _report(
    rows: list[Row],
    notes: list[str],
    mb: float,
    cache: Any,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    lines = [
        "## Agent query path (issue #10)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m tests.bench agent` (part of `make bench`). "
        f"`bench.t`: {ROWS:,} rows ({mb:.0f} MB as Arrow). Two `quiver serve` subprocesses on copies of "
        "one file: the default configuration, and every cache that holds table data off "
        "(`[cache] enabled = false`, `table_memory_bytes = 0`); the bare server and ROAPI are subprocesses "
        f"too; all clients share the benchmark process. Scans: medians of {REPS} repetitions, every "
        "contender in turn (0.3 s pause and a GC between), plus each server's first request alone. Point "
        f"queries: {POINTS} calls per variant, each call against each contender in turn; "
        "fresh text means a literal no server has seen. The floor is measured in the same run: the bare "
        "server's GetFlightInfo+DoGet round trip of a 1-row answer plus in-process DuckDB's own "
        "`con.sql(text).to_arrow_table()` of the same text. Cache column: the hit counters of the result "
        "cache and the hot-table cache (`/v1/status`) read before and after each measurement. "
        f"Machine load average (1/5/15 min) {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} "
        f"before, {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after, on {os.cpu_count()} "
        "cores shared with other work: the figures are indicative.",
        "",
        "| measure (cache state) | figure | compared with | ratio / gap | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.measure} | {r.figure} | {r.reference} | {r.ratio} | {r.target} | {r.met} |" for r in rows
    ]
    if notes:
        lines += ["", *notes]
    if cache:
        keep = ("entries", "hits", "misses", "uncacheable", "too_large")
        lines += [
            "",
            f"Result cache of the default server after the run: `{json.dumps({k: cache.get(k) for k in keep})}`",
        ]
    text = "\n".join(lines)
    _say(text)
    return text
