"""A/B of the point-query path: two ``quiver serve`` subprocesses of two code trees, the same
requests sent to both in turn (tests/bench/PROFILE.md, section 5).

    python -m tests.bench.ab_point BASE_ROOT NEW_ROOT [CALLS] [ROWS]

Each server runs from its own tree (``cwd`` and ``PYTHONPATH`` = the root, so neither imports
the other's modules) on its own copy of a ``bench.t`` of ROWS rows (default 1,000,000). For
each of CALLS rounds (default 400) a fresh-text point query (``WHERE id = <new k>``, a literal
neither server has seen) and a parameterized one (``WHERE id = ?``, a new value) are sent to
both servers, the order of the two servers alternating from round to round, so that the load
of a shared machine falls on both alike. GetFlightInfo and DoGet are timed apart at the
client (a raw pyarrow.flight client). Prints the medians, the p99, each server's CPU per query
(``/proc/<pid>/stat`` over the timed rounds) and the load average.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pyarrow.flight as flight

from tests.bench.bench_flight import TABLE_SQL, _free_port, _wait_port

FRESH = "SELECT * FROM bench.t WHERE id = {k}"
PARAM = "SELECT * FROM bench.t WHERE id = ?"


def span(started: str, load_before: tuple[float, float, float], what: str) -> str:
    """A result header's middle: from ``started`` (UTC, H:M:S) to now, ``what`` was run, and
    the 1/5/15-minute load before and after (a figure taken under load reads differently)."""
    ended = time.strftime("%H:%M:%S", time.gmtime())
    before, after = (tuple(round(x, 2) for x in load) for load in (load_before, os.getloadavg()))
    return f"{started} to {ended} UTC, {what}; load (1/5/15 min) before {before}, after {after}"


class _Server:
    """A ``quiver serve`` of the tree at ``root`` on the DuckDB file ``db`` (its own copy), with
    ``env`` added to its environment (e.g. a caches-off configuration), a swarm ``bench``
    reading ``tables`` and an agent token of it (also used by the other A/B scripts)."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        root: Path,
        work: Path,
        name: str,
        db: Path,
        *,
        env: dict[str, str] | None = None,
        tables: str = "bench.*",
    ) -> None:
        flight_port, http_port = _free_port(), _free_port()
        data = work / name
        environ = {
            **os.environ,
            **(env or {}),
            "PYTHONPATH": str(root),
            "QUIVER_SERVER_DATA_DIR": str(data),
            "QUIVER_SERVER_DATABASE": str(db),
            "QUIVER_SERVER_FLIGHT_PORT": str(flight_port),
            "QUIVER_SERVER_HTTP_PORT": str(http_port),
            "QUIVER_SERVER_LOG_FORMAT": "json",
        }
        log = (work / f"{name}.log").open("wb")
        stack.callback(log.close)
        proc = subprocess.Popen(
            [sys.executable, "-m", "quiver", "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=environ,
        )

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        stack.callback(stop)
        _wait_port(flight_port, proc, name)
        _wait_port(http_port, proc, name)
        admin = (data / "admin.token").read_text().strip()
        with httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", headers={"authorization": f"Bearer {admin}"}
        ) as http:
            r = http.post("/v1/swarms", json={"name": "bench", "description": "ab", "tables": [tables]})
            r.raise_for_status()
            r = http.post("/v1/tokens", json={"kind": "agent", "swarm": "bench", "agent": "ab"})
            r.raise_for_status()
            token = r.json()["token"]
        self.name = name
        self.pid = proc.pid
        self.token = token
        self.data = data
        self.url = f"grpc://127.0.0.1:{flight_port}"
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.client = flight.FlightClient(self.url)
        stack.callback(self.client.close)
        self.opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])

    def one(self, sql: str, params: list[Any] | None) -> tuple[float, float]:
        body: dict[str, Any] = {"kind": "query", "sql": sql}
        if params:
            body["params"] = params
        descriptor = flight.FlightDescriptor.for_command(json.dumps(body).encode())
        t0 = time.perf_counter()
        info = self.client.get_flight_info(descriptor, self.opts)
        t1 = time.perf_counter()
        table = self.client.do_get(info.endpoints[0].ticket, self.opts).read_all()
        t2 = time.perf_counter()
        assert table.num_rows == 1, table.num_rows
        return t1 - t0, t2 - t1


def main(argv: list[str]) -> int:
    base, new = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    calls = int(argv[2]) if len(argv) > 2 else 400
    rows = int(argv[3]) if len(argv) > 3 else 1_000_000
    work = Path(tempfile.mkdtemp(prefix="quiver-ab-"))
    started = time.strftime("%H:%M:%S", time.gmtime())
    load_before = os.getloadavg()
    try:
        db = work / "a.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute(TABLE_SQL.format(rows=rows))
            con.execute("CHECKPOINT")
        shutil.copyfile(db, work / "b.duckdb")
        with contextlib.ExitStack() as stack:
            servers = [
                _Server(stack, base, work, "base", db),
                _Server(stack, new, work, "new", work / "b.duckdb"),
            ]
            rng = random.Random(20261202)
            keys = rng.sample(range(rows), 4 * calls + 100)
            for i, k in enumerate(keys[4 * calls :]):  # warm-up: threads, cursors, caches of shapes
                for s in servers:
                    s.one(FRESH.format(k=k), None)
                    s.one(PARAM, [k + i])
            times: dict[tuple[str, str], list[tuple[float, float]]] = {}
            cpu0 = {s.name: _cpu_seconds(s.pid) for s in servers}
            for i in range(calls):
                order = servers if i % 2 == 0 else servers[::-1]
                for j, s in enumerate(order):
                    # A literal and a value neither server saw: each server gets its own key.
                    k_fresh, k_param = keys[4 * i + 2 * j], keys[4 * i + 2 * j + 1]
                    times.setdefault((s.name, "fresh"), []).append(s.one(FRESH.format(k=k_fresh), None))
                    times.setdefault((s.name, "param"), []).append(s.one(PARAM, [k_param]))
            cpu = {s.name: (_cpu_seconds(s.pid) - cpu0[s.name]) / (2 * calls) for s in servers}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# A/B {span(started, load_before, f'{calls} rounds, {rows:,} rows')}\n")
    print("| query | server | GetFlightInfo p50 ms | DoGet p50 ms | total p50 ms | total p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in ("fresh", "param"):
        for name in ("base", "new"):
            ts = times[(name, kind)]
            totals = sorted(a + b for a, b in ts)
            p99 = totals[min(len(totals) - 1, int(0.99 * len(totals)))]
            print(
                f"| {kind} | {name} | {statistics.median(a for a, _ in ts) * 1e3:.3f} | "
                f"{statistics.median(b for _, b in ts) * 1e3:.3f} | {statistics.median(totals) * 1e3:.3f} | "
                f"{p99 * 1e3:.3f} |"
            )
    print(
        "\nServer CPU per query (utime + stime of the process over the timed rounds, fresh and `?` "
        "together, ticks of 10 ms): " + ", ".join(f"{name} {sec * 1e3:.3f} ms" for name, sec in cpu.items())
    )
    return 0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (every thread, the ended ones included), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
