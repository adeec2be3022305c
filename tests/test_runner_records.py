"""Every path that runs agent SQL through the query port (catalog/query_port.py) leaves one
query-log record and is charged to the swarm's budgets: MCP tools (run_query, sample_table,
profile_table, describe_table's sample, export_query), ``POST /v1/query`` and exports — each
once, never twice (proto_docs/governance.md)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pyarrow.flight as flight
import pytest

from tests.harness import QUIET, Server, call_options, start_server, wait_until
from tests.test_mcp import artefact_count, ok, refused, tool


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("runner-records"), tokens=QUIET)
    yield s
    s.stop()


def new_swarm(server: Server, prefix: str, budget: dict[str, Any] | None = None) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    admin = server.http()
    assert admin.post("/v1/swarms", json={"name": name, "tables": ["demo.*"]}).status_code == 201
    if budget is not None:
        assert admin.put(f"/v1/swarms/{name}/budget", json=budget).status_code == 200
    return name


def records(server: Server, swarm: str) -> list[dict[str, Any]]:
    r = server.http().get("/v1/queries", params={"swarm": swarm, "limit": 1000})
    assert r.status_code == 200, r.text
    return list(r.json()["queries"])


def usage(server: Server, swarm: str) -> dict[str, Any]:
    r = server.http().get(f"/v1/swarms/{swarm}/usage")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_mcp_run_query_is_charged_and_refused_past_the_budget(server: Server) -> None:
    swarm = new_swarm(server, "mcpb", {"queries_per_day": 3})
    token = server.mint("agent", swarm, "a")
    for i in range(3):
        assert ok(tool(server, "run_query", {"sql": f"SELECT {i} AS i"}, token))["rows_returned"] == 1
    before = records(server, swarm)
    spent = usage(server, swarm)
    ran = server.runtime.flight.streamer.executions if server.runtime.flight else None
    code, detail = refused(tool(server, "run_query", {"sql": "SELECT 42 AS i"}, token))
    assert code == "RESOURCE_EXHAUSTED" and "queries_per_day" in detail, detail
    # Refused before any work: nothing ran, nothing more charged; the refusal is recorded.
    assert server.runtime.flight is not None and server.runtime.flight.streamer.executions == ran
    assert usage(server, swarm)["usage"] == spent["usage"]
    after = records(server, swarm)
    assert len(after) == len(before) + 1
    assert after[0]["outcome"] == "refused" and after[0]["error_code"] == "RESOURCE_EXHAUSTED"
    assert all(r["via"] == "mcp" and r["kind"] == "query" for r in after), after


def test_one_record_per_mcp_call_with_what_it_sent(server: Server) -> None:
    swarm = new_swarm(server, "mcpr")
    token = server.mint("agent", swarm, "r")
    answer = ok(tool(server, "run_query", {"sql": "SELECT range AS i FROM range(?)", "params": [7]}, token))
    (r,) = records(server, swarm)
    assert r["via"] == "mcp" and r["kind"] == "query" and r["outcome"] == "ok"
    assert r["principal"] == f"agent:{swarm}/r" and r["params"] == 1
    assert r["sql"] == "SELECT range AS i FROM range(?)"
    assert r["rows"] == answer["rows_returned"] == 7 and r["bytes"] > 0
    ok(tool(server, "sample_table", {"table": "demo.orders", "rows": 3}, token))
    ok(tool(server, "profile_table", {"table": "demo.orders", "columns": ["amount"]}, token))
    ok(tool(server, "describe_table", {"table": "demo.orders"}, token))
    got = records(server, swarm)
    kinds = [x["kind"] for x in reversed(got)]
    # describe_table reads a sample (and the cached profile only: a profile read too).
    assert kinds[:3] == ["query", "sample", "profile"], got
    assert all(x["via"] == "mcp" and x["tables"] in ([], ["demo.orders"]) for x in got), got
    sample = next(x for x in reversed(got) if x["kind"] == "sample")
    assert sample["rows"] == 3 and sample["tables"] == ["demo.orders"]
    assert usage(server, swarm)["usage"]["queries"] == len(got)


def test_mcp_refusal_is_one_record_and_keeps_nothing(server: Server) -> None:
    swarm = new_swarm(server, "mcpx")
    token = server.mint("agent", swarm, "x")
    code, _ = refused(tool(server, "run_query", {"sql": "SELECT * FROM secret.spread"}, token))
    (r,) = records(server, swarm)
    assert r["via"] == "mcp" and r["outcome"] == "refused" and r["error_code"] == code
    assert usage(server, swarm)["usage"]["queries"] == 0


def test_one_http_query_is_one_record(server: Server) -> None:
    swarm = new_swarm(server, "http1")
    token = server.mint("agent", swarm, "h")
    http = server.http(token)
    r = http.post(
        "/v1/query", json={"sql": "SELECT range AS i FROM range(5)"}, headers={"accept": "text/csv"}
    )
    assert r.status_code == 200
    bad = http.post("/v1/query", json={"sql": "SELECT * FROM secret.spread"})
    assert bad.status_code == 403
    newest, oldest = records(server, swarm)
    assert oldest["via"] == "http" and oldest["rows"] == 5 and oldest["bytes"] == len(r.content)
    assert newest["via"] == "http" and newest["outcome"] == "refused"
    assert usage(server, swarm)["usage"]["queries"] == 1


def test_exports_are_counted_once(server: Server) -> None:
    swarm = new_swarm(server, "exp1")
    token = server.mint("agent", swarm, "e")
    body = json.dumps({"query": "SELECT range AS i FROM range(4)", "format": "csv"}).encode()
    out = list(server.flight().do_action(flight.Action("export", body), call_options(token)))
    info = json.loads(out[0].body.to_pybytes())
    (r,) = records(server, swarm)
    assert r["kind"] == "export" and r["via"] == "flight" and r["rows"] == info["rows"] == 4
    exported = ok(tool(server, "export_query", {"sql": "SELECT 1 AS one", "format": "csv"}, token))
    newest = records(server, swarm)
    assert len(newest) == 2, newest
    assert newest[0]["kind"] == "export" and newest[0]["via"] == "mcp" and newest[0]["rows"] == 1, exported
    assert usage(server, swarm)["usage"]["queries"] == 2


def test_concurrent_mcp_calls_get_one_record_each(server: Server) -> None:
    swarm = new_swarm(server, "mcpc")
    # One token per thread: [mcp] max_concurrent_calls bounds the calls at once per token.
    tokens = [server.mint("agent", swarm, f"c{i}") for i in range(6)]
    errors: list[BaseException] = []

    def hammer(token: str) -> None:
        try:
            for i in range(3):
                ok(tool(server, "run_query", {"sql": "SELECT ? AS i", "params": [i]}, token))
                r = server.http(token).post("/v1/query", json={"sql": "SELECT 1 AS one"})
                assert r.status_code == 200
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = records(server, swarm)
    assert len(got) == 6 * 6 and all(r["outcome"] == "ok" for r in got)
    assert sum(r["via"] == "mcp" for r in got) == sum(r["via"] == "http" for r in got) == 18
    for i in range(6):
        assert sum(r["agent"] == f"c{i}" for r in got) == 6
    assert usage(server, swarm)["usage"]["queries"] == 36


def test_every_mcp_tool_that_reads_is_refused_past_the_budget(server: Server) -> None:
    swarm = new_swarm(server, "mcpall", {"queries_per_day": 1})
    token = server.mint("agent", swarm, "all")
    ok(tool(server, "run_query", {"sql": "SELECT 1 AS one"}, token))
    artefacts = artefact_count(server, token)
    spent = usage(server, swarm)["usage"]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("run_query", {"sql": "SELECT 2 AS two"}),
        ("sample_table", {"table": "demo.orders", "rows": 2}),
        ("profile_table", {"table": "demo.orders"}),
        ("describe_table", {"table": "demo.orders"}),
        ("export_query", {"sql": "SELECT 3 AS three", "format": "csv"}),
    ]
    for name, args in calls:
        code, detail = refused(tool(server, name, args, token))
        assert code == "RESOURCE_EXHAUSTED" and "queries_per_day" in detail, (name, detail)
    # Nothing ran, nothing was charged, no artefact was kept; each refusal has its record.
    assert usage(server, swarm)["usage"] == spent
    assert artefact_count(server, token) == artefacts
    got = records(server, swarm)
    assert len(got) == 1 + len(calls), got
    refusals = list(reversed(got))[1:]
    assert [r["kind"] for r in refusals] == ["query", "sample", "profile", "sample", "export"]
    assert all(r["via"] == "mcp" and r["error_code"] == "RESOURCE_EXHAUSTED" for r in refusals)


def test_an_http_refresh_is_one_record(server: Server) -> None:
    swarm = new_swarm(server, "refr")
    token = server.mint("agent", swarm, "f")
    body = json.dumps({"query": "SELECT range AS i FROM range(3)", "format": "csv"}).encode()
    out = list(server.flight().do_action(flight.Action("export", body), call_options(token)))
    aid = json.loads(out[0].body.to_pybytes())["artefact"]["id"]
    r = server.http(token).post(f"/v1/artefacts/{aid}/refresh")
    assert r.status_code in (200, 201), r.text
    newest, oldest = records(server, swarm)
    assert oldest["via"] == "flight" and oldest["kind"] == "export"
    assert newest["via"] == "http" and newest["kind"] == "export" and newest["rows"] == 3
    assert newest["bytes"] == r.json()["artefact"]["size_bytes"]
    assert usage(server, swarm)["usage"]["queries"] == 2


def test_a_run_that_fails_is_one_record_with_its_code(server: Server) -> None:
    swarm = new_swarm(server, "fail")
    token = server.mint("agent", swarm, "z")
    code, _ = refused(
        tool(server, "run_query", {"sql": "SELECT CAST('x' || range AS BIGINT) AS v FROM range(3)"}, token)
    )
    (r,) = records(server, swarm)
    assert r["via"] == "mcp" and r["error_code"] == code and r["outcome"] != "ok"
    # Over HTTP, a failure after the first batches were sent: the status was 200, the body
    # is cut, and the one record says how the run ended.
    sql = (
        "SELECT CASE WHEN range < 2000000 THEN range ELSE CAST('x' || range AS BIGINT) END AS v "
        "FROM range(3000000)"
    )
    with (
        pytest.raises(httpx.RemoteProtocolError),
        server.http(token).stream(
            "POST", "/v1/query", json={"sql": sql}, headers={"accept": "application/vnd.apache.arrow.stream"}
        ) as resp,
    ):
        assert resp.status_code == 200
        for _ in resp.iter_raw():
            pass
    wait_until(lambda: len(records(server, swarm)) == 2, what="the failed HTTP run's record")
    newest = records(server, swarm)[0]
    assert newest["via"] == "http" and newest["error_code"] and newest["outcome"] != "ok", newest
    assert newest["rows"] and newest["rows"] > 0 and newest["bytes"] > 0


def test_a_client_that_leaves_mid_stream_is_one_cancelled_record(server: Server) -> None:
    swarm = new_swarm(server, "quit")
    token = server.mint("agent", swarm, "q")
    with server.http(token).stream(
        "POST",
        "/v1/query",
        json={"sql": "SELECT range AS v FROM range(3000000)"},
        headers={"accept": "application/vnd.apache.arrow.stream"},
    ) as resp:
        assert resp.status_code == 200
        assert next(resp.iter_raw())
    wait_until(lambda: len(records(server, swarm)) == 1, what="the abandoned run's record")
    (r,) = records(server, swarm)
    assert r["via"] == "http" and r["error_code"] == "CANCELLED" and r["outcome"] == "failed", r
