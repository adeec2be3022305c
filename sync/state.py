"""Replication state in the catalog (``_quiver.sync_state``, ``_quiver.sync_runs``).

A successful run writes its state row and history row on the loader's cursor inside the
same transaction as the table contents, so the watermark can never run ahead of (or behind)
the rows it describes. A failed run writes only its history and the "last run" fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

import duckdb

from catalog.database import SYSTEM_SCHEMA, Database

STATE = f"{SYSTEM_SCHEMA}.sync_state"
RUNS = f"{SYSTEM_SCHEMA}.sync_runs"

_FIELDS = (
    "target",
    "source",
    "mode",
    "watermark",
    "watermark_kind",
    "schema_fingerprint",
    "source_columns",
    "last_full_at",
    "last_started_at",
    "last_ended_at",
    "last_rows_read",
    "last_rows_written",
    "last_bytes",
    "last_outcome",
    "last_error",
    "consecutive_failures",
)


@dataclass
class TableState:
    target: str
    source: str
    mode: str
    watermark: str | None = None
    watermark_kind: str | None = None
    schema_fingerprint: str | None = None
    source_columns: str | None = None
    last_full_at: datetime | None = None
    last_started_at: datetime | None = None
    last_ended_at: datetime | None = None
    last_rows_read: int | None = None
    last_rows_written: int | None = None
    last_bytes: int | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    consecutive_failures: int = 0

    @property
    def watermark_value(self) -> Any:
        return decode_watermark(self.watermark, self.watermark_kind)


@dataclass
class RunRecord:
    """One run, as recorded in the history and summarised by the CLI."""

    target: str
    source: str
    mode: str
    trigger: str
    started_at: datetime
    ended_at: datetime | None = None
    rows_read: int = 0
    rows_written: int = 0
    rows_deleted: int = 0
    bytes: int = 0
    outcome: str = "running"
    error: str | None = None
    watermark: str | None = None
    schema_changes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        end = self.ended_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()


def encode_watermark(value: Any) -> tuple[str | None, str | None]:  # noqa: PLR0911  a dispatch on the value's type
    """(text, kind) for a cursor value; timestamps with a zone are stored in UTC."""
    if value is None:
        return None, None
    if isinstance(value, bool):
        return str(value).lower(), "text"
    if isinstance(value, int):
        return str(value), "integer"
    if isinstance(value, Decimal):
        return (str(int(value)), "integer") if value == value.to_integral_value() else (str(value), "decimal")
    if isinstance(value, float):
        return repr(value), "float"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.astimezone(UTC).isoformat(), "timestamptz"
        return value.isoformat(), "timestamp"
    if isinstance(value, date):
        return value.isoformat(), "date"
    if isinstance(value, time):
        return value.isoformat(), "time"
    return str(value), "text"


def decode_watermark(text: str | None, kind: str | None) -> Any:
    if text is None:
        return None
    if kind == "integer":
        return int(text)
    if kind == "decimal":
        return Decimal(text)
    if kind == "float":
        return float(text)
    if kind in ("timestamp", "timestamptz"):
        return datetime.fromisoformat(text)
    if kind == "date":
        return date.fromisoformat(text)
    if kind == "time":
        return time.fromisoformat(text)
    return text


class SyncStateStore:
    def __init__(self, db: Database, *, history_runs: int = 200) -> None:
        self._db = db
        self._history_runs = history_runs

    def get(self, cur: duckdb.DuckDBPyConnection, target: str) -> TableState | None:
        rows = cur.execute(f"SELECT {', '.join(_FIELDS)} FROM {STATE} WHERE target = ?", [target]).fetchall()
        return TableState(**dict(zip(_FIELDS, rows[0], strict=True))) if rows else None

    def all(self) -> dict[str, TableState]:
        with self._db.reading() as cur:
            rows = cur.execute(f"SELECT {', '.join(_FIELDS)} FROM {STATE}").fetchall()
        return {r[0]: TableState(**dict(zip(_FIELDS, r, strict=True))) for r in rows}

    def record_success(
        self,
        cur: duckdb.DuckDBPyConnection,
        run: RunRecord,
        *,
        watermark: tuple[str | None, str | None],
        fingerprint: str,
        source_columns: str,
        full: bool,
    ) -> None:
        """Inside the loader's transaction: the new state and the history row."""
        text, kind = watermark
        cur.execute(
            f"INSERT INTO {STATE} (target, source, mode, watermark, watermark_kind, schema_fingerprint, "
            "source_columns, last_full_at, last_started_at, last_ended_at, last_rows_read, "
            "last_rows_written, last_bytes, last_outcome, last_error, consecutive_failures) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ok', NULL, 0) "
            "ON CONFLICT (target) DO UPDATE SET source = excluded.source, mode = excluded.mode, "
            "watermark = excluded.watermark, watermark_kind = excluded.watermark_kind, "
            "schema_fingerprint = excluded.schema_fingerprint, source_columns = excluded.source_columns, "
            "last_full_at = coalesce(excluded.last_full_at, sync_state.last_full_at), "
            "last_started_at = excluded.last_started_at, last_ended_at = excluded.last_ended_at, "
            "last_rows_read = excluded.last_rows_read, last_rows_written = excluded.last_rows_written, "
            "last_bytes = excluded.last_bytes, last_outcome = 'ok', last_error = NULL, consecutive_failures = 0",
            [
                run.target,
                run.source,
                run.mode,
                text,
                kind,
                fingerprint,
                source_columns,
                run.ended_at if full else None,
                run.started_at,
                run.ended_at,
                run.rows_read,
                run.rows_written,
                run.bytes,
            ],
        )
        self._insert_run(cur, run)

    def record_failure(self, run: RunRecord, *, configured_mode: str) -> int:
        """After a failed run: history and "last run" fields; the watermark stays."""
        with self._db.transaction() as cur:
            row = cur.execute(
                f"INSERT INTO {STATE} (target, source, mode, last_started_at, last_ended_at, last_rows_read, "
                "last_rows_written, last_bytes, last_outcome, last_error, consecutive_failures) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'failed', ?, 1) "
                "ON CONFLICT (target) DO UPDATE SET last_started_at = excluded.last_started_at, "
                "last_ended_at = excluded.last_ended_at, last_rows_read = excluded.last_rows_read, "
                "last_rows_written = excluded.last_rows_written, last_bytes = excluded.last_bytes, "
                "last_outcome = 'failed', last_error = excluded.last_error, "
                "consecutive_failures = sync_state.consecutive_failures + 1 "
                "RETURNING consecutive_failures",
                [
                    run.target,
                    run.source,
                    configured_mode,
                    run.started_at,
                    run.ended_at,
                    run.rows_read,
                    0,
                    run.bytes,
                    run.error,
                ],
            ).fetchall()
            self._insert_run(cur, run)
        return int(row[0][0]) if row else 1

    def _insert_run(self, cur: duckdb.DuckDBPyConnection, run: RunRecord) -> None:
        cur.execute(
            f"INSERT INTO {RUNS} (target, source, mode, trigger, started_at, ended_at, rows_read, "
            "rows_written, rows_deleted, bytes, outcome, error, watermark, schema_changes) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run.target,
                run.source,
                run.mode,
                run.trigger,
                run.started_at,
                run.ended_at,
                run.rows_read,
                run.rows_written,
                run.rows_deleted,
                run.bytes,
                run.outcome,
                run.error,
                run.watermark,
                json.dumps(run.schema_changes) if run.schema_changes else None,
            ],
        )
        cur.execute(
            f"DELETE FROM {RUNS} WHERE target = ? AND id < (SELECT min(id) FROM "
            f"(SELECT id FROM {RUNS} WHERE target = ? ORDER BY id DESC LIMIT ?))",
            [run.target, run.target, self._history_runs],
        )

    def last_successes(self) -> dict[str, datetime]:
        """When each table's newest successful run (still in the history) ended."""
        with self._db.reading() as cur:
            rows = cur.execute(
                f"SELECT target, max(ended_at) FROM {RUNS} WHERE outcome = 'ok' AND ended_at IS NOT NULL "
                "GROUP BY target"
            ).fetchall()
        return {target: ended for target, ended in rows}

    def history(self, target: str, limit: int = 20) -> list[dict[str, Any]]:
        cols = (
            "id, mode, trigger, started_at, ended_at, rows_read, rows_written, rows_deleted, bytes, "
            "outcome, error, watermark, schema_changes"
        )
        with self._db.reading() as cur:
            rows = cur.execute(
                f"SELECT {cols} FROM {RUNS} WHERE target = ? ORDER BY id DESC LIMIT ?", [target, limit]
            ).fetchall()
        names = [c.strip() for c in cols.split(",")]
        return [dict(zip(names, r, strict=True)) for r in rows]
