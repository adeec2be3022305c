"""The hot-table cache's idle fill (``[cache] table_fill = "idle"``, the default;
flight_server/table_cache.py "IdleFiller") on real servers and real DuckDB files: the scan
that misses streams from DuckDB as an uncached scan and only queues its table; the table is
loaded while no Flight call runs, and the next scan is served from memory. A call that
arrives makes the fill yield; a change of the table is never served from the old rows; the
fill stops at shutdown; the budget holds; ``table_fill = "scan"`` turns it off."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import ConfigError, TableRef, load_config
from catalog.tables import TableCatalog
from flight_server.table_cache import IdleFiller, TableCache
from tests.harness import SCAN_FILL, Server, call_options, start_server, wait_until

#: Large enough that an idle fill reads for a while (many batches), small enough for a test.
BIG_ROWS = 3_000_000


def _create(s: Server, name: str, rows: int) -> TableRef:
    ref = TableRef("idle", name)
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS idle")
        cur.execute(
            f"CREATE OR REPLACE TABLE idle.{name} AS SELECT range AS id, range * 2 AS v FROM range({rows})"
        )
        TableCatalog.bump_version(cur, ref)
    return ref


def _change(s: Server, ref: TableRef, sql: str) -> None:
    with s.catalog.db.transaction() as cur:
        cur.execute(sql)
        TableCatalog.bump_version(cur, ref)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("idle_fill"))
    yield s
    s.stop()


def _cache(s: Server) -> TableCache:
    assert s.runtime.flight is not None
    return s.runtime.flight.table_cache


def _idle(s: Server) -> IdleFiller:
    idle = _cache(s).idle
    assert idle is not None
    return idle


def _scan(s: Server, ref: TableRef) -> pa.Table:
    client, opts = s.flight(), call_options(s.admin_token)
    info = client.get_flight_info(flight.FlightDescriptor.for_path(ref.schema, ref.name), opts)
    return pa.concat_tables([client.do_get(e.ticket, opts).read_all() for e in info.endpoints])


def _duckdb(s: Server, ref: TableRef) -> pa.Table:
    with s.catalog.db.reading() as cur:
        return cur.sql(f"SELECT * FROM {ref.sql} ORDER BY rowid").to_arrow_table()


def _tables(s: Server) -> dict[str, int]:
    """The hot-table cache's tables and versions, as GET /v1/status shows them."""
    status = s.http().get("/v1/status").json()["cache"]["tables"]
    return {t["table"]: t["version"] for t in status["tables"]}


def _version(s: Server, ref: TableRef) -> int:
    return TableCatalog(s.catalog.db).version(ref)


def test_the_scan_that_misses_streams_and_the_next_is_served_from_memory(server: Server) -> None:
    ref = _create(server, "first", 45_000)
    want = _duckdb(server, ref)
    before = server.http().get("/v1/status").json()["cache"]["tables"]
    assert before["fill_mode"] == "idle"
    assert _scan(server, ref).equals(want)  # a miss: streamed from DuckDB, nothing kept
    # Loaded once the data plane is idle: /v1/status shows it at the table's version.
    wait_until(lambda: _tables(server).get(ref.qualified) == _version(server, ref), what="the idle fill")
    after = server.http().get("/v1/status").json()["cache"]["tables"]
    assert after["idle_fills"]["ok"] == before["idle_fills"].get("ok", 0) + 1
    assert after["misses"] == before["misses"] + 1 and after["queued"] == 0
    hits = after["hits"]
    assert _scan(server, ref).equals(want)  # from memory
    assert server.http().get("/v1/status").json()["cache"]["tables"]["hits"] == hits + 1
    metrics = server.http().get("/metrics").text
    assert 'quiver_table_cache_idle_fills_total{outcome="ok"}' in metrics
    assert "quiver_table_cache_queued" in metrics


def test_a_select_star_query_queues_the_table_too(server: Server) -> None:
    from quiver_client import QuiverClient

    ref = _create(server, "queried", BIG_ROWS)  # split into parts: the query path that reads a scan's rows
    with QuiverClient(server.flight_url, server.admin_token) as qc:
        assert qc.query(f"SELECT * FROM {ref.qualified}").equals(_duckdb(server, ref))
    wait_until(lambda: ref.qualified in _tables(server), what="the idle fill of a queried table")


def test_a_call_makes_the_fill_yield_and_it_resumes_when_idle(server: Server) -> None:
    ref = _create(server, "yields", BIG_ROWS)
    cache, idle = _cache(server), _idle(server)
    client, opts = server.flight(), call_options(server.admin_token)
    yielded = idle.outcomes["yielded"]
    for _ in range(5):  # a fill that ends before the call arrives does not yield: again
        cache.invalidate(ref)
        _scan(server, ref)
        wait_until(lambda: idle.running == ref.qualified or cache.holds(ref), what="the idle fill to start")
        # Any Flight call — here a listing — makes the running fill yield at its next batch.
        list(client.list_flights(b"", opts))
        if idle.outcomes["yielded"] > yielded:
            break
        wait_until(lambda: idle.running is None, what="the idle fill to end")
    assert idle.outcomes["yielded"] > yielded
    # Queued again at the head, and loaded at the next idle moment: the whole table.
    wait_until(lambda: cache.holds(ref), what="the idle fill to resume")
    hits = cache.stats().hits
    assert _scan(server, ref).equals(_duckdb(server, ref))
    assert cache.stats().hits == hits + 1


def test_a_change_during_the_fill_is_never_served_from_the_old_rows(server: Server) -> None:
    ref = _create(server, "changes", BIG_ROWS)
    cache, idle = _cache(server), _idle(server)
    for round_ in range(3):
        _scan(server, ref)  # queues it
        # Change the table while the idle fill reads it (a write is no Flight call: the
        # fill does not yield to it); the fill's entry, if stored, is the old snapshot's.
        wait_until(lambda: idle.running == ref.qualified or cache.holds(ref), what="the idle fill to start")
        _change(server, ref, f"UPDATE idle.changes SET v = {-round_ - 1} WHERE id = 0")
        wait_until(lambda: idle.running is None, what="the idle fill to end")
        got = _scan(server, ref)
        assert got.column("v")[0].as_py() == -round_ - 1
        assert got.equals(_duckdb(server, ref))
        held = [t.version for t in cache.stats().tables if t.table == ref.qualified]
        assert all(v == _version(server, ref) for v in held), held


def test_racing_scans_all_read_the_table_and_it_is_loaded_once(server: Server) -> None:
    from quiver_client import QuiverClient

    ref = _create(server, "race", 300_000)
    want = _duckdb(server, ref)
    r = server.http().post("/v1/swarms", json={"name": "racers", "description": "race", "tables": ["idle.*"]})
    assert r.status_code == 201, r.text
    tokens = [server.mint("agent", "racers", f"racer-{k}") for k in range(6)]
    cache, idle = _cache(server), _idle(server)
    oks = idle.outcomes["ok"]
    barrier = threading.Barrier(6)
    results: list[pa.Table] = []
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        try:
            with QuiverClient(server.flight_url, tokens[k]) as qc:
                barrier.wait()
                for _ in range(3):
                    results.append(
                        qc.read(ref.qualified) if k % 2 else qc.query(f"SELECT * FROM {ref.qualified}")
                    )
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 18 and all(r.equals(want) for r in results)
    # The fill stores the table, then counts its outcome: wait for both.
    wait_until(lambda: cache.holds(ref) and idle.outcomes["ok"] > oks, what="the idle fill after the race")
    assert idle.outcomes["ok"] == oks + 1


def test_calls_wake_the_idle_fill_only_when_it_waits_for_them(server: Server) -> None:
    """The end of a call notifies the threads waiting for the data plane to become idle, and
    nobody else: with no table queued the filler sleeps through every RPC (a wake-up per
    call is a thread switch and a GIL hand-over on two cores, on the hot path of every
    query). A thread waiting on the same condition stands in for it, once unregistered (the
    calls must not wake it), once registered as an idle waiter (the first call end does)."""
    ref = _create(server, "wake", 1000)
    _scan(server, ref)
    wait_until(lambda: _cache(server).holds(ref), what="the idle fill")
    activity = _idle(server)._activity
    wait_until(lambda: activity.busy == 0 and _idle(server).queued == 0, what="an idle data plane")
    woken: list[bool] = []
    ready = threading.Event()

    def sleeper(register: bool) -> None:
        with activity.cond:
            if register:
                activity.idle_waiters += 1
            ready.set()
            try:
                woken.append(activity.cond.wait(30))
            finally:
                if register:
                    activity.idle_waiters -= 1

    t = threading.Thread(target=sleeper, args=(False,))
    t.start()
    ready.wait(10)
    for _ in range(10):
        _scan(server, ref)  # served from memory: GetFlightInfo and DoGet, each a call
    assert woken == []  # still asleep after 20 calls
    with activity.cond:
        activity.cond.notify_all()  # what want() or close() do
    t.join(10)
    assert woken == [True]

    woken.clear()
    ready.clear()
    t = threading.Thread(target=sleeper, args=(True,))
    t.start()
    ready.wait(10)
    _scan(server, ref)
    t.join(10)
    assert woken == [True] and activity.idle_waiters == 0


def test_shutdown_stops_a_running_fill_and_stores_nothing(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("idle_stop"), demo=False)
    stopped = False
    try:
        ref = _create(s, "big", 2 * BIG_ROWS)
        cache, idle = _cache(s), _idle(s)
        _scan(s, ref)
        wait_until(lambda: idle.running == ref.qualified or cache.holds(ref), what="the idle fill to start")
        thread = idle._thread
        assert thread is not None
        s.stop()
        stopped = True
        # The fill's query was interrupted and its thread joined by the shutdown.
        assert not thread.is_alive()
        assert cache.stats().entries == 0 and idle.queued == 0
        idle.want(ref)  # after shutdown: ignored, no thread started again
        assert idle.queued == 0
    finally:
        if not stopped:
            s.stop()


BUDGET = 2_000_000


def test_the_budget_holds_for_idle_fills(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("idle_budget"), demo=False, cache={"table_memory_bytes": BUDGET})
    try:
        cache = _cache(s)
        with s.catalog.db.transaction() as cur:
            cur.execute("CREATE SCHEMA b")
            for name in ("one", "two", "three"):  # 100,000 BIGINTs: 800 kB each
                cur.execute(f"CREATE TABLE b.{name} AS SELECT range AS id FROM range(100000)")
                TableCatalog.bump_version(cur, TableRef("b", name))
            # Strings: the estimate (offsets only) fits, the real size (~3 MB) does not.
            cur.execute(
                "CREATE TABLE b.text AS SELECT repeat('x', 100) || range::VARCHAR AS s FROM range(30000)"
            )
            TableCatalog.bump_version(cur, TableRef("b", "text"))
        for name in ("one", "two", "three"):
            ref = TableRef("b", name)
            assert _scan(s, ref).equals(_duckdb(s, ref))
            wait_until(lambda r=ref: cache.holds(r), what=f"b.{name} to be loaded")  # type: ignore[misc]
            assert cache.stats().bytes <= BUDGET
        assert {t.table for t in cache.stats().tables} == {"b.two", "b.three"}  # b.one evicted
        too_large = cache.stats().fills["too_large"]
        text = TableRef("b", "text")
        assert _scan(s, text).equals(_duckdb(s, text))
        wait_until(lambda: cache.stats().fills["too_large"] == too_large + 1, what="the fill over the budget")
        assert not cache.holds(text) and cache.stats().bytes <= BUDGET
        assert _scan(s, text).equals(_duckdb(s, text))  # remembered: not queued for that layout
        assert _idle(s).queued == 0 and cache.stats().fills["too_large"] == too_large + 1
    finally:
        s.stop()


def test_table_fill_scan_turns_the_idle_fill_off(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = start_server(tmp_path_factory.mktemp("idle_off"), demo=False, cache=SCAN_FILL)
    try:
        cache = _cache(s)
        assert cache.idle is None and cache.stats().fill_mode == "scan"
        ref = _create(s, "inline", 45_000)
        _scan(s, ref)
        assert cache.holds(ref)  # filled by the scan itself, as it streamed
    finally:
        s.stop()
    assert load_config(None, environ={}).cache.table_fill == "idle"
    assert load_config(None, environ={"QUIVER_CACHE_TABLE_FILL": "scan"}).cache.table_fill == "scan"
    with pytest.raises(ConfigError, match=r"cache\.table_fill"):
        load_config(None, environ={"QUIVER_CACHE_TABLE_FILL": "later"})


_FIRST_SCAN_IMPORTS = """
import sys, tempfile
from pathlib import Path
import pyarrow.flight as flight
from tests.harness import call_options, start_server
s = start_server(Path(tempfile.mkdtemp()))
try:
    client, opts = s.flight(), call_options(s.demo_token)
    list(client.list_flights(b"", opts))  # the client's own first call
    before = set(sys.modules)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), opts)
    for e in info.endpoints:
        client.do_get(e.ticket, opts).read_all()
    print("NEW", sorted({m.split(".")[0] for m in set(sys.modules) - before}))
finally:
    s.stop()
"""


@pytest.mark.slow  # a fresh interpreter
def test_the_first_scan_after_start_imports_nothing() -> None:
    """The first request after start pays no import: pyarrow's first conversion of a Python
    value (``pa.scalar``) imports pandas (~340 modules, ~0.2 s, ~90 MB resident), which the
    first GetFlightInfo used to pay for its endpoints' expiry; they are built from protobuf
    now, and importing pandas at start instead would cost every server that memory (a fresh
    interpreter: this test process has imported everything already)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_SCAN_IMPORTS],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("NEW "))
    assert line == "NEW []", line


def test_queries_outside_flight_hold_the_data_plane_busy(server: Server) -> None:
    """The idle fill waits for every request, not only Flight calls: a query of POST /v1/query
    (and of MCP and exports, which take the same admission slots) holds the activity while it
    runs, and an async query holds it while its worker runs it — after the submit-query call
    has ended. Both let it go when they end."""
    activity = _idle(server)._activity
    assert server.http().post("/v1/swarms", json={"name": "busy", "tables": ["idle.*"]}).status_code == 201
    token = server.mint(swarm="busy")
    wait_until(lambda: activity.busy == 0, what="an idle data plane")
    seq = activity.seq
    r = server.http(token).post("/v1/query", json={"sql": "SELECT 42 AS x"})
    assert r.status_code == 200, r.text
    assert activity.seq > seq  # no Flight call ran: the admission slot counted
    wait_until(lambda: activity.busy == 0, what="the HTTP query's slot let go")

    client, opts = server.flight(), call_options(token)

    def act(name: str, body: dict[str, str]) -> dict[str, object]:
        raw = json.dumps(body).encode()
        return dict(
            json.loads(next(iter(client.do_action(flight.Action(name, raw), opts))).body.to_pybytes())
        )

    slow = "SELECT sum(hash(i)) AS h FROM range(20000000000) t(i)"  # minutes: cancelled below
    query_id = str(act("submit-query", {"sql": slow})["id"])
    wait_until(lambda: act("query-status", {"id": query_id})["state"] == "running", what="the async run")
    # The status calls are Flight calls: once they have ended, only the worker holds it.
    wait_until(lambda: activity.busy == 1, what="only the async worker busy")
    assert act("query-status", {"id": query_id})["state"] == "running"
    act("cancel-query", {"id": query_id})
    wait_until(lambda: act("query-status", {"id": query_id})["state"] == "cancelled", what="the cancel")
    wait_until(lambda: activity.busy == 0, what="the async worker done")
