"""The load test's report: per operation class, requests, rate, latency percentiles and
outcomes; the server's memory over the run; whether it survived. A msgspec Struct, so that
``--json`` writes exactly what the Markdown and the printed table are made from."""

from __future__ import annotations

from collections import Counter

import msgspec

from tests.load.agents import Sample, expected

MIB = 1024**2


class OpStats(msgspec.Struct, kw_only=True):
    op: str
    hostile: bool
    requests: int
    per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    ok: int
    #: error code -> count ("RESOURCE_EXHAUSTED", "INTERNAL*", "HTTP 401", …)
    errors: dict[str, int]
    #: requests whose outcome is not one expected for the class (agents.EXPECTED)
    unexpected: int
    #: hostile requests answered after more than the query time limit allows (see op_stats)
    slow: int
    expected: list[str]


class Memory(msgspec.Struct, kw_only=True):
    """The server's VmRSS (sampled every 0.25 s) in bytes."""

    start: int  # when the agents started
    peak: int  # highest sample during the run
    end: int  # when the agents had stopped (0: the server was gone)
    hwm: int  # VmHWM, the kernel's own peak, at the end (or the last sample)
    vm_peak: int  # VmPeak: the peak address space, to compare with the cap
    samples: list[tuple[float, int]]  # (seconds into the run, VmRSS), about one a second


class Report(msgspec.Struct, kw_only=True):
    date: str
    command: str
    config: dict[str, str]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seconds: float  # the configured duration: rates are per second of it (or of less, on a crash)
    wall_seconds: float  # until the last agent had stopped (a call in flight at the deadline ends first)
    ops: list[OpStats]
    good_requests: int
    good_errors: int
    good_per_second: float
    hostile_requests: int
    memory: Memory
    survived: bool
    death: str | None  # "server died at t=…s, exit code …"
    server_exit: str  # how the server ended when stopped after the run
    log_tail: str  # last lines of the server log when it died, else ""
    #: the server log's error events by event and exception (what lies behind INTERNAL)
    server_errors: dict[str, int]
    stuck_agents: int  # agents still inside a call after the join timeout
    first_good_error: str | None  # "t=3.2s point INTERNAL": when well-behaved agents first failed
    #: ticket re-use: the most DoGets of one ticket seen streaming at once (client side,
    #: from the stream's first message to its end), the rounds, and the server's cap
    reuse_peak: int
    reuse_rounds: int
    reuse_over_cap: int
    concurrency_cap: int
    server_cpu_seconds: float  # user + system CPU of the server during the load
    generator_cpu_seconds: float  # the same for this process (the agents), on the same machine


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def op_stats(samples: list[Sample], seconds: float, slow_seconds: float = float("inf")) -> list[OpStats]:
    """One row per operation class: the good agents' first, then the hostile ones. A hostile
    request answered after more than ``slow_seconds`` counts as unexpected whatever the
    answer: the query time limit did not stop its work."""
    by_op: dict[tuple[bool, str], list[Sample]] = {}
    for s in samples:
        by_op.setdefault((s.hostile, s.op), []).append(s)
    rows = []
    for (hostile, op), group in sorted(by_op.items()):
        latencies = [s.seconds for s in group]
        outcomes = Counter(s.outcome for s in group)
        right = expected(op, hostile)
        wrong = {id(s) for s in group if s.outcome not in right}
        slow = {id(s) for s in group if hostile and s.seconds > slow_seconds}
        ok = outcomes.pop("ok", 0)
        rows.append(
            OpStats(
                op=op,
                hostile=hostile,
                requests=len(group),
                per_second=len(group) / seconds if seconds > 0 else 0.0,
                p50_ms=percentile(latencies, 50) * 1e3,
                p99_ms=percentile(latencies, 99) * 1e3,
                max_ms=max(latencies) * 1e3,
                ok=ok,
                errors=dict(sorted(outcomes.items())),
                unexpected=len(wrong | slow),
                slow=len(slow),
                expected=sorted(right),
            )
        )
    return rows


def _errors(row: OpStats) -> str:
    text = ", ".join(f"{code} {n}" for code, n in row.errors.items()) or "-"
    return text + (f"; {row.slow} too slow" if row.slow else "")


def table(report: Report) -> str:
    """The per-class table as Markdown (also what the command prints)."""
    lines = [
        "| class | agent | requests | req/s | p50 ms | p99 ms | max ms | ok | errors / refusals by code "
        "| expected | unexpected |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in report.ops:
        lines.append(
            f"| {r.op} | {'hostile' if r.hostile else 'good'} | {r.requests} | {r.per_second:.1f} | "
            f"{r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.0f} | {r.ok} | {_errors(r)} | "
            f"{', '.join(r.expected) or '-'} | {r.unexpected} |"
        )
    return "\n".join(lines)


def summary(report: Report) -> str:
    m = report.memory
    verdict = "survived" if report.survived else (report.death or "stopped serving").removeprefix("server ")
    lines = [
        f"load: {report.seconds:g} s ({report.wall_seconds:.1f} s until the last call in flight ended), "
        f"{report.config.get('agents')} good + {report.config.get('hostile')} hostile agents; "
        f"server {verdict}",
        f"good agents: {report.good_requests} requests, {report.good_per_second:.1f} req/s, "
        f"{report.good_errors} errors (target 0)"
        + (f", the first at {report.first_good_error}" if report.first_good_error else ""),
        f"hostile agents: {report.hostile_requests} requests; not answered as expected: "
        + (
            ", ".join(
                f"{r.op} {r.unexpected}" + (f" ({r.slow} too slow)" if r.slow else "")
                for r in report.ops
                if r.hostile and r.unexpected
            )
            or "none"
        ),
        f"server RSS: start {m.start / MIB:.0f} MiB, peak {m.peak / MIB:.0f} MiB, "
        f"end {m.end / MIB:.0f} MiB (VmHWM {m.hwm / MIB:.0f} MiB; address space VmPeak "
        f"{m.vm_peak / MIB:.0f} MiB, cap {report.config.get('address-space cap', '?')})",
        f"CPU seconds during the load: server {report.server_cpu_seconds:.1f}, agents (this "
        f"process) {report.generator_cpu_seconds:.1f}, on {report.config.get('machine', '?')}",
        "machine load (1/5/15 min): before "
        + " ".join(f"{x:.2f}" for x in report.load_before)
        + ", after "
        + " ".join(f"{x:.2f}" for x in report.load_after),
    ]
    if report.reuse_rounds:
        lines.append(
            f"ticket re-use: up to {report.reuse_peak} DoGets of one ticket streamed at once; "
            f"{report.reuse_over_cap} of {report.reuse_rounds} rounds went over the per-principal "
            f"cap ([limits] max_concurrent_queries = {report.concurrency_cap})"
        )
    if report.stuck_agents:
        lines.append(f"{report.stuck_agents} agents were still inside a call when the run ended")
    return "\n".join(lines)


def markdown(report: Report) -> str:
    config = ", ".join(f"{k} `{v}`" for k, v in report.config.items())
    rss = " · ".join(f"{t:.0f} s: {b / MIB:.0f}" for t, b in report.memory.samples)
    parts = [
        "# Load test results",
        "",
        f"Written by `{report.command}` on {report.date}. Config: {config}.",
        "",
        "What it does ([tests/load/](../load/__main__.py)): a real `quiver serve --demo` subprocess on "
        "127.0.0.1 (ephemeral ports, under an address-space cap), driven by well-behaved agents "
        "(each a thread with its own agent token minted through the control plane, in a swarm "
        "with its own allowlist, one call at a time through `QuiverClient` or httpx) and hostile "
        "agents (constant-heavy queries, deep nesting, huge parameter references, one ticket "
        "DoGet many times at once, bad-token floods on both listeners, oversized commands). "
        "Latencies are client-side, per request (an `async` request is submit + status polls + "
        "fetch; `h.reuse_info` is the GetFlightInfo of a query ticket and `h.reuse_doget` each "
        "of the 8 DoGets of that one ticket run at once, which the per-principal cap "
        "`[limits] max_concurrent_queries` should bound). A code with `*` was "
        "not sent by the server (no `extra_info`): it is inferred from the gRPC status or the "
        "transport; `HTTP n` is a control-plane status. `expected` is what issue #8 asks for "
        "(tests/load/agents.py `EXPECTED`): a well-behaved request succeeds, a hostile one is "
        "refused with a code, and in time; `unexpected` counts the requests that got anything "
        "else, or whose answer came later than 1.5 times `[limits] query_timeout_seconds` plus "
        "2 s (`too slow`: the time limit did not stop the work).",
        "",
        "```",
        summary(report),
        "```",
        "",
    ]
    if report.death:
        parts += [f"**{report.death}.** Last lines of its log:", "", "```", report.log_tail, "```", ""]
    parts += [table(report), ""]
    if report.server_errors:
        parts += ["Errors in the server's log (by event and exception):", ""]
        parts += [f"- {n}x `{key}`" for key, n in report.server_errors.items()]
        parts += [""]
    parts += [
        f"Server VmRSS (MiB) over the run: {rss}.",
        "",
        f"Server stop after the run: {report.server_exit}.",
        "",
    ]
    return "\n".join(parts)
