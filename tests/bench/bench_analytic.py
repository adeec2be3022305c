"""Multi-join aggregate queries on a generated star schema of at least 1 GB (issue #10, target 3).

Not in the default ``make bench`` run (generating the data takes minutes): run it with
``python -m tests.bench analytic``.

``star.sales`` (``QUIVER_BENCH_STAR_ROWS`` fact rows, default 20,000,000: about 1.3 GB as
Arrow) and five dimensions (dates, customers, products, stores, promos) are generated with
DuckDB's ``range()``/``hash()`` into ``QUIVER_BENCH_DATA`` (default ``tests/bench/data/``,
git-ignored) once and reused. Each of the 17 queries joins the facts with two to five
dimensions and aggregates; each is measured

- in-process: ``duckdb.connect(file, read_only=True).sql(q).to_arrow_table()`` — the limit.
  A connection configured as the server's (catalog/database.py: ``memory_limit`` half the
  memory available instead of DuckDB's 80 %, ``temp_directory``, external access off, the
  configuration locked, read-write) runs these queries no faster and no slower: measured
  A/B, interleaved, on 2026-12-02 (the medians scatter both ways with the machine's load, no
  setting changes a plan), so the read-only connection is a fair reference;
- the same in-process reference in a process of its own (tests/bench/plain_duckdb.py, its own
  copy of the file): the A/A figure. A server is another process than the benchmark's, and
  two fresh processes running the same plans differ by themselves (PROFILE.md, section 12);
- as a ``query`` command (GetFlightInfo, then DoGet of each endpoint, timed apart) against a
  ``quiver serve`` with every cache that holds table data off (``[cache] enabled = false``,
  ``table_memory_bytes = 0``). Each request's text is new (a comment carries a counter): the
  planner remembers for a minute which texts were slow or large at GetFlightInfo
  (flight_server/planner.py), so a repeated text would not be a first request of its text;
- against a ``quiver serve`` with the default configuration: the first request of each text
  (a result-cache miss), then the same text again (a result-cache hit, reported apart).

Both servers run on byte-for-byte copies of the file (a server writes its own bookkeeping
schema into it). Per query, in-process DuckDB, the caches-off server and the second DuckDB
process take turns — who goes first rotates per repetition — until each has
``QUIVER_BENCH_ANALYTIC_SECONDS`` (default 1.0) of samples and at least
``QUIVER_BENCH_ANALYTIC_REPS`` (default 3) repetitions (at most ``QUIVER_BENCH_ANALYTIC_MAX_REPS``,
default 25): short queries get more samples on a loaded 2-core machine. Each figure is a median printed with its spread (min-max), and the load
average is read before every query.

Two ratios per query. The *ratio of medians* (in-process median / Quiver median) compares
two independent medians: on a shared machine another session's burst falls on some samples
of one contender and not the other, and on a ~0.1 s query a few such samples move one median
by 10 % (two servers of the same code, A/A, came out up to 0.09 apart on one query in one
run; tests/bench/PROFILE.md, section 10). The *paired ratio* (:func:`paired_ratio`) is the median
over repetitions of (in-process seconds / Quiver seconds) of the *same* repetition, the two
run back to back: a burst that lasts both runs cancels in the ratio, one that hits a single
run is one outlier among the repetitions. The worst-query statistic is printed for both; what
is compared is the same (first requests, caches off, a new text each time).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.flight as flight

from tests.bench.bench_agent import CACHES_OFF, Quiver, _start, _warm
from tests.bench.bench_flight import _say, _settle
from tests.bench.plain_duckdb import PlainDuckdb

DEFAULT = False

STAR_ROWS = int(os.environ.get("QUIVER_BENCH_STAR_ROWS", "20000000"))
REPS = int(os.environ.get("QUIVER_BENCH_ANALYTIC_REPS", "3"))
MAX_REPS = int(os.environ.get("QUIVER_BENCH_ANALYTIC_MAX_REPS", "25"))
SAMPLE_SECONDS = float(os.environ.get("QUIVER_BENCH_ANALYTIC_SECONDS", "1.0"))
DATA = Path(os.environ.get("QUIVER_BENCH_DATA", str(Path(__file__).parent / "data")))
#: Queries run for minutes on a loaded 2-core machine; the default 30 s would cut them.
SLOW_QUERIES = {"QUIVER_LIMITS_QUERY_TIMEOUT_SECONDS": "600"}

STAR_SQL = """
CREATE SCHEMA star;
CREATE TABLE star.dates AS
SELECT i::INTEGER AS date_key, d, year(d) AS year, quarter(d) AS quarter, month(d) AS month,
       dayofweek(d) AS dow
FROM (SELECT i, DATE '2018-01-01' + i::INTEGER AS d FROM range(2557) t(i));
CREATE TABLE star.customers AS
SELECT i AS customer_key,
       (['AFRICA', 'AMERICA', 'ASIA', 'EUROPE', 'MIDDLE EAST'])[1 + (hash(i, 'r') % 5)::INTEGER] AS region,
       'nation-' || (hash(i, 'n') % 25)::VARCHAR AS nation,
       (['retail', 'smb', 'enterprise', 'public'])[1 + (hash(i, 's') % 4)::INTEGER] AS segment,
       (18 + hash(i, 'a') % 70)::INTEGER AS age
FROM range(1000000) t(i);
CREATE TABLE star.products AS
SELECT i AS product_key, 'cat-' || (hash(i, 'c') % 20)::VARCHAR AS category,
       'brand-' || (hash(i, 'b') % 200)::VARCHAR AS brand,
       (1 + hash(i, 'p') % 100000) / 100.0 AS list_price
FROM range(200000) t(i);
CREATE TABLE star.stores AS
SELECT i AS store_key, 'city-' || (hash(i, 'ci') % 300)::VARCHAR AS city,
       'state-' || (hash(i, 'st') % 50)::VARCHAR AS state,
       (['US', 'CA', 'MX', 'UK', 'DE', 'FR', 'JP', 'BR'])[1 + (hash(i, 'co') % 8)::INTEGER] AS country,
       (100 + hash(i, 'sz') % 5000)::INTEGER AS sqft
FROM range(2000) t(i);
CREATE TABLE star.promos AS
SELECT i AS promo_key,
       (['none', 'email', 'web', 'tv', 'radio', 'social'])[1 + (hash(i, 'ch') % 6)::INTEGER] AS channel,
       (hash(i, 'pc') % 30)::INTEGER AS pct
FROM range(500) t(i);
CREATE TABLE star.sales AS
SELECT i AS sale_id,
       (hash(i, 'd') % 2557)::INTEGER AS date_key,
       (hash(i, 'c') % 1000000)::BIGINT AS customer_key,
       (hash(i, 'p') % 200000)::BIGINT AS product_key,
       (hash(i, 's') % 2000)::INTEGER AS store_key,
       (hash(i, 'pr') % 500)::INTEGER AS promo_key,
       (1 + hash(i, 'q') % 20)::INTEGER AS quantity,
       ((hash(i, 'u') % 100000) / 100.0)::DOUBLE AS unit_price,
       ((hash(i, 'x') % 30) / 100.0)::DOUBLE AS discount,
       ((hash(i, 'k') % 80000) / 100.0)::DOUBLE AS unit_cost
FROM range({rows}) t(i);
"""

REVENUE = "s.quantity * s.unit_price * (1 - s.discount)"

QUERIES: dict[str, str] = {
    "q01 revenue by year, region": f"""
        SELECT d.year, c.region, sum({REVENUE}) AS revenue, count(*) AS n
        FROM star.sales s JOIN star.dates d USING (date_key) JOIN star.customers c USING (customer_key)
        GROUP BY ALL ORDER BY ALL""",
    "q02 top brands, ASIA 2021": f"""
        SELECT p.brand, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.dates d USING (date_key) JOIN star.customers c USING (customer_key)
             JOIN star.products p USING (product_key)
        WHERE d.year = 2021 AND c.region = 'ASIA'
        GROUP BY p.brand ORDER BY revenue DESC LIMIT 20""",
    "q03 revenue by country, channel": f"""
        SELECT st.country, pr.channel, sum({REVENUE}) AS revenue, avg(s.discount) AS avg_discount
        FROM star.sales s JOIN star.stores st USING (store_key) JOIN star.promos pr USING (promo_key)
        GROUP BY ALL ORDER BY ALL""",
    "q04 margin by category, quarter": f"""
        SELECT p.category, d.year, d.quarter,
               sum({REVENUE} - s.quantity * s.unit_cost) AS margin
        FROM star.sales s JOIN star.products p USING (product_key) JOIN star.dates d USING (date_key)
        GROUP BY ALL ORDER BY ALL""",
    "q05 discount by segment, channel": """
        SELECT c.segment, pr.channel, avg(s.discount) AS avg_discount, sum(s.quantity) AS units
        FROM star.sales s JOIN star.customers c USING (customer_key) JOIN star.promos pr USING (promo_key)
        GROUP BY ALL ORDER BY ALL""",
    "q06 monthly revenue by country, 2020": f"""
        SELECT st.country, d.month, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.dates d USING (date_key) JOIN star.stores st USING (store_key)
        WHERE d.year = 2020 GROUP BY ALL ORDER BY ALL""",
    "q07 distinct customers per category, year": """
        SELECT p.category, d.year, count(DISTINCT s.customer_key) AS customers
        FROM star.sales s JOIN star.products p USING (product_key) JOIN star.dates d USING (date_key)
        WHERE d.year IN (2019, 2022) GROUP BY ALL ORDER BY ALL""",
    "q08 top states by units, tv promos": """
        SELECT st.state, st.country, sum(s.quantity) AS units
        FROM star.sales s JOIN star.stores st USING (store_key) JOIN star.promos pr USING (promo_key)
        WHERE pr.channel = 'tv' GROUP BY ALL ORDER BY units DESC LIMIT 25""",
    "q09 age band by category": f"""
        SELECT (c.age // 10) * 10 AS age_band, p.category, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.customers c USING (customer_key) JOIN star.products p USING (product_key)
        GROUP BY ALL ORDER BY ALL""",
    "q10 weekday by region, country": f"""
        SELECT d.dow, c.region, st.country, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.dates d USING (date_key) JOIN star.customers c USING (customer_key)
             JOIN star.stores st USING (store_key)
        GROUP BY ALL ORDER BY ALL""",
    "q11 five-way cube slice": f"""
        SELECT d.year, c.region, p.category, pr.channel, st.country, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.dates d USING (date_key) JOIN star.customers c USING (customer_key)
             JOIN star.products p USING (product_key) JOIN star.promos pr USING (promo_key)
             JOIN star.stores st USING (store_key)
        WHERE d.year >= 2022 AND st.country IN ('US', 'DE', 'JP')
        GROUP BY ALL ORDER BY revenue DESC LIMIT 50""",
    "q12 brand share within category": f"""
        SELECT category, brand, revenue, revenue / sum(revenue) OVER (PARTITION BY category) AS share
        FROM (SELECT p.category, p.brand, sum({REVENUE}) AS revenue
              FROM star.sales s JOIN star.products p USING (product_key)
                   JOIN star.dates d USING (date_key)
              WHERE d.year = 2023 GROUP BY ALL)
        QUALIFY row_number() OVER (PARTITION BY category ORDER BY revenue DESC) <= 3
        ORDER BY category, revenue DESC""",
    "q13 top customers with region": f"""
        SELECT c.customer_key, c.region, c.segment, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.customers c USING (customer_key) JOIN star.promos pr USING (promo_key)
        WHERE pr.channel <> 'none'
        GROUP BY ALL ORDER BY revenue DESC LIMIT 100""",
    "q14 stores above their country's average": f"""
        WITH per_store AS (
            SELECT st.store_key, st.country, sum({REVENUE}) AS revenue
            FROM star.sales s JOIN star.stores st USING (store_key) JOIN star.dates d USING (date_key)
            WHERE d.year = 2021 GROUP BY ALL)
        SELECT country, count(*) AS stores_above
        FROM per_store p
        WHERE revenue > (SELECT avg(revenue) FROM per_store q WHERE q.country = p.country)
        GROUP BY country ORDER BY country""",
    "q15 year-over-year growth by category": f"""
        WITH y AS (
            SELECT p.category, d.year, sum({REVENUE}) AS revenue
            FROM star.sales s JOIN star.products p USING (product_key) JOIN star.dates d USING (date_key)
            GROUP BY ALL)
        SELECT a.category, a.year, a.revenue / b.revenue - 1 AS growth
        FROM y a JOIN y b ON a.category = b.category AND a.year = b.year + 1
        ORDER BY ALL""",
    "q16 promo depth vs units by quarter": """
        SELECT pr.pct // 10 AS depth, d.quarter, avg(s.quantity) AS avg_units, count(*) AS n
        FROM star.sales s JOIN star.promos pr USING (promo_key) JOIN star.dates d USING (date_key)
        GROUP BY ALL ORDER BY ALL""",
    "q17 pricey products in US stores": f"""
        SELECT p.category, sum({REVENUE}) AS revenue
        FROM star.sales s JOIN star.products p USING (product_key)
        WHERE p.list_price > 500
          AND s.store_key IN (SELECT store_key FROM star.stores WHERE country = 'US')
          AND s.customer_key IN (SELECT customer_key FROM star.customers WHERE segment = 'enterprise')
        GROUP BY ALL ORDER BY ALL""",
}


def _data_file() -> tuple[Path, float]:
    """The star schema file, generated once per row count; its tables' size as Arrow in GB."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"star-{STAR_ROWS}.duckdb"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        with duckdb.connect(str(partial)) as con:
            con.execute("SET enable_progress_bar = false")
            con.execute(STAR_SQL.format(rows=STAR_ROWS))
            con.execute("CHECKPOINT")
        partial.rename(path)
        _say(f"generated {path} in {time.perf_counter() - started:.1f} s")
    with duckdb.connect(str(path), read_only=True) as con:
        # Arrow bytes: fixed-width columns at their width, strings at their length + offsets.
        gb = 0.0
        for (table,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'star'"
        ).fetchall():
            cols = con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE schema_name = 'star' AND table_name = ?",
                [table],
            ).fetchall()
            n = con.execute(f"SELECT count(*) FROM star.{table}").fetchone()[0]  # type: ignore[index]
            for name, kind in cols:
                if kind == "VARCHAR":
                    chars = con.execute(f"SELECT sum(strlen({name})) FROM star.{table}").fetchone()[0]  # type: ignore[index]
                    gb += (chars + 4 * n) / 1e9
                else:
                    width = {"INTEGER": 4, "DATE": 4, "BIGINT": 8, "DOUBLE": 8}.get(kind, 8)
                    gb += width * n / 1e9
    return path, gb


def run() -> str:
    work = Path(tempfile.mkdtemp(prefix="quiver-bench-analytic-"))
    try:
        return _run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Timings:
    """The samples of one query."""

    duck: list[float] = field(default_factory=list)
    #: The same DuckDB in a process of its own (tests/bench/plain_duckdb.py): the A/A reference.
    other: list[float] = field(default_factory=list)
    #: The caches-off server: GetFlightInfo and DoGet (all endpoints) of each request.
    info: list[float] = field(default_factory=list)
    doget: list[float] = field(default_factory=list)
    first: float = 0.0
    hit: float = 0.0
    rows: int = 0
    load: float = 0.0

    @property
    def off(self) -> list[float]:
        return [a + b for a, b in zip(self.info, self.doget, strict=True)]


def _quiver_query(q: Quiver, sql: str) -> tuple[float, float, int]:
    """GetFlightInfo and DoGet of every endpoint of ``sql`` (seconds each) and the rows."""
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql}).encode())
    started = time.perf_counter()
    info = q.raw.get_flight_info(descriptor, q.opts)
    planned = time.perf_counter()
    rows = sum(q.raw.do_get(ep.ticket, q.opts).read_all().num_rows for ep in info.endpoints)
    return planned - started, time.perf_counter() - planned, rows


def _run(work: Path) -> str:
    load_before = os.getloadavg()
    master, gb = _data_file()
    file_gb = master.stat().st_size / 1e9
    _say(f"star schema: {STAR_ROWS:,} fact rows, {gb:.2f} GB as Arrow, file {file_gb:.2f} GB")
    for name in ("on", "off", "plain"):
        shutil.copyfile(master, work / f"{name}.duckdb")
    times = {q: Timings() for q in QUERIES}
    fresh = itertools.count(1)
    with contextlib.ExitStack() as stack:
        con = stack.enter_context(duckdb.connect(str(master), read_only=True))
        on = _start(stack, work, "quiver-on", work / "on.duckdb", SLOW_QUERIES, ("star.*",))
        off = _start(
            stack, work, "quiver-off", work / "off.duckdb", {**CACHES_OFF, **SLOW_QUERIES}, ("star.*",)
        )
        plain = PlainDuckdb(work / "plain.duckdb")
        stack.callback(plain.close)
        for qid in ("star.sales", "star.customers", "star.products"):  # the OS page cache, all alike
            con.sql(f"SELECT count(*) FROM {qid}").fetchall()
        before_on, before_off = on.counters(), off.counters()
        for name, sql in QUERIES.items():
            t = times[name]
            t.load = os.getloadavg()[0]

            def duck(t: Timings = t, sql: str = sql) -> None:
                _settle()
                started = time.perf_counter()
                expected = con.sql(sql).to_arrow_table()
                t.duck.append(time.perf_counter() - started)
                t.rows = expected.num_rows

            def other(t: Timings = t, sql: str = sql, name: str = name) -> None:
                _settle()
                seconds, rows = plain.query(sql)
                t.other.append(seconds)
                assert not t.rows or rows == t.rows, (name, rows, t.rows)

            def quiver(t: Timings = t, sql: str = sql, name: str = name) -> None:
                _settle()
                info, doget, rows = _quiver_query(off, f"{sql}\n-- request {next(fresh)}")
                t.info.append(info)
                t.doget.append(doget)
                assert not t.rows or rows == t.rows, (name, rows, t.rows)

            rep = 0
            while rep < MAX_REPS and (rep < REPS or min(sum(t.duck), sum(t.off)) < SAMPLE_SECONDS):
                steps = (duck, quiver, other)
                for step in steps[rep % 3 :] + steps[: rep % 3]:  # who goes first rotates
                    step()
                if rep == 0:
                    _settle()
                    started = time.perf_counter()
                    on.client.query(sql)  # the first request of this text: a result-cache miss
                    t.first = time.perf_counter() - started
                    started = time.perf_counter()
                    on.client.query(sql)  # the same text again: a result-cache hit
                    t.hit = time.perf_counter() - started
                rep += 1
            _say(
                f"{name}: {rep} reps, duckdb {_spread(t.duck)}, quiver caches off {_spread(t.off)} "
                f"(GetFlightInfo {_spread(t.info)}), paired ratio {paired_ratio(t.duck, t.off):.2f}x, "
                f"duckdb in a second process {_spread(t.other)} (A/A paired {paired_ratio(t.duck, t.other):.2f}x), "
                f"quiver first {t.first:.3f} s, load {t.load:.2f}"
            )
        warm_on, warm_off = _warm(before_on, on.counters()), _warm(before_off, off.counters())
    load_after = os.getloadavg()
    return _report(times, gb, file_gb, warm_on, warm_off, load_before, load_after)


def paired_ratio(duck: list[float], quiver: list[float]) -> float:
    """The median over repetitions of ``duck[i] / quiver[i]``: in-process DuckDB's and
    Quiver's seconds of the same repetition, run back to back (the order alternating), so that
    load which lasts the pair cancels (see the module docs)."""
    if len(duck) != len(quiver) or not duck:
        raise ValueError(f"paired samples need equal, non-zero counts (got {len(duck)} and {len(quiver)})")
    return statistics.median(d / q for d, q in zip(duck, quiver, strict=True))


def _spread(ts: list[float]) -> str:
    """A median with its spread: ``0.412 s [0.398-0.530]``."""
    return f"{statistics.median(ts):.3f} s [{min(ts):.3f}-{max(ts):.3f}]"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _report(
    times: dict[str, Timings],
    gb: float,
    file_gb: float,
    warm_on: str,
    warm_off: str,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    duck = {q: statistics.median(t.duck) for q, t in times.items()}
    off = {q: statistics.median(t.off) for q, t in times.items()}
    r_off = {q: duck[q] / off[q] for q in times}
    p_off = {q: paired_ratio(t.duck, t.off) for q, t in times.items()}
    p_aa = {q: paired_ratio(t.duck, t.other) for q, t in times.items()}
    p_other = {q: paired_ratio(t.other, t.off) for q, t in times.items()}
    # The default server's first request of a text is also that process's first read of the
    # data (DuckDB's buffer pool is cold): it is compared with in-process DuckDB's first run of
    # the query (before the other servers ran it), which is as cold.
    duck_first = {q: t.duck[0] for q, t in times.items()}
    r_first = {q: duck_first[q] / times[q].first for q in times}
    r_hit = {q: duck[q] / times[q].hit for q in times}
    reps = [len(t.duck) for t in times.values()]
    lines = [
        "## Analytic queries (issue #10, target 3)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m tests.bench analytic` (not in the "
        f"default run). Star schema generated with DuckDB `range()`/`hash()`: `star.sales` {STAR_ROWS:,} "
        "rows and five dimensions (dates 2,557, customers 1,000,000, products 200,000, stores 2,000, "
        f"promos 500 rows): {gb:.2f} GB as Arrow, a {file_gb:.2f} GB DuckDB file. {len(times)} queries, "
        "each joining the facts with 2 to 5 dimensions and aggregating, sent as `query` commands "
        "(GetFlightInfo, then DoGet). Ratio = in-process DuckDB seconds / Quiver seconds (above 1: "
        f"Quiver faster). Medians [min-max] of {min(reps)} to {max(reps)} repetitions per query (until "
        f"each contender had {SAMPLE_SECONDS:g} s of samples, at least {REPS}; which one goes first "
        "alternates) for in-process DuckDB (`read_only` connection on the same file; OS page cache "
        "and DuckDB's buffer pool warm after its first run) and for the caches-off server (`[cache] "
        "enabled = false`, `table_memory_bytes = 0`, a new text each request: every request a first "
        f"request for the data and of its text; {warm_off}); the default server's first request of "
        f"each text is one sample (a result-cache miss), its second a result-cache hit ({warm_on} in "
        "all). Machine load average (1/5/15 min) "
        f"{load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f} before, "
        f"{load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} after, on {os.cpu_count()} cores "
        "shared with other work (the 1-min load before each query is in its row): the figures are "
        "indicative. *Paired ratio*: the median over repetitions of in-process seconds / Quiver "
        "seconds of the same repetition (the two run back to back), which load lasting the pair does "
        "not move; the *ratio* column compares the two medians, which a few loaded samples of one "
        "contender move (tests/bench/PROFILE.md, section 10). *A/A*: the same in-process DuckDB "
        "reference run in a process of its own (tests/bench/plain_duckdb.py, `read_only` on its own copy "
        "of the file, its own time per query; in turn with the other two, who goes first rotating): the "
        "ratio of two fresh processes running the same DuckDB plans, nothing of Quiver in either — "
        "the spread a per-query comparison of two processes carries by itself (PROFILE.md, section 12).",
        "",
        "| query | rows | reps | load | in-process duckdb (caches: buffer pool warm) | Quiver, caches off, "
        "first requests (no cache) | of which GetFlightInfo | ratio | paired ratio | in-process duckdb, its first "
        "run (cold) | Quiver default, first request (result-cache miss) | ratio to duckdb's first run "
        "| Quiver default, repeated (result-cache hit: not a target) | duckdb in a second process (A/A) "
        "| A/A paired ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for q, t in times.items():
        lines.append(
            f"| {q} | {t.rows} | {len(t.duck)} | {t.load:.1f} | {_spread(t.duck)} | {_spread(t.off)} "
            f"({(off[q] - duck[q]) * 1e3:+.0f} ms) | {statistics.median(t.info) * 1e3:.0f} ms | "
            f"{r_off[q]:.2f}x | {p_off[q]:.2f}x | {duck_first[q]:.3f} s | {t.first:.3f} s | {r_first[q]:.2f}x | "
            f"{t.hit * 1e3:.1f} ms | {_spread(t.other)} | {p_aa[q]:.2f}x |"
        )
    worst_off = min(r_off, key=r_off.__getitem__)
    worst_paired = min(p_off, key=p_off.__getitem__)
    worst_first = min(r_first, key=r_first.__getitem__)
    g_off, g_first = _geomean(list(r_off.values())), _geomean(list(r_first.values()))
    g_paired = _geomean(list(p_off.values()))
    worst_aa = min(p_aa, key=p_aa.__getitem__)
    best_aa = max(p_aa, key=p_aa.__getitem__)
    worst_other = min(p_other, key=p_other.__getitem__)
    lines += [
        "",
        "| summary | figure | target | met |",
        "| --- | --- | --- | --- |",
        f"| geomean ratio, caches off (first requests) | {g_off:.3f}x | >= 0.97x | {'yes' if g_off >= 0.97 else 'no'} |",
        f"| worst query, caches off | {r_off[worst_off]:.2f}x ({worst_off}) | >= 0.90x | "
        f"{'yes' if r_off[worst_off] >= 0.9 else 'no'} |",
        f"| geomean paired ratio, caches off (median of per-repetition ratios) | {g_paired:.3f}x | >= 0.97x | "
        f"{'yes' if g_paired >= 0.97 else 'no'} |",
        f"| worst query, paired ratio, caches off | {p_off[worst_paired]:.2f}x ({worst_paired}) | >= 0.90x | "
        f"{'yes' if p_off[worst_paired] >= 0.9 else 'no'} |",
        f"| geomean ratio, default config, first request of each text vs duckdb's first run (1 sample "
        f"each) | {g_first:.3f}x | "
        f">= 0.97x | {'yes' if g_first >= 0.97 else 'no'} |",
        f"| worst query, default config, first request | {r_first[worst_first]:.2f}x ({worst_first}) | "
        f">= 0.90x | {'yes' if r_first[worst_first] >= 0.9 else 'no'} |",
        f"| geomean ratio, result-cache hits (not a target: a cache answered) | "
        f"{_geomean(list(r_hit.values())):.1f}x | - | - |",
        f"| median added time per query, caches off | "
        f"{statistics.median(off[q] - duck[q] for q in times) * 1e3:+.0f} ms | - | - |",
        f"| A/A: in-process duckdb / the same duckdb in a second process, geomean paired ratio "
        f"(nothing of Quiver in either) | {_geomean(list(p_aa.values())):.3f}x | report | - |",
        f"| A/A: worst query, paired ratio | {p_aa[worst_aa]:.2f}x ({worst_aa}); best "
        f"{p_aa[best_aa]:.2f}x ({best_aa}) | report | - |",
        f"| Quiver caches off against duckdb in a second process (both out of this process), geomean "
        f"paired ratio; worst query | {_geomean(list(p_other.values())):.3f}x; "
        f"{p_other[worst_other]:.2f}x ({worst_other}) | report | - |",
    ]
    text = "\n".join(lines)
    _say(text)
    return text
