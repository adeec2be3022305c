"""`make bench`: run the benchmark modules in one process run and write the figures to
tests/bench/RESULTS.md (linked from the README).

A benchmark module is ``tests/bench/bench_*.py`` exposing ``run() -> str``: it prints its
figures as it goes and returns a Markdown section (``## title``) for the results file. A
module with ``DEFAULT = False`` (the 1 GB analytic set, the memory tests: minutes each, and
gigabytes of disk or memory; the Flight SQL comparison, over a minute) runs only when named. Sections are replaced by title; the
sections of modules that did not run are kept, so each figure stays beside the run that made
it (every section states its own date and machine load).
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

USAGE = """usage: python -m tests.bench [--help] [MODULE ...]

Runs benchmark modules (tests/bench/bench_*.py) and writes their sections of
tests/bench/RESULTS.md, keeping the sections of the modules that did not run.
Without MODULE, runs the default set (`make bench`, about 10 minutes on 2 cores).

modules (* = default set):
{modules}

Environment: QUIVER_BENCH_ROWS, QUIVER_BENCH_REPS, QUIVER_BENCH_POINTS (see each module's
docstring), QUIVER_BENCH_DATA (where the analytic data file is cached).
"""


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))


def _is_default(name: str) -> bool:
    """Whether a module runs without being named: read from its source (``DEFAULT = False``)
    so that --help imports nothing heavy."""
    text = (HERE / f"{name}.py").read_text()
    return "\nDEFAULT = False" not in text


def _summary(name: str) -> str:
    text = (HERE / f"{name}.py").read_text()
    doc = text.split('"""', 2)[1] if text.startswith('"""') else ""
    first = " ".join(doc.strip().split("\n\n", 1)[0].split())
    return first[:150]


def usage() -> str:
    lines = []
    for name in _modules():
        mark = "*" if _is_default(name) else " "
        lines.append(f"  {mark} {name.removeprefix('bench_'):<10} {_summary(name)}")
    return USAGE.format(modules="\n".join(lines))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage())
        return 0
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        print(f"unknown option {unknown[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    wanted = set(argv)
    names = _modules()
    if wanted:
        known = {n.removeprefix("bench_") for n in names} | set(names)
        missing = sorted(wanted - known)
        if missing:
            print(f"no benchmark module {missing[0]!r}\n\n{usage()}", file=sys.stderr)
            return 2
        names = [n for n in names if n.removeprefix("bench_") in wanted or n in wanted]
    else:
        names = [n for n in names if _is_default(n)]
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
        f"Last written by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.machine()}, {platform.python_version()}, "
        f"{_cores()} cores. All figures of one section come from one run on the same data; "
        "sections of modules that did not run are kept from earlier runs.\n"
    )
    results = HERE / "RESULTS.md"
    if results.exists():
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
