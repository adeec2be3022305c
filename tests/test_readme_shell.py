"""The README's shell examples run as written: the control plane's curl block, the
``quiver admin`` block and the agent guide's artefacts walk (its shell and Python blocks),
against a real ``quiver serve`` whose data directory is ``var/`` of the working directory (as
after ``make run``), with only the ports changed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        env = {**os.environ, "QUIVER_URL": serve.flight_url, "QUIVER_HTTP": serve.http_url}
        walk = subprocess.run(
            [sys.executable, "-c", readme_python("artefacts")],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert walk.returncode == 0, walk.stderr
        out = walk.stdout
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
