"""Issue 14's Done-when over MCP, end to end against a live server with the SDK's own client
(``streamable_http_client`` + ``ClientSession``): list tables with their descriptions,
describe one, a guarded query whose cut the markdown flags, an export read back over Flight
with the descriptor the tool answered and downloaded with the agent token; Parquet and Arrow
stream file artefacts read as tables over Flight (CSV and NDJSON refused by name); every
``tools/call`` in the audit log."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from quiver_client import QuiverClient, QuiverClientError
from tests.harness import Server, call_options, error_info, start_server
from tests.test_mcp import artefact_count, ok, refused, run, session, tool

ROOT = Path(__file__).resolve().parents[1]
SQL = "SELECT order_id, customer_id, status, amount FROM demo.orders WHERE order_id <= ? ORDER BY order_id"


def artefact_info(server: Server, token: str, descriptor: dict[str, Any]) -> flight.FlightInfo:
    cmd = flight.FlightDescriptor.for_command(json.dumps(descriptor).encode())
    return server.flight().get_flight_info(cmd, call_options(token))


def flight_refusal(server: Server, token: str, descriptor: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(flight.FlightError) as e:
        artefact_info(server, token, descriptor)
    return error_info(e.value)


@pytest.fixture(scope="module", autouse=True)
def other_swarm(server: Server) -> None:
    r = server.http().post("/v1/swarms", json={"name": "other-swarm-x"})
    assert r.status_code in (201, 409), r.text


# --- the Done-when flow -----------------------------------------------------------------------


def test_the_done_when_flow_with_the_sdk_client(server: Server) -> None:
    """URL + agent token only: descriptions listed, a table described, a cut query flagged in
    its markdown, the full result exported and fetched over Flight equal to the query's."""
    admin = server.http()
    texts = {"table": "One row per order (Done-when).", "columns": {"status": "Lifecycle state"}}
    assert admin.put("/v1/tables/demo.orders/description", json=texts).status_code == 200
    token = server.mint(agent="done-when")

    async def flow() -> tuple[dict[str, Any], ...]:
        async with session(server, token) as s:
            listed = await s.call_tool("list_tables", {})
            described = await s.call_tool("describe_table", {"table": "demo.orders"})
            cut = await s.call_tool("run_query", {"sql": SQL, "params": [500], "max_rows": 20})
            exported = await s.call_tool("export_query", {"sql": SQL, "params": [500]})
        answers = []
        for result in (listed, described, cut, exported):
            answers.append(ok(result))
        text = cut.content[0]
        assert text.type == "text"
        answers.append({"markdown": text.text})
        return tuple(answers)

    listed, described, cut, exported, markdown = run(flow())
    tables = {t["name"]: t for t in listed["tables"]}
    assert tables["demo.orders"]["description"] == "One row per order (Done-when)."
    assert described["description"] == "One row per order (Done-when)."
    assert {c["name"]: c["description"] for c in described["columns"]}["status"] == "Lifecycle state"
    assert cut["truncated"] is True and cut["rows_returned"] == 20
    assert markdown["markdown"].startswith("20 row(s) shown: more rows exist beyond max_rows=20")
    assert "| order_id |" in markdown["markdown"]
    assert exported["rows"] == 500 and exported["truncated"] is False and exported["format"] == "parquet"
    descriptor = exported["flight_descriptor"]
    assert descriptor == {"kind": "artefact", "id": exported["id"]}

    with QuiverClient(server.flight_url, token) as quiver:
        info = quiver.info(flight.FlightDescriptor.for_command(json.dumps(descriptor).encode()))
        assert info.total_records == 500
        fetched = quiver.fetch(info)
        full = quiver.query(SQL, [500])
    assert fetched.num_rows == 500
    assert fetched.equals(full), (fetched.schema, full.schema)
    # The download URL works with the same token, and is the same Parquet file.
    r = httpx.get(exported["download_url"], headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200 and len(r.content) == exported["size_bytes"]
    assert pq.read_table(io.BytesIO(r.content)).equals(full)


# --- exports over Flight ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_a_parquet_or_arrow_export_streams_over_flight_as_a_table(server: Server, fmt: str) -> None:
    """The schema and row count in GetFlightInfo (from the file), one endpoint, the rows
    equal to the query's."""
    token = server.mint(agent=f"big-{fmt}")
    body = ok(tool(server, "export_query", {"sql": SQL, "params": [10**9], "format": fmt}, token))
    assert body["flight_descriptor"] == {"kind": "artefact", "id": body["id"]}
    info = artefact_info(server, token, body["flight_descriptor"])
    with QuiverClient(server.flight_url, token) as quiver:
        expected = quiver.query(
            "SELECT count(*) AS n, sum(amount) AS total, max(order_id) AS top FROM demo.orders"
        ).to_pylist()[0]
    assert info.total_records == expected["n"] == body["rows"] and len(info.endpoints) == 1
    reader = server.flight().do_get(info.endpoints[0].ticket, call_options(token))
    batches = [chunk.data for chunk in reader]
    got = pa.Table.from_batches(batches, schema=info.schema)
    assert got.num_rows == expected["n"] and got.column("order_id")[-1].as_py() == expected["top"]
    assert float(pa.compute.sum(got.column("amount")).as_py()) == pytest.approx(float(expected["total"]))
    # Another swarm sees nothing: NOT_FOUND, the same as for an id that never existed.
    stranger = server.mint(swarm="other-swarm-x", agent="stranger")
    assert flight_refusal(server, stranger, body["flight_descriptor"])["code"] == "NOT_FOUND"


@pytest.mark.parametrize("fmt", ["csv", "ndjson"])
def test_csv_and_ndjson_exports_have_no_descriptor_and_flight_names_the_formats(
    server: Server, fmt: str
) -> None:
    token = server.mint(agent=f"text-{fmt}")
    body = ok(tool(server, "export_query", {"sql": SQL, "params": [10], "format": fmt}, token))
    assert body["flight_descriptor"] is None and body["rows"] == 10
    before = artefact_count(server, token)
    info = flight_refusal(server, token, {"kind": "artefact", "id": body["id"]})
    assert info["code"] == "INVALID_ARGUMENT"
    assert "only tables and parquet and arrow files are read as tables" in info["detail"]
    assert len(info["detail"]) < 300
    # Nothing changed: the file is still there and downloads whole.
    assert artefact_count(server, token) == before
    r = httpx.get(body["download_url"], headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200 and len(r.content) == body["size_bytes"]


def test_a_file_declared_parquet_that_is_not_is_invalid_argument(server: Server) -> None:
    """An upload whose content is not the format it declares: a clear refusal over Flight and
    for a converted download, never INTERNAL or a 500, and the artefact is left as it was."""
    token = server.mint(agent="liar")
    principal = server.catalog.tokens.verify(token)
    with server.catalog.artefacts.begin_write(principal, "file", "fake.parquet", format="parquet") as w:
        w.write(b"PAR1 this is not parquet at all")
        fake = w.commit()
    info = flight_refusal(server, token, {"kind": "artefact", "id": fake.id})
    assert info["code"] == "INVALID_ARGUMENT" and "not a readable parquet file" in info["detail"]
    assert len(info["detail"]) < 400
    http = server.http(token)
    r = http.get(f"/v1/artefacts/{fake.id}/content", params={"format": "csv"})
    assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT"
    assert http.get(f"/v1/artefacts/{fake.id}/content").content == b"PAR1 this is not parquet at all"
    assert server.catalog.artefacts.get(principal, fake.id).size_bytes == fake.size_bytes


def test_a_parquet_export_converts_to_csv_on_download(server: Server) -> None:
    token = server.mint(agent="converter")
    body = ok(tool(server, "export_query", {"sql": SQL, "params": [5]}, token))
    r = server.http(token).get(body["download"], params={"format": "csv"})
    assert r.status_code == 200
    lines = r.text.strip().splitlines()
    assert lines[0].replace('"', "") == "order_id,customer_id,status,amount" and len(lines) == 6


# --- audit ------------------------------------------------------------------------------------


def test_every_tool_call_is_audited_with_the_fingerprint_only(server: Server) -> None:
    """Concurrent calls of one agent (threads against the real server, more than its
    ``max_concurrent_calls``): each is one ``mcp.tool`` audit event (principal, tool, SQL
    fingerprint, rows, bytes, ms, outcome) — answered and refused alike — buffered and
    flushed in a batch; never the SQL text or the token."""
    token = server.mint(agent="audited")
    secret_sql = "SELECT order_id FROM demo.orders WHERE order_id < ? AND 'needle-7f3a' <> ''"
    outcomes: dict[int, str] = {}
    errors: list[BaseException] = []

    def agent(i: int) -> None:
        try:
            result = tool(server, "run_query", {"sql": secret_sql, "params": [i + 2]}, token)
            outcomes[i] = refused(result)[0].lower() if result.is_error else "ok"
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert set(outcomes.values()) <= {"ok", "resource_exhausted"} and "ok" in outcomes.values()
    code, _ = refused(tool(server, "run_query", {"sql": "SELECT * FROM secret.salaries"}, token))
    assert code == "PERMISSION_DENIED"
    ok(tool(server, "list_tables", {}, token))

    r = server.http().get("/v1/audit", params={"action": "mcp.tool", "limit": 1000})
    assert r.status_code == 200
    mine = [e for e in r.json()["events"] if e["actor"] and e["actor"].endswith("/audited")]
    assert len(mine) == 10, mine
    queries = [e for e in mine if e["target"] == "run_query" and e["outcome"] != "permission_denied"]
    assert sorted(e["outcome"] for e in queries) == sorted(outcomes.values())
    details = [json.loads(e["detail"]) for e in queries]
    answered = sorted(d["rows"] for d, e in zip(details, queries, strict=True) if e["outcome"] == "ok")
    assert answered == sorted(i + 1 for i, o in outcomes.items() if o == "ok")
    assert len({d["sql"] for d in details}) == 1 and len(details[0]["sql"]) == 12
    assert all(
        d["bytes"] > 0 and d["ms"] >= 0 for d, e in zip(details, queries, strict=True) if e["outcome"] == "ok"
    )
    refusal = [e for e in mine if e["outcome"] == "permission_denied"]
    assert len(refusal) == 1 and refusal[0]["target"] == "run_query"
    listing = [e for e in mine if e["target"] == "list_tables"]
    assert len(listing) == 1 and json.loads(listing[0]["detail"])["sql"] is None
    dump = json.dumps(mine)
    assert "needle-7f3a" not in dump and token not in dump and "secret.salaries" not in dump


def test_a_call_refused_by_the_limits_is_audited_too(tight: Server) -> None:
    token = tight.mint(agent="limited-audit")
    answers = [tool(tight, "list_tables", {}, token) for _ in range(4)]
    assert any(a.is_error for a in answers)
    r = tight.http().get("/v1/audit", params={"action": "mcp.tool", "outcome": "resource_exhausted"})
    mine = [e for e in r.json()["events"] if e["actor"].endswith("/limited-audit")]
    assert mine and all(e["target"] == "list_tables" for e in mine)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("mcp-audit-tight"), mcp={"calls_per_minute": 2})
    yield s
    s.stop()


def test_an_unknown_export_id_over_flight_is_not_found(server: Server) -> None:
    token = server.mint(agent="prober")
    with QuiverClient(server.flight_url, token) as quiver, pytest.raises(QuiverClientError) as e:
        quiver.get_artefact("01a00000-0000-7000-8000-000000000000")
    assert e.value.code == "NOT_FOUND"


# --- the README's MCP section -----------------------------------------------------------------

README = (ROOT / "README.md").read_text()


def readme_block(marker: str, lang: str) -> str:
    """The ```lang block right after ``<!-- marker -->`` (or between ``marker:start``/``:end``)."""
    found = re.search(rf"<!-- {marker}(?::start)? -->\n```{lang}\n(.*?)```", README, re.S)
    assert found, f"README.md lost its {marker} block"
    return found.group(1)


def test_the_readme_mcp_walk_runs_as_written(server: Server, tmp_path: Path) -> None:
    """The README's Python MCP walk, verbatim, against a live server as after ``make run``
    (the token in var/demo-agent.token): descriptions listed, a cut flagged, the export
    fetched over Flight equal to the query."""
    admin = server.http()
    texts = {"table": "One row per order (README)."}
    assert admin.put("/v1/tables/demo.orders/description", json=texts).status_code == 200
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "demo-agent.token").write_text(server.agent_token + "\n")
    env = {
        **os.environ,
        "QUIVER_URL": server.flight_url,
        "QUIVER_HTTP": server.http_url,
        "PYTHONPATH": str(ROOT),
    }
    walk = subprocess.run(
        [sys.executable, "-c", readme_block("mcp", "python")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert walk.returncode == 0, walk.stderr
    out = walk.stdout
    assert "demo.orders - One row per order (README)." in out, out
    assert "10 row(s) shown: more rows exist beyond max_rows=10" in out, out
    exported = re.search(r"exported (\d+) rows into (\S+) - download: (\S+)", out)
    assert exported and int(exported.group(1)) > 10, out
    assert exported.group(3) == f"{server.http_url}/v1/artefacts/{exported.group(2)}/content", out
    assert f"fetched over Flight: {exported.group(1)} rows, equal to the query: True" in out, out


def test_the_readme_http_config_connects(server: Server) -> None:
    """The README's HTTP client configuration: its URL (host and port made the test
    server's) and header, with the agent token, reach the tools."""
    config = json.loads(readme_block("mcp-http-config", "json"))["mcpServers"]["quiver"]
    assert config["type"] == "http" and config["url"] == "http://localhost:8000/mcp"
    url = config["url"].replace("http://localhost:8000", server.http_url)
    headers = {
        k: v.replace("<the contents of var/demo-agent.token>", server.agent_token)
        for k, v in config["headers"].items()
    }

    async def tools() -> set[str]:
        async with (
            httpx2.AsyncClient(headers=headers, timeout=60) as http,
            streamable_http_client(url, http_client=http) as (read, write, *_),
            ClientSession(read, write) as s,
        ):
            await s.initialize()
            return {t.name for t in (await s.list_tools()).tools}

    assert {"list_tables", "describe_table", "run_query", "export_query"} <= run(tools())


# --- file artefacts as tables: visibility at DoGet, bounded memory ------------------------------


def test_an_export_deleted_after_getflightinfo_is_not_found_at_doget(server: Server) -> None:
    token = server.mint(agent="deleter")
    body = ok(tool(server, "export_query", {"sql": SQL, "params": [50]}, token))
    info = artefact_info(server, token, body["flight_descriptor"])
    assert server.http(token).delete(f"/v1/artefacts/{body['id']}").status_code == 204
    with pytest.raises(flight.FlightError) as e:
        server.flight().do_get(info.endpoints[0].ticket, call_options(token)).read_all()
    assert error_info(e.value)["code"] == "NOT_FOUND"


def test_a_large_parquet_file_streams_in_bounded_memory(server: Server) -> None:
    """A Parquet file artefact of many row groups is read a batch at a time: Arrow's memory
    while it streams stays a small fraction of the whole table's."""
    principal = server.catalog.tokens.verify(server.mint(agent="big-file"))
    rows = 2_000_000
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "v": pa.array([i * 0.5 for i in range(rows)])})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=100_000)
    with server.catalog.artefacts.begin_write(principal, "file", "big.parquet", format="parquet") as w:
        w.write(sink.getvalue().to_pybytes())
        art = w.commit()
    whole = table.nbytes
    del table, sink
    _, schema, count = server.catalog.artefacts.table_info(principal, art.id)
    assert count == rows and schema.names == ["id", "v"]
    _, reader = server.catalog.artefacts.open_table(principal, art.id)
    base = pa.total_allocated_bytes()
    peak, seen, total = 0, 0, 0
    for batch in reader:
        peak = max(peak, pa.total_allocated_bytes() - base)
        seen += batch.num_rows
        total += batch.column("id")[-1].as_py()
        del batch
    assert seen == rows and total > 0
    assert peak < whole / 4, (peak, whole)


def test_a_parquet_upload_corrupt_past_its_footer_fails_cleanly_at_doget(server: Server) -> None:
    """A sound footer over a corrupt page: GetFlightInfo answers (it reads only the footer);
    DoGet fails INVALID_ARGUMENT naming the artefact, no traceback, and the file is kept."""
    token = server.mint(agent="corrupt")
    principal = server.catalog.tokens.verify(token)
    table = pa.table({"a": pa.array([i * 7919 % 1_000_003 for i in range(300_000)], pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=50_000, compression="snappy")
    data = bytearray(sink.getvalue().to_pybytes())
    data[len(data) // 2 : len(data) // 2 + 5000] = b"\xff" * 5000
    with server.catalog.artefacts.begin_write(principal, "file", "c.parquet", format="parquet") as w:
        w.write(bytes(data))
        art = w.commit()
    info = artefact_info(server, token, {"kind": "artefact", "id": art.id})
    assert info.total_records == 300_000
    with pytest.raises(flight.FlightError) as e:
        server.flight().do_get(info.endpoints[0].ticket, call_options(token)).read_all()
    err = error_info(e.value)
    assert err["code"] == "INVALID_ARGUMENT" and "not a readable parquet file" in err["detail"]
    assert "Traceback" not in str(e.value) and len(err["detail"]) < 400
    assert server.catalog.artefacts.get(principal, art.id).size_bytes == len(data)
