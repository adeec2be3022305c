"""The memory bounds under the SQL guard (catalog/resources.py): DuckDB's memory_limit fits the
machine by default, and under ``quiver serve`` an allocation past the address-space bound fails
inside the request as RESOURCE_EXHAUSTED instead of the kernel killing the process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from catalog import ConfigError
from catalog.resources import DUCKDB_SHARE, memory_available, parse_size
from tests.harness import ServeProcess, Server, make_config


def test_memory_limit_defaults_to_half_the_memory_available(server: Server) -> None:
    with server.catalog.db.reading() as cur:
        shown = cur.sql("SELECT current_setting('memory_limit')").fetchall()[0]
    assert shown is not None
    expected = memory_available() * DUCKDB_SHARE
    assert abs(parse_size(str(shown[0]).replace(" ", ""), "memory_limit") - expected) <= 0.02 * expected


@pytest.mark.parametrize(
    ("key", "value"),
    [("memory_limit", "lots"), ("address_space_limit", "12 parsecs"), ("address_space_limit", "-1GB")],
)
def test_bad_sizes_are_config_errors_naming_the_key(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.{key}"):
        make_config(tmp_path, limits={key: value})


def test_sizes_parse_in_duckdb_units() -> None:
    assert parse_size("2GB", "k") == 2 * 1000**3
    assert parse_size("1.5GiB", "k") == int(1.5 * 1024**3)
    assert parse_size("512 MB", "k") == 512 * 1000**2
    assert parse_size("1000", "k") == 1000


# A process of its own: an address-space bound cannot be lifted once set.
_BOUNDED = textwrap.dedent(
    """
    import json, duckdb
    from catalog.resources import AddressSpaceBound, _mapped_bytes
    from flight_server.errors import duckdb_error, resource_error

    bound = AddressSpaceBound(f"{_mapped_bytes() + 1_500_000_000}B").apply()
    out = {"bound": bound}
    con = duckdb.connect()
    try:
        con.sql("SELECT length(repeat('x', 3000000000)) AS n").fetchall()  # 3 GB, built at bind time
        out["duckdb"] = "no error"
    except duckdb.Error as e:
        out["duckdb"] = duckdb_error(e).code
    try:
        bytearray(3_000_000_000)
        out["python"] = "no error"
    except MemoryError as e:
        out["python"] = resource_error(e).code
    out["after"] = con.sql("SELECT 40 + 2").fetchall()[0][0]
    print(json.dumps(out))
    """
)


def test_past_the_address_space_bound_an_allocation_is_resource_exhausted() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _BOUNDED], capture_output=True, text=True, timeout=120, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["bound"] > 0
    assert out == {**out, "duckdb": "RESOURCE_EXHAUSTED", "python": "RESOURCE_EXHAUSTED", "after": 42}


def test_quiver_serve_bounds_its_address_space(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path / "data", env={"QUIVER_LIMITS_ADDRESS_SPACE_LIMIT": "64GiB"})
    try:
        limits = Path(f"/proc/{serve.proc.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max address space"))
        assert line.split()[3] == str(64 * 1024**3), line
    finally:
        serve.stop()


def test_the_auto_bound_follows_reservations_not_use() -> None:
    """Thread stacks are reserved, not used: starting threads raises the auto bound by about
    what they reserve, so a busy server can still start threads; the budget for real memory
    stays the same (computed here without setting it: a bound cannot be lifted in-process)."""
    import threading

    from catalog.resources import ADDRESS_SPACE_SHARE, AddressSpaceBound

    bound = AddressSpaceBound("auto")
    assert bound.budget == int(memory_available() * ADDRESS_SPACE_SHARE)
    before = bound.target()
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(32)]
    for t in threads:
        t.start()
    try:
        after = bound.target()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert before is not None and after is not None
    assert after - before >= 16 * 8 * 1024**2  # most of 32 stacks of 8 MiB, reserved not used
    assert AddressSpaceBound("off").target() is None
    assert AddressSpaceBound("3GiB").target() == 3 * 1024**3
