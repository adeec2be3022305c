"""A/B of target 5 (8 concurrent agents against one) for two code trees, interleaved
(tests/bench/PROFILE.md, section 9).

    python -m tests.bench.ab_scaling BASE_ROOT NEW_ROOT [ROUNDS] [PER_AGENT]

Two ``quiver serve`` subprocesses, each from its own tree on its own copy of a 1,000,000-row
``bench.t`` (as tests/bench/ab_point.py), eight agent tokens each (the concurrency cap is per
principal), one ``QuiverClient`` per token (what the agents of tests/bench/bench_agent.py
use). Each round runs, on each server in turn (the order alternating), one agent sending
PER_AGENT fresh-text point queries (default 150), then eight agents sending PER_AGENT each at
once (tests/bench/bench_flight.py ``_concurrently``). Prints, per server, the median queries/s
of both over the rounds, their ratio, and the CPU per query (the server's from
``/proc/<pid>/stat``, the clients' from this process) of each.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

from tests.bench.ab_point import _cpu_seconds, _Server, span
from tests.bench.bench_flight import CLIENTS, TABLE_SQL, _concurrently

ROWS = 1_000_000
FRESH = "SELECT * FROM bench.t WHERE id = {k}"


def _tokens(server: _Server, count: int) -> list[str]:
    """``count`` agent tokens of the server's bench swarm, minted through its control plane."""
    admin = (server.data / "admin.token").read_text().strip()
    with httpx.Client(base_url=server.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
        out = []
        for i in range(count):
            r = http.post("/v1/tokens", json={"kind": "agent", "swarm": "bench", "agent": f"scale-{i}"})
            r.raise_for_status()
            out.append(r.json()["token"])
    return out


def main(argv: list[str]) -> int:
    from quiver_client import QuiverClient

    base, new = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    rounds = int(argv[2]) if len(argv) > 2 else 5
    per = int(argv[3]) if len(argv) > 3 else 150
    work = Path(tempfile.mkdtemp(prefix="quiver-ab-scaling-"))
    started = time.strftime("%H:%M:%S", time.gmtime())
    load_before = os.getloadavg()
    rng = random.Random(20261202)
    # name -> list of (q/s one, q/s eight, server CPU/query one, eight, client CPU/query one, eight)
    results: dict[str, list[tuple[float, float, float, float, float, float]]] = {}
    try:
        db = work / "a.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute(TABLE_SQL.format(rows=ROWS))
            con.execute("CHECKPOINT")
        shutil.copyfile(db, work / "b.duckdb")
        with contextlib.ExitStack() as stack:
            servers = [
                _Server(stack, base, work, "base", db),
                _Server(stack, new, work, "new", work / "b.duckdb"),
            ]
            agents: dict[str, list[Any]] = {}
            for s in servers:
                agents[s.name] = [stack.enter_context(QuiverClient(s.url, t)) for t in _tokens(s, CLIENTS)]

            def points(client: Any, i: int, base: int) -> None:
                for j in range(per):  # a new text every call, distinct across agents and rounds
                    client.query(FRESH.format(k=(base + i * per + j) * 7919 % ROWS))

            for s in servers:  # warm-up: connections, gRPC threads, the shape caches
                _concurrently(agents[s.name], functools.partial(points, base=rng.randrange(ROWS)))
            for r in range(rounds):
                for s in servers if r % 2 == 0 else servers[::-1]:
                    row = []
                    for clients in (agents[s.name][:1], agents[s.name]):
                        server0, client0 = _cpu_seconds(s.pid), time.process_time()
                        wall = _concurrently(clients, functools.partial(points, base=rng.randrange(ROWS)))
                        client = time.process_time() - client0
                        time.sleep(0.1)  # what the server does after the last answer (its records)
                        queries = per * len(clients)
                        row.append(
                            (queries / wall, (_cpu_seconds(s.pid) - server0) / queries, client / queries)
                        )
                    (q1, s1, c1), (qn, sn, cn) = row
                    results.setdefault(s.name, []).append((q1, qn, s1, sn, c1, cn))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"# A/B scaling {span(started, load_before, f'{rounds} rounds, {per} queries per agent, {CLIENTS} agents')}\n"
    )
    print(
        "| server | 1 agent q/s | 8 agents q/s | ratio (median of rounds) | server CPU/query 1 / 8 ms "
        "| client CPU/query 1 / 8 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        ratio = statistics.median(qn / q1 for q1, qn, *_ in rows)
        print(
            f"| {name} | {med[0]:.0f} | {med[1]:.0f} | {ratio:.2f}x | {med[2] * 1e3:.3f} / {med[3] * 1e3:.3f} "
            f"| {med[4] * 1e3:.3f} / {med[5] * 1e3:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
