"""Flight SQL metadata: SqlInfo, catalogs, schemas, tables, table types, XDBC types and keys.

Each listing is a small Arrow table with the spec's schema (apache/arrow
format/FlightSql.proto, per command), built at GetFlightInfo and streamed from memory by DoGet
(:class:`~flight_server.plans.TablePart`). Listings show only what the caller may read: the
tables are ``Policy.readable_tables`` — ListFlights' own filtering — so a schema appears only
when it holds a table the caller may read, and a table the caller may not read (or that does
not exist) is simply absent. The caller's visible tabular artefacts are listed too, under the
schema ``artefacts`` with the artefact's id as the table name — exactly the names SQL accepts as
``artefacts."<id>"`` (the store's visibility: ``ArtefactStore.list``), so an ADBC client finds
what it ingested (ids are time-ordered: the newest sorts last). Quiver's tables live in one
DuckDB database, reported as the one catalog (DuckDB's name for it). Quiver declares no keys: the key listings are empty, with the
spec's schemas.

Name filters are SQL ``LIKE`` patterns (``%`` any run, ``_`` one character, ``\\`` escapes
either: SqlInfo ``SQL_SEARCH_STRING_ESCAPE``), matched case-insensitively like DuckDB
identifiers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import pyarrow as pa

from catalog import VERSION, Catalog, InvalidArgument, NotFound, Principal, TableRef
from catalog.artefacts import MAX_PAGE, ArtefactFilter
from catalog.database import ARTEFACT_SCHEMA
from catalog.errors import bounded
from catalog.tables import fold
from flight_server.flight_sql import flight_sql_pb2 as pb
from flight_server.plans import Plan, TablePart

TABLE_TYPES = ("TABLE",)
SEARCH_ESCAPE = "\\"
MAX_PATTERN_CHARS = 1_000

_UTF8 = pa.utf8()

CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", _UTF8, nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema(
    [pa.field("catalog_name", _UTF8), pa.field("db_schema_name", _UTF8, nullable=False)]
)
TABLES_SCHEMA = pa.schema(
    [
        pa.field("catalog_name", _UTF8),
        pa.field("db_schema_name", _UTF8),
        pa.field("table_name", _UTF8, nullable=False),
        pa.field("table_type", _UTF8, nullable=False),
    ]
)
TABLES_WITH_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", _UTF8, nullable=False)])
PRIMARY_KEYS_SCHEMA = pa.schema(
    [
        pa.field("catalog_name", _UTF8),
        pa.field("db_schema_name", _UTF8),
        pa.field("table_name", _UTF8, nullable=False),
        pa.field("column_name", _UTF8, nullable=False),
        pa.field("key_name", _UTF8),
        pa.field("key_sequence", pa.int32(), nullable=False),
    ]
)
FOREIGN_KEYS_SCHEMA = pa.schema(
    [
        pa.field("pk_catalog_name", _UTF8),
        pa.field("pk_db_schema_name", _UTF8),
        pa.field("pk_table_name", _UTF8, nullable=False),
        pa.field("pk_column_name", _UTF8, nullable=False),
        pa.field("fk_catalog_name", _UTF8),
        pa.field("fk_db_schema_name", _UTF8),
        pa.field("fk_table_name", _UTF8, nullable=False),
        pa.field("fk_column_name", _UTF8, nullable=False),
        pa.field("key_sequence", pa.int32(), nullable=False),
        pa.field("fk_key_name", _UTF8),
        pa.field("pk_key_name", _UTF8),
        pa.field("update_rule", pa.uint8(), nullable=False),
        pa.field("delete_rule", pa.uint8(), nullable=False),
    ]
)
XDBC_TYPE_INFO_SCHEMA = pa.schema(
    [
        pa.field("type_name", _UTF8, nullable=False),
        pa.field("data_type", pa.int32(), nullable=False),
        pa.field("column_size", pa.int32()),
        pa.field("literal_prefix", _UTF8),
        pa.field("literal_suffix", _UTF8),
        pa.field("create_params", pa.list_(pa.field("item", _UTF8, nullable=False))),
        pa.field("nullable", pa.int32(), nullable=False),
        pa.field("case_sensitive", pa.bool_(), nullable=False),
        pa.field("searchable", pa.int32(), nullable=False),
        pa.field("unsigned_attribute", pa.bool_()),
        pa.field("fixed_prec_scale", pa.bool_(), nullable=False),
        pa.field("auto_increment", pa.bool_()),
        pa.field("local_type_name", _UTF8),
        pa.field("minimum_scale", pa.int32()),
        pa.field("maximum_scale", pa.int32()),
        pa.field("sql_data_type", pa.int32(), nullable=False),
        pa.field("datetime_subcode", pa.int32()),
        pa.field("num_prec_radix", pa.int32()),
        pa.field("interval_precision", pa.int32()),
    ]
)

# SqlInfo's value: a dense union, one child per kind of value (type codes 0-5, in order).
_SQL_INFO_CHILDREN = [
    pa.field("string_value", _UTF8),
    pa.field("bool_value", pa.bool_()),
    pa.field("bigint_value", pa.int64()),
    pa.field("int32_bitmask", pa.int32()),
    pa.field("string_list", pa.list_(pa.field("item", _UTF8))),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32()))),
]
SQL_INFO_SCHEMA = pa.schema(
    [
        pa.field("info_name", pa.uint32(), nullable=False),
        pa.field("value", pa.dense_union(_SQL_INFO_CHILDREN), nullable=False),
    ]
)
_STRING, _BOOL, _BIGINT, _INT32 = 0, 1, 2, 3

_I = pb.SqlInfo


def sql_info_values(ttl_seconds: float) -> dict[int, tuple[int, Any]]:
    """What Quiver reports through ``CommandGetSqlInfo``: code → (union type code, value)."""
    return {
        _I.FLIGHT_SQL_SERVER_NAME: (_STRING, "Quiver"),
        _I.FLIGHT_SQL_SERVER_VERSION: (_STRING, VERSION),
        _I.FLIGHT_SQL_SERVER_ARROW_VERSION: (_STRING, pa.__version__),
        _I.FLIGHT_SQL_SERVER_READ_ONLY: (_BOOL, True),
        _I.FLIGHT_SQL_SERVER_SQL: (_BOOL, True),
        _I.FLIGHT_SQL_SERVER_SUBSTRAIT: (_BOOL, False),
        _I.FLIGHT_SQL_SERVER_TRANSACTION: (_INT32, pb.SQL_SUPPORTED_TRANSACTION_NONE),
        _I.FLIGHT_SQL_SERVER_CANCEL: (_BOOL, True),
        # CommandStatementIngest saves a new tabular artefact; there are no transactions to do it in.
        _I.FLIGHT_SQL_SERVER_BULK_INGESTION: (_BOOL, True),
        _I.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED: (_BOOL, False),
        # Prepared statement handles live as long as tickets.
        _I.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT: (_INT32, int(ttl_seconds * 1000)),
        _I.SQL_DDL_CATALOG: (_BOOL, False),
        _I.SQL_DDL_SCHEMA: (_BOOL, False),
        _I.SQL_DDL_TABLE: (_BOOL, False),
        _I.SQL_IDENTIFIER_CASE: (_INT32, pb.SQL_CASE_SENSITIVITY_CASE_INSENSITIVE),
        _I.SQL_IDENTIFIER_QUOTE_CHAR: (_STRING, '"'),
        _I.SQL_QUOTED_IDENTIFIER_CASE: (_INT32, pb.SQL_CASE_SENSITIVITY_CASE_INSENSITIVE),
        _I.SQL_ALL_TABLES_ARE_SELECTABLE: (_BOOL, True),  # every listed table is readable
        _I.SQL_NULL_ORDERING: (_INT32, pb.SQL_NULLS_SORTED_AT_END),  # DuckDB: NULLS LAST
        _I.SQL_SEARCH_STRING_ESCAPE: (_STRING, SEARCH_ESCAPE),
        _I.SQL_SUPPORTS_COLUMN_ALIASING: (_BOOL, True),
        _I.SQL_SCHEMA_TERM: (_STRING, "schema"),
        _I.SQL_CATALOG_TERM: (_STRING, "catalog"),
        _I.SQL_TRANSACTIONS_SUPPORTED: (_BOOL, False),
        _I.SQL_BATCH_UPDATES_SUPPORTED: (_BOOL, False),
        _I.SQL_SAVEPOINTS_SUPPORTED: (_BOOL, False),
    }


def sql_info_table(values: dict[int, tuple[int, Any]], wanted: Sequence[int]) -> pa.Table:
    """The rows of ``wanted`` (every code when empty) that Quiver knows, in the order asked."""
    codes = list(dict.fromkeys(wanted)) if wanted else sorted(values)
    codes = [c for c in codes if c in values]
    types: list[int] = []
    offsets: list[int] = []
    children: list[list[Any]] = [[] for _ in _SQL_INFO_CHILDREN]
    for code in codes:
        kind, value = values[code]
        types.append(kind)
        offsets.append(len(children[kind]))
        children[kind].append(value)
    union = pa.UnionArray.from_dense(
        pa.array(types, pa.int8()),
        pa.array(offsets, pa.int32()),
        [pa.array(values_, f.type) for values_, f in zip(children, _SQL_INFO_CHILDREN, strict=True)],
        [f.name for f in _SQL_INFO_CHILDREN],
        list(range(len(_SQL_INFO_CHILDREN))),
    )
    return pa.Table.from_arrays([pa.array(codes, pa.uint32()), union], schema=SQL_INFO_SCHEMA)


# (name, XDBC type, column size, literal prefix/suffix, case sensitive, searchable, unsigned,
#  fixed precision/scale, min/max scale, radix) of the types DuckDB's results carry.
_X = pb.XdbcDataType
_TYPES: list[
    tuple[str, int, int | None, str | None, bool, int, bool | None, bool, int | None, int | None, int | None]
] = [
    ("BOOLEAN", _X.XDBC_BIT, 1, None, False, pb.SEARCHABLE_BASIC, None, False, None, None, None),
    ("TINYINT", _X.XDBC_TINYINT, 3, None, False, pb.SEARCHABLE_BASIC, False, False, 0, 0, 10),
    ("SMALLINT", _X.XDBC_SMALLINT, 5, None, False, pb.SEARCHABLE_BASIC, False, False, 0, 0, 10),
    ("INTEGER", _X.XDBC_INTEGER, 10, None, False, pb.SEARCHABLE_BASIC, False, False, 0, 0, 10),
    ("BIGINT", _X.XDBC_BIGINT, 19, None, False, pb.SEARCHABLE_BASIC, False, False, 0, 0, 10),
    ("FLOAT", _X.XDBC_REAL, 24, None, False, pb.SEARCHABLE_BASIC, False, False, None, None, 2),
    ("DOUBLE", _X.XDBC_DOUBLE, 53, None, False, pb.SEARCHABLE_BASIC, False, False, None, None, 2),
    ("DECIMAL", _X.XDBC_DECIMAL, 38, None, False, pb.SEARCHABLE_BASIC, False, True, 0, 38, 10),
    ("VARCHAR", _X.XDBC_VARCHAR, None, "'", True, pb.SEARCHABLE_FULL, None, False, None, None, None),
    ("BLOB", _X.XDBC_VARBINARY, None, "'", False, pb.SEARCHABLE_BASIC, None, False, None, None, None),
    ("DATE", _X.XDBC_DATE, 10, "DATE '", False, pb.SEARCHABLE_BASIC, None, False, None, None, None),
    ("TIME", _X.XDBC_TIME, 15, "TIME '", False, pb.SEARCHABLE_BASIC, None, False, None, None, None),
    (
        "TIMESTAMP",
        _X.XDBC_TIMESTAMP,
        26,
        "TIMESTAMP '",
        False,
        pb.SEARCHABLE_BASIC,
        None,
        False,
        None,
        None,
        None,
    ),
    (
        "INTERVAL",
        _X.XDBC_INTERVAL,
        None,
        "INTERVAL '",
        False,
        pb.SEARCHABLE_BASIC,
        None,
        False,
        None,
        None,
        None,
    ),
]


def xdbc_type_info(data_type: int | None) -> pa.Table:
    """``CommandGetXdbcTypeInfo``: one row per type (or the ones of ``data_type``), ordered
    by data type, then name."""
    rows = []
    for name, xdbc, size, prefix, case, search, unsigned, fixed, lo, hi, radix in sorted(
        _TYPES, key=lambda t: (t[1], t[0])
    ):
        if data_type is not None and xdbc != data_type:
            continue
        rows.append(
            {
                "type_name": name,
                "data_type": xdbc,
                "column_size": size,
                "literal_prefix": prefix,
                "literal_suffix": "'" if prefix else None,
                "create_params": ["precision", "scale"] if name == "DECIMAL" else None,
                "nullable": pb.NULLABILITY_NULLABLE,
                "case_sensitive": case,
                "searchable": search,
                "unsigned_attribute": unsigned,
                "fixed_prec_scale": fixed,
                "auto_increment": False if unsigned is not None else None,
                "local_type_name": name,
                "minimum_scale": lo,
                "maximum_scale": hi,
                "sql_data_type": xdbc,
                "datetime_subcode": None,
                "num_prec_radix": radix,
                "interval_precision": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=XDBC_TYPE_INFO_SCHEMA)


_LITERAL, _ONE, _RUN = 0, 1, 2


@lru_cache(maxsize=256)
def like_pattern(pattern: str) -> tuple[tuple[int, str], ...]:
    """A Flight SQL filter pattern (SQL LIKE: ``%`` any run, ``_`` one character, ``\\``
    escapes either) as tokens, case-folded like DuckDB identifiers; runs of ``%`` collapse."""
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == SEARCH_ESCAPE and i + 1 < len(pattern):
            out.append((_LITERAL, fold(pattern[i + 1])))
            i += 2
            continue
        if c == "%":
            if not out or out[-1][0] != _RUN:
                out.append((_RUN, ""))
        else:
            out.append((_ONE, "") if c == "_" else (_LITERAL, fold(c)))
        i += 1
    return tuple(out)


def like_match(tokens: tuple[tuple[int, str], ...], name: str) -> bool:
    """Whether ``name`` matches the pattern ``tokens``, in O(len(name) * len(tokens)) at worst:
    the greedy wildcard match that backtracks only to the last ``%`` — never a regex, whose
    backtracking is exponential in the number of ``%`` (a pattern is the caller's input)."""
    text = fold(name)
    t = p = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(tokens) and tokens[p][0] != _RUN and (tokens[p][0] == _ONE or tokens[p][1] == text[t]):
            t += 1
            p += 1
        elif p < len(tokens) and tokens[p][0] == _RUN:
            star, mark = p, t
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            t = mark
        else:
            return False
    while p < len(tokens) and tokens[p][0] == _RUN:
        p += 1
    return p == len(tokens)


def _matcher(pattern: str | None, field: str) -> Callable[[str], bool]:
    if pattern is None:
        return lambda _: True
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidArgument(
            f"{field} is {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are accepted"
        )
    tokens = like_pattern(pattern)
    return lambda name: like_match(tokens, name)


def _optional(message: Any, field: str) -> str | None:
    return getattr(message, field) if message.HasField(field) else None


class Metadata:
    """The metadata commands' plans, for one server (its catalog and its ticket lifetime)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.sql_info = sql_info_values(float(catalog.config.limits.ticket_ttl_seconds))

    @property
    def catalog_name(self) -> str:
        return self.catalog.db.catalog_name

    def plan(self, principal: Principal, message: Any) -> Plan:
        """The plan of one metadata command: its table, whole, as the one endpoint."""
        name = type(message).DESCRIPTOR.name
        tables: tuple[TableRef, ...] = ()
        if isinstance(message, pb.CommandGetSqlInfo):
            table = sql_info_table(self.sql_info, list(message.info))
        elif isinstance(message, pb.CommandGetCatalogs):
            table = pa.Table.from_pylist([{"catalog_name": self.catalog_name}], schema=CATALOGS_SCHEMA)
        elif isinstance(message, pb.CommandGetDbSchemas):
            table = self.db_schemas(principal, message)
        elif isinstance(message, pb.CommandGetTables):
            table, tables = self.tables(principal, message)
        elif isinstance(message, pb.CommandGetTableTypes):
            table = pa.Table.from_pylist([{"table_type": t} for t in TABLE_TYPES], schema=TABLE_TYPES_SCHEMA)
        elif isinstance(message, pb.CommandGetXdbcTypeInfo):
            table = xdbc_type_info(message.data_type if message.HasField("data_type") else None)
        elif isinstance(message, pb.CommandGetPrimaryKeys):
            table = PRIMARY_KEYS_SCHEMA.empty_table()
        elif isinstance(
            message, pb.CommandGetExportedKeys | pb.CommandGetImportedKeys | pb.CommandGetCrossReference
        ):
            table = FOREIGN_KEYS_SCHEMA.empty_table()
        else:  # pragma: no cover - dispatch sends only the messages above
            raise InvalidArgument(f"{bounded(name, 60)} is not a metadata command")
        return Plan(
            "metadata",
            table.schema,
            table.num_rows,
            (TablePart(table),),
            tables,
            f"flight_sql:{name}",
            timeout=False,
        )

    def _catalog_matches(self, catalog: str | None) -> bool:
        return catalog is None or fold(catalog) == fold(self.catalog_name)

    def _readable(self, principal: Principal, message: Any, *, table_filter: bool) -> list[TableRef]:
        """The caller's readable tables (ListFlights' filtering) that the command's filters keep."""
        if not self._catalog_matches(_optional(message, "catalog")):
            return []
        schema_ok = _matcher(_optional(message, "db_schema_filter_pattern"), "db_schema_filter_pattern")
        table_ok = (
            _matcher(_optional(message, "table_name_filter_pattern"), "table_name_filter_pattern")
            if table_filter
            else (lambda _: True)
        )
        refs = self.catalog.policy.readable_tables(principal)
        if schema_ok(ARTEFACT_SCHEMA):
            refs.extend(self._artefact_tables(principal))
        return [r for r in refs if schema_ok(r.schema) and table_ok(r.name)]

    def _artefact_tables(self, principal: Principal) -> list[TableRef]:
        """The tabular artefacts ``principal`` may see, as the tables SQL names them."""
        store = self.catalog.artefacts
        refs: list[TableRef] = []
        after: str | None = None
        while True:
            page = store.list(principal, ArtefactFilter(kind="table"), page_size=MAX_PAGE, after=after)
            refs.extend(TableRef(ARTEFACT_SCHEMA, a.id) for a in page.items)
            if page.next is None:
                return refs
            after = page.next

    def db_schemas(self, principal: Principal, message: Any) -> pa.Table:
        refs = self._readable(principal, message, table_filter=False)
        names = sorted({r.schema for r in refs})
        rows = [{"catalog_name": self.catalog_name, "db_schema_name": n} for n in names]
        return pa.Table.from_pylist(rows, schema=DB_SCHEMAS_SCHEMA)

    def tables(self, principal: Principal, message: Any) -> tuple[pa.Table, tuple[TableRef, ...]]:
        types = {t.upper() for t in message.table_types}
        refs = self._readable(principal, message, table_filter=True)
        if types and not types & set(TABLE_TYPES):
            refs = []
        refs.sort(key=lambda r: (r.schema, r.name))
        rows: list[dict[str, Any]] = [
            {
                "catalog_name": self.catalog_name,
                "db_schema_name": r.schema,
                "table_name": r.name,
                "table_type": "TABLE",
            }
            for r in refs
        ]
        if not message.include_schema:
            return pa.Table.from_pylist(rows, schema=TABLES_SCHEMA), ()
        schemas = self._arrow_schemas(principal, refs)
        columns = self._duckdb_columns()
        kept: list[dict[str, Any]] = []
        for row, ref in zip(rows, refs, strict=True):
            if ref not in schemas:  # an artefact deleted or expired since it was listed
                continue
            column_types: dict[str, tuple[str, int | None, int | None]] = dict(columns.get(ref.key(), {}))
            rule = self.catalog.policy.rule_for(principal, ref)
            masks = rule.mask if rule is not None else ()
            for column, kind in masks:
                if kind != "null":  # hash, redact and last4 read as text whatever the column was
                    column_types[column] = ("VARCHAR", None, None)
            schema = self._column_schema(ref, schemas[ref], column_types)
            row["table_schema"] = schema.serialize().to_pybytes()
            kept.append(row)
        refs = [r for r in refs if r in schemas]
        # DoGet checks these against the allowlist again: a table's columns are not shown to a
        # caller whose permission was withdrawn since GetFlightInfo.
        return pa.Table.from_pylist(kept, schema=TABLES_WITH_SCHEMA), tuple(refs)

    def _arrow_schemas(self, principal: Principal, refs: Sequence[TableRef]) -> dict[TableRef, pa.Schema]:
        """Each table's Arrow schema: the catalog's for warehouse tables, the stored IPC file's
        for an artefact (one that vanished since the listing is left out)."""
        tables = [r for r in refs if r.schema != ARTEFACT_SCHEMA]
        out = {info.ref: info.schema for info in self.catalog.policy.describe(principal, tables)}
        for ref in refs:
            if ref.schema == ARTEFACT_SCHEMA:
                try:
                    out[ref] = self.catalog.artefacts.table_schema(principal, ref.name)[1]
                except NotFound:
                    continue
        return out

    def _duckdb_columns(self) -> dict[tuple[str, str], dict[str, tuple[str, int | None, int | None]]]:
        """DuckDB's own type of every column (``duckdb_columns()``, one catalog query):
        (schema, table) folded → column → (type name, precision, scale)."""
        with self.catalog.db.reading() as cur:
            rows = cur.execute(
                "SELECT schema_name, table_name, column_name, data_type, numeric_precision, numeric_scale "
                "FROM duckdb_columns() WHERE database_name = current_database()"
            ).fetchall()
        out: dict[tuple[str, str], dict[str, tuple[str, int | None, int | None]]] = {}
        for schema, table, column, type_name, precision, scale in rows:
            out.setdefault((fold(schema), fold(table)), {})[column] = (type_name, precision, scale)
        return out

    def _column_schema(
        self, ref: TableRef, schema: pa.Schema, types: dict[str, tuple[str, int | None, int | None]]
    ) -> pa.Schema:
        """The table's Arrow schema with the spec's column metadata: where the column is, and
        DuckDB's name for its type (what JDBC tools show), precision and scale."""
        fields = []
        for f in schema:
            type_name, precision, scale = types.get(f.name, (str(f.type).upper(), None, None))
            meta = {
                b"ARROW:FLIGHT:SQL:CATALOG_NAME": self.catalog_name.encode(),
                b"ARROW:FLIGHT:SQL:DB_SCHEMA_NAME": ref.schema.encode(),
                b"ARROW:FLIGHT:SQL:TABLE_NAME": ref.name.encode(),
                b"ARROW:FLIGHT:SQL:TYPE_NAME": type_name.encode(),
                b"ARROW:FLIGHT:SQL:IS_READ_ONLY": b"1",
                b"ARROW:FLIGHT:SQL:IS_AUTO_INCREMENT": b"0",
            }
            if precision is not None:
                meta[b"ARROW:FLIGHT:SQL:PRECISION"] = str(precision).encode()
            if scale is not None:
                meta[b"ARROW:FLIGHT:SQL:SCALE"] = str(scale).encode()
            fields.append(f.with_metadata({**(f.metadata or {}), **meta}))
        return pa.schema(fields)
