"""A/B of the first PATH scan after a restart: two code trees, fresh ``quiver serve``
processes for every sample, interleaved (tests/bench/PROFILE.md, section 9).

    python -m tests.bench.ab_restart BASE_ROOT NEW_ROOT [ROUNDS] [ROWS]

Each tree runs its own server (``cwd`` and ``PYTHONPATH`` = the root, so neither imports the
other's modules) on its own data dir and its own copy of a ``bench.t`` of ROWS rows (default
5,000,000). Once, each server scans the table and waits until its hot-table cache holds it,
then stops cleanly. Then, for each of ROUNDS rounds (default 8), the order of the two trees
alternating, each tree's server is started again on its data dir, left until its
``/v1/status`` says no reload is pending (at its first status answer for a tree without
``cache.tables.reload``: that answer is the base tree's "ready to reload done") plus a 0.5 s
settle, and its first PATH scan is timed, then a second one; the server stops. After every round a third server (the base tree, every cache that holds table data off,
running throughout, DuckDB warm) scans twice: the uncached warm reference. Prints every
sample, the medians, the reload times and the load average.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

from tests.bench.bench_agent import CACHES_OFF
from tests.bench.bench_flight import TABLE_SQL, _free_port, _wait_port

TIMEOUT = 120.0


class _Server:
    """One ``quiver serve`` of ``root`` on ``work/name`` and ``db``, until :meth:`stop`."""

    def __init__(
        self, root: Path, work: Path, name: str, db: Path, extra: dict[str, str] | None = None
    ) -> None:
        flight_port, http_port = _free_port(), _free_port()
        self.data = work / name
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "QUIVER_SERVER_DATA_DIR": str(self.data),
            "QUIVER_SERVER_DATABASE": str(db),
            "QUIVER_SERVER_FLIGHT_PORT": str(flight_port),
            "QUIVER_SERVER_HTTP_PORT": str(http_port),
            "QUIVER_SERVER_LOG_FORMAT": "json",
            **(extra or {}),
        }
        self._log = (work / f"{name}.log").open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "quiver", "serve"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
        )
        _wait_port(flight_port, self._proc, name)
        _wait_port(http_port, self._proc, name)
        admin = (self.data / "admin.token").read_text().strip()
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{http_port}", headers={"authorization": f"Bearer {admin}"}, timeout=60
        )
        self.url = f"grpc://127.0.0.1:{flight_port}"

    def token(self) -> str:
        """An agent token of the swarm ``bench`` (made by the first start, kept in the data dir)."""
        path = self.data / "ab-agent.token"
        if not path.exists():
            r = self.http.post(
                "/v1/swarms", json={"name": "bench", "description": "ab", "tables": ["bench.*"]}
            )
            r.raise_for_status()
            r = self.http.post("/v1/tokens", json={"kind": "agent", "swarm": "bench", "agent": "ab"})
            r.raise_for_status()
            path.write_text(r.json()["token"])
        return path.read_text()

    def tables(self) -> dict[str, Any]:
        status: dict[str, Any] = (self.http.get("/v1/status").json().get("cache") or {}).get("tables") or {}
        return status

    def wait(self, done: str) -> None:
        """Poll /v1/status (no Flight call: a call would make a background load yield)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            tables = self.tables()
            reload = tables.get("reload") or {}
            if done == "reload" and (not reload or reload.get("done")):
                return
            if done == "held" and "bench.t" in {t["table"] for t in tables.get("tables") or ()}:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.data.name}: not {done} within {TIMEOUT} s")

    def stop(self) -> None:
        self.http.close()
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def _scan(url: str, token: str, rows: int) -> float:
    from quiver_client import QuiverClient

    with QuiverClient(url, token) as qc:
        started = time.perf_counter()
        got = qc.read("bench.t").num_rows
        seconds = time.perf_counter() - started
    assert got == rows, got
    return seconds


def _utc() -> str:
    return time.strftime("%H:%M:%S", time.gmtime())


def main(argv: list[str]) -> int:
    roots = {"base": Path(argv[0]).resolve(), "new": Path(argv[1]).resolve()}
    rounds = int(argv[2]) if len(argv) > 2 else 8
    rows = int(argv[3]) if len(argv) > 3 else 5_000_000
    work = Path(tempfile.mkdtemp(prefix="quiver-ab-restart-"))
    try:
        db = work / "warehouse.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute(TABLE_SQL.format(rows=rows))
            con.execute("CHECKPOINT")
        dbs = {name: work / f"{name}.duckdb" for name in ("base", "new", "off")}
        for path in dbs.values():
            shutil.copyfile(db, path)
        tokens: dict[str, str] = {}
        for name in ("base", "new"):  # the run before the restarts: the table held
            s = _Server(roots[name], work, name, dbs[name])
            tokens[name] = s.token()
            _scan(s.url, tokens[name], rows)
            s.wait("held")
            s.stop()
        off = _Server(roots["base"], work, "off", dbs["off"], CACHES_OFF)
        tokens["off"] = off.token()
        _scan(off.url, tokens["off"], rows)  # DuckDB warm there from now on
        samples: dict[str, list[float]] = {k: [] for k in ("base", "new", "base2", "new2", "off")}
        reloads: dict[str, list[float]] = {"base": [], "new": []}
        started, load_before = _utc(), os.getloadavg()
        for r in range(rounds):
            for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
                s = _Server(roots[name], work, name, dbs[name])
                ready = time.perf_counter()
                s.wait("reload")
                reloads[name].append(time.perf_counter() - ready)
                time.sleep(0.5)
                hits = s.tables().get("hits", 0)
                first = _scan(s.url, tokens[name], rows)
                hits = s.tables().get("hits", 0) - hits
                time.sleep(0.3)
                second = _scan(s.url, tokens[name], rows)
                s.stop()
                samples[name].append(first)
                samples[name + "2"].append(second)
                print(
                    f"{_utc()} round {r} {name}: first {first:.3f} s ({hits} table hits), then {second:.3f} s"
                )
            for _ in range(2):
                time.sleep(0.3)
                samples["off"].append(_scan(off.url, tokens["off"], rows))
            print(f"{_utc()} round {r} caches off: {samples['off'][-2]:.3f} {samples['off'][-1]:.3f} s")
        off.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(
        f"\n# A/B {started} to {_utc()} UTC, {rounds} rounds, {rows:,} rows; load (1/5/15 min) before "
        f"{tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in os.getloadavg())}\n"
    )
    print(
        "| tree | first PATH scan after a restart (median) | vs uncached warm | second scan | ready to reload done |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name in ("base", "new"):
        print(
            f"| {name} ({roots[name]}) | {med[name]:.3f} s | {med['off'] / med[name]:.2f}x | "
            f"{med[name + '2']:.3f} s | {statistics.median(reloads[name]):.2f} s |"
        )
    print(f"| uncached warm PATH scan (caches off) | {med['off']:.3f} s | 1.00x | | |")
    print(json.dumps({k: [round(x, 3) for x in v] for k, v in samples.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
