"""Configuration: one TOML file, overridden by ``QUIVER_<SECTION>_<KEY>`` variables, then by
CLI flags, decoded into msgspec Structs.

Every problem is a one-line :class:`ConfigError` that names the key and what is allowed, so
an operator fixes it without reading code. Unknown keys are errors: a typo must never be
silently ignored (a misspelt ``max_rows`` would otherwise quietly lift a limit).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from catalog.errors import ConfigError

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
    max_concurrent_queries: PositiveInt = 4
    # DuckDB resources: fit the VM. Empty/0 keeps DuckDB's defaults.
    memory_limit: str = ""
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0


class TokensConfig(_Section):
    default_ttl_seconds: PositiveInt = 86_400
    max_ttl_seconds: PositiveInt = 30 * 86_400
    leeway_seconds: Annotated[int, msgspec.Meta(ge=0)] = 0
    issuer: str = "quiver"
    # Seconds between flushes of the in-memory "last used" times to the catalog.
    last_used_flush_seconds: PositiveFloat = 10.0


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


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    tokens: TokensConfig = msgspec.field(default_factory=TokensConfig)
    demo: DemoConfig = msgspec.field(default_factory=DemoConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    backup: BackupConfig = msgspec.field(default_factory=BackupConfig)

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


ENV_PREFIX = "QUIVER_"


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
