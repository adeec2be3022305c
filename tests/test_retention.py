"""``[audit] retention_days`` (catalog/retention.py): old audit events and long-expired token
records are deleted, in batches, by the housekeeping pass; everything recent or live stays.
Old rows are written straight into the real DuckDB file; the clock is injected (no sleeps)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from catalog import Catalog, ConfigError
from catalog.config import load_config
from tests.harness import Server, make_config, start_server, wait_until

NOW = datetime.now(UTC)


def _seed_old_rows(db_path: Path, *, old_events: int, recent_events: int) -> dict[str, list[str]]:
    """Audit events 40 days old and 1 day old, and token records that expired 40 days ago,
    1 day ago, or are live -- written into the file directly, as months of running would."""
    con = duckdb.connect(str(db_path))
    try:
        rows = [(NOW - timedelta(days=40, minutes=i), "auth.failure") for i in range(old_events)]
        rows += [(NOW - timedelta(days=1, minutes=i), "auth.failure") for i in range(recent_events)]
        con.executemany(
            "INSERT INTO _quiver.audit (occurred_at, actor, action, target, outcome, client, request_id, detail) "
            "VALUES (?, NULL, ?, NULL, 'denied', '203.0.113.7', NULL, NULL)",
            rows,
        )
        jtis: dict[str, list[str]] = {"old": [], "recent": [], "live": []}
        for group, expires in (
            ("old", NOW - timedelta(days=40)),
            ("recent", NOW - timedelta(days=1)),
            ("live", NOW + timedelta(days=1)),
        ):
            for _ in range(3):
                jti = uuid.uuid4().hex
                jtis[group].append(jti)
                con.execute(
                    "INSERT INTO _quiver.tokens (jti, kind, swarm, agent, created_at, expires_at, revoked_at, "
                    "last_used_at, created_by, parent_jti, root_jti, swarm_id, legacy) "
                    "VALUES (?, 'admin', NULL, NULL, ?, ?, NULL, NULL, 'test', NULL, ?, NULL, false)",
                    [jti, expires - timedelta(days=30), expires, jti],
                )
    finally:
        con.close()
    return jtis


def _counts(catalog: Catalog) -> tuple[int, int, int]:
    with catalog.db.reading() as cur:
        old = cur.execute(
            "SELECT count(*) FROM _quiver.audit WHERE occurred_at < ?", [NOW - timedelta(days=30)]
        ).fetchall()[0][0]
        recent = cur.execute(
            "SELECT count(*) FROM _quiver.audit WHERE occurred_at >= ?", [NOW - timedelta(days=30)]
        ).fetchall()[0][0]
        tokens = cur.execute("SELECT count(*) FROM _quiver.tokens").fetchall()[0][0]
    return int(old), int(recent), int(tokens)


def _jtis(catalog: Catalog) -> set[str]:
    with catalog.db.reading() as cur:
        return {r[0] for r in cur.execute("SELECT jti FROM _quiver.tokens").fetchall()}


def test_old_audit_events_and_long_expired_token_records_are_pruned(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", audit={"retention_days": 30})
    Catalog(config).close()  # creates and migrates the file
    jtis = _seed_old_rows(config.database_path, old_events=25, recent_events=7)
    catalog = Catalog(config)
    try:
        catalog.audit.record("auth.failure", outcome="denied", client="198.51.100.1")  # buffered, new
        assert _counts(catalog) == (25, 7, 9)
        # Small batches: the loop, not one DELETE, does the work.
        assert catalog.audit.prune(NOW - timedelta(days=30), batch=4) == 25
        report = catalog.retention.run(now=NOW)
        assert report.cutoff is not None and report.audit_events == 0 and report.token_records == 3
        assert _counts(catalog)[:2] == (0, 7)
        assert _jtis(catalog) == set(jtis["recent"] + jtis["live"])
        # The buffered event is flushed afterwards, untouched.
        events = catalog.audit.query(action="auth.failure", limit=100)
        assert len(events) == 8 and any(e.client == "198.51.100.1" for e in events)
        # A second pass finds nothing more.
        again = catalog.retention.run(now=NOW)
        assert (again.audit_events, again.token_records) == (0, 0)
        text = catalog.metrics.render().decode()
        assert 'quiver_retention_deleted_total{table="tokens"} 3.0' in text
    finally:
        catalog.close()


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", audit={"retention_days": 0})
    Catalog(config).close()
    _seed_old_rows(config.database_path, old_events=5, recent_events=2)
    catalog = Catalog(config)
    try:
        report = catalog.retention.run(now=NOW + timedelta(days=3650))
        assert report.cutoff is None and (report.audit_events, report.token_records) == (0, 0)
        assert _counts(catalog) == (5, 2, 9)
    finally:
        catalog.close()


def test_the_default_retention_is_90_days_and_bad_values_are_refused() -> None:
    assert load_config(None, environ={}).audit.retention_days == 90
    assert load_config(None, environ={"QUIVER_AUDIT_RETENTION_DAYS": "7"}).audit.retention_days == 7
    for bad in (-1, "ninety", 1.5, 100_000):
        with pytest.raises(ConfigError) as exc:
            load_config(None, environ={}, overrides={"audit": {"retention_days": bad}})
        assert "audit.retention_days" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, environ={}, overrides={"audit": {"retention": 3}})
    assert "retention" in str(exc.value)


def test_live_chains_keep_their_rows_and_revocation_still_works(fresh_server: Server) -> None:
    """Pruning never removes a record a live token's lineage needs: a chain whose root is
    live keeps every member, and revoking it afterwards still reaches the whole chain."""
    server = fresh_server
    swarm = server.mint("swarm", "demo")
    agent = server.http(swarm).post("/v1/tokens", json={"kind": "agent", "agent": "kept"}).json()
    refreshed = server.http(agent["token"]).post("/v1/tokens/refresh", json={}).json()
    catalog = server.catalog
    before = _jtis(catalog)
    report = catalog.retention.run(now=NOW)  # nothing of this server is 90 days old
    assert report.token_records == 0 and _jtis(catalog) == before
    r = server.http().delete(f"/v1/tokens/{agent['jti']}")
    assert r.status_code in (200, 204), r.text
    for token in (agent["token"], refreshed["token"]):
        assert server.http(token).get("/v1/whoami").status_code == 401


def test_the_housekeeping_pass_prunes_on_a_running_server_while_requests_write_audit(tmp_path: Path) -> None:
    """The server's own housekeeping (Catalog.maintain, first pass) prunes rows written into
    its database, while threads hammer it with bad tokens (audit writes) at the same time."""
    data = tmp_path / "data"
    config = make_config(data, audit={"retention_days": 30})
    Catalog(config).close()
    _seed_old_rows(config.database_path, old_events=300, recent_events=3)
    server = start_server(data, demo=False, audit={"retention_days": 30})
    try:
        stop = threading.Event()
        statuses: list[int] = []

        def noise() -> None:
            client = server.http("not-a-token")
            while not stop.is_set():
                statuses.append(client.get("/v1/status").status_code)

        threads = [threading.Thread(target=noise) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(statuses) >= 10, 30, 0.01, what="the first hammer calls")
            server.catalog.maintain()
            assert server.catalog.retention.run_if_due() is None  # throttled: once an hour
            seen = len(statuses)
            wait_until(lambda: len(statuses) >= seen + 10, 30, 0.01, what="hammer calls after the pass")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert statuses and set(statuses) == {401}
        server.catalog.audit.flush()
        old, recent, _ = _counts(server.catalog)
        assert old == 0 and recent >= 3 + len(statuses)
    finally:
        server.stop()
