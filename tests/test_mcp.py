"""MCP at /mcp: the SDK's own clients (``streamable_http_client`` + ``ClientSession`` for the
handshake era, ``Client`` pinned to the stateless revision) against a real server; every
tool, the resources, the guard's escape corpus, authentication, limits and bad arguments."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client

from quiver_client import QuiverClient, QuiverClientError
from tests.harness import Server, start_server, wait_until
from tests.test_sqlguard import FUNCTION_ESCAPES, SETUP, STATEMENTS, TABLE_ESCAPES

T = TypeVar("T")

TOOLS = {
    "list_tables",
    "describe_table",
    "sample_table",
    "profile_table",
    "run_query",
    "export_query",
    "list_artefacts",
    "read_artefact",
}


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def session(server: Server, token: str | None, **headers: str) -> AsyncIterator[ClientSession]:
    """A handshake-era MCP session (``initialize``) over streamable HTTP."""
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        streamable_http_client(server.http_url + "/mcp", http_client=http) as streams,
        ClientSession(streams[0], streams[1]) as s,
    ):
        await s.initialize()
        yield s


async def call(server: Server, token: str | None, name: str, args: dict[str, Any]) -> types.CallToolResult:
    async with session(server, token) as s:
        return await s.call_tool(name, args)


def tool(server: Server, name: str, args: dict[str, Any], token: str | None = None) -> types.CallToolResult:
    return run(call(server, token or server.agent_token, name, args))


def ok(result: types.CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def refused(result: types.CallToolResult) -> tuple[str, str]:
    assert result.is_error, result.structured_content
    body = result.structured_content
    assert isinstance(body, dict)
    text = result.content[0]
    assert isinstance(text, types.TextContent) and text.text == f"{body['code']}: {body['detail']}"
    return body["code"], body["detail"]


def post(server: Server, body: Any, token: str | None, **headers: str) -> httpx.Response:
    h = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-11-25", **headers}
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    return httpx.post(server.http_url + "/mcp", json=body, headers=h, timeout=30)


def artefact_count(server: Server, token: str) -> int:
    with QuiverClient(server.flight_url, token) as c:
        return len(c.artefacts(page_size=1000)["items"])


# --- the protocol ---------------------------------------------------------------------------


def test_initialize_and_list_tools_with_schemas_and_examples(server: Server) -> None:
    async def go() -> tuple[str, list[types.Tool]]:
        async with session(server, server.agent_token) as s:
            tools = (await s.list_tools()).tools
            return "handshake", tools

    _, tools = run(go())
    assert {t.name for t in tools} == TOOLS
    for t in tools:
        assert t.input_schema["type"] == "object" and t.output_schema and t.output_schema["type"] == "object"
        assert t.description and "Example:" in t.description, t.name


def test_the_stateless_revision_is_served_too(server: Server) -> None:
    async def go() -> tuple[str, dict[str, Any]]:
        headers = {"authorization": f"Bearer {server.agent_token}"}
        async with (
            httpx2.AsyncClient(headers=headers) as http,
            Client(
                streamable_http_client(server.http_url + "/mcp", http_client=http), mode="2026-07-28"
            ) as c,
        ):
            result = await c.call_tool("run_query", {"sql": "SELECT 42 AS x", "format": "json"})
            return c.protocol_version, ok(result)

    version, body = run(go())
    assert version == "2026-07-28"
    assert body["data"] == '[{"x":42}]' and body["truncated"] is False and body["total_rows"] == 1


# --- the tools ----------------------------------------------------------------------------


def test_list_tables_lists_what_the_token_reads(server: Server) -> None:
    body = ok(tool(server, "list_tables", {}))
    names = [t["name"] for t in body["tables"]]
    with QuiverClient(server.flight_url, server.agent_token) as c:
        listed = {t.name: t.rows for t in c.tables()}
    assert names == sorted(listed)
    for t in body["tables"]:
        assert t["rows"] == listed[t["name"]] and t["column_count"] > 0 and t["changed_at"]


def test_describe_table_columns_and_five_sample_rows(server: Server) -> None:
    body = ok(tool(server, "describe_table", {"table": "DEMO.Orders"}))
    assert body["name"] == "demo.orders" and body["rows"] == 20_000
    assert [c["name"] for c in body["columns"]][:2] == ["order_id", "customer_id"]
    assert all({"type", "nullable", "description"} <= set(c) for c in body["columns"])
    assert body["sample_rows"] == 5 and body["sample"].count("\n") == 7  # header, rule, five rows


def test_describe_table_shows_cached_statistics_only(server: Server) -> None:
    before = ok(tool(server, "describe_table", {"table": "demo.events"}))
    assert all(c["profile"] is None for c in before["columns"])  # nothing cached: nothing computed
    ok(tool(server, "profile_table", {"table": "demo.events"}))
    after = ok(tool(server, "describe_table", {"table": "demo.events"}))
    first = after["columns"][0]
    assert first["profile"]["count"] == after["rows"] and first["profile"]["nulls"] == 0


def test_a_typo_names_the_closest_readable_tables(server: Server) -> None:
    code, detail = refused(tool(server, "describe_table", {"table": "demo.ordrs"}))
    assert code == "PERMISSION_DENIED"
    assert detail.split("you may read: ")[1].startswith("demo.orders")
    # The same ranking over Flight: the refusal of a scan of the same name.
    with QuiverClient(server.flight_url, server.agent_token) as c, pytest.raises(QuiverClientError) as e:
        c.sample("demo.ordrs", 5)
    assert e.value.code == "PERMISSION_DENIED" and e.value.detail == detail


def test_sample_table_head_random_and_percent(server: Server) -> None:
    head = ok(tool(server, "sample_table", {"table": "demo.orders", "rows": 3, "format": "json"}))
    assert head["rows_returned"] == 3 and head["truncated"] is False
    with QuiverClient(server.flight_url, server.agent_token) as c:
        expected = c.sample("demo.orders", 3).column("order_id").to_pylist()
    assert [r["order_id"] for r in __import__("json").loads(head["data"])] == expected
    args = {"table": "demo.orders", "rows": 4, "method": "random", "seed": 11, "columns": ["order_id"]}
    first, again = ok(tool(server, "sample_table", args)), ok(tool(server, "sample_table", args))
    assert first["data"] == again["data"] and [c["name"] for c in first["columns"]] == ["order_id"]
    pct = ok(
        tool(server, "sample_table", {"table": "demo.customers", "percent": 10, "seed": 3, "format": "csv"})
    )
    assert 0 < pct["rows_returned"] < 1000


def test_profile_table_is_the_data_planes_profile(server: Server) -> None:
    body = ok(tool(server, "profile_table", {"table": "demo.orders", "columns": ["amount", "status"]}))
    with QuiverClient(server.flight_url, server.agent_token) as c:
        flight_profile = c.profile("demo.orders", ["amount", "status"])
    assert [c["name"] for c in body["columns"]] == flight_profile.column("name").to_pylist()
    assert [c["count"] for c in body["columns"]] == flight_profile.column("count").to_pylist()


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json"])
def test_run_query_in_each_format(server: Server, fmt: str) -> None:
    sql = "SELECT status, count(*) AS n FROM demo.orders WHERE amount > ? GROUP BY status ORDER BY status"
    body = ok(tool(server, "run_query", {"sql": sql, "params": [100], "format": fmt}))
    with QuiverClient(server.flight_url, server.agent_token) as c:
        rows = c.query(sql, [100]).to_pylist()
    assert body["rows_returned"] == len(rows) == body["total_rows"] and body["truncated"] is False
    assert [c["name"] for c in body["columns"]] == ["status", "n"]
    for row in rows:
        assert str(row["n"]) in body["data"] and row["status"] in body["data"]
    if fmt == "json":
        assert __import__("json").loads(body["data"]) == rows


def test_run_query_says_when_max_rows_cut_it(server: Server) -> None:
    body = ok(
        tool(server, "run_query", {"sql": "SELECT order_id FROM demo.orders ORDER BY 1", "max_rows": 5})
    )
    assert body["rows_returned"] == 5 and body["truncated"] is True and body["truncated_by"] == "max_rows"
    assert body["total_rows"] is None
    exact = ok(tool(server, "run_query", {"sql": "SELECT * FROM range(5)", "max_rows": 5}))
    assert exact["truncated"] is False and exact["total_rows"] == 5  # exactly the cap is not a cut
    default = ok(tool(server, "run_query", {"sql": "SELECT order_id FROM demo.orders"}))
    assert default["rows_returned"] == 100 and default["max_rows"] == 100 and default["truncated"] is True


def test_export_query_then_list_and_read_the_artefact(server: Server) -> None:
    token = server.mint(agent="exporter")
    sql = "SELECT order_id, status FROM demo.orders WHERE order_id <= ? ORDER BY order_id"
    body = ok(tool(server, "export_query", {"sql": sql, "params": [30], "format": "csv"}, token))
    assert body["rows"] == 30 and body["truncated"] is False and body["format"] == "csv"
    assert body["flight_descriptor"] is None  # CSV carries no schema: downloaded, not read over Flight
    assert body["download_url"] == server.http_url + body["download"]
    # The bytes the control plane will serve at that path (catalog/exports.py content_path).
    _, stream = server.catalog.artefacts.open_content(server.catalog.tokens.verify(token), body["id"])
    with stream:
        text = stream.read().decode()
    assert len(text.encode()) == body["size_bytes"]
    listed = ok(tool(server, "list_artefacts", {"kind": "file"}, token))
    assert body["id"] in [a["id"] for a in listed["artefacts"]]
    read = ok(tool(server, "read_artefact", {"id": body["id"], "rows": 3}, token))
    assert read["artefact"]["id"] == body["id"] and read["truncated"] is True
    assert read["text"].splitlines() == text.splitlines()[:4]  # the header and three rows
    parquet = ok(tool(server, "export_query", {"sql": sql, "params": [3]}, token))
    head = ok(tool(server, "read_artefact", {"id": parquet["id"]}, token))
    assert [r["order_id"] for r in head["rows"]] == [1, 2, 3] and head["truncated"] is False
    # Another agent's artefact is not visible: NOT_FOUND, as over Flight and HTTP.
    code, _ = refused(tool(server, "read_artefact", {"id": body["id"]}, server.mint(swarm="other-swarm-x")))
    assert code == "NOT_FOUND"


@pytest.fixture(scope="module", autouse=True)
def other_swarm(server: Server) -> None:
    r = server.http().post("/v1/swarms", json={"name": "other-swarm-x"})
    assert r.status_code in (201, 409), r.text


def test_resources_are_the_readable_tables(server: Server) -> None:
    async def go() -> tuple[list[str], str]:
        async with session(server, server.agent_token) as s:
            listed = (await s.list_resources()).resources
            read = await s.read_resource("quiver://tables/demo.orders")
            content = read.contents[0]
            assert isinstance(content, types.TextResourceContents)
            return [str(r.uri) for r in listed], content.text

    uris, text = run(go())
    assert uris == [
        "quiver://tables/demo.customers",
        "quiver://tables/demo.events",
        "quiver://tables/demo.orders",
    ]
    assert text.startswith("# demo.orders") and "| order_id | int64 |" in text


def test_descriptions_reach_every_listing(server: Server) -> None:
    admin = server.http()
    before = admin.get("/v1/tables").json()
    body: dict[str, Any] = {
        "table": "One row per customer.",
        "columns": {"segment": "Marketing segment", "nope": "x"},
    }
    bad = admin.put("/v1/tables/demo.customers/description", json=body)
    assert bad.status_code == 400 and "no column 'nope'" in bad.json()["detail"]
    assert admin.get("/v1/tables").json() == before  # nothing half-applied
    agent = server.http(server.agent_token).put("/v1/tables/demo.customers/description", json={"table": "x"})
    assert agent.status_code == 403
    assert admin.put("/v1/tables/demo.nope/description", json={"table": "x"}).status_code == 404
    del body["columns"]["nope"]
    r = admin.put("/v1/tables/demo.customers/description", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"table": "demo.customers", "description": body["table"], "columns": body["columns"]}
    listed = {t["table"]: t for t in admin.get("/v1/tables").json()["tables"]}
    assert listed["demo.customers"]["description"] == body["table"]
    with QuiverClient(server.flight_url, server.agent_token) as c:
        meta = {t.name: t for t in c.tables()}["demo.customers"]
    assert meta.description == body["table"] and meta.columns == body["columns"]
    tables = {t["name"]: t for t in ok(tool(server, "list_tables", {}))["tables"]}
    assert tables["demo.customers"]["description"] == body["table"]
    described = ok(tool(server, "describe_table", {"table": "demo.customers"}))
    assert {c["name"]: c["description"] for c in described["columns"]}["segment"] == "Marketing segment"
    server.catalog.audit.flush()
    events = admin.get("/v1/audit", params={"action": "table.describe"}).json()["events"]
    assert {"ok", "not_found", "invalid_argument"} <= {e["outcome"] for e in events}


# --- the guard through run_query ---------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A server holding the guard tests' tables (tests/test_sqlguard.py), with an agent of
    a swarm allowed ``demo.*`` — the corpus' own set-up."""
    s = start_server(tmp_path_factory.mktemp("mcp-corpus"), demo=False, mcp={"calls_per_minute": 100_000})
    with s.catalog.db.transaction() as cur:
        cur.execute(SETUP)
    admin = s.http()
    assert admin.post("/v1/swarms", json={"name": "analysts"}).status_code == 201
    assert admin.put("/v1/swarms/analysts/allowlist", json={"tables": ["demo.*"]}).status_code == 200
    token = s.mint(swarm="analysts")
    yield s, token
    s.stop()


def _flight_answer(client: QuiverClient, sql: str) -> tuple[str, str] | None:
    try:
        client.query(sql)
    except QuiverClientError as e:
        return e.code, e.detail
    return None


CORPUS = (
    [sql for sql, _ in TABLE_ESCAPES]
    + [sql for sql, _, _ in FUNCTION_ESCAPES]
    + [sql for sql, _ in STATEMENTS]
)


def test_the_escape_corpus_is_refused_as_over_flight(corpus: tuple[Server, str]) -> None:
    server, token = corpus

    async def go() -> list[types.CallToolResult]:
        async with session(server, token) as s:
            return [await s.call_tool("run_query", {"sql": sql}) for sql in CORPUS]

    results = run(go())
    with QuiverClient(server.flight_url, token, on_truncation="ignore") as c:
        for sql, result in zip(CORPUS, results, strict=True):
            expected = _flight_answer(c, sql)
            if expected is None:
                assert not result.is_error, (sql, result.content)
            else:
                assert refused(result) == expected, sql
            assert "10000" not in str(result.structured_content)  # no salary ever leaks
    for (sql, _), result in zip(TABLE_ESCAPES, results, strict=False):
        assert refused(result)[0] == "PERMISSION_DENIED", sql


# --- authentication ---------------------------------------------------------------------------


def test_no_or_bad_token_is_401_with_www_authenticate(server: Server) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for token in (None, "not-a-jwt"):
        r = post(server, init, token)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"] == "UNAUTHENTICATED"
    r = httpx.post(server.http_url + "/mcp", headers={"authorization": "Basic abc"}, content=b"{}")
    assert r.status_code == 401


def test_admin_tokens_are_refused_for_tools(server: Server) -> None:
    r = post(server, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, server.admin_token)
    assert r.status_code == 403 and "agent or swarm token" in r.json()["detail"]


def test_a_token_revoked_mid_session_is_refused_on_the_next_call(server: Server) -> None:
    admin = server.http()
    minted = admin.post("/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "revokee"}).json()

    async def go() -> BaseException | None:
        async with session(server, minted["token"]) as s:
            ok(await s.call_tool("run_query", {"sql": "SELECT 1 AS x"}))
            assert admin.delete(f"/v1/tokens/{minted['jti']}").status_code in (200, 204)
            try:
                await s.call_tool("run_query", {"sql": "SELECT 1 AS x"})
            except Exception as e:
                return e
        return None

    error = run(go())
    assert error is not None  # the SDK client raises: the next POST was answered 401
    r = post(server, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, minted["token"])
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_a_host_not_allowed_is_421(server: Server) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    wrong_host = post(server, body, server.agent_token, host="evil.example:80")
    assert wrong_host.status_code == 421 and "[mcp] allowed_hosts" in wrong_host.json()["detail"]
    wrong_origin = post(server, body, server.agent_token, origin="http://evil.example")
    assert wrong_origin.status_code == 403 and wrong_origin.json()["error"] == "PERMISSION_DENIED"
    assert post(server, body, None, host="evil.example").status_code == 421  # before the token
    assert (
        post(
            server, body, server.agent_token, host=f"localhost:{server.http_url.rsplit(':', 1)[1]}"
        ).status_code
        == 200
    )


# --- bad arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "fragment"),
    [
        ("run_query", {"sql": 42}, "'sql'"),
        ("run_query", {}, "'sql' is a required property"),
        ("run_query", {"sql": "SELECT 1", "max_rows": "10"}, "'max_rows'"),
        ("run_query", {"sql": "SELECT 1", "max_rows": 0}, "'max_rows'"),
        ("run_query", {"sql": "SELECT 1", "max_rows": 10**9}, "'max_rows'"),
        ("run_query", {"sql": "SELECT 1", "format": "xml"}, "'format'"),
        ("run_query", {"sql": "SELECT 1", "sqll": "x"}, "unknown argument 'sqll'"),
        ("run_query", {"sql": "x" * 200_000}, "longer than 100,000 characters"),
        ("describe_table", {"table": "t" * 100_000}, "longer than 300 characters"),
        ("sample_table", {"table": "demo.orders", "rows": 5, "percent": 5}, "not both"),
        ("export_query", {"sql": "SELECT 1", "format": "xlsx"}, "'format'"),
        ("no_such_tool", {}, "unknown tool 'no_such_tool'"),
        ("n" * 10_000, {}, "unknown tool"),
    ],
)
def test_bad_arguments_are_clean_tool_errors(
    server: Server, name: str, args: dict[str, Any], fragment: str
) -> None:
    before = artefact_count(server, server.agent_token)
    code, detail = refused(tool(server, name, args))
    assert code == "INVALID_ARGUMENT" and fragment in detail and len(detail) < 1000, detail
    assert artefact_count(server, server.agent_token) == before


def test_sql_refusals_keep_nothing(server: Server) -> None:
    before = artefact_count(server, server.agent_token)
    for sql in ("SELECT * FROM secret.nope", "DROP TABLE demo.orders", "SELEC 1"):
        code, _ = refused(tool(server, "export_query", {"sql": sql}))
        assert code in ("PERMISSION_DENIED", "INVALID_ARGUMENT")
    assert artefact_count(server, server.agent_token) == before
    assert (
        ok(tool(server, "run_query", {"sql": "SELECT count(*) AS n FROM demo.orders"}))["data"].count("20000")
        == 1
    )


def test_other_methods_and_paths_are_answered_at_once(server: Server) -> None:
    headers = {"authorization": f"Bearer {server.agent_token}", "accept": "text/event-stream"}
    for method in ("GET", "DELETE", "PUT", "PATCH"):
        # GET used to open an event stream that stayed open for as long as the client liked.
        r = httpx.request(method, server.http_url + "/mcp", headers=headers, timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "POST", method
    r = post(server, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, server.agent_token)
    assert r.status_code == 200
    sub = httpx.post(server.http_url + "/mcp/tools", json={}, headers=headers, timeout=10)
    assert sub.status_code == 404


def test_protocol_garbage_is_never_a_500(server: Server) -> None:
    token = server.agent_token
    bodies: list[object] = [
        [],
        {"jsonrpc": "2.0"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": "x"},
    ]
    for body in bodies:
        r = post(server, body, token)
        assert r.status_code < 500, (body, r.status_code, r.text)
    r = httpx.post(
        server.http_url + "/mcp",
        content=b"{" * 100_000,
        headers={
            "authorization": f"Bearer {token}",
            "content-type": "application/json",
            "accept": "application/json",
        },
    )
    assert r.status_code < 500
    huge = httpx.post(
        server.http_url + "/mcp",
        content=b"x" * (5 << 20),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    assert huge.status_code == 413


# --- limits -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("mcp-tight"),
        mcp={
            "max_response_bytes": 2048,
            "calls_per_minute": 6,
            "max_concurrent_calls": 1,
            "max_rows": 50,
            "allowed_hosts": ["quiver.example.com", "127.0.0.1:*"],
        },
    )
    yield s
    s.stop()


def test_a_query_over_the_byte_budget_is_cut_and_flagged(tight: Server) -> None:
    token = tight.mint(agent="bytes")
    body = ok(
        tool(
            tight, "run_query", {"sql": "SELECT * FROM demo.orders ORDER BY order_id", "max_rows": 50}, token
        )
    )
    assert body["truncated"] is True and body["truncated_by"] == "max_response_bytes"
    assert 0 < body["rows_returned"] < 50 and len(body["data"].encode()) <= 2048
    capped = refused(tool(tight, "run_query", {"sql": "SELECT 1", "max_rows": 51}, token))
    assert capped[0] == "INVALID_ARGUMENT" and "50" in capped[1]


def test_calls_per_minute_name_the_limit_and_when_to_retry(tight: Server) -> None:
    token = tight.mint(agent="rate")

    async def go() -> list[types.CallToolResult]:
        async with session(tight, token) as s:
            return [await s.call_tool("run_query", {"sql": "SELECT 1 AS x"}) for _ in range(8)]

    results = run(go())
    assert all(not r.is_error for r in results[:6])
    code, detail = refused(results[6])
    assert code == "RESOURCE_EXHAUSTED" and "[mcp] calls_per_minute" in detail and "retry in" in detail
    # Another principal has its own budget.
    assert not tool(tight, "run_query", {"sql": "SELECT 1 AS x"}, tight.mint(agent="rate-2")).is_error


def test_concurrent_calls_of_one_principal_are_bounded(tight: Server) -> None:
    token = tight.mint(agent="racer")
    slow = "SELECT count(*) FROM range(400000000) a(i) WHERE i % 7 = 3"  # seconds, not minutes
    answers: list[types.CallToolResult] = []
    lock = threading.Lock()

    def racer() -> None:
        r = tool(tight, "run_query", {"sql": slow}, token)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=racer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(answers) == 4
    errors = [refused(r) for r in answers if r.is_error]
    assert sum(1 for r in answers if not r.is_error) >= 1
    assert errors and all(
        code == "RESOURCE_EXHAUSTED" and "[mcp] max_concurrent_calls" in d for code, d in errors
    )


def test_allowed_hosts_replace_the_defaults(tight: Server) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    token = tight.mint(agent="hosts")
    assert post(tight, body, token, host="quiver.example.com").status_code == 200
    port = tight.http_url.rsplit(":", 1)[1]
    assert post(tight, body, token, host=f"localhost:{port}").status_code == 421  # not listed here
    assert post(tight, body, token, host="quiver.example.com:8443").status_code == 421  # no ":*"


def test_concurrent_description_writes_serialize(server: Server) -> None:
    admin_token = server.admin_token
    statuses: list[int] = []
    lock = threading.Lock()

    def writer(i: int) -> None:
        with httpx.Client(base_url=server.http_url, headers={"authorization": f"Bearer {admin_token}"}) as c:
            r = c.put(
                "/v1/tables/demo.events/description",
                json={"table": f"writer {i}", "columns": {"event_id": f"writer {i}"}},
            )
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 8
    final = {t["table"]: t for t in server.http().get("/v1/tables").json()["tables"]}["demo.events"]
    # One writer's table text and the same writer's column text: never a mix of two writes.
    assert final["description"].startswith("writer ") and final["columns"]["event_id"] == final["description"]


def test_descriptions_survive_a_restart(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data")
    try:
        r = s.http().put(
            "/v1/tables/demo.orders/description", json={"columns": {"status": "Lifecycle state"}}
        )
        assert r.status_code == 200
    finally:
        s.stop()
    again = start_server(tmp_path / "data", demo=False)
    try:
        described = ok(tool(again, "describe_table", {"table": "demo.orders"}, again.mint()))
        assert {c["name"]: c["description"] for c in described["columns"]}["status"] == "Lifecycle state"
    finally:
        again.stop()


def test_every_tool_call_is_logged_without_the_token(server: Server) -> None:
    from structlog.testing import capture_logs

    token = server.mint(agent="logged")
    sql = "SELECT order_id FROM demo.orders WHERE order_id < ?"
    with capture_logs() as logs:
        ok(tool(server, "run_query", {"sql": sql, "params": [4]}, token))
        refused(tool(server, "run_query", {"sql": "SELECT * FROM secret.x"}, token))
    calls = [e for e in logs if e["event"] == "mcp.call"]
    assert [c["outcome"] for c in calls] == ["ok", "permission_denied"]
    first = calls[0]
    assert first["principal"].endswith("logged") and first["tool"] == "run_query"
    assert first["rows"] == 3 and first["bytes"] > 0 and first["ms"] >= 0
    assert len(first["sql"]) == 12 and first["sql"] != calls[1]["sql"]
    assert token not in repr(logs) and sql not in repr(logs)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The data plane's own limits: one query per principal, a one-second timeout."""
    s = start_server(
        tmp_path_factory.mktemp("mcp-strict"),
        limits={"max_concurrent_queries": 1, "query_timeout_seconds": 2},
    )
    yield s
    s.stop()


def test_run_query_is_under_the_data_planes_timeout(strict: Server) -> None:
    slow = "SELECT count(*) FROM range(100000000000) a(i) WHERE i % 7 = 3"
    code, detail = refused(tool(strict, "run_query", {"sql": slow}))
    with QuiverClient(strict.flight_url, strict.agent_token) as c, pytest.raises(QuiverClientError) as e:
        c.query(slow)
    assert code == e.value.code == "DEADLINE_EXCEEDED" and "query_timeout_seconds" in detail


def test_mcp_shares_the_data_planes_admission_with_flight(strict: Server) -> None:
    """A run_query holds the principal's one admission slot: Flight is refused meanwhile."""
    assert strict.runtime.flight is not None
    admission = strict.runtime.flight.admission
    slow = "SELECT count(*) FROM range(100000000000) a(i) WHERE i % 7 = 3"
    answers: list[types.CallToolResult] = []
    racer = threading.Thread(target=lambda: answers.append(tool(strict, "run_query", {"sql": slow})))
    racer.start()
    try:
        wait_until(lambda: any(admission.active().values()), what="the MCP query to hold its slot")
        with QuiverClient(strict.flight_url, strict.agent_token) as c, pytest.raises(QuiverClientError) as e:
            c.query("SELECT 1 AS x")
        assert e.value.code == "RESOURCE_EXHAUSTED" and "max_concurrent_queries" in e.value.detail
    finally:
        racer.join(60)
    assert refused(answers[0])[0] == "DEADLINE_EXCEEDED"
    wait_until(lambda: not any(admission.active().values()), what="the slot given back")
    assert not tool(strict, "run_query", {"sql": "SELECT 1 AS x"}).is_error
