"""The cursor and the watermark: which source columns order and bound a run, and how the
watermark moves. Pure functions over plain data.

Vocabulary (the same as proto_docs/sync.md):

- the **cursor** is the configured column that grows as rows are written (``UPDATED_AT``);
- the **watermark** is the largest cursor value the last successful run loaded; the next
  incremental run reads rows above it;
- the **lookback** (merge only) moves the lower bound back by that many seconds so that rows
  committed late at the source with an older cursor value are read again (the merge makes
  reading a row twice harmless);
- the **keyset** is what pages are ordered and resumed by: the primary key when there is
  one (unique), else the cursor (not unique: ties at a page's end are read again).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sync.errors import SyncFailed
from sync.typemap import SourceColumn

CURSOR_TYPES = frozenset({"NUMBER", "DECIMAL", "NUMERIC", "FIXED", "INT", "INTEGER", "BIGINT", "SMALLINT", "TINYINT", "BYTEINT", "FLOAT", "DOUBLE", "REAL", "DATE", "TIME", "TIMESTAMP_NTZ", "TIMESTAMP_LTZ", "TIMESTAMP_TZ", "TIMESTAMP", "DATETIME", "TEXT", "VARCHAR", "STRING"})  # fmt: skip


class _Unknown:
    """The type of :data:`UNKNOWN`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


# "Take the watermark from the rows loaded": an unpaged run reads one snapshot of the source
# in one query, so the largest cursor among its rows is exactly where it got to.
UNKNOWN: Any = _Unknown()


@dataclass(frozen=True, slots=True)
class Keyset:
    """The columns a paged extraction orders by and resumes after."""

    columns: tuple[SourceColumn, ...]
    unique: bool


@dataclass(frozen=True, slots=True)
class Roles:
    """The source columns that play a part in a run: the cursor and the primary key."""

    cursor: SourceColumn | None
    primary_key: tuple[SourceColumn, ...]

    @property
    def keyset(self) -> Keyset:
        if self.primary_key:
            return Keyset(self.primary_key, unique=True)
        return Keyset((self.cursor,) if self.cursor is not None else (), unique=False)


def resolve_roles(
    columns: Sequence[SourceColumn],
    *,
    cursor: str | None,
    primary_key: Sequence[str],
    label: str,
    configured_source: str,
) -> Roles:
    """Find the configured cursor and key columns among the source's ``columns`` and check
    that the table can be replicated. Every refusal is a :class:`SyncFailed` that names the
    table (``label``) and what to fix."""
    if not columns:
        raise SyncFailed(
            f"source table {label} does not exist or is not visible to this user/role "
            f"(check sync.tables source = {configured_source!r})"
        )
    cursor_col = find_column(columns, cursor, "cursor", label) if cursor else None
    keys = tuple(find_column(columns, k, "primary_key", label) for k in primary_key)
    if cursor_col is not None and cursor_col.base not in CURSOR_TYPES:
        raise SyncFailed(
            f"cursor column {cursor_col.name} of {label} is {cursor_col.snowflake_type}; "
            "a cursor must be a number, date, time, timestamp or text"
        )
    names = [c.target_name.lower() for c in columns]
    if len(set(names)) != len(names):
        raise SyncFailed(f"{label} has columns whose names differ only in case; cannot replicate")
    return Roles(cursor_col, keys)


def find_column(columns: Sequence[SourceColumn], wanted: str, key: str, label: str) -> SourceColumn:
    """The column named exactly ``wanted``, else the one column that matches ignoring case."""
    for c in columns:
        if c.name == wanted:
            return c
    matches = [c for c in columns if c.name.lower() == wanted.lower()]
    if len(matches) == 1:
        return matches[0]
    have = ", ".join(c.name for c in columns)
    raise SyncFailed(f"{key} column {wanted!r} not found in {label} (columns: {have})")


def lower_bound(watermark: Any, *, strategy: str, lookback_seconds: float) -> Any:
    """Where an incremental run starts reading (exclusive): the watermark, moved back by the
    lookback for a merge."""
    if strategy == "merge" and lookback_seconds:
        return minus_lookback(watermark, lookback_seconds)
    return watermark


def minus_lookback(value: Any, seconds: float) -> Any:
    """The watermark moved back by the lookback: seconds for timestamps, whole days (rounded
    up) for dates; numbers and text have no lookback."""
    if isinstance(value, datetime):
        return value - timedelta(seconds=seconds)
    if isinstance(value, date):
        return value - timedelta(days=math.ceil(seconds / 86400))
    return value


def advance(reached: Any, old: Any) -> Any:
    """The new watermark: what the run reached, but never below the old one (a lookback may
    reread older rows; the watermark does not go back for them)."""
    if reached is None:
        return old
    return reached if _greater(reached, old) else old


def _greater(a: Any, b: Any) -> bool:
    if b is None:
        return True
    try:
        return bool(a > b)
    except TypeError:  # a cursor whose type changed: the new value wins
        return True
