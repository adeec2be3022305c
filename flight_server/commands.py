"""Descriptors and action bodies → typed msgspec Structs (proto_docs/descriptors.md,
proto_docs/actions.md).

A PATH descriptor ``[schema, table]`` is a full table scan. A CMD descriptor is a UTF-8 JSON
object whose ``kind`` selects one msgspec Struct of a tagged union; unknown fields are
errors, so a misspelt ``max_rows`` can never silently lift a limit. Every problem becomes
INVALID_ARGUMENT with one sentence that names the field and says what is allowed: agents are
programs that read the error and retry.

Action bodies go through :func:`decode_body`, the one decoder of an action's JSON body, with
the same size and nesting bounds as a command; :func:`explain` is the one place msgspec's
messages become those sentences, for commands and bodies alike. (The ``whoami`` answer is
``catalog.identity.WhoAmI``, shared with the control plane; times in answers are written by
``catalog.clock.iso``.)

Size checks against ``[limits]`` live here too, next to the shapes they constrain, so that
GetFlightInfo and GetSchema refuse exactly the same commands.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgspec
import pyarrow.flight as flight

from catalog import InvalidArgument
from catalog.config import LimitsConfig
from catalog.errors import bounded

MAX_COMMAND_BYTES = 1 << 20
MAX_SQL_CHARS = 100_000
MAX_PARAMS = 1_000
#: Lists and objects inside one parameter value nest at most this deep (DuckDB binds nested
#: values recursively; a command nested thousands deep must be refused, not crash a decoder).
MAX_PARAM_DEPTH = 32
#: JSON nesting of a whole command: a query command is an object (1) with a params list (2)
#: of values nested MAX_PARAM_DEPTH deep.
MAX_COMMAND_DEPTH = MAX_PARAM_DEPTH + 2
MAX_SEED = 2**63 - 1

# JSON scalars and (nested) lists/objects: DuckDB binds them as its own values.
Param = Any
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]


class _Command(msgspec.Struct, tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    pass


class QueryCommand(_Command, tag="query"):
    """A guarded, read-only SQL query with positional ``?`` (or ``$1``) parameters; also the
    body of ``submit-query`` (where ``kind`` may be left out)."""

    usage: ClassVar[str] = '{"sql": "...", "params": [...], "max_rows": N}'

    sql: str
    params: list[Param] = []
    max_rows: int | None = None


class SampleCommand(_Command, tag="sample"):
    """First N rows, a random percent (bernoulli) or random N rows (reservoir) of a table."""

    table: str
    rows: int | None = None
    percent: float | None = None
    method: Literal["first", "random"] | None = None
    seed: Seed | None = None
    columns: list[str] | None = None


class ProfileCommand(_Command, tag="profile"):
    """One row of statistics per column of a table (or of the named ``columns``)."""

    table: str
    columns: list[str] | None = None
    #: Only a profile already cached for the table's current data version; no rows (and no
    #: scan) when there is none (MCP's describe_table: statistics when they cost nothing).
    cached_only: bool = False


class ResultCommand(_Command, tag="result"):
    """The stored result of an async query (``submit-query``)."""

    id: str


class ArtefactCommand(_Command, tag="artefact"):
    """A tabular artefact (proto_docs/artefacts.md): ``{"kind": "artefact", "id": ...}`` reads
    one (GetFlightInfo, GetSchema); DoPut's ``{"kind": "artefact", "name": ..., "tags": [...],
    "description": ..., "ttl_seconds": N}`` saves one."""

    id: str | None = None
    name: str | None = None
    tags: list[str] | None = None
    description: str | None = None
    ttl_seconds: int | None = None

    def for_read(self) -> str:
        """The id to read; refuses upload fields (they belong to DoPut)."""
        extra = [f for f in ("name", "tags", "description", "ttl_seconds") if getattr(self, f) is not None]
        if self.id is None:
            raise InvalidArgument(
                'an artefact command needs its "id" to be read: {"kind": "artefact", "id": "..."}; '
                'to save one, DoPut {"kind": "artefact", "name": "..."}'
            )
        if extra:
            raise InvalidArgument(
                f"fields {', '.join(extra)} of an artefact command are for DoPut (saving); "
                'to read an artefact send only {"kind": "artefact", "id": "..."}'
            )
        return self.id

    def for_upload(self) -> ArtefactCommand:
        """The command of a DoPut; refuses an id (the server assigns ids)."""
        if self.id is not None:
            raise InvalidArgument(
                'DoPut saves a new artefact and the server assigns its id: leave out "id" '
                '({"kind": "artefact", "name": "...", "tags": [...], "description": "...", "ttl_seconds": N})'
            )
        if self.name is None:
            raise InvalidArgument(
                'DoPut of an artefact needs its "name": {"kind": "artefact", "name": "...", '
                '"tags": [...], "description": "...", "ttl_seconds": N}'
            )
        return self


Command = QueryCommand | SampleCommand | ProfileCommand | ResultCommand | ArtefactCommand
KINDS: dict[str, type[_Command]] = {
    "query": QueryCommand,
    "sample": SampleCommand,
    "profile": ProfileCommand,
    "result": ResultCommand,
    "artefact": ArtefactCommand,
}
_decoder = msgspec.json.Decoder(Command)


class QueryIdBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``query-status`` and ``cancel-query``."""

    usage: ClassVar[str] = '{"id": "..."} (the query id string that submit-query returned)'
    id: str


class RefreshBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``refresh-token`` (optional)."""

    usage: ClassVar[str] = '{"ttl_seconds": N} (or no body)'
    ttl_seconds: int | None = None


class EmptyBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of an action that takes none (an empty body or ``{}``)."""

    usage: ClassVar[str] = "no body (or {})"


class MyQueriesBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``my-queries`` (optional): how many of the caller's last records."""

    usage: ClassVar[str] = '{"limit": N} (1 to 1000, default 50; or no body)'
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class ExportBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``export``: a query (with its parameters) or a whole table, into a file
    artefact (catalog/exports.py)."""

    usage: ClassVar[str] = (
        '{"query": "...", "params": [...]} or {"table": "schema.table"}, with "format": '
        '"parquet" | "csv" | "ndjson" | "arrow", and optionally "name", "ttl_seconds", "max_rows", '
        '"tags", "description", "async"'
    )
    query: str | None = None
    params: list[Param] = []
    table: str | None = None
    format: Literal["parquet", "csv", "ndjson", "arrow"] = "parquet"
    name: str | None = None
    ttl_seconds: int | None = None
    max_rows: int | None = None
    tags: list[str] = []
    description: str = ""
    #: Run in the background (as an async query: answers its id, query-status shows progress).
    run_async: bool = msgspec.field(default=False, name="async")


class RefreshArtefactBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``refresh-artefact``."""

    usage: ClassVar[str] = '{"id": "..."} (an exported artefact), optionally "ttl_seconds"'
    id: str
    ttl_seconds: int | None = None


class ListArtefactsBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``list-artefacts`` (optional): a page of the artefacts you may see."""

    usage: ClassVar[str] = (
        '{"kind": "table" | "file", "tag": "...", "page_size": N, "after": "<id>"} (all optional)'
    )
    kind: Literal["table", "file"] | None = None
    tag: str | None = None
    page_size: int = 100
    after: str | None = None


class ReadArtefactBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``read-artefact``: an artefact's metadata and bounded head."""

    usage: ClassVar[str] = '{"id": "...", "rows": N} (rows: 0 to 100, default 10)'
    id: str
    rows: int = 10


class TableScan(msgspec.Struct, frozen=True):
    """A PATH descriptor: every row of one table."""

    schema: str
    table: str


def _field_names(cls: type[_Command]) -> str:
    return ", ".join(["kind", *(f.name for f in msgspec.structs.fields(cls))])


def _usage(cls: type[msgspec.Struct]) -> str:
    usage = getattr(cls, "usage", None)
    if isinstance(usage, str):
        return usage
    return "{" + ", ".join(f'"{f.name}": ...' for f in msgspec.structs.fields(cls)) + "}"


def explain(  # noqa: PLR0911  one sentence per kind of msgspec error
    raw: bytes,
    err: msgspec.ValidationError,
    *,
    action: str | None = None,
    body: type[msgspec.Struct] | None = None,
) -> str:
    """Turn msgspec's message into a sentence that names the field and what is allowed: for
    a command (``action`` None), or for the body ``body`` of ``action``."""
    text = str(err)
    obj: object = None
    with contextlib.suppress(ValueError, RecursionError):  # not JSON: msgspec said so already
        obj = json.loads(raw)
    kind: object = obj.get("kind") if isinstance(obj, dict) else None
    if isinstance(kind, str):
        kind = bounded(kind, 40)
    if action is not None and body is not None:
        tag = body.__struct_config__.tag if issubclass(body, _Command) else None
        if not isinstance(tag, str):
            return _explain_body(text, obj, action, body)
        if not isinstance(obj, dict):
            return f"{action}: the action body must be a JSON object: {_usage(body)}"
        if obj.get("kind", tag) != tag:
            return f"{action} takes a {tag}: {_usage(body)}"
        kind = tag
    kinds = ", ".join(KINDS)
    if text.startswith("Expected `object`"):
        return f'a command is a JSON object like {{"kind": "query", "sql": "SELECT 1"}}; got {text[9:]}'
    if text == "Object missing required field `kind`":
        return f'the command has no "kind"; use one of: {kinds}'
    if text.endswith("at `$.kind`"):
        return f"unknown kind {kind!r}; use one of: {kinds}"
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    allowed = f"; a {kind} command accepts: {_field_names(cls)}" if cls else ""
    if text.startswith("Object contains unknown field"):
        name = bounded(text.split("`")[1], 60)
        return f"unknown field {name!r} in a {kind} command{allowed}"
    if text.startswith("Object missing required field"):
        name = bounded(text.split("`")[1], 60)
        return f"a {kind} command needs the field {name!r}{allowed}"
    if " - at `$." in text:
        where, message = _at_field(text)
        return f"field {where!r} of the {kind} command: {message}"
    return f"invalid {kind} command: {text}"


def _at_field(text: str) -> tuple[str, str]:
    """msgspec's ``"<Message> - at `$.<path>`"`` → (path, message in lower case)."""
    message, _, where = text.rpartition(" - at `$.")
    return bounded(where.rstrip("`"), 60), message[:1].lower() + message[1:]


def _explain_body(text: str, obj: object, action: str, body: type[msgspec.Struct]) -> str:
    usage = _usage(body)
    if not isinstance(obj, dict) or text.startswith("Expected `object`"):
        return f"{action}: the action body must be a JSON object: {usage}"
    if text.startswith("Object contains unknown field"):
        known = set(body.__struct_fields__)
        extra = sorted(str(k) for k in obj if k not in known)
        return f"{action} takes {usage}; unexpected field(s): {bounded(', '.join(extra), 80)}"
    if text.startswith("Object missing required field"):
        return f"{action} takes {usage}; the field {bounded(text.split('`')[1], 60)!r} is missing"
    if " - at `$." in text:
        where, message = _at_field(text)
        return f"{action} takes {usage}; field {where!r}: {message}"
    return f"{action} takes {usage}: {text}"


S = TypeVar("S", bound=msgspec.Struct)


def decode_body(raw: bytes, cls: type[S], action: str) -> S:
    """The body of ``action`` as ``cls``: the one decoder of action bodies, with the size and
    nesting bounds of a command. An empty body is ``cls()`` when every field has a default."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"{action}: the body is {len(raw)} bytes; at most {MAX_COMMAND_BYTES} are accepted"
        )
    depth = json_depth(raw)
    if depth > MAX_COMMAND_DEPTH:
        raise InvalidArgument(
            f"{action}: the body nests lists/objects {depth} levels deep; at most {MAX_COMMAND_DEPTH} "
            "are accepted"
        )
    if not raw.strip():
        try:
            return cls()
        except TypeError:  # a required field
            raise InvalidArgument(f"{action}: the action body must be a JSON object: {_usage(cls)}") from None
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as e:
        raise InvalidArgument(explain(raw, e, action=action, body=cls)) from None
    except msgspec.DecodeError:
        raise InvalidArgument(f"{action}: the action body must be a JSON object: {_usage(cls)}") from None


def decode_command(raw: bytes) -> Command:
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidArgument(f"the command is {len(raw)} bytes; at most {MAX_COMMAND_BYTES} are accepted")
    depth = json_depth(raw)
    if depth > MAX_COMMAND_DEPTH:
        raise InvalidArgument(
            f"the command nests lists/objects {depth} levels deep; at most {MAX_COMMAND_DEPTH} are "
            f"accepted (parameter values at most {MAX_PARAM_DEPTH})"
        )
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise InvalidArgument(explain(raw, e)) from None
    except msgspec.DecodeError as e:
        raise InvalidArgument(
            f"the command is not valid UTF-8 JSON ({e}); send an object like "
            '{"kind": "query", "sql": "SELECT 1"}'
        ) from None


def json_depth(raw: bytes) -> int:
    """How deeply the JSON text ``raw`` nests arrays and objects, without decoding it (a
    decoder recurses once per level). Brackets inside strings do not count; invalid JSON gets
    some number, and the decoder then says what is wrong with it."""
    if b"[" not in raw and b"{" not in raw:
        return 0
    # Strings first: drop escaped characters, then everything between quotes.
    text = _ESCAPE.sub(b"", raw)
    text = _STRING.sub(b"", text)
    depth = deepest = 0
    for opened in _BRACKETS.findall(text):
        if opened in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def decode_descriptor(descriptor: flight.FlightDescriptor) -> Command | TableScan:
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        try:
            path = [p.decode() if isinstance(p, bytes) else str(p) for p in descriptor.path]
        except UnicodeDecodeError:
            raise InvalidArgument("PATH descriptor parts must be UTF-8 text") from None
        if len(path) != 2 or not all(path):
            raise InvalidArgument(f"a PATH descriptor is [schema, table], got {bounded(path, 120)}")
        return TableScan(path[0], path[1])
    if descriptor.descriptor_type == flight.DescriptorType.CMD:
        return decode_command(descriptor.command)
    raise InvalidArgument("unknown descriptor type: use PATH [schema, table] or CMD (a JSON command)")


def split_table_name(name: str, field: str = "table") -> tuple[str, str]:
    """``schema.table`` (each part optionally double-quoted) → (schema, table)."""
    parts = _split_dotted(name)
    if parts is None or len(parts) != 2 or not all(parts):
        raise InvalidArgument(f'field {field!r}: expected "schema.table", got {name!r}')
    return parts[0], parts[1]


def _split_dotted(name: str) -> list[str] | None:
    parts: list[str] = []
    i, n = 0, len(name)
    while i <= n:
        if i < n and name[i] == '"':
            j, buf = i + 1, []
            while True:
                k = name.find('"', j)
                if k < 0:
                    return None
                buf.append(name[j:k])
                if k + 1 < n and name[k + 1] == '"':
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            parts.append("".join(buf))
        else:
            k = name.find(".", i)
            k = n if k < 0 else k
            parts.append(name[i:k].strip())
            i = k
        if i >= n:
            break
        if name[i] != ".":
            return None
        i += 1
    return parts


# --- checks against [limits] -----------------------------------------------------------
def check_query(cmd: QueryCommand, max_rows: int, source: str = "[limits] max_rows") -> int:
    """Validate a query command; return the row cap to apply: the caller's own ``max_rows``,
    which may not exceed ``max_rows`` — the server's cap for the caller, set by ``source``
    (``[limits] max_rows`` or the caller's swarm's limits, catalog/limits.py)."""
    if not cmd.sql.strip():
        raise InvalidArgument("field 'sql' is empty: send one SELECT statement")
    if len(cmd.sql) > MAX_SQL_CHARS:
        raise InvalidArgument(
            f"field 'sql' is {len(cmd.sql)} characters; at most {MAX_SQL_CHARS} are accepted"
        )
    if len(cmd.params) > MAX_PARAMS:
        raise InvalidArgument(
            f"field 'params' has {len(cmd.params)} values; at most {MAX_PARAMS} are accepted"
        )
    if cmd.max_rows is None:
        return max_rows
    if not 1 <= cmd.max_rows <= max_rows:
        raise InvalidArgument(
            f"field 'max_rows' must be between 1 and {max_rows} (the server's limit: {source}), "
            f"got {cmd.max_rows}"
        )
    return cmd.max_rows


def check_sample(cmd: SampleCommand, limits: LimitsConfig) -> None:
    """Shape rules of a sample; the percent-vs-table-size check needs the table (planner)."""
    cap = limits.max_sample_rows
    if (cmd.rows is None) == (cmd.percent is None):
        raise InvalidArgument(
            "a sample needs exactly one of 'rows' (N rows) or 'percent' (a random share in (0, 100])"
        )
    if cmd.rows is not None and not 1 <= cmd.rows <= cap:
        raise InvalidArgument(
            f"field 'rows' must be between 1 and {cap} ([limits] max_sample_rows), got {cmd.rows}"
        )
    if cmd.percent is not None:
        if not 0 < cmd.percent <= 100:
            raise InvalidArgument(f"field 'percent' must be in (0, 100], got {cmd.percent}")
        if cmd.method == "first":
            raise InvalidArgument("a percent sample is random: drop 'method' or set it to \"random\"")
    if cmd.seed is not None and cmd.method != "random" and cmd.percent is None:
        raise InvalidArgument(
            "field 'seed' applies to random samples: add \"method\": \"random\" or use 'percent'"
        )
    if cmd.columns is not None:
        if not cmd.columns:
            raise InvalidArgument("field 'columns' is empty: omit it for every column or name some")
        lowered = [c.lower() for c in cmd.columns]
        dupes = sorted({c for c in cmd.columns if lowered.count(c.lower()) > 1})
        if dupes:
            raise InvalidArgument(f"field 'columns' names {', '.join(map(repr, dupes))} more than once")
