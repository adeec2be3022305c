"""The MCP tools: their names, schemas and descriptions, and their logic, written once
against :class:`~mcp_server.backend.Backend` (proto_docs/mcp.md documents each).

A tool's answer is structured content (matching the tool's output schema) and the same
answer as text for models that read only text. Every answer is bounded: rows by
``max_rows`` (default ``[mcp] default_rows``, at most ``[mcp] max_rows``), rendered bytes by
``[mcp] max_response_bytes``; an answer that was cut says so (``truncated``, and why).
A refusal is a :class:`ToolError` with the code and sentence the data plane gives over Flight.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import jsonschema
import msgspec
import pyarrow as pa

from catalog.artefacts import TABULAR_FILE_FORMATS
from catalog.config import McpConfig
from catalog.errors import QuiverError, bounded
from catalog.policy import NOT_READABLE, readable_hint
from catalog.tables import fold
from mcp_server.backend import Backend, TableMeta
from quiver_client import QuiverClientError

#: Longest string argument accepted (a query is at most 100,000 characters for the guard).
MAX_STRING = 100_000
MAX_PARAMS = 1000
#: The cached statistics describe_table shows per column (the profile's, proto_docs/descriptors.md).
PROFILE_FIELDS = ("count", "nulls", "null_fraction", "approx_distinct", "min", "max", "mean")
#: Rows describe_table shows.
DESCRIBE_SAMPLE_ROWS = 5
#: Longest cell rendered in markdown or CSV (longer values are cut, saying so with "…").
MAX_CELL_CHARS = 2000

FORMATS = ("markdown", "csv", "json")


class ToolError(Exception):
    """A refusal: a tool result with ``isError``, ``code`` and one ``detail`` sentence."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = bounded(detail, 2000)


def tool_error(exc: BaseException) -> ToolError | None:
    """The tool error for a refusal from either backend; None for a fault of our own."""
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, QuiverError | QuiverClientError):
        if exc.code == "INTERNAL":
            return None
        return ToolError(exc.code, exc.detail)
    return None


@dataclass
class Answer:
    """A tool's answer, and what the call log records of it."""

    structured: dict[str, Any]
    text: str
    rows: int = 0
    bytes: int = 0
    sql: str | None = None


# --- rendering ------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "total_seconds"):  # timedelta
        return str(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        text = msgspec.json.encode(_jsonable(value)).decode()
    else:
        text = str(_jsonable(value))
    if len(text) > MAX_CELL_CHARS:
        text = text[:MAX_CELL_CHARS] + "…"
    return text


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


class _Renderer:
    """Rows into one of :data:`FORMATS`, a row at a time, within a byte budget."""

    def __init__(self, fmt: str, columns: Sequence[str], budget: int) -> None:
        self.fmt = fmt
        self.columns = list(columns)
        self.budget = budget
        self.parts: list[str] = []
        self.size = 0
        self.rows = 0
        if fmt == "markdown":
            head = "| " + " | ".join(_md(c) for c in self.columns) + " |\n"
            head += "|" + "|".join(" --- " for _ in self.columns) + "|\n"
        elif fmt == "csv":
            head = self._csv(self.columns)
        else:
            head = "["
        self._push(head)

    @staticmethod
    def _csv(values: Sequence[str]) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(values)
        return out.getvalue()

    def _push(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text.encode())

    def add(self, row: Mapping[str, Any]) -> bool:
        """Add ``row``; False (and nothing added) when it would pass the budget."""
        if self.fmt == "markdown":
            text = "| " + " | ".join(_md(_cell(row.get(c))) for c in self.columns) + " |\n"
        elif self.fmt == "csv":
            text = self._csv([_cell(row.get(c)) for c in self.columns])
        else:
            obj = {c: _jsonable(row.get(c)) for c in self.columns}
            text = ("," if self.rows else "") + msgspec.json.encode(obj).decode()
        if self.size + len(text.encode()) + 1 > self.budget:  # + 1: JSON's closing bracket
            return False
        self._push(text)
        self.rows += 1
        return True

    def finish(self) -> str:
        if self.fmt == "json":
            self._push("]")
        return "".join(self.parts)


def _rows_of(batches: Iterator[pa.RecordBatch]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        yield from batch.to_pylist()


def _columns(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def _render_table(table: pa.Table, fmt: str, budget: int) -> tuple[str, int, bool]:
    """A small result (a sample, a profile) rendered: text, rows shown, whether cut."""
    renderer = _Renderer(fmt, table.column_names, budget)
    shown_all = True
    for row in _rows_of(iter(table.to_batches())):
        if not renderer.add(row):
            shown_all = False
            break
    return renderer.finish(), renderer.rows, not shown_all


# --- schemas ------------------------------------------------------------------------------

_TABLE = {
    "type": "string",
    "minLength": 1,
    "maxLength": 300,
    "description": "A readable table as 'schema.table' (see list_tables), e.g. 'demo.orders'.",
}
_FORMAT = {
    "type": "string",
    "enum": list(FORMATS),
    "default": "markdown",
    "description": "How rows are rendered in 'data': markdown (default), csv or json.",
}
_COLUMNS_ARG = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 300},
    "minItems": 1,
    "maxItems": 1000,
    "description": "Only these columns (default: all).",
}
_PARAMS = {
    "type": "array",
    "maxItems": MAX_PARAMS,
    "description": "Values for the positional parameters ? or $1, $2 … of the SQL, in order.",
}
_COLUMN_OUT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
    "required": ["name", "type"],
}
_ROWS_OUT = {
    "format": {"type": "string", "enum": list(FORMATS)},
    "columns": {"type": "array", "items": _COLUMN_OUT},
    "data": {"type": "string", "description": "The rows, rendered in 'format'."},
    "rows_returned": {"type": "integer"},
    "truncated": {"type": "boolean"},
    "truncated_by": {"type": ["string", "null"], "enum": ["max_rows", "max_response_bytes", None]},
}
_ARTEFACT_OUT = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
_PAGE_OUT = {
    "type": "object",
    "properties": {
        "artefacts": {"type": "array", "items": _ARTEFACT_OUT},
        "next": {"type": ["string", "null"]},
    },
    "required": ["artefacts", "next"],
}


@dataclass(frozen=True)
class ToolSpec:
    name: str
    title: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    run: Callable[[ToolBox, Backend, dict[str, Any]], Answer] = field(repr=False)
    #: The SQL an argument holds, for the call log's fingerprint.
    sql_argument: str | None = None

    def validate(self, arguments: Mapping[str, Any]) -> None:
        """Arguments against the input schema: INVALID_ARGUMENT naming the first problem,
        with any echoed value bounded."""
        validator = jsonschema.Draft202012Validator(self.input_schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(dict(arguments)))
        if error is None:
            return
        where = ".".join(str(p) for p in error.absolute_path) or "arguments"
        if error.validator == "additionalProperties":
            allowed = ", ".join(sorted(self.input_schema.get("properties", {}))) or "none"
            unknown = sorted(set(arguments) - set(self.input_schema.get("properties", {})))
            shown = ", ".join(repr(bounded(u, 40)) for u in unknown[:3])
            raise ToolError("INVALID_ARGUMENT", f"{self.name}: unknown argument {shown}; it takes: {allowed}")
        if error.validator == "maxLength":
            raise ToolError(
                "INVALID_ARGUMENT",
                f"{self.name}: argument {where!r} is longer than {error.validator_value:,} characters",
            )
        raise ToolError("INVALID_ARGUMENT", f"{self.name}: argument {where!r}: {bounded(error.message, 200)}")


def _schema(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


# --- the tools ----------------------------------------------------------------------------


class ToolBox:
    """The tools with their limits (``[mcp]``); stateless, shared by every call."""

    def __init__(self, config: McpConfig, download_base: Callable[[], str | None] = lambda: None) -> None:
        self.config = config
        self._download_base = download_base
        self.specs: dict[str, ToolSpec] = {spec.name: spec for spec in _specs(config)}

    def call(self, backend: Backend, name: str, arguments: Mapping[str, Any] | None) -> Answer:
        spec = self.specs.get(name)
        if spec is None:
            shown = bounded(name, 60)
            raise ToolError(
                "INVALID_ARGUMENT", f"unknown tool {shown!r}; the tools are: {', '.join(sorted(self.specs))}"
            )
        args = dict(arguments or {})
        spec.validate(args)
        return spec.run(self, backend, args)

    # --- helpers ---
    def _table(self, backend: Backend, wanted: str) -> TableMeta:
        """The readable table ``wanted`` names, or the data plane's refusal (the same for a
        table that does not exist and one not readable), with the closest readable names."""
        tables = backend.tables()
        key = fold(wanted.strip())
        for meta in tables:
            if fold(meta.name) == key:
                return meta
        hint = readable_hint(wanted, [t.name for t in tables])
        raise ToolError("PERMISSION_DENIED", f"{bounded(wanted, 200)}: {NOT_READABLE}; you may read: {hint}")

    def _rows_answer(
        self, table: pa.Table, fmt: str, extra: dict[str, Any], *, cut_before: bool = False
    ) -> Answer:
        data, shown, cut = _render_table(table, fmt, self.config.max_response_bytes)
        truncated = cut or cut_before
        structured = {
            **extra,
            "format": fmt,
            "columns": _columns(table.schema),
            "data": data,
            "rows_returned": shown,
            "truncated": truncated,
            "truncated_by": "max_response_bytes" if cut else ("max_rows" if cut_before else None),
        }
        note = f"{shown} row(s)" + (" (truncated)" if truncated else "")
        return Answer(structured, f"{note}\n\n{data}", rows=shown, bytes=len(data.encode()))

    def list_tables(self, backend: Backend, args: dict[str, Any]) -> Answer:
        tables = backend.tables()
        items = [
            {
                "name": t.name,
                "description": t.description,
                "rows": t.rows,
                "column_count": len(t.schema),
                "changed_at": t.changed_at.isoformat() if t.changed_at else None,
            }
            for t in tables
        ]
        lines = ["| table | rows | columns | changed at | description |", "| --- | --- | --- | --- | --- |"]
        for item in items:
            lines.append(
                f"| {item['name']} | {item['rows']} | {item['column_count']} | {item['changed_at'] or ''} "
                f"| {_md(str(item['description']))} |"
            )
        text = "\n".join(lines) if items else "You may read no table: ask an admin to allowlist some."
        return Answer({"tables": items}, text, rows=len(items), bytes=len(text.encode()))

    def describe_table(self, backend: Backend, args: dict[str, Any]) -> Answer:
        meta = self._table(backend, args["table"])
        sample = backend.read({"kind": "sample", "table": meta.name, "rows": DESCRIBE_SAMPLE_ROWS})
        # Statistics only when the data plane has them cached: describing never scans.
        cached = backend.read({"kind": "profile", "table": meta.name, "cached_only": True})
        stats = {row["name"]: row for row in cached.to_pylist()}
        columns = [
            {
                "name": f.name,
                "type": str(f.type),
                "nullable": f.nullable,
                "description": meta.columns.get(f.name, ""),
                "profile": (
                    {k: _jsonable(stats[f.name].get(k)) for k in PROFILE_FIELDS} if f.name in stats else None
                ),
            }
            for f in meta.schema
        ]
        data, shown, _ = _render_table(sample, "markdown", self.config.max_response_bytes // 2)
        structured = {
            "name": meta.name,
            "description": meta.description,
            "rows": meta.rows,
            "changed_at": meta.changed_at.isoformat() if meta.changed_at else None,
            "columns": columns,
            "sample": data,
            "sample_rows": shown,
        }
        text = table_markdown(meta) + f"\n\nFirst {shown} row(s):\n\n{data}"
        return Answer(structured, text, rows=shown, bytes=len(text.encode()))

    def sample_table(self, backend: Backend, args: dict[str, Any]) -> Answer:
        meta = self._table(backend, args["table"])
        method = args.get("method", "head")
        command: dict[str, Any] = {"kind": "sample", "table": meta.name}
        if "percent" in args:
            if "rows" in args:
                raise ToolError("INVALID_ARGUMENT", "sample_table: give 'rows' or 'percent', not both")
            command["percent"] = args["percent"]
        else:
            command["rows"] = min(args.get("rows", 10), self.config.max_rows)
            command["method"] = "first" if method == "head" else "random"
        if "seed" in args:
            command["seed"] = args["seed"]
        if "columns" in args:
            command["columns"] = args["columns"]
        table = backend.read(command)
        cut = table.num_rows > self.config.max_rows
        return self._rows_answer(
            table.slice(0, self.config.max_rows),
            args.get("format", "markdown"),
            {"table": meta.name},
            cut_before=cut,
        )

    def profile_table(self, backend: Backend, args: dict[str, Any]) -> Answer:
        meta = self._table(backend, args["table"])
        command: dict[str, Any] = {"kind": "profile", "table": meta.name}
        if "columns" in args:
            command["columns"] = args["columns"]
        table = backend.read(command)
        rows = [{k: _jsonable(v) for k, v in r.items()} for r in table.to_pylist()]
        text = _render_table(table, "markdown", self.config.max_response_bytes)[0]
        return Answer({"table": meta.name, "columns": rows}, text, rows=len(rows), bytes=len(text.encode()))

    def run_query(self, backend: Backend, args: dict[str, Any]) -> Answer:
        cfg = self.config
        max_rows = min(args.get("max_rows", cfg.default_rows), cfg.max_rows)
        fmt = args.get("format", "markdown")
        rows = backend.query(args["sql"], args.get("params", []), max_rows)
        max_rows = rows.max_rows  # the backend may hold it to the caller's cap
        renderer: _Renderer | None = None
        try:
            renderer = _Renderer(fmt, rows.reader.schema.names, cfg.max_response_bytes)
            by_bytes = False
            for row in _rows_of(iter(rows.reader)):
                if not renderer.add(row):
                    by_bytes = True
                    break
            cut = rows.cut()
        except BaseException as e:
            rows.failed(e.code if isinstance(e, QuiverError) else "INTERNAL")
            raise
        finally:
            if renderer is not None:
                rows.sent(renderer.rows, renderer.size)
            rows.close()
        assert renderer is not None  # made first in the try, which raised otherwise
        data = renderer.finish()
        by_rows = bool(cut) and not by_bytes
        truncated = by_bytes or by_rows
        structured = {
            "format": fmt,
            "columns": _columns(rows.reader.schema),
            "data": data,
            "rows_returned": renderer.rows,
            "truncated": truncated,
            "truncated_by": "max_response_bytes" if by_bytes else ("max_rows" if by_rows else None),
            "total_rows": None if truncated else renderer.rows,
            "max_rows": max_rows,
        }
        if by_bytes:
            note = (
                f"{renderer.rows} row(s) shown: the answer was cut at {cfg.max_response_bytes:,} bytes "
                "([mcp] max_response_bytes); select fewer columns, aggregate, or use export_query"
            )
        elif by_rows:
            note = (
                f"{renderer.rows} row(s) shown: more rows exist beyond max_rows={max_rows}; aggregate, "
                "filter, page with LIMIT/OFFSET, or use export_query for the full result"
            )
        else:
            note = f"{renderer.rows} row(s): the whole result"
        return Answer(
            structured, f"{note}\n\n{data}", rows=renderer.rows, bytes=len(data.encode()), sql=args["sql"]
        )

    def export_query(self, backend: Backend, args: dict[str, Any]) -> Answer:
        body: dict[str, Any] = {"query": args["sql"], "format": args.get("format", "parquet")}
        for key in ("params", "name", "max_rows"):
            if key in args:
                body[key] = args[key]
        info = backend.export(body)
        art = info["artefact"]
        base = self._download_base()
        download = info["download"]
        structured = {
            "id": art["id"],
            "name": art["name"],
            "format": art["format"],
            "size_bytes": art["size_bytes"],
            "rows": info.get("rows"),
            "truncated": bool(info.get("truncated")),
            "download": download,
            "download_url": (base.rstrip("/") + download) if base else None,
            "expires_at": art["expires_at"],
            # Parquet and Arrow-stream files are read over Flight as a table; CSV and NDJSON
            # carry no schema, so they are only downloaded (proto_docs/mcp.md).
            "flight_descriptor": (
                {"kind": "artefact", "id": art["id"]} if art["format"] in TABULAR_FILE_FORMATS else None
            ),
        }
        text = (
            f"Exported {info.get('rows')} row(s) into artefact {art['id']} ({art['format']}, "
            f"{art['size_bytes']:,} bytes); download it at {structured['download_url'] or download} "
            "with your token, or read it with read_artefact."
        )
        return Answer(
            structured, text, rows=int(info.get("rows") or 0), bytes=int(art["size_bytes"]), sql=args["sql"]
        )

    def list_artefacts(self, backend: Backend, args: dict[str, Any]) -> Answer:
        page = backend.artefacts(
            {k: v for k, v in args.items() if k in ("kind", "tag", "page_size", "after")}
        )
        items = [_artefact_summary(a) for a in page["items"]]
        lines = [
            f"- {a['id']} {a['name']} ({a['kind']}, {a['format']}, {a['size_bytes']:,} bytes)" for a in items
        ]
        text = "\n".join(lines) if lines else "No artefact is visible to you."
        if page.get("next"):
            text += f"\n(more: pass after={page['next']!r})"
        return Answer(
            {"artefacts": items, "next": page.get("next")}, text, rows=len(items), bytes=len(text.encode())
        )

    def read_artefact(self, backend: Backend, args: dict[str, Any]) -> Answer:
        found = backend.read_artefact(args["id"], args.get("rows", 10))
        art = _artefact_summary(found["artefact"])
        structured: dict[str, Any] = {
            "artefact": art,
            "columns": found.get("columns"),
            "rows": found.get("rows"),
            "text": found.get("text"),
            "truncated": bool(found.get("truncated")),
        }
        body = ""
        if found.get("rows") is not None:
            columns = found.get("columns") or []
            renderer = _Renderer("markdown", columns, self.config.max_response_bytes)
            for row in found["rows"]:
                if not renderer.add(row):
                    structured["truncated"] = True
                    break
            body = renderer.finish()
        elif found.get("text") is not None:
            body = str(found["text"])[: self.config.max_response_bytes]
        head = f"Artefact {art['id']} {art['name']} ({art['kind']}, {art['format']}, {art['size_bytes']:,} bytes)"
        text = head + ("\n\n" + body if body else "")
        return Answer(structured, text, bytes=len(text.encode()))


def _artefact_summary(a: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("id", "name", "kind", "format", "media_type", "size_bytes", "rows", "description", "tags")
    out = {k: a.get(k) for k in keys}
    out["created_at"] = a.get("created_at")
    out["expires_at"] = a.get("expires_at")
    out["stale"] = a.get("stale")
    return out


def table_markdown(meta: TableMeta) -> str:
    """A table's description and schema as markdown (describe_table, and the table's
    resource ``quiver://tables/<schema>.<table>``)."""
    lines = [f"# {meta.name}", ""]
    if meta.description:
        lines += [meta.description, ""]
    lines.append(
        f"{meta.rows:,} rows" + (f"; data changed {meta.changed_at.isoformat()}" if meta.changed_at else "")
    )
    lines += ["", "| column | type | nullable | description |", "| --- | --- | --- | --- |"]
    for f in meta.schema:
        lines.append(
            f"| {_md(f.name)} | {_md(str(f.type))} | {'yes' if f.nullable else 'no'} | {_md(meta.columns.get(f.name, ''))} |"
        )
    return "\n".join(lines)


def sql_fingerprint(sql: str | None) -> str | None:
    return hashlib.sha256(sql.encode()).hexdigest()[:12] if sql else None


def _specs(cfg: McpConfig) -> list[ToolSpec]:
    rows_arg = {
        "type": "integer",
        "minimum": 1,
        "maximum": cfg.max_rows,
        "description": f"At most this many rows (default {cfg.default_rows}, at most {cfg.max_rows}).",
    }
    return [
        ToolSpec(
            "list_tables",
            "List readable tables",
            "The warehouse tables you may read: name ('schema.table'), description, row count, "
            "column count and when the data last changed. Start here, then describe_table.\n"
            "Example: list_tables {}",
            _schema({}),
            {
                "type": "object",
                "properties": {
                    "tables": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "description": {"type": "string"},
                                "rows": {"type": "integer"},
                                "column_count": {"type": "integer"},
                                "changed_at": {"type": ["string", "null"]},
                            },
                            "required": ["name", "rows", "column_count"],
                        },
                    }
                },
                "required": ["tables"],
            },
            ToolBox.list_tables,
        ),
        ToolSpec(
            "describe_table",
            "Describe a table",
            "A table's columns (type, nullability, description, and statistics when a profile is "
            f"cached), its description and row count, and its first {DESCRIBE_SAMPLE_ROWS} rows. "
            "Use it before writing SQL on a table.\n"
            'Example: describe_table {"table": "demo.orders"}',
            _schema({"table": _TABLE}, ["table"]),
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "rows": {"type": "integer"},
                    "changed_at": {"type": ["string", "null"]},
                    "columns": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "type": {"type": "string"},
                                "nullable": {"type": "boolean"},
                                "description": {"type": "string"},
                                "profile": {
                                    "type": ["object", "null"],
                                    "description": "Cached statistics (profile_table), when present.",
                                },
                            },
                            "required": ["name", "type"],
                        },
                    },
                    "sample": {"type": "string"},
                    "sample_rows": {"type": "integer"},
                },
                "required": ["name", "columns"],
            },
            ToolBox.describe_table,
        ),
        ToolSpec(
            "sample_table",
            "Sample rows of a table",
            "Rows of one table without writing SQL: the first N (method 'head', default), N at "
            "random ('random', reproducible with 'seed'), or a random 'percent' of the rows "
            "(reproducible with 'seed'); optionally only some 'columns'.\n"
            'Example: sample_table {"table": "demo.orders", "rows": 20, "method": "random", "seed": 7}',
            _schema(
                {
                    "table": _TABLE,
                    "rows": {
                        **rows_arg,
                        "description": f"How many rows (default 10, at most {cfg.max_rows}).",
                    },
                    "method": {"type": "string", "enum": ["head", "random"], "default": "head"},
                    "percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
                    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
                    "columns": _COLUMNS_ARG,
                    "format": _FORMAT,
                },
                ["table"],
            ),
            {
                "type": "object",
                "properties": {"table": {"type": "string"}, **_ROWS_OUT},
                "required": ["data", "truncated"],
            },
            ToolBox.sample_table,
        ),
        ToolSpec(
            "profile_table",
            "Profile a table's columns",
            "Statistics per column of one table (the data plane's profile: count, nulls, distinct, "
            "min, max, mean, quartiles, top values …), cached per data version.\n"
            'Example: profile_table {"table": "demo.orders", "columns": ["amount", "status"]}',
            _schema({"table": _TABLE, "columns": _COLUMNS_ARG}, ["table"]),
            {
                "type": "object",
                "properties": {
                    "table": {"type": "string"},
                    "columns": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["table", "columns"],
            },
            ToolBox.profile_table,
        ),
        ToolSpec(
            "run_query",
            "Run a read-only SQL query",
            "Run one read-only DuckDB SELECT on the tables you may read, with positional parameters "
            f"(? or $1). Answers at most max_rows rows (default {cfg.default_rows}, at most "
            f"{cfg.max_rows}) and at most {cfg.max_response_bytes:,} bytes, and always says whether "
            "the answer was truncated and why. For a large result use export_query.\n"
            'Example: run_query {"sql": "SELECT status, count(*) AS n FROM demo.orders WHERE amount > ? '
            'GROUP BY status ORDER BY n DESC", "params": [100], "max_rows": 10}',
            _schema(
                {
                    "sql": {"type": "string", "minLength": 1, "maxLength": MAX_STRING},
                    "params": _PARAMS,
                    "max_rows": rows_arg,
                    "format": _FORMAT,
                },
                ["sql"],
            ),
            {
                "type": "object",
                "properties": {
                    **_ROWS_OUT,
                    "total_rows": {
                        "type": ["integer", "null"],
                        "description": "The result's row count, when known.",
                    },
                    "max_rows": {"type": "integer"},
                },
                "required": ["data", "rows_returned", "truncated"],
            },
            ToolBox.run_query,
            sql_argument="sql",
        ),
        ToolSpec(
            "export_query",
            "Export a query's full result to a file",
            "Run a query and save its whole result (not cut at run_query's limits) as a file "
            "artefact: parquet (default), csv, ndjson or arrow. Answers the artefact id, size, "
            "rows, a download URL (send your token) and the Flight descriptor.\n"
            'Example: export_query {"sql": "SELECT * FROM demo.orders WHERE status = ?", "params": '
            '["shipped"], "format": "csv"}',
            _schema(
                {
                    "sql": {"type": "string", "minLength": 1, "maxLength": MAX_STRING},
                    "params": _PARAMS,
                    "format": {
                        "type": "string",
                        "enum": ["parquet", "csv", "ndjson", "arrow"],
                        "default": "parquet",
                    },
                    "name": {"type": "string", "minLength": 1, "maxLength": 200},
                    "max_rows": {"type": "integer", "minimum": 1},
                },
                ["sql"],
            ),
            {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "name": {"type": "string"},
                    "format": {"type": "string"},
                    "size_bytes": {"type": "integer"},
                    "rows": {"type": ["integer", "null"]},
                    "truncated": {"type": "boolean"},
                    "download": {"type": "string"},
                    "download_url": {"type": ["string", "null"]},
                    "expires_at": {"type": "string"},
                    "flight_descriptor": {"type": ["object", "null"]},
                },
                "required": ["id", "size_bytes", "download", "flight_descriptor"],
            },
            ToolBox.export_query,
            sql_argument="sql",
        ),
        ToolSpec(
            "list_artefacts",
            "List your artefacts",
            "The artefacts (saved tables and exported files) you may see, oldest first, a page at a "
            "time: pass the answer's 'next' as 'after'.\n"
            'Example: list_artefacts {"kind": "file", "page_size": 20}',
            _schema(
                {
                    "kind": {"type": "string", "enum": ["table", "file"]},
                    "tag": {"type": "string", "maxLength": 200},
                    "page_size": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "after": {"type": "string", "maxLength": 100},
                }
            ),
            _PAGE_OUT,
            ToolBox.list_artefacts,
        ),
        ToolSpec(
            "read_artefact",
            "Read an artefact's metadata and first rows",
            "One artefact's metadata and a bounded preview: its first rows (tables, parquet, arrow) "
            "or first lines (csv, ndjson).\n"
            'Example: read_artefact {"id": "0190c2a4-…", "rows": 5}',
            _schema(
                {
                    "id": {"type": "string", "minLength": 1, "maxLength": 100},
                    "rows": {"type": "integer", "minimum": 0, "maximum": 100},
                },
                ["id"],
            ),
            {
                "type": "object",
                "properties": {
                    "artefact": _ARTEFACT_OUT,
                    "columns": {"type": ["array", "null"]},
                    "rows": {"type": ["array", "null"]},
                    "text": {"type": ["string", "null"]},
                    "truncated": {"type": "boolean"},
                },
                "required": ["artefact", "truncated"],
            },
            ToolBox.read_artefact,
        ),
    ]
