"""The hot tables of the previous run, loaded again after a restart (``[cache]
reload_hot_tables``, flight_server/table_cache.py ``TableCache.remember``), on real servers
restarted on the same data dir and real DuckDB files: the cache names the tables it holds in
``DATA_DIR/hot-tables.json`` (never data), and the next start queues them for the idle fill,
so the first scan after the reload is served from memory with DuckDB's rows. A table dropped
is skipped, one that changed between runs is loaded as it is now (never from what was held);
a corrupt file is logged and ignored; ``reload_hot_tables = false`` and the caches-off configuration reload nothing; a scan
during the reload streams the right rows; shutdown stops a reload and keeps the file."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from structlog.testing import capture_logs

from catalog import TableRef
from catalog.tables import TableCatalog
from flight_server.table_cache import HOT_TABLES_FILE, MAX_HOT_TABLES_BYTES, TableCache
from tests.harness import Server, error_info, start_server, wait_until
from tests.test_idle_fill import _cache, _duckdb, _idle, _scan

#: Large enough that a reload reads for a while (many batches), small enough for a test.
BIG_ROWS = 6_000_000
#: The run in between that changes tables without loading anything (and so without
#: rewriting the file): what the third run must not serve from.
NO_RELOAD: dict[str, Any] = {"reload_hot_tables": False}


def _start(data: Path, **cache: Any) -> Server:
    return start_server(data, demo=False, cache=cache) if cache else start_server(data, demo=False)


def _create(s: Server, name: str, rows: int) -> TableRef:
    ref = TableRef("hot", name)
    with s.catalog.db.transaction() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS hot")
        cur.execute(
            f"CREATE OR REPLACE TABLE hot.{name} AS SELECT range AS id, range * 3 AS v FROM range({rows})"
        )
        TableCatalog.bump_version(cur, ref)
    return ref


def _tables(s: Server) -> dict[str, Any]:
    """``cache.tables`` of GET /v1/status."""
    tables: dict[str, Any] = s.http().get("/v1/status").json()["cache"]["tables"]
    return tables


def _held(s: Server) -> set[str]:
    return {t["table"] for t in _tables(s)["tables"]}


def _hot_file(data: Path) -> list[dict[str, Any]]:
    tables: list[dict[str, Any]] = json.loads((data / HOT_TABLES_FILE).read_text())["tables"]
    return tables


def _hold(s: Server, *refs: TableRef) -> None:
    """Scan each table and wait for the idle fill to load it (the file then names it)."""
    for ref in refs:
        assert _scan(s, ref).equals(_duckdb(s, ref))
        wait_until(lambda r=ref: r.qualified in _held(s), what=f"the idle fill of {ref.qualified}")  # type: ignore[misc]


def _reload_done(s: Server) -> dict[str, Any]:
    return wait_until(
        lambda: (r := _tables(s)["reload"])["done"] and r["pending"] == 0 and r, what="the reload to end"
    )


def test_a_restart_reloads_the_hot_tables_and_serves_them_from_memory(tmp_path: Path) -> None:
    s = _start(tmp_path)
    try:
        a, b = _create(s, "a", 45_000), _create(s, "b", 20_000)
        _hold(s, a, b)
        versions = {r.qualified: TableCatalog(s.catalog.db).version(r) for r in (a, b)}
        inode = (tmp_path / HOT_TABLES_FILE).stat().st_ino
        for _ in range(5):  # scans served from memory do not rewrite the file
            assert _scan(s, a).num_rows == 45_000
        assert (tmp_path / HOT_TABLES_FILE).stat().st_ino == inode
        hits = _tables(s)["hits"]
        assert hits >= 5
    finally:
        s.stop()
    # Names, versions and sizes, most recently used first as of the last change (hot.b's
    # fill: the scans of hot.a since then did not rewrite it); no data.
    listed = _hot_file(tmp_path)
    assert [(t["schema"], t["name"]) for t in listed] == [("hot", "b"), ("hot", "a")]
    assert {f"{t['schema']}.{t['name']}": t["version"] for t in listed} == versions
    assert set(listed[0]) == {"schema", "name", "version", "rows", "bytes"}
    assert (tmp_path / HOT_TABLES_FILE).stat().st_size < 1000

    again = _start(tmp_path)
    try:
        reload = _reload_done(again)
        assert reload == {
            "enabled": True,
            "remembered": 2,
            "reloaded": 2,
            "skipped": {},
            "pending": 0,
            "done": True,
        }
        assert _held(again) == {"hot.a", "hot.b"}
        before = _tables(again)
        assert before["misses"] == 0 and before["idle_fills"]["ok"] == 2
        # The first scan after the reload: from memory, DuckDB's rows.
        assert _scan(again, a).equals(_duckdb(again, a))
        after = _tables(again)
        assert after["hits"] == before["hits"] + 1 and after["misses"] == 0
        metrics = again.http().get("/metrics").text
        assert 'quiver_table_cache_reloads_total{outcome="ok"} 2.0' in metrics
    finally:
        again.stop()


def test_a_table_dropped_between_runs_is_skipped_and_a_changed_one_loads_as_it_is_now(tmp_path: Path) -> None:
    s = _start(tmp_path)
    try:
        gone, bumped, quiet, kept = (_create(s, n, 30_000) for n in ("gone", "bumped", "quiet", "kept"))
        _hold(s, gone, bumped, quiet, kept)
    finally:
        s.stop()
    listed = _hot_file(tmp_path)
    # A run with the reload off changes the tables: it loads nothing and leaves the file as is.
    between = _start(tmp_path, **NO_RELOAD)
    try:
        assert _tables(between)["reload"]["enabled"] is False and _held(between) == set()
        with between.catalog.db.transaction() as cur:
            cur.execute("DROP TABLE hot.gone")
            cur.execute("INSERT INTO hot.bumped SELECT range, -1 FROM range(10)")
            TableCatalog.bump_version(cur, bumped)
            # Written without a new data version (as a tool outside Quiver would): the reload
            # reads the table as it is, so its entry's layout is the new row count's.
            cur.execute("DELETE FROM hot.quiet WHERE id < 5")
    finally:
        between.stop()
    assert _hot_file(tmp_path) == listed

    with capture_logs() as logs:
        again = _start(tmp_path)
    try:
        reload = _reload_done(again)
        assert reload["remembered"] == 4 and reload["reloaded"] == 3
        assert reload["skipped"] == {"dropped": 1}
        assert _held(again) == {"hot.kept", "hot.bumped", "hot.quiet"}
        skipped = {
            (e.get("table"), e.get("reason")) for e in logs if e["event"] == "table_cache.reload_skipped"
        }
        assert skipped == {("hot.gone", "dropped")}
        wait_until(lambda: len(_hot_file(tmp_path)) == 3, what="the file to drop the dropped table")
        assert {t["name"] for t in _hot_file(tmp_path)} == {"kept", "bumped", "quiet"}
        assert _duckdb(again, bumped).num_rows == 30_010 and _duckdb(again, quiet).num_rows == 29_995
        for ref in (bumped, quiet):  # served from memory: the rows as they are now, not as held
            hits = _tables(again)["hits"]
            assert _scan(again, ref).equals(_duckdb(again, ref)) and _tables(again)["hits"] == hits + 1
        refusals = []
        for ref in (gone, TableRef("hot", "never")):  # refused as a table that never was
            with pytest.raises(flight.FlightError) as e:
                _scan(again, ref)
            refusals.append(error_info(e.value)["code"])
        assert refusals[0] == refusals[1] != "INTERNAL"
    finally:
        again.stop()


_CORRUPT: dict[str, bytes | None] = {
    "not_json": b"{this is not json",
    "wrong_shape": json.dumps({"tables": [{"schema": "hot", "name": 7}]}).encode(),
    "negative": json.dumps(
        {"tables": [{"schema": "hot", "name": "a", "version": -1, "rows": 1, "bytes": 1}]}
    ).encode(),
    "unknown_field": json.dumps({"tables": [], "data": "x"}).encode(),
    "too_large": b" " * (MAX_HOT_TABLES_BYTES + 1),
    "a_directory": None,
}


@pytest.mark.parametrize("kind", list(_CORRUPT))
def test_a_corrupt_or_unreadable_file_is_logged_and_ignored(tmp_path: Path, kind: str) -> None:
    s = _start(tmp_path)
    try:
        ref = _create(s, "a", 20_000)
    finally:
        s.stop()
    path = tmp_path / HOT_TABLES_FILE
    content = _CORRUPT[kind]
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with capture_logs() as logs:
        again = _start(tmp_path)  # the start does not fail for it
    try:
        ignored = [e for e in logs if e["event"] == "table_cache.hot_tables_ignored"]
        assert len(ignored) == 1 and ignored[0]["log_level"] == "warning"
        assert len(ignored[0].get("error", "")) <= 200
        reload = _tables(again)["reload"]
        assert reload["remembered"] == 0 and reload["reloaded"] == 0 and reload["done"]
        assert _held(again) == set() and _idle(again).queued == 0
        # The server works as without the file; a fill writes a good one where it can.
        with capture_logs() as later:
            _hold(again, ref)
        if content is None:
            assert path.is_dir() and any(e["event"] == "table_cache.hot_tables_not_saved" for e in later)
        else:
            assert [t["name"] for t in _hot_file(tmp_path)] == ["a"]
    finally:
        again.stop()


def test_reload_off_and_caches_off_reload_nothing(tmp_path: Path) -> None:
    s = _start(tmp_path)
    try:
        ref = _create(s, "a", 20_000)
        _hold(s, ref)
    finally:
        s.stop()
    listed = _hot_file(tmp_path)
    for cache in (NO_RELOAD, {"table_memory_bytes": 0}):
        again = _start(tmp_path, **cache)
        try:
            assert _tables(again)["reload"] == {
                "enabled": False,
                "remembered": 0,
                "reloaded": 0,
                "skipped": {},
                "pending": 0,
                "done": True,
            }
            assert _scan(again, ref).equals(_duckdb(again, ref))  # the first scan: a miss
            tables = _tables(again)
            assert tables["hits"] == 0
            assert tables["misses"] == (1 if cache is NO_RELOAD else 0)  # caches off: no lookup
        finally:
            again.stop()
        assert _hot_file(tmp_path) == listed  # neither read nor written
    assert TableCache(1).stats().reload.enabled is False


def test_scans_during_the_reload_stream_the_right_rows(tmp_path: Path) -> None:
    s = _start(tmp_path)
    try:
        ref = _create(s, "big", BIG_ROWS)
        _hold(s, ref)
    finally:
        s.stop()
    again = _start(tmp_path)
    try:
        idle, cache = _idle(again), _cache(again)
        want = _duckdb(again, ref)
        wait_until(lambda: idle.running == ref.qualified or cache.holds(ref), what="the reload to start")
        results: list[pa.Table] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def reader() -> None:
            try:
                barrier.wait()
                for _ in range(2):
                    results.append(_scan(again, ref))
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(results) == 8 and all(r.equals(want) for r in results)
        # The reload yielded to the scans (or had ended first) and ends once idle again.
        reload = _reload_done(again)
        assert reload["reloaded"] == 1 and reload["skipped"] == {}
        hits = _tables(again)["hits"]
        assert _scan(again, ref).equals(want) and _tables(again)["hits"] == hits + 1
    finally:
        again.stop()


def test_shutdown_stops_a_reload_and_the_file_keeps_the_tables(tmp_path: Path) -> None:
    s = _start(tmp_path)
    try:
        ref = _create(s, "big", BIG_ROWS)
        _hold(s, ref)
    finally:
        s.stop()
    listed = _hot_file(tmp_path)
    again = _start(tmp_path)
    stopped = False
    try:
        idle, cache = _idle(again), _cache(again)
        wait_until(lambda: idle.running == ref.qualified or cache.holds(ref), what="the reload to start")
        thread = idle._thread
        assert thread is not None
        again.stop()
        stopped = True
        assert not thread.is_alive()  # its query interrupted, its thread joined
        assert cache.stats().entries == 0 and idle.queued == 0
    finally:
        if not stopped:
            again.stop()
    assert _hot_file(tmp_path) == listed  # what the next start loads again
    third = _start(tmp_path)
    try:
        assert _reload_done(third)["reloaded"] == 1
        assert _scan(third, ref).equals(_duckdb(third, ref))
    finally:
        third.stop()


def test_an_eviction_drops_the_table_from_the_file(tmp_path: Path) -> None:
    # 100,000 BIGINTs: 800 kB each; two fit the budget.
    s = _start(tmp_path, table_memory_bytes=2_000_000)
    try:
        with s.catalog.db.transaction() as cur:
            cur.execute("CREATE SCHEMA hot")
            for name in ("one", "two", "three"):
                cur.execute(f"CREATE TABLE hot.{name} AS SELECT range AS id FROM range(100000)")
                TableCatalog.bump_version(cur, TableRef("hot", name))
        _hold(s, *(TableRef("hot", n) for n in ("one", "two", "three")))
        assert [t["name"] for t in _hot_file(tmp_path)] == ["three", "two"]  # hot.one evicted
    finally:
        s.stop()
    # A smaller budget: what no longer fits is skipped, the most recently used first kept.
    again = _start(tmp_path, table_memory_bytes=1_000_000)
    try:
        reload = _reload_done(again)
        assert reload["reloaded"] == 1 and reload["skipped"] == {"too_large": 1}
        assert _held(again) == {"hot.three"}
    finally:
        again.stop()


def test_racing_scans_and_writes_leave_the_file_naming_what_is_held(tmp_path: Path) -> None:
    s = _start(tmp_path)
    try:
        refs = [_create(s, f"r{i}", 20_000) for i in range(3)]
        _hold(s, *refs)
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def scanner(k: int) -> None:
            try:
                barrier.wait()
                for j in range(12):
                    ref = refs[(k + j) % len(refs)]
                    assert _scan(s, ref).num_rows >= 20_000
            except BaseException as e:  # reported below
                errors.append(e)

        def writer() -> None:  # one writer: data writes serialize (DuckDB refuses conflicting ones)
            try:
                barrier.wait()
                for j in range(12):
                    ref = refs[j % len(refs)]
                    with s.catalog.db.transaction() as cur:
                        cur.execute(f"INSERT INTO {ref.sql} VALUES ({j}, -1)")
                        TableCatalog.bump_version(cur, ref)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=scanner, args=(k,)) for k in range(3)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for ref in refs:  # every table read once more at its last version, then loaded when idle
            assert _scan(s, ref).equals(_duckdb(s, ref))
        idle, cache = _idle(s), _cache(s)
        wait_until(lambda: idle.queued == 0 and idle.running is None, what="the idle fills to end")
        held = {(t.table, t.version) for t in cache.stats().tables}
        assert {(f"{t['schema']}.{t['name']}", t["version"]) for t in _hot_file(tmp_path)} == held
        assert not list(tmp_path.glob(".hot-tables.json.tmp"))
    finally:
        s.stop()


def test_the_setting_defaults_on_and_refuses_a_non_boolean() -> None:
    from catalog import ConfigError, load_config

    assert load_config(None, environ={}).cache.reload_hot_tables is True
    assert (
        load_config(None, environ={"QUIVER_CACHE_RELOAD_HOT_TABLES": "false"}).cache.reload_hot_tables
        is False
    )
    with pytest.raises(ConfigError, match=r"cache\.reload_hot_tables"):
        load_config(None, environ={"QUIVER_CACHE_RELOAD_HOT_TABLES": "sometimes"})
