"""The load harness (tests/load, ``make load``) in a few seconds: 2 well-behaved agents and
1 hostile one against a real ``quiver serve`` subprocess. It checks the harness itself (every
operation class shows up in the report, with latencies and outcomes), that the well-behaved
agents saw no error, and that the server survived and stopped cleanly.

The hostile agent runs every kind except ``constant`` (constant-heavy queries such as
``length(range(150000000))``, which take seconds and gigabytes per query on a server whose
planning is not bounded yet); the full run (``make load``) has them all.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import msgspec
import pytest

from tests.load.agents import GOOD_MIX, HOSTILE_KINDS, Sample, hostile_kinds, max_overlap
from tests.load.report import Report, markdown, op_stats, summary, table
from tests.load.runner import LoadConfig, run
from tests.load.server import LoadServer

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

KINDS = list(HOSTILE_KINDS)


def test_short_load_run_reports_every_class_and_the_server_survives(tmp_path: Path) -> None:
    cfg = LoadConfig(seconds=3, agents=2, hostile=1, hostile_kinds=KINDS, scale=0.01, command="smoke")
    report = run(cfg, tmp_path)

    assert report.death is None, report.log_tail
    assert report.survived, summary(report)
    assert report.server_exit == "exit code 0"
    assert report.stuck_agents == 0

    good = {r.op: r for r in report.ops if not r.hostile}
    hostile = {r.op: r for r in report.ops if r.hostile}
    assert set(good) == set(GOOD_MIX), summary(report)  # every agent does each class once first
    expected_hostile = {op for kind in KINDS for op in HOSTILE_KINDS[kind]}
    assert expected_hostile <= set(hostile), expected_hostile - set(hostile)
    assert "harness_error" not in hostile

    # The well-behaved agents' target: no error at all.
    assert report.good_errors == 0, {op: r.errors for op, r in good.items() if r.errors}
    assert report.good_requests == sum(r.requests for r in good.values()) > 0
    for r in report.ops:
        assert r.expected, r.op  # every class states what is right for it
        assert r.requests == r.ok + sum(r.errors.values())
        assert 0 < r.p50_ms <= r.p99_ms <= r.max_ms
    # Bad tokens are refused on both listeners, every one of them.
    assert set(hostile["h.flood_flight"].errors) == {"UNAUTHENTICATED"}
    assert set(hostile["h.flood_http"].errors) == {"HTTP 401"}
    assert hostile["h.flood_flight"].ok == hostile["h.flood_http"].ok == 0
    assert hostile["h.flood_flight"].unexpected == hostile["h.flood_http"].unexpected == 0
    # Oversized commands are refused with a code.
    assert hostile["h.big_command"].errors == {"INVALID_ARGUMENT": hostile["h.big_command"].requests}

    # Ticket re-use ran, and how many streams of one ticket ran at once is on record.
    assert report.reuse_rounds >= 1 and 1 <= report.reuse_peak <= 8
    assert report.concurrency_cap == 4

    m = report.memory
    assert 0 < m.start <= m.peak and 0 < m.end <= m.peak < m.vm_peak
    # (VmHWM is the kernel's own peak, updated lazily: a VmRSS read may briefly exceed it.)
    assert 0 < m.hwm < m.vm_peak
    assert report.first_good_error is None
    assert report.server_cpu_seconds > 0

    # The report round-trips as JSON and renders.
    assert msgspec.json.decode(msgspec.json.encode(report), type=Report) == report
    assert "| h.flood_http | hostile |" in table(report)
    assert "Load test results" in markdown(report)


def test_op_stats_count_outcomes_and_refusals_that_came_too_late() -> None:
    samples = [
        Sample("point", False, 0.1, 0.010, "ok"),
        Sample("point", False, 0.2, 0.030, "INTERNAL"),
        Sample("h.range", True, 0.3, 0.5, "INVALID_ARGUMENT"),
        Sample("h.range", True, 9.0, 8.0, "DEADLINE_EXCEEDED"),  # refused, but long after 3 s
        Sample("h.range", True, 9.5, 0.4, "INTERNAL*"),
    ]
    point, h_range = op_stats(samples, seconds=10, slow_seconds=3 * 1.5 + 2)
    assert (point.op, point.requests, point.ok, point.errors, point.unexpected) == (
        "point",
        2,
        1,
        {"INTERNAL": 1},
        1,
    )
    assert point.per_second == 0.2 and point.max_ms == 30
    assert h_range.hostile and h_range.ok == 0
    assert h_range.errors == {"DEADLINE_EXCEEDED": 1, "INTERNAL*": 1, "INVALID_ARGUMENT": 1}
    assert (h_range.unexpected, h_range.slow) == (2, 1)


def test_max_overlap() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (1, 2)]) == 1  # one ends as the next starts
    assert max_overlap([(0, 3), (1, 2), (1.5, 4), (5, 6)]) == 3


def test_every_hostile_kind_has_an_agent_whatever_their_number() -> None:
    kinds = list(HOSTILE_KINDS)
    for hostile in range(1, 2 * len(kinds) + 1):
        assigned = [hostile_kinds(i, hostile, kinds) for i in range(hostile)]
        assert {k for a in assigned for k in a} == set(kinds), hostile
        assert all(assigned)
    assert hostile_kinds(0, 4, kinds) == ["constant"]  # the slow kind runs on its own


def test_a_server_crash_is_reported_with_its_time_and_signal(tmp_path: Path) -> None:
    """The harness tells a crash (here SIGKILL, as the kernel's OOM killer would send) at
    once, with when and how, instead of letting agents time out against a dead port."""
    server = LoadServer(tmp_path, scale=0.01)
    died = threading.Event()
    server.on_death = died.set
    try:
        assert server.alive and server.death() is None
        server.load_started = time.monotonic()
        os.kill(server.pid, signal.SIGKILL)
        assert died.wait(30)
        assert not server.alive
        death = server.death()
        assert death is not None
        assert re.fullmatch(r"server died at t=\d+\.\ds into the load, killed by SIGKILL \(-9\)", death)
    finally:
        assert server.stop() == -signal.SIGKILL
    assert server.death() == death  # a stop after the crash keeps the crash on record
