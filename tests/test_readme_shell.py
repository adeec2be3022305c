"""The README's shell examples run as written: the control plane's curl block, the
``quiver admin`` block, the agent guide's artefacts walk and the admin guide's worked example
of row rules, budgets and the query log (their shell and Python blocks),
against a real ``quiver serve`` whose data directory is ``var/`` of the working directory (as
after ``make run``), with only the ports changed."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from quiver_client import QuiverClient
from tests.harness import ServeProcess

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def sh_block(after_heading: str, first_line: str) -> str:
    """The ```sh block under ``after_heading`` that starts with ``first_line``."""
    section = README.split(after_heading, 1)[1]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        if block.startswith(first_line):
            return block
    raise AssertionError(f"README.md: no sh block starting {first_line!r} under {after_heading!r}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    serve = ServeProcess(tmp_path / "var", "--demo")
    try:
        yield tmp_path, int(serve.http_url.rsplit(":", 1)[1])
    finally:
        serve.stop()


def run(script: str, cwd: Path, port: int) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "QUIVER_SERVER_HTTP_PORT": str(port)}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_block_governs_access(served: tuple[Path, int]) -> None:
    cwd, port = served
    block = sh_block("## Governing access", 'ADMIN="authorization')
    script = block.replace("localhost:8000", f"127.0.0.1:{port}")
    minted, revoked = script.split("# revoke it", 1)
    done = run(minted, cwd, port)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    assert answers[0]["name"] == "analysts"
    assert sorted(answers[1]["tables"]) == ["demo.customers", "demo.orders"]
    token = answers[2]
    assert token["kind"] == "agent" and token["swarm"] == "analysts" and token["token"]
    header = "".join(ln + "\n" for ln in minted.splitlines() if ln.startswith(("ADMIN=", "JSON=")))
    done = run(header + "# revoke it" + revoked.replace("<jti>", token["jti"]), cwd, port)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revoked_at"]


def test_the_quiver_admin_block_runs(served: tuple[Path, int]) -> None:
    cwd, port = served
    block = sh_block("### The same from a shell", "quiver admin swarms create")
    lines = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]
    for line in lines:
        line = line.replace("[--all]", "--all").replace("[--agent report-bot]", "--agent report-bot")
        if "<jti>" in line:
            listed = run("quiver admin tokens list --swarm analysts --json", cwd, port)
            assert listed.returncode == 0, listed.stderr
            line = line.replace("<jti>", json.loads(listed.stdout)["tokens"][0]["jti"])
        done = run(line, cwd, port)
        assert done.returncode == 0, f"{line}: {done.stderr}{done.stdout}"
    assert (cwd / "bot.token").read_text().strip().startswith("eyJ")


def readme_python(name: str) -> str:
    block = re.search(rf"<!-- {name}:start -->\n```python\n(.*?)```\n<!-- {name}:end -->", README, re.S)
    assert block, f"README.md lost its {name} markers"
    return block.group(1)


def run_python(name: str, cwd: Path, serve: ServeProcess) -> str:
    """The README's ``name`` Python block run against ``serve`` (QUIVER_URL, QUIVER_HTTP):
    its output, after it exited 0."""
    env = {**os.environ, "QUIVER_URL": serve.flight_url, "QUIVER_HTTP": serve.http_url}
    done = subprocess.run(
        [sys.executable, "-c", readme_python(name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_artefacts_guide_runs_as_written(tmp_path: Path) -> None:
    """The agent guide's artefacts walk, verbatim: the tokens minted with quiver admin, the
    Python steps (save, a teammate reads and joins, another swarm sees it only once shared,
    export with provenance and refresh, gone after its TTL), then the curl upload and
    download."""
    serve = ServeProcess(tmp_path / "var", "--demo")
    try:
        port = int(serve.http_url.rsplit(":", 1)[1])
        section = "### Saving and sharing results"
        done = run(sh_block(section, "quiver admin tokens create"), tmp_path, port)
        assert done.returncode == 0, done.stderr
        for name in ("teammate", "outsider"):
            assert (tmp_path / "var" / f"{name}.token").read_text().startswith("eyJ")
        out = run_python("artefacts", tmp_path, serve)
        saved = re.search(r"saved (\S+) as artefacts\.\"(\S+)\" until", out)
        assert saved and saved.group(1) == saved.group(2), out
        assert "the teammate reads 3 rows" in out and "0.91" in out, out
        assert "before sharing, the outsider gets NOT_FOUND" in out, out
        assert "after sharing, the outsider reads 3 rows" in out, out
        assert "exported by agent:demo/demo-agent from {'demo.orders': 1}" in out, out
        refreshed = re.search(r"refreshed into (\S+) from (\S+)", out)
        assert refreshed and refreshed.group(1) != refreshed.group(2), out
        assert "after its TTL NOT_FOUND" in out, out

        (tmp_path / "README.md").write_text(README)
        curl = sh_block(section, "curl").replace("localhost:8000", f"127.0.0.1:{port}")
        upload, download = curl.splitlines()
        done = run(upload, tmp_path, port)
        assert done.returncode == 0, done.stderr
        uploaded = json.loads(done.stdout)
        assert uploaded["name"] == "README.md" and uploaded["size_bytes"] == len(README.encode())
        done = run(download.replace("<id>", uploaded["id"]), tmp_path, port)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "copy.md").read_text() == README
    finally:
        serve.stop()


def json_documents(text: str) -> list[Any]:
    """The JSON documents curl printed one after another (no separator between them)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


HEX64 = re.compile(r"[0-9a-f]{64}")


def _dutch_and_hashed(table: pa.Table) -> None:
    rows = table.to_pylist()
    assert rows, "no rows"
    assert {r["country"] for r in rows} == {"NL"}, {r["country"] for r in rows}
    assert all(r["email"] is None or HEX64.fullmatch(r["email"]) for r in rows), rows[:3]


def _every_path_is_ruled(flight_url: str, nl: str, admin: str, mask_key: str) -> None:
    """Beyond the README's own reads: a PATH scan, samples, a profile and SQL shapes of the
    ruled table, for an agent with country = NL, checked against the admin's (unruled) answer
    computed with the rule written out by hand (the hash keyed with the server's mask key)."""
    with QuiverClient(flight_url, admin) as quiver:
        expected = quiver.query(
            "SELECT customer_id, sha256(? || CAST(email AS VARCHAR)) AS email FROM demo.customers "
            "WHERE country = 'NL' ORDER BY customer_id",
            [mask_key],
        ).to_pylist()
        clear = quiver.query(
            "SELECT count(*) AS n FROM demo.customers WHERE email = 'customer16@example.com'"
        )
        assert clear.column("n").to_pylist() == [1]  # the address is real: the mask is what hides it
    assert expected
    with QuiverClient(flight_url, nl) as quiver:
        scan = quiver.read("demo.customers")
        _dutch_and_hashed(scan)
        assert sorted(zip(scan["customer_id"].to_pylist(), scan["email"].to_pylist(), strict=True)) == [
            (r["customer_id"], r["email"]) for r in expected
        ]
        _dutch_and_hashed(quiver.sample("demo.customers", 20))
        _dutch_and_hashed(quiver.sample("demo.customers", 20, method="random", seed=7))
        _dutch_and_hashed(quiver.sample("demo.customers", percent=50, seed=7))
        profile = {r["name"]: r for r in quiver.profile("demo.customers").to_pylist()}
        assert profile["country"]["min"] == profile["country"]["max"] == "NL"
        assert profile["customer_id"]["count"] == len(expected)
        assert HEX64.fullmatch(profile["email"]["min"]) and HEX64.fullmatch(profile["email"]["max"])
        (listed,) = [t for t in quiver.tables() if t.name == "demo.customers"]
        assert listed.rows == len(expected)
        for shape in (
            "WITH c AS (SELECT * FROM demo.customers) SELECT customer_id, email, country FROM c",
            "SELECT a.customer_id, a.email, b.country FROM demo.customers a JOIN demo.customers b "
            "USING (customer_id)",
            "SELECT customer_id, email, country FROM demo.customers WHERE customer_id IN "
            "(SELECT customer_id FROM demo.customers)",
            "SELECT customer_id, email, country FROM demo.customers UNION ALL "
            "SELECT customer_id, email, country FROM demo.customers",
            "SELECT * FROM (SELECT customer_id, email, country FROM demo.customers) t",
        ):
            answer = quiver.query(shape)
            _dutch_and_hashed(answer)
            assert set(answer["customer_id"].to_pylist()) == {r["customer_id"] for r in expected}, shape
        assert quiver.query("SELECT * FROM demo.customers WHERE email LIKE '%@example.com'").num_rows == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_governance_guide_runs_as_written(tmp_path: Path) -> None:
    """The admin guide's worked example of issue 15, verbatim: a support swarm ruled by
    ``country = :country`` with hashed e-mails, its NL and FR agents' reads, a daily budget
    that stops a runaway agent, and the query log naming who read what."""
    serve = ServeProcess(tmp_path / "var", "--demo")
    try:
        port = int(serve.http_url.rsplit(":", 1)[1])
        section = "### Row rules, budgets and the query log"
        done = run(sh_block(section, "# the support desk"), tmp_path, port)
        assert done.returncode == 0, done.stderr
        nl = (tmp_path / "var" / "nl-desk.token").read_text().strip()
        assert nl.startswith("eyJ") and (tmp_path / "var" / "fr-desk.token").read_text().startswith("eyJ")

        out = run_python("governance", tmp_path, serve)
        lines = out.splitlines()
        first = ast.literal_eval(lines[0])
        assert len(first) == 3 and {r["country"] for r in first} == {"NL"}, out
        assert all(HEX64.fullmatch(r["email"]) for r in first), out
        assert re.fullmatch(r"nl-desk by country: \[\{'country': 'NL', 'n': \d+\}\]", lines[1]), out
        assert lines[2] == "customer16@example.com, a Dutch customer, matches 0 rows", out
        dutch = int(re.findall(r"'n': (\d+)", lines[1])[0])
        assert lines[3] == f"a full scan reads {dutch} rows", out
        assert re.fullmatch(r"fr-desk by country: \[\{'country': 'FR', 'n': \d+\}\]", lines[4]), out

        # Every other path, for another Dutch agent (its own budget: nl-desk's count stays the
        # README's).
        other = run(
            "quiver admin tokens create --kind agent --swarm support --agent nl-2 --attribute country=NL",
            tmp_path,
            port,
        )
        assert other.returncode == 0, other.stderr
        admin = (tmp_path / "var" / "admin.token").read_text().strip()
        mask_key = (tmp_path / "var" / "keys" / "mask.key").read_text().strip()
        _every_path_is_ruled(serve.flight_url, other.stdout.strip(), admin, mask_key)

        done = run(
            sh_block(section, 'ADMIN="authorization').replace("localhost:8000", f"127.0.0.1:{port}"),
            tmp_path,
            port,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"per_agent": {"queries_per_day": 10}}

        out = run_python("runaway", tmp_path, serve).strip()
        # nl-desk spent 4 of its 10 (three queries and a one-endpoint scan): the 7th is refused.
        refused = re.fullmatch(
            r"query 7: RESOURCE_EXHAUSTED - budget queries_per_day of agent support/nl-desk is spent: "
            r"used 10 of 10 today; it resets at (\d{4}-\d\d-\d\dT00:00:00Z)",
            out,
        )
        assert refused, out

        blocks = re.findall(r"```sh\n(.*?)```", README.split(section, 1)[1], re.S)
        (log_block,) = [b for b in blocks if "/v1/queries" in b]
        done = run(log_block.replace("localhost:8000", f"127.0.0.1:{port}"), tmp_path, port)
        assert done.returncode == 0, done.stderr
        http_refusal, page = json_documents(done.stdout)
        assert http_refusal == {
            "error": "RESOURCE_EXHAUSTED",
            "detail": f"budget queries_per_day of agent support/nl-desk is spent: used 10 of 10 today; "
            f"it resets at {refused.group(1)}",
        }
        newest, flight_refusal, last_ok = page["queries"]
        assert {q["principal"] for q in page["queries"]} == {"agent:support/nl-desk"}
        assert newest["via"] == "http" and newest["outcome"] == "refused", newest
        assert newest["error_code"] == "RESOURCE_EXHAUSTED" and newest["sql"].endswith("FROM demo.customers")
        assert flight_refusal["kind"] == "query" and flight_refusal["outcome"] == "refused", flight_refusal
        assert flight_refusal["sql"] == "SELECT segment, count(*) AS n FROM demo.customers GROUP BY ALL"
        assert flight_refusal["error_code"] == "RESOURCE_EXHAUSTED"
        assert last_ok["outcome"] == "ok" and last_ok["tables"] == ["demo.customers"], last_ok
        assert last_ok["rows"] == 3 and last_ok["kind"] == "query"

        # The whole day of the swarm: both desks, what they read, the scan and the refusals.
        with httpx.Client(base_url=serve.http_url, headers={"authorization": f"Bearer {admin}"}) as http:
            log = http.get("/v1/queries", params={"swarm": "support", "limit": 1000}).json()["queries"]
        by_agent = {(q["agent"], q["kind"], q["outcome"]) for q in log}
        assert {("nl-desk", "query", "ok"), ("nl-desk", "scan", "ok"), ("fr-desk", "query", "ok")} <= by_agent
        assert {
            ("nl-2", "sample", "ok"),
            ("nl-2", "profile", "ok"),
            ("nl-desk", "query", "refused"),
        } <= by_agent
        assert all(q["tables"] == ["demo.customers"] for q in log if q["outcome"] == "ok")
    finally:
        serve.stop()
