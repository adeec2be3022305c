"""How much of the machine Quiver may use, and the bounds that keep it there.

One VM serves every agent, so no single query may take the memory the others need. Two bounds
stand under the SQL guard (which refuses values built from small constants while binding,
catalog/sqlguard.py):

* DuckDB's ``memory_limit`` governs its buffer manager (hash tables, sorts, aggregates, which
  spill to ``temp_directory`` past it). ``[limits] memory_limit = "auto"`` (the default) is
  half of the memory available — physical memory, or the cgroup's limit when smaller (under
  systemd, ``MemoryMax``) — leaving the rest to Arrow buffers in flight, the hot-table cache,
  Python and the page cache.
* Not every allocation goes through the buffer manager (one huge string or list built at run
  time does not; nor does an Arrow batch of very wide rows), so ``quiver serve`` also bounds
  the process's address space (``RLIMIT_AS``, ``[limits] address_space_limit``). Past it an
  allocation fails inside the query that made it — DuckDB reports "Out of Memory Error",
  Python ``MemoryError`` — and the caller gets RESOURCE_EXHAUSTED, instead of the kernel's
  OOM killer ending the process for every agent. "auto" (:class:`AddressSpaceBound`) bounds
  resident use at :data:`ADDRESS_SPACE_SHARE` of the memory available, on top of what is
  reserved but not resident (thread stacks, allocator arenas), and follows the reservations
  as they change.
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path
from typing import NamedTuple

import structlog

from catalog.errors import ConfigError

log = structlog.get_logger(__name__)

#: Share of the memory available that ``memory_limit = "auto"`` gives DuckDB.
DUCKDB_SHARE = 0.5
#: Share of the memory available that ``address_space_limit = "auto"`` lets the process use.
ADDRESS_SPACE_SHARE = 0.9
_MIN_DUCKDB_BYTES = 256 * 1024**2
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as a page-rounded 2^63 - 1.
_V1_UNLIMITED = 1 << 62


class CgroupMemory(NamedTuple):
    """This process's cgroup memory bound and use, as the kernel's OOM killer sees them."""

    limit: int | None  # bytes, or None without a limit (or without cgroup memory accounting)
    current: int | None  # bytes charged to the cgroup now (memory.current), or None


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> CgroupMemory:
    """The memory limit of this process's own cgroup -- the smallest ``memory.max`` of it and
    its ancestors -- and its current use.

    Why not ``/sys/fs/cgroup/memory.max`` alone: that is the *root* cgroup, which has no limit
    file. systemd puts ``MemoryMax`` on the unit's cgroup
    (``/sys/fs/cgroup/system.slice/quiver.service/memory.max``), found through
    ``/proc/self/cgroup``; a container with its own cgroup namespace sees itself at the root,
    which the walk also covers. Both cgroup v2 and v1 (``memory.limit_in_bytes``) are read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    places: list[tuple[Path, str, str, str]] = []
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, own = parts
        if hierarchy == "0" and controllers == "":
            places.append((root, own, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            places.append((root / "memory", own, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    if not places:
        places = [(root, "/", "memory.max", "memory.current")]
    for base, own, limit_name, usage_name in places:
        if not base.is_dir():
            continue
        rel = [p for p in own.split("/") if p and p not in (".", "..")]
        dirs = [base.joinpath(*rel[:n]) for n in range(len(rel), -1, -1)]
        dirs = [d for d in dirs if d.is_dir()]
        if not dirs:
            continue
        limits = [v for d in dirs if (v := _read_bytes(d / limit_name)) is not None and 0 < v < _V1_UNLIMITED]
        current = _read_bytes(dirs[0] / usage_name)
        if limits or current is not None:
            return CgroupMemory(limit=min(limits) if limits else None, current=current)
    return CgroupMemory(limit=None, current=None)


def memory_available(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """The memory this process may use: physical memory, or a smaller cgroup limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 * 1024**3
    limit = cgroup_memory(root, proc_cgroup).limit
    if limit is not None and limit < total:
        total = limit
    return total


def parse_size(value: str, key: str) -> int:
    """``"2GB"``, ``"1.5GiB"``, ``"512MB"``, ``"1000000"`` → bytes (DuckDB's units: KB = 1000)."""
    m = _SIZE.match(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(
            f'{key}: expected "auto" or a size like "2GB", "1.5GiB" or "512MB", got {value[:40]!r}'
        )
    return int(float(m.group(1)) * _UNITS[unit])


def duckdb_memory_limit(setting: str) -> str:
    """``[limits] memory_limit`` as DuckDB takes it: "auto" → half of the memory available."""
    if setting.strip().lower() not in ("auto", ""):
        parse_size(setting, "[limits] memory_limit")
        return setting
    return f"{max(_MIN_DUCKDB_BYTES, int(memory_available() * DUCKDB_SHARE))}B"


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (0 where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _mapped_bytes() -> int:
    """The address space this process has mapped now (VmSize)."""
    return _status_kib("VmSize")


class AddressSpaceBound:
    """``quiver serve``'s bound on its address space (``RLIMIT_AS``), kept current.

    "auto" bounds what the process may *use*, not what it reserves: thread stacks and
    allocator arenas are mapped but mostly untouched, and they grow with load. So the bound is
    the reserved-but-not-resident part of the address space (VmSize - VmRSS) plus
    :data:`ADDRESS_SPACE_SHARE` of the memory available, set again on every housekeeping pass
    as reservations come and go (a reservation made between two passes takes from the
    headroom until the next). An allocation that would take the resident size past that share
    fails inside its request; a size setting is a fixed bound; "off" sets none.
    """

    def __init__(self, setting: str) -> None:
        text = setting.strip().lower()
        self.auto = text == "auto"
        self.fixed = None if text in ("auto", "off") else parse_size(setting, "[limits] address_space_limit")
        self.enabled = text != "off"
        self.budget = int(memory_available() * ADDRESS_SPACE_SHARE)
        self.bound: int | None = None

    def target(self) -> int | None:
        if not self.enabled:
            return None
        if self.fixed is not None:
            return self.fixed
        reserved = max(0, _mapped_bytes() - _status_kib("VmRSS"))
        return reserved + self.budget

    def apply(self) -> int | None:
        """Set the bound (at start-up, then from housekeeping). A hard limit set from outside
        (e.g. ``LimitAS=``) is never exceeded. Returns the bound in force, or None."""
        bound = self.target()
        if bound is None:
            return None
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            bound = min(bound, hard)
        # Never below what is mapped now: that would fail every allocation at once.
        bound = max(bound, _mapped_bytes() + 64 * 1024**2)
        if bound != self.bound:
            resource.setrlimit(resource.RLIMIT_AS, (bound, hard))
            if self.bound is None:
                log.info("resources.address_space_bound", bytes=bound, mapped=_mapped_bytes())
            self.bound = bound
        return bound
