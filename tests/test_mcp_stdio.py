"""``quiver mcp`` as a real subprocess (the SDK's stdio client) proxying to a live server over
Flight: the same tools give the same answers as ``/mcp``, refusals included."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.harness import Server, start_server
from tests.test_mcp import TOOLS, call

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

SAME: list[tuple[str, dict[str, Any]]] = [
    ("list_tables", {}),
    ("describe_table", {"table": "demo.orders"}),
    ("describe_table", {"table": "demo.ordrs"}),
    ("sample_table", {"table": "demo.orders", "rows": 4, "method": "random", "seed": 5, "format": "csv"}),
    ("sample_table", {"table": "demo.customers", "percent": 5, "seed": 2}),
    ("profile_table", {"table": "demo.orders", "columns": ["amount"]}),
    (
        "run_query",
        {"sql": "SELECT status, count(*) AS n FROM demo.orders GROUP BY 1 ORDER BY 1", "format": "json"},
    ),
    ("run_query", {"sql": "SELECT order_id FROM demo.orders ORDER BY 1", "max_rows": 7}),
    ("run_query", {"sql": "SELECT * FROM secret.salaries"}),
    ("run_query", {"sql": "DELETE FROM demo.orders"}),
    ("run_query", {"sql": 7}),
    ("nope", {}),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("mcp-stdio")
    s = start_server(root / "data")
    token_file = root / "agent.token"
    token_file.write_text(s.agent_token + "\n")
    yield s, token_file
    s.stop()


def _params(server: Server, token_file: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "quiver", "mcp", "--url", server.flight_url, "--token-file", str(token_file)],
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")},
        cwd=str(token_file.parent),
    )


def test_the_stdio_proxy_answers_as_the_http_endpoint(live: tuple[Server, Path]) -> None:
    server, token_file = live

    async def go() -> tuple[set[str], list[Any], dict[str, Any], dict[str, Any]]:
        async with (
            stdio_client(_params(server, token_file)) as (read, write),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            names = {t.name for t in (await s.list_tools()).tools}
            answers = []
            for name, args in SAME:
                r = await s.call_tool(name, args)
                answers.append((r.is_error, r.structured_content))
            exported = await s.call_tool(
                "export_query", {"sql": "SELECT * FROM demo.orders WHERE order_id <= 3"}
            )
            assert not exported.is_error, exported.content
            body = exported.structured_content
            assert isinstance(body, dict)
            read_back = await s.call_tool("read_artefact", {"id": body["id"], "rows": 5})
            assert isinstance(read_back.structured_content, dict)
            resource = await s.read_resource("quiver://tables/demo.orders")
            return names, answers, body, {"read": read_back.structured_content, "resource": resource}

    names, answers, exported, extra = asyncio.run(go())
    assert names == TOOLS
    for (name, args), (is_error, structured) in zip(SAME, answers, strict=True):
        over_http = asyncio.run(call(server, server.agent_token, name, args))
        assert (is_error, structured) == (over_http.is_error, over_http.structured_content), (name, args)
    assert exported["rows"] == 3 and exported["download_url"] is None  # no --http-url given
    assert [r["order_id"] for r in extra["read"]["rows"]] == [1, 2, 3]
    # The export was made as the agent on the remote server: visible over HTTP too.
    via_http = asyncio.run(
        call(server, server.agent_token, "read_artefact", {"id": exported["id"], "rows": 5})
    )
    assert via_http.structured_content == extra["read"]
    assert extra["resource"].contents[0].text.startswith("# demo.orders")


def test_a_bad_token_file_is_refused_before_serving(live: tuple[Server, Path], tmp_path: Path) -> None:
    import subprocess

    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    cmd = [sys.executable, "-m", "quiver", "mcp", "--url", live[0].flight_url, "--token-file", str(empty)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 2 and "token file" in done.stderr and done.stdout == ""


def test_the_readme_stdio_config_runs(live: tuple[Server, Path], tmp_path: Path) -> None:
    """The README's ``mcpServers`` stdio entry as written — ``.venv/bin/quiver`` run as this
    interpreter's ``-m quiver``, the URLs the test server's — from a directory holding
    ``var/demo-agent.token``: the tools answer, and an export is read back over Flight with
    the descriptor it answered."""
    import json

    from quiver_client import QuiverClient
    from tests.test_mcp_export import readme_block

    server, _ = live
    entry = json.loads(readme_block("mcp-stdio-config", "json"))["mcpServers"]["quiver"]
    assert entry["command"] == ".venv/bin/quiver" and entry["args"][0] == "mcp"
    args = [
        a.replace("grpc://localhost:8815", server.flight_url).replace(
            "http://localhost:8000", server.http_url
        )
        for a in entry["args"]
    ]
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "demo-agent.token").write_text(server.agent_token + "\n")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "quiver", *args],
        env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")},
        cwd=str(tmp_path),
    )

    async def go() -> dict[str, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            exported = await s.call_tool(
                "export_query",
                {"sql": "SELECT order_id FROM demo.orders WHERE order_id <= 7", "format": "arrow"},
            )
            assert not exported.is_error, exported.content
            assert isinstance(exported.structured_content, dict)
            return exported.structured_content

    body = asyncio.run(go())
    assert body["download_url"] == f"{server.http_url}/v1/artefacts/{body['id']}/content"
    assert body["flight_descriptor"] == {"kind": "artefact", "id": body["id"]}
    with QuiverClient(server.flight_url, server.agent_token) as quiver:
        assert quiver.get_artefact(body["id"]).column("order_id").to_pylist() == list(range(1, 8))
