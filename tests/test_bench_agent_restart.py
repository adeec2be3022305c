"""tests/bench/bench_agent.py's "first PATH scan after a restart" row, on a small ``bench.t``:
real ``quiver serve`` subprocesses (the default one and the caches-off one), a scan that makes
the default server hold the table, then the row's own code — a clean stop, a start on the same
data dir, the wait for the reload in ``/v1/status``, the timed first scan — whose cache column
must say the scan was served from the reloaded hot-table cache."""

from __future__ import annotations

import contextlib
from pathlib import Path

import duckdb
import pytest

from tests.bench.bench_agent import CACHES_OFF, _first_scan_after_restart, _start
from tests.bench.bench_flight import TABLE_SQL

pytestmark = pytest.mark.slow  # subprocess servers

ROWS = 50_000


def test_the_restart_row_times_a_scan_served_from_the_reloaded_cache(tmp_path: Path) -> None:
    db = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute(TABLE_SQL.format(rows=ROWS))
    off_db = tmp_path / "off.duckdb"
    off_db.write_bytes(db.read_bytes())
    with contextlib.ExitStack() as stack:
        on = _start(stack, tmp_path, "quiver", db, {})
        off = _start(stack, tmp_path, "quiver-off", off_db, CACHES_OFF)
        assert on.client.read("bench.t").num_rows == ROWS  # a miss: queued, loaded when idle
        assert on.idle_load("bench.t") >= 0
        (row,) = _first_scan_after_restart(stack, tmp_path, on, db, off)
    assert row.measure.startswith("first PATH scan after a restart (hot tables reloaded in the background; ")
    assert "warm: table cache 1 hits" in row.measure  # served from the reloaded table
    assert "1 of 1 tables reloaded" in row.measure
    assert row.target == ">= 1.00x" and row.ratio.endswith("x") and float(row.ratio[:-1]) > 0
    assert row.met in ("yes", "no")
    assert (tmp_path / "quiver-restart.log").stat().st_size > 0
