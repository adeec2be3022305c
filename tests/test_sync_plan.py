"""The pure decisions of a sync run, over plain data (no emulator, no database): the schema
diff, the strategy choice, the cursor and key columns, the watermark's moves and the keyset
page condition. The end-to-end behaviour they add up to is in test_sync_strategies.py."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, get_args

import pytest

from catalog.config import SyncTableConfig
from sync.cursor import Keyset, Roles, advance, find_column, lower_bound, minus_lookback, resolve_roles
from sync.errors import SyncFailed
from sync.extract import after
from sync.schema_diff import SchemaDiff, diff_schema
from sync.state import TableState
from sync.strategy import Plan, choose_plan
from sync.typemap import SourceColumn, fingerprint

Mode = Literal["full", "append", "merge"]
Policy = Literal["evolve", "resync", "fail"]

ID = SourceColumn("ID", "NUMBER", 9, 0)  # INTEGER
CUSTOMER = SourceColumn("CUSTOMER", "TEXT")
UPDATED = SourceColumn("UPDATED_AT", "TIMESTAMP_NTZ")
COLUMNS = [ID, CUSTOMER, UPDATED]
REPLICA = {"id": "INTEGER", "customer": "VARCHAR", "updated_at": "TIMESTAMP"}
T = '"sales"."orders"'


def diff(
    columns: list[SourceColumn],
    replica: dict[str, str],
    *,
    policy: Policy = "evolve",
    mode: Mode = "merge",
    last: str | None = None,
) -> SchemaDiff:
    entry = SyncTableConfig(source="ORDERS", target="sales.orders", mode=mode, on_schema_change=policy)
    return diff_schema(columns, replica, entry, target_sql=T, last_fingerprint=last)


# --- schema diff ---------------------------------------------------------------------------------


def test_same_schema_is_no_change() -> None:
    assert diff(COLUMNS, REPLICA) == SchemaDiff()
    # Names compare as DuckDB does: case-insensitively.
    assert diff(COLUMNS, {"ID": "INTEGER", "Customer": "VARCHAR", "UPDATED_AT": "TIMESTAMP"}) == SchemaDiff()


def test_added_column_is_evolved_in_place() -> None:
    d = diff([*COLUMNS, SourceColumn("NOTE", "TEXT")], REPLICA)
    assert d.changes == ("column note VARCHAR added",)
    assert d.ddl == (f'ALTER TABLE {T} ADD COLUMN "note" VARCHAR',)
    assert (d.incompatible, d.structural) == (False, True)


def test_widened_type_alters_the_replica_column_as_it_is_spelt() -> None:
    replica = {"Id": "INTEGER", "customer": "VARCHAR", "updated_at": "TIMESTAMP"}
    d = diff([SourceColumn("ID", "NUMBER", 18, 0), CUSTOMER, UPDATED], replica)
    assert d.changes == ("column id widened INTEGER -> BIGINT",)
    assert d.ddl == (f'ALTER TABLE {T} ALTER COLUMN "Id" TYPE BIGINT',)
    assert (d.incompatible, d.structural) == (False, True)


def test_narrowed_type_is_incompatible_and_has_no_ddl() -> None:
    d = diff([SourceColumn("ID", "NUMBER", 4, 0), CUSTOMER, UPDATED], REPLICA)
    assert d.changes == ("column id changed INTEGER -> SMALLINT (incompatible)",)
    assert d.ddl == ()
    assert (d.incompatible, d.structural) == (True, True)


def test_dropped_column_under_evolve_is_reported_once_when_the_source_changes() -> None:
    now = [ID, UPDATED]  # CUSTOMER dropped at the source
    before = fingerprint(COLUMNS)
    # The run that sees the source change says so; the replica keeps the column.
    d = diff(now, REPLICA, last=before)
    assert d.changes == ("column customer dropped at the source (kept: NULL in new rows)",)
    assert (d.ddl, d.structural) == ((), False)
    # Later runs (the recorded fingerprint is the new one) and a first run say nothing.
    assert diff(now, REPLICA, last=fingerprint(now)) == SchemaDiff()
    assert diff(now, REPLICA, last=None) == SchemaDiff()
    # A full table is rebuilt with the source's columns: nothing is kept.
    d = diff(now, REPLICA, mode="full", last=before)
    assert d.changes == ("column customer dropped at the source",)


@pytest.mark.parametrize("policy", ["resync", "fail"])
def test_dropped_column_under_resync_or_fail_is_a_structural_change(policy: Policy) -> None:
    d = diff([ID, UPDATED], REPLICA, policy=policy, last=fingerprint([ID, UPDATED]))
    assert d.changes == ("column customer dropped at the source",)
    assert (d.ddl, d.incompatible, d.structural) == ((), False, True)


def test_several_changes_in_source_column_order() -> None:
    columns = [
        SourceColumn("NOTE", "TEXT"),
        SourceColumn("ID", "NUMBER", 18, 0),
        SourceColumn("Extra", "DATE"),
    ]
    d = diff(columns, {"id": "INTEGER", "customer": "VARCHAR"}, policy="resync")
    assert d.changes == (
        "column note VARCHAR added",
        "column id widened INTEGER -> BIGINT",
        "column Extra DATE added",
        "column customer dropped at the source",
    )
    assert d.ddl == (
        f'ALTER TABLE {T} ADD COLUMN "note" VARCHAR',
        f'ALTER TABLE {T} ALTER COLUMN "id" TYPE BIGINT',
        f'ALTER TABLE {T} ADD COLUMN "Extra" DATE',
    )


# --- strategy ------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)
ADDED = SchemaDiff(("column note VARCHAR added",), ('ALTER TABLE t ADD COLUMN "note" VARCHAR',), False, True)
NARROWED = SchemaDiff(("column id changed INTEGER -> SMALLINT (incompatible)",), (), True, True)
DROPPED_KEPT = SchemaDiff(
    ("column customer dropped at the source (kept: NULL in new rows)",), (), False, False
)


def plan(
    d: SchemaDiff | None,
    *,
    mode: Mode = "merge",
    policy: Policy = "evolve",
    full: bool = False,
    has_watermark: bool = True,
    reconcile_seconds: float | None = None,
    last_full_at: datetime | None = None,
) -> Plan:
    entry = SyncTableConfig(
        source="ORDERS",
        target="sales.orders",
        mode=mode,
        on_schema_change=policy,
        reconcile_seconds=reconcile_seconds,
    )
    state = None
    if has_watermark:
        state = TableState("sales.orders", "DB.PUBLIC.ORDERS", mode, "2024-01-01T00:00:00", "timestamp")
        state.last_full_at = last_full_at
    return choose_plan(d, entry, state, full=full, now=NOW)


def test_no_replica_or_no_watermark_loads_in_full() -> None:
    assert plan(None) == Plan("full")
    assert plan(None, policy="fail") == Plan("full")  # nothing to compare: nothing refused
    assert plan(SchemaDiff(), has_watermark=False) == Plan("full")
    assert plan(ADDED, has_watermark=False) == Plan("full", changes=ADDED.changes)
    # A state row without a watermark (e.g. the table was "full" until now): a full load too.
    entry = SyncTableConfig(source="ORDERS", target="sales.orders", mode="append", cursor="UPDATED_AT")
    state = TableState("sales.orders", "DB.PUBLIC.ORDERS", "full", last_full_at=NOW)
    assert choose_plan(SchemaDiff(), entry, state, full=False, now=NOW) == Plan("full")


def test_the_configured_mode_with_its_ddl() -> None:
    assert plan(SchemaDiff(), mode="append") == Plan("append")
    assert plan(ADDED) == Plan("merge", ddl=ADDED.ddl, changes=ADDED.changes)
    assert plan(DROPPED_KEPT) == Plan("merge", changes=DROPPED_KEPT.changes)


def test_full_mode_or_a_requested_full_run_rebuilds_without_ddl() -> None:
    assert plan(ADDED, mode="full") == Plan("full", changes=ADDED.changes)
    assert plan(ADDED, full=True) == Plan("full", changes=ADDED.changes)


def test_fail_policy_refuses_a_changed_schema_unless_a_full_run_accepts_it() -> None:
    assert plan(ADDED, policy="fail") == Plan("merge", changes=ADDED.changes, refused=True)
    assert plan(ADDED, mode="full", policy="fail") == Plan("full", changes=ADDED.changes, refused=True)
    assert plan(ADDED, policy="fail", full=True) == Plan("full", changes=ADDED.changes)
    # Before any watermark, a changed schema is still refused: the policy comes first.
    assert plan(ADDED, policy="fail", has_watermark=False).refused
    assert plan(SchemaDiff(), policy="fail") == Plan("merge")


def test_resync_or_an_incompatible_type_is_a_full_resync() -> None:
    assert plan(ADDED, policy="resync") == Plan("full", changes=(*ADDED.changes, "full resync"))
    assert plan(NARROWED) == Plan("full", changes=(*NARROWED.changes, "full resync"))
    # A dropped column that evolve keeps is not structural: no resync.
    assert plan(DROPPED_KEPT).strategy == "merge"


def test_reconcile_is_due_after_reconcile_seconds_since_the_last_full_pass() -> None:
    hour = timedelta(hours=1)
    assert plan(SchemaDiff(), reconcile_seconds=3600, last_full_at=None).reconcile
    assert plan(SchemaDiff(), reconcile_seconds=3600, last_full_at=NOW - hour).reconcile
    assert not plan(
        SchemaDiff(), reconcile_seconds=3600, last_full_at=NOW - hour + timedelta(seconds=1)
    ).reconcile
    assert not plan(SchemaDiff(), reconcile_seconds=None, last_full_at=None).reconcile
    assert not plan(SchemaDiff(), mode="append", reconcile_seconds=3600).reconcile
    # A full run passes over every row anyway.
    assert not plan(SchemaDiff(), full=True, reconcile_seconds=3600).reconcile


def test_strategy_invariants_over_every_combination() -> None:
    diffs = [None, SchemaDiff(), ADDED, NARROWED, DROPPED_KEPT]
    modes: tuple[Mode, ...] = get_args(Mode)
    policies: tuple[Policy, ...] = get_args(Policy)
    seen = 0
    for d, mode, policy, full, has_wm, last in itertools.product(
        diffs, modes, policies, (False, True), (False, True), (None, NOW)
    ):
        p = plan(
            d,
            mode=mode,
            policy=policy,
            full=full,
            has_watermark=has_wm,
            reconcile_seconds=60,
            last_full_at=last,
        )
        seen += 1
        assert p.strategy in (mode, "full")
        if full or mode == "full" or d is None:
            assert p.strategy == "full"
        if p.strategy == "full":
            assert (p.ddl, p.reconcile) == ((), False)
        if p.refused:
            assert policy == "fail" and not full and d is not None and d.changes
        elif d is not None and d.changes and policy == "fail":
            assert full
        if p.reconcile:
            assert p.strategy == "merge"
        if d is not None:
            assert p.changes[: len(d.changes)] == d.changes
    assert seen == 5 * 3 * 3 * 2 * 2 * 2


# --- cursor and key columns ----------------------------------------------------------------------


def roles(
    columns: list[SourceColumn], cursor: str | None = "UPDATED_AT", pk: tuple[str, ...] = ("ID",)
) -> Roles:
    return resolve_roles(
        columns, cursor=cursor, primary_key=pk, label="DB.PUBLIC.ORDERS", configured_source="orders"
    )


def test_roles_and_their_keyset() -> None:
    r = roles(COLUMNS)
    assert (r.cursor, r.primary_key) == (UPDATED, (ID,))
    assert r.keyset == Keyset((ID,), unique=True)
    assert roles(COLUMNS, pk=()).keyset == Keyset((UPDATED,), unique=False)
    assert roles(COLUMNS, cursor=None, pk=()).keyset == Keyset((), unique=False)
    # Configured names match the stored ones exactly, else case-insensitively.
    assert roles(COLUMNS, cursor="updated_at", pk=("id",)).primary_key == (ID,)


def test_find_column_prefers_the_exact_name() -> None:
    lower, upper = SourceColumn("id", "NUMBER", 9, 0), SourceColumn("ID", "NUMBER", 9, 0)
    assert find_column([lower, upper], "ID", "primary_key", "X") is upper
    with pytest.raises(SyncFailed, match=r"primary_key column 'Id' not found in X \(columns: id, ID\)"):
        find_column([lower, upper], "Id", "primary_key", "X")


@pytest.mark.parametrize(
    ("columns", "cursor", "pk", "message"),
    [
        ([], "UPDATED_AT", ("ID",), "source table DB.PUBLIC.ORDERS does not exist or is not visible to this "
         "user/role (check sync.tables source = 'orders')"),
        (COLUMNS, "CHANGED", ("ID",), "cursor column 'CHANGED' not found in DB.PUBLIC.ORDERS "
         "(columns: ID, CUSTOMER, UPDATED_AT)"),
        (COLUMNS, "UPDATED_AT", ("ID", "NOPE"), "primary_key column 'NOPE' not found"),
        ([ID, SourceColumn("FLAG", "BOOLEAN")], "FLAG", ("ID",), "cursor column FLAG of DB.PUBLIC.ORDERS is "
         "BOOLEAN; a cursor must be a number, date, time, timestamp or text"),
        ([ID, UPDATED, SourceColumn("updated_at", "DATE")], "UPDATED_AT", ("ID",),
         "DB.PUBLIC.ORDERS has columns whose names differ only in case; cannot replicate"),
    ],
)  # fmt: skip
def test_unusable_columns_are_refused_with_the_fix(
    columns: list[SourceColumn], cursor: str, pk: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SyncFailed) as e:
        roles(columns, cursor=cursor, pk=pk)
    assert message in e.value.message
    assert e.value.transient is False


# --- watermark -----------------------------------------------------------------------------------


def test_lookback_moves_only_a_merge_and_only_temporal_cursors() -> None:
    ts = datetime(2024, 3, 1, 0, 0, 30)
    assert lower_bound(ts, strategy="merge", lookback_seconds=90) == datetime(2024, 2, 29, 23, 59)
    assert lower_bound(ts, strategy="append", lookback_seconds=90) == ts
    assert lower_bound(ts, strategy="merge", lookback_seconds=0) == ts
    # Dates move by whole days, rounded up; numbers and text do not move.
    assert minus_lookback(date(2024, 3, 1), 90) == date(2024, 2, 29)
    assert minus_lookback(date(2024, 3, 1), 2 * 86400 + 1) == date(2024, 2, 27)
    assert minus_lookback(Decimal(10), 90) == Decimal(10)
    assert minus_lookback("b", 90) == "b"
    aware = datetime(2024, 3, 1, tzinfo=UTC)
    assert minus_lookback(aware, 3600) == datetime(2024, 2, 29, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    ("reached", "old", "new"),
    [
        (None, 5, 5),  # nothing loaded: the watermark stays
        (7, 5, 7),
        (3, 5, 5),  # a lookback reread older rows: the watermark does not go back
        (3, None, 3),  # the first watermark
        (None, None, None),
        (date(2024, 1, 2), 5, date(2024, 1, 2)),  # the cursor's type changed: the new value wins
    ],
)
def test_the_watermark_only_advances(reached: Any, old: Any, new: Any) -> None:
    assert advance(reached, old) == new


# --- keyset page condition -----------------------------------------------------------------------


def test_keyset_condition_for_a_composite_key_is_bound_not_formatted() -> None:
    region = SourceColumn("REGION", "TEXT")
    sql, params = after([region, ID], ["eu'; DROP TABLE x", 41])
    assert sql == '(("REGION" > ?) OR ("REGION" = ? AND "ID" > ?))'
    assert params == [("TEXT", "eu'; DROP TABLE x"), ("TEXT", "eu'; DROP TABLE x"), ("FIXED", 41)]
    assert after([ID], [1]) == ('(("ID" > ?))', [("FIXED", 1)])
