"""The sync service: schedules table runs inside ``quiver serve`` and answers the control
plane through the :class:`catalog.SyncControl` protocol, which the process wiring
(``quiver/runtime.py``) hands the control plane explicitly.

Scheduling rules (proto_docs/sync.md, "Scheduling"):
- each table is due every ``interval_seconds`` plus a random jitter; at start-up a table is
  next due at its last run's start + interval (+ jitter), a table never synced at once;
- never two runs of one table at once; at most ``[sync] max_parallel`` runs in parallel;
- a failing table backs off (interval x 2^(failures-1), capped) and never stops the others;
- a trigger while the table runs queues exactly one follow-up run (a trigger is never lost).

Metrics (proto_docs/sync.md, "Metrics"): the process wiring hands
:meth:`SyncService.metric_samples` to the catalog's metrics (``Metrics.set_sync_source``),
read at every scrape: lag, last success and consecutive failures from the catalog's sync
state (true across restarts), runs and rows counted in memory as each run ends.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import structlog

from catalog import Catalog, Config, NotFound
from catalog.clock import iso
from catalog.metrics import SyncTableSample
from catalog.status import SyncRun, SyncStatus, SyncTable, SyncTriggered
from sync.context import ProgressFn
from sync.engine import TableSync
from sync.source import SnowflakeSource
from sync.state import RunRecord, SyncStateStore, TableState, decode_watermark

log = structlog.get_logger("sync")


@dataclass
class _Live:
    """In-memory scheduling state of one table."""

    sync: TableSync
    next_due: float  # epoch seconds
    running: bool = False
    pending: bool = False
    pending_full: bool = False
    pending_trigger: str = "api"
    current: RunRecord | None = None
    live_error: str | None = None
    failures: int = 0
    # Counted as runs end, for the metrics (since this process started).
    runs_ok: int = 0
    runs_failed: int = 0
    rows_read: int = 0
    rows_written: int = 0


def _epoch(value: Any) -> float | None:
    """A timestamp (naive ones are UTC, as the catalog stores them) or date as Unix time."""
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp()
    return None


class SyncService:
    """Implements :class:`catalog.SyncControl`: ``status()`` and ``trigger()``, answering the
    Structs of ``catalog/status.py`` that GET /v1/sync and ``quiver sync`` share."""

    def __init__(
        self,
        catalog: Catalog,
        config: Config | None = None,
        *,
        source_factory: Callable[[], SnowflakeSource] | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.catalog = catalog
        self.config = config or catalog.config
        cfg = self.config.sync
        self.store = SyncStateStore(catalog.db, history_runs=cfg.history_runs)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._random = random.Random()  # noqa: S311 - scheduling jitter, not a secret
        env = os.environ if environ is None else environ
        if self.config.snowflake.password and "QUIVER_SNOWFLAKE_PASSWORD" not in env:
            log.warning(
                "sync.config.inline_password",
                detail="[snowflake] password is set in the config file; prefer password_file, "
                "private_key_file or the QUIVER_SNOWFLAKE_PASSWORD environment variable",
            )
        states = self.store.all()
        now = time.time()
        self._tables: dict[str, _Live] = {}
        for entry in cfg.tables:
            ts = TableSync(catalog, entry, self.config.snowflake, self.store, source_factory=source_factory)
            state = states.get(ts.key)
            self._tables[ts.key] = _Live(ts, self._first_due(state, entry.interval_seconds, now))
            if state is not None:
                self._tables[ts.key].failures = state.consecutive_failures

    def _jitter(self, interval: float) -> float:
        return self._random.uniform(0, self.config.sync.jitter * interval)

    def _first_due(self, state: TableState | None, interval: float, now: float) -> float:
        if state is None or state.last_started_at is None:
            return now
        started = state.last_started_at
        if started.tzinfo is None:
            started = started.replace(tzinfo=UTC)
        return started.timestamp() + interval + self._jitter(interval)

    @property
    def tables(self) -> list[str]:
        return list(self._tables)

    # --- SyncControl --------------------------------------------------------------------------
    def status(self) -> SyncStatus:
        states = self.store.all()
        out = []
        with self._lock:
            live = {
                k: (v.running, v.current, v.live_error, v.next_due, v.pending)
                for k, v in self._tables.items()
            }
        for key, t in self._tables.items():
            running, current, live_error, next_due, pending = live[key]
            state = states.get(key)
            last_run: SyncRun | None = None
            if running and current is not None:
                last_run = SyncRun(
                    started_at=iso(current.started_at),
                    ended_at=None,
                    rows_read=current.rows_read,
                    rows_written=current.rows_written,
                    outcome="running",
                    error=live_error,
                )
            elif state is not None and state.last_started_at is not None:
                last_run = SyncRun(
                    started_at=iso(state.last_started_at),
                    ended_at=iso(state.last_ended_at),
                    rows_read=state.last_rows_read or 0,
                    rows_written=state.last_rows_written or 0,
                    # Both writers set it with last_started_at (sync/state.py).
                    outcome=state.last_outcome or "failed",
                    error=state.last_error,
                )
            scheduled = self.config.sync.enabled and self._thread is not None
            due = next_due
            if pending:
                due = time.time()
            elif running and current is not None:
                due = current.started_at.timestamp() + t.sync.entry.interval_seconds
            out.append(
                SyncTable(
                    table=key,
                    source=t.sync.src.label,
                    mode=t.sync.entry.mode,
                    watermark=state.watermark if state else None,
                    running=running,
                    next_run_at=iso(datetime.fromtimestamp(due, UTC)) if scheduled or pending else None,
                    last_run=last_run,
                )
            )
        return SyncStatus(tables=out)

    def metric_samples(self) -> list[SyncTableSample]:
        """What ``quiver_sync_*`` show at a scrape (catalog/metrics.py)."""
        states = self.store.all()
        successes = self.store.last_successes()
        out = []
        with self._lock:
            for key, t in self._tables.items():
                state = states.get(key)
                watermark = None
                if state is not None and state.watermark_kind in ("timestamp", "timestamptz", "date"):
                    watermark = _epoch(decode_watermark(state.watermark, state.watermark_kind))
                out.append(
                    SyncTableSample(
                        table=key,
                        interval_seconds=float(t.sync.entry.interval_seconds),
                        running=t.running,
                        consecutive_failures=state.consecutive_failures if state is not None else 0,
                        last_success_at=_epoch(successes.get(key)),
                        watermark_at=watermark,
                        runs_ok=t.runs_ok,
                        runs_failed=t.runs_failed,
                        rows_read=t.rows_read,
                        rows_written=t.rows_written,
                    )
                )
        return out

    def _count(self, t: _Live, record: RunRecord | None) -> None:
        """Under the lock: a run ended (``None``: it crashed before recording itself)."""
        if record is not None and record.outcome == "ok":
            t.runs_ok += 1
        else:
            t.runs_failed += 1
        if record is not None:
            t.rows_read += record.rows_read
            t.rows_written += record.rows_written

    def resolve(self, table: str) -> str:
        key = table.strip().lower()
        if key not in self._tables:
            configured = ", ".join(sorted(self._tables)) or "none"
            raise NotFound(f"no sync table {table!r}; configured [[sync.tables]] targets: {configured}")
        return key

    def trigger(self, table: str, *, full: bool = False, trigger: str = "api") -> SyncTriggered:
        """Queue a run now (202 semantics). While the table runs, one follow-up is queued;
        further triggers fold into that follow-up (``full`` is kept if any asked for it)."""
        key = self.resolve(table)
        with self._lock:
            t = self._tables[key]
            follow_up = t.running
            t.pending_full = (t.pending_full if t.pending else False) or full
            t.pending = True
            t.pending_trigger = trigger
        self._wake.set()
        log.info("sync.triggered", table=key, full=full, follow_up=follow_up)
        return SyncTriggered(table=key, queued=True, follow_up=follow_up, full=full)

    # --- scheduler ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None or not self._tables:
            return
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.sync.max_parallel, thread_name_prefix="quiver-sync"
        )
        self._thread = threading.Thread(target=self._loop, name="quiver-sync-scheduler", daemon=True)
        self._thread.start()
        log.info("sync.started", tables=len(self._tables), max_parallel=self.config.sync.max_parallel)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling, cancel running loads between batches and wait for them (their
        transactions roll back: the replica stays as it was)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                with self._lock:
                    if not any(t.running for t in self._tables.values()):
                        break
                time.sleep(0.05)
        log.info("sync.stopped")

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            wait = 1.0
            with self._lock:
                running = sum(1 for t in self._tables.values() if t.running)
                ready = []
                for key, t in self._tables.items():
                    if t.running:
                        continue
                    due = t.pending or (self.config.sync.enabled and t.next_due <= now)
                    if due:
                        ready.append((0 if t.pending else 1, t.next_due, key))
                    elif self.config.sync.enabled:
                        wait = min(wait, max(0.05, t.next_due - now))
                ready.sort()
                for _, _, key in ready:
                    if running >= self.config.sync.max_parallel:
                        break
                    t = self._tables[key]
                    full, trig = (t.pending_full, t.pending_trigger) if t.pending else (False, "schedule")
                    t.pending = t.pending_full = False
                    t.running = True
                    t.live_error = None
                    t.current = RunRecord(key, t.sync.src.label, t.sync.entry.mode, trig, datetime.now(UTC))
                    running += 1
                    assert self._pool is not None
                    try:
                        self._pool.submit(self._run_one, key, full, trig)
                    except RuntimeError:  # pool shut down: we are stopping
                        t.running = False
                        return
            self._wake.wait(wait)
            self._wake.clear()

    def _run_one(self, key: str, full: bool, trigger: str) -> None:
        t = self._tables[key]
        started = time.time()
        record: RunRecord | None = None
        try:
            record = self._execute(t, full=full, trigger=trigger)
        except Exception as e:
            log.error("sync.run.crashed", table=key, exc_info=e)
        finally:
            with self._lock:
                t.running = False
                self._count(t, record)
                ok = record is not None and record.outcome == "ok"
                t.failures = 0 if ok else t.failures + 1
                interval = t.sync.entry.interval_seconds
                delay = interval
                if not ok:
                    cap = max(self.config.sync.max_backoff_seconds, interval)
                    delay = min(interval * 2 ** min(t.failures - 1, 30), cap)
                t.next_due = started + delay + self._jitter(interval)
                t.current = None
            self._wake.set()

    def _execute(
        self,
        t: _Live,
        *,
        full: bool,
        trigger: str,
        progress: ProgressFn | None = None,
    ) -> RunRecord:
        def on_progress(rows: int, nbytes: int, total: int | None) -> None:
            current = t.current
            if current is not None:
                current.rows_read = rows
            if progress is not None:
                progress(rows, nbytes, total)

        def on_error(message: str) -> None:
            t.live_error = message

        return t.sync.run(
            full=full,
            trigger=trigger,
            retry_seconds=self.config.sync.retry_seconds,
            progress=on_progress,
            cancel=self._stop,
            on_error=on_error,
            estimate=progress is not None,
        )

    # --- runs in the caller's thread (the CLI without a server) -------------------------------------
    def run_now(
        self,
        tables: list[str] | None = None,
        *,
        full: bool = False,
        trigger: str = "cli",
        progress: Callable[[str], ProgressFn | None] | None = None,
    ) -> list[RunRecord]:
        keys = [self.resolve(t) for t in tables] if tables else list(self._tables)
        records = []
        for key in keys:
            t = self._tables[key]
            with self._lock:
                t.running = True
                t.current = RunRecord(key, t.sync.src.label, t.sync.entry.mode, trigger, datetime.now(UTC))
            record: RunRecord | None = None
            try:
                record = self._execute(
                    t, full=full, trigger=trigger, progress=progress(key) if progress else None
                )
                records.append(record)
            finally:
                with self._lock:
                    t.running = False
                    t.current = None
                    self._count(t, record)
        return records

    def history(self, table: str, limit: int = 20) -> list[dict[str, Any]]:
        return self.store.history(self.resolve(table), limit)
