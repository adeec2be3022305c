"""Snowflake's table and column comments reach the agents through the sync: against the
emulator through the real connector, into a real DuckDB file. What arrives, that an admin's
description wins (and survives full runs), that a changed comment updates and a removed one
clears, that a long or hostile comment is bounded and harmless, that nothing else about a run
changes, and that every listing agents read (ListFlights, GET /v1/tables, MCP) shows them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from catalog import TableRef
from catalog.descriptions import CUT_MARK, MAX_DESCRIPTION, SourceComments, clean_comment
from quiver_client import QuiverClient
from sync.errors import SyncFailed
from sync.source import SnowflakeSource
from tests.harness import Server, start_server
from tests.sync_emulator import Emulator, Source, replica, sync_service
from tests.test_mcp import ok, tool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ORDERS = "CREATE TABLE ORDERS (ID NUMBER(38,0), STATUS VARCHAR, UPDATED_AT NUMBER(38,0)) COMMENT = '{}'"
HOSTILE = 'it\'s "quoted"; DROP TABLE sales.orders; --\r\nsecond line\x00\x1b[31m'


def orders(emu: Emulator, table_comment: str = "One row per order.") -> Source:
    src = Source(emu, "CMT")
    src.execute(ORDERS.format(table_comment), "INSERT INTO ORDERS VALUES (1, 'placed', 1), (2, 'paid', 1)")
    src.comment_on_column("ORDERS", "STATUS", "Lifecycle state")
    return src


def entry(src: Source, mode: str = "full") -> dict[str, Any]:
    table: dict[str, Any] = {"source": src.name("ORDERS"), "target": "sales.orders", "mode": mode}
    if mode != "full":
        table.update(cursor="UPDATED_AT", primary_key=["ID"])
    return table


REF = TableRef("sales", "orders")


def texts(service: Any) -> tuple[str, dict[str, str]]:
    """What agents read for sales.orders: the one answer every listing serves."""
    d = service.catalog.descriptions.of([REF])[REF.key()]
    return d.table, d.columns


def test_comments_arrive_with_the_first_run(emu: Emulator, tmp_path: Path) -> None:
    src = orders(emu)
    with sync_service(tmp_path, emu, [entry(src)]) as service:
        (run,) = service.run_now()
        assert run.outcome == "ok", run.error
        assert texts(service) == ("One row per order.", {"status": "Lifecycle state"})


@pytest.mark.parametrize("mode", ["full", "merge"])
def test_a_changed_comment_updates_and_a_removed_one_clears(emu: Emulator, tmp_path: Path, mode: str) -> None:
    src = orders(emu)
    src.comment_on_column("ORDERS", "ID", "Order number")
    with sync_service(tmp_path, emu, [entry(src, mode)]) as service:
        service.run_now()
        assert texts(service) == ("One row per order.", {"id": "Order number", "status": "Lifecycle state"})
        src.execute("COMMENT ON TABLE ORDERS IS 'One row per order, since 2020.'")
        src.comment_on_column("ORDERS", "STATUS", "placed, paid or shipped")
        src.comment_on_column("ORDERS", "ID", None)
        (run,) = service.run_now()
        assert run.outcome == "ok", run.error
        assert texts(service) == ("One row per order, since 2020.", {"status": "placed, paid or shipped"})
        src.execute("COMMENT ON TABLE ORDERS IS ''")  # fakesnow has no UNSET COMMENT
        src.comment_on_column("ORDERS", "STATUS", None)
        service.run_now()
        assert texts(service) == ("", {})
        assert replica(service, "SELECT count(*) FROM _quiver.source_comments") == [(0,)]


@pytest.mark.parametrize("mode", ["full", "merge"])
def test_an_admin_description_wins_and_survives_later_runs(emu: Emulator, tmp_path: Path, mode: str) -> None:
    src = orders(emu)
    src.comment_on_column("ORDERS", "ID", "Order number")
    with sync_service(tmp_path, emu, [entry(src, mode)]) as service:
        service.run_now()
        answered = service.catalog.descriptions.set(REF, "Admin: orders", {"status": "Admin: state"})
        assert (answered.table, answered.columns) == (
            "Admin: orders",
            {"id": "Order number", "status": "Admin: state"},
        )
        src.execute("COMMENT ON TABLE ORDERS IS 'changed at the source'")
        src.comment_on_column("ORDERS", "STATUS", "changed at the source")
        for _ in range(2):  # a full run rebuilds the table: the admin's texts are carried over
            (run,) = service.run_now()
            assert run.outcome == "ok", run.error
            assert texts(service) == ("Admin: orders", {"id": "Order number", "status": "Admin: state"})
        # The admin removes their texts: the warehouse's show again.
        service.catalog.descriptions.set(REF, "", {"status": ""})
        assert texts(service) == (
            "changed at the source",
            {"id": "Order number", "status": "changed at the source"},
        )


def test_long_and_hostile_comments_are_bounded_and_harmless(emu: Emulator, tmp_path: Path) -> None:
    src = orders(emu, table_comment="x" * (3 * MAX_DESCRIPTION))
    src.comment_on_column("ORDERS", "STATUS", HOSTILE)
    src.comment_on_column("ORDERS", "ID", "y" * 100_000)
    with sync_service(tmp_path, emu, [entry(src)]) as service:
        (run,) = service.run_now()
        assert run.outcome == "ok", run.error
        table, columns = texts(service)
        assert len(table) == len(columns["id"]) == MAX_DESCRIPTION
        assert table.endswith(CUT_MARK) and table.startswith("x" * 100)
        assert columns["status"] == 'it\'s "quoted"; DROP TABLE sales.orders; --\nsecond line[31m'
        assert replica(service, "SELECT count(*) FROM sales.orders") == [(2,)]


def test_nothing_else_about_a_run_changes(emu: Emulator, tmp_path: Path) -> None:
    """The rows, the counts and the data version are what they were without comments: a
    comment that changed alone is no new data version."""
    src = orders(emu)
    with sync_service(tmp_path, emu, [entry(src, "merge")]) as service:
        (first,) = service.run_now()
        assert (first.outcome, first.mode, first.rows_read, first.rows_written) == ("ok", "full", 2, 2)
        version = service.catalog.tables.version(REF)
        with capture_logs() as logs:
            service.run_now()  # nothing changed: the stored comments are not rewritten
        assert not [e for e in logs if e["event"] == "sync.comments.changed"]
        src.execute("COMMENT ON TABLE ORDERS IS 'only the comment changed'")
        with capture_logs() as logs:
            (run,) = service.run_now()
        assert [e["columns"] for e in logs if e["event"] == "sync.comments.changed"] == [1]
        assert (run.outcome, run.mode, run.rows_read, run.rows_written, run.schema_changes) == (
            "ok",
            "merge",
            0,
            0,
            [],
        )
        assert service.catalog.tables.version(REF) == version
        assert texts(service)[0] == "only the comment changed"
        ours = replica(service, "SELECT id, status, updated_at FROM sales.orders ORDER BY id")
        assert ours == [tuple(r) for r in src.rows("SELECT * FROM ORDERS ORDER BY ID")]


def test_an_unreadable_table_comment_keeps_the_stored_one_and_the_run(
    emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = orders(emu)
    with sync_service(tmp_path, emu, [entry(src)]) as service:
        service.run_now()
        real = SnowflakeSource.rows

        def refuse_tables(self: SnowflakeSource, sql: str, params: list[Any] | None = None) -> Any:
            if "information_schema.tables" in sql:
                raise SyncFailed("source query failed: denied")
            return real(self, sql, params)

        monkeypatch.setattr(SnowflakeSource, "rows", refuse_tables)
        src.comment_on_column("ORDERS", "STATUS", "still read")
        (run,) = service.run_now()
        assert run.outcome == "ok", run.error
        assert texts(service) == ("One row per order.", {"status": "still read"})


def test_clean_comment() -> None:
    assert clean_comment(None) == clean_comment("  \n\t ") == ""
    assert clean_comment("a\r\nb\rc\x00\x7f\x85d\ud800") == "a\nb\ncd"
    assert clean_comment(" tab\there ") == "tab\there"
    cut = clean_comment("z" * (MAX_DESCRIPTION + 1))
    assert len(cut) == MAX_DESCRIPTION and cut.endswith(CUT_MARK)
    assert clean_comment("z" * MAX_DESCRIPTION) == "z" * MAX_DESCRIPTION
    assert clean_comment(cut) == cut
    unread = SourceComments.clean(None, {"a": None, "b": " ", "c": "kept"}, table_read=False)
    assert (unread.table, unread.columns) == (None, {"c": "kept"})


# --- every listing agents read ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(emu: Emulator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    src = orders(emu)
    s = start_server(
        tmp_path_factory.mktemp("sync-comments"),
        snowflake=emu.snowflake_section(),
        sync={"enabled": False, "retry_seconds": 0, "tables": [entry(src)]},
    )
    yield s
    s.stop()


def test_every_listing_shows_the_warehouse_comments_and_the_admins_win(server: Server) -> None:
    sync = server.runtime.sync
    assert sync is not None
    (run,) = sync.run_now(["sales.orders"])
    assert run.outcome == "ok", run.error
    admin = server.http()
    assert admin.post("/v1/swarms", json={"name": "sales", "tables": ["sales.*"]}).status_code == 201
    token = server.mint(swarm="sales", agent="reader")

    def listings() -> list[tuple[str, str]]:
        """(table text, status column text) as ListFlights, GET /v1/tables and MCP show them."""
        with QuiverClient(server.flight_url, token) as c:
            meta = {t.name: t for t in c.tables()}["sales.orders"]
        listed = {t["table"]: t for t in admin.get("/v1/tables").json()["tables"]}["sales.orders"]
        tables = {t["name"]: t for t in ok(tool(server, "list_tables", {}, token))["tables"]}
        described = ok(tool(server, "describe_table", {"table": "sales.orders"}, token))
        columns = {c["name"]: c["description"] for c in described["columns"]}
        return [
            (meta.description, meta.columns.get("status", "")),
            (listed["description"], listed["columns"].get("status", "")),
            (tables["sales.orders"]["description"], columns["status"]),
            (described["description"], columns["status"]),
        ]

    assert listings() == [("One row per order.", "Lifecycle state")] * 4
    r = admin.put("/v1/tables/sales.orders/description", json={"columns": {"status": "Admin: state"}})
    assert r.status_code == 200, r.text
    (run,) = sync.run_now(["sales.orders"])
    assert run.outcome == "ok", run.error
    assert listings() == [("One row per order.", "Admin: state")] * 4
