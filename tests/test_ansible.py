"""The deployment code: ansible-lint (production profile, offline) and a syntax check of
every playbook, the fail2ban filter against log lines captured from a real server, and
hadolint on the Dockerfile.

The Ansible tools live in ``.venv-ansible`` (``make ansible-tools``; ``make test`` builds
it). Applying the playbooks to a real Debian root is ``make deploy-test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pyarrow.flight as flight
import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
TOOLS = ROOT / ".venv-ansible" / "bin"
PLAYBOOKS = ("site.yml", "restore.yml", "rollback.yml", "gcp.yml")
FILTER = ANSIBLE_DIR / "roles" / "fail2ban" / "files" / "quiver-auth.conf"


def _tools() -> Path:
    if not (TOOLS / "ansible-lint").exists():
        if os.environ.get("CI"):
            pytest.fail("the Ansible tools are missing: `make test` installs them (make ansible-tools)")
        pytest.skip("the Ansible tools are not installed: run `make ansible-tools`")
    return TOOLS


def _run_ansible(*argv: str) -> subprocess.CompletedProcess[str]:
    tools = _tools()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env["PATH"] = f"{tools}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_HOME"] = str(ANSIBLE_DIR / ".ansible")
    env["NO_COLOR"] = "1"
    return subprocess.run(
        [str(tools / argv[0]), *argv[1:]],
        cwd=ANSIBLE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ansible_lint_production_profile() -> None:
    result = _run_ansible("ansible-lint", "--offline", "--profile", "production", "--nocolor")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook: str) -> None:
    result = _run_ansible("ansible-playbook", "-i", "inventory/example", "--syntax-check", playbook)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"playbook: {playbook}" in result.stdout


def test_every_playbook_is_checked() -> None:
    plays = sorted(
        p.name
        for p in ANSIBLE_DIR.glob("*.yml")
        if "hosts:" in p.read_text() and p.name != "requirements.yml"
    )
    assert plays == sorted(PLAYBOOKS)


# --- fail2ban: the filter against what Quiver really logs ---------------------------------


@pytest.fixture(scope="module")
def json_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """A ``quiver serve`` process logging JSON lines (as under systemd) to a file."""
    root = tmp_path_factory.mktemp("f2b")
    log = root / "quiver.log"
    env = {**os.environ, "QUIVER_SERVER_LOG_FORMAT": "json"}
    with open(log, "w") as err, open(root / "stdout", "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quiver",
                "serve",
                "--data-dir",
                str(root / "data"),
                "--flight-port",
                "0",
                "--http-port",
                "0",
            ],
            cwd=root,
            env=env,
            stdout=out,
            stderr=err,
        )
    try:

        def has_started() -> bool:
            assert proc.poll() is None, log.read_text()
            return "quiver.started" in log.read_text()

        wait_until(has_started, 60, 0.1, what="the server to start")
        started = next(line for line in log.read_text().splitlines() if "quiver.started" in line)
        event = json.loads(started)
        yield log, event["flight"], event["http"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_fail2ban_filter_matches_real_auth_failures(json_log: tuple[Path, str, str]) -> None:
    regex = shutil.which("fail2ban-regex")
    if regex is None:
        pytest.skip(
            "fail2ban-regex is not installed here (apt-get install fail2ban); make deploy-test runs it"
        )
    log, flight_url, http_url = json_log
    # One failure on each listener, one authenticated call that must not count, and a
    # request whose path tries to smuggle a fake "client" into the log line.
    client = flight.FlightClient(flight_url)
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(
            client.list_flights(options=flight.FlightCallOptions(headers=[(b"authorization", b"Bearer bad")]))
        )
    client.close()
    admin = (log.parent / "data" / "admin.token").read_text().strip()
    with httpx.Client(base_url=http_url) as http:
        assert http.get("/v1/swarms", headers={"authorization": "Bearer bad"}).status_code == 401
        assert http.get("/v1/swarms", headers={"authorization": f"Bearer {admin}"}).status_code == 200
        smuggled = "/v1/swarms/" + quote('x", "client": "192.0.2.66", "x": "', safe="")
        assert http.get(smuggled, headers={"authorization": "Bearer bad"}).status_code == 401
    wait_until(lambda: log.read_text().count('"auth.failed"') >= 3, 10, what="three auth.failed lines")

    result = subprocess.run(
        [regex, "--out", "ip", str(log), str(FILTER)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["127.0.0.1", "127.0.0.1", "127.0.0.1"], result.stdout

    # The line ansible/README.md shows is the real one: the same keys, written the same way
    # (compact separators), and the filter bans the address it names.
    example = (ANSIBLE_DIR / "README.md").read_text().split("```json\n", 1)[1].split("\n```", 1)[0]
    real = next(
        line
        for line in log.read_text().splitlines()
        if '"auth.failed"' in line and json.loads(line).get("audit_action") == "auth.failed"
    )
    assert sorted(json.loads(example)) == sorted(json.loads(real))
    assert ('":"' in example) == ('":"' in real) and ('": "' in example) == ('": "' in real)
    example_log = log.parent / "readme-example.log"
    example_log.write_text(example + "\n")
    shown = subprocess.run(
        [regex, "--out", "ip", str(example_log), str(FILTER)], capture_output=True, text=True, timeout=60
    )
    assert shown.stdout.split() == ["203.0.113.5"], shown.stdout + shown.stderr


def test_dockerfile_passes_hadolint() -> None:
    """The container option is linted only: there is no Docker engine to build it here."""
    hadolint = _tools() / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
