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
  time does not), so ``quiver serve`` also bounds the process's address space
  (``RLIMIT_AS``, ``[limits] address_space_limit``). Past it an allocation fails inside the
  query — DuckDB reports "Out of Memory Error", Python ``MemoryError`` — and the caller gets
  RESOURCE_EXHAUSTED, instead of the kernel's OOM killer ending the process for every agent.
  "auto" is the address space already mapped at start-up, plus 80% of the memory available,
  plus :data:`RESERVED_SLACK` for what grows with load without being used: every thread
  reserves a stack (8 MiB) and allocators reserve arenas (glibc: 64 MiB each), so the address
  space is several times the resident size. Without that slack, a busy server would fail to
  start threads long before it ran short of memory; with it, a single allocation larger than
  what is left still fails cleanly. (The systemd unit also sets ``MALLOC_ARENA_MAX=2``, which
  keeps glibc's reservations small.)
"""

from __future__ import annotations

import os
import re
import resource
from pathlib import Path

import structlog

from catalog.errors import ConfigError

log = structlog.get_logger(__name__)

#: Share of the memory available that ``memory_limit = "auto"`` gives DuckDB.
DUCKDB_SHARE = 0.5
#: Share of the memory available that ``address_space_limit = "auto"`` adds to what is mapped.
ADDRESS_SPACE_SHARE = 0.8
#: Address space that ``address_space_limit = "auto"`` adds for reservations that grow with
#: load (thread stacks, allocator arenas) but take no memory.
RESERVED_SLACK = 2 * 1024**3
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


def memory_available() -> int:
    """The memory this process may use: physical memory, or a smaller cgroup limit."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 * 1024**3
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
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


def _mapped_bytes() -> int:
    """The address space this process has mapped now (VmSize)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def address_space_bound(setting: str) -> int | None:
    """``[limits] address_space_limit`` in bytes, or None for "off"."""
    text = setting.strip().lower()
    if text == "off":
        return None
    if text == "auto":
        return _mapped_bytes() + int(memory_available() * ADDRESS_SPACE_SHARE) + RESERVED_SLACK
    return parse_size(setting, "[limits] address_space_limit")


def apply_address_space_bound(setting: str) -> int | None:
    """Bound this process's address space (``quiver serve`` only: never a library's caller).
    Returns the bound set, or None. A hard limit lower than ours is kept."""
    bound = address_space_bound(setting)
    if bound is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        bound = min(bound, hard)
    if soft != resource.RLIM_INFINITY and soft < bound:
        bound = soft
    resource.setrlimit(resource.RLIMIT_AS, (bound, hard))
    log.info("resources.address_space_bound", bytes=bound, mapped=_mapped_bytes())
    return bound
