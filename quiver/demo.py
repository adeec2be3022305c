"""Demo data: a `demo` schema of realistic tables, generated in SQL inside DuckDB, a swarm
`demo` allowed `demo.*`, and an agent token in ``DATA_DIR/demo-agent.token``.

Seeding runs once (recorded in ``_quiver.settings``); the generators are deterministic
(hashes of the row number, not random()), so every install has the same demo data.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import structlog

from catalog import Catalog, Conflict, TableRef
from catalog.database import SYSTEM_SCHEMA, fetch_one
from catalog.keys import write_private
from catalog.tables import TableCatalog

log = structlog.get_logger(__name__)

DEMO_TABLES = ("customers", "orders", "events")

# h(i, k) is a deterministic pseudo-random integer in [0, 2^63) per row and purpose.
SEED_SQL = """
CREATE SCHEMA IF NOT EXISTS demo;

CREATE OR REPLACE TABLE demo.customers AS
SELECT
    i AS customer_id,
    (['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Margaret', 'Ken', 'Frances', 'John'])
        [1 + (hash(i, 'first') % 10)::INT]
      || ' ' ||
    (['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth', 'Hamilton', 'Thompson', 'Allen', 'Backus'])
        [1 + (hash(i, 'last') % 10)::INT] AS name,
    CASE WHEN hash(i, 'email') % 20 = 0 THEN NULL ELSE 'customer' || i || '@example.com' END AS email,
    (['DE', 'FR', 'GB', 'US', 'JP', 'BR', 'IN', 'NL', 'SE', 'ES'])[1 + (hash(i, 'country') % 10)::INT] AS country,
    (['consumer', 'smb', 'enterprise'])[1 + (hash(i, 'segment') % 3)::INT] AS segment,
    TIMESTAMP '2019-01-01' + to_seconds((hash(i, 'signup') % (5 * 365 * 86400))::BIGINT) AS signup_at,
    hash(i, 'active') % 10 < 8 AS is_active,
    CASE WHEN hash(i, 'credit') % 7 = 0 THEN NULL
         ELSE ((hash(i, 'credit') % 5000000) / 100)::DECIMAL(12, 2) END AS credit_limit,
    list_slice(['vip', 'newsletter', 'beta', 'churn-risk', 'partner'],
               1 + (hash(i, 'tag0') % 5)::INT, 1 + (hash(i, 'tag0') % 5)::INT + (hash(i, 'tags') % 3)::INT)
        AS tags,
    {'street': (hash(i, 'street') % 999 + 1)::VARCHAR || ' Main St',
     'city': (['Berlin', 'Paris', 'London', 'New York', 'Tokyo', 'Sao Paulo', 'Mumbai', 'Amsterdam',
               'Stockholm', 'Madrid'])[1 + (hash(i, 'country') % 10)::INT],
     'zip': lpad((hash(i, 'zip') % 100000)::VARCHAR, 5, '0')} AS address
FROM range(1, {customers} + 1) t(i);

CREATE OR REPLACE TABLE demo.orders AS
SELECT
    i AS order_id,
    1 + (hash(i, 'cust') % {customers})::BIGINT AS customer_id,
    TIMESTAMP '2021-01-01' + to_seconds((hash(i, 'ordered') % (3 * 365 * 86400))::BIGINT) AS ordered_at,
    (['placed', 'paid', 'shipped', 'delivered', 'returned', 'cancelled'])[1 + (hash(i, 'status') % 6)::INT]
        AS status,
    ((hash(i, 'amount') % 100000) / 100 + 1)::DECIMAL(12, 2) AS amount,
    (1 + hash(i, 'qty') % 12)::INTEGER AS quantity,
    CASE WHEN hash(i, 'disc') % 4 = 0 THEN round((hash(i, 'disc') % 30) / 100.0, 2) END AS discount,
    CASE WHEN hash(i, 'ship') % 3 = 0 THEN NULL
         ELSE TIMESTAMP '2021-01-01' + to_seconds((hash(i, 'ordered') % (3 * 365 * 86400)
                + 3600 + hash(i, 'ship') % (10 * 86400))::BIGINT) END AS shipped_at
FROM range(1, {orders} + 1) t(i);

CREATE OR REPLACE TABLE demo.events AS
SELECT
    i AS event_id,
    1 + (hash(i, 'cust') % {customers})::BIGINT AS customer_id,
    TIMESTAMPTZ '2024-01-01 00:00:00+00' + to_seconds((hash(i, 'at') % (365 * 86400))::BIGINT) AS occurred_at,
    (['page_view', 'click', 'search', 'add_to_cart', 'checkout', 'login'])[1 + (hash(i, 'type') % 6)::INT]
        AS event_type,
    (['/', '/search', '/product', '/cart', '/checkout', '/account'])[1 + (hash(i, 'page') % 6)::INT] AS page,
    CASE WHEN hash(i, 'dur') % 10 = 0 THEN NULL ELSE (hash(i, 'dur') % 30000)::INTEGER END AS duration_ms,
    {'device': (['desktop', 'mobile', 'tablet'])[1 + (hash(i, 'device') % 3)::INT],
     'browser': (['firefox', 'chrome', 'safari', 'edge'])[1 + (hash(i, 'browser') % 4)::INT]} AS properties
FROM range(1, {events} + 1) t(i);
"""


def seed_sql(n: dict[str, int]) -> str:
    sql = SEED_SQL
    for name, rows in n.items():
        sql = sql.replace("{" + name + "}", str(int(rows)))
    return sql


def sizes(scale: float) -> dict[str, int]:
    return {
        "customers": max(10, int(100_000 * scale)),
        "orders": max(10, int(2_000_000 * scale)),
        "events": max(10, int(5_000_000 * scale)),
    }


def seed(catalog: Catalog) -> bool:
    """Create the demo schema, swarm and token once; return True when it seeded now."""
    with catalog.db.reading() as cur:
        done = fetch_one(cur, f"SELECT value FROM {SYSTEM_SCHEMA}.settings WHERE key = 'demo_seeded'")
    if done is None:
        n = sizes(catalog.config.demo.scale)
        log.info("demo.seeding", **n)
        with catalog.db.transaction() as cur:
            cur.execute(seed_sql(n))
            for name in DEMO_TABLES:
                TableCatalog.bump_version(cur, TableRef("demo", name))
            cur.execute(f"INSERT INTO {SYSTEM_SCHEMA}.settings VALUES ('demo_seeded', ?)", [str(n)])
        log.info("demo.seeded", **n)
    with contextlib.suppress(Conflict):
        catalog.swarms.create("demo", "Demo swarm: reads every demo table", ["demo.*"])
    write_demo_token(catalog)
    return done is None


def write_demo_token(catalog: Catalog) -> Path:
    path = catalog.data_dir / "demo-agent.token"
    if path.exists():
        try:
            if catalog.tokens.verify(path.read_text().strip()).swarm == "demo":
                return path
        except Exception as e:  # noqa: BLE001 - an unusable token is replaced
            log.info("demo.token_replacing", reason=str(e))
    issued = catalog.tokens.mint(
        None,
        "agent",
        swarm="demo",
        agent="demo-agent",
        ttl_seconds=catalog.config.tokens.max_ttl_seconds,
    )
    write_private(path, (issued.token + "\n").encode())
    log.info("demo.token_written", path=str(path), jti=issued.jti)
    return path


SNIPPET = """\
import os

import pyarrow as pa
import pyarrow.flight as flight

url = os.environ.get("QUIVER_URL", "grpc://localhost:8815")
token = open(os.environ.get("QUIVER_TOKEN_FILE", "var/demo-agent.token")).read().strip()
options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
client = flight.FlightClient(url)

for info in client.list_flights(options=options):
    print(".".join(p.decode() for p in info.descriptor.path), info.total_records, "rows")

info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "customers"), options)
table = pa.concat_tables(client.do_get(e.ticket, options).read_all() for e in info.endpoints)
print(table.num_rows, "rows:", table.slice(0, 3).to_pylist())
"""
