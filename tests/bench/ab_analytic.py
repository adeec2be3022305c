"""A/B of the short analytic queries: in-process DuckDB against caches-off ``quiver serve``
servers, the same query sent to each in turn (tests/bench/PROFILE.md, section 10).

    python -m tests.bench.ab_analytic [ROUNDS] [--base ROOT] [--split] [QUERY_PREFIX ...]

The star schema of tests/bench/bench_analytic.py (``QUIVER_BENCH_DATA``; generated there when
missing). Per query (default q02, q06, q08, q16: the ~0.1 s ones) and per round (default 40):

- in-process DuckDB: ``duckdb.connect(copy, read_only=True).sql(q).to_arrow_table()`` on a
  byte-for-byte copy of the file, as the benchmark's reference;
- a caches-off ``quiver serve`` subprocess of this tree (``[cache] enabled = false``,
  ``table_memory_bytes = 0``), and with ``--base ROOT`` one of another tree (``cwd`` and
  ``PYTHONPATH`` = that root, its own copy of the file): GetFlightInfo and DoGet of every
  endpoint timed apart at a raw ``pyarrow.flight`` client.

Every request's text is new, as in the benchmark: a trailing comment carries a counter. The
guard's shape key is the text around the literals *including comments*
(catalog/sqlguard.py ``_literals``), so each such text takes the guard's full-parse path
(``json_serialize_sql`` and the walk), never a shape hit — as a first text of an agent does.
The contenders' order rotates from round to round. Printed per query and contender: medians
and spread, GetFlightInfo and DoGet, the server's CPU seconds per request
(``/proc/<pid>/stat``, summed over the rounds), and the paired statistic — the median over
rounds of (in-process seconds / Quiver seconds) of the same round, run back to back.

``--split`` then runs the same requests against a caches-off runtime *in this process*
(tests/harness.py ``start_server``) with timing wrappers around the server's own functions
(each calls the original and records its wall time; nothing is replaced): the guard's parse
and walk, the admission, the run's hand-over to its worker and back, DuckDB's submit (parse,
bind, plan), the head read (execution and Arrow conversion), any ``LIMIT 0`` probe, and the
held result's DoGet; and the same query's steps on a plain DuckDB connection (the server's
``limited`` wrapper and stream reader against ``to_arrow_table``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.flight as flight

from tests.bench.ab_point import _Server
from tests.bench.bench_analytic import CACHES_OFF, QUERIES, SLOW_QUERIES, _data_file
from tests.bench.bench_flight import _cpu_seconds
from tests.bench.profile_point import TIMES, _timed

DEFAULT_QUERIES = ("q02", "q06", "q08", "q16")
#: Between two requests: the previous contender's frees and stream ends run on after it returns.
SETTLE_SECONDS = 0.02
#: Each server's configuration: every cache that holds table data off, as in the benchmark.
SERVER_ENV = {**CACHES_OFF, **SLOW_QUERIES}
#: How long each idle server's CPU is read before the rounds (a poller would steal DuckDB's cores).
IDLE_SECONDS = 5.0


def _request(
    client: flight.FlightClient, opts: flight.FlightCallOptions, sql: str
) -> tuple[float, float, int]:
    """GetFlightInfo and DoGet of every endpoint (seconds each) and the rows."""
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql}).encode())
    t0 = time.perf_counter()
    info = client.get_flight_info(descriptor, opts)
    t1 = time.perf_counter()
    rows = sum(client.do_get(ep.ticket, opts).read_all().num_rows for ep in info.endpoints)
    return t1 - t0, time.perf_counter() - t1, rows


@dataclass
class _Samples:
    info: list[float] = field(default_factory=list)
    doget: list[float] = field(default_factory=list)
    cpu: float = 0.0

    @property
    def total(self) -> list[float]:
        return [a + b for a, b in zip(self.info, self.doget, strict=True)]


def _sample(con: duckdb.DuckDBPyConnection, server: _Server | None, sql: str, into: _Samples) -> int:
    """One timed request: in-process DuckDB (``server`` None) or a server (a new text); rows."""
    gc.collect()
    time.sleep(SETTLE_SECONDS)
    if server is None:
        c0, t0 = time.process_time(), time.perf_counter()
        rows = con.sql(sql).to_arrow_table().num_rows
        into.info.append(time.perf_counter() - t0)
        into.doget.append(0.0)
        into.cpu += time.process_time() - c0
        return rows
    c0 = _cpu_seconds(server.pid)
    info, doget, rows = _request(server.client, server.opts, sql)
    into.info.append(info)
    into.doget.append(doget)
    time.sleep(SETTLE_SECONDS)  # the stream's end is the server's work too
    into.cpu += _cpu_seconds(server.pid) - c0
    return rows


def _ms(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:.1f} [{min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f}]"


def _pick(prefixes: list[str]) -> dict[str, str]:
    chosen = {name: sql for name, sql in QUERIES.items() if any(name.startswith(p) for p in prefixes)}
    if not chosen:
        raise SystemExit(f"no query starts with {prefixes}")
    return chosen


def _ab(queries: dict[str, str], rounds: int, base: Path | None, work: Path, master: Path) -> None:
    here = Path(__file__).resolve().parents[2]
    copies = {name: work / f"{name}.duckdb" for name in ("duck", "new", "base")}
    for name, path in copies.items():
        if name != "base" or base is not None:
            shutil.copyfile(master, path)
    counter = iter(range(1, 10**9))
    started, load_before = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    with contextlib.ExitStack() as stack:
        con = stack.enter_context(duckdb.connect(str(copies["duck"]), read_only=True))
        servers = [_Server(stack, here, work, "new", copies["new"], env=SERVER_ENV, tables="star.*")]
        if base is not None:
            servers.append(
                _Server(stack, base, work, "base", copies["base"], env=SERVER_ENV, tables="star.*")
            )
        names = ["duckdb", *(s.name for s in servers)]
        idle = {s.name: _cpu_seconds(s.pid) for s in servers}
        time.sleep(IDLE_SECONDS)
        idle = {s.name: (_cpu_seconds(s.pid) - idle[s.name]) / IDLE_SECONDS for s in servers}
        for sql in queries.values():  # warm-up: page cache, buffer pools, threads of every contender
            con.sql(sql).to_arrow_table()
            for s in servers:
                _request(s.client, s.opts, f"{sql}\n-- warm {next(counter)}")
        results: dict[str, dict[str, _Samples]] = {}
        for qname, sql in queries.items():
            samples = {n: _Samples() for n in names}
            rows = con.sql(sql).to_arrow_table().num_rows
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                if (r // len(names)) % 2:
                    order.reverse()
                for n in order:
                    server = next((x for x in servers if x.name == n), None)
                    got = _sample(con, server, f"{sql}\n-- request {next(counter)}", samples[n])
                    assert got == rows, (qname, n, got, rows)
            results[qname] = samples
            duck = samples["duckdb"].total
            line = [f"{qname[:3]}: duckdb {_ms(duck)}"]
            for s in servers:
                tot = samples[s.name].total
                paired = statistics.median(d / q for d, q in zip(duck, tot, strict=True))
                line.append(
                    f"{s.name} {_ms(tot)} paired {paired:.3f}x median-ratio "
                    f"{statistics.median(duck) / statistics.median(tot):.3f}x"
                )
            print(", ".join(line), file=sys.stderr, flush=True)
    _print_ab(results, rounds, started, load_before, idle)


def _print_ab(
    results: dict[str, dict[str, _Samples]],
    rounds: int,
    started: str,
    load_before: tuple[float, float, float],
    idle: dict[str, float],
) -> None:
    ended = time.strftime("%H:%M:%S", time.gmtime())
    print(f"# idle server CPU (cores busy over {IDLE_SECONDS:g} s before the rounds): {idle}")
    print(
        f"# A/B {started} to {ended} UTC, {rounds} rounds per query, order rotating; load (1/5/15 min) "
        f"before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in os.getloadavg())}\n"
    )
    print(
        "| query | contender | total ms p50 [min-max] | GetFlightInfo p50 | DoGet p50 | added p50 ms | "
        "ratio of medians | paired ratio (median of per-round) | rounds Quiver slower | CPU ms/request |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for qname, samples in results.items():
        duck = samples["duckdb"].total
        for n, s in samples.items():
            tot = s.total
            if n == "duckdb":
                print(
                    f"| {qname[:3]} | in-process duckdb | {_ms(tot)} | - | - | - | - | - | - | "
                    f"{s.cpu / len(tot) * 1e3:.0f} (process, all threads) |"
                )
                continue
            paired = statistics.median(d / q for d, q in zip(duck, tot, strict=True))
            slower = sum(q > d for d, q in zip(duck, tot, strict=True))
            print(
                f"| {qname[:3]} | {n} | {_ms(tot)} | {statistics.median(s.info) * 1e3:.1f} | "
                f"{statistics.median(s.doget) * 1e3:.1f} | "
                f"{(statistics.median(tot) - statistics.median(duck)) * 1e3:+.1f} | "
                f"{statistics.median(duck) / statistics.median(tot):.3f}x | {paired:.3f}x | "
                f"{slower}/{len(tot)} | {s.cpu / len(tot) * 1e3:.0f} (server) |"
            )


# --- the server-side split ------------------------------------------------------------------------

_MARKS = threading.local()


def _instrument() -> None:
    from catalog import sqlguard
    from flight_server import planner, ready, server, streams

    _timed(server.QuiverFlightServer, "get_flight_info", "GetFlightInfo handler (all)")
    _timed(server.QuiverFlightServer, "do_get", "DoGet handler (until its stream object)")
    _timed(planner.Planner, "check_sql", "guard: check (all)")
    _timed(
        sqlguard.SqlGuard,
        "_parse_uncached",
        "guard: full parse (extract_statements + json_serialize_sql + json)",
    )
    _timed(sqlguard, "_literals", "guard: tokenize for the shape key")
    _timed(sqlguard._Walk, "statement", "guard: walk of the tree (allowlist, functions)")
    _timed(sqlguard._Sizer, "any", "guard: size-bound walk")
    _timed(planner.Planner, "query_schema", "LIMIT 0 schema probe (should not run)")
    _timed(streams.Streamer, "run_at_info", "run_at_info (admission, run, wait, hold)")
    _timed(streams.Streamer, "_info_run", "worker: the run (submit + head read)")
    _timed(streams, "arrow_stream", "DuckDB submit (parse, bind, plan, start)")
    _timed(streams, "_read_head", "head read (DuckDB execution + Arrow conversion)")
    _timed(streams.Streamer, "open", "DoGet: stream open (held result)")

    original_on_worker = streams.Streamer._on_worker
    original_info_run = streams.Streamer._info_run
    original_finish = ready.HeldRun.finish
    original_wait = ready.HeldRun.wait_head

    submitted: dict[int, float] = {}
    finished: dict[int, float] = {}

    def on_worker(self: Any, run: Any, *args: Any) -> bool:
        submitted[id(run)] = time.perf_counter()
        return bool(original_on_worker(self, run, *args))

    def info_run(self: Any, run: Any, *args: Any) -> None:
        sent = submitted.pop(id(run), None)
        if sent is not None:
            TIMES["hand-over: submit -> worker starts"].append(time.perf_counter() - sent)
        original_info_run(self, run, *args)

    def finish(self: Any, *args: Any, **kwargs: Any) -> None:
        finished[id(self)] = time.perf_counter()
        original_finish(self, *args, **kwargs)

    def wait_head(self: Any, timeout: float) -> bool:
        got = bool(original_wait(self, timeout))
        done = finished.pop(id(self), None)
        if got and done is not None:
            TIMES["hand-back: worker finished -> GetFlightInfo wakes"].append(time.perf_counter() - done)
        return got

    streams.Streamer._on_worker = on_worker  # type: ignore[method-assign,assignment]
    streams.Streamer._info_run = info_run  # type: ignore[method-assign,assignment]
    ready.HeldRun.finish = finish  # type: ignore[method-assign]
    ready.HeldRun.wait_head = wait_head  # type: ignore[method-assign]


def _split(queries: dict[str, str], rounds: int, work: Path, master: Path) -> None:
    from flight_server import streams
    from tests.harness import call_options, start_server

    db = work / "split.duckdb"
    plain = work / "plain.duckdb"
    shutil.copyfile(master, db)
    shutil.copyfile(master, plain)
    arrow_stream = streams.arrow_stream  # the original: the plain steps are not the server's
    _instrument()
    srv = start_server(
        work / "split-data",
        demo=False,
        server={"database": str(db)},
        cache={"enabled": False, "table_memory_bytes": 0},
        limits={"query_timeout_seconds": 600},
    )
    started, load_before = time.strftime("%H:%M:%S", time.gmtime()), os.getloadavg()
    try:
        http = srv.http()
        r = http.post("/v1/swarms", json={"name": "bench", "description": "split", "tables": ["star.*"]})
        assert r.status_code == 201, r.text
        token = srv.mint(swarm="bench", agent="split")
        client = flight.FlightClient(srv.flight_url)
        opts = call_options(token)
        counter = iter(range(1, 10**9))
        con = duckdb.connect(str(plain), read_only=True)
        for qname, sql in queries.items():
            _request(client, opts, f"{sql}\n-- warm {next(counter)}")
            con.sql(sql).to_arrow_table()
            TIMES.clear()
            ends = []
            steps: dict[str, list[float]] = defaultdict(list)
            for i in range(rounds):
                # In this process, interleaved with the server's requests, order alternating.
                for step in ("server", "plain") if i % 2 == 0 else ("plain", "server"):
                    gc.collect()
                    time.sleep(SETTLE_SECONDS)
                    if step == "server":
                        info, doget, _rows = _request(client, opts, f"{sql}\n-- request {next(counter)}")
                        ends.append((info, doget))
                        continue
                    t0 = time.perf_counter()
                    con.sql(sql).to_arrow_table()
                    steps["plain connection: con.sql(q).to_arrow_table()"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    arrow_stream(con, sql).read_all()
                    steps["plain connection: arrow_stream(q).read_all() (the server's call)"].append(
                        time.perf_counter() - t0
                    )
            times = dict(TIMES)
            times.update(steps)
            print(f"\n### {qname}: server-side split, {rounds} requests (in-process runtime, caches off)\n")
            print(
                f"client: GetFlightInfo p50 {statistics.median(a for a, _ in ends) * 1e3:.2f} ms, "
                f"DoGet p50 {statistics.median(b for _, b in ends) * 1e3:.2f} ms\n"
            )
            print("| step | calls | p50 ms | min ms | max ms |\n| --- | --- | --- | --- | --- |")
            for label, ts in times.items():
                print(
                    f"| {label} | {len(ts)} | {statistics.median(ts) * 1e3:.3f} | {min(ts) * 1e3:.3f} | "
                    f"{max(ts) * 1e3:.3f} |"
                )
        con.close()
    finally:
        srv.stop()
    print(
        f"\n# split {started} to {time.strftime('%H:%M:%S', time.gmtime())} UTC; load before "
        f"{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in os.getloadavg())}"
    )


def main(argv: list[str]) -> int:
    args = list(argv)
    base: Path | None = None
    split = "--split" in args
    if split:
        args.remove("--split")
    if "--base" in args:
        at = args.index("--base")
        base = Path(args[at + 1]).resolve()
        del args[at : at + 2]
    rounds = int(args.pop(0)) if args and args[0].isdigit() else 40
    queries = _pick(args or list(DEFAULT_QUERIES))
    master, _gb = _data_file()
    work = Path(tempfile.mkdtemp(prefix="quiver-ab-analytic-"))
    try:
        _ab(queries, rounds, base, work, master)
        if split:
            _split(queries, rounds, work, master)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
