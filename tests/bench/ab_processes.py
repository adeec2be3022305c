"""How far a data plane in two processes could take target 5 (8 concurrent agents against one)
on this machine, measured before building one (tests/bench/PROFILE.md, section 16).

    python -m tests.bench.ab_processes [ROUNDS] [PER_AGENT]

Why it is measured this way: pyarrow's Flight server turns gRPC's ``SO_REUSEPORT`` off, so a
second process cannot listen on the first one's port, and a DuckDB file open for writing
cannot be opened by another process. A multi-process data plane would therefore need its own
port per process (a FlightInfo's endpoint locations can name it) and a way to share the data.
Whether that is worth building depends on how far two independent processes scale, which is
what this measures: two servers, each on its own copy of a 1,000,000-row ``bench.t``, with
eight agents spread over both (4 + 4), against one agent and against eight agents on one
server. Two kinds of server, each in every round:

* ``bare``: tests/bench/bare_flight.py (pyarrow.flight + DuckDB, no guard, auth or cache),
  raw pyarrow clients sending GetFlightInfo + DoGet of ``db:SQL``;
* ``quiver``: ``quiver serve`` of this tree (the default configuration), one
  ``QuiverClient`` per agent token (what tests/bench/ab_scaling.py runs).

Every query is a fresh-text point query (a literal no server saw). Each client has its own
gRPC connection (a local subchannel pool for the raw clients: gRPC would otherwise share one
connection between clients of a process). Prints the medians over the rounds of each setup's
queries/s and the ratios to one agent; not part of ``make bench``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.flight as flight

from tests.bench.ab_point import _cpu_seconds, _Server, span
from tests.bench.ab_scaling import FRESH, ROWS, _tokens
from tests.bench.bench_flight import CLIENTS, ROOT, TABLE_SQL, _concurrently, _free_port, _process

SETUPS = ("1 agent, 1 process", f"{CLIENTS} agents, 1 process", f"{CLIENTS} agents, 2 processes")


def _bare_client(port: int) -> flight.FlightClient:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    return flight.FlightClient(f"grpc://127.0.0.1:{port}", generic_options=options)


def _bare_query(client: flight.FlightClient, sql: str) -> None:
    info = client.get_flight_info(flight.FlightDescriptor.for_command(f"db:{sql}".encode()))
    client.do_get(info.endpoints[0].ticket).read_all()


def main(argv: list[str]) -> int:
    from quiver_client import QuiverClient

    rounds = int(argv[0]) if argv else 5
    per = int(argv[1]) if len(argv) > 1 else 150
    work = Path(tempfile.mkdtemp(prefix="quiver-ab-processes-"))
    started = time.strftime("%H:%M:%S", time.gmtime())
    load_before = os.getloadavg()
    rng = random.Random(20261204)
    qps: dict[tuple[str, str], list[float]] = {}
    # (kind, setup) -> per round, the CPU seconds per query of all servers and of this process
    cpu: dict[tuple[str, str], list[float]] = {}
    try:
        db = work / "t.duckdb"
        with duckdb.connect(str(db)) as con:
            con.execute(TABLE_SQL.format(rows=ROWS))
            con.execute("CHECKPOINT")
        copies = []
        for name in ("bare0", "bare1", "quiver0", "quiver1"):
            shutil.copyfile(db, work / f"{name}.duckdb")
            copies.append(work / f"{name}.duckdb")
        with contextlib.ExitStack() as stack:
            # kind -> per process, the agents' clients (CLIENTS each) and how one sends a query
            agents: dict[str, list[list[Any]]] = {"bare": [], "quiver": []}
            pids: dict[str, list[int]] = {"bare": [], "quiver": []}
            send: dict[str, Callable[[Any, str], Any]] = {
                "bare": _bare_query,
                "quiver": lambda c, q: c.query(q),
            }
            for i in range(2):
                port = _free_port()
                args = [sys.executable, "-m", "tests.bench.bare_flight", str(port), f"db={copies[i]}"]
                proc = stack.enter_context(_process(args, work / f"bare{i}.log", "bare flight server", port))
                pids["bare"].append(proc.pid)
                clients = [_bare_client(port) for _ in range(CLIENTS)]
                for c in clients:
                    stack.callback(c.close)
                agents["bare"].append(clients)
                server = _Server(stack, ROOT, work, f"quiver{i}", copies[2 + i])
                pids["quiver"].append(server.pid)
                agents["quiver"].append(
                    [stack.enter_context(QuiverClient(server.url, t)) for t in _tokens(server, CLIENTS)]
                )
            half = CLIENTS // 2
            setups = {
                SETUPS[0]: lambda kind: agents[kind][0][:1],
                SETUPS[1]: lambda kind: agents[kind][0],
                SETUPS[2]: lambda kind: agents[kind][0][:half] + agents[kind][1][: CLIENTS - half],
            }

            def points(client: Any, i: int, *, kind: str, base: int) -> None:
                for j in range(per):  # a new text every call, distinct across agents and rounds
                    send[kind](client, FRESH.format(k=(base + i * per + j) * 7919 % ROWS))

            for kind in agents:  # warm-up: connections, gRPC threads, the shape caches
                for clients in agents[kind]:
                    _concurrently(clients, functools.partial(points, kind=kind, base=rng.randrange(ROWS)))
            for r in range(rounds):
                for kind in agents if r % 2 == 0 else list(agents)[::-1]:
                    for setup, pick in setups.items():
                        clients = pick(kind)
                        fn = functools.partial(points, kind=kind, base=rng.randrange(ROWS))
                        server0, client0 = sum(map(_cpu_seconds, pids[kind])), time.process_time()
                        wall = _concurrently(clients, fn)
                        client = time.process_time() - client0
                        time.sleep(0.1)  # what the servers do after the last answer (their records)
                        queries = per * len(clients)
                        used = sum(map(_cpu_seconds, pids[kind])) - server0 + client
                        qps.setdefault((kind, setup), []).append(queries / wall)
                        cpu.setdefault((kind, setup), []).append(used / queries)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# two processes, {span(started, load_before, f'{rounds} rounds, {per} queries per agent')}\n")
    cores = os.cpu_count() or 1
    print(
        f"Each cell: queries/s, then the CPU per query of the servers and this client process together "
        f"(ms). The last column is what {cores} cores allow at most: {cores} cores over eight agents' CPU "
        "per query, divided by one agent's queries/s.\n"
    )
    print(f"| server | {' | '.join(SETUPS)} | ratio, 1 process | ratio, 2 processes | CPU bound |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("bare", "quiver"):
        one, eight, spread = (statistics.median(qps[(kind, s)]) for s in SETUPS)
        per_query = [statistics.median(cpu[(kind, s)]) for s in SETUPS]
        cells = " | ".join(
            f"{q:.0f} q/s, {c * 1e3:.2f} ms" for q, c in zip((one, eight, spread), per_query, strict=True)
        )
        bound = cores / per_query[2] / one
        print(f"| {kind} | {cells} | {eight / one:.2f}x | {spread / one:.2f}x | {bound:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
