"""The :class:`Catalog`: everything the listeners and the sync worker share, opened once per
process. ``flight_server``, ``control_plane`` and ``sync`` each receive it and never import
one another. It holds no registry of what they offer each other: the process wiring in
``quiver`` asks each component for its status and hands the control plane what it needs
explicitly (``catalog/status.py``, ``quiver/status.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import duckdb
import structlog

from catalog.artefacts import ArtefactStore
from catalog.audit import AuditLog
from catalog.budgets import Budgets, UsageCollector
from catalog.clock import SYSTEM_CLOCK, Clock, utcnow
from catalog.config import Config
from catalog.database import Database
from catalog.descriptions import Descriptions
from catalog.errors import QuiverError, Unavailable
from catalog.exports import Exports
from catalog.identity import Principal, WhoAmI
from catalog.keys import KeyRing, load_or_create_mask_key, write_private_atomic
from catalog.limits import SwarmLimits
from catalog.live import LiveTables
from catalog.metrics import BackupOutcomes, Metrics
from catalog.policy import Policy
from catalog.query_log import QueryLog
from catalog.query_port import QueryRunner
from catalog.resources import duckdb_memory_limit
from catalog.retention import Retention
from catalog.status import CatalogStatus, DatabaseStatus
from catalog.swarms import SwarmStore
from catalog.tables import TableCatalog
from catalog.tokens import TokenService

log = structlog.get_logger(__name__)

VERSION = "0.1.0"

# Where Database.snapshot() writes its transient copy (a dot-name: never itself backed up).
SNAPSHOT_STAGING = ".snapshot"
# The admin token the server keeps current for local commands (see ensure_admin_token).
ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret


class Catalog:
    def __init__(self, config: Config, *, lockdown: bool = True, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        # What token and ticket expiry read (catalog/clock.py); a test passes one it moves.
        self.clock = clock
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
        # [[live.tables]]: Snowflake tables queried where they are (catalog/live.py).
        self.live = LiveTables(config) if config.live.tables else None
        self.tables.live = self.live
        # The key of hash masks (catalog/views.py), kept beside the signing keys.
        self.policy = Policy(self.tables, load_or_create_mask_key(data_dir / "keys"))
        self.swarms = SwarmStore(self.db, self.policy, tables=self.tables)
        # Table and column texts for agents: DuckDB comments (catalog/descriptions.py).
        self.descriptions = Descriptions(self.db, self.swarms.writes)
        self.keys = KeyRing.load_or_create(data_dir / "keys")
        self.tokens = TokenService(self.db, self.keys, config.tokens, self.swarms, clock)
        self.tokens.retire_keys()
        self.audit = AuditLog(self.db)
        self.metrics = Metrics()
        self.budgets = Budgets(self.db, clock, self.swarms.writes, self.swarms)
        self.metrics.registry.register(UsageCollector(self.budgets))
        # Per-swarm overrides of [limits], applied by the admission path (catalog/limits.py).
        self.limits = SwarmLimits(self.db, config.limits, clock, self.swarms.writes, self.swarms)
        self.query_log = QueryLog(self.db, config.query_log, clock, self.budgets)
        self.retention = Retention(
            config.audit, self.audit, self.swarms.writes, self.metrics, self.query_log, config.query_log
        )
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
        # The data plane's query path for the other listeners (catalog/query_port.py). The one
        # late-bound link: the Flight server implements it and also uses it (exports), so
        # quiver/runtime.py sets it once the Flight server exists; None until then.
        self.queries: QueryRunner | None = None
        self._closed = threading.Event()
        # (token, jti, expires_at) of what admin.token was last seen or written to hold.
        self._admin_token: tuple[str, str, datetime] | None = None
        self._admin_token_lock = threading.Lock()

    def whoami(self, principal: Principal) -> WhoAmI:
        """The ``whoami`` answer of both listeners for ``principal``."""
        return WhoAmI(
            kind=principal.kind,
            swarm=principal.swarm,
            agent=principal.agent,
            jti=principal.jti,
            expires_at=principal.expires_at,
            tables=self.policy.readable_names(principal),
        )

    def delete_swarm(self, name: str) -> None:
        """A swarm goes with its allowlist and every token it holds, atomically."""
        budgets, limits = self.budgets, self.limits

        def revoke(cur: duckdb.DuckDBPyConnection, swarm: str) -> Callable[[], object]:
            # Its budget, counters and limits go in the same transaction: a swarm re-created
            # under the name starts with none.
            revoked, dropped = self.tokens.revoke_swarm(cur, swarm), budgets.drop(cur, swarm)
            unlimited = limits.drop(cur, swarm)
            return lambda: (revoked(), dropped(), unlimited())

        self.swarms.delete(name, revoke_tokens_of=revoke)

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
        left = (known[2] - utcnow(self.clock)).total_seconds()
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
            self.query_log.flush()
            self.budgets.flush()
            self.tokens.flush_last_used()
        except Exception as e:  # noqa: BLE001 - housekeeping must never kill its thread
            log.warning("catalog.maintain_failed", error=str(e))

    def maintain(self) -> None:
        """Periodic housekeeping: flush buffered audit events, query-log records and token
        "last used" times,
        retire previous signing keys whose tokens have all expired, and (hourly) delete
        history older than ``[audit] retention_days`` (catalog/retention.py)."""
        self._flush()
        try:
            self.tokens.retire_keys()
            self.retention.run_if_due()
        except Exception as e:  # noqa: BLE001 - housekeeping must never kill its thread
            log.warning("catalog.maintain_failed", error=str(e))

    def core_status(self) -> CatalogStatus:
        """The catalog's own part of GET /v1/status (version, uptime, database, counts); also
        refreshes the uptime and database-size gauges that /metrics serves."""
        uptime = time.time() - self.started_at
        self.metrics.uptime.set(uptime)
        size = self.db.size_bytes()
        self.metrics.database_bytes.set(size)
        return CatalogStatus(
            version=VERSION,
            uptime_seconds=round(uptime, 3),
            database=DatabaseStatus(path=str(self.db.path), bytes=size),
            tables=len(self.tables.list_refs()),
            swarms=len(self.swarms.all()),
        )

    def require_queries(self) -> QueryRunner:
        if self.queries is None:
            raise Unavailable("the data plane is not running in this process; retry once it has started")
        return self.queries

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._flush()
        if self.live is not None:
            self.live.close()
        self.db.close()
