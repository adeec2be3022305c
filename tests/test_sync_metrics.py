"""Sync metrics (``quiver_sync_*``, proto_docs/sync.md "Metrics"): a real server syncing
from the Snowflake emulator; runs update them, ``/metrics`` shows them, what comes from the
catalog's sync state survives a restart, and scrapes race a running load."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Server, start_server
from tests.sync_emulator import Emulator, Source
from tests.test_sync_server import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROWS = 5000


def _samples(server: Server) -> dict[tuple[str, str, str], float]:
    """{(metric, table, outcome): value} of every quiver_sync_* sample in /metrics."""
    r = server.http().get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("quiver_sync_"):
                out[(s.name, s.labels["table"], s.labels.get("outcome", ""))] = s.value
    return out


def _get(
    samples: dict[tuple[str, str, str], float], name: str, table: str, outcome: str = ""
) -> float | None:
    return samples.get((name, table, outcome))


def _run(server: Server, table: str) -> dict[str, Any]:
    before = datetime.now(UTC).isoformat()
    r = server.http().post(f"/v1/sync/{table}/run")
    assert r.status_code == 202, r.text
    return wait_for(server, table, after=before)


def _start(data_dir: Path, emu: Emulator, src: Source) -> Server:
    tables = [
        {"source": src.name("EVENTS"), "target": "m.events", "mode": "append", "cursor": "UPDATED_AT",
         "interval_seconds": 600},
        {"source": src.name("EVENTS"), "target": "m.slow", "primary_key": ["ID"], "batch_rows": 200,
         "interval_seconds": 900},
        {"source": src.name("MISSING"), "target": "m.missing", "interval_seconds": 300},
    ]  # fmt: skip
    return start_server(
        data_dir,
        snowflake=emu.snowflake_section(),
        sync={"enabled": False, "retry_seconds": 0, "tables": tables},
    )


def test_sync_runs_update_the_metrics_and_state_survives_a_restart(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu, "MET")
    src.execute(
        "CREATE TABLE EVENTS (ID NUMBER(38,0), UPDATED_AT TIMESTAMP_NTZ)",
        f"INSERT INTO EVENTS SELECT SEQ4(), '2024-03-01 12:00:00'::TIMESTAMP_NTZ "
        f"FROM TABLE(GENERATOR(ROWCOUNT => {ROWS}))",
    )
    server = _start(tmp_path / "data", emu, src)
    try:
        first = _samples(server)
        for table, interval in (("m.events", 600), ("m.slow", 900), ("m.missing", 300)):
            assert _get(first, "quiver_sync_interval_seconds", table) == interval
            assert _get(first, "quiver_sync_last_success_timestamp_seconds", table) == 0
            assert _get(first, "quiver_sync_lag_seconds", table) is None  # never synced: no lag
            assert _get(first, "quiver_sync_runs_total", table, "ok") == 0
            assert _get(first, "quiver_sync_running", table) == 0

        assert _run(server, "m.events")["last_run"]["outcome"] == "ok"
        assert _run(server, "m.missing")["last_run"]["outcome"] == "failed"
        after = _samples(server)
        assert _get(after, "quiver_sync_runs_total", "m.events", "ok") == 1
        assert _get(after, "quiver_sync_runs_total", "m.events", "failed") == 0
        assert _get(after, "quiver_sync_rows_read_total", "m.events") == ROWS
        assert _get(after, "quiver_sync_rows_written_total", "m.events") == ROWS
        success = _get(after, "quiver_sync_last_success_timestamp_seconds", "m.events")
        assert success is not None and success > 0
        lag = _get(after, "quiver_sync_lag_seconds", "m.events")
        assert lag is not None and lag >= 0
        assert _get(after, "quiver_sync_watermark_timestamp_seconds", "m.events") == (
            datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()
        )
        assert _get(after, "quiver_sync_consecutive_failures", "m.events") == 0
        assert _get(after, "quiver_sync_runs_total", "m.missing", "failed") == 1
        assert _get(after, "quiver_sync_consecutive_failures", "m.missing") == 1
        assert _get(after, "quiver_sync_last_success_timestamp_seconds", "m.missing") == 0
        assert _get(after, "quiver_sync_lag_seconds", "m.missing") is None
        # Never synced: no watermark time.
        assert _get(after, "quiver_sync_watermark_timestamp_seconds", "m.missing") is None

        # New rows with a later cursor: the watermark moves, the counters add up.
        src.execute(
            "INSERT INTO EVENTS SELECT 100000 + SEQ4(), '2024-03-02 00:00:00'::TIMESTAMP_NTZ "
            "FROM TABLE(GENERATOR(ROWCOUNT => 10))"
        )
        assert _run(server, "m.events")["last_run"]["outcome"] == "ok"
        assert _run(server, "m.missing")["last_run"]["outcome"] == "failed"
        again = _samples(server)
        assert _get(again, "quiver_sync_runs_total", "m.events", "ok") == 2
        assert _get(again, "quiver_sync_rows_read_total", "m.events") == ROWS + 10
        assert _get(again, "quiver_sync_watermark_timestamp_seconds", "m.events") == (
            datetime(2024, 3, 2, tzinfo=UTC).timestamp()
        )
        newer = _get(again, "quiver_sync_last_success_timestamp_seconds", "m.events")
        assert newer is not None and newer >= success
        assert _get(again, "quiver_sync_consecutive_failures", "m.missing") == 2
    finally:
        server.stop()

    # A restart: what the catalog keeps is the same, the per-process counters start over.
    restarted = _start(tmp_path / "data", emu, src)
    try:
        s = _samples(restarted)
        assert _get(s, "quiver_sync_last_success_timestamp_seconds", "m.events") == newer
        assert _get(s, "quiver_sync_consecutive_failures", "m.missing") == 2
        assert _get(s, "quiver_sync_watermark_timestamp_seconds", "m.events") == (
            datetime(2024, 3, 2, tzinfo=UTC).timestamp()
        )
        assert _get(s, "quiver_sync_runs_total", "m.events", "ok") == 0
        assert _get(s, "quiver_sync_rows_read_total", "m.events") == 0
    finally:
        restarted.stop()


def test_scrapes_race_a_running_load(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu, "MRACE")
    src.execute(
        "CREATE TABLE EVENTS (ID NUMBER(38,0), UPDATED_AT TIMESTAMP_NTZ)",
        f"INSERT INTO EVENTS SELECT SEQ4(), '2024-03-01 12:00:00'::TIMESTAMP_NTZ "
        f"FROM TABLE(GENERATOR(ROWCOUNT => {ROWS}))",
    )
    server = _start(tmp_path / "data", emu, src)
    try:
        statuses: list[int] = []
        saw_running: list[float] = []
        stop = threading.Event()

        def scrape() -> None:
            http = server.http()
            while not stop.is_set():
                r = http.get("/metrics")
                statuses.append(r.status_code)
                for line in r.text.splitlines():
                    if line.startswith('quiver_sync_running{table="m.slow"}'):
                        saw_running.append(float(line.split()[-1]))

        threads = [threading.Thread(target=scrape) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            done = _run(server, "m.slow")
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert done["last_run"]["outcome"] == "ok"
        assert statuses and set(statuses) == {200}
        assert 1.0 in saw_running  # a scrape during the load saw it running
        final = _samples(server)
        assert _get(final, "quiver_sync_running", "m.slow") == 0
        assert _get(final, "quiver_sync_rows_written_total", "m.slow") == ROWS
    finally:
        server.stop()
