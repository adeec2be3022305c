"""The :class:`Catalog`: everything the listeners and the sync worker share, opened once per
process. ``flight_server``, ``control_plane`` and ``sync`` each receive it and never import
one another; what one of them offers the others (sync status, query statistics, listener
health) is registered here as a plain callable by the process wiring in ``quiver``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from catalog.artefacts import ArtefactStore
from catalog.audit import AuditLog
from catalog.config import Config
from catalog.database import Database
from catalog.descriptions import Descriptions
from catalog.errors import NotFound, QuiverError, Unavailable
from catalog.exports import Exports
from catalog.keys import KeyRing, write_private_atomic
from catalog.metrics import BackupOutcomes, Metrics
from catalog.policy import Policy
from catalog.query_port import QueryRunner
from catalog.resources import duckdb_memory_limit
from catalog.retention import Retention
from catalog.swarms import SwarmStore
from catalog.tables import TableCatalog
from catalog.tokens import TokenService

log = structlog.get_logger(__name__)

VERSION = "0.1.0"

# Where Database.snapshot() writes its transient copy (a dot-name: never itself backed up).
SNAPSHOT_STAGING = ".snapshot"
# The admin token the server keeps current for local commands (see ensure_admin_token).
ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret


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
        # Table and column texts for agents: DuckDB comments (catalog/descriptions.py).
        self.descriptions = Descriptions(self.db, self.swarms.writes)
        self.keys = KeyRing.load_or_create(data_dir / "keys")
        self.tokens = TokenService(self.db, self.keys, config.tokens, self.swarms)
        self.tokens.retire_keys()
        self.audit = AuditLog(self.db)
        self.metrics = Metrics()
        self.retention = Retention(config.audit, self.audit, self.swarms.writes, self.metrics)
        self.backups = BackupOutcomes(data_dir, self.metrics)
        self.artefacts = ArtefactStore(
            self.db,
            config.artefacts,
            data_dir / "artefacts",
            self.swarms.writes,
            swarm_instance=self.swarms.instance,
            audit=self.audit,
            metrics=self.metrics,
        )
        # artefacts."<id>" in SQL and scans: the policy asks the store (catalog/artefacts.py).
        self.policy.artefacts = self.artefacts
        # Query results into artefacts, with provenance; refresh (catalog/exports.py).
        self.exports = Exports(self.artefacts, self.db, self.require_queries)
        self.artefacts.staleness = self.exports.annotate
        # Filled in by the process wiring: listener name -> {"up": bool, "url": str}, and a
        # probe per listener that checks it really accepts connections right now.
        self.listeners: dict[str, dict[str, Any]] = {}
        self.health_probes: dict[str, Callable[[], bool]] = {}
        # Extra sections of GET /v1/status (e.g. "queries", "cache", "sync").
        self.status_sections: dict[str, Callable[[], Any]] = {
            "backup": self.backups.status,
            "artefacts": self.artefacts.status,
        }
        self.sync: SyncController | None = None
        # The data plane's query path for the other listeners (catalog/query_port.py).
        self.queries: QueryRunner | None = None
        self._closed = threading.Event()
        # (token, jti, expires_at) of what admin.token was last seen or written to hold.
        self._admin_token: tuple[str, str, datetime] | None = None
        self._admin_token_lock = threading.Lock()

    def delete_swarm(self, name: str) -> None:
        """A swarm goes with its allowlist and every token it holds, atomically."""
        self.swarms.delete(name, revoke_tokens_of=self.tokens.revoke_swarm)

    def ensure_admin_token(self, *, actor: str = "bootstrap") -> Path | None:
        """Keep ``DATA_DIR/admin.token`` holding a valid admin token with at least
        ``[tokens] admin_token_renew_fraction`` of its lifetime left; return its path when a
        new one was written, None when the file was fine.

        Local commands (``quiver backup`` from the nightly timer, ``quiver sync``) read this
        file, so it must never hold an expired token while the server runs: the server calls
        this at start-up and from its housekeeping thread, and writes a new token when the
        file is missing, unreadable, no valid admin token (expired, revoked, another key) or
        due for renewal. The write is atomic (temporary file, fsync, rename; 0600), so a
        reader sees the old token or the new one, never half a file. The previous token is
        not revoked: a command that read it a moment ago finishes with it, and it expires on
        its own. See proto_docs/configuration.md ("The data directory").
        """
        path = self.data_dir / ADMIN_TOKEN_FILE
        with self._admin_token_lock:
            reason = self._admin_token_problem(path)
            if reason is None:
                return None
            issued = self.tokens.mint(None, "admin", ttl_seconds=self.config.tokens.admin_ttl_seconds)
            write_private_atomic(path, (issued.token + "\n").encode())
            self._admin_token = (issued.token, issued.jti, issued.expires_at)
        self.audit.record("token.create", outcome="ok", actor=actor, target=issued.jti)
        log.info(
            "admin_token.written",
            path=str(path),
            jti=issued.jti,
            expires_at=issued.expires_at.isoformat(),
            reason=reason,
        )
        return path

    def _admin_token_problem(self, path: Path) -> str | None:
        """Why the admin token file needs a new token, or None. Verifies a token it has not
        seen before once (at start-up, or when someone replaced the file); afterwards only
        checks its record, so the periodic check does not mark the token as used."""
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return "missing"
        except (OSError, UnicodeDecodeError) as e:
            return f"unreadable: {e}"
        known = self._admin_token
        if known is None or known[0] != text:
            try:
                principal = self.tokens.verify(text)
            except QuiverError as e:
                return e.detail
            if not principal.is_admin:
                return f"holds a {principal.kind} token"
            known = self._admin_token = (text, principal.jti, principal.expires_at)
        elif not self.tokens.active(known[1]):
            return "revoked or expired"
        if not self.tokens.signed_by_active_key(known[0]):
            # After `quiver keys rotate`: re-signed now, long before the old key retires.
            return "signed by a previous signing key"
        cfg = self.config.tokens
        left = (known[2] - datetime.now(UTC)).total_seconds()
        if left < cfg.admin_ttl_seconds * cfg.admin_token_renew_fraction:
            return f"renewal due ({max(left, 0):.0f} s left)"
        return None

    def renew_admin_token(self) -> None:
        """The housekeeping side of :meth:`ensure_admin_token`: a failure (a full disk) is
        logged and retried on the next pass, never raised into the thread."""
        try:
            self.ensure_admin_token(actor="renewal")
        except Exception as e:  # noqa: BLE001 - housekeeping must never kill its thread
            log.warning("admin_token.renewal_failed", error=str(e))

    def rotate_signing_key(self, *, actor: str = "cli", retire_previous: bool = False) -> str:
        """``quiver keys rotate``: new tokens are signed by a new key; the previous key keeps
        verifying until its last token expires, or not at all with ``retire_previous``
        (catalog/keys.py). ``admin.token`` is re-signed at once, so local commands never
        depend on the previous key. Returns the new kid."""
        key = self.tokens.rotate_signing_key(retire_previous=retire_previous)
        self.audit.record(
            "keys.rotate",
            outcome="ok",
            actor=actor,
            target=key.kid,
            detail="previous keys retired" if retire_previous else None,
        )
        self.ensure_admin_token(actor=actor)
        return key.kid

    def _flush(self) -> None:
        try:
            self.audit.flush()
            self.tokens.flush_last_used()
        except Exception as e:  # noqa: BLE001 - housekeeping must never kill its thread
            log.warning("catalog.maintain_failed", error=str(e))

    def maintain(self) -> None:
        """Periodic housekeeping: flush buffered audit events and token "last used" times,
        retire previous signing keys whose tokens have all expired, and (hourly) delete
        history older than ``[audit] retention_days`` (catalog/retention.py)."""
        self._flush()
        try:
            self.tokens.retire_keys()
            self.retention.run_if_due()
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

    def require_queries(self) -> QueryRunner:
        if self.queries is None:
            raise Unavailable("the data plane is not running in this process; retry once it has started")
        return self.queries

    def require_sync(self) -> SyncController:
        if self.sync is None:
            raise NotFound("sync is not configured: add [snowflake] and [[sync.tables]] to quiver.toml")
        return self.sync

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._flush()
        self.db.close()
