"""Live tables (proto_docs/federation.md): Snowflake tables queried where they are, through the
same guard. Against the fakesnow emulator over HTTP with the real connector; one Snowflake
table is both replicated by the sync worker (``rep.*``) and declared live (``live.*``), so
every live answer is compared with the same SQL on the replica. Pushdown is checked from the
SQL text the emulator received (tests/sync_emulator.py's recording proxy), never assumed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog.rules import TableRule
from tests.harness import (
    Server,
    call_options,
    error_info,
    flight_query,
    flight_query_error,
    start_server,
    wait_until,
)
from tests.sync_emulator import RECORDER, Emulator, Source, free_port

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ORDERS_ROWS = 500


@pytest.fixture(scope="module")
def src(emu: Emulator) -> Source:
    return orders_source(emu)


def orders_source(emu: Emulator) -> Source:
    """A database of its own with ORDERS and CUSTOMERS (shared with other live-table tests)."""
    s = Source(emu, "LIVE")
    s.execute(
        "CREATE TABLE ORDERS (ID NUMBER(38,0), CUSTOMER_ID NUMBER(9,0), STATUS VARCHAR, "
        "AMOUNT NUMBER(10,2), PLACED DATE)",
        "CREATE TABLE CUSTOMERS (ID NUMBER(9,0), NAME VARCHAR, REGION VARCHAR)",
    )
    s.execute(
        "INSERT INTO ORDERS SELECT SEQ4(), MOD(SEQ4(), 50), "
        "CASE MOD(SEQ4(), 3) WHEN 0 THEN 'placed' WHEN 1 THEN 'shipped' ELSE 'returned' END, "
        "(MOD(SEQ4() * 37, 1000) + 1) / 4, DATEADD(day, MOD(SEQ4(), 90), '2024-01-01'::DATE) "
        f"FROM TABLE(GENERATOR(ROWCOUNT => {ORDERS_ROWS}))",
        "INSERT INTO CUSTOMERS SELECT SEQ4(), 'c' || SEQ4(), CASE MOD(SEQ4(), 2) WHEN 0 THEN 'eu' ELSE 'us' END "
        "FROM TABLE(GENERATOR(ROWCOUNT => 50))",
    )
    return s


def _sections(emu: Emulator, src: Source, **live: Any) -> dict[str, Any]:
    return {
        "snowflake": emu.snowflake_section(),
        "sync": {
            "enabled": False,
            "retry_seconds": 0,
            "tables": [
                {"source": src.name("ORDERS"), "target": "rep.orders", "interval_seconds": 3600},
                {"source": src.name("CUSTOMERS"), "target": "rep.customers", "interval_seconds": 3600},
            ],
        },
        "live": {
            "tables": [
                {"source": src.name("ORDERS"), "target": "live.orders"},
                {"source": src.name("CUSTOMERS"), "target": "live.customers"},
            ],
            **live,
        },
    }


def _sync_replicas(s: Server) -> None:
    http = s.http()
    for table in ("rep.orders", "rep.customers"):
        assert http.post(f"/v1/sync/{table}/run").status_code == 202

    def synced() -> bool:
        tables = {t["table"]: t for t in http.get("/v1/sync").json()["tables"]}
        return all(
            (tables[t]["last_run"] or {}).get("outcome") == "ok" for t in ("rep.orders", "rep.customers")
        )

    wait_until(synced, 60, what="the replicas to sync")


def _pushed(mark: int, table: str = "ORDERS") -> list[str]:
    """Queries of ``table`` the emulator received since ``mark`` (its metadata reads aside)."""
    return [q for q in RECORDER.since(mark) if table in q and "information_schema" not in q]


@pytest.fixture(scope="module")
def server(emu: Emulator, src: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("live"), demo=False, **_sections(emu, src))
    _sync_replicas(s)
    http = s.http()
    for name, tables in (("analysts", ["live.*", "rep.*"]), ("narrow", ["live.customers"])):
        r = http.post("/v1/swarms", json={"name": name, "tables": tables})
        assert r.status_code == 201, r.text
    yield s
    s.stop()


@pytest.fixture(scope="module")
def analyst(server: Server) -> str:
    return server.mint(swarm="analysts", agent="a1")


def _rows(table: pa.Table) -> list[tuple[Any, ...]]:
    return [tuple(_plain(v) for v in row.values()) for row in table.to_pylist()]


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal | float) else value


# --- the catalog --------------------------------------------------------------------------------
def test_live_tables_are_listed_with_the_replicas_schema_and_snowflakes_row_count(
    server: Server, analyst: str
) -> None:
    client = server.flight()
    infos = {tuple(i.descriptor.path): i for i in client.list_flights(options=call_options(analyst))}
    live, rep = infos[(b"live", b"orders")], infos[(b"rep", b"orders")]
    assert live.schema == rep.schema
    assert live.schema.names == ["id", "customer_id", "status", "amount", "placed"]
    assert live.total_records == ORDERS_ROWS
    schema = client.get_schema(
        flight.FlightDescriptor.for_path("live", "orders"), call_options(analyst)
    ).schema
    assert schema == rep.schema
    tables = {t["table"]: t for t in server.http().get("/v1/tables").json()["tables"]}
    assert tables["live.orders"]["live"] is True
    assert tables["rep.orders"]["live"] is False
    assert tables["live.orders"]["swarms"] == ["analysts"]


def test_the_allowlist_holds_for_live_tables_and_nothing_reaches_snowflake(server: Server) -> None:
    narrow = server.mint(swarm="narrow", agent="n1")
    names = [tuple(i.descriptor.path) for i in server.flight().list_flights(options=call_options(narrow))]
    assert names == [(b"live", b"customers")]
    mark = RECORDER.mark()
    for sql in (
        "SELECT * FROM live.orders",
        "SELECT c.name FROM live.customers c JOIN live.orders o ON o.customer_id = c.id",
        "WITH x AS (SELECT * FROM live.orders) SELECT count(*) FROM x",
    ):
        err = flight_query_error(server, narrow, sql)
        assert err["code"] == "PERMISSION_DENIED", err
        assert "live.orders" in err["detail"]
    with pytest.raises(pa.ArrowException) as raised:  # GetSchema's errors: flight_server/errors.py
        server.flight().get_schema(flight.FlightDescriptor.for_path("live", "orders"), call_options(narrow))
    assert "PERMISSION_DENIED" in str(raised.value)
    assert not [q for q in RECORDER.since(mark) if "ORDERS" in q]
    # The table it may read answers.
    assert flight_query(server, narrow, "SELECT count(*) AS n FROM live.customers").to_pylist() == [{"n": 50}]


# --- live queries give the replica's answer -------------------------------------------------------
SAME_ANSWER: list[tuple[str, list[Any] | None]] = [
    ("SELECT id, status, amount FROM {t}orders WHERE status = 'shipped' AND amount > 100 ORDER BY id", None),
    ("SELECT status, count(*) AS n, sum(amount) AS total, min(placed) AS first FROM {t}orders GROUP BY status ORDER BY status", None),
    ("SELECT id, amount FROM {t}orders ORDER BY amount DESC, id LIMIT 7", None),
    ("SELECT id FROM {t}orders WHERE customer_id = ? AND amount >= ? ORDER BY id", [7, 50]),
    ("SELECT c.region, count(*) AS n, sum(o.amount) AS total FROM {t}orders o JOIN {t}customers c ON c.id = o.customer_id "
     "WHERE o.placed >= DATE '2024-02-01' GROUP BY c.region ORDER BY c.region", None),
    ("WITH big AS (SELECT customer_id, amount FROM {t}orders WHERE amount > 200) "
     "SELECT customer_id, count(*) AS n FROM big GROUP BY customer_id ORDER BY n DESC, customer_id LIMIT 5", None),
    ("SELECT DISTINCT status FROM {t}orders WHERE id IN (1, 2, 3) ORDER BY 1", None),
    ("SELECT upper(status) AS s, coalesce(NULL, id) AS i FROM {t}orders WHERE id < ? ORDER BY i", [4]),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "params"), SAME_ANSWER)
def test_a_live_query_returns_the_rows_of_the_same_sql_on_the_replica(
    server: Server, analyst: str, sql: str, params: list[Any] | None
) -> None:
    mark = RECORDER.mark()
    live = flight_query(server, analyst, sql.format(t="live."), params)
    pushed = _pushed(mark, f'"{server_db(server)}"')
    replica = flight_query(server, analyst, sql.format(t="rep."), params)
    assert _rows(live) == _rows(replica)
    assert live.schema.names == replica.schema.names
    assert len(pushed) == 1, RECORDER.since(mark)


def server_db(server: Server) -> str:
    live = server.catalog.tables.live
    assert live is not None
    return live.describe(next(r for r in live.refs() if r.name == "orders")).source.database


def test_filters_aggregates_order_and_the_row_cap_are_pushed_down(server: Server, analyst: str) -> None:
    mark = RECORDER.mark()
    table = flight_query(
        server,
        analyst,
        "SELECT status, count(*) AS n FROM live.orders WHERE amount > ? GROUP BY status ORDER BY n DESC",
        [10],
        max_rows=2,
    )
    assert table.num_rows == 2
    (sent,) = _pushed(mark)
    assert f'FROM "{server_db(server)}"."PUBLIC"."ORDERS"' in sent
    assert 'WHERE "AMOUNT" > ?' in sent  # the filter, with its parameter still a placeholder
    assert "GROUP BY" in sent and "COUNT(*)" in sent and "ORDER BY" in sent
    assert sent.rstrip().endswith("LIMIT 3")  # the cap + 1: a cut is known exactly
    assert "10" not in sent.split("WHERE", 1)[1].split("GROUP")[0]


def test_a_cut_live_result_says_so(server: Server, analyst: str) -> None:
    client = server.flight()
    opts = call_options(analyst)
    body = {"kind": "query", "sql": "SELECT id FROM live.orders ORDER BY id", "max_rows": 10}
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(body)), opts)
    reader = client.do_get(info.endpoints[0].ticket, opts)
    rows, last_meta = 0, None
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        rows += chunk.data.num_rows if chunk.data is not None else 0
        if chunk.app_metadata is not None:
            last_meta = json.loads(chunk.app_metadata.to_pybytes())
    assert rows == 10
    assert last_meta is not None and last_meta.get("truncated") is True


# --- scans and samples ----------------------------------------------------------------------------
def test_a_path_scan_of_a_live_table_reads_its_source(server: Server, analyst: str) -> None:
    client = server.flight()
    opts = call_options(analyst)
    mark = RECORDER.mark()
    info = client.get_flight_info(flight.FlightDescriptor.for_path("live", "customers"), opts)
    live = client.do_get(info.endpoints[0].ticket, opts).read_all()
    info = client.get_flight_info(flight.FlightDescriptor.for_path("rep", "customers"), opts)
    rep = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert live.sort_by("id").equals(rep.sort_by("id"))
    assert any("CUSTOMERS" in q for q in RECORDER.since(mark))


def test_samples_of_a_live_table_are_pushed_down_as_snowflake_sample(server: Server, analyst: str) -> None:
    client = server.flight()
    opts = call_options(analyst)
    mark = RECORDER.mark()
    body = {
        "kind": "sample",
        "table": "live.orders",
        "rows": 5,
        "method": "random",
        "columns": ["id", "status"],
    }
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(body)), opts)
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert table.num_rows == 5
    assert table.schema.names == ["id", "status"]
    assert any("SAMPLE (5 ROWS)" in q for q in RECORDER.since(mark)), RECORDER.since(mark)


# --- refusals ------------------------------------------------------------------------------------
UNTRANSLATABLE = [
    # sqlglot writes RANDOM(), a 64-bit integer in Snowflake: found by this suite, not by reading.
    ("SELECT id, random() AS r FROM live.orders", "random()"),
    ("SELECT regexp_matches(status, 'ship') FROM live.orders", "regexp_matches()"),
    # $1, $2 … in order, each once, mean what ? does (DuckDB writes a rewritten query's ? so)
    # and go down as ?; a number used twice or out of order cannot bind positionally.
    ("SELECT id FROM live.orders WHERE id = $1 OR customer_id = $1", "? placeholders"),
    # Only live sources reach Snowflake: a table function is not sent to resolve there.
    ("SELECT o.id, r.range FROM live.orders o, range(3) r", "which is not a live table"),
]


def test_a_query_snowflake_refuses_for_its_values_is_invalid_argument(server: Server, analyst: str) -> None:
    # Bound by DuckDB (a parameter may be any type), refused by Snowflake when it casts it.
    err = flight_query_error(server, analyst, "SELECT id FROM live.orders WHERE id = ?", ["not a number"])
    assert err["code"] == "INVALID_ARGUMENT", err
    assert err["detail"].startswith("Snowflake refused the query")
    assert flight_query(server, analyst, "SELECT id FROM live.orders WHERE id = ?", [3]).to_pylist() == [
        {"id": 3}
    ]


@pytest.mark.parametrize(("sql", "named"), UNTRANSLATABLE)
def test_what_cannot_be_pushed_down_faithfully_is_refused_naming_it(
    server: Server, analyst: str, sql: str, named: str
) -> None:
    mark = RECORDER.mark()
    err = flight_query_error(server, analyst, sql, [1] if "$1" in sql else None)
    assert err["code"] == "INVALID_ARGUMENT", err
    assert named in err["detail"]
    assert not [q for q in RECORDER.since(mark) if "ORDERS" in q]  # nothing ran in Snowflake


def test_async_queries_of_live_tables_are_refused_with_a_sentence(server: Server, analyst: str) -> None:
    client = server.flight()
    opts = call_options(analyst)
    assert server.runtime.flight is not None
    before = server.runtime.flight.queries.stats()
    mark = RECORDER.mark()
    action = flight.Action("submit-query", json.dumps({"sql": "SELECT * FROM live.orders"}).encode())
    with pytest.raises(flight.FlightError) as raised:
        list(client.do_action(action, opts))
    assert error_info(raised.value)["code"] == "INVALID_ARGUMENT"
    assert "not built yet" in error_info(raised.value)["detail"]
    # Nothing queued nor kept, nothing sent to Snowflake, and the caller still queries.
    assert server.runtime.flight.queries.stats() == before
    assert not [q for q in RECORDER.since(mark) if "ORDERS" in q]
    assert flight_query(server, analyst, "SELECT id FROM live.orders WHERE id = ?", [2]).to_pylist() == [
        {"id": 2}
    ]


# --- faults ---------------------------------------------------------------------------------------
def test_the_timeout_cancels_the_snowflake_query(emu: Emulator, src: Source, tmp_path: Path) -> None:
    s = start_server(tmp_path / "slow", demo=False, **_sections(emu, src, query_timeout_seconds=1))
    try:
        token = s.mint(kind="admin", swarm=None)
        s.catalog.tables.live.describe(next(r for r in s.catalog.tables.live.refs() if r.name == "orders"))  # type: ignore[union-attr]
        aborts = len(RECORDER.aborts)
        with RECORDER.holding("slow_marker", seconds=60):
            err = flight_query_error(s, token, "SELECT id AS slow_marker FROM live.orders")
        assert err["code"] == "DEADLINE_EXCEEDED", err
        assert "cancelled in Snowflake" in err["detail"]
        # The abort the connector sent names the held query.
        assert any("SLOW_MARKER" in a.upper() for a in RECORDER.aborts[aborts:]), RECORDER.aborts[aborts:]
        # Nothing was kept from the failed run: the same query runs in Snowflake again, and answers.
        mark = RECORDER.mark()
        assert flight_query(s, token, "SELECT id AS slow_marker FROM live.orders").num_rows == ORDERS_ROWS
        assert len(_pushed(mark)) == 1
    finally:
        s.stop()


def test_snowflake_unreachable_is_unavailable_with_a_sentence(
    emu: Emulator, src: Source, tmp_path: Path
) -> None:
    sections = _sections(emu, src)
    sections["snowflake"] = {
        **emu.snowflake_section(),
        "port": free_port(),
        "login_timeout": 2,
        "network_timeout": 2,
        "socket_timeout": 2,
    }
    sections["sync"] = {"enabled": False}
    s = start_server(tmp_path / "down", demo=False, **sections)
    try:
        token = s.mint(kind="admin", swarm=None)
        err = flight_query_error(s, token, "SELECT count(*) FROM live.orders")
        assert err["code"] == "UNAVAILABLE", err
        assert "Snowflake" in err["detail"]
        assert "emulator-password" not in err["detail"]
        # The listing still answers (the live table is left out while it cannot be read), and
        # does not wait for Snowflake's login timeout again on every call.
        live = s.catalog.tables.live
        assert live is not None
        reads = live.metadata_reads
        for _ in range(3):
            names = [tuple(i.descriptor.path) for i in s.flight().list_flights(options=call_options(token))]
            assert (b"live", b"orders") not in names
        assert live.metadata_reads <= reads + 1  # customers' first read; orders' failure is remembered
        with pytest.raises(pa.ArrowException) as raised:
            s.flight().get_schema(flight.FlightDescriptor.for_path("live", "orders"), call_options(token))
        assert "UNAVAILABLE" in str(raised.value)
        assert (
            s.catalog.tables.live is not None
            and s.catalog.tables.live.cached(next(iter(s.catalog.tables.live.refs()))) is None
        )
        # An agent whose entry rules the live table lists too: the table it cannot describe is
        # left out (it once fell through to DuckDB, where no such table exists: INTERNAL).
        assert s.http().post("/v1/swarms", json={"name": "down", "tables": ["live.*"]}).status_code == 201
        s.catalog.policy.set_rules("down", [TableRule(table="live.orders", row_filter="id > 0")])
        agent = s.mint(kind="agent", swarm="down", agent="a1")
        names = [tuple(i.descriptor.path) for i in s.flight().list_flights(options=call_options(agent))]
        assert (b"live", b"orders") not in names
    finally:
        s.stop()


def test_concurrent_live_queries_all_answer(server: Server, analyst: str) -> None:
    expected = _rows(
        flight_query(
            server, analyst, "SELECT status, count(*) AS n FROM rep.orders GROUP BY status ORDER BY status"
        )
    )
    results: list[Any] = []
    errors: list[BaseException] = []

    tokens = [server.mint(swarm="analysts", agent=f"racer{i}") for i in range(6)]

    def one(token: str) -> None:
        try:
            results.append(
                _rows(
                    flight_query(
                        server,
                        token,
                        "SELECT status, count(*) AS n FROM live.orders GROUP BY status ORDER BY status",
                    )
                )
            )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == [expected] * 6


def test_post_v1_query_reads_a_live_table_like_a_replica(server: Server, analyst: str) -> None:
    sql = "SELECT status, count(*) AS n FROM {t}orders WHERE amount > ? GROUP BY status ORDER BY status"
    http = server.http(analyst)
    answers = []
    for prefix in ("live.", "rep."):
        r = http.post(
            "/v1/query",
            json={"sql": sql.format(t=prefix), "params": [20]},
            headers={"accept": "application/json"},
        )
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert answers[0] == answers[1]
    mixed = (
        "SELECT c.region, count(*) AS n FROM {t}orders o JOIN rep.customers c ON c.id = o.customer_id "
        "WHERE o.amount > 50 GROUP BY c.region ORDER BY c.region"
    )
    got = [
        http.post(
            "/v1/query", json={"sql": mixed.format(t=p)}, headers={"accept": "application/json"}
        ).json()["rows"]
        for p in ("live.", "rep.")
    ]
    assert got[0] == got[1] and len(got[0]) == 2
    r = http.post("/v1/query", json={"sql": "SELECT regexp_matches(status, 'x') FROM live.orders"})
    assert r.status_code == 400, r.text
    assert "regexp_matches" in r.json()["detail"]


def test_a_client_that_leaves_cancels_the_snowflake_query(server: Server, analyst: str) -> None:
    client = server.flight()
    body = {"kind": "query", "sql": "SELECT id AS gone_marker FROM live.orders"}
    info = client.get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps(body)), call_options(analyst)
    )
    aborts = len(RECORDER.aborts)
    with RECORDER.holding("gone_marker", seconds=60):
        with pytest.raises(flight.FlightError):
            # The client gives up after 2 s (its own gRPC deadline) while Snowflake still runs it.
            client.do_get(info.endpoints[0].ticket, call_options(analyst, timeout=2)).read_all()

        def aborted() -> bool:
            return any("GONE_MARKER" in a.upper() for a in RECORDER.aborts[aborts:])

        wait_until(aborted, 30, what="the abort request of the query whose client left")
    # Its slot and session were given back: the next query answers.
    assert flight_query(server, analyst, "SELECT count(*) AS n FROM live.orders").to_pylist() == [
        {"n": ORDERS_ROWS}
    ]


# --- mixed queries: live and stored tables --------------------------------------------------------
MIXED = [
    # A CTE over a stored table, quotes inside literals: the rewritten text keeps them.
    ("WITH eu AS (SELECT id FROM rep.customers WHERE region = 'eu' OR name = 'it''s') SELECT count(*) AS n "
     "FROM {live}orders o JOIN eu ON eu.id = o.customer_id WHERE o.status <> 'o''clock'", None),
    ("SELECT c.region, count(*) AS n, sum(o.amount) AS total FROM {live}orders o JOIN rep.customers c ON c.id = o.customer_id "
     "WHERE o.amount > 100 AND c.region = 'eu' GROUP BY c.region ORDER BY c.region", None),
    ("SELECT o.id, c.name FROM {live}orders o JOIN rep.customers c ON c.id = o.customer_id "
     "WHERE o.status = 'returned' AND o.amount >= ? ORDER BY o.id LIMIT 20", [200]),
    ("SELECT c.name, o.n FROM rep.customers c LEFT JOIN (SELECT customer_id, count(*) AS n FROM {live}orders "
     "GROUP BY customer_id) o ON o.customer_id = c.id ORDER BY c.name LIMIT 10", None),
]  # fmt: skip


@pytest.mark.parametrize(("sql", "params"), MIXED)
def test_a_mixed_query_returns_the_rows_of_the_same_sql_on_the_replicas(
    server: Server, analyst: str, sql: str, params: list[Any] | None
) -> None:
    mark = RECORDER.mark()
    mixed = flight_query(server, analyst, sql.format(live="live."), params)
    pulled = _pushed(mark)
    replica = flight_query(server, analyst, sql.format(live="rep."), params)
    assert _rows(mixed) == _rows(replica)
    assert len(pulled) == 1, RECORDER.since(mark)


def test_a_mixed_query_pushes_the_live_tables_columns_and_own_filters_down(
    server: Server, analyst: str
) -> None:
    mark = RECORDER.mark()
    flight_query(
        server,
        analyst,
        "SELECT c.region, sum(o.amount) AS total FROM live.orders o JOIN rep.customers c ON c.id = o.customer_id "
        "WHERE o.amount > 100 AND c.region = 'eu' AND o.placed < ? GROUP BY c.region",
        ["2024-03-01"],
    )
    (sent,) = _pushed(mark)
    assert '"AMOUNT" > 100' in sent  # its own filter, pushed down
    assert "REGION" not in sent and "eu" not in sent  # the other table's filter is not
    assert "?" not in sent  # a filter with a parameter stays local (DuckDB applies it)
    assert '"STATUS"' not in sent  # columns the query never names are not pulled
    assert '"CUSTOMER_ID"' in sent and '"AMOUNT"' in sent


def test_max_pulled_rows_refuses_a_live_side_that_is_too_large(
    emu: Emulator, src: Source, tmp_path: Path
) -> None:
    s = start_server(tmp_path / "pull", demo=False, **_sections(emu, src, max_pulled_rows=100))
    try:
        _sync_replicas(s)
        token = s.mint(kind="admin", swarm=None)
        mark = RECORDER.mark()
        # No filter on the live side: refused from Snowflake's row count, before any pull.
        err = flight_query_error(
            s, token, "SELECT count(*) FROM live.orders o JOIN rep.customers r ON r.id = o.customer_id"
        )
        assert err["code"] == "INVALID_ARGUMENT", err
        assert "max_pulled_rows" in err["detail"] and "filter" in err["detail"]
        assert not [
            q for q in RECORDER.since(mark) if "ORDERS" in q and "information_schema" not in q.lower()
        ]
        # A filter that still matches too many rows: refused when the pull passes the limit.
        err = flight_query_error(
            s,
            token,
            "SELECT count(*) FROM live.orders o JOIN rep.customers r ON r.id = o.customer_id WHERE o.amount > 1",
        )
        assert err["code"] == "INVALID_ARGUMENT", err
        assert "narrow the filter" in err["detail"]
        # A narrow enough filter answers.
        table = flight_query(
            s,
            token,
            "SELECT count(*) AS n FROM live.orders o JOIN rep.customers r ON r.id = o.customer_id WHERE o.id < 50",
        )
        assert table.to_pylist() == [{"n": 50}]
    finally:
        s.stop()


def test_a_live_result_is_served_again_within_cache_ttl_seconds(server: Server, analyst: str) -> None:
    sql = "SELECT status, max(amount) AS top FROM live.orders WHERE id < ? GROUP BY status ORDER BY status"
    mark = RECORDER.mark()
    first = flight_query(server, analyst, sql, [123])
    again = flight_query(server, analyst, sql, [123])
    other = flight_query(server, analyst, sql, [124])  # other parameters: another result
    assert first.equals(again)
    assert other.num_rows == 3
    assert len(_pushed(mark)) == 2
    http = server.http(analyst).post(
        "/v1/query", json={"sql": sql, "params": [123]}, headers={"accept": "application/json"}
    )
    assert http.status_code == 200 and http.json()["row_count"] == 3
    assert len(_pushed(mark)) == 2


def test_a_live_query_calling_a_volatile_function_is_never_replayed(server: Server, analyst: str) -> None:
    sql = "SELECT id, current_date AS d FROM live.orders WHERE id < 3 ORDER BY id"
    mark = RECORDER.mark()
    flight_query(server, analyst, sql)
    flight_query(server, analyst, sql)
    assert len(_pushed(mark)) == 2


def test_a_dropped_source_and_refused_credentials_are_unavailable_with_a_sentence(
    emu: Emulator, src: Source, tmp_path: Path
) -> None:
    src.execute(
        "CREATE OR REPLACE TABLE DROPME (ID NUMBER(9,0), NAME VARCHAR)", "INSERT INTO DROPME VALUES (1, 'a')"
    )
    sections = _sections(emu, src, schema_ttl_seconds=3600, cache_ttl_seconds=0)
    sections["sync"] = {"enabled": False}
    sections["live"]["tables"] = [{"source": src.name("DROPME"), "target": "live.dropme"}]
    s = start_server(tmp_path / "faults", demo=False, **sections)
    try:
        token = s.mint(kind="admin", swarm=None)
        assert flight_query(s, token, "SELECT name FROM live.dropme").to_pylist() == [{"name": "a"}]
        # Credentials revoked: every live query opens its own session, so the next one is refused.
        from tests.sync_emulator import require_password

        with require_password("another-password"):
            err = flight_query_error(s, token, "SELECT name FROM live.dropme")
        assert err["code"] == "UNAVAILABLE", err
        assert "credentials" in err["detail"] and "emulator-password" not in err["detail"]
        # The source is dropped while its schema is still cached: Snowflake's own refusal, as a sentence.
        src.execute("DROP TABLE DROPME")
        err = flight_query_error(s, token, "SELECT name FROM live.dropme")
        assert err["code"] == "UNAVAILABLE", err
        assert "live" in err["detail"] and "DROPME" in err["detail"].upper()
        # Read again (the schema TTL passed): the listing leaves it out, GetSchema says why.
        live = s.catalog.tables.live
        assert live is not None
        ref = live.refs()[0]
        live._described.clear()  # as if schema_ttl_seconds had passed
        with pytest.raises(pa.ArrowException) as raised:
            s.flight().get_schema(flight.FlightDescriptor.for_path("live", "dropme"), call_options(token))
        assert "UNAVAILABLE" in str(raised.value) and "does not exist" in str(raised.value)
        assert live.cached(ref) is None  # a failed read is not kept
    finally:
        s.stop()


BAD_CONFIG = [
    ({"tables": [{"source": "A.B.C", "target": "nodot"}]}, "live.tables[0].target"),
    ({"tables": [{"source": "A.B.C", "target": "_quiver.t"}]}, "reserved"),
    (
        {"tables": [{"source": "A.B.C", "target": "s.t"}, {"source": "A.B.D", "target": "S.T"}]},
        "already used",
    ),
    ({"tables": [{"source": "A.B.C.D", "target": "s.t"}]}, "live.tables[0] (s.t).source"),
    ({"tables": [{"source": "C", "target": "s.t"}]}, "name the database"),
    ({"tables": [{"source": "A.B.C", "target": "s.t", "mode": "full"}]}, "mode"),
    ({"max_pulled_rows": 0}, "live.max_pulled_rows"),
]


@pytest.mark.parametrize(("live", "named"), BAD_CONFIG)
def test_a_wrong_live_configuration_is_refused_naming_the_key(
    tmp_path: Path, live: dict[str, Any], named: str
) -> None:
    from catalog import load_config
    from catalog.errors import ConfigError

    overrides = {
        "server": {"data_dir": str(tmp_path)},
        "snowflake": {"account": "a", "user": "u"},
        "live": live,
    }
    with pytest.raises(ConfigError) as raised:
        load_config(None, environ={}, overrides=overrides)
    assert named in str(raised.value)


def test_live_tables_need_a_snowflake_connection_and_are_not_also_replicated() -> None:
    from catalog import load_config
    from catalog.errors import ConfigError

    table = {"source": "A.B.C", "target": "s.t"}
    with pytest.raises(ConfigError, match=r"\[\[live.tables\]\] needs a \[snowflake\]"):
        load_config(None, environ={}, overrides={"live": {"tables": [table]}})
    overrides: dict[str, dict[str, Any]] = {
        "snowflake": {"account": "a", "user": "u"},
        "sync": {"tables": [table]},
        "live": {"tables": [table]},
    }
    with pytest.raises(ConfigError, match="either replicated or live"):
        load_config(None, environ={}, overrides=overrides)


def test_the_federation_pages_configuration_example_loads(tmp_path: Path) -> None:
    import re

    from catalog import load_config

    page = (Path(__file__).resolve().parents[1] / "proto_docs" / "federation.md").read_text()
    (example,) = re.findall(r"```toml\n(.*?)```", page, re.S)
    path = tmp_path / "quiver.toml"
    path.write_text(example)
    config = load_config(path, environ={})
    assert [t.target for t in config.live.tables] == ["live.events"]
    assert config.live.max_pulled_rows == 1_000_000


def test_flight_sql_clients_query_live_tables_like_stored_ones(server: Server, analyst: str) -> None:
    import adbc_driver_flightsql.dbapi as flight_sql
    from adbc_driver_flightsql import DatabaseOptions

    conn = flight_sql.connect(
        server.flight_url,
        db_kwargs={DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {analyst}"},
        autocommit=True,
    )
    try:
        answers = []
        for prefix in ("live.", "rep."):
            with conn.cursor() as cur:
                cur.execute(
                    f"SELECT status, count(*) AS n FROM {prefix}orders WHERE id < ? GROUP BY status ORDER BY status",
                    parameters=[90],
                )
                answers.append(cur.fetch_arrow_table().to_pylist())
        assert answers[0] == answers[1] and len(answers[0]) == 3
        objects = conn.adbc_get_objects(depth="tables", db_schema_filter="live").read_all().to_pylist()
        names = {
            t["table_name"]
            for c in objects
            for s in c["catalog_db_schemas"] or []
            for t in s["db_schema_tables"] or []
        }
        assert names == {"orders", "customers"}
    finally:
        conn.close()


def test_the_query_port_reads_a_live_sample(server: Server, analyst: str) -> None:
    """What MCP's sample tool calls (catalog/query_port.py ``read``)."""
    queries = server.catalog.require_queries()
    principal = server.catalog.tokens.verify(analyst)
    mark = RECORDER.mark()
    table = queries.read(
        principal, {"kind": "sample", "table": "live.customers", "rows": 4, "method": "random", "seed": 3}
    )
    assert table.num_rows == 4 and table.schema.names == ["id", "name", "region"]
    assert any("SAMPLE (4 ROWS) SEED (3)" in q for q in _pushed(mark, "CUSTOMERS"))


def _profile(server: Server, token: str, table: str) -> dict[str, dict[str, Any]]:
    client = server.flight()
    body = json.dumps({"kind": "profile", "table": table})
    info = client.get_flight_info(flight.FlightDescriptor.for_command(body), call_options(token))
    rows = client.do_get(info.endpoints[0].ticket, call_options(token)).read_all().to_pylist()
    return {r["name"]: r for r in rows}


def test_a_live_profile_is_pushed_down_and_agrees_with_the_replicas(server: Server, analyst: str) -> None:
    mark = RECORDER.mark()
    live = _profile(server, analyst, "live.orders")
    (sent,) = _pushed(mark)
    assert "APPROX_COUNT_DISTINCT" in sent and "STDDEV_SAMP" in sent  # one aggregate, in Snowflake
    rep = _profile(server, analyst, "rep.orders")
    assert live.keys() == rep.keys()
    for name in live:
        for stat in ("type", "count", "nulls", "null_fraction"):
            assert live[name][stat] == rep[name][stat], (name, stat)
        assert live[name]["q50"] is None and live[name]["top_values"] is None  # not computed live
    for name in ("id", "customer_id", "status"):
        assert (live[name]["min"], live[name]["max"]) == (rep[name]["min"], rep[name]["max"]), name
    assert live["amount"]["mean"] == pytest.approx(rep["amount"]["mean"])
    assert live["amount"]["stddev"] == pytest.approx(rep["amount"]["stddev"])
    again = RECORDER.mark()
    assert _profile(server, analyst, "live.orders") == live  # kept for cache_ttl_seconds
    assert not _pushed(again)


def test_describing_a_live_table_is_refused_and_changes_nothing(server: Server) -> None:
    http = server.http()
    r = http.put("/v1/tables/live.orders/description", json={"table": "Orders, live from Snowflake"})
    assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT", r.text
    assert "live table" in r.json()["detail"]
    tables = {t["table"]: t for t in http.get("/v1/tables").json()["tables"]}
    assert tables["live.orders"]["description"] == "" and tables["live.orders"]["live"] is True
