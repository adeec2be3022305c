"""Cut results say so (issue #8, defect 10): a result cut at a row cap is flagged in the
FlightInfo, on the stream's last batch, in async query status, on every replay from the result
cache, and by QuiverClient — and a result of exactly the cap is never flagged.

A real server whose ``[limits] max_rows`` is 100,000 (so no test needs millions of rows) and
whose ``max_sample_rows`` is 1,000; real pyarrow.flight clients and QuiverClient.
Wire contract: proto_docs/descriptors.md, "Cut results".
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from quiver_client import QuiverClient, TruncatedResultError, TruncatedResultWarning
from tests.harness import Server, call_options, start_server, wait_until

CAP = 100_000
SAMPLE_CAP = 1_000
NARROW = "SELECT range AS i FROM range({n})"  # 64k-row batches of 0.5 MiB: the cap is cut in the head
# 64k-row batches of ~5 MiB: the handler's head is one batch, the cap is cut while streaming.
WIDE = "SELECT range AS i, repeat('x', 60) AS s FROM range({n})"
VOLATILE = "SELECT range AS i, random() AS r FROM range({n})"  # never cached


def cmd(**body: Any) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("truncation"),
        limits={"max_rows": CAP, "max_sample_rows": SAMPLE_CAP},
    )
    yield s
    s.stop()


@pytest.fixture
def opts(server: Server) -> flight.FlightCallOptions:
    assert server.demo_token is not None
    return call_options(server.demo_token)


def info_cap(info: flight.FlightInfo) -> dict[str, Any] | None:
    return json.loads(info.app_metadata) if info.app_metadata else None


def read(
    client: flight.FlightClient, info: flight.FlightInfo, opts: flight.FlightCallOptions
) -> tuple[pa.Table, list[dict[str, Any] | None]]:
    """Every batch of the (single) endpoint, and the app_metadata of each batch."""
    reader = client.do_get(info.endpoints[0].ticket, opts)
    batches, metas = [], []
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        batches.append(chunk.data)
        metas.append(json.loads(chunk.app_metadata.to_pybytes()) if chunk.app_metadata else None)
    return pa.Table.from_batches(batches, schema=reader.schema), metas


def run(
    server: Server, opts: flight.FlightCallOptions, **body: Any
) -> tuple[dict[str, Any] | None, pa.Table, list[dict[str, Any] | None]]:
    client = server.flight()
    info = client.get_flight_info(cmd(**body), opts)
    table, metas = read(client, info, opts)
    return info_cap(info), table, metas


def cut(max_rows: int, reason: str) -> dict[str, Any]:
    return {"truncated": True, "max_rows": max_rows, "reason": reason}


def cache_hits(server: Server) -> int:
    assert server.runtime.flight is not None
    return int(server.runtime.flight.cache.stats().hits)


# --- the server's cap ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [NARROW, WIDE, VOLATILE], ids=["head", "streamed", "volatile"])
def test_a_result_cut_at_the_server_cap_says_so(server: Server, opts: Any, shape: str) -> None:
    """12M rows answered as 10M without a word was the defect: now the FlightInfo names the cap
    and the last batch says the result was cut — whether the cut falls in the head the handler
    reads, while streaming, or on the uncached (volatile) path."""
    sql = shape.format(n=3 * CAP)
    planned, table, metas = run(server, opts, kind="query", sql=sql)
    assert planned == {"max_rows": CAP, "reason": "server_max_rows", "truncated": None}
    assert table.num_rows == CAP
    assert table.column("i").to_pylist() == list(range(CAP))
    assert metas[-1] == cut(CAP, "server_max_rows")
    assert all(m is None for m in metas[:-1])


@pytest.mark.parametrize("shape", [NARROW, WIDE, VOLATILE], ids=["head", "streamed", "volatile"])
@pytest.mark.parametrize("n", [CAP, CAP - 1, 1, 0])
def test_a_result_of_exactly_the_cap_is_not_flagged(server: Server, opts: Any, shape: str, n: int) -> None:
    """No false positive: the server reads one row more than the cap to know."""
    planned, table, metas = run(server, opts, kind="query", sql=shape.format(n=n))
    assert planned == {"max_rows": CAP, "reason": "server_max_rows", "truncated": None}
    assert table.num_rows == n
    assert all(m is None for m in metas)


# --- the agent's own max_rows ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sql", "max_rows", "rows", "flagged"),
    [
        ("SELECT * FROM range(10) ORDER BY range DESC", 4, 4, True),
        ("SELECT * FROM range(4) ORDER BY range DESC", 4, 4, False),
        ("SELECT * FROM range(3)", 4, 3, False),
        # The cap falls exactly between two 64k-row batches: the row past it comes alone.
        (NARROW.format(n=CAP), 65_536, 65_536, True),
        (NARROW.format(n=65_536), 65_536, 65_536, False),
        (WIDE.format(n=CAP), 65_536, 65_536, True),
        (WIDE.format(n=65_536), 65_536, 65_536, False),
        (WIDE.format(n=3 * CAP), 70_000, 70_000, True),
        (VOLATILE.format(n=10), 9, 9, True),
        (VOLATILE.format(n=9), 9, 9, False),
    ],
)
def test_the_agents_own_max_rows_cut_is_flagged_the_same_way(
    server: Server, opts: Any, sql: str, max_rows: int, rows: int, flagged: bool
) -> None:
    """The agent asked for at most max_rows; it is still told whether more rows existed."""
    planned, table, metas = run(server, opts, kind="query", sql=sql, max_rows=max_rows)
    assert planned == {"max_rows": max_rows, "reason": "max_rows", "truncated": None}
    assert table.num_rows == rows
    if flagged:
        assert metas[-1] == cut(max_rows, "max_rows")
        assert all(m is None for m in metas[:-1])
    else:
        assert all(m is None for m in metas)


def test_the_rows_are_those_of_the_query(server: Server, opts: Any) -> None:
    """Reading one row more than the cap changes nothing in what is sent: the first rows in
    the query's order, exactly max_rows of them."""
    _, table, _ = run(
        server, opts, kind="query", sql="SELECT * FROM range(1000) ORDER BY range DESC", max_rows=3
    )
    assert table.column("range").to_pylist() == [999, 998, 997]


# --- replays from the result cache ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sql", "max_rows", "flagged", "tier"),
    [
        ("SELECT range + 0 AS i FROM range(150000)", None, True, "memory"),
        ("SELECT range AS i, repeat('y', 60) AS s FROM range(300000)", None, True, "disk"),
        ("SELECT range AS i, repeat('e', 60) AS s FROM range(100000)", None, False, "disk"),
        ("SELECT range + 1 AS i FROM range(100000)", None, False, "memory"),
        ("SELECT range AS i, 'own' AS tier FROM range(20)", 7, True, "memory"),
        ("SELECT range AS i, 'own-exact' AS tier FROM range(7)", 7, False, "memory"),
    ],
)
def test_a_cached_cut_result_is_flagged_on_every_replay(
    server: Server, opts: Any, sql: str, max_rows: int | None, flagged: bool, tier: str
) -> None:
    """The result cache stores a cut result with its flag — in memory or in a file — and
    replays it: a hit is flagged exactly as the first answer was (and an uncut one is not)."""
    assert server.runtime.flight is not None
    cache = server.runtime.flight.cache
    body: dict[str, Any] = {"kind": "query", "sql": sql}
    if max_rows is not None:
        body["max_rows"] = max_rows
    cap, reason = (max_rows, "max_rows") if max_rows is not None else (CAP, "server_max_rows")
    stored = getattr(cache.stats(), f"{tier}_entries")
    answers = [run(server, opts, **body)]
    assert getattr(cache.stats(), f"{tier}_entries") == stored + 1  # the first answer filled that tier
    for _ in range(2):
        hits = cache_hits(server)
        answers.append(run(server, opts, **body))
        assert cache_hits(server) == hits + 1  # this answer came from the cache
    first = answers[0][1]
    for planned, table, metas in answers:
        assert planned == {"max_rows": cap, "reason": reason, "truncated": None}
        assert table.equals(first)
        assert metas[-1] == (cut(cap, reason) if flagged else None)
        assert all(m is None for m in metas[:-1])


def test_concurrent_readers_of_a_cut_query_are_all_told(server: Server) -> None:
    """Eight agents asking the same cut query at once (the cache filled by one of them, read
    by the others): every answer is CAP rows and flagged."""
    sql = "SELECT range AS i, repeat('z', 60) AS s, 'race' AS tag FROM range(250000)"
    results: list[Any] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    tokens = [server.mint("agent", "demo", f"racer-{i}") for i in range(8)]

    def agent(token: str) -> None:
        try:
            start.wait()
            for _ in range(3):
                results.append(run(server, call_options(token), kind="query", sql=sql))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 24
    for _, table, metas in results:
        assert table.num_rows == CAP and metas[-1] == cut(CAP, "server_max_rows")


# --- samples and scans -------------------------------------------------------------------------------
def test_a_percent_sample_cut_at_max_sample_rows_is_flagged(server: Server, opts: Any) -> None:
    """A 2% sample of demo.events expects 1,000 rows (the cap here); an unlucky draw has more
    and is cut at the cap: said so."""
    outcomes = set()
    for seed in range(40):
        planned, table, metas = run(server, opts, kind="sample", table="demo.events", percent=2, seed=seed)
        assert planned == {"max_rows": SAMPLE_CAP, "reason": "max_sample_rows", "truncated": None}
        assert table.num_rows <= SAMPLE_CAP
        if metas and metas[-1] is not None:
            assert metas[-1] == cut(SAMPLE_CAP, "max_sample_rows") and table.num_rows == SAMPLE_CAP
            outcomes.add("cut")
        else:
            assert all(m is None for m in metas)
            outcomes.add("whole")
    assert outcomes == {"cut", "whole"}


def test_uncapped_reads_carry_no_row_cap(server: Server, opts: Any) -> None:
    """Scans, first-N samples and profiles have no row cap: no app_metadata anywhere."""
    client = server.flight()
    for descriptor in (
        flight.FlightDescriptor.for_path("demo", "events"),
        cmd(kind="sample", table="demo.events", rows=10),
        cmd(kind="profile", table="demo.orders"),
    ):
        info = client.get_flight_info(descriptor, opts)
        assert info.app_metadata == b""
        _, metas = read(client, info, opts)
        assert all(m is None for m in metas)


# --- async queries --------------------------------------------------------------------------------
def _action(client: flight.FlightClient, opts: Any, name: str, body: dict[str, Any]) -> dict[str, Any]:
    result = next(client.do_action(flight.Action(name, json.dumps(body).encode()), opts))
    return json.loads(result.body.to_pybytes())


def _wait(client: flight.FlightClient, opts: Any, query_id: str) -> dict[str, Any]:
    return wait_until(
        lambda: (
            (s := _action(client, opts, "query-status", {"id": query_id}))["state"]
            not in ("queued", "running")
            and s
        ),
        30,
        what=f"query {query_id} to finish",
    )


@pytest.mark.parametrize(
    ("sql", "max_rows", "rows", "truncated"),
    [
        (NARROW.format(n=3 * CAP), None, CAP, True),
        (NARROW.format(n=CAP), None, CAP, False),
        ("SELECT * FROM range(6)", 5, 5, True),
        ("SELECT * FROM range(5)", 5, 5, False),
    ],
)
def test_async_query_status_and_result_report_a_cut(
    server: Server, opts: Any, sql: str, max_rows: int | None, rows: int, truncated: bool
) -> None:
    client = server.flight()
    body: dict[str, Any] = {"sql": sql}
    if max_rows is not None:
        body["max_rows"] = max_rows
    cap, reason = (max_rows, "max_rows") if max_rows is not None else (CAP, "server_max_rows")
    submitted = _action(client, opts, "submit-query", body)
    assert submitted["truncated"] is False and submitted["max_rows"] == cap
    status = _wait(client, opts, submitted["id"])
    assert status["state"] == "succeeded" and status["rows"] == rows
    assert (status["truncated"], status["max_rows"], status["max_rows_reason"]) == (truncated, cap, reason)
    info = client.get_flight_info(cmd(kind="result", id=submitted["id"]), opts)
    assert info_cap(info) == {"max_rows": cap, "reason": reason, "truncated": truncated}
    assert info.total_records == rows
    table, metas = read(client, info, opts)
    assert table.num_rows == rows
    assert metas[-1] == (cut(cap, reason) if truncated else None)
    assert all(m is None for m in metas[:-1])


# --- QuiverClient --------------------------------------------------------------------------------------
def test_client_warns_of_a_cut_result(server: Server) -> None:
    assert server.demo_token is not None
    with QuiverClient(server.flight_url, server.demo_token) as qc:
        with pytest.warns(TruncatedResultWarning) as caught:
            table = qc.query(NARROW.format(n=3 * CAP))
        assert table.num_rows == CAP
        assert len(caught) == 1
        warning = caught[0].message
        assert isinstance(warning, TruncatedResultWarning)
        assert (warning.max_rows, warning.reason) == (CAP, "server_max_rows")
        assert "100,000" in str(warning) and "max_rows" in str(warning)
        with pytest.warns(TruncatedResultWarning) as caught:
            assert qc.query("SELECT * FROM range(10)", max_rows=4).num_rows == 4
        assert caught[0].message.reason == "max_rows"  # type: ignore[union-attr]
        with pytest.warns(TruncatedResultWarning), qc.query_stream(WIDE.format(n=3 * CAP)) as reader:
            assert sum(b.num_rows for b in reader) == CAP
        query_id = qc.submit(NARROW.format(n=CAP + 1))
        with pytest.warns(TruncatedResultWarning) as caught:
            assert qc.result(query_id).num_rows == CAP
        assert len(caught) == 1
        with pytest.warns(TruncatedResultWarning) as caught, qc.result_stream(query_id) as reader:
            assert sum(b.num_rows for b in reader) == CAP
        assert len(caught) == 1  # once per result


def test_client_is_silent_for_whole_results(server: Server) -> None:
    assert server.demo_token is not None
    with QuiverClient(server.flight_url, server.demo_token) as qc, warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert qc.query(NARROW.format(n=CAP)).num_rows == CAP
        assert qc.query("SELECT * FROM range(4)", max_rows=4).num_rows == 4
        with qc.query_stream(WIDE.format(n=CAP)) as reader:
            assert sum(b.num_rows for b in reader) == CAP
        assert qc.read("demo.orders").num_rows == 20_000
        assert qc.result(qc.submit(NARROW.format(n=CAP))).num_rows == CAP


def test_client_raises_when_asked(server: Server) -> None:
    assert server.demo_token is not None
    with QuiverClient(server.flight_url, server.demo_token, on_truncation="raise") as qc:
        with pytest.raises(TruncatedResultError) as raised:
            qc.query(NARROW.format(n=CAP + 1))
        err = raised.value
        assert (err.code, err.max_rows, err.reason, err.retryable) == (
            "TRUNCATED",
            CAP,
            "server_max_rows",
            False,
        )
        assert err.result is not None and err.result.num_rows == CAP  # the rows received
        seen = 0
        with pytest.raises(TruncatedResultError) as raised, qc.query_stream(WIDE.format(n=3 * CAP)) as reader:
            for batch in reader:
                seen += batch.num_rows
        assert seen == CAP  # every row arrived before the stream raised
        assert raised.value.result is None
        cut_id = qc.submit("SELECT * FROM range(3)", max_rows=2)
        with pytest.raises(TruncatedResultError) as raised:
            qc.result(cut_id)
        assert raised.value.result is not None and raised.value.result.num_rows == 2
        seen = 0
        with pytest.raises(TruncatedResultError), qc.result_stream(cut_id) as reader:
            for batch in reader:
                seen += batch.num_rows
        assert seen == 2  # the rows first, then the error
        # Whole results pass.
        assert qc.query("SELECT * FROM range(3)", max_rows=3).num_rows == 3


def test_client_ignores_when_told(server: Server) -> None:
    assert server.demo_token is not None
    with (
        QuiverClient(server.flight_url, server.demo_token, on_truncation="ignore") as qc,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        assert qc.query(NARROW.format(n=CAP + 1)).num_rows == CAP


def test_client_refuses_an_unknown_on_truncation(server: Server) -> None:
    assert server.demo_token is not None
    with pytest.raises(ValueError, match="on_truncation"):
        QuiverClient(server.flight_url, server.demo_token, on_truncation="shout")  # type: ignore[arg-type]
