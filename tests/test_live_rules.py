"""Row and column rules on live tables (proto_docs/federation.md "Rules on live tables",
proto_docs/governance.md "How rules are applied"). Against the fakesnow emulator over HTTP with
the real connector, as tests/test_live_tables.py. One Snowflake table, ``PEOPLE``, is both
replicated (``rep.people``) and live (``live.people``); swarm ``rgn`` reads ``live.*`` and
``rep.orders`` through a rule on ``live.people`` that keeps ``region = $region`` rows, excludes
``ssn`` and hashes ``email``. Every answer is compared with DuckDB's own answer on the same
view written over the replica, and no answer may hold a filtered-out row, an ``ssn`` value or
a clear e-mail address. What Snowflake received is read from the recording proxy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog.rules import TableRule
from tests.harness import Server, call_options, error_info, start_server, wait_until
from tests.sync_emulator import RECORDER, Emulator, Source

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

SWARM = "rgn"
PEOPLE = 60
RULE = TableRule(
    table="live.people",
    except_columns=("ssn",),
    row_filter="region = $region",
    parameters=("region",),
    mask=(("email", "hash"),),
)


def visible(i: int) -> bool:
    return i % 3 == 0  # region 'north'


@pytest.fixture(scope="module")
def src(emu: Emulator) -> Source:
    s = Source(emu, "LIVERULES")
    s.execute(
        "CREATE TABLE PEOPLE (ID NUMBER(9,0), REGION VARCHAR, NAME VARCHAR, EMAIL VARCHAR, "
        "SSN VARCHAR, PAY NUMBER(9,0))",
        "CREATE TABLE ORDERS (ID NUMBER(9,0), PERSON_ID NUMBER(9,0), AMOUNT NUMBER(9,0))",
    )
    s.execute(
        "INSERT INTO PEOPLE SELECT SEQ4(), "
        "CASE MOD(SEQ4(), 3) WHEN 0 THEN 'north' WHEN 1 THEN 'south' ELSE 'east' END, "
        "'person-' || SEQ4() || '-x', 'p' || SEQ4() || '@example.com', 'SSN-' || (1000 + SEQ4()), "
        f"1000 + SEQ4() * 10 FROM TABLE(GENERATOR(ROWCOUNT => {PEOPLE}))",
        "INSERT INTO ORDERS SELECT SEQ4(), MOD(SEQ4(), 60), MOD(SEQ4() * 37, 500) "
        "FROM TABLE(GENERATOR(ROWCOUNT => 300))",
    )
    return s


@pytest.fixture(scope="module")
def server(emu: Emulator, src: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("liverules"),
        demo=False,
        snowflake=emu.snowflake_section(),
        sync={
            "enabled": False,
            "retry_seconds": 0,
            "tables": [
                {"source": src.name("PEOPLE"), "target": "rep.people", "interval_seconds": 3600},
                {"source": src.name("ORDERS"), "target": "rep.orders", "interval_seconds": 3600},
            ],
        },
        live={
            "tables": [
                {"source": src.name("PEOPLE"), "target": "live.people"},
                {"source": src.name("ORDERS"), "target": "live.orders"},
            ]
        },
    )
    http = s.http()
    for table in ("rep.people", "rep.orders"):
        assert http.post(f"/v1/sync/{table}/run").status_code == 202

    def synced() -> bool:
        tables = {t["table"]: t for t in http.get("/v1/sync").json()["tables"]}
        return all((tables[t]["last_run"] or {}).get("outcome") == "ok" for t in ("rep.people", "rep.orders"))

    wait_until(synced, 60, what="the replicas to sync")
    r = http.post("/v1/swarms", json={"name": SWARM, "tables": ["live.*", "rep.orders"]})
    assert r.status_code == 201, r.text
    s.catalog.policy.set_rules(SWARM, [RULE])
    s.catalog.policy.set_attributes(SWARM, {"region": "north"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def agent(server: Server) -> str:
    return server.mint(swarm=SWARM, agent="a1")


@pytest.fixture(scope="module")
def admin(server: Server) -> str:
    return server.mint(kind="admin", swarm=None)


def _query(server: Server, token: str, sql: str, params: list[Any] | None = None) -> pa.Table:
    client = server.flight()
    opts = call_options(token)
    body: dict[str, Any] = {"kind": "query", "sql": sql}
    if params is not None:
        body["params"] = params
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(body)), opts)
    tables = [client.do_get(e.ticket, opts).read_all() for e in info.endpoints]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _error(server: Server, token: str, sql: str, params: list[Any] | None = None) -> dict[str, Any]:
    with pytest.raises(flight.FlightError) as raised:
        _query(server, token, sql, params)
    return error_info(raised.value)


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal | float) else value


def _rows(table: pa.Table) -> list[str]:
    """A result as a sorted list of row texts (duplicates kept, order ignored, numbers plain)."""
    return sorted(repr([_plain(v) for v in row.values()]) for row in table.to_pylist())


def forbidden() -> set[str]:
    """What must never be in an answer: filtered-out rows' names, clear e-mail addresses and
    every value of the excluded column."""
    names = {f"person-{i}-x" for i in range(PEOPLE) if not visible(i)}
    return names | {f"p{i}@example.com" for i in range(PEOPLE)} | {f"SSN-{1000 + i}" for i in range(PEOPLE)}


def assert_no_leak(table: pa.Table) -> None:
    assert "ssn" not in [n.lower() for n in table.column_names]
    bad = forbidden()
    cells = [str(v) for row in table.to_pylist() for v in row.values() if v is not None]
    leaked = [c for c in cells if any(b == c or b in c for b in bad)]
    assert not leaked, leaked[:5]


@pytest.fixture(scope="module")
def oracle(server: Server) -> Any:
    """DuckDB's own answer: the replica's rows in an in-memory DuckDB, ``live.people`` the view
    the rule defines written by hand over them, ``live.orders`` and ``rep.orders`` copies."""
    import duckdb

    with server.catalog.db.reading() as cur:
        people = cur.sql("SELECT * FROM rep.people").to_arrow_table()
        orders = cur.sql("SELECT * FROM rep.orders").to_arrow_table()
    con = duckdb.connect(":memory:")
    con.register("people_base", people)
    con.register("orders_base", orders)
    con.execute("CREATE SCHEMA live; CREATE SCHEMA rep")
    con.execute(
        "CREATE VIEW live.people AS SELECT * EXCLUDE (ssn) REPLACE (sha256(CAST(email AS VARCHAR)) AS email) "
        "FROM people_base WHERE region = 'north'"
    )
    con.execute("CREATE VIEW live.orders AS SELECT * FROM orders_base")
    con.execute("CREATE VIEW rep.orders AS SELECT * FROM orders_base")
    return con


P = "live.people"
LIVE_ONLY: list[tuple[str, list[Any] | None]] = [
    (f"SELECT * FROM {P}", None),
    (f"SELECT id, name, email FROM {P} WHERE pay > 1100 ORDER BY id", None),
    (f"SELECT * FROM {P} WHERE email = 'p3@example.com'", None),
    (f"SELECT count(*) AS n FROM {P} WHERE email LIKE '%@example.com'", None),
    (f"SELECT count(*) AS n FROM {P} WHERE region <> 'north'", None),
    (f"SELECT region, count(*) AS n, sum(pay) AS total, min(name) AS first FROM {P} GROUP BY region", None),
    (f"SELECT id, pay FROM {P} ORDER BY pay DESC, id LIMIT 4", None),
    (f"SELECT id, name FROM {P} WHERE pay >= ? AND name <> ? ORDER BY id", [1200, "person-21-x"]),
    (f"SELECT p.name, count(*) AS n, sum(o.amount) AS total FROM {P} p JOIN live.orders o ON o.person_id = p.id "
     "GROUP BY p.name", None),
    (f"SELECT o.id, p.name FROM live.orders o LEFT JOIN {P} p ON p.id = o.person_id WHERE o.id < 20", None),
    (f"WITH x AS (SELECT * FROM {P}) SELECT count(*) AS n, max(email) AS m FROM x", None),
    (f"SELECT DISTINCT region FROM {P}", None),
    (f"SELECT * FROM live.orders o WHERE o.person_id IN (SELECT id FROM {P}) AND o.id < 40", None),
    (f"SELECT (SELECT count(*) FROM {P}) AS n, (SELECT max(name) FROM {P}) AS m", None),
]  # fmt: skip
MIXED: list[tuple[str, list[Any] | None]] = [
    (f"SELECT p.id, p.email, o.amount FROM {P} p JOIN rep.orders o ON o.person_id = p.id WHERE p.pay > 1100", None),
    (f"SELECT p.region, count(*) AS n FROM {P} p JOIN rep.orders o ON o.person_id = p.id GROUP BY p.region", None),
    (f"SELECT p.name FROM {P} p JOIN rep.orders o ON o.person_id = p.id WHERE p.region = 'south'", None),
    (f"SELECT o.id, p.name, p.email FROM rep.orders o LEFT JOIN {P} p ON p.id = o.person_id WHERE o.id < 30", None),
    (f"SELECT count(*) AS n FROM rep.orders o WHERE o.person_id IN (SELECT id FROM {P})", None),
    (f"SELECT p.id FROM {P} p JOIN rep.orders o ON o.person_id = p.id WHERE p.email = 'p3@example.com'", None),
    (f"SELECT p.*, o.amount FROM {P} p JOIN rep.orders o ON o.person_id = p.id WHERE o.amount > ?", [300]),
]  # fmt: skip


def _people_sent(mark: int) -> list[str]:
    return [q for q in RECORDER.since(mark) if '"PEOPLE"' in q and "information_schema" not in q]


def _assert_view_pushed_down(sent: list[str]) -> None:
    """Every read of PEOPLE Snowflake received is the view: its row filter, the excluded
    column left out and the e-mail hashed there, so neither reaches Quiver."""
    assert sent
    for q in sent:
        assert "WHERE (\"REGION\" = 'north')" in q, q
        assert 'EXCLUDE ("SSN")' in q, q
        assert 'SHA2(CAST("EMAIL" AS VARCHAR), 256)' in q, q
        assert q.count('"SSN"') == q.count('EXCLUDE ("SSN")'), q  # only in the EXCLUDE


@pytest.mark.parametrize(("sql", "params"), LIVE_ONLY + MIXED)
def test_a_ruled_live_table_answers_what_duckdb_answers_on_the_view(
    server: Server, agent: str, oracle: Any, sql: str, params: list[Any] | None
) -> None:
    mark = RECORDER.mark()
    got = _query(server, agent, sql, params)
    assert_no_leak(got)
    expected = oracle.execute(sql, params or []).to_arrow_table()
    assert _rows(got) == _rows(expected)
    assert got.schema.names == expected.schema.names
    _assert_view_pushed_down(_people_sent(mark))
