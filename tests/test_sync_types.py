"""The type map and configuration: one table of Snowflake -> DuckDB types, a round trip of
every mapped type (NULLs, unicode, extremes) through the real connector and the emulator,
and one-line configuration errors."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog import ConfigError, load_config
from catalog.snowflake_names import quote_snowflake, split_snowflake_name
from sync.source import parse_source
from sync.state import decode_watermark, encode_watermark
from sync.typemap import SourceColumn, duckdb_type, is_widening, target_name
from tests.sync_emulator import Emulator, Source, replica, sync_service

# --- the map itself ------------------------------------------------------------------------------

MAP = [
    # (information_schema data_type, precision, scale) -> DuckDB type
    (("NUMBER", 2, 0), "TINYINT"),
    (("NUMBER", 4, 0), "SMALLINT"),
    (("NUMBER", 9, 0), "INTEGER"),
    (("NUMBER", 18, 0), "BIGINT"),
    (("NUMBER", 38, 0), "DECIMAL(38,0)"),
    (("NUMBER", 38, 12), "DECIMAL(38,12)"),
    (("NUMBER", 10, 2), "DECIMAL(10,2)"),
    (("FLOAT", None, None), "DOUBLE"),
    (("TEXT", None, None), "VARCHAR"),
    (("BOOLEAN", None, None), "BOOLEAN"),
    (("DATE", None, None), "DATE"),
    (("TIME", None, None), "TIME"),
    (("TIMESTAMP_NTZ", None, None), "TIMESTAMP"),
    (("TIMESTAMP_LTZ", None, None), "TIMESTAMP WITH TIME ZONE"),
    (("TIMESTAMP_TZ", None, None), "TIMESTAMP WITH TIME ZONE"),
    (("BINARY", None, None), "BLOB"),
    (("VARIANT", None, None), "JSON"),
    (("OBJECT", None, None), "JSON"),
    (("ARRAY", None, None), "JSON"),
    (("GEOGRAPHY", None, None), "VARCHAR"),
    (("GEOMETRY", None, None), "VARCHAR"),
    (("VECTOR", None, None), "VARCHAR"),
]


@pytest.mark.parametrize(("source", "expected"), MAP, ids=[f"{s[0]}({s[1]},{s[2]})" for s, _ in MAP])
def test_type_map(source: tuple[str, int | None, int | None], expected: str) -> None:
    assert duckdb_type(SourceColumn("C", *source)) == expected


def test_names_lower_case_unquoted_identifiers_and_keep_quoted_mixed_case() -> None:
    assert target_name("UPDATED_AT") == "updated_at"
    assert target_name("MixedCase") == "MixedCase"
    assert target_name("lower") == "lower"
    src = parse_source("orders", "ANALYTICS", "PUBLIC")
    assert (src.database, src.schema, src.name) == ("ANALYTICS", "PUBLIC", "ORDERS")
    assert src.sql == '"ANALYTICS"."PUBLIC"."ORDERS"'


SPLITS = [
    ("orders", ["ORDERS"]),
    ("  analytics . public . orders ", ["ANALYTICS", "PUBLIC", "ORDERS"]),
    ('analytics.public."Mixed.Name"', ["ANALYTICS", "PUBLIC", "Mixed.Name"]),
    ('"a""b".c', ['a"b', "C"]),
    ('"Lower"', ["Lower"]),
    ('"x.y.z"', ["x.y.z"]),
    ("a.b.c.d", ["A", "B", "C", "D"]),
    ('"open.quote', ["open.quote"]),
]


@pytest.mark.parametrize(("text", "parts"), SPLITS)
def test_one_snowflake_name_splitter(text: str, parts: list[str]) -> None:
    assert split_snowflake_name(text) == parts


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4))
def test_quoted_names_split_back_into_their_parts(parts: list[str]) -> None:
    """Any identifiers, quoted as Snowflake quotes them and joined with dots, split back into
    exactly those identifiers (dots, quotes and spaces inside included)."""
    assert split_snowflake_name(".".join(quote_snowflake(p) for p in parts)) == parts


@pytest.mark.parametrize(
    ("source", "parts"), [('DB.S."Dotted.Name"', ("DB", "S", "Dotted.Name")), ('S."x.y"', ("DB", "S", "x.y"))]
)
def test_config_check_and_sync_read_a_quoted_dotted_source_the_same_way(
    source: str, parts: tuple[str, str, str]
) -> None:
    """A dot inside quotes is part of the name for both: the config accepts the entry (it
    counts at most three parts) and the worker resolves the same three identifiers."""
    _config([{"source": source, "target": "s.o"}])
    src = parse_source(source, "DB", "S")
    assert (src.database, src.schema, src.name) == parts


def test_widening() -> None:
    assert is_widening("INTEGER", "BIGINT")
    assert is_widening("BIGINT", "DECIMAL(38,0)")
    assert is_widening("DECIMAL(10,2)", "DECIMAL(20,2)")
    assert not is_widening("DECIMAL(10,2)", "DECIMAL(10,4)")  # fewer integer digits
    assert not is_widening("BIGINT", "INTEGER")
    assert not is_widening("VARCHAR", "BIGINT")


@pytest.mark.parametrize(
    "value",
    [
        12345,
        Decimal("123.450"),
        datetime(2024, 5, 6, 7, 8, 9, 123456),
        datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
        date(2024, 5, 6),
        "abc",
    ],
)
def test_watermark_round_trip(value: object) -> None:
    assert decode_watermark(*encode_watermark(value)) == value


# --- round trip through the connector ------------------------------------------------------------------

EXTREME = 10**38 - 1


def test_every_mapped_type_round_trips_with_nulls_unicode_and_extremes(emu: Emulator, tmp_path: Path) -> None:
    src = Source(emu, "TYPES")
    src.execute(
        "CREATE TABLE ALLTYPES (ID NUMBER(9,0), TINY NUMBER(2,0), SMALL NUMBER(4,0), BIG NUMBER(18,0), "
        "DEC NUMBER(38,12), MONEY NUMBER(10,2), F FLOAT, S VARCHAR, B BOOLEAN, D DATE, TM TIME, "
        "NTZ TIMESTAMP_NTZ, LTZ TIMESTAMP_LTZ, TZ TIMESTAMP_TZ, BIN BINARY, V VARIANT, O OBJECT, A ARRAY, "
        '"MixedCase" VARCHAR)'
    )
    # fakesnow stores NUMBER(38,0) as BIGINT; a DECIMAL(38,0) column made in the emulator's own
    # database is what Snowflake's NUMBER(38,0) really holds (all 38 digits).
    emu.duck().execute(f"ALTER TABLE {src.database}.PUBLIC.ALLTYPES ADD COLUMN HUGE DECIMAL(38,0)")
    src.execute(
        "INSERT INTO ALLTYPES SELECT 1, 99, -9999, 999999999999999999, "
        "12345678901234567890.123456789012, -12345678.99, 1.5e300, 'héllo ☃ 日本語 🚀', TRUE, "
        "'2024-02-29'::DATE, '23:59:59.999999'::TIME, '2024-01-02 03:04:05.123456'::TIMESTAMP_NTZ, "
        "'2024-01-02T03:04:05.123456+02:00'::TIMESTAMP_LTZ, '1999-12-31T23:59:59.5-08:00'::TIMESTAMP_TZ, "
        "TO_BINARY('00ff10', 'HEX'), PARSE_JSON('{\"k\": [1, \"two\", null]}'), OBJECT_CONSTRUCT('a', 1), "
        f"ARRAY_CONSTRUCT(1, 2, 3), 'kept', {EXTREME}",
    )
    src.execute(
        "INSERT INTO ALLTYPES SELECT 2, -99, 9999, -999999999999999999, "
        "-0.000000000001, 0.01, -2.5, '', FALSE, '0001-01-01'::DATE, '00:00:00'::TIME, "
        "'1900-01-01 00:00:00'::TIMESTAMP_NTZ, '2262-04-11T23:47:16+00:00'::TIMESTAMP_LTZ, "
        f"'1970-01-01T00:00:01+00:00'::TIMESTAMP_TZ, TO_BINARY('', 'HEX'), PARSE_JSON('[]'), OBJECT_CONSTRUCT(), "
        f"ARRAY_CONSTRUCT(), 'x', -{EXTREME}",
    )
    src.execute("INSERT INTO ALLTYPES (ID) VALUES (3)")  # every other column NULL
    table = {"source": src.name("ALLTYPES"), "target": "t.alltypes"}
    with sync_service(tmp_path, emu, [table]) as service:
        (run,) = service.run_now()
        assert run.outcome == "ok", run.error
        types = dict(
            replica(
                service, "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'alltypes'"
            )
        )
        assert types == {
            "id": "INTEGER",
            "tiny": "TINYINT",
            "small": "SMALLINT",
            "big": "BIGINT",
            "dec": "DECIMAL(38,12)",
            "money": "DECIMAL(10,2)",
            "f": "DOUBLE",
            "s": "VARCHAR",
            "b": "BOOLEAN",
            "d": "DATE",
            "tm": "TIME",
            "ntz": "TIMESTAMP",
            "ltz": "TIMESTAMP WITH TIME ZONE",
            "tz": "TIMESTAMP WITH TIME ZONE",
            "bin": "BLOB",
            "v": "JSON",
            "o": "JSON",
            "a": "JSON",
            "MixedCase": "VARCHAR",
            "huge": "DECIMAL(38,0)",
        }
        rows = replica(
            service,
            "SELECT * EXCLUDE (v, o, a), v::VARCHAR, o::VARCHAR, a::VARCHAR FROM t.alltypes ORDER BY id",
        )
        source_rows = src.rows("SELECT * FROM ALLTYPES ORDER BY ID")
    assert len(rows) == len(source_rows) == 3
    first, second, nulls = rows
    assert first[:6] == (
        1,
        99,
        -9999,
        999999999999999999,
        Decimal("12345678901234567890.123456789012"),
        Decimal("-12345678.99"),
    )
    assert first[6] == 1.5e300
    assert first[7] == "héllo ☃ 日本語 🚀"
    assert first[8] is True
    assert first[9] == date(2024, 2, 29)
    assert first[10] == time(23, 59, 59, 999999)
    assert first[11] == datetime(2024, 1, 2, 3, 4, 5, 123456)
    assert first[12] == datetime(2024, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)
    assert first[13] == datetime(1999, 12, 31, 23, 59, 59, 500000, tzinfo=timezone(timedelta(hours=-8)))
    assert first[14] == b"\x00\xff\x10"
    assert first[15] == "kept"
    assert first[16] == EXTREME
    import json

    assert json.loads(first[17]) == {"k": [1, "two", None]}
    assert json.loads(first[18]) == {"a": 1}
    assert json.loads(first[19]) == [1, 2, 3]
    assert second[4] == Decimal("-0.000000000001")
    assert second[9] == date(1, 1, 1)
    assert second[16] == -EXTREME
    assert second[7] == ""
    assert second[14] == b""
    # Row 3: NULL everywhere but the id, timestamps included (never 1970).
    assert nulls[0] == 3
    assert all(v is None for v in nulls[1:]), nulls
    # And the replica agrees with the source value by value (the source as the connector reads it).
    for ours, theirs in zip(rows, source_rows, strict=True):
        assert ours[:15] == tuple(theirs[:15])


# --- configuration errors ---------------------------------------------------------------------------


def _config(tables: list[dict[str, object]], snowflake: dict[str, object] | None = None) -> None:
    load_config(
        None,
        environ={},
        overrides={
            "snowflake": snowflake
            if snowflake is not None
            else {"account": "acme", "user": "q", "database": "DB", "schema": "S"},
            "sync": {"tables": tables},
        },
    )


BAD = [
    (
        [{"source": "ORDERS", "target": "sales.orders", "mode": "merge", "cursor": "U"}],
        "sync.tables[0] (sales.orders).primary_key",
    ),
    (
        [{"source": "ORDERS", "target": "sales.orders", "mode": "append"}],
        "sync.tables[0] (sales.orders).cursor",
    ),
    ([{"source": "ORDERS", "target": "orders"}], "sync.tables[0].target"),
    ([{"source": "ORDERS", "target": "_quiver.x"}], "sync.tables[0] (_quiver.x).target"),
    (
        [{"source": "A", "target": "s.a"}, {"source": "B", "target": "S.A"}],
        "sync.tables[1] (S.A).target: already used by sync.tables[0]",
    ),
    ([{"source": "ORDERS", "target": "s.o", "mode": "upsert"}], "sync.tables[0].mode"),
    ([{"source": "ORDERS", "target": "s.o", "cursour": "X"}], "cursour"),
    ([{"source": "ORDERS", "target": "s.o", "interval_seconds": 0}], "sync.tables[0].interval_seconds"),
    ([{"source": "A.B.C.D", "target": "s.o"}], "sync.tables[0] (s.o).source"),
    ([{"source": 'A."B.C".D.E', "target": "s.o"}], "sync.tables[0] (s.o).source"),
    ([{"source": "  ", "target": "s.o"}], "sync.tables[0] (s.o).source"),
    ([{"target": "s.o"}], "source"),
]


@pytest.mark.parametrize(("tables", "expected"), BAD)
def test_config_errors_are_one_line_and_name_the_entry_and_key(
    tables: list[dict[str, object]], expected: str
) -> None:
    with pytest.raises(ConfigError) as e:
        _config(tables)
    message = str(e.value)
    assert expected in message
    assert "\n" not in message


def test_sync_tables_need_a_snowflake_section() -> None:
    with pytest.raises(ConfigError, match=r"\[\[sync.tables\]\] needs a \[snowflake\] section"):
        _config([{"source": "A.B.C", "target": "s.c"}], snowflake={})


def test_password_from_environment_and_tables_not_from_environment() -> None:
    config = load_config(None, environ={"QUIVER_SNOWFLAKE_PASSWORD": "from-env"})
    assert config.snowflake.password == "from-env"
    with pytest.raises(ConfigError, match=r"QUIVER_SYNC_TABLES: `sync\.tables` is an array"):
        load_config(None, environ={"QUIVER_SYNC_TABLES": "[]"})
