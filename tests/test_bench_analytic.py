"""The analytic benchmark's statistics (tests/bench/bench_analytic.py): the paired ratio is
printed beside the ratio of medians, and load that falls on one contender's samples moves
the one and not the other. No data is generated: the report is built from given samples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tests.bench.bench_analytic import Timings, _report, paired_ratio
from tests.bench.plain_duckdb import PlainDuckdb

ROOT = Path(__file__).resolve().parents[1]


def test_paired_ratio_is_the_median_of_per_repetition_ratios() -> None:
    # Repetition 3 loaded only Quiver's run, repetitions 4 and 5 both runs of the pair: the
    # medians compare a quiet in-process median with a loaded Quiver one; the pairs do not.
    duck = [0.100, 0.100, 0.100, 0.200, 0.200]
    quiver = [0.105, 0.105, 0.210, 0.210, 0.210]
    assert paired_ratio(duck, quiver) == pytest.approx(0.100 / 0.105)
    assert 0.100 / 0.210 < 0.5  # the ratio of medians the same samples give


@pytest.mark.parametrize(("duck", "quiver"), [([0.1, 0.2], [0.1]), ([], [])])
def test_paired_ratio_refuses_unpaired_samples(duck: list[float], quiver: list[float]) -> None:
    with pytest.raises(ValueError, match="paired samples need equal, non-zero counts"):
        paired_ratio(duck, quiver)


def _timings(duck: list[float], off: list[float], other: list[float] | None = None) -> Timings:
    t = Timings(duck=list(duck), info=[x - 0.001 for x in off], doget=[0.001] * len(off))
    t.other = list(other if other is not None else duck)
    t.first, t.hit, t.rows, t.load = duck[0] * 1.01, 0.002, 10, 1.0
    return t


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _row(text: str, query: str) -> dict[str, str]:
    """The per-query table's row of ``query``, by column title (every row as wide as the header)."""
    lines = text.splitlines()
    columns = _cells(next(line for line in lines if line.startswith("| query |")))
    cells = _cells(next(line for line in lines if line.startswith(f"| {query} |")))
    assert len(cells) == len(columns)
    return dict(zip(columns, cells, strict=True))


def _summary(text: str) -> dict[str, list[str]]:
    """Every table row of the report by its first cell."""
    return {
        cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ") and (cells := _cells(line))
    }


def test_report_prints_the_paired_ratio_beside_the_ratio_of_medians() -> None:
    times = {
        "q01 steady": _timings([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        "q02 loaded": _timings([0.100, 0.100, 0.100, 0.200, 0.200], [0.105, 0.105, 0.210, 0.210, 0.210]),
    }
    text = _report(times, 1.3, 0.3, "no cache hit", "no cache hit", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    row = _row(text, "q02 loaded")
    assert row["ratio"] == "0.48x"
    assert row["paired ratio"] == "0.95x"
    summary = _summary(text)
    assert summary["worst query, caches off"][0] == "0.48x (q02 loaded)"
    assert summary["worst query, paired ratio, caches off"] == ["0.95x (q02 loaded)", ">= 0.90x", "yes"]
    assert summary["geomean paired ratio, caches off (median of per-repetition ratios)"][2] == "yes"


def test_report_prints_the_a_a_spread_of_two_duckdb_processes() -> None:
    """The A/A rows: in-process DuckDB against the same DuckDB in a second process, per query
    and summed up, and Quiver against that second process."""
    times = {
        "q01 same": _timings([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], other=[0.5, 0.5, 0.5]),
        "q02 slower process": _timings([0.1, 0.1, 0.1], [0.12, 0.12, 0.12], other=[0.125, 0.125, 0.125]),
    }
    text = _report(times, 1.3, 0.3, "no cache hit", "no cache hit", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    row = _row(text, "q02 slower process")
    assert row["A/A paired ratio"] == "0.80x"
    assert row["duckdb in a second process (A/A)"] == "0.125 s [0.125-0.125]"
    summary = _summary(text)
    worst = summary["A/A: worst query, paired ratio"][0]
    assert worst == "0.80x (q02 slower process); best 1.00x (q01 same)"
    against = next(v for k, v in summary.items() if k.startswith("Quiver caches off against duckdb"))
    assert against[0].endswith("1.00x (q01 same)")  # q02: 0.125 / 0.12 > 1


def test_the_plain_duckdb_process_runs_what_it_is_sent(tmp_path: Path) -> None:
    """tests/bench/plain_duckdb.py: a real subprocess on a real file answers each query with
    DuckDB's time and the rows, and a failing query with its error (the benchmark stops)."""
    path = tmp_path / "plain.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t AS SELECT range AS id FROM range(1000)")
    plain = PlainDuckdb(path)
    try:
        seconds, rows = plain.query("SELECT id FROM t WHERE id % 10 = 0")
        assert rows == 100 and 0 < seconds < 60
        with pytest.raises(RuntimeError, match="CatalogException"):
            plain.query("SELECT * FROM missing")
        assert plain.query("SELECT count(*) FROM t")[1] == 1  # still answering
    finally:
        plain.close()


def test_ab_analytic_finds_every_step_it_times() -> None:
    """ab_analytic wraps server functions by module and name: a rename must fail here. In a
    child process: the wrappers replace the server's functions for good."""
    done = subprocess.run(
        [sys.executable, "-c", "from tests.bench.ab_analytic import _instrument; _instrument()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
