"""Where a fresh-text point query's and a query-command scan's milliseconds go
(tests/bench/PROFILE.md): per-step timings of the real server code path, and DuckDB's own
profile of the same SQL.

    python -m tests.bench.profile_point [ROWS] [CALLS]

A ``quiver serve`` runtime runs in this process (tests/harness.py ``start_server``) on a
``bench.t`` of ROWS rows (default 5,000,000, as in tests/bench/bench_flight.py), and a
pyarrow.flight client sends CALLS (default 300) fresh-text point queries
(``SELECT * FROM bench.t WHERE id = <new k>``), then the same with a ``?`` parameter, then
five query-command scans. Timing wrappers are put around the server's own functions (the
guard's parse and walk, the binder's schema probe, ticket issue and redeem, the stream's
DuckDB call and its first read, the auth middleware, the two RPC handlers): nothing is
replaced, each wrapper calls the original and records its wall time. Client and server share
one process (and its GIL), so the end-to-end figures are a little above those of
tests/bench/bench_agent.py; the steps are what matters here. Prints a Markdown report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.flight as flight

from tests.bench.bench_flight import TABLE_SQL
from tests.harness import call_options, start_server

TIMES: dict[str, list[float]] = defaultdict(list)
FRESH = "SELECT * FROM bench.t WHERE id = {k}"


def _timed(owner: Any, attr: str, label: str) -> None:
    """Wrap ``owner.attr`` so that every call's wall time is recorded under ``label``."""
    original = getattr(owner, attr)
    static = isinstance(owner.__dict__.get(attr), staticmethod) if isinstance(owner, type) else False

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label].append(time.perf_counter() - started)

    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


def _instrument() -> None:
    from catalog import sqlguard
    from flight_server import commands, middleware, planner, server, streams, tickets

    _timed(middleware.AuthMiddlewareFactory, "start_call", "auth middleware (token verify)")
    _timed(server.QuiverFlightServer, "get_flight_info", "GetFlightInfo handler (all)")
    _timed(server.QuiverFlightServer, "do_get", "DoGet handler (until the stream object is returned)")
    _timed(commands, "decode_descriptor", "descriptor decode (msgspec)")
    _timed(planner.Planner, "check_sql", "guard (cache lookup + check)")
    _timed(
        sqlguard.SqlGuard, "_parse_uncached", "guard: parse (extract_statements + json_serialize_sql + json)"
    )
    _timed(sqlguard._Walk, "statement", "guard: walk of the parse tree")
    _timed(sqlguard._Sizer, "any", "guard: size bound walk")
    _timed(planner.Planner, "query_schema", "schema: LIMIT 0 bind (admission + DuckDB)")
    _timed(tickets.TicketStore, "issue", "ticket issue")
    _timed(tickets.TicketStore, "redeem", "ticket redeem")
    _timed(streams.Streamer, "open", "DoGet: stream open (cache lookup, cursor, run)")
    _timed(streams, "arrow_stream", "DoGet: DuckDB parse+bind+plan (submit, re-plan)")
    _timed(streams, "_read_head", "DoGet: execution + Arrow conversion (read the head)")
    _timed(streams.Streamer, "_lookup", "DoGet: result-cache key + lookup")


def _duckdb_profile(db: Path, sql: str, runs: int = 100) -> dict[str, float]:
    """DuckDB's own profile of ``sql`` (a new literal each run) on a plain connection, detailed
    mode: medians over ``runs`` of the phases it reports, in ms. Then the same steps the server
    takes, timed one by one on plain connections (no Quiver code)."""
    from catalog.sqlguard import _strip_locations
    from flight_server.streams import arrow_stream

    out: dict[str, list[float]] = defaultdict(list)

    def clock(name: str, fn: Any) -> Any:
        started = time.perf_counter()
        result = fn()
        out[name].append((time.perf_counter() - started) * 1e3)
        return result

    with duckdb.connect(str(db), read_only=True) as con:
        path = Path(tempfile.mkdtemp()) / "profile.json"
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute("SET profiling_mode = 'detailed'")
        con.execute(f"PRAGMA profiling_output = '{path}'")
        for i in range(runs):
            con.sql(sql.format(k=1000 + i)).fetchall()
            prof = json.loads(path.read_text())
            out["duckdb profile: planner (bind) total"].append(prof["planner"]["total_time"] * 1e3)
            out["duckdb profile: planner binding_time"].append(prof["planner"]["binding_time"] * 1e3)
            out["duckdb profile: optimizer total"].append(prof["optimizer"]["total_time"] * 1e3)
            out["duckdb profile: physical planner total"].append(prof["physical_planner"]["total_time"] * 1e3)
            out["duckdb profile: operators (execution)"].append(
                sum(_operator_seconds(op) for op in prof["operator"]) * 1e3
            )
            out["duckdb profile: query cpu_time"].append(prof["query"]["cpu_time"] * 1e3)
        con.execute("PRAGMA disable_profiling")
        parser = duckdb.connect(":memory:")  # what the guard parses with: a private in-memory DB
        for i in range(runs):
            text = sql.format(k=5000 + i)
            clock(
                "step: extract_statements (statement split)",
                lambda text=text: parser.extract_statements(text),
            )
            raw = clock(
                "step: json_serialize_sql (a query on the parser DB)",
                lambda text=text: parser.execute("SELECT json_serialize_sql(?)", [text]).fetchall()[0][0],
            )
            tree = clock("step: json.loads of the parse tree", lambda raw=raw: json.loads(raw))
            clock(
                "step: normalize (strip locations, json.dumps sorted)",
                lambda tree=tree: json.dumps(
                    _strip_locations(tree["statements"][0]), sort_keys=True, separators=(",", ":")
                ),
            )
            clock(
                "step: LIMIT 0 bind for the schema (relation API)",
                lambda text=text: con.sql(
                    f"SELECT * FROM (\n{text}\n) LIMIT 0", params=None
                ).to_arrow_table(),
            )
            reader = clock("step: submit (parse+bind+plan+start)", lambda text=text: arrow_stream(con, text))
            clock("step: read the result (execution + Arrow)", lambda reader=reader: reader.read_all())
            clock(
                "step: whole con.sql(text).to_arrow_table()", lambda text=text: con.sql(text).to_arrow_table()
            )
        parser.close()
    return {k: statistics.median(v) for k, v in out.items()}


def _operator_seconds(node: dict[str, Any]) -> float:
    total = float(node.get("timing") or 0.0)
    for child in node.get("children") or []:
        total += _operator_seconds(child)
    return total


def main(argv: list[str]) -> int:
    rows = int(argv[0]) if argv else 5_000_000
    calls = int(argv[1]) if len(argv) > 1 else 300
    work = Path(tempfile.mkdtemp(prefix="quiver-profile-"))
    db = work / "warehouse.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(TABLE_SQL.format(rows=rows))
        con.execute("CHECKPOINT")
    copy = work / "copy.duckdb"
    shutil.copyfile(db, copy)
    duck = _duckdb_profile(copy, FRESH)
    _instrument()
    srv = start_server(work / "data", demo=False, server={"database": str(db)})
    try:
        http = srv.http()
        r = http.post("/v1/swarms", json={"name": "bench", "description": "profile", "tables": ["bench.*"]})
        assert r.status_code == 201, r.text
        token = srv.mint(swarm="bench", agent="p1")
        client = flight.FlightClient(srv.flight_url)
        opts = call_options(token)
        rng = random.Random(7)
        keys = rng.sample(range(rows), calls + 50)

        def one(sql: str, params: list[Any] | None = None) -> tuple[float, float]:
            body: dict[str, Any] = {"kind": "query", "sql": sql}
            if params:
                body["params"] = params
            t0 = time.perf_counter()
            info = client.get_flight_info(
                flight.FlightDescriptor.for_command(json.dumps(body).encode()), opts
            )
            t1 = time.perf_counter()
            for e in info.endpoints:
                client.do_get(e.ticket, opts).read_all()
            return t1 - t0, time.perf_counter() - t1

        for k in keys[calls:]:  # warm-up
            one(FRESH.format(k=k))
        reports = []
        for name, make in (
            ("fresh-text point query", lambda k: (FRESH.format(k=k), None)),
            ("parameterized point query", lambda k: ("SELECT * FROM bench.t WHERE id = ?", [k + 1])),
        ):
            TIMES.clear()
            ends: list[tuple[float, float]] = []
            for k in keys[:calls]:
                sql, params = make(k)
                ends.append(one(sql, params))
            reports.append(_section(name, ends, dict(TIMES)))
        TIMES.clear()
        scans = []
        for _ in range(5):
            scans.append(one("SELECT * FROM bench.t"))
        reports.append(_section("query-command scan `SELECT * FROM bench.t`", scans, dict(TIMES)))
    finally:
        srv.stop()
    print(f"# machine load {os.getloadavg()}, {rows:,} rows, {calls} calls\n")
    print("DuckDB's own profile and the server's steps on plain connections (fresh text, medians of 100):\n")
    print("| step | p50 ms |\n| --- | --- |")
    for step, ms in duck.items():
        print(f"| {step} | {ms:.3f} |")
    for report in reports:
        print(report)
    return 0


def _section(name: str, ends: list[tuple[float, float]], times: dict[str, list[float]]) -> str:
    info = statistics.median(e[0] for e in ends) * 1e3
    get = statistics.median(e[1] for e in ends) * 1e3
    lines = [
        f"\n## {name}: client GetFlightInfo p50 {info:.3f} ms, DoGet p50 {get:.3f} ms, {len(ends)} calls",
        "",
        "| step (server side) | calls | p50 ms | mean ms |",
        "| --- | --- | --- | --- |",
    ]
    for label, ts in times.items():
        lines.append(
            f"| {label} | {len(ts)} | {statistics.median(ts) * 1e3:.3f} | {statistics.fmean(ts) * 1e3:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main(sys.argv[1:]))
