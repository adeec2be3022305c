"""Quiver's shared core: configuration, the DuckDB catalog, tokens, policy, the SQL guard,
artefacts and exports, audit, and the protocols the components meet on (catalog/status.py,
catalog/query_port.py). What two components need lives here (ARCHITECTURE.md)."""

from catalog.config import Config, load_config
from catalog.core import VERSION, Catalog
from catalog.database import SYSTEM_SCHEMA, Database, quote_ident
from catalog.errors import (
    Cancelled,
    ConfigError,
    Conflict,
    DatabaseInUse,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    QuiverError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unprocessable,
    WriteConflict,
)
from catalog.identity import Principal
from catalog.status import StatusReport, SyncControl
from catalog.tables import TableInfo, TableRef

__all__ = [
    "SYSTEM_SCHEMA",
    "VERSION",
    "Cancelled",
    "Catalog",
    "Config",
    "ConfigError",
    "Conflict",
    "Database",
    "DatabaseInUse",
    "DeadlineExceeded",
    "InvalidArgument",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "Principal",
    "QuiverError",
    "ResourceExhausted",
    "StatusReport",
    "SyncControl",
    "TableInfo",
    "TableRef",
    "Unauthenticated",
    "Unavailable",
    "Unprocessable",
    "WriteConflict",
    "load_config",
    "quote_ident",
]
