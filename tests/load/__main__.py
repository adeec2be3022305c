"""`make load` / ``python -m tests.load``: the load test of issue #8.

``python -m tests.load --seconds 60 --agents 32 --hostile 4`` starts a real
``quiver serve --demo`` (subprocess, 127.0.0.1, ephemeral ports, address-space cap), mints a
token per agent through the control plane, runs the agents for ``--seconds``, prints a
summary and the per-class table, and writes ``tests/bench/LOAD.md`` (``--output -`` writes
nothing; ``--json`` also writes the report as JSON). The exit status is 0 only when the
server survived and the well-behaved agents saw no error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec

from tests.load.agents import HOSTILE_KINDS
from tests.load.report import markdown, summary, table
from tests.load.runner import DEFAULT_OUTPUT, LoadConfig, run


def parse_args(argv: Sequence[str]) -> tuple[LoadConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="duration of the load (default 60)")
    p.add_argument("--agents", type=int, default=32, help="well-behaved agents (default 32)")
    p.add_argument("--hostile", type=int, default=4, help="hostile agents (default 4)")
    p.add_argument(
        "--hostile-kinds",
        default=",".join(HOSTILE_KINDS),
        help=f"what the hostile agents do, comma-separated (default: all of {','.join(HOSTILE_KINDS)})",
    )
    p.add_argument("--scale", type=float, default=0.1, help="demo data scale (default 0.1: orders 200k rows)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a server setting, e.g. limits.query_timeout_seconds=5 (repeatable)",
    )
    p.add_argument(
        "--memory-cap-gib",
        type=float,
        default=6.0,
        help="the server's address-space cap (default 6; 0: none)",
    )
    p.add_argument("--output", default=str(DEFAULT_OUTPUT), help="Markdown results file ('-': none)")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server log, data)")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.hostile_kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(HOSTILE_KINDS))
    if unknown:
        p.error(f"unknown hostile kinds {unknown}; known: {', '.join(HOSTILE_KINDS)}")
    if args.seconds <= 0 or args.agents < 0 or args.hostile < 0 or (args.hostile and not kinds):
        p.error("--seconds must be > 0, --agents and --hostile >= 0, and hostile agents need kinds")
    settings = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            p.error(f"--set takes SECTION.KEY=VALUE, got {item!r}")
        settings[key.strip()] = value.strip()
    command = "python -m tests.load " + " ".join(argv) if argv else "make load"
    cfg = LoadConfig(
        seconds=args.seconds,
        agents=args.agents,
        hostile=args.hostile,
        hostile_kinds=kinds,
        scale=args.scale,
        settings=settings,
        memory_cap_gib=args.memory_cap_gib,
        command=command.strip(),
    )
    return cfg, args


def main(argv: Sequence[str]) -> int:
    cfg, args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="quiver-load-"))
    try:
        report = run(cfg, work)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(summary(report))
    if report.death:
        print(f"\n{report.death}; last lines of its log:\n{report.log_tail}")
    if report.server_errors:
        print(
            "errors in the server's log: " + "; ".join(f"{n}x {k}" for k, n in report.server_errors.items())
        )
    print()
    print(table(report))
    if args.output != "-":
        Path(args.output).write_text(markdown(report))
        print(f"\nwrote {args.output}")
    if args.json:
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    return 0 if report.survived and report.good_errors == 0 else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # the server was stopped on the way out (run's finally)
        raise SystemExit(130) from None
