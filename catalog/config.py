"""Configuration: one TOML file, overridden by ``QUIVER_<SECTION>_<KEY>`` variables, then by
CLI flags, decoded into msgspec Structs.

Every problem is a one-line :class:`ConfigError` that names the key and what is allowed, so
an operator fixes it without reading code. Unknown keys are errors: a typo must never be
silently ignored (a misspelt ``max_rows`` would otherwise quietly lift a limit).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec

from catalog.errors import ConfigError
from catalog.resources import parse_size
from catalog.snowflake_names import split_snowflake_name

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    flight_port: Port = 8815
    http_port: Port = 8000
    data_dir: str = "var"
    # An existing DuckDB file to serve; default: DATA_DIR/quiver.duckdb.
    database: str | None = None
    public_metrics: bool = False
    # Host name clients use to reach the Flight listener (defaults to host, or localhost
    # when host is a wildcard); endpoints' locations are built from it.
    advertise_host: str | None = None
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class LimitsConfig(_Section):
    query_timeout_seconds: PositiveFloat = 30.0
    max_rows: PositiveInt = 10_000_000
    max_sample_rows: PositiveInt = 1_000_000
    # Queries (FlightInfos being planned or streamed) of one principal at once.
    max_concurrent_queries: PositiveInt = 4
    # Streams and planning steps of all principals at once; beyond it a call waits up to
    # admission_wait_seconds for a slot, then gets RESOURCE_EXHAUSTED (flight_server/admission.py).
    max_concurrent_total: PositiveInt = 32
    admission_wait_seconds: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    # How long a Flight ticket (from GetFlightInfo) may be redeemed with DoGet.
    ticket_ttl_seconds: PositiveFloat = 300.0
    # DuckDB's memory_limit: "auto" = half of the memory available (physical or cgroup),
    # or a size ("2GB"). See catalog/resources.py.
    memory_limit: str = "auto"
    # quiver serve's address-space bound (RLIMIT_AS): "auto" = what is reserved but not
    # resident + 90% of the memory available, kept current; a size; or "off".
    address_space_limit: str = "auto"
    # DuckDB worker threads; 0 = one per core.
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0
    # How far a swarm's limits (PUT /v1/swarms/{name}/limits, catalog/limits.py) may loosen
    # max_rows and query_timeout_seconds; unset: not at all (an override may only tighten).
    max_rows_ceiling: PositiveInt | None = None
    query_timeout_ceiling_seconds: PositiveFloat | None = None

    @property
    def rows_ceiling(self) -> int:
        """The most rows a swarm's override may allow (catalog/limits.py)."""
        return self.max_rows_ceiling or self.max_rows

    @property
    def timeout_ceiling(self) -> float:
        """The longest query timeout a swarm's override may allow (catalog/limits.py)."""
        return float(self.query_timeout_ceiling_seconds or self.query_timeout_seconds)


class FlightConfig(_Section):
    """How scans and simple one-table queries are split into parallel endpoints
    (flight_server/planner.py, proto_docs/descriptors.md "Endpoints")."""

    # Rows per endpoint: a split read has rows // split_part_rows endpoints ...
    split_part_rows: PositiveInt = 2 * 122_880
    # ... at most this many ...
    split_max_parts: PositiveInt = 8
    # ... and only from this many rows (and at least two parts' worth): below it one stream.
    split_min_rows: Annotated[int, msgspec.Meta(ge=0)] = 500_000
    # Part boundaries are multiples of this many rowids (DuckDB's row group: each endpoint
    # then reads whole row groups).
    split_align_rows: PositiveInt = 122_880


class TokensConfig(_Section):
    default_ttl_seconds: PositiveInt = 86_400
    max_ttl_seconds: PositiveInt = 30 * 86_400
    leeway_seconds: Annotated[int, msgspec.Meta(ge=0)] = 0
    issuer: str = "quiver"
    # Seconds between flushes of the in-memory "last used" times to the catalog.
    last_used_flush_seconds: PositiveFloat = 10.0
    # Lifetime of the admin token the server keeps in DATA_DIR/admin.token (unset: the
    # maximum). The server writes a new one once less than admin_token_renew_fraction of
    # this lifetime remains, so the file always holds a token with at least that much left
    # (checked by the housekeeping thread, at least four times per renewal window).
    admin_token_ttl_seconds: PositiveInt | None = None
    admin_token_renew_fraction: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5

    @property
    def admin_ttl_seconds(self) -> int:
        return self.admin_token_ttl_seconds or self.max_ttl_seconds


class ResultsConfig(_Section):
    """Async queries (``submit-query``): results kept as Arrow IPC files in DATA_DIR/results."""

    # How long a finished query's status and result stay fetchable.
    ttl_seconds: PositiveFloat = 3600.0
    # Queries of one principal that may be queued or running at once.
    max_active_per_principal: PositiveInt = 4
    # Async queries running at once (the rest wait, state "queued").
    workers: PositiveInt = 2
    # A running async query is interrupted after this many seconds (DEADLINE_EXCEEDED).
    timeout_seconds: PositiveFloat = 600.0
    # A result larger than this fails with RESOURCE_EXHAUSTED (protects the disk).
    max_result_bytes: PositiveInt = 2 * 1024**3
    # All kept and running results together: a query that would exceed it fails the same way.
    max_total_bytes: PositiveInt = 8 * 1024**3


class CacheConfig(_Section):
    """Result cache of identical queries, keyed by the data versions of the tables read."""

    enabled: bool = True
    ttl_seconds: PositiveFloat = 300.0
    # Total size of DATA_DIR/cache; least recently used entries are evicted beyond it.
    max_bytes: PositiveInt = 512 * 1024**2
    # Results larger than this are streamed but not cached.
    max_entry_bytes: PositiveInt = 64 * 1024**2
    # Small results (up to 1 MiB each) are kept in memory, not in files, within this budget
    # (0: every entry goes to DATA_DIR/cache).
    max_memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 32 * 1024**2
    # Hot-table cache: tables read by full scans are kept in memory as Arrow, within this
    # many bytes ("auto": 1/8 of the memory available; 0: off). See flight_server/table_cache.py.
    table_memory_bytes: Annotated[int, msgspec.Meta(ge=0)] | Literal["auto"] = "auto"
    # How a table gets into it: "idle" — the scan that missed streams exactly like an uncached
    # scan and queues the table, which is loaded while the data plane is idle (no call for
    # 0.25 s; it yields when one starts); "scan" — the first scan keeps the batches it sends.
    table_fill: Literal["idle", "scan"] = "idle"
    # Remember which tables the hot-table cache holds (names and versions, never data) in
    # DATA_DIR/hot-tables.json, and load them again in the background after a restart, as
    # the idle fill does (table_fill = "idle" only). See flight_server/table_cache.py.
    reload_hot_tables: bool = True


class ArtefactsConfig(_Section):
    """Artefacts: tables and files agents save and share (catalog/artefacts.py)."""

    # Lifetime of an artefact saved without ttl_seconds, and the longest one may ask for.
    default_ttl_seconds: PositiveInt = 7 * 86_400
    max_ttl_seconds: PositiveInt = 90 * 86_400
    # Seconds between janitor passes (expired artefacts, orphaned files and rows); one runs at start.
    cleanup_interval_seconds: PositiveFloat = 300.0
    # Largest single artefact's content, in bytes.
    max_upload_bytes: PositiveInt = 1024**3
    # Per swarm (admins' artefacts are not counted): content bytes and artefacts kept at once.
    swarm_quota_bytes: PositiveInt = 10 * 1024**3
    swarm_quota_count: PositiveInt = 10_000


class McpConfig(_Section):
    """The Model Context Protocol endpoint ``/mcp`` and ``quiver mcp`` (proto_docs/mcp.md)."""

    enabled: bool = True
    # Host header values /mcp answers (DNS-rebinding protection): "name", "name:port" or
    # "name:*". Empty: the listener's own host and localhost, on any port.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    # Origin header values a browser may send (scheme://host[:port], ":*" for any port);
    # empty: only the hosts above, over http and https.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    # Rows run_query returns when the caller asks for none, and the most it may ask for.
    default_rows: PositiveInt = 100
    max_rows: PositiveInt = 1000
    # Bytes of rendered result one tool answer holds at most (the rest is cut, and said so).
    max_response_bytes: PositiveInt = 64 * 1024
    # Tool calls per principal per minute, and at once.
    calls_per_minute: PositiveInt = 120
    max_concurrent_calls: PositiveInt = 4


class DemoConfig(_Section):
    # Multiplies the demo tables' sizes (1.0: customers 100k, orders 2M, events 5M).
    scale: PositiveFloat = 1.0


class TlsConfig(_Section):
    # PEM files; both set = both listeners serve TLS only (grpc+tls:// and https://).
    # Read at start-up: a renewed certificate takes effect on the next restart.
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


class BackupConfig(_Section):
    # Where snapshots are written (by `quiver backup` and POST /v1/backup); default
    # DATA_DIR/backups. Under systemd it must be writable by the service (ReadWritePaths).
    dir: str | None = None
    # A file holding 32 random bytes in base64 (`openssl rand -base64 32`, kept in the
    # vault, written 0600). Set: snapshots are written encrypted, quiver-<time>.tar.gz.enc
    # (AES-256-GCM, catalog/snapshot_crypto.py), and `quiver restore` decrypts them with it.
    # Read at every backup and restore, so replacing the file needs no restart.
    encryption_key_file: str | None = None


class AuditConfig(_Section):
    """How long the catalog keeps history (catalog/retention.py)."""

    # Audit events older than this many days are deleted by the housekeeping thread, and so
    # are token records that expired longer ago than that. 0: keep everything forever.
    retention_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 90


class QueryLogConfig(_Section):
    """The query log of data-plane requests (catalog/query_log.py, proto_docs/governance.md)."""

    # Replace every literal of the recorded SQL text by ``?`` (DuckDB's tokenizer finds them).
    redact_literals: bool = False
    # Records older than this many days are deleted by the housekeeping thread. 0: keep all.
    retention_days: Annotated[int, msgspec.Meta(ge=0, le=36_500)] = 30


class SnowflakeConfig(_Section):
    """Connection to the Snowflake source of ``[[sync.tables]]`` (passed to
    ``snowflake.connector.connect``). Secrets come from files or ``QUIVER_SNOWFLAKE_PASSWORD``;
    an inline ``password`` works but is warned about at start-up. The timeouts bound a dead
    source: without socket/network timeouts the connector can hang a run for minutes."""

    account: str = ""
    user: str = ""
    password: str | None = None
    password_file: str | None = None
    private_key_file: str | None = None
    private_key_passphrase_file: str | None = None
    role: str | None = None
    warehouse: str | None = None
    database: str | None = None
    schema: str | None = None
    host: str | None = None
    port: Port | None = None
    protocol: Literal["https", "http"] = "https"
    login_timeout: PositiveFloat = 30.0
    network_timeout: PositiveFloat = 30.0
    socket_timeout: PositiveFloat = 30.0

    @property
    def configured(self) -> bool:
        return bool(self.account)


class SyncTableConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One replicated table (``[[sync.tables]]``); see proto_docs/sync.md."""

    source: str
    target: str
    mode: Literal["full", "append", "merge"] = "full"
    cursor: str | None = None
    primary_key: list[str] = msgspec.field(default_factory=list)
    on_schema_change: Literal["evolve", "resync", "fail"] = "evolve"
    interval_seconds: PositiveFloat = 3600.0
    lookback_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Extract in keyset pages of this many rows (bounded memory for sources that answer a
    # query in one piece); unset: one query, streamed in the chunks the source sends.
    batch_rows: PositiveInt | None = None
    # merge: every this many seconds also remove rows deleted at the source (key scan).
    reconcile_seconds: PositiveFloat | None = None


class SyncConfig(_Section):
    # Run the scheduler inside `quiver serve` (the CLI can still run tables by hand).
    enabled: bool = True
    retry_seconds: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    max_parallel: PositiveInt = 2
    # Each scheduled run is delayed by up to this fraction of the interval (spreads load).
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    # After failures the next run waits interval * 2^(failures-1), at most this long.
    max_backoff_seconds: PositiveFloat = 3600.0
    # Runs kept per table in the run history.
    history_runs: PositiveInt = 200
    tables: list[SyncTableConfig] = msgspec.field(default_factory=list)


class LiveTableConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One live table (``[[live.tables]]``): queried in Snowflake, never copied; see
    proto_docs/federation.md."""

    source: str
    target: str


class LiveConfig(_Section):
    """Live tables: Snowflake tables queried where they are (catalog/live.py,
    proto_docs/federation.md), through the ``[snowflake]`` connection."""

    # A live query runs at most this long in Snowflake (and at most [limits]
    # query_timeout_seconds); past it the Snowflake query is cancelled.
    query_timeout_seconds: PositiveFloat = 60.0
    # A live table's columns and row count are read from Snowflake at most this often.
    schema_ttl_seconds: PositiveFloat = 300.0
    # A live query's result is served again for this long without asking Snowflake (0: off).
    cache_ttl_seconds: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # Rows a query may pull out of Snowflake into Quiver for local work (mixed queries).
    max_pulled_rows: PositiveInt = 1_000_000
    # Live queries running at once, all principals together (each holds a Snowflake session).
    max_concurrent: PositiveInt = 8
    tables: list[LiveTableConfig] = msgspec.field(default_factory=list)


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    flight: FlightConfig = msgspec.field(default_factory=FlightConfig)
    tokens: TokensConfig = msgspec.field(default_factory=TokensConfig)
    demo: DemoConfig = msgspec.field(default_factory=DemoConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    backup: BackupConfig = msgspec.field(default_factory=BackupConfig)
    audit: AuditConfig = msgspec.field(default_factory=AuditConfig)
    query_log: QueryLogConfig = msgspec.field(default_factory=QueryLogConfig)
    snowflake: SnowflakeConfig = msgspec.field(default_factory=SnowflakeConfig)
    sync: SyncConfig = msgspec.field(default_factory=SyncConfig)
    live: LiveConfig = msgspec.field(default_factory=LiveConfig)
    results: ResultsConfig = msgspec.field(default_factory=ResultsConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    artefacts: ArtefactsConfig = msgspec.field(default_factory=ArtefactsConfig)
    mcp: McpConfig = msgspec.field(default_factory=McpConfig)

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir).expanduser().resolve()

    @property
    def database_path(self) -> Path:
        if self.server.database:
            return Path(self.server.database).expanduser().resolve()
        return self.data_dir / "quiver.duckdb"

    @property
    def backup_dir(self) -> Path:
        if self.backup.dir:
            return Path(self.backup.dir).expanduser().resolve()
        return self.data_dir / "backups"

    @property
    def backup_key_file(self) -> Path | None:
        if self.backup.encryption_key_file:
            return Path(self.backup.encryption_key_file).expanduser().resolve()
        return None


ENV_PREFIX = "QUIVER_"
# Arrays of tables cannot be written as one environment variable.
NOT_FROM_ENV = {("sync", "tables"), ("live", "tables")}


def _section_fields() -> dict[str, tuple[str, ...]]:
    """Section name -> field names, for sections that are plain tables (not arrays)."""
    sections: dict[str, tuple[str, ...]] = {}
    for field in msgspec.structs.fields(Config):
        tp = field.type
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            sections[field.name] = tuple(f.name for f in msgspec.structs.fields(tp))
    return sections


def _parse_env_value(raw: str) -> Any:
    """Read an environment value as a TOML scalar (``9000``, ``true``, ``1.5``) and fall back
    to the raw string, so ``QUIVER_SERVER_HOST=0.0.0.0`` needs no quoting."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def env_overrides(environ: dict[str, str] | os._Environ[str]) -> dict[str, dict[str, Any]]:
    """Collect ``QUIVER_<SECTION>_<KEY>`` variables. A variable naming a known section but an
    unknown key is an error; variables that name no section (e.g. ``QUIVER_URL`` used by
    client snippets) are not configuration and are left alone."""
    sections = _section_fields()
    out: dict[str, dict[str, Any]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        for section, fields in sections.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                if (section, key) in NOT_FROM_ENV:
                    raise ConfigError(f"{name}: `{section}.{key}` is an array; set it in the config file")
                if key not in fields:
                    raise ConfigError(
                        f"{name}: unknown key `{section}.{key}`; [{section}] accepts: {', '.join(fields)}"
                    )
                out.setdefault(section, {})[key] = _parse_env_value(raw)
                break
    return out


def _merge(base: dict[str, Any], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    merged = dict(base)
    for section, values in extra.items():
        current = merged.get(section, {})
        if not isinstance(current, dict):
            raise ConfigError(f"`{section}` must be a table ([{section}])")
        merged[section] = {**current, **values}
    return merged


def _allowed_values(where: str) -> tuple[object, ...]:
    """The choices of a Literal field at a dotted path such as ``server.log_format``."""
    tp: Any = Config
    for part in where.split("."):
        if not (isinstance(tp, type) and issubclass(tp, msgspec.Struct)):
            return ()
        fields = {f.name: f.type for f in msgspec.structs.fields(tp)}
        if part not in fields:
            return ()
        tp = fields[part]
    return get_args(tp) if get_origin(tp) is Literal else ()


def _friendly(err: msgspec.ValidationError) -> str:
    """msgspec says ``Expected `int` >= 1, got 0 - at `$.limits.max_rows```; we say
    ``limits.max_rows: expected `int` >= 1, got 0``."""
    text = str(err)
    if " - at `$." in text:
        message, _, where = text.rpartition(" - at `$.")
        where = where.rstrip("`")
        text = f"{where}: {message[0].lower()}{message[1:]}"
        allowed = _allowed_values(where)
        return f"{text}; allowed: {', '.join(map(str, allowed))}" if allowed else text
    if text.startswith("Object contains unknown field"):
        return text.replace("Object contains", "config contains")
    return text


def load_config(
    path: str | Path | None = None,
    *,
    environ: dict[str, str] | os._Environ[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> Config:
    """Build the effective configuration: file, then environment, then CLI ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    data = _merge(data, env_overrides(os.environ if environ is None else environ))
    if overrides:
        data = _merge(data, {k: v for k, v in overrides.items() if v})
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{_friendly(e)}") from None
    _check(config)
    return config


def _check(config: Config) -> None:
    tls = config.tls
    if bool(tls.cert_file) != bool(tls.key_file):
        missing = "tls.key_file" if tls.cert_file else "tls.cert_file"
        raise ConfigError(f"{missing} is missing: [tls] needs both cert_file and key_file (PEM), or neither")
    for key in ("cert_file", "key_file"):
        value = getattr(tls, key)
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(f"tls.{key}: no such file: {value}")
    t = config.tokens
    if t.default_ttl_seconds > t.max_ttl_seconds:
        raise ConfigError(
            f"tokens.default_ttl_seconds ({t.default_ttl_seconds}) must not exceed "
            f"tokens.max_ttl_seconds ({t.max_ttl_seconds})"
        )
    if t.admin_token_ttl_seconds is not None and t.admin_token_ttl_seconds > t.max_ttl_seconds:
        raise ConfigError(
            f"tokens.admin_token_ttl_seconds ({t.admin_token_ttl_seconds}) must not exceed "
            f"tokens.max_ttl_seconds ({t.max_ttl_seconds})"
        )
    a = config.artefacts
    if a.default_ttl_seconds > a.max_ttl_seconds:
        raise ConfigError(
            f"artefacts.default_ttl_seconds ({a.default_ttl_seconds}) must not exceed "
            f"artefacts.max_ttl_seconds ({a.max_ttl_seconds})"
        )
    limits = config.limits
    if limits.memory_limit.strip().lower() not in ("", "auto"):
        parse_size(limits.memory_limit, "limits.memory_limit")
    if limits.address_space_limit.strip().lower() not in ("auto", "off"):
        parse_size(limits.address_space_limit, "limits.address_space_limit")
    # A ceiling is how far a swarm's limits may raise the value (catalog/limits.py).
    if limits.max_rows_ceiling is not None and limits.max_rows_ceiling < limits.max_rows:
        raise ConfigError(
            f"limits.max_rows_ceiling ({limits.max_rows_ceiling}) is below limits.max_rows "
            f"({limits.max_rows}): it is how far a swarm's limits may raise max_rows"
        )
    timeout_ceiling = limits.query_timeout_ceiling_seconds
    if timeout_ceiling is not None and timeout_ceiling < limits.query_timeout_seconds:
        raise ConfigError(
            f"limits.query_timeout_ceiling_seconds ({timeout_ceiling:g}) is below "
            f"limits.query_timeout_seconds ({limits.query_timeout_seconds:g}): it is how far a "
            "swarm's limits may raise the query timeout"
        )
    _check_sync(config)
    _check_live(config)


def _check_target(where: str, target: str) -> str:
    """A ``target`` of ``[[sync.tables]]`` or ``[[live.tables]]``: ``schema.table`` outside
    Quiver's reserved schemas; returns the entry's label for later messages."""
    parts = target.split(".")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"{where}.target: {target!r} must be `schema.table`")
    where = f"{where} ({target})"
    if parts[0].lower().startswith("_quiver"):
        raise ConfigError(f"{where}.target: the schema `{parts[0]}` is reserved for Quiver's own state")
    if parts[0].strip().lower() == "artefacts":
        raise ConfigError(f"{where}.target: the schema `{parts[0]}` is reserved for tabular artefacts")
    return where


_Entry = TypeVar("_Entry", SyncTableConfig, LiveTableConfig)


def _targets(section: str, entries: list[_Entry]) -> Iterator[tuple[str, str, _Entry]]:
    """Each entry of ``section`` with where it is named in messages and its target's key,
    the target checked (:func:`_check_target`) and unique within the section; yielded one at a
    time, so an entry's own checks run before the next entry's target is read."""
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = _check_target(f"{section}[{i}]", entry.target)
        key = entry.target.lower()
        if key in seen:
            raise ConfigError(f"{where}.target: already used by {section}[{seen[key]}]")
        seen[key] = i
        yield where, key, entry


def _check_live(config: Config) -> None:
    """``[[live.tables]]``: a Snowflake connection, full source names (or the connection's
    defaults), targets that are unique and not also replicated."""
    tables = config.live.tables
    sf = config.snowflake
    if tables and (not sf.configured or not sf.user):
        raise ConfigError("[[live.tables]] needs a [snowflake] section with `account` and `user`")
    replicated = {t.target.lower(): i for i, t in enumerate(config.sync.tables)}
    for where, key, entry in _targets("live.tables", tables):
        if key in replicated:
            raise ConfigError(
                f"{where}.target: also the target of sync.tables[{replicated[key]}]; a table is "
                "either replicated or live"
            )
        _check_source_name(where, entry.source, sf)


def _check_source_name(where: str, source: str, sf: SnowflakeConfig) -> None:
    if not source.strip() or len(split_snowflake_name(source)) > 3:
        raise ConfigError(
            f"{where}.source: {source!r} must be `table`, `schema.table` or `database.schema.table`"
        )
    depth = len(split_snowflake_name(source))
    if depth < 3 and not sf.database:
        raise ConfigError(f"{where}.source: name the database (`DB.SCHEMA.TABLE`) or set snowflake.database")
    if depth < 2 and not sf.schema:
        raise ConfigError(f"{where}.source: name the schema (`SCHEMA.TABLE`) or set snowflake.schema")


def _check_sync(config: Config) -> None:
    """Rules between keys of ``[snowflake]`` and ``[[sync.tables]]`` that a type cannot say.
    Each message names the entry (index and target) and the key."""
    sf = config.snowflake
    if sf.private_key_passphrase_file and not sf.private_key_file:
        raise ConfigError("snowflake.private_key_passphrase_file needs snowflake.private_key_file")
    tables = config.sync.tables
    if tables and not sf.configured:
        raise ConfigError("[[sync.tables]] needs a [snowflake] section with at least `account`")
    if tables and not sf.user:
        raise ConfigError("snowflake.user is required when [[sync.tables]] are configured")
    for where, _, entry in _targets("sync.tables", tables):
        _check_sync_entry(where, entry, sf)


def _check_sync_entry(where: str, entry: SyncTableConfig, sf: SnowflakeConfig) -> None:
    """The rules of one ``[[sync.tables]]`` entry on its own: its source name against the
    ``[snowflake]`` defaults, and the keys its mode needs or forbids."""
    _check_source_name(where, entry.source, sf)
    if entry.mode in ("append", "merge") and not entry.cursor:
        raise ConfigError(f'{where}.cursor: mode = "{entry.mode}" needs a cursor column (e.g. UPDATED_AT)')
    if entry.mode == "merge" and not entry.primary_key:
        raise ConfigError(f'{where}.primary_key: mode = "merge" needs primary_key (e.g. ["ID"])')
    if entry.reconcile_seconds is not None and entry.mode != "merge":
        raise ConfigError(f'{where}.reconcile_seconds: only meaningful with mode = "merge"')
    if entry.lookback_seconds and entry.mode != "merge":
        raise ConfigError(f'{where}.lookback_seconds: only meaningful with mode = "merge"')
    if len(set(k.lower() for k in entry.primary_key)) != len(entry.primary_key):
        raise ConfigError(f"{where}.primary_key: lists a column twice")
