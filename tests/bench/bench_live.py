"""Live tables (proto_docs/federation.md): a selective aggregate over a live table vs the same
SQL over its replica, and the bytes Snowflake sends for a mixed join's live side with and
without pushdown. Against the fakesnow emulator in-process (real connector over HTTP).

The emulator is DuckDB behind an HTTP server in this process: a live query's time here is
Quiver's overhead (translation, a session per query, the connector's round trips, Arrow over
HTTP) plus fakesnow's own, never a real warehouse's — read it as the cost of going remote,
not as Snowflake's speed. The bytes are what pushdown saves on any warehouse.

QUIVER_BENCH_ROWS (default 200,000) rows in the live table, QUIVER_BENCH_REPS (default 7)
runs per figure (the median is reported).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = int(os.environ.get("QUIVER_BENCH_ROWS", "200000"))
REPS = int(os.environ.get("QUIVER_BENCH_REPS", "7"))

AGGREGATE = (
    "SELECT status, count(*) AS n, sum(amount) AS total FROM {t}.orders WHERE customer_id = ? GROUP BY status"
)
MIXED = (
    "SELECT c.region, sum(o.amount) AS total FROM live.orders o JOIN rep.customers c ON c.id = o.customer_id "
    "WHERE o.amount > 900 GROUP BY c.region"
)


def _median(fn: Any) -> float:
    times = []
    for _ in range(REPS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run() -> str:
    import pyarrow.flight as flight

    from catalog.live_sql import split_mixed
    from tests.harness import call_options, start_server, wait_until
    from tests.sync_emulator import Source, emulator_in_process

    with emulator_in_process() as emu, tempfile.TemporaryDirectory() as tmp:
        src = Source(emu, "BENCH")
        src.execute(
            "CREATE TABLE ORDERS (ID NUMBER(38,0), CUSTOMER_ID NUMBER(9,0), STATUS VARCHAR, "
            "AMOUNT NUMBER(10,2), NOTE VARCHAR)",
            f"INSERT INTO ORDERS SELECT SEQ4(), MOD(SEQ4(), 1000), CASE MOD(SEQ4(), 3) WHEN 0 THEN 'placed' "
            f"WHEN 1 THEN 'shipped' ELSE 'returned' END, MOD(SEQ4() * 37, 100000) / 100, 'note ' || SEQ4() "
            f"FROM TABLE(GENERATOR(ROWCOUNT => {ROWS}))",
            "CREATE TABLE CUSTOMERS (ID NUMBER(9,0), REGION VARCHAR)",
            "INSERT INTO CUSTOMERS SELECT SEQ4(), CASE MOD(SEQ4(), 2) WHEN 0 THEN 'eu' ELSE 'us' END "
            "FROM TABLE(GENERATOR(ROWCOUNT => 1000))",
        )
        print(f"seeded {ROWS:,} rows in the emulator", flush=True)
        server = start_server(
            Path(tmp),
            demo=False,
            snowflake=emu.snowflake_section(),
            sync={
                "enabled": False,
                "tables": [
                    {"source": src.name("ORDERS"), "target": "rep.orders"},
                    {"source": src.name("CUSTOMERS"), "target": "rep.customers"},
                ],
            },
            live={
                "cache_ttl_seconds": 0,
                "tables": [{"source": src.name("ORDERS"), "target": "live.orders"}],
            },
        )
        try:
            http = server.http()
            for table in ("rep.orders", "rep.customers"):
                http.post(f"/v1/sync/{table}/run")

            def synced() -> bool:
                tables = {t["table"]: t for t in http.get("/v1/sync").json()["tables"]}
                return all(
                    (tables[t]["last_run"] or {}).get("outcome") == "ok"
                    for t in ("rep.orders", "rep.customers")
                )

            wait_until(synced, 600, what="the replicas")
            client = server.flight()
            opts = call_options(server.admin_token)

            def query(sql: str, params: list[Any]) -> int:
                body = json.dumps({"kind": "query", "sql": sql, "params": params})
                info = client.get_flight_info(flight.FlightDescriptor.for_command(body), opts)
                return sum(client.do_get(e.ticket, opts).read_all().num_rows for e in info.endpoints)

            n = iter(range(10**9))
            live_s = _median(lambda: query(AGGREGATE.format(t="live"), [next(n) % 1000]))
            rep_s = _median(lambda: query(AGGREGATE.format(t="rep"), [next(n) % 1000]))
            print(
                f"selective aggregate: live {live_s * 1000:.1f} ms, replica {rep_s * 1000:.1f} ms", flush=True
            )
            mixed_s = _median(lambda: query(MIXED, []))
            print(f"mixed join: {mixed_s * 1000:.1f} ms", flush=True)

            live = server.catalog.tables.live
            assert live is not None
            ref = live.refs()[0]
            desc = live.describe(ref)
            _, pulls = split_mixed(MIXED, {ref.key(): desc}, max_rows=live.config.max_pulled_rows)
            source = desc.source.sql

            def pulled(sql: str) -> tuple[int, int]:
                con = emu.connect()
                try:
                    cur = con.cursor().execute(sql)
                    rows = nbytes = 0
                    for table in cur.fetch_arrow_batches():
                        rows += table.num_rows
                        nbytes += table.nbytes
                    return rows, nbytes
                finally:
                    con.close()

            with_rows, with_bytes = pulled(pulls[0].sql)
            without_rows, without_bytes = pulled(f"SELECT * FROM {source}")
            print(
                f"mixed join's live side: {with_bytes / 1e6:.2f} MB ({with_rows:,} rows) pushed down, "
                f"{without_bytes / 1e6:.2f} MB ({without_rows:,} rows) without",
                flush=True,
            )
        finally:
            server.stop()
    load = os.getloadavg()[0]
    return "\n".join(
        [
            "## Live tables (federation)",
            "",
            f"{time.strftime('%Y-%m-%d')}, load {load:.2f}, {ROWS:,} rows, median of {REPS}; the fakesnow "
            "emulator in-process (see tests/bench/bench_live.py: not a real warehouse).",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| selective aggregate (one customer of 1,000), live | {live_s * 1000:.1f} ms |",
            f"| the same SQL on the replica | {rep_s * 1000:.1f} ms |",
            f"| mixed join (live orders joined with replicated customers, `o.amount > 900`) | {mixed_s * 1000:.1f} ms |",
            f"| its live side pulled with pushdown (3 named columns, the filter) | {with_bytes / 1e6:.2f} MB, {with_rows:,} rows |",
            f"| the same side without pushdown (`SELECT *`) | {without_bytes / 1e6:.2f} MB, {without_rows:,} rows |",
        ]
    )


if __name__ == "__main__":
    print(run())
