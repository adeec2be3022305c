"""The :class:`Catalog`: everything the listeners and the sync worker share, opened once per
process. ``flight_server``, ``control_plane`` and ``sync`` each receive it and never import
one another; what one of them offers the others (sync status, query statistics, listener
health) is registered here as a plain callable by the process wiring in ``quiver``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

from catalog.audit import AuditLog
from catalog.config import Config
from catalog.database import Database
from catalog.errors import NotFound
from catalog.keys import SigningKey, write_private
from catalog.metrics import Metrics
from catalog.policy import Policy
from catalog.resources import duckdb_memory_limit
from catalog.swarms import SwarmStore
from catalog.tables import TableCatalog
from catalog.tokens import TokenService

log = structlog.get_logger(__name__)

VERSION = "0.1.0"

# Where Database.snapshot() writes its transient copy (a dot-name: never itself backed up).
SNAPSHOT_STAGING = ".snapshot"


class SyncController(Protocol):
    """What the control plane may ask of the sync worker (implemented in ``sync``)."""

    def status(self) -> dict[str, Any]: ...

    def trigger(self, table: str, *, full: bool = False) -> dict[str, Any]: ...


class Catalog:
    def __init__(self, config: Config, *, lockdown: bool = True) -> None:
        self.config = config
        self.started_at = time.time()
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o700)
        self.data_dir = data_dir
        self.db = Database(
            config.database_path,
            temp_dir=data_dir / "tmp",
            memory_limit=duckdb_memory_limit(config.limits.memory_limit),
            threads=config.limits.threads,
            lockdown=lockdown,
            snapshot_dir=data_dir / SNAPSHOT_STAGING,
        )
        self.tables = TableCatalog(self.db)
        self.policy = Policy(self.tables)
        self.swarms = SwarmStore(self.db, self.policy)
        self.key = SigningKey.load_or_create(data_dir / "keys" / "signing.pem")
        self.tokens = TokenService(self.db, self.key, config.tokens, self.swarms)
        self.audit = AuditLog(self.db)
        self.metrics = Metrics()
        # Filled in by the process wiring: listener name -> {"up": bool, "url": str}, and a
        # probe per listener that checks it really accepts connections right now.
        self.listeners: dict[str, dict[str, Any]] = {}
        self.health_probes: dict[str, Callable[[], bool]] = {}
        # Extra sections of GET /v1/status (e.g. "queries", "cache", "sync").
        self.status_sections: dict[str, Callable[[], Any]] = {}
        self.sync: SyncController | None = None
        self._closed = threading.Event()

    def delete_swarm(self, name: str) -> None:
        """A swarm goes with its allowlist and every token it holds, atomically."""
        self.swarms.delete(name, revoke_tokens_of=self.tokens.revoke_swarm)

    def ensure_admin_token(self) -> Path | None:
        """Write ``DATA_DIR/admin.token`` (0600) when it is missing or no longer valid, and
        return its path; None when the existing file still holds a valid token."""
        path = self.data_dir / "admin.token"
        if path.exists():
            try:
                principal = self.tokens.verify(path.read_text().strip())
                if principal.is_admin:
                    return None
            except Exception as e:  # noqa: BLE001 - any failure means "mint a new one"
                log.info("admin_token.replacing", reason=str(e))
        issued = self.tokens.mint(None, "admin", ttl_seconds=self.config.tokens.max_ttl_seconds)
        write_private(path, (issued.token + "\n").encode())
        self.audit.record("token.create", outcome="ok", actor="bootstrap", target=issued.jti)
        log.info(
            "admin_token.written",
            path=str(path),
            jti=issued.jti,
            expires_at=issued.expires_at.isoformat(),
        )
        return path

    def maintain(self) -> None:
        """Periodic housekeeping: flush buffered audit events and token "last used" times."""
        try:
            self.audit.flush()
            self.tokens.flush_last_used()
        except Exception as e:  # noqa: BLE001 - housekeeping must never kill its thread
            log.warning("catalog.maintain_failed", error=str(e))

    def status(self) -> dict[str, Any]:
        self.metrics.uptime.set(time.time() - self.started_at)
        size = self.db.size_bytes()
        self.metrics.database_bytes.set(size)
        out: dict[str, Any] = {
            "version": VERSION,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "listeners": self.listeners,
            "database": {"path": str(self.db.path), "bytes": size},
            "tables": len(self.tables.list_refs()),
            "swarms": len(self.swarms.all()),
        }
        for name, section in self.status_sections.items():
            try:
                out[name] = section()
            except Exception as e:  # noqa: BLE001 - one broken section must not hide the rest
                out[name] = {"error": str(e)}
        if "sync" not in out:
            out["sync"] = self.sync.status() if self.sync else {"configured": False}
        return out

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether every listener is up (its flag set and its probe answering)."""
        report: dict[str, Any] = {}
        for name, entry in self.listeners.items():
            probe = self.health_probes.get(name)
            up = bool(entry.get("up")) and (probe() if probe else True)
            report[name] = {**entry, "up": up}
        return bool(report) and all(v["up"] for v in report.values()), report

    def require_sync(self) -> SyncController:
        if self.sync is None:
            raise NotFound("sync is not configured: add [snowflake] and [[sync.tables]] to quiver.toml")
        return self.sync

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self.maintain()
        self.db.close()
