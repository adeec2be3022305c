"""The process's status and health, assembled from the components ``quiver serve`` started.

``quiver/runtime.py`` builds one :class:`ProcessStatus` once the Flight server (and the sync
service, when configured) exist, naming each section's source explicitly in
:class:`Sections`, and hands it to the control plane as its ``catalog.StatusReport``. No
component registers itself anywhere: what GET /v1/status shows is exactly what this module
is given (proto_docs/control_plane.md, "Status and sync answers").

One broken section never hides the rest: a section whose source raises is left out of the
answer and named, with its (bounded) error, in ``section_errors``, and logged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from msgspec import UNSET, UnsetType

from catalog import Catalog, SyncControl
from catalog.errors import bounded
from catalog.metrics import BackupStatus
from catalog.status import (
    ArtefactsStatus,
    AsyncQueriesStatus,
    CacheStatus,
    Health,
    ListenerStatus,
    ProfilesStatus,
    QueriesStatus,
    Status,
    SyncSection,
)

log = structlog.get_logger("quiver")

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Sections:
    """Where each optional section of GET /v1/status comes from; None: not running, absent."""

    queries: Callable[[], QueriesStatus] | None = None
    cache: Callable[[], CacheStatus] | None = None
    profiles: Callable[[], ProfilesStatus] | None = None
    async_queries: Callable[[], AsyncQueriesStatus] | None = None
    sync: Callable[[], SyncSection] | None = None
    backup: Callable[[], BackupStatus] | None = None
    artefacts: Callable[[], ArtefactsStatus] | None = None


def sync_section(sync: SyncControl | None) -> Callable[[], SyncSection]:
    """The ``sync`` section: ``{"configured": false}`` without sync, else GET /v1/sync's tables."""
    if sync is None:
        return lambda: SyncSection(configured=False)
    return lambda: SyncSection(tables=sync.status().tables)


@dataclass
class _Listener:
    url: str
    probe: Callable[[], bool] | None
    up: bool = True


class ProcessStatus:
    """The control plane's ``StatusReport``: the catalog's own status, the listeners the
    runtime started (with a probe that checks one really accepts connections) and the
    sections of :class:`Sections`."""

    def __init__(self, catalog: Catalog, sections: Sections) -> None:
        self._catalog = catalog
        self._sections = sections
        self._listeners: dict[str, _Listener] = {}
        self._lock = threading.Lock()

    # --- the runtime's side -------------------------------------------------------------------
    def listener_up(self, name: str, url: str, probe: Callable[[], bool] | None = None) -> None:
        """A listener accepts connections now (called by the runtime once it does)."""
        with self._lock:
            self._listeners[name] = _Listener(url, probe)

    def listeners_down(self) -> None:
        """Stopping: health turns 503 before the listeners stop accepting."""
        with self._lock:
            for listener in self._listeners.values():
                listener.up = False

    def listeners_accept(self) -> bool:
        """Whether every listener's probe answers (feeds systemd's watchdog)."""
        with self._lock:
            probes = [entry.probe for entry in self._listeners.values() if entry.probe is not None]
        return all(probe() for probe in probes)

    # --- StatusReport -----------------------------------------------------------------------------
    def status(self) -> Status:
        core = self._catalog.core_status()
        with self._lock:
            listeners = {name: ListenerStatus(up=e.up, url=e.url) for name, e in self._listeners.items()}
        errors: dict[str, str] = {}
        s = self._sections
        return Status(
            version=core.version,
            uptime_seconds=core.uptime_seconds,
            listeners=listeners,
            database=core.database,
            tables=core.tables,
            swarms=core.swarms,
            queries=_section("queries", s.queries, errors),
            cache=_section("cache", s.cache, errors),
            profiles=_section("profiles", s.profiles, errors),
            async_queries=_section("async_queries", s.async_queries, errors),
            sync=_section("sync", s.sync, errors),
            backup=_section("backup", s.backup, errors),
            artefacts=_section("artefacts", s.artefacts, errors),
            section_errors=errors or UNSET,
        )

    def health(self) -> Health:
        """Up only when every listener is flagged up and its probe answers."""
        with self._lock:
            entries = list(self._listeners.items())
        report = {
            name: ListenerStatus(up=e.up and (e.probe() if e.probe else True), url=e.url)
            for name, e in entries
        }
        up = bool(report) and all(v.up for v in report.values())
        return Health(status="ok" if up else "unavailable", listeners=report)


def _section(name: str, source: Callable[[], T] | None, errors: dict[str, str]) -> T | UnsetType:
    """The section from ``source``; UNSET when it is not running or failed (then named in
    ``errors``, bounded: a section's error is ours, never a client's input)."""
    if source is None:
        return UNSET
    try:
        return source()
    except Exception as e:  # one broken section must not hide the rest
        log.error("status.section_failed", section=name, error=bounded(str(e), 300), exc_info=e)
        errors[name] = bounded(str(e), 300)
        return UNSET
