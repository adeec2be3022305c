"""Snowflake column types -> DuckDB column types, without loss, and the names they get (used by
the sync worker for replicas and by live tables, catalog/live.py, for their schemas).

The map is one table (``TYPE_MAP``) so that the docs (proto_docs/sync.md) and the tests read
the same thing. DuckDB type names are spelt the way ``duckdb_columns()`` reports them, so
comparing a mapped source column with an existing replica column is a string comparison.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from catalog.snowflake_names import quote_snowflake

# (Snowflake type, DuckDB type, note) - the documented map, in the order of the docs.
TYPE_MAP: list[tuple[str, str, str]] = [
    ("NUMBER(p,0), p <= 2", "TINYINT", "INT/INTEGER/BIGINT are NUMBER(38,0) in Snowflake"),
    ("NUMBER(p,0), p <= 4", "SMALLINT", ""),
    ("NUMBER(p,0), p <= 9", "INTEGER", ""),
    ("NUMBER(p,0), p <= 18", "BIGINT", ""),
    ("NUMBER(p,0), p <= 38", "DECIMAL(p,0)", "all 38 digits kept"),
    ("NUMBER(p,s), s > 0", "DECIMAL(p,s)", "exact; never through a float"),
    ("FLOAT / DOUBLE / REAL", "DOUBLE", ""),
    ("VARCHAR / TEXT / STRING / CHAR", "VARCHAR", ""),
    ("BOOLEAN", "BOOLEAN", ""),
    ("DATE", "DATE", ""),
    ("TIME", "TIME", "microseconds (nanoseconds truncated)"),
    ("TIMESTAMP_NTZ", "TIMESTAMP", "microseconds (nanoseconds truncated)"),
    ("TIMESTAMP_LTZ", "TIMESTAMP WITH TIME ZONE", "the instant is kept; shown in the session time zone"),
    ("TIMESTAMP_TZ", "TIMESTAMP WITH TIME ZONE", "the instant is kept; the original offset is not"),
    ("BINARY / VARBINARY", "BLOB", ""),
    ("VARIANT / OBJECT / ARRAY", "JSON", "the JSON text Snowflake sends"),
    ("GEOGRAPHY / GEOMETRY", "VARCHAR", "GeoJSON text (extracted with ST_ASGEOJSON)"),
    ("anything else (e.g. VECTOR)", "VARCHAR", "extracted with TO_VARCHAR; logged as a warning"),
]

_NUMBER_TYPES = {
    "NUMBER",
    "DECIMAL",
    "NUMERIC",
    "FIXED",
    "INT",
    "INTEGER",
    "BIGINT",
    "SMALLINT",
    "TINYINT",
    "BYTEINT",
}
_FLOAT_TYPES = {"FLOAT", "FLOAT4", "FLOAT8", "DOUBLE", "DOUBLE PRECISION", "REAL", "REAL PRECISION"}
_TEXT_TYPES = {
    "TEXT",
    "VARCHAR",
    "STRING",
    "CHAR",
    "CHARACTER",
    "NCHAR",
    "NVARCHAR",
    "NVARCHAR2",
    "CHAR VARYING",
}
_TIMESTAMP_TZ = {"TIMESTAMP_TZ", "TIMESTAMP_LTZ", "TIMESTAMPLTZ", "TIMESTAMPTZ"}
_TIMESTAMP_NTZ = {"TIMESTAMP_NTZ", "TIMESTAMP", "DATETIME", "TIMESTAMPNTZ"}
_SEMI = {"VARIANT", "OBJECT", "ARRAY"}
_GEO = {"GEOGRAPHY", "GEOMETRY"}
_BINARY = {"BINARY", "VARBINARY"}


@dataclass(frozen=True, slots=True)
class SourceColumn:
    """One column as Snowflake's ``information_schema.columns`` describes it."""

    name: str  # exactly as stored in Snowflake (upper case unless created quoted)
    data_type: str  # e.g. NUMBER, TEXT, TIMESTAMP_NTZ
    precision: int | None = None
    scale: int | None = None

    @property
    def base(self) -> str:
        return self.data_type.upper().split("(")[0].strip()

    @property
    def snowflake_type(self) -> str:
        """The full type, as shown in status and schema-change messages."""
        if self.base in _NUMBER_TYPES:
            return f"NUMBER({self.precision if self.precision is not None else 38},{self.scale or 0})"
        return self.base

    @property
    def duckdb_type(self) -> str:
        return duckdb_type(self)

    @property
    def target_name(self) -> str:
        return target_name(self.name)

    @property
    def known(self) -> bool:
        b = self.base
        return (
            b
            in _NUMBER_TYPES
            | _FLOAT_TYPES
            | _TEXT_TYPES
            | _TIMESTAMP_TZ
            | _TIMESTAMP_NTZ
            | _SEMI
            | _GEO
            | _BINARY
            or b
            in (
                "BOOLEAN",
                "DATE",
                "TIME",
            )
        )


def duckdb_type(col: SourceColumn) -> str:  # noqa: C901, PLR0911  a dispatch on the Snowflake type
    b = col.base
    if b in _NUMBER_TYPES:
        p = col.precision if col.precision is not None else 38
        s = col.scale or 0
        if s > 0:
            return f"DECIMAL({p},{s})"
        if p <= 2:
            return "TINYINT"
        if p <= 4:
            return "SMALLINT"
        if p <= 9:
            return "INTEGER"
        if p <= 18:
            return "BIGINT"
        return f"DECIMAL({p},0)"
    if b in _FLOAT_TYPES:
        return "DOUBLE"
    if b in _TEXT_TYPES or b in _GEO:
        return "VARCHAR"
    if b == "BOOLEAN":
        return "BOOLEAN"
    if b == "DATE":
        return "DATE"
    if b == "TIME":
        return "TIME"
    if b in _TIMESTAMP_NTZ:
        return "TIMESTAMP"
    if b in _TIMESTAMP_TZ:
        return "TIMESTAMP WITH TIME ZONE"
    if b in _BINARY:
        return "BLOB"
    if b in _SEMI:
        return "JSON"
    return "VARCHAR"


def select_expression(col: SourceColumn) -> str:
    """What to SELECT at the source for this column, aliased to its own name."""
    q = quote_snowflake(col.name)
    if col.base in _GEO:
        return f"TO_VARCHAR(ST_ASGEOJSON({q})) AS {q}"
    if not col.known:
        return f"TO_VARCHAR({q}) AS {q}"
    return q


def target_name(snowflake_name: str) -> str:
    """Snowflake stores unquoted identifiers in upper case; DuckDB users write lower case.
    A name that is not all upper case was created quoted on purpose and keeps its case."""
    return snowflake_name.lower() if snowflake_name == snowflake_name.upper() else snowflake_name


def fingerprint(columns: list[SourceColumn]) -> str:
    text = json.dumps([[c.name, c.snowflake_type] for c in columns])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def columns_json(columns: list[SourceColumn]) -> str:
    return json.dumps([[c.name, c.snowflake_type] for c in columns])


# --- widening: which type changes keep every existing value ---------------------------------

_INT_RANK = {"TINYINT": 1, "SMALLINT": 2, "INTEGER": 3, "BIGINT": 4}
_INT_DIGITS = {"TINYINT": 2, "SMALLINT": 4, "INTEGER": 9, "BIGINT": 18}
_DECIMAL_RE = re.compile(r"^DECIMAL\((\d+),\s*(\d+)\)$")


def _decimal(t: str) -> tuple[int, int] | None:
    m = _DECIMAL_RE.match(t.upper())
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_widening(old: str, new: str) -> bool:
    """True when every value of ``old`` fits ``new`` exactly (so ALTER ... TYPE is safe)."""
    old, new = old.upper(), new.upper()
    if old == new:
        return True
    if old in _INT_RANK and new in _INT_RANK:
        return _INT_RANK[new] >= _INT_RANK[old]
    od, nd = _decimal(old), _decimal(new)
    if old in _INT_DIGITS and nd:
        return nd[0] - nd[1] >= _INT_DIGITS[old]
    if od and nd:
        return nd[1] >= od[1] and nd[0] - nd[1] >= od[0] - od[1]
    if od and od[1] == 0 and new in _INT_DIGITS:
        return od[0] <= _INT_DIGITS[new]
    return False
