"""Metrics an operator alerts on (catalog/metrics.py): process metrics in Quiver's own
registry, the cgroup's memory bound (catalog/resources.py), admission (running streams,
refusals by reason) and backups (last success, last outcome, also in /v1/status). Real
servers and clients; cgroup trees are real files laid out as the kernel does."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow.flight as flight
import pytest

from catalog.resources import cgroup_memory, memory_available
from tests.harness import Server, call_options, error_info, start_server
from tests.test_admission import hold, long_ticket, wait_idle
from tests.test_dataplane import cmd


def _metric(text: str, name: str, labels: str = "") -> float | None:
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([-+0-9.eE]+|NaN)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else None


def _scrape(server: Server) -> str:
    r = server.http().get("/metrics")
    assert r.status_code == 200, r.text
    return r.text


# --- process metrics ------------------------------------------------------------------------------
def test_process_metrics_are_in_quivers_own_registry(server: Server) -> None:
    """Before, /metrics had no process_* series at all: Quiver's registry is its own and the
    default ProcessCollector lives in the global one."""
    text = _scrape(server)
    rss = _metric(text, "process_resident_memory_bytes")
    assert rss is not None and rss > 10 * 1024**2
    cpu = _metric(text, "process_cpu_seconds_total")
    assert cpu is not None and cpu > 0
    fds = _metric(text, "process_open_fds")
    assert fds is not None and fds > 3
    assert (_metric(text, "process_max_fds") or 0) >= fds
    available = _metric(text, "quiver_memory_available_bytes")
    assert available is not None and available == memory_available()
    limit = cgroup_memory().limit
    assert _metric(text, "quiver_memory_limit_bytes") == (float(limit) if limit is not None else None)


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cgroup_limit_of_a_systemd_unit_is_found_below_the_root(tmp_path: Path) -> None:
    """Regression: under systemd (cgroup v2) MemoryMax is on the unit's cgroup, not on the
    root; reading only /sys/fs/cgroup/memory.max saw no limit at all, so "auto" sized DuckDB
    and the address-space bound from the machine's memory instead of MemoryMax."""
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/system.slice/quiver.service\n")
    _tree(
        root,
        {
            "cgroup.controllers": "cpu memory pids",
            "system.slice/memory.max": "max",
            "system.slice/quiver.service/memory.max": str(512 * 1024**2),
            "system.slice/quiver.service/memory.current": str(200 * 1024**2),
        },
    )
    got = cgroup_memory(root, proc)
    assert got.limit == 512 * 1024**2 and got.current == 200 * 1024**2
    assert memory_available(root, proc) == 512 * 1024**2
    # A tighter limit on a parent slice wins.
    (root / "system.slice/memory.max").write_text(str(256 * 1024**2))
    assert cgroup_memory(root, proc).limit == 256 * 1024**2


def test_cgroup_variants_v1_namespaced_and_unlimited(tmp_path: Path) -> None:
    proc = tmp_path / "cg"
    # cgroup v1: the memory controller's own hierarchy; "unlimited" is a huge number.
    v1 = tmp_path / "v1"
    proc.write_text("5:devices:/x\n4:memory:/docker/abc\n0::/\n")
    _tree(
        v1,
        {
            "memory/docker/abc/memory.limit_in_bytes": str(1024**3),
            "memory/docker/abc/memory.usage_in_bytes": "12345",
            "memory/memory.limit_in_bytes": "9223372036854771712",
        },
    )
    assert cgroup_memory(v1, proc) == (1024**3, 12345)
    (v1 / "memory/docker/abc/memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_memory(v1, proc) == (None, 12345)
    # A container with its own cgroup namespace: its cgroup is the root it sees, and the
    # path in /proc/self/cgroup may not exist below it.
    ns = tmp_path / "ns"
    proc.write_text("0::/../../kubepods/pod1\n")
    _tree(ns, {"memory.max": str(2 * 1024**3), "memory.current": "999"})
    assert cgroup_memory(ns, proc) == (2 * 1024**3, 999)
    # No limit ("max") and no cgroup at all.
    (ns / "memory.max").write_text("max\n")
    assert cgroup_memory(ns, proc).limit is None
    assert cgroup_memory(tmp_path / "absent", tmp_path / "absent-proc") == (None, None)


# --- admission ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("metrics-admission"),
        limits={"max_concurrent_queries": 1, "max_concurrent_total": 2, "admission_wait_seconds": 0.2},
    )
    yield s
    s.stop()


def test_admission_metrics_count_running_streams_and_refusals_by_reason(gated: Server) -> None:
    client = gated.flight()
    a = call_options(gated.mint("agent", "demo", "metrics-a"))
    b = call_options(gated.mint("agent", "demo", "metrics-b"))
    c = call_options(gated.mint("agent", "demo", "metrics-c"))
    before = _scrape(gated)
    per0 = _metric(before, "quiver_admission_refusals_total", 'reason="per_principal"') or 0
    tot0 = _metric(before, "quiver_admission_refusals_total", 'reason="total"') or 0
    readers = [hold(client, long_ticket(client, a), a)]
    try:
        with pytest.raises(flight.FlightError) as exc:  # a's share (1) is full
            hold(client, long_ticket(client, a), a)
        assert error_info(exc.value)["code"] == "RESOURCE_EXHAUSTED"
        readers.append(hold(client, long_ticket(client, b), b))
        text = _scrape(gated)
        assert _metric(text, "quiver_admission_streams_running") == 2
        with pytest.raises(
            flight.FlightError
        ) as exc:  # the server (2) is full: planning waits, then is refused
            client.get_flight_info(cmd(kind="query", sql="SELECT 9 AS nine"), c)
        assert error_info(exc.value)["code"] == "RESOURCE_EXHAUSTED"
        text = _scrape(gated)
        assert _metric(text, "quiver_admission_refusals_total", 'reason="per_principal"') == per0 + 1
        assert _metric(text, "quiver_admission_refusals_total", 'reason="total"') == tot0 + 1
    finally:
        for r in readers:
            r.cancel()
    wait_idle(gated)
    assert _metric(_scrape(gated), "quiver_admission_streams_running") == 0


# --- backups --------------------------------------------------------------------------------------
def test_backup_metrics_and_status_show_the_last_outcome_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "data"
    backups = tmp_path / "backups"
    server = start_server(data, demo=False, backup={"dir": str(backups)})
    try:
        text = _scrape(server)
        assert _metric(text, "quiver_backup_last_success_timestamp_seconds") == 0
        assert _metric(text, "quiver_backup_last_outcome", 'outcome="none"') == 1
        assert server.http().get("/v1/status").json()["backup"]["last_outcome"] == "none"

        r = server.http().post("/v1/backup")
        assert r.status_code == 201, r.text
        name = r.json()["name"]
        text = _scrape(server)
        success = _metric(text, "quiver_backup_last_success_timestamp_seconds")
        assert success is not None and success > 0
        assert _metric(text, "quiver_backup_last_outcome", 'outcome="ok"') == 1
        assert _metric(text, "quiver_backups_total", 'outcome="ok"') == 1
        status = server.http().get("/v1/status").json()["backup"]
        assert status["last_outcome"] == "ok" and status["last_snapshot"] == name

        # The backup directory becomes unusable (a file where it should be): the next attempt
        # fails, and says so in the metrics and the status; the last success is kept.
        shutil.rmtree(backups)
        backups.write_text("not a directory")
        r = server.http().post("/v1/backup")
        assert r.status_code >= 400
        text = _scrape(server)
        assert _metric(text, "quiver_backup_last_outcome", 'outcome="failed"') == 1
        assert _metric(text, "quiver_backup_last_outcome", 'outcome="ok"') == 0
        assert _metric(text, "quiver_backups_total", 'outcome="failed"') == 1
        assert _metric(text, "quiver_backup_last_success_timestamp_seconds") == success
        status = server.http().get("/v1/status").json()["backup"]
        assert status["last_outcome"] == "failed" and status["last_error"]
        assert status["last_snapshot"] == name
    finally:
        server.stop()
    server = start_server(data, demo=False, backup={"dir": str(backups)})
    try:
        status = server.http().get("/v1/status").json()["backup"]
        assert status["last_outcome"] == "failed" and status["last_snapshot"] == name
        text = _scrape(server)
        assert _metric(text, "quiver_backup_last_success_timestamp_seconds") == success
        assert _metric(text, "quiver_backup_last_outcome", 'outcome="failed"') == 1
    finally:
        server.stop()
