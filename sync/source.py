"""The Snowflake side: names, connection (with secrets from files or the environment),
column discovery and Arrow extraction.

Rows arrive as Arrow tables from ``fetch_arrow_batches`` and go straight to DuckDB; Python
only ever holds one batch at a time. Watermarks and page keys are bound parameters (qmark
style, typed), never formatted into SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import pyarrow as pa
import structlog

from catalog.config import SnowflakeConfig
from catalog.snowflake_client import AUTH_ERRNOS, SecretUnreadable, connect_args, scrub
from catalog.snowflake_names import SnowflakeTable, quote_snowflake, split_snowflake_name
from catalog.snowflake_types import SourceColumn
from sync.errors import SyncFailed

log = structlog.get_logger("sync")
# The connector logs every connection at INFO; Quiver's own events say what matters.
logging.getLogger("snowflake.connector").setLevel(logging.WARNING)


#: A Snowflake table by its stored identifiers (shared with live tables: catalog/snowflake_names.py).
SourceTable = SnowflakeTable


def parse_source(text: str, database: str | None, schema: str | None) -> SourceTable:
    parts = split_snowflake_name(text)
    if len(parts) == 3:
        return SourceTable(*parts)
    if len(parts) == 2:
        return SourceTable(split_snowflake_name(database or "")[0], *parts)
    return SourceTable(
        split_snowflake_name(database or "")[0], split_snowflake_name(schema or "")[0], parts[0]
    )


def is_transient(exc: BaseException) -> bool:
    """Network trouble, timeouts and 5xx answers are worth retrying; refused credentials,
    unknown objects and SQL errors are not."""
    from snowflake.connector import errors as sfe

    if isinstance(exc, SyncFailed):
        return exc.transient
    if isinstance(exc, sfe.ProgrammingError):
        return False
    if getattr(exc, "errno", None) in AUTH_ERRNOS or "incorrect username or password" in str(exc).lower():
        return False
    retryable = (
        sfe.OperationalError,
        sfe.InterfaceError,
        sfe.InternalServerError,
        sfe.ServiceUnavailableError,
        sfe.GatewayTimeoutError,
        sfe.OtherHTTPRetryableError,
        sfe.RequestTimeoutError,
    )
    return isinstance(exc, (*retryable, ConnectionError, TimeoutError))


class SnowflakeSource:
    """One connection to Snowflake for one sync run (connections are cheap next to a load,
    and a fresh one per run never inherits a broken session)."""

    def __init__(self, config: SnowflakeConfig, *, extra: dict[str, Any] | None = None) -> None:
        self._config = config
        self._extra = extra or {}
        self._secrets: list[str] = []
        self._con: Any = None

    # --- connection --------------------------------------------------------------------------
    def _connect_args(self) -> dict[str, Any]:
        try:
            args, secrets = connect_args(self._config)
        except SecretUnreadable as e:
            raise SyncFailed(str(e)) from None
        self._secrets.extend(secrets)
        args.update(self._extra)
        return args

    def connect(self) -> None:
        import snowflake.connector

        if self._con is not None:
            return
        args = self._connect_args()
        try:
            self._con = snowflake.connector.connect(**args)
        except Exception as e:  # noqa: BLE001 - every connector failure becomes a SyncFailed
            raise self.error("cannot connect to Snowflake", e) from None
        log.info("sync.source.connected", account=self._config.account, host=self._config.host)

    def close(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            try:
                con.close()
            except Exception as e:  # noqa: BLE001 - closing a dead session must not mask the real error
                log.debug("sync.source.close_failed", error=self.scrub(str(e)))

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def error(self, what: str, exc: BaseException) -> SyncFailed:
        detail = self.scrub(str(exc).strip()) or type(exc).__name__
        return SyncFailed(f"{what}: {detail}", transient=is_transient(exc))

    # --- queries -----------------------------------------------------------------------------
    def _cursor(self) -> Any:
        if self._con is None:
            self.connect()
        return self._con.cursor()

    def execute(self, sql: str, params: list[Any] | None = None) -> Any:
        cur = self._cursor()
        try:
            cur.execute(sql, params or None)
        except Exception as e:  # noqa: BLE001
            raise self.error("source query failed", e) from None
        return cur

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        cur = self.execute(sql, params)
        try:
            return list(cur.fetchall())
        except Exception as e:  # noqa: BLE001
            raise self.error("source query failed", e) from None

    def columns_and_comments(self, table: SourceTable) -> tuple[list[SourceColumn], dict[str, Any]]:
        """The table's columns in source order, and each column's ``COMMENT`` by its source
        name (None where it has none): one ``information_schema.columns`` query."""
        rows = self.rows(
            f"SELECT column_name, data_type, numeric_precision, numeric_scale, comment "
            f"FROM {quote_snowflake(table.database)}.information_schema.columns "
            "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
            [table.schema, table.name],
        )
        columns = [
            SourceColumn(
                str(name),
                str(dtype),
                int(p) if p is not None else None,
                int(s) if s is not None else None,
            )
            for name, dtype, p, s, _ in rows
        ]
        return columns, {str(r[0]): r[4] for r in rows}

    def table_comment(self, table: SourceTable) -> tuple[bool, Any]:
        """(read, the table's ``COMMENT`` or None) from ``information_schema.tables``. A failed
        read is (False, None), never an error: a comment is not worth failing a run for."""
        try:
            rows = self.rows(
                f"SELECT comment FROM {quote_snowflake(table.database)}.information_schema.tables "
                "WHERE table_schema = ? AND table_name = ?",
                [table.schema, table.name],
            )
        except SyncFailed as e:
            log.warning("sync.source.comment_unread", source=table.label, error=e.message)
            return False, None
        return True, rows[0][0] if rows else None

    def batches(self, sql: str, params: list[Any] | None = None) -> Iterator[pa.Table]:
        """The result as Arrow tables, one per chunk the source sends."""
        cur = self.execute(sql, params)
        try:
            yield from cur.fetch_arrow_batches(force_microsecond_precision=True)
        except SyncFailed:
            raise
        except Exception as e:  # noqa: BLE001
            raise self.error("reading from the source failed", e) from None


# --- typed bindings ------------------------------------------------------------------------------


def bind(col: SourceColumn, value: Any) -> tuple[str, Any]:  # noqa: PLR0911  a dispatch on the column's type
    """A placeholder and its typed parameter for comparing ``col`` with ``value`` at the source."""
    b = col.base
    if isinstance(value, bool):
        return "?", ("BOOLEAN", value)
    if isinstance(value, Decimal | int) and (
        (col.scale or 0) > 0
        or not b.startswith(
            ("NUMBER", "DECIMAL", "NUMERIC", "FIXED", "INT", "BIGINT", "SMALLINT", "TINYINT", "BYTEINT")
        )
    ):
        return f"CAST(? AS {col.snowflake_type})", ("TEXT", str(value))
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            return f"CAST(? AS {col.snowflake_type})", ("TEXT", str(value))
        return "?", ("FIXED", int(value))
    if isinstance(value, int):
        return "?", ("FIXED", value)
    if isinstance(value, float):
        return "CAST(? AS DOUBLE)", ("TEXT", repr(value))
    if isinstance(value, datetime):
        if value.tzinfo is None and b not in ("TIMESTAMP_TZ", "TIMESTAMP_LTZ"):
            return "?", ("TIMESTAMP_NTZ", value)
        return "?", ("TIMESTAMP_TZ", value)
    if isinstance(value, date):
        return "?", ("DATE", value)
    if isinstance(value, time):
        return "?", ("TIME", value)
    if isinstance(value, bytes):
        return "?", ("BINARY", value)
    return "?", ("TEXT", str(value))
