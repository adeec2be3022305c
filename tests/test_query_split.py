"""Split queries (issue #10): a large ``query`` command that is a plain projection and filter
over one table becomes one endpoint per rowid range, like a PATH scan, so that a client fetches
it in parallel. The parts together are exactly the unsplit result, in order; the parts of one
FlightInfo never mix data versions; a query that cannot be split soundly stays one endpoint.
Wire contract: proto_docs/descriptors.md ("Endpoints"), proto_docs/tickets.md.

Real servers on ephemeral ports, real pyarrow.flight and QuiverClient clients; the expected
rows come from the server's own DuckDB file, read directly.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import TableRef
from catalog.tables import TableCatalog
from quiver_client import QuiverClient
from tests.harness import SCAN_FILL, SMALL_SPLIT, Server, call_options, error_info, start_server, wait_until

ROWS = 200_000  # 8 parts of SMALL_SPLIT; about 5 MB as Arrow: far more than GetFlightInfo's head


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def _create(s: Server, sql: str, *tables: str) -> None:
    with s.catalog.db.transaction() as cur:
        cur.execute(sql)
        for name in tables:
            TableCatalog.bump_version(cur, TableRef("demo", name))
    assert s.runtime.flight is not None
    s.runtime.flight.guard.invalidate_tables()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The first scan fills the hot-table cache as it streams (tests/test_idle_fill.py: the idle fill).
    s = start_server(tmp_path_factory.mktemp("qsplit"), flight=SMALL_SPLIT, cache=SCAN_FILL)
    _create(
        s,
        f"CREATE TABLE demo.big AS SELECT range AS id, range * 2 AS v, 'row-' || range::VARCHAR AS s, "
        f"[range, range + 1] AS l FROM range({ROWS})",
        "big",
    )
    # A column named rowid hides DuckDB's row id; its values are shuffled and partly negative.
    _create(
        s,
        "CREATE TABLE demo.rid AS SELECT (hash(range) % 100000)::BIGINT - 50000 AS rowid, range AS x "
        f"FROM range({ROWS})",
        "rid",
    )
    yield s
    s.stop()


@pytest.fixture
def opts(server: Server) -> flight.FlightCallOptions:
    assert server.demo_token is not None
    return call_options(server.demo_token)


def _direct(server: Server, sql: str, params: list[Any] | None = None) -> pa.Table:
    with server.catalog.db.reading() as cur:
        return cur.sql(sql, params=params).to_arrow_table()


def _fetch(client: flight.FlightClient, info: flight.FlightInfo, opts: flight.FlightCallOptions) -> pa.Table:
    parts = [client.do_get(e.ticket, opts).read_all() for e in info.endpoints]
    return pa.concat_tables(parts)


SPLIT_SHAPES = [
    ("SELECT * FROM demo.big", None),
    ("SELECT id, s FROM demo.big", None),
    ("SELECT * FROM demo.big WHERE v % ? <> 0 AND s LIKE ?", [3, "row-%"]),
    (
        "select id * 3 as x, upper(b.s) as u, case when id % 2 = 0 then 'even' end as p, l[2] AS second "
        "from demo.big as b where b.id >= $1 -- a trailing comment",
        [1234],
    ),
    (
        "FROM demo.big SELECT v, concat(s, '-', v::VARCHAR) AS c WHERE id NOT IN (5, 7) AND l[1] IS NOT NULL",
        None,
    ),
    ("SELECT * EXCLUDE (l) FROM demo.big WHERE id BETWEEN ? AND ? OR s = 'row-3'", [10, 150_000]),
]


@pytest.mark.parametrize(("sql", "params"), SPLIT_SHAPES)
def test_split_parts_together_are_the_unsplit_result(
    server: Server, opts: flight.FlightCallOptions, sql: str, params: list[Any] | None
) -> None:
    client = server.flight()
    body: dict[str, Any] = {"kind": "query", "sql": sql}
    if params is not None:
        body["params"] = params
    info = client.get_flight_info(cmd(**body), opts)
    assert len(info.endpoints) == 8
    want = _direct(server, sql, params)
    got = _fetch(client, info, opts)
    assert got.schema == info.schema == want.schema
    assert got.equals(want)  # the same rows, in the same order
    # The same through the agent client, which fetches the endpoints in parallel.
    assert server.demo_token is not None
    with QuiverClient(server.flight_url, server.demo_token) as qc:
        assert qc.query(sql, params).equals(want)
    # Not cut, and known not to be: a split query cannot reach the server's cap.
    assert json.loads(info.app_metadata) == {
        "max_rows": 10_000_000,
        "reason": "server_max_rows",
        "truncated": False,
    }


UNSPLIT_SHAPES = [
    "SELECT * FROM demo.big ORDER BY id DESC",
    "SELECT * FROM demo.big LIMIT 150000",
    "SELECT * FROM demo.big LIMIT 150000 OFFSET 10",
    "SELECT DISTINCT s FROM demo.big",
    "SELECT id, count(*) AS n FROM demo.big GROUP BY id",
    "SELECT id, row_number() OVER () AS r FROM demo.big",
    "SELECT id, sum(v) OVER (ORDER BY id) AS r FROM demo.big",
    "SELECT * FROM demo.big UNION ALL SELECT * FROM demo.big",
    "SELECT * FROM demo.big WHERE id IN (SELECT id FROM demo.big WHERE id % 2 = 0)",
    "SELECT a.id, b.v FROM demo.big a JOIN demo.big b ON a.id = b.id",
    "SELECT * FROM demo.big, demo.customers WHERE demo.big.id = demo.customers.customer_id",
    "SELECT * FROM demo.big USING SAMPLE 90 PERCENT (bernoulli, 7)",
    "SELECT * FROM demo.big TABLESAMPLE 90 PERCENT (bernoulli, 7)",
    "WITH x AS (SELECT * FROM demo.big) SELECT * FROM x",
    "SELECT * FROM (SELECT * FROM demo.big) t",
    "SELECT unnest(l) AS e, id FROM demo.big",
    "SELECT id, random() AS r FROM demo.big",
    "SELECT id, now() AS t FROM demo.big",
    "SELECT rowid, id FROM demo.big",
    # DuckDB writes a lambda back in the arrow syntax, which parses to the same tree but no
    # longer binds: lambdas keep a query whole.
    "SELECT v, list_transform(l, lambda x: x + 1) AS l1 FROM demo.big",
    "SELECT id AS rowid FROM demo.big WHERE rowid >= 0",
    "SELECT id FROM demo.big QUALIFY row_number() OVER () >= 1",
    "SELECT range AS id FROM range(200000)",
    "SELECT * FROM demo.rid",
    "SELECT x FROM demo.rid WHERE x >= 0",
]


@pytest.mark.parametrize("sql", UNSPLIT_SHAPES)
def test_queries_that_cannot_be_split_soundly_stay_one_endpoint(
    server: Server, opts: flight.FlightCallOptions, sql: str
) -> None:
    client = server.flight()
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert len(info.endpoints) == 1
    got = _fetch(client, info, opts)
    if "random()" in sql or "now()" in sql or "SAMPLE" in sql:
        assert got.num_rows > 0
    elif "ORDER BY" in sql or "LIMIT" in sql or "demo.rid" in sql:
        assert got.equals(_direct(server, sql))
    else:
        assert got.num_rows == _direct(server, sql).num_rows


def test_callers_max_rows_keeps_one_endpoint_and_an_exact_cut(
    server: Server, opts: flight.FlightCallOptions
) -> None:
    client = server.flight()
    info = client.get_flight_info(cmd(kind="query", sql="SELECT * FROM demo.big", max_rows=150_000), opts)
    assert len(info.endpoints) == 1
    chunks = list(client.do_get(info.endpoints[0].ticket, opts))
    assert sum(c.data.num_rows for c in chunks) == 150_000
    assert json.loads(chunks[-1].app_metadata.to_pybytes())["truncated"] is True


def test_a_table_above_the_server_cap_is_not_split_and_is_cut_exactly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    s = start_server(tmp_path_factory.mktemp("qsplit_cap"), flight=SMALL_SPLIT, limits={"max_rows": 45_000})
    try:
        assert s.demo_token is not None
        opts = call_options(s.demo_token)
        client = s.flight()
        # demo.events has 50,000 rows: more than max_rows, so one endpoint cut at the cap.
        info = client.get_flight_info(cmd(kind="query", sql="SELECT * FROM demo.events"), opts)
        assert len(info.endpoints) == 1
        chunks = list(client.do_get(info.endpoints[0].ticket, opts))
        assert sum(c.data.num_rows for c in chunks) == 45_000
        assert json.loads(chunks[-1].app_metadata.to_pybytes()) == {
            "truncated": True,
            "max_rows": 45_000,
            "reason": "server_max_rows",
        }
    finally:
        s.stop()


def test_parts_are_bound_to_the_principal(server: Server) -> None:
    client = server.flight()
    alice = call_options(server.mint("agent", "demo", "split-alice"))
    bob = call_options(server.mint("agent", "demo", "split-bob"))
    info = client.get_flight_info(cmd(kind="query", sql="SELECT id, v FROM demo.big WHERE v > 10"), alice)
    assert len(info.endpoints) == 8
    for endpoint in info.endpoints:
        with pytest.raises(flight.FlightUnauthorizedError) as caught:
            client.do_get(endpoint.ticket, bob).read_all()
        assert error_info(caught.value)["code"] == "PERMISSION_DENIED"
    # Refusing bob changed nothing: alice still reads every part.
    assert _fetch(client, info, alice).equals(_direct(server, "SELECT id, v FROM demo.big WHERE v > 10"))


def test_parts_never_mix_data_versions(server: Server, opts: flight.FlightCallOptions) -> None:
    client = server.flight()
    sql = "SELECT id, v FROM demo.big WHERE id >= 0"
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert len(info.endpoints) == 8
    first = client.do_get(info.endpoints[0].ticket, opts).read_all()
    _create(server, "UPDATE demo.big SET v = v + 1 WHERE id = 199999", "big")
    try:
        with pytest.raises(flight.FlightUnavailableError) as caught:
            client.do_get(info.endpoints[-1].ticket, opts).read_all()
        assert error_info(caught.value)["code"] == "UNAVAILABLE"
        assert "GetFlightInfo again" in error_info(caught.value)["detail"]
        # A new FlightInfo reads the new version in every part.
        again = client.get_flight_info(cmd(kind="query", sql=sql), opts)
        got = _fetch(client, again, opts)
        assert got.equals(_direct(server, sql))
        assert got.slice(0, first.num_rows).equals(first)
        assert got["v"][-1].as_py() == 199999 * 2 + 1
    finally:
        _create(server, "UPDATE demo.big SET v = v - 1 WHERE id = 199999", "big")


def test_repeated_split_query_follows_a_data_change(server: Server, opts: flight.FlightCallOptions) -> None:
    """Split parts are not stored in the result cache: a repeat after a change reads the change."""
    client = server.flight()
    sql = "SELECT id, v FROM demo.big WHERE v >= ?"
    body = {"kind": "query", "sql": sql, "params": [0]}
    before = _fetch(client, client.get_flight_info(cmd(**body), opts), opts)
    _create(server, "UPDATE demo.big SET v = -1 WHERE id = 0", "big")
    try:

        def fresh() -> bool:
            return _fetch(client, client.get_flight_info(cmd(**body), opts), opts).num_rows == ROWS - 1

        wait_until(fresh, 10, what="the split query to see the update")
        assert before.num_rows == ROWS
    finally:
        _create(server, "UPDATE demo.big SET v = 0 WHERE id = 0", "big")


def test_concurrent_split_queries_each_get_their_rows(server: Server) -> None:
    assert server.demo_token is not None
    shapes = [(f"SELECT id, s FROM demo.big WHERE id % 4 = {k}", k) for k in range(4)]
    errors: list[BaseException] = []
    results: dict[int, pa.Table] = {}

    def run(sql: str, k: int) -> None:
        try:
            with QuiverClient(server.flight_url, server.mint("agent", "demo", f"race-{k}")) as qc:
                results[k] = qc.query(sql)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=shape) for shape in shapes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for sql, k in shapes:
        assert results[k].equals(_direct(server, sql))
    assert server.runtime.flight is not None
    wait_until(lambda: not server.runtime.flight.admission.active(), 20, what="every slot freed")  # type: ignore[union-attr]


def _fresh(server: Server, name: str) -> TableRef:
    _create(
        server,
        f"CREATE TABLE demo.{name} AS SELECT range AS id, 'row-' || range::VARCHAR AS s, range % 7 AS k "
        f"FROM range({ROWS})",
        name,
    )
    return TableRef("demo", name)


def test_select_star_fills_the_table_cache_and_plain_columns_are_served_from_it(
    server: Server, opts: flight.FlightCallOptions
) -> None:
    fs = server.runtime.flight
    assert fs is not None
    cache = fs.table_cache
    ref = _fresh(server, "hotq")
    fills = cache.stats().fills["ok"]
    client = server.flight()
    info = client.get_flight_info(cmd(kind="query", sql="SELECT * FROM demo.hotq"), opts)
    assert len(info.endpoints) == 8 and not cache.holds(ref)
    assert _fetch(client, info, opts).equals(_direct(server, "SELECT * FROM demo.hotq"))
    assert cache.holds(ref) and cache.stats().fills["ok"] == fills + 1
    # Columns read unchanged: answered from memory, run nowhere.
    runs, hits = fs.streamer.executions, cache.stats().hits
    for sql in ("SELECT * FROM demo.hotq", "SELECT s, id FROM demo.hotq", "select ID, t.K from demo.hotq t"):
        info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
        got = _fetch(client, info, opts)
        want = _direct(server, sql)
        assert got.equals(want) and info.schema == want.schema, sql
        assert json.loads(info.app_metadata)["truncated"] is False
    assert fs.streamer.executions == runs and cache.stats().hits == hits + 3
    # Anything more than plain columns runs in DuckDB as before.
    for sql in (
        "SELECT id AS x FROM demo.hotq",
        "SELECT id FROM demo.hotq WHERE k = 3",
        "SELECT id, id FROM demo.hotq",
    ):
        assert _fetch(client, client.get_flight_info(cmd(kind="query", sql=sql), opts), opts).equals(
            _direct(server, sql)
        ), sql
    assert cache.stats().hits == hits + 3


def test_a_cached_table_never_answers_for_a_newer_version(
    server: Server, opts: flight.FlightCallOptions
) -> None:
    ref = _fresh(server, "hotv")
    client = server.flight()
    sql = "SELECT id, s FROM demo.hotv"
    _fetch(client, client.get_flight_info(cmd(kind="query", sql="SELECT * FROM demo.hotv"), opts), opts)
    assert server.runtime.flight is not None and server.runtime.flight.table_cache.holds(ref)
    _create(server, "UPDATE demo.hotv SET s = 'new' WHERE id = 0", "hotv")
    got = _fetch(client, client.get_flight_info(cmd(kind="query", sql=sql), opts), opts)
    assert got.column("s")[0].as_py() == "new" and got.equals(_direct(server, sql))


def test_a_bad_column_is_duckdbs_refusal_even_for_a_cached_table(
    server: Server, opts: flight.FlightCallOptions
) -> None:
    ref = _fresh(server, "hotbad")
    client = server.flight()
    _fetch(client, client.get_flight_info(cmd(kind="query", sql="SELECT * FROM demo.hotbad"), opts), opts)
    assert server.runtime.flight is not None
    cache = server.runtime.flight.table_cache
    assert cache.holds(ref)
    before = cache.stats()
    with pytest.raises(flight.FlightError) as caught:
        client.get_flight_info(cmd(kind="query", sql="SELECT nope FROM demo.hotbad"), opts)
    info = error_info(caught.value)
    assert info["code"] == "INVALID_ARGUMENT" and "nope" in info["detail"]
    after = cache.stats()
    assert after.hits == before.hits and after.entries == before.entries, (before, after)


def test_racing_first_scans_and_queries_fill_once_and_all_read_the_table(server: Server) -> None:
    """PATH scans and ``SELECT *`` queries of a table not yet held, at once: every reader gets
    the whole table in order, and it is loaded into memory exactly once."""
    assert server.runtime.flight is not None
    cache = server.runtime.flight.table_cache
    ref = _fresh(server, "race")
    want = _direct(server, "SELECT * FROM demo.race")
    fills = cache.stats().fills["ok"]
    barrier = threading.Barrier(6)
    results: list[pa.Table] = []
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            with QuiverClient(server.flight_url, server.mint("agent", "demo", f"racer-{k}")) as qc:
                barrier.wait()
                results.append(qc.read("demo.race") if k % 2 else qc.query("SELECT * FROM demo.race"))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 6 and all(r.equals(want) for r in results)
    assert cache.holds(ref) and cache.stats().fills["ok"] == fills + 1


def test_a_runtime_error_in_one_part_is_a_clear_error_and_frees_everything(
    server: Server, opts: flight.FlightCallOptions
) -> None:
    """A cast that fails only in the last rows: the part that reads them fails with a coded
    Flight error (never INTERNAL or a traceback); the others stream; no slot is left held."""
    client = server.flight()
    sql = "SELECT id, CASE WHEN id > 190000 THEN s::INTEGER ELSE id END AS n FROM demo.big"
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert len(info.endpoints) == 8
    good = [client.do_get(e.ticket, opts).read_all() for e in info.endpoints[:-1]]
    assert sum(t.num_rows for t in good) > 0
    with pytest.raises(flight.FlightError) as caught:
        client.do_get(info.endpoints[-1].ticket, opts).read_all()
    detail = error_info(caught.value)
    assert detail["code"] == "INVALID_ARGUMENT" and "Traceback" not in detail["detail"]
    assert len(detail["detail"]) <= 4_000
    assert server.runtime.flight is not None
    wait_until(lambda: not server.runtime.flight.admission.active(), 20, what="every slot freed")  # type: ignore[union-attr]
    # The server answers the next query as before.
    assert (
        _fetch(
            client,
            client.get_flight_info(cmd(kind="query", sql="SELECT id FROM demo.big WHERE id < 5"), opts),
            opts,
        ).num_rows
        == 5
    )


def test_a_split_query_runs_once_at_info_then_once_per_part(
    server: Server, opts: flight.FlightCallOptions
) -> None:
    """Plan once, split: GetFlightInfo runs the query once (its head is not the whole result),
    each part's DoGet runs its range once; the next GetFlightInfo of the text only probes."""
    fs = server.runtime.flight
    assert fs is not None
    client = server.flight()
    sql = "SELECT id, v + 1 AS w FROM demo.big WHERE v >= -17"  # a text no other test sends
    probes, runs = fs.planner.probes, fs.streamer.executions
    info = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert len(info.endpoints) == 8
    assert (fs.planner.probes, fs.streamer.executions) == (probes, runs + 1)
    assert _fetch(client, info, opts).equals(_direct(server, sql))
    assert fs.streamer.executions == runs + 1 + 8
    again = client.get_flight_info(cmd(kind="query", sql=sql), opts)
    assert len(again.endpoints) == 8
    assert (fs.planner.probes, fs.streamer.executions) == (probes + 1, runs + 9)


def test_a_part_that_binds_otherwise_keeps_the_query_whole(server: Server) -> None:
    """The planner's last check before splitting: the first written-back part must bind to
    the query's own result schema (else the query stays one endpoint)."""
    fs = server.runtime.flight
    assert fs is not None
    assert server.demo_token is not None
    principal = fs.catalog.tokens.verify(server.demo_token)
    sql = "SELECT id FROM demo.big WHERE rowid >= 0 AND rowid < 10"
    assert fs.planner._binds_as(principal, sql, (), pa.schema([("id", pa.int64())]))
    assert not fs.planner._binds_as(principal, sql, (), pa.schema([("id", pa.int32())]))
    assert not fs.planner._binds_as(
        principal, "SELECT nope FROM demo.big", (), pa.schema([("id", pa.int64())])
    )
    assert not fs.admission.active()
