"""`make bench`: run every benchmark module in one process run and write the figures to
tests/bench/RESULTS.md (linked from the README).

A benchmark module is ``tests/bench/bench_*.py`` exposing ``run() -> str``: it prints its
figures as it goes and returns a Markdown section for the results file. Pass module names
(e.g. ``python -m tests.bench flight``) to run only some: their sections of the results file
are replaced, the others kept.
"""

from __future__ import annotations

import importlib
import pkgutil
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    wanted = set(argv)
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    if wanted:
        names = [n for n in names if n.removeprefix("bench_") in wanted or n in wanted]
    sections = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(f"tests.bench.{name}")
        sections.append(module.run())
        print(f"=== {name} done in {time.perf_counter() - started:.1f} s ===", flush=True)
    command = "python -m tests.bench " + " ".join(argv) if argv else "make bench"
    header = (
        "# Benchmark results\n\n"
        f"Written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {platform.python_version()}, "
        f"{_cores()} cores. All figures of one section come from one run on the same data.\n"
    )
    results = HERE / "RESULTS.md"
    if wanted and results.exists():
        # Only some modules ran: replace their sections, keep the others' figures.
        sections = _merge(results.read_text(), sections)
    results.write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"\nwrote {results}")
    return 0


def _merge(old: str, new: list[str]) -> list[str]:
    """The sections (``## title`` blocks) of ``old``, with those of ``new`` replacing the ones
    of the same title; sections only in ``new`` come last."""
    kept: dict[str, str] = {}
    for block in ("\n" + old).split("\n## ")[1:]:
        title = block.split("\n", 1)[0].strip()
        kept[title] = "## " + block.strip()
    for section in new:
        kept[section.split("\n", 1)[0].removeprefix("## ").strip()] = section.strip()
    return list(kept.values())


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
