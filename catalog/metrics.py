"""Prometheus metrics of one Quiver process (a registry per catalog, so that several servers
in one test process never share counters).

Quiver's registry is its own, so prometheus_client's default process metrics (which live in
the global registry) are registered on it explicitly: ``process_resident_memory_bytes``,
``process_cpu_seconds_total``, ``process_open_fds``, ``process_max_fds`` and friends. What
they lack is the bound the kernel enforces -- under systemd the unit's ``MemoryMax``, which
is charged the cgroup's memory (page cache included), not the process's RSS -- so
:class:`_MemoryCollector` adds ``quiver_memory_limit_bytes`` (the cgroup's limit, only when
there is one), ``quiver_memory_cgroup_bytes`` (what the cgroup is charged now) and
``quiver_memory_available_bytes`` (physical memory or the smaller limit: what ``[limits]
memory_limit = "auto"`` is computed from). See proto_docs/configuration.md, "Metrics".

Sync metrics (``quiver_sync_*``, proto_docs/sync.md "Metrics") are read at scrape time by
:class:`_SyncCollector` from the sync worker the process wiring hands
:meth:`Metrics.set_sync_source` (``quiver/runtime.py``; catalog never imports sync): lag and
last success come from the catalog's sync state, so they are true after a restart too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from catalog.keys import write_private_atomic
from catalog.resources import cgroup_memory, memory_available

log = structlog.get_logger(__name__)

#: Where the last backup's outcome is kept across restarts (a dot-name: never in a snapshot,
#: left in place by a restore, so it stays true of this machine).
BACKUP_STATUS_FILE = ".backup-status.json"


class _MemoryCollector(Collector):
    """The cgroup memory bound and use, read at every scrape (a few small /sys files)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cgroup = cgroup_memory()
        if cgroup.limit is not None:
            yield GaugeMetricFamily(
                "quiver_memory_limit_bytes",
                "The cgroup's memory limit (systemd MemoryMax); absent without one.",
                value=cgroup.limit,
            )
        if cgroup.current is not None:
            yield GaugeMetricFamily(
                "quiver_memory_cgroup_bytes",
                "Memory charged to the process's cgroup now (what the limit is enforced against).",
                value=cgroup.current,
            )
        yield GaugeMetricFamily(
            "quiver_memory_available_bytes",
            "Physical memory, or the smaller cgroup limit.",
            value=memory_available(),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class SyncTableSample(msgspec.Struct, frozen=True, kw_only=True):
    """One ``[[sync.tables]]`` entry as the sync worker reports it at a scrape."""

    table: str
    interval_seconds: float
    running: bool
    consecutive_failures: int
    # Unix times; None: never (no successful run in the history / not a time cursor).
    last_success_at: float | None
    watermark_at: float | None
    # Since this process started.
    runs_ok: int
    runs_failed: int
    rows_read: int
    rows_written: int


SyncSource = Callable[[], list[SyncTableSample]]


class _SyncCollector(Collector):
    """``quiver_sync_*`` from the source the runtime set, computed at every scrape (lag is
    "now minus the last success", so it grows between runs without anyone updating it)."""

    def __init__(self) -> None:
        self.source: SyncSource | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        source = self.source
        if source is None:
            return
        try:
            samples = source()
        except Exception as e:  # noqa: BLE001 - a scrape must not fail because the catalog is busy
            log.warning("metrics.sync_unavailable", error=str(e)[:200])
            return
        now = datetime.now(UTC).timestamp()
        label = ["table"]
        lag = GaugeMetricFamily(
            "quiver_sync_lag_seconds",
            "Seconds since the table's last successful sync run ended (absent before the first).",
            labels=label,
        )
        last = GaugeMetricFamily(
            "quiver_sync_last_success_timestamp_seconds",
            "Unix time the table's last successful sync run ended (0: none in the history).",
            labels=label,
        )
        watermark = GaugeMetricFamily(
            "quiver_sync_watermark_timestamp_seconds",
            "The newest synced cursor value as Unix time, for timestamp/date cursors only "
            "(a naive timestamp is read as UTC).",
            labels=label,
        )
        interval = GaugeMetricFamily(
            "quiver_sync_interval_seconds", "The table's configured interval_seconds.", labels=label
        )
        running = GaugeMetricFamily(
            "quiver_sync_running", "1 while a run of the table is in progress.", labels=label
        )
        failures = GaugeMetricFamily(
            "quiver_sync_consecutive_failures",
            "Failed runs of the table since its last success (kept across restarts).",
            labels=label,
        )
        runs = CounterMetricFamily(
            "quiver_sync_runs",
            "Sync runs that ended in this process, by outcome.",
            labels=["table", "outcome"],
        )
        rows_read = CounterMetricFamily(
            "quiver_sync_rows_read", "Rows read from the source by runs of this process.", labels=label
        )
        rows_written = CounterMetricFamily(
            "quiver_sync_rows_written", "Rows written to the replica by runs of this process.", labels=label
        )
        for s in samples:
            t = [s.table]
            if s.last_success_at is not None:
                lag.add_metric(t, max(0.0, now - s.last_success_at))
            last.add_metric(t, s.last_success_at or 0.0)
            if s.watermark_at is not None:
                watermark.add_metric(t, s.watermark_at)
            interval.add_metric(t, s.interval_seconds)
            running.add_metric(t, 1 if s.running else 0)
            failures.add_metric(t, s.consecutive_failures)
            runs.add_metric([s.table, "ok"], s.runs_ok)
            runs.add_metric([s.table, "failed"], s.runs_failed)
            rows_read.add_metric(t, s.rows_read)
            rows_written.add_metric(t, s.rows_written)
        yield from (lag, last, watermark, interval, running, failures, runs, rows_read, rows_written)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class _LogDropsCollector(Collector):
    """``quiver_log_records_dropped_total``: log records the background log writer dropped
    because its queue was full (quiver/logs.py), read from the source the runtime set."""

    def __init__(self) -> None:
        self.source: Callable[[], int] | None = None

    def collect(self) -> Iterator[CounterMetricFamily]:
        source = self.source
        yield CounterMetricFamily(
            "quiver_log_records_dropped",
            "Log records dropped because the log writer's queue was full (never a blocked request).",
            value=source() if source is not None else 0,
        )

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "quiver_requests_total",
            "Requests served, by listener, method and outcome code.",
            ["listener", "method", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "quiver_request_seconds",
            "Request handling time (for streams: until the stream ends).",
            ["listener", "method"],
            registry=self.registry,
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
        )
        self.auth_failures = Counter(
            "quiver_auth_failures_total",
            "Requests refused for a missing, invalid, expired or revoked token.",
            ["listener"],
            registry=self.registry,
        )
        self.tokens_issued = Counter(
            "quiver_tokens_issued_total",
            "Tokens issued, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.uptime = Gauge("quiver_uptime_seconds", "Seconds since start.", registry=self.registry)
        self.database_bytes = Gauge(
            "quiver_database_bytes", "Size of the DuckDB file and its WAL.", registry=self.registry
        )

        ProcessCollector(registry=self.registry)
        self.registry.register(_MemoryCollector())
        # Admission (flight_server/admission.py): what runs now and what was turned away.
        self.streams_running = Gauge(
            "quiver_admission_streams_running",
            "Streams and planning steps running now, all principals together.",
            registry=self.registry,
        )
        self.admission_refusals = Counter(
            "quiver_admission_refusals_total",
            "Calls refused by admission, by reason (per_principal: a principal's share is full; "
            "total: the server stayed full for admission_wait_seconds; budget: a usage budget "
            "of the caller's swarm or agent is spent; swarm: the swarm's max_concurrent is "
            "full; rate: over the swarm's or agent's calls_per_minute).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("per_principal", "total", "budget", "swarm", "rate"):
            self.admission_refusals.labels(reason)
        # Backups (catalog/backup.py): set where a snapshot finishes, however it was asked for.
        self.backup_last_success = Gauge(
            "quiver_backup_last_success_timestamp_seconds",
            "Unix time of the last snapshot written by this process (0: none since start).",
            registry=self.registry,
        )
        self.backup_last_outcome = Gauge(
            "quiver_backup_last_outcome",
            "Outcome of the last snapshot attempt of this process: 1 for the outcome it had, "
            "by label (ok, failed, none: no attempt since start).",
            ["outcome"],
            registry=self.registry,
        )
        self.backups = Counter(
            "quiver_backups_total",
            "Snapshot attempts by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("ok", "failed"):
            self.backups.labels(outcome)
        self.set_backup_outcome("none")
        # Retention (catalog/retention.py).
        self.retention_deleted = Counter(
            "quiver_retention_deleted_total",
            "Rows deleted for being older than their retention_days ([audit], [query_log]), by table.",
            ["table"],
            registry=self.registry,
        )
        for table in ("audit", "tokens", "query_log"):
            self.retention_deleted.labels(table)
        # Artefacts (catalog/artefacts.py): what the janitor removed, by reason.
        self.artefacts_removed = Counter(
            "quiver_artefacts_removed_total",
            "Artefacts and files removed by the artefact janitor, by reason (expired, temp_file, "
            "orphan_content, orphan_metadata, orphan_table).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("expired", "temp_file", "orphan_content", "orphan_metadata", "orphan_table"):
            self.artefacts_removed.labels(reason)
        self._sync = _SyncCollector()
        self.registry.register(self._sync)
        self._log_drops = _LogDropsCollector()
        self.registry.register(self._log_drops)

    def set_sync_source(self, source: SyncSource | None) -> None:
        """Where ``quiver_sync_*`` come from at scrape time (the sync worker of this catalog;
        a later one replaces an earlier one, None removes them)."""
        self._sync.source = source

    def set_log_drops_source(self, source: Callable[[], int] | None) -> None:
        """Where ``quiver_log_records_dropped_total`` is read at scrape time (the process's
        log writer, quiver/logs.py; catalog does not import it)."""
        self._log_drops.source = source

    def set_backup_outcome(self, outcome: str) -> None:
        for label in ("ok", "failed", "none"):
            self.backup_last_outcome.labels(label).set(1 if label == outcome else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BackupStatus(msgspec.Struct, kw_only=True):
    """The last snapshot attempt, as ``/v1/status`` ("backup") shows it."""

    last_outcome: str = "none"  # "ok", "failed", or "none" (never attempted)
    last_attempt_at: datetime | None = None
    last_success_at: datetime | None = None
    last_snapshot: str | None = None
    last_error: str | None = None


class BackupOutcomes:
    """Keeps the last backup outcome in ``DATA_DIR/.backup-status.json`` and in the backup
    metrics, so an alert on "last success older than a day" survives restarts and sees a
    backup taken with the server stopped (``quiver backup`` writes the same file)."""

    def __init__(self, data_dir: Path, metrics: Metrics) -> None:
        self._path = data_dir / BACKUP_STATUS_FILE
        self._metrics = metrics
        self._lock = threading.Lock()
        self._status = BackupStatus()
        try:
            self._status = msgspec.json.decode(self._path.read_bytes(), type=BackupStatus)
        except FileNotFoundError:
            pass
        except (OSError, msgspec.DecodeError) as e:
            log.warning("backup.status_unreadable", path=str(self._path), error=str(e)[:200])
        self._publish()

    def _publish(self) -> None:
        status = self._status
        self._metrics.set_backup_outcome(status.last_outcome)
        if status.last_success_at is not None:
            self._metrics.backup_last_success.set(status.last_success_at.timestamp())

    def record(self, outcome: str, *, snapshot: str | None = None, error: str | None = None) -> None:
        """Note a finished attempt (``outcome`` "ok" or "failed"); never raises: a backup's
        own result must not be hidden by a failure to note it."""
        now = datetime.now(UTC)
        with self._lock:
            previous = self._status
            self._status = BackupStatus(
                last_outcome=outcome,
                last_attempt_at=now,
                last_success_at=now if outcome == "ok" else previous.last_success_at,
                last_snapshot=snapshot if outcome == "ok" else previous.last_snapshot,
                last_error=None if outcome == "ok" else (error or "unknown error")[:500],
            )
            self._metrics.backups.labels(outcome).inc()
            self._publish()
            try:
                write_private_atomic(self._path, msgspec.json.encode(self._status))
            except OSError as e:
                log.warning("backup.status_not_saved", path=str(self._path), error=str(e)[:200])

    def status(self) -> BackupStatus:
        """The last outcome (replaced, never mutated: safe to hand out)."""
        with self._lock:
            return self._status
