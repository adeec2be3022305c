"""full / append / merge against the emulator through the real connector: the replica is
compared with the source row by row; schema evolution under each policy; keyset paging
(many batches from one source); atomic swaps under concurrent readers; data versions."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest

from catalog import TableRef
from tests.sync_emulator import Emulator, Source, replica, sync_service

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


ORDERS = (
    "CREATE TABLE ORDERS (ID NUMBER(38,0), CUSTOMER VARCHAR, AMOUNT NUMBER(12,2), UPDATED_AT TIMESTAMP_NTZ)"
)


def seed_orders(src: Source, first: int, last: int, updated: str = "2024-01-01 00:00:00") -> None:
    src.execute(
        f"INSERT INTO ORDERS SELECT {first} + SEQ4(), 'c' || MOD({first} + SEQ4(), 7), "
        f"MOD(({first} + SEQ4()) * 37, 1000) + 0.25, '{updated}'::TIMESTAMP_NTZ "
        f"FROM TABLE(GENERATOR(ROWCOUNT => {last - first + 1}))"
    )


def same(service: Any, src: Source, target: str, source_table: str = "ORDERS", order: str = "ID") -> None:
    """The replica equals the source, row by row."""
    ours = replica(service, f"SELECT * FROM {target} ORDER BY {order.lower()}")
    theirs = [tuple(r) for r in src.rows(f"SELECT * FROM {source_table} ORDER BY {order}")]
    assert len(ours) == len(theirs)
    assert ours == theirs


def version(service: Any, target: str) -> int:
    schema, name = target.split(".")
    return int(service.catalog.tables.version(TableRef(schema, name)))


def test_full_replaces_the_table_and_bumps_the_version(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu)
    src.execute(ORDERS)
    seed_orders(src, 1, 500)
    table = {"source": src.name("ORDERS"), "target": "sales.orders", "mode": "full"}
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert (run.outcome, run.mode, run.rows_read, run.rows_written) == ("ok", "full", 500, 500)
        same(service, src, "sales.orders")
        v1 = version(service, "sales.orders")
        src.execute(
            "DELETE FROM ORDERS WHERE ID <= 100", "UPDATE ORDERS SET CUSTOMER = 'changed' WHERE ID = 200"
        )
        seed_orders(src, 501, 520)
        (run,) = service.run_now()
        assert run.outcome == "ok" and run.rows_written == 420
        same(service, src, "sales.orders")
        assert version(service, "sales.orders") == v1 + 1


def test_append_reads_only_rows_above_the_watermark(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu)
    src.execute("CREATE TABLE EVENTS (EVENT_ID NUMBER(38,0), KIND VARCHAR)")
    src.execute("INSERT INTO EVENTS SELECT SEQ4() + 1, 'seed' FROM TABLE(GENERATOR(ROWCOUNT => 300))")
    table = {"source": src.name("EVENTS"), "target": "app.events", "mode": "append", "cursor": "EVENT_ID"}
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert (run.outcome, run.rows_written, run.watermark) == ("ok", 300, "300")
        v1 = version(service, "app.events")
        # Nothing new: a no-op run, no new version.
        (run,) = service.run_now()
        assert (run.outcome, run.rows_read, run.rows_written) == ("ok", 0, 0)
        assert version(service, "app.events") == v1
        src.execute("INSERT INTO EVENTS SELECT SEQ4() + 301, 'new' FROM TABLE(GENERATOR(ROWCOUNT => 25))")
        (run,) = service.run_now()
        assert (run.outcome, run.rows_read, run.rows_written, run.watermark) == ("ok", 25, 25, "325")
        assert version(service, "app.events") == v1 + 1
        same(service, src, "app.events", "EVENTS", "EVENT_ID")
        status = service.status().tables[0]
        assert status.watermark == "325"
        assert status.last_run is not None and status.last_run.outcome == "ok"


def test_merge_upserts_by_key_with_lookback_and_reconcile_removes_deleted_rows(
    emu: Emulator, tmp_path: Path
) -> None:
    src = Source(emu)
    src.execute(ORDERS)
    seed_orders(src, 1, 399, updated="2023-01-01 00:00:00")
    seed_orders(src, 400, 400, updated="2024-01-01 22:00:00")
    table = {
        "source": src.name("ORDERS"),
        "target": "sales.orders",
        "mode": "merge",
        "cursor": "UPDATED_AT",
        "primary_key": ["ID"],
        "lookback_seconds": 3600,
    }
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert run.mode == "full" and run.rows_written == 400
        src.execute(
            "UPDATE ORDERS SET CUSTOMER = 'updated', UPDATED_AT = '2024-01-02 00:00:00'::TIMESTAMP_NTZ WHERE ID <= 10"
        )
        seed_orders(src, 401, 405, updated="2024-01-02 00:00:00")
        # A late row: older than the watermark (22:00) but inside the lookback window (21:00).
        src.execute(
            "UPDATE ORDERS SET CUSTOMER = 'late', UPDATED_AT = '2024-01-01 21:30:00'::TIMESTAMP_NTZ WHERE ID = 50"
        )
        (run,) = service.run_now()
        assert run.outcome == "ok" and run.mode == "merge"
        assert run.rows_written == 17  # 10 updated + 5 new + 1 late + the row at the old watermark
        assert run.watermark == "2024-01-02T00:00:00"
        same(service, src, "sales.orders")
        # A second run re-reads the lookback window and changes nothing.
        (run,) = service.run_now()
        same(service, src, "sales.orders")
        # merge alone cannot see deletes...
        src.execute("DELETE FROM ORDERS WHERE ID IN (3, 4, 5)")
        (run,) = service.run_now()
        assert replica(service, "SELECT count(*) FROM sales.orders")[0][0] == 405
    # ...a reconcile can.
    table["reconcile_seconds"] = 0.001
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert run.outcome == "ok" and run.rows_deleted == 3
        same(service, src, "sales.orders")


def test_keyset_pages_bound_each_read_and_cover_every_row(emu: Emulator, tmp_path: Path) -> None:
    """The emulator answers a query in one batch; batch_rows makes the run read many small
    pages instead (bounded memory), by primary key or by a cursor with ties, NULLs included."""
    src = Source(emu)
    src.execute("CREATE TABLE T (ID NUMBER(38,0), GRP NUMBER(38,0), K2 VARCHAR, V VARCHAR)")
    src.execute(
        "INSERT INTO T SELECT SEQ4(), FLOOR(SEQ4() / 37), 'k' || MOD(SEQ4(), 3), 'v' || SEQ4() "
        "FROM TABLE(GENERATOR(ROWCOUNT => 1000))"
    )
    src.execute("INSERT INTO T VALUES (NULL, NULL, NULL, 'null key'), (5000, 5, 'k9', 'tie in group 5')")
    tables = [
        {"source": src.name("T"), "target": "p.by_key", "primary_key": ["ID", "K2"], "batch_rows": 64},
        # GRP has ties of 37-38 rows: pages of 50 split them, pages of 20 fall inside them.
        {
            "source": src.name("T"),
            "target": "p.by_cursor",
            "mode": "append",
            "cursor": "GRP",
            "batch_rows": 50,
        },
        {
            "source": src.name("T"),
            "target": "p.small_pages",
            "mode": "append",
            "cursor": "GRP",
            "batch_rows": 20,
        },
    ]
    pages: list[int] = []
    with sync_service(tmp_path, emu, tables) as service:
        records = service.run_now(progress=lambda _t: lambda rows, _b, _tot: pages.append(rows))
        assert [r.outcome for r in records] == ["ok", "ok", "ok"], [r.error for r in records]
        expected = sorted((tuple(r) for r in src.rows("SELECT * FROM T")), key=repr)
        for target in ("p.by_key", "p.by_cursor", "p.small_pages"):
            got = sorted(replica(service, f"SELECT * FROM {target}"), key=repr)
            assert got == expected, target
        assert records[0].rows_read == 1002
    assert len(pages) > 20  # many reads, none of them the whole table
    assert min(b - a for a, b in itertools.pairwise(pages) if b > a) <= 64


def test_full_swap_is_atomic_for_concurrent_readers(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu)
    src.execute("CREATE TABLE SNAP (ID NUMBER(38,0), GEN NUMBER(38,0))")
    src.execute("INSERT INTO SNAP SELECT SEQ4(), 0 FROM TABLE(GENERATOR(ROWCOUNT => 5000))")
    table = {"source": src.name("SNAP"), "target": "s.snap", "primary_key": ["ID"], "batch_rows": 500}
    seen: set[tuple[int, int]] = set()
    errors: list[BaseException] = []
    stop = threading.Event()
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert run.outcome == "ok"

        def read() -> None:
            try:
                while not stop.is_set():
                    with service.catalog.db.reading() as cur:
                        n, gens = cur.execute("SELECT count(*), count(DISTINCT gen) FROM s.snap").fetchall()[
                            0
                        ]
                    seen.add((int(n), int(gens)))
            except BaseException as e:
                errors.append(e)

        readers = [threading.Thread(target=read) for _ in range(2)]
        for r in readers:
            r.start()
        for gen in range(1, 4):
            src.execute(f"UPDATE SNAP SET GEN = {gen}")
            (run,) = service.run_now()
            assert run.outcome == "ok"
        stop.set()
        for r in readers:
            r.join()
        assert replica(service, "SELECT DISTINCT gen FROM s.snap") == [(3,)]
    assert not errors, errors
    assert seen == {(5000, 1)}  # never empty, never partial, never two generations mixed


def test_schema_evolve_adds_widens_keeps_and_resyncs_on_incompatible(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu)
    src.execute("CREATE TABLE E (ID NUMBER(9,0), NAME VARCHAR, OLD VARCHAR, U NUMBER(38,0))")
    src.execute("INSERT INTO E SELECT SEQ4(), 'n', 'o', 1 FROM TABLE(GENERATOR(ROWCOUNT => 10))")
    table = {"source": src.name("E"), "target": "ev.e", "mode": "merge", "cursor": "U", "primary_key": ["ID"]}
    with sync_service(tmp_path, emu, [table]) as service:
        assert service.run_now()[0].outcome == "ok"
        src.execute(
            "ALTER TABLE E ADD COLUMN EXTRA VARCHAR",
            "ALTER TABLE E ALTER COLUMN ID SET DATA TYPE NUMBER(18,0)",
            "ALTER TABLE E DROP COLUMN OLD",
            "INSERT INTO E (ID, NAME, U, EXTRA) VALUES (100, 'new', 2, 'x')",
        )
        (run,) = service.run_now()
        assert run.outcome == "ok" and run.mode == "merge", run.error
        assert "column extra VARCHAR added" in run.schema_changes
        assert "column id widened INTEGER -> BIGINT" in run.schema_changes
        assert any("old dropped at the source (kept" in c for c in run.schema_changes)
        cols = replica(
            service,
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'e' ORDER BY column_index",
        )
        assert cols == [
            ("id", "BIGINT"),
            ("name", "VARCHAR"),
            ("old", "VARCHAR"),
            ("u", "DECIMAL(38,0)"),
            ("extra", "VARCHAR"),
        ]
        assert replica(service, "SELECT old, extra FROM ev.e WHERE id = 100") == [(None, "x")]
        assert replica(service, "SELECT count(*) FROM ev.e WHERE old = 'o'") == [(10,)]
        audited = service.catalog.audit.query(action="sync.schema_change")
        assert {e.detail for e in audited} >= {"column extra VARCHAR added"}
        # Incompatible (a column changes to a type that cannot hold the old values): resync.
        src.execute(
            "ALTER TABLE E DROP COLUMN NAME",
            "ALTER TABLE E ADD COLUMN NAME NUMBER(5,0)",
            "UPDATE E SET NAME = 7, U = 3",
        )
        (run,) = service.run_now()
        assert run.outcome == "ok" and run.mode == "full", run.error
        assert "full resync" in run.schema_changes
        same(service, src, "ev.e", "E")


def test_schema_resync_policy_reloads_in_the_new_shape(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu)
    src.execute("CREATE TABLE R (ID NUMBER(9,0), A VARCHAR, B VARCHAR)")
    src.execute("INSERT INTO R SELECT SEQ4(), 'a', 'b' FROM TABLE(GENERATOR(ROWCOUNT => 20))")
    table = {
        "source": src.name("R"),
        "target": "rs.r",
        "mode": "append",
        "cursor": "ID",
        "on_schema_change": "resync",
    }
    with sync_service(tmp_path, emu, [table]) as service:
        assert service.run_now()[0].outcome == "ok"
        src.execute(
            "ALTER TABLE R DROP COLUMN B", "ALTER TABLE R ADD COLUMN C NUMBER(5,0)", "UPDATE R SET C = ID"
        )
        (run,) = service.run_now()
        assert run.outcome == "ok" and run.mode == "full"
        same(service, src, "rs.r", "R")


def test_schema_fail_policy_stops_the_table_until_a_full_run(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu)
    src.execute("CREATE TABLE F (ID NUMBER(9,0), A VARCHAR)")
    src.execute("INSERT INTO F SELECT SEQ4(), 'a' FROM TABLE(GENERATOR(ROWCOUNT => 20))")
    table = {
        "source": src.name("F"),
        "target": "fl.f",
        "mode": "append",
        "cursor": "ID",
        "on_schema_change": "fail",
    }
    with sync_service(tmp_path, emu, [table]) as service:
        assert service.run_now()[0].outcome == "ok"
        v = version(service, "fl.f")
        src.execute("ALTER TABLE F ADD COLUMN B VARCHAR", "INSERT INTO F VALUES (100, 'a', 'b')")
        (run,) = service.run_now()
        assert run.outcome == "failed"
        assert "column b VARCHAR added" in (run.error or "")
        assert 'on_schema_change = "fail"' in (run.error or "")
        assert "--full" in (run.error or "")
        # Nothing changed: same rows, same columns, same version, same watermark.
        assert replica(service, "SELECT count(*) FROM fl.f") == [(20,)]
        assert [
            c for (c,) in replica(service, "SELECT column_name FROM duckdb_columns() WHERE table_name = 'f'")
        ] == ["id", "a"]
        assert version(service, "fl.f") == v
        (status,) = service.status().tables
        assert status.watermark == "19"
        assert status.last_run is not None and status.last_run.outcome == "failed"
        refused = service.catalog.audit.query(action="sync.schema_change", outcome="refused")
        assert refused and "column b VARCHAR added" in (refused[0].detail or "")
        (run,) = service.run_now(full=True)
        assert run.outcome == "ok"
        same(service, src, "fl.f", "F")
