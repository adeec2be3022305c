"""Time ``SqlGuard.check`` for fresh-text queries (issue #10, the guard's parse): not a test and
not part of ``make bench``; run it against any checkout to compare:

    PYTHONPATH=<checkout> python -m tests.bench.profile_guard [calls]

Three cases, each on a new guard, p50/p99 over ``calls`` checks, with the 1-minute load
average before and after:

* ``fresh literal``: ``SELECT * FROM bench.t WHERE id = <k>``, a new k every call — the shape
  cache's case (one miss, then hits);
* ``new shape``: a new column alias each call, so every text is a new shape — the full parse
  (with the shape cache, plus the second parse that proves the shape);
* ``repeated text``: the same text every call — the exact-text cache.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from catalog.database import Database
from catalog.identity import Principal
from catalog.policy import Policy
from catalog.sqlguard import SqlGuard
from catalog.tables import TableCatalog


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def main(calls: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="profile_guard"))
    db = Database(root / "quiver.duckdb", temp_dir=root / "tmp", lockdown=True)
    with db.transaction() as cur:
        cur.execute(
            "CREATE SCHEMA bench; CREATE TABLE bench.t AS SELECT i AS id, i * 2 AS v FROM range(1000) r(i)"
        )
    tables = TableCatalog(db)
    policy = Policy(tables)
    policy.set_allowlist("bench", ["bench.*"])
    agent = Principal(
        kind="agent",
        jti="jti-profile",
        subject="profile",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        swarm="bench",
        agent="a1",
    )
    cases: dict[str, Callable[[int], str]] = {
        "fresh literal": lambda k: f"SELECT * FROM bench.t WHERE id = {4711 + k}",
        "new shape": lambda k: f"SELECT id AS c{k} FROM bench.t WHERE id = {4711 + k}",
        "repeated text": lambda _k: "SELECT * FROM bench.t WHERE id = 4711",
    }
    print(f"python {sys.version.split()[0]}, pid {os.getpid()}, load(1 min) before: {_load()}")
    for name, text in cases.items():
        guard = SqlGuard(tables, policy, db.catalog_name)
        guard.check(agent, "SELECT 1")  # the cursor and the table list, outside the timing
        times = []
        for k in range(calls):
            sql = text(k)
            start = time.perf_counter()
            guard.check(agent, sql)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        p50 = statistics.median(times)
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        hits = getattr(guard, "shape_hits", "n/a")
        print(f"{name:>14}: p50 {p50:.3f} ms  p99 {p99:.3f} ms  (shape hits {hits} of {calls})")
    print(f"load(1 min) after: {_load()}")
    db.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
