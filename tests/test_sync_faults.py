"""Bad input and faults: each run fails with a clear recorded error, the previous replica stays
complete and readable, the watermark does not move, and the next run catches up. Secrets
never reach logs, status or errors."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import structlog

from catalog import TableRef
from catalog.status import SyncTable
from sync import SyncService
from sync.context import ProgressFn
from tests.sync_emulator import (
    Emulator,
    EmulatorProcess,
    Source,
    free_port,
    replica,
    require_password,
    sync_service,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def events(emu: Emulator) -> Source:
    src = Source(emu, "FAULTS")
    src.execute("CREATE TABLE EVENTS (EVENT_ID NUMBER(38,0), KIND VARCHAR)")
    src.execute("INSERT INTO EVENTS SELECT SEQ4() + 1, 'seed' FROM TABLE(GENERATOR(ROWCOUNT => 100))")
    return src


def _failed_and_recorded(service: SyncService, message: str) -> SyncTable:
    status = service.status().tables[0]
    assert status.last_run is not None and status.last_run.outcome == "failed"
    assert message in (status.last_run.error or "")
    assert status.running is False
    history = service.history(status.table)
    assert history[0]["outcome"] == "failed" and message in history[0]["error"]
    return status


def test_unknown_source_table(emu: Emulator, events: Source, tmp_path: Path) -> None:
    table = {"source": events.name("NOPE"), "target": "f.nope"}
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert run.outcome == "failed"
        assert run.error == (
            f"source table {events.database}.PUBLIC.NOPE does not exist or is not visible to this user/role "
            f"(check sync.tables source = '{events.name('NOPE')}')"
        )
        _failed_and_recorded(service, "does not exist")
        assert replica(service, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'nope'") == [(0,)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mode": "append", "cursor": "UPDATED_AT"}, "cursor column 'UPDATED_AT' not found in"),
        (
            {"mode": "merge", "cursor": "EVENT_ID", "primary_key": ["ID"]},
            "primary_key column 'ID' not found in",
        ),
    ],
)
def test_missing_cursor_or_key_column(
    emu: Emulator, events: Source, tmp_path: Path, extra: dict[str, object], message: str
) -> None:
    table = {"source": events.name("EVENTS"), "target": "f.events", **extra}
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert run.outcome == "failed"
        assert message in (run.error or "") and "(columns: EVENT_ID, KIND)" in (run.error or "")
        _failed_and_recorded(service, message)


def test_wrong_credentials_fail_at_once_and_the_password_never_shows(
    emu: Emulator, events: Source, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55word-never-shown"
    table = {"source": events.name("EVENTS"), "target": "f.creds"}
    caplog.set_level(logging.DEBUG)
    with (
        require_password("the-right-one"),
        structlog.testing.capture_logs() as logs,
        sync_service(tmp_path, emu, [table], snowflake={"password": secret}, retry_seconds=30) as service,
    ):
        (run,) = service.run_now()
        assert run.outcome == "failed"
        assert "Incorrect username or password" in (run.error or "")
        status = _failed_and_recorded(service, "cannot connect to Snowflake")
        history = service.history("f.creds")
        audit = service.catalog.audit.query(limit=1000)
    # Refused credentials are not retried (retry_seconds = 30 would otherwise keep trying).
    assert not [e for e in logs if e.get("event") == "sync.run.retrying"]
    everything = repr(logs) + caplog.text + repr(status) + repr(history) + repr(audit) + repr(run)
    assert secret not in everything
    assert any(e.get("event") == "sync.run.failed" for e in logs)


def test_password_file_is_read_and_never_shown(emu: Emulator, events: Source, tmp_path: Path) -> None:
    secret = "file-secret-0123456789"
    path = tmp_path / "sf.password"
    path.write_text(secret + "\n")
    table = {"source": events.name("EVENTS"), "target": "f.pwfile"}
    snowflake = {"password": None, "password_file": str(path)}
    with (
        require_password(secret),
        structlog.testing.capture_logs() as logs,
        sync_service(tmp_path / "data", emu, [table], snowflake=snowflake) as service,
    ):
        (run,) = service.run_now()
        assert run.outcome == "ok", run.error
    assert secret not in repr(logs)


def test_unreachable_host_is_retried_with_the_error_in_status_then_fails(
    emu: Emulator, events: Source, tmp_path: Path
) -> None:
    table = {"source": events.name("EVENTS"), "target": "f.unreachable"}
    closed = {"port": free_port(), "login_timeout": 2, "network_timeout": 2, "socket_timeout": 2}
    with sync_service(tmp_path, emu, [table], snowflake=closed, retry_seconds=3) as service:
        seen: list[SyncTable] = []
        worker = threading.Thread(target=service.run_now)
        worker.start()
        while worker.is_alive():
            t = service.status().tables[0]
            if t.running and t.last_run and t.last_run.error:
                seen.append(t)
            time.sleep(0.05)
        worker.join()
        assert seen, "status never showed the error while the run was retrying"
        assert seen[0].last_run is not None and seen[0].last_run.outcome == "running"
        assert "cannot connect to Snowflake" in (seen[0].last_run.error or "")
        _failed_and_recorded(service, "cannot connect to Snowflake")


def test_source_killed_mid_load_leaves_the_replica_and_watermark_then_catches_up(tmp_path: Path) -> None:
    """fakesnow as a child process, killed after the first page of a load."""
    seed = [
        "CREATE DATABASE IF NOT EXISTS KILL",
        "CREATE SCHEMA IF NOT EXISTS KILL.PUBLIC",
        "CREATE TABLE IF NOT EXISTS KILL.PUBLIC.EVENTS (EVENT_ID NUMBER(38,0), KIND VARCHAR)",
    ]

    def start(port: int | None, rows: int) -> EmulatorProcess:
        e = EmulatorProcess(port)
        e.execute(*seed[:2])
        e.execute(
            seed[2],
            f"INSERT INTO KILL.PUBLIC.EVENTS SELECT SEQ4() + 1, 'e' FROM TABLE(GENERATOR(ROWCOUNT => {rows}))",
            database="KILL",
        )
        return e

    first = start(None, 1000)
    table = {
        "source": "KILL.PUBLIC.EVENTS",
        "target": "k.events",
        "mode": "append",
        "cursor": "EVENT_ID",
        "batch_rows": 2000,
    }
    timeouts = {"login_timeout": 3, "network_timeout": 3, "socket_timeout": 3}
    try:
        with sync_service(tmp_path, first, [table], snowflake=timeouts, retry_seconds=1) as service:
            (run,) = service.run_now()
            assert run.outcome == "ok" and run.rows_written == 1000
            version = service.catalog.tables.version(TableRef("k", "events"))
            first.execute(
                "INSERT INTO KILL.PUBLIC.EVENTS SELECT SEQ4() + 1001, 'more' FROM TABLE(GENERATOR(ROWCOUNT => 20000))",
                database="KILL",
            )

            def kill_after_first_page(_table: str) -> ProgressFn:
                return lambda _rows, _b, _t: first.kill()

            (run,) = service.run_now(progress=kill_after_first_page)
            assert run.outcome == "failed"
            assert run.error and (
                "reading from the source failed" in run.error
                or "source query failed" in run.error
                or "cannot connect" in run.error
            )
            # The previous replica: complete, readable; the watermark and version unchanged.
            assert replica(service, "SELECT count(*), max(event_id) FROM k.events") == [(1000, 1000)]
            status = service.status().tables[0]
            assert status.watermark == "1000"
            assert status.last_run is not None and status.last_run.outcome == "failed"
            assert service.catalog.tables.version(TableRef("k", "events")) == version
        # The source comes back (same port, same data): the next run catches up exactly.
        second = start(first.port, 21000)
        try:
            with sync_service(tmp_path, second, [table], retry_seconds=10) as service:
                (run,) = service.run_now()
                assert run.outcome == "ok" and run.rows_written == 20000
                assert replica(
                    service, "SELECT count(*), count(DISTINCT event_id), max(event_id) FROM k.events"
                ) == [(21000, 21000, 21000)]
        finally:
            second.kill()
    finally:
        first.kill()


def test_unreadable_password_file_fails_the_run_clearly(
    emu: Emulator, events: Source, tmp_path: Path
) -> None:
    table = {"source": events.name("EVENTS"), "target": "f.nofile"}
    missing = tmp_path / "no-such.password"
    with sync_service(
        tmp_path / "data", emu, [table], snowflake={"password": None, "password_file": str(missing)}
    ) as service:
        (run,) = service.run_now()
        assert run.outcome == "failed"
        assert run.error == f"snowflake.password_file: cannot read {missing}: No such file or directory"


def test_key_pair_settings_reach_the_connector(tmp_path: Path) -> None:
    """Key-pair auth cannot run against the emulator (it accepts anything); check what the
    connector is given: the key file, its passphrase (from its file) and the JWT authenticator."""
    from catalog.config import SnowflakeConfig
    from sync.source import SnowflakeSource

    key, passphrase = tmp_path / "rsa_key.p8", tmp_path / "passphrase"
    key.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    passphrase.write_text("pass-phrase\n")
    config = SnowflakeConfig(
        account="acme", user="q", private_key_file=str(key), private_key_passphrase_file=str(passphrase)
    )
    source = SnowflakeSource(config)
    args = source._connect_args()
    assert args["private_key_file"] == str(key)
    assert args["private_key_file_pwd"] == "pass-phrase"
    assert args["authenticator"] == "SNOWFLAKE_JWT"
    assert "password" not in args
    assert (args["login_timeout"], args["network_timeout"], args["socket_timeout"]) == (30.0, 30.0, 30.0)
    assert source.scrub("failed with pass-phrase inside") == "failed with [redacted] inside"


def test_source_failures_are_the_one_sync_failure_type(tmp_path: Path) -> None:
    """The source and the run share one failure type: what the source raises is a
    ``SyncFailed`` whose ``transient`` flag the run's retry loop reads (no second type)."""
    import sync
    from catalog.config import SnowflakeConfig
    from sync.source import SnowflakeSource, is_transient

    missing = tmp_path / "no-such-password"
    source = SnowflakeSource(SnowflakeConfig(account="acme", user="q", password_file=str(missing)))
    with pytest.raises(sync.SyncFailed) as e:
        source.connect()
    assert e.value.message == f"snowflake.password_file: cannot read {missing}: No such file or directory"
    assert e.value.transient is False and not is_transient(e.value)
    assert is_transient(sync.SyncFailed("source query failed: timed out", transient=True))
    assert not hasattr(sync, "SourceError")
