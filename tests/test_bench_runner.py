"""The benchmark runner's command line: ``--help`` and mistakes leave RESULTS.md alone, and a
partial run replaces only its own sections."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.__main__ import _merge, _modules

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "bench" / "RESULTS.md"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_writes_nothing(flag: str) -> None:
    before = RESULTS.read_bytes()
    done = _bench(flag)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m tests.bench")
    for name in _modules():  # every module listed, the default set marked
        assert name.removeprefix("bench_") in done.stdout
    assert "* agent" in done.stdout and "  analytic" in done.stdout
    assert RESULTS.read_bytes() == before


@pytest.mark.parametrize("args", [["--fast"], ["no_such_module"]])
def test_mistakes_exit_2_and_write_nothing(args: list[str]) -> None:
    before = RESULTS.read_bytes()
    done = _bench(*args)
    assert done.returncode == 2
    assert args[0] in done.stderr and "usage:" in done.stderr
    assert RESULTS.read_bytes() == before


def test_merge_replaces_by_title_and_keeps_the_rest() -> None:
    old = "# Benchmark results\n\nheader\n\n## A\n\nold a\n\n## B\n\nold b\n"
    merged = _merge(old, ["## B\n\nnew b", "## C\n\nnew c"])
    assert merged == ["## A\n\nold a", "## B\n\nnew b", "## C\n\nnew c"]


def test_profile_point_finds_every_step_it_times() -> None:
    """profile_point wraps server functions by module and name: a rename must fail here, not
    the next time someone profiles (it imported flight_server.endpoints, renamed planner).
    In a child process: the wrappers replace the server's functions for good."""
    done = subprocess.run(
        [sys.executable, "-c", "from tests.bench.profile_point import _instrument; _instrument()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
