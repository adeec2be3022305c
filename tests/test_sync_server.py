"""Sync inside ``quiver serve``: GET /v1/sync, POST /v1/sync/{table}/run (202, one follow-up,
404, 401/403), the scheduler, Flight serving during a load, and the ``quiver sync`` CLI
(against a running server and on its own)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.flight as flight
import pytest
import structlog

from catalog.status import Status, SyncSection, SyncStatus
from quiver.cli import main
from tests.harness import Server, call_options, start_server, wait_until
from tests.sync_emulator import Emulator, Source, sync_service

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def src(emu: Emulator) -> Source:
    s = Source(emu, "SRV")
    s.execute("CREATE TABLE ORDERS (ID NUMBER(38,0), STATUS VARCHAR, UPDATED_AT NUMBER(38,0))")
    s.execute("INSERT INTO ORDERS SELECT SEQ4(), 'placed', 1 FROM TABLE(GENERATOR(ROWCOUNT => 20000))")
    return s


def _tables(src: Source) -> list[dict[str, Any]]:
    return [
        {"source": src.name("ORDERS"), "target": "sales.orders", "mode": "merge", "cursor": "UPDATED_AT",
         "primary_key": ["ID"], "interval_seconds": 3600},
        # Many small pages: a run that lasts long enough to trigger it while it runs.
        {"source": src.name("ORDERS"), "target": "sales.slow", "primary_key": ["ID"], "batch_rows": 400,
         "interval_seconds": 3600},
        {"source": src.name("MISSING"), "target": "sales.missing", "interval_seconds": 3600},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def server(emu: Emulator, src: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("sync-server"),
        snowflake=emu.snowflake_section(),
        sync={"enabled": False, "retry_seconds": 0, "tables": _tables(src)},
    )
    yield s
    s.stop()


def table_status(server: Server, table: str) -> dict[str, Any]:
    """``table``'s entry of GET /v1/sync."""
    tables = server.http().get("/v1/sync").json()["tables"]
    return next(t for t in tables if t["table"] == table)


def wait_for(server: Server, table: str, *, after: str = "", timeout: float = 60) -> dict[str, Any]:
    """``table``'s status once a run started after ``after`` has finished."""

    def finished() -> dict[str, Any] | None:
        t = table_status(server, table)
        started = (t["last_run"] or {}).get("started_at") or ""
        return t if not t["running"] and started > after else None

    return wait_until(finished, timeout, what=f"a finished run of {table}")


def history(server: Server, table: str) -> list[dict[str, Any]]:
    sync = server.runtime.sync
    assert sync is not None
    return sync.history(table, 100)


def test_status_json_is_the_documented_shape(server: Server) -> None:
    r = server.http().get("/v1/sync")
    assert r.status_code == 200
    tables = r.json()["tables"]
    assert [t["table"] for t in tables] == ["sales.orders", "sales.slow", "sales.missing"]
    for t in tables:
        assert set(t) == {"table", "source", "mode", "watermark", "running", "next_run_at", "last_run"}
    assert tables[0]["source"].endswith(".PUBLIC.ORDERS") and tables[0]["mode"] == "merge"


def test_run_answers_202_and_the_replica_is_served_over_flight(server: Server) -> None:
    r = server.http().post("/v1/sync/sales.orders/run")
    assert r.status_code == 202
    assert r.json() == {"table": "sales.orders", "queued": True, "follow_up": False, "full": False}
    t = wait_for(server, "sales.orders")
    assert t["last_run"]["outcome"] == "ok" and t["last_run"]["rows_written"] == 20000
    assert t["watermark"] == "1"
    assert set(t["last_run"]) == {"started_at", "ended_at", "rows_read", "rows_written", "outcome", "error"}
    client = server.flight()
    info = client.get_flight_info(
        flight.FlightDescriptor.for_path("sales", "orders"), call_options(server.admin_token)
    )
    assert (
        client.do_get(info.endpoints[0].ticket, call_options(server.admin_token)).read_all().num_rows == 20000
    )
    audit = server.http().get("/v1/audit", params={"action": "sync.run"}).json()["events"]
    assert audit[0]["target"] == "sales.orders" and audit[0]["outcome"] == "ok"
    # The answers are the control plane's Structs (what a client such as sync_cli decodes into).
    typed = msgspec.json.decode(server.http().get("/v1/sync").content, type=SyncStatus, strict=True)
    orders = next(t for t in typed.tables if t.table == "sales.orders")
    assert orders.last_run is not None and orders.last_run.rows_written == 20000
    status = msgspec.json.decode(server.http().get("/v1/status").content, type=Status, strict=True)
    assert isinstance(status.sync, SyncSection) and status.sync.tables == typed.tables
    assert isinstance(status.sync.configured, msgspec.UnsetType)  # {"tables": [...]}, as before


def test_a_trigger_while_running_queues_exactly_one_follow_up(server: Server) -> None:
    http = server.http()
    before = len(history(server, "sales.slow"))
    assert http.post("/v1/sync/sales.slow/run").status_code == 202
    wait_until(lambda: table_status(server, "sales.slow")["running"], 30, 0.01, "sales.slow to run")
    answers = [http.post("/v1/sync/sales.slow/run").json() for _ in range(3)]
    assert all(a["follow_up"] for a in answers), answers
    # The Flight listener keeps serving while the load runs.
    client = server.flight()
    opts = call_options(server.demo_token)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "orders"), opts)
    assert client.do_get(info.endpoints[0].ticket, opts).read_all().num_rows == 20000
    wait_until(lambda: len(history(server, "sales.slow")) >= before + 2, 60, what="the follow-up run")
    after = wait_for(server, "sales.slow")
    # Nothing is queued: a third run (if one were wrongly queued) would show as running, or as
    # pending with a next_run_at (the scheduler is disabled here, so nothing else sets one).
    assert not after["running"] and after["next_run_at"] is None, after
    runs = history(server, "sales.slow")
    assert len(runs) == before + 2, runs
    assert [(r["outcome"], r["error"]) for r in runs[:2]] == [("ok", None), ("ok", None)]


def test_unknown_table_is_404_and_failures_are_recorded(server: Server) -> None:
    r = server.http().post("/v1/sync/sales.nope/run")
    assert r.status_code == 404
    assert r.json()["error"] == "NOT_FOUND"
    assert "no sync table 'sales.nope'" in r.json()["detail"] and "sales.orders" in r.json()["detail"]
    assert server.http().post("/v1/sync/sales.missing/run").status_code == 202
    t = wait_for(server, "sales.missing")
    assert t["last_run"]["outcome"] == "failed" and "does not exist" in t["last_run"]["error"]


def test_sync_routes_need_an_admin_token(server: Server) -> None:
    assert server.http(None).get("/v1/sync").status_code == 401
    assert server.http(None).post("/v1/sync/sales.orders/run").status_code == 401
    agent = server.mint()
    r = server.http(agent).post("/v1/sync/sales.orders/run")
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    assert server.http(agent).get("/v1/sync").status_code == 403


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """The CLI configures structlog for its own stderr; give the server threads theirs back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def summaries(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The CLI's one-line summaries (stdout also carries log lines in tests)."""
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("sales.")]


def _write_config(path: Path, server: Server, emu: Emulator, tables: list[dict[str, Any]]) -> Path:
    port = server.http_url.rsplit(":", 1)[1]
    sf = emu.snowflake_section()
    lines = [
        "[server]",
        f'data_dir = "{server.data_dir}"',
        f"http_port = {port}",
        "[snowflake]",
        *(f"{k} = {v!r}".replace("'", '"') for k, v in sf.items()),
    ]
    for t in tables:
        lines.append("[[sync.tables]]")
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in t.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_talks_to_the_running_server(server: Server, emu: Emulator, src: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    config = _write_config(tmp_path / "quiver.toml", server, emu, _tables(src))
    assert main(["sync", "run", "--config", str(config), "--table", "sales.orders"]) == 0
    assert summaries(capsys)[0].startswith("sales.orders: ok (merge)")
    assert main(["sync", "run", "--config", str(config), "--table", "sales.missing"]) == 1
    assert summaries(capsys)[0].startswith("sales.missing: FAILED")
    assert main(["sync", "status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "sales.orders" in out and "sales.missing" in out and "does not exist" in out


def test_cli_runs_locally_without_a_server(emu: Emulator, src: Source, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    tables = _tables(src)[::2]  # orders (ok) and missing (fails)
    with sync_service(tmp_path / "data", emu, tables):
        pass  # creates the catalog; nothing listens on its port
    config = tmp_path / "quiver.toml"
    lines = ["[server]", f'data_dir = "{tmp_path / "data"}"', "http_port = 1", "[snowflake]"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in emu.snowflake_section().items()]
    for t in tables:
        lines += ["[[sync.tables]]", *(f"{k} = {v!r}".replace("'", '"') for k, v in t.items())]
    config.write_text("\n".join(lines) + "\n")
    assert main(["sync", "run", "--config", str(config), "--table", "sales.orders"]) == 0
    assert summaries(capsys)[0].startswith("sales.orders: ok (full) read 20,000 rows, wrote 20,000")
    assert main(["sync", "run", "--config", str(config)]) == 1
    out = summaries(capsys)
    assert out[0].startswith("sales.orders: ok (merge)") and out[1].startswith("sales.missing: FAILED")
    assert main(["sync", "run", "--config", str(config), "--table", "sales.other"]) == 1
    assert "no sync table 'sales.other'" in capsys.readouterr().err
    assert main(["sync", "status", "--config", str(config), "--json"]) == 0


def test_scheduler_runs_due_tables_and_resumes_from_the_last_start(
    emu: Emulator, src: Source, tmp_path: Path
) -> None:
    table = {**_tables(src)[0], "interval_seconds": 3600}
    broken = {**_tables(src)[2], "interval_seconds": 3600}
    with sync_service(tmp_path, emu, [table, broken], enabled=True) as service:
        service.start()  # never synced: both due at once; the broken one does not hold up the other
        wait_until(
            lambda: all(
                t.last_run is not None and t.last_run.outcome in ("ok", "failed")
                for t in service.status().tables
            ),
            30,
            what="both tables to have run",
        )
        good, bad = service.status().tables
        assert good.last_run is not None and good.last_run.outcome == "ok"
        assert bad.last_run is not None and bad.last_run.outcome == "failed"
        started = good.last_run.started_at
    with sync_service(tmp_path, emu, [table, broken], enabled=True, jitter=0.1) as service:
        service.start()
        t = service.status().tables[0]
        assert t.next_run_at is not None and t.last_run is not None
        due = datetime.fromisoformat(t.next_run_at).timestamp() - datetime.fromisoformat(started).timestamp()
        assert 3600 <= due <= 3600 * 1.1
        assert t.last_run.started_at == started  # not run again at start-up
