"""The data plane benchmark (issue 3, DESIGN.md §8): all figures from one run on the same data.

A DuckDB file with a synthetic table ``bench.t`` (ints, doubles, strings, timestamps;
``QUIVER_BENCH_ROWS``, default 5,000,000 rows) is measured

- in-process: ``duckdb … .to_arrow_table()`` — the limit — and a point query's own execution;
- through a real ``quiver serve`` (a subprocess, agent token, SQL guard, parallel endpoints)
  read with the agent client :class:`flight_server.client.QuiverClient`;
- through a bare single-stream ``pyarrow.flight`` server holding the same table in memory
  (tests/bench/bare_flight.py, a subprocess);
- through ROAPI's Flight SQL endpoint on the same rows (Parquet), read with the ADBC driver.

Each figure is the median of ``QUIVER_BENCH_REPS`` repetitions (default 5); point queries
report p50/p99 over ``QUIVER_BENCH_POINTS`` random keys (default 300).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

ROWS = int(os.environ.get("QUIVER_BENCH_ROWS", "5000000"))
REPS = int(os.environ.get("QUIVER_BENCH_REPS", "5"))
POINTS = int(os.environ.get("QUIVER_BENCH_POINTS", "300"))
CLIENTS = 8
POINT_SQL = "SELECT * FROM bench.t WHERE id = ?"
ROOT = Path(__file__).resolve().parents[2]

TABLE_SQL = """
CREATE SCHEMA bench;
CREATE TABLE bench.t AS
SELECT
    i AS id,
    (hash(i, 'k') % 1000)::INTEGER AS k,
    (hash(i, 'x') % 1000000) / 100.0 AS x,
    (hash(i, 'y') % 1000000)::DOUBLE / 7.0 AS y,
    (['alpha', 'beta', 'gamma', 'delta', 'epsilon'])[1 + (hash(i, 's') % 5)::INTEGER] || '-' || (i % 997)::VARCHAR AS s,
    TIMESTAMP '2024-01-01' + to_seconds((hash(i, 'ts') % (365 * 86400))::BIGINT) AS ts
FROM range({rows}) t(i);
"""


# --- small helpers -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _median_seconds(fn: Callable[[], Any], reps: int = REPS, warmup: int = 1) -> tuple[float, Any]:
    last = None
    for _ in range(warmup):
        last = fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), last


def _latencies(fn: Callable[[int], Any], keys: list[int], warmup: int = 20) -> list[float]:
    for k in keys[:warmup]:
        fn(k)
    out = []
    for k in keys:
        started = time.perf_counter()
        fn(k)
        out.append(time.perf_counter() - started)
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def _process(
    args: list[str], log: Path, what: str, port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        _wait_port(port, proc, what)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Row:
    measure: str
    figure: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    met: str = ""


# --- the run -------------------------------------------------------------------------------------


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="quiver-bench-"))
    try:
        return _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(work: Path) -> str:
    rows: list[Row] = []
    rng = random.Random(20240601)
    keys = [rng.randrange(ROWS) for _ in range(POINTS)]
    db_path = work / "warehouse.duckdb"

    # 1. Data and the in-process limit (before the server holds the file's lock).
    started = time.perf_counter()
    con = duckdb.connect(str(db_path))
    con.execute(TABLE_SQL.format(rows=ROWS))
    con.execute("CHECKPOINT")
    _say(f"built bench.t: {ROWS:,} rows in {time.perf_counter() - started:.1f} s")
    duck_s, table = _median_seconds(lambda: con.sql("SELECT * FROM bench.t").to_arrow_table())
    mb = table.nbytes / 1e6
    _say(
        f"in-process duckdb full scan: {duck_s:.3f} s ({ROWS / duck_s / 1e6:.1f} M rows/s, {mb / duck_s:.0f} MB/s)"
    )
    duck_point = _latencies(lambda k: con.sql(POINT_SQL, params=[k]).to_arrow_table(), keys)
    duck_fetch = _latencies(lambda k: con.execute(POINT_SQL, [k]).fetchall(), keys)
    _say(
        f"in-process duckdb point query: p50 {_pct(duck_point, 50) * 1e3:.3f} ms (Arrow), "
        f"{_pct(duck_fetch, 50) * 1e3:.3f} ms (fetchall)"
    )
    tiny = con.sql(POINT_SQL, params=[keys[0]]).to_arrow_table()
    con.close()

    big_file, tiny_file, parquet_file = work / "t.arrow", work / "tiny.arrow", work / "t.parquet"
    for path, data in ((big_file, table), (tiny_file, tiny)):
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
            writer.write_table(data)
    pq.write_table(table, parquet_file, row_group_size=1_000_000)
    del table

    # 2. A bare single-stream Flight server holding the table in memory.
    port = _free_port()
    bare_args = [
        sys.executable,
        "-m",
        "tests.bench.bare_flight",
        str(port),
        f"big={big_file}",
        f"tiny={tiny_file}",
    ]
    with _process(bare_args, work / "bare.log", "bare flight server", port):
        bare = flight.FlightClient(f"grpc://127.0.0.1:{port}")
        big_ticket = bare.get_flight_info(flight.FlightDescriptor.for_command(b"big")).endpoints[0].ticket
        bare_s, got = _median_seconds(lambda: bare.do_get(big_ticket).read_all())
        assert got.num_rows == ROWS
        del got
        _say(f"bare pyarrow.flight single stream: {bare_s:.3f} s ({ROWS / bare_s / 1e6:.1f} M rows/s)")
        split = bare.get_flight_info(flight.FlightDescriptor.for_command(f"big/{CLIENTS}".encode()))

        def bare_parallel() -> pa.Table:
            with ThreadPoolExecutor(len(split.endpoints)) as pool:
                parts = list(pool.map(lambda e: bare.do_get(e.ticket).read_all(), split.endpoints))
            return pa.concat_tables(parts)

        bare_par_s, got = _median_seconds(bare_parallel)
        assert got.num_rows == ROWS
        del got
        _say(
            f"bare pyarrow.flight, {CLIENTS} endpoints in parallel: {bare_par_s:.3f} s ({ROWS / bare_par_s / 1e6:.1f} M rows/s)"
        )

        def bare_round_trip(_k: int) -> None:
            info = bare.get_flight_info(flight.FlightDescriptor.for_command(b"tiny"))
            bare.do_get(info.endpoints[0].ticket).read_all()

        bare_rt = _latencies(bare_round_trip, keys)
        _say(f"bare round trip (GetFlightInfo + DoGet, 1 row): p50 {_pct(bare_rt, 50) * 1e3:.3f} ms")
        bare.close()

    # 3. ROAPI's Flight SQL endpoint on the same rows.
    roapi_s = _bench_roapi(work, parquet_file)

    # 4. Quiver.
    quiver = _bench_quiver(work, db_path, keys)

    # --- the table ---------------------------------------------------------------------------
    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    q_scan = quiver["scan_s"]
    r_duck = ratio(duck_s, q_scan)
    rows.append(
        Row(
            "full scan, in-process duckdb `.to_arrow_table()`",
            f"{duck_s:.3f} s ({ROWS / duck_s / 1e6:.1f} M rows/s)",
        )
    )
    rows.append(
        Row(
            f"full scan via Quiver (QuiverClient, {quiver['endpoints']} endpoints in parallel)",
            f"{q_scan:.3f} s ({ROWS / q_scan / 1e6:.1f} M rows/s)",
            "in-process duckdb",
            f"{r_duck:.2f}x",
            "≥ 0.85x",
            "yes" if r_duck >= 0.85 else "no",
        )
    )
    rows.append(
        Row(
            "full scan, bare pyarrow.flight single stream (table in memory)",
            f"{bare_s:.3f} s ({ROWS / bare_s / 1e6:.1f} M rows/s)",
            "Quiver / bare",
            f"{ratio(bare_s, q_scan):.2f}x",
            "report",
            "—",
        )
    )
    rows.append(
        Row(
            f"full scan, bare pyarrow.flight, {CLIENTS} endpoints fetched in parallel",
            f"{bare_par_s:.3f} s ({ROWS / bare_par_s / 1e6:.1f} M rows/s)",
            "Quiver / bare parallel",
            f"{ratio(bare_par_s, q_scan):.2f}x (bare parallel / duckdb: {ratio(duck_s, bare_par_s):.2f}x)",
            "report",
            "—",
        )
    )
    if roapi_s is not None:
        r_peer = ratio(roapi_s, q_scan)
        rows.append(
            Row(
                "full scan, ROAPI Flight SQL (ADBC)",
                f"{roapi_s:.3f} s ({ROWS / roapi_s / 1e6:.1f} M rows/s)",
                "Quiver / ROAPI",
                f"{r_peer:.2f}x",
                "≥ 2x",
                "yes" if r_peer >= 2 else "no",
            )
        )
    else:
        rows.append(Row("full scan, ROAPI Flight SQL (ADBC)", "not measured (roapi unavailable)"))
    floor = _pct(bare_rt, 50) + _pct(duck_point, 50)
    gap_ms = (quiver["point_p50"] - floor) * 1e3
    rows.append(
        Row(
            "point query via Quiver (GetFlightInfo + DoGet, agent token)",
            f"p50 {quiver['point_p50'] * 1e3:.3f} ms · p99 {quiver['point_p99'] * 1e3:.3f} ms",
            f"floor = bare round trip {_pct(bare_rt, 50) * 1e3:.3f} ms + duckdb {_pct(duck_point, 50) * 1e3:.3f} ms"
            f" = {floor * 1e3:.3f} ms",
            f"gap {gap_ms:+.3f} ms",
            "≤ 0.5 ms",
            "yes" if gap_ms <= 0.5 else "no",
        )
    )
    rows.append(
        Row(
            f"{CLIENTS} concurrent clients, full scans",
            f"{quiver['scan_conc_rps'] / 1e6:.1f} M rows/s aggregate",
            f"1 client {ROWS / q_scan / 1e6:.1f} M rows/s",
            f"{ratio(quiver['scan_conc_rps'], ROWS / q_scan):.2f}x",
            "report",
            "—",
        )
    )
    rows.append(
        Row(
            f"{CLIENTS} concurrent clients, point queries",
            f"{quiver['point_conc_qps']:.0f} queries/s aggregate",
            f"1 client {quiver['point_qps']:.0f} queries/s",
            f"{ratio(quiver['point_conc_qps'], quiver['point_qps']):.2f}x",
            "report",
            "—",
        )
    )
    lines = [
        "## Flight data plane",
        "",
        f"`bench.t`: {ROWS:,} rows (BIGINT, INTEGER, 2 x DOUBLE, VARCHAR, TIMESTAMP; {mb:.0f} MB as Arrow). "
        f"Medians of {REPS} runs after a warm-up; point queries over {POINTS} random keys. "
        "Quiver runs as `quiver serve` in a subprocess (agent token, SQL guard, result cache on); "
        "the bare server and ROAPI are subprocesses too; the clients share this process. "
        "Point-query floor: DuckDB in-process via the Arrow path "
        f"(`fetchall()` p50: {_pct(duck_fetch, 50) * 1e3:.3f} ms).",
        "",
        "| measure | figure | compared with | ratio / gap | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.measure} | {r.figure} | {r.reference} | {r.ratio} | {r.target} | {r.met} |" for r in rows
    ]
    if quiver.get("diagnostics"):
        lines += [
            "",
            "Diagnostics (where the time goes; no targets):",
            "",
            "| measure | figure |",
            "| --- | --- |",
        ]
        lines += [f"| {name} | {figure} |" for name, figure in quiver["diagnostics"]]
    if quiver.get("cache"):
        lines += ["", f"Result cache after the run: `{json.dumps(quiver['cache'])}`"]
    _say("\n".join(lines))
    return "\n".join(lines)


def _bench_roapi(work: Path, parquet_file: Path) -> float | None:
    binary = shutil.which("roapi") or str(Path(sys.executable).with_name("roapi"))
    if not Path(binary).exists():
        _say("roapi: not installed (pip install roapi); skipped")
        return None
    import adbc_driver_flightsql.dbapi as flightsql

    fs_port, http_port, pg_port = _free_port(), _free_port(), _free_port()
    args = [
        binary,
        "-t",
        f"t={parquet_file}",
        "--addr-flight-sql",
        f"127.0.0.1:{fs_port}",
        "-a",
        f"127.0.0.1:{http_port}",
        "-p",
        f"127.0.0.1:{pg_port}",
    ]
    env = {**os.environ, "RUST_LOG": "warn"}
    with _process(args, work / "roapi.log", "roapi", fs_port, env=env):
        with contextlib.suppress(Warning), flightsql.connect(f"grpc://127.0.0.1:{fs_port}") as conn:

            def scan() -> pa.Table:
                with conn.cursor() as cur:
                    cur.execute("SELECT * FROM t")
                    return cur.fetch_arrow_table()

            seconds, got = _median_seconds(scan, reps=max(3, REPS // 2))
            assert got.num_rows == ROWS, got.num_rows
        _say(f"ROAPI Flight SQL full scan: {seconds:.3f} s ({ROWS / seconds / 1e6:.1f} M rows/s)")
        return seconds


def _bench_quiver(work: Path, db_path: Path, keys: list[int]) -> dict[str, Any]:
    from flight_server.client import QuiverClient

    flight_port, http_port = _free_port(), _free_port()
    data_dir = work / "quiver"
    env = {
        **os.environ,
        "QUIVER_SERVER_DATA_DIR": str(data_dir),
        "QUIVER_SERVER_DATABASE": str(db_path),
        "QUIVER_SERVER_FLIGHT_PORT": str(flight_port),
        "QUIVER_SERVER_HTTP_PORT": str(http_port),
        "QUIVER_SERVER_LOG_FORMAT": "json",
    }
    args = [sys.executable, "-m", "quiver", "serve"]
    out: dict[str, Any] = {}
    with _process(args, work / "quiver.log", "quiver serve", flight_port, env=env) as proc:
        _wait_port(http_port, proc, "quiver serve (HTTP)")
        admin = (data_dir / "admin.token").read_text().strip()
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", headers={"authorization": f"Bearer {admin}"}
        )
        r = http.post("/v1/swarms", json={"name": "bench", "description": "benchmark", "tables": ["bench.*"]})
        if r.status_code != 201:
            raise RuntimeError(f"creating the bench swarm failed: {r.status_code} {r.text}")
        tokens = []
        for i in range(CLIENTS):  # one agent per client: the concurrency cap is per principal
            r = http.post("/v1/tokens", json={"kind": "agent", "swarm": "bench", "agent": f"bench-{i}"})
            r.raise_for_status()
            tokens.append(r.json()["token"])
        token = tokens[0]
        url = f"grpc://127.0.0.1:{flight_port}"

        client = QuiverClient(url, token)
        info = client.info(flight.FlightDescriptor.for_path("bench", "t"))
        out["endpoints"] = len(info.endpoints)
        out["scan_s"], got = _median_seconds(lambda: client.read("bench.t"))
        assert got.num_rows == ROWS, got.num_rows
        del got
        _say(
            f"quiver full scan ({out['endpoints']} endpoints): {out['scan_s']:.3f} s "
            f"({ROWS / out['scan_s'] / 1e6:.1f} M rows/s)"
        )

        point = _latencies(lambda k: client.query(POINT_SQL, [k]), keys)
        out["point_p50"], out["point_p99"] = _pct(point, 50), _pct(point, 99)
        out["point_qps"] = len(point) / sum(point)
        _say(f"quiver point query: p50 {out['point_p50'] * 1e3:.3f} ms, p99 {out['point_p99'] * 1e3:.3f} ms")
        out["diagnostics"] = _diagnose(url, token, client, keys, proc.pid)

        # Concurrency: CLIENTS clients at once, each with its own connection.
        clients = [QuiverClient(url, t) for t in tokens]
        out["scan_conc_rps"] = (
            CLIENTS * ROWS / _concurrently(clients, lambda c, _i: c.read("bench.t").num_rows)
        )
        _say(f"{CLIENTS} clients full scans: {out['scan_conc_rps'] / 1e6:.1f} M rows/s aggregate")
        per_client = max(20, len(keys) // 2)

        def points(c: QuiverClient, i: int) -> None:
            for k in keys[i : i + per_client]:
                c.query(POINT_SQL, [k + 1])

        out["point_conc_qps"] = CLIENTS * per_client / _concurrently(clients, points)
        _say(f"{CLIENTS} clients point queries: {out['point_conc_qps']:.0f} queries/s aggregate")
        status = http.get("/v1/status").json()
        out["cache"] = status.get("cache")
        for c in [client, *clients]:
            with contextlib.suppress(Exception):
                c.close()
        http.close()
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _diagnose(url: str, token: str, client: Any, keys: list[int], pid: int) -> list[tuple[str, str]]:
    """Where the time goes: figures for the lead, not targets."""
    raw = flight.FlightClient(url)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    out: list[tuple[str, str]] = []

    noop = _latencies(lambda _k: raw.list_actions(opts), keys)
    out.append(("authenticated no-op RPC (ListActions) p50", f"{_pct(noop, 50) * 1e3:.3f} ms"))

    infos: list[float] = []
    gets: list[float] = []

    def split(k: int) -> None:
        cmd = json.dumps({"kind": "query", "sql": POINT_SQL, "params": [k]}).encode()
        t0 = time.perf_counter()
        info = raw.get_flight_info(flight.FlightDescriptor.for_command(cmd), opts)
        t1 = time.perf_counter()
        for e in info.endpoints:
            raw.do_get(e.ticket, opts).read_all()
        t2 = time.perf_counter()
        infos.append(t1 - t0)
        gets.append(t2 - t1)

    for k in keys:
        split(k + 7)
    out.append(
        (
            "point query GetFlightInfo p50 / DoGet p50 (raw pyarrow client)",
            f"{_pct(infos, 50) * 1e3:.3f} ms / {_pct(gets, 50) * 1e3:.3f} ms",
        )
    )

    same = _latencies(lambda _k: client.query(POINT_SQL, [keys[0]]), keys[:100], warmup=5)
    out.append(("point query answered by the result cache (same key) p50", f"{_pct(same, 50) * 1e3:.3f} ms"))

    info = client.info(flight.FlightDescriptor.for_path("bench", "t"))
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    client.fetch(info)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
    out.append(
        (
            "full scan: server CPU seconds / wall seconds (2 cores = 2.0 max)",
            f"{cpu:.2f} / {wall:.2f} = {cpu / wall:.2f}",
        )
    )
    t0 = time.perf_counter()
    for e in info.endpoints:
        raw.do_get(e.ticket, opts).read_all()
    serial = time.perf_counter() - t0
    info = client.info(flight.FlightDescriptor.for_path("bench", "t"))
    out.append(
        (
            f"full scan, {len(info.endpoints)} endpoints read one after another (no parallelism)",
            f"{serial:.3f} s",
        )
    )
    raw.close()
    for name, figure in out:
        _say(f"diagnostic: {name}: {figure}")
    return out


def _concurrently(clients: list[Any], fn: Callable[[Any, int], Any]) -> float:
    barrier = threading.Barrier(len(clients) + 1)
    errors: list[BaseException] = []

    def worker(c: Any, i: int) -> None:
        barrier.wait()
        try:
            fn(c, i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed
