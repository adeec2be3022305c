"""`make run-snowflake-demo`: watch Snowflake replication (and a live table) with no Snowflake account.

Starts the fakesnow emulator (a child process), seeds three sample tables, keeps changing
them every few seconds (new events, updated orders), writes ``var/snowflake-demo/quiver.toml``
syncing them on a short interval, and runs ``quiver serve`` with it in this process.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from pathlib import Path

from tests.sync_emulator import EmulatorProcess

DATA_DIR = Path("var/snowflake-demo")

SEED = [
    "CREATE DATABASE IF NOT EXISTS SHOP",
    "CREATE SCHEMA IF NOT EXISTS SHOP.PUBLIC",
    "CREATE OR REPLACE TABLE SHOP.PUBLIC.CUSTOMERS (ID NUMBER(38,0), NAME VARCHAR, COUNTRY VARCHAR, "
    "CREDIT_LIMIT NUMBER(12,2), SIGNED_UP DATE, PROFILE VARIANT)",
    "INSERT INTO SHOP.PUBLIC.CUSTOMERS SELECT SEQ4() + 1, 'Customer ' || (SEQ4() + 1), "
    "CASE MOD(SEQ4(), 4) WHEN 0 THEN 'DE' WHEN 1 THEN 'FR' WHEN 2 THEN 'JP' ELSE 'US' END, "
    "MOD(SEQ4() * 37, 10000) + 0.5, '2024-01-01'::DATE, PARSE_JSON('{\"tier\": \"gold\"}') "
    "FROM TABLE(GENERATOR(ROWCOUNT => 2000))",
    "CREATE OR REPLACE TABLE SHOP.PUBLIC.ORDERS (ID NUMBER(38,0), CUSTOMER_ID NUMBER(38,0), "
    "STATUS VARCHAR, AMOUNT NUMBER(12,2), UPDATED_AT TIMESTAMP_NTZ)",
    "INSERT INTO SHOP.PUBLIC.ORDERS SELECT SEQ4() + 1, MOD(SEQ4(), 2000) + 1, 'placed', "
    "MOD(SEQ4() * 13, 500) + 9.99, '2025-01-01 00:00:00'::TIMESTAMP_NTZ FROM TABLE(GENERATOR(ROWCOUNT => 20000))",
    "CREATE OR REPLACE TABLE SHOP.PUBLIC.EVENTS (EVENT_ID NUMBER(38,0), CUSTOMER_ID NUMBER(38,0), "
    "KIND VARCHAR, OCCURRED_AT TIMESTAMP_TZ)",
    "INSERT INTO SHOP.PUBLIC.EVENTS SELECT SEQ4() + 1, MOD(SEQ4(), 2000) + 1, 'page_view', "
    "'2025-01-01T00:00:00+00:00'::TIMESTAMP_TZ FROM TABLE(GENERATOR(ROWCOUNT => 50000))",
]

CONFIG = """# Written by `make run-snowflake-demo`: a Quiver replica of the fakesnow emulator.
[server]
data_dir = "{data_dir}"
flight_port = {flight_port}
http_port = {http_port}

[snowflake]
account = "fakesnow"
user = "DEMO"
password_file = "{password_file}"
database = "SHOP"
schema = "PUBLIC"
host = "127.0.0.1"
port = {port}
protocol = "http"

[sync]
max_parallel = 2

[[sync.tables]]
source = "CUSTOMERS"
target = "shop.customers"
mode = "full"
interval_seconds = 60

[[sync.tables]]
source = "ORDERS"
target = "shop.orders"
mode = "merge"
cursor = "UPDATED_AT"
primary_key = ["ID"]
interval_seconds = 10
reconcile_seconds = 60
batch_rows = 5000

[[sync.tables]]
source = "EVENTS"
target = "shop.events"
mode = "append"
cursor = "EVENT_ID"
interval_seconds = 5
batch_rows = 20000

# The same events, queried in Snowflake as they are (proto_docs/federation.md): compare
# SELECT count(*) FROM live.events with shop.events between two syncs.
[[live.tables]]
source = "EVENTS"
target = "live.events"
"""


def _activity(emu: EmulatorProcess, stop: threading.Event) -> None:
    """Keep the source moving: new events every few seconds, some orders updated, one deleted."""
    con = emu.connect("SHOP", "PUBLIC")
    cur = con.cursor()
    rng = random.Random(7)
    while not stop.wait(3):
        try:
            cur.execute(
                "INSERT INTO EVENTS SELECT (SELECT MAX(EVENT_ID) FROM EVENTS) + SEQ4() + 1, "
                "MOD(SEQ4(), 2000) + 1, 'click', CURRENT_TIMESTAMP() FROM TABLE(GENERATOR(ROWCOUNT => 250))"
            )
            first = rng.randint(1, 19_000)
            cur.execute(
                "UPDATE ORDERS SET STATUS = 'shipped', UPDATED_AT = CURRENT_TIMESTAMP()::TIMESTAMP_NTZ "
                "WHERE ID BETWEEN ? AND ?",
                [first, first + 40],
            )
            cur.execute("DELETE FROM ORDERS WHERE ID = ?", [rng.randint(1, 20_000)])
        except Exception as e:
            print(f"(demo activity: {e})", file=sys.stderr)


def main() -> int:
    from catalog import load_config
    from quiver import logs
    from quiver.runtime import Runtime

    flight_port = int(os.environ.get("QUIVER_DEMO_FLIGHT_PORT", "8815"))
    http_port = int(os.environ.get("QUIVER_DEMO_HTTP_PORT", "8000"))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    # The emulator starts empty each time: so does the replica (keys and tokens are kept).
    for old in DATA_DIR.glob("quiver.duckdb*"):
        old.unlink()
    emu = EmulatorProcess()
    stop = threading.Event()
    try:
        _seed(emu)
        password_file = DATA_DIR / "snowflake.password"
        password_file.write_text("fakesnow-accepts-any-password\n")
        password_file.chmod(0o600)
        config_path = DATA_DIR / "quiver.toml"
        config_path.write_text(
            CONFIG.format(
                data_dir=DATA_DIR.resolve(),
                flight_port=flight_port,
                http_port=http_port,
                password_file=password_file.resolve(),
                port=emu.port,
            )
        )
        config = load_config(config_path)
        logs.configure(config.server.log_format, config.server.log_level)
        runtime = Runtime(config)
        endpoints = runtime.start()
        threading.Thread(target=_activity, args=(emu, stop), name="demo-activity", daemon=True).start()
        token = f"$(cat {DATA_DIR}/admin.token)"
        print(
            "\n".join(
                [
                    "",
                    f"Snowflake emulator (fakesnow) on 127.0.0.1:{emu.port}: SHOP.PUBLIC.CUSTOMERS, ORDERS, EVENTS",
                    "  (changing every 3 s: new EVENTS, updated and deleted ORDERS)",
                    f"Quiver serving with {config_path}: shop.customers (full, 60 s), shop.orders (merge, 10 s,",
                    "  reconcile 60 s), shop.events (append, 5 s); live.events: the same table queried in the",
                    "  emulator live (proto_docs/federation.md)",
                    "",
                    "Look at:",
                    f'  curl -s -H "authorization: Bearer {token}" {endpoints.http_url}/v1/sync | python -m json.tool',
                    f"  .venv/bin/quiver sync status --config {config_path}",
                    f"  .venv/bin/quiver sync run --config {config_path} --table shop.orders",
                    f'  curl -s -H "authorization: Bearer {token}" {endpoints.http_url}/v1/tables | python -m json.tool',
                    f"  Arrow Flight at {endpoints.flight_url} (admin token reads shop.*)",
                    "",
                    "Stop with Ctrl-C.",
                    "",
                ]
            ),
            flush=True,
        )
        runtime.serve_forever()
    finally:
        stop.set()
        emu.kill()
    return 0


def _seed(emu: EmulatorProcess) -> None:
    emu.execute(*SEED[:2])
    emu.execute(*SEED[2:], database="SHOP")


if __name__ == "__main__":
    raise SystemExit(main())
