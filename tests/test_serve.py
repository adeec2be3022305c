"""`quiver serve` as users run it: banner and README snippet, signals, restart persistence,
the CLI's token command, and health."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pyarrow.flight as flight
import pytest

from quiver.demo import SNIPPET
from tests.harness import ServeProcess, call_options, start_server

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

ROOT = Path(__file__).resolve().parent.parent


def readme_snippet(name: str = "snippet") -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {name}:start -->\n```python\n(.*?)```\n<!-- {name}:end -->", text, re.S)
    assert block, f"README.md lost its {name} markers"
    return block.group(1)


def test_readme_snippet_is_the_printed_one_and_runs_verbatim(tmp_path: Path) -> None:
    assert readme_snippet() == SNIPPET
    serve = ServeProcess(tmp_path / "data", "--demo")
    try:
        banner = "\n".join(serve.banner)
        assert SNIPPET.rstrip() in banner
        assert f"export QUIVER_URL={serve.flight_url}" in banner
        env = {
            **os.environ,
            "QUIVER_URL": serve.flight_url,
            "QUIVER_TOKEN_FILE": str(tmp_path / "data/demo-agent.token"),
        }
        run = subprocess.run(
            [sys.executable, "-c", readme_snippet()], env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        assert "demo.customers 1000 rows" in run.stdout
        assert "demo.orders 20000 rows" in run.stdout
        assert "1000 rows: [{'customer_id': 1" in run.stdout
        run = subprocess.run(
            [sys.executable, "-c", readme_snippet("client")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert "20000 orders" in run.stdout and "PERMISSION_DENIED" in run.stdout
        # secrets never reach the log: neither the admin nor the demo token
        assert serve.stop(signal.SIGINT) == 0
        log = serve.proc.stderr.read()  # type: ignore[union-attr]
        for name in ("admin.token", "demo-agent.token"):
            token = (tmp_path / "data" / name).read_text().strip()
            assert token not in log and token not in banner
        assert str(tmp_path / "data" / "admin.token") in log
    finally:
        serve.stop()


def test_sigterm_finishes_streams_and_checkpoints(tmp_path: Path) -> None:
    serve = ServeProcess(tmp_path / "data", "--demo")
    try:
        token = (tmp_path / "data/demo-agent.token").read_text().strip()
        client = flight.FlightClient(serve.flight_url)
        info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), call_options(token))
        reader = client.do_get(info.endpoints[0].ticket, call_options(token))
        first = reader.read_chunk()  # a stream is in flight
        rows = [first.data.num_rows]
        stopper = threading.Thread(target=lambda: rows.append(serve.stop(signal.SIGTERM)))
        stopper.start()
        try:
            rest = reader.read_all()
            rows[0] += rest.num_rows
            assert rows[0] == 50_000  # the in-flight stream finished
        except flight.FlightError:
            pass  # or it was cancelled after the grace period: never a torn process
        stopper.join(60)
        assert rows[-1] == 0, serve.proc.stderr.read()  # type: ignore[union-attr]
        assert not (tmp_path / "data" / "quiver.duckdb.wal").exists()  # checkpointed and closed
        with pytest.raises(httpx.TransportError):
            httpx.get(serve.http_url + "/healthz", timeout=2)
    finally:
        serve.stop()


def test_restart_keeps_swarms_allowlists_tokens_and_revocations(tmp_path: Path) -> None:
    data = tmp_path / "data"
    s = start_server(data)
    http = s.http()
    http.post("/v1/swarms", json={"name": "keep", "tables": ["demo.orders"]})
    keep = s.mint("agent", swarm="keep", agent="k1")
    gone = s.mint("agent", swarm="keep", agent="k2")
    gone_jti = s.catalog.tokens.verify(gone).jti
    http.delete(f"/v1/tokens/{gone_jti}")
    jwks = http.get("/.well-known/jwks.json").json()
    s.stop()

    s = start_server(data)
    try:
        http = s.http()
        assert http.get("/v1/swarms/keep").json()["tables"] == ["demo.orders"]
        assert http.get("/.well-known/jwks.json").json() == jwks
        opts = call_options(keep)
        names = [
            ".".join(p.decode() for p in fi.descriptor.path) for fi in s.flight().list_flights(options=opts)
        ]
        assert names == ["demo.orders"]
        with pytest.raises(flight.FlightUnauthenticatedError):
            list(s.flight().list_flights(options=call_options(gone)))
        assert s.http(gone).get("/v1/whoami").status_code == 401
        # the demo seed ran once: the data version did not move
        assert {t["table"]: t["data_version"] for t in http.get("/v1/tables").json()["tables"]}[
            "demo.orders"
        ] == 1
    finally:
        s.stop()


def test_allowlist_changes_show_in_list_flights(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data")
    try:
        http = s.http()
        http.post("/v1/swarms", json={"name": "narrow"})
        token = s.mint("agent", swarm="narrow", agent="n1")
        client = s.flight()

        def listed() -> list[str]:
            return sorted(
                ".".join(p.decode() for p in fi.descriptor.path)
                for fi in client.list_flights(options=call_options(token))
            )

        assert listed() == []
        http.put("/v1/swarms/narrow/allowlist", json={"tables": ["demo.orders"]})
        assert listed() == ["demo.orders"]
        http.put("/v1/swarms/narrow/allowlist", json={"tables": ["demo.*"]})
        assert listed() == ["demo.customers", "demo.events", "demo.orders"]
        http.put("/v1/swarms/narrow/allowlist", json={"tables": ["demo.events", "nosuch.*"]})
        assert listed() == ["demo.events"]
        (info,) = [fi for fi in client.list_flights(options=call_options(token))]
        assert info.total_records == 50_000 and "occurred_at" in info.schema.names
        # a table outside the allowlist is refused exactly like one that does not exist
        for path in (("demo", "orders"), ("demo", "nosuch"), ("_quiver", "tokens")):
            with pytest.raises(flight.FlightUnauthorizedError) as ei:
                client.get_flight_info(flight.FlightDescriptor.for_path(*path), call_options(token))
            assert "not readable: not in your allowlist or does not exist" in str(ei.value)
            assert "demo.events" in str(ei.value)
        # admins read every data table, never the system schema
        admin_names = sorted(
            ".".join(p.decode() for p in fi.descriptor.path)
            for fi in client.list_flights(options=call_options(s.admin_token))
        )
        assert admin_names == ["demo.customers", "demo.events", "demo.orders"]
    finally:
        s.stop()


def test_health_is_503_when_the_flight_listener_is_down(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data", demo=False)
    try:
        assert s.http(None).get("/healthz").status_code == 200
        assert s.runtime.flight is not None
        s.runtime.flight.shutdown()
        r = s.http(None).get("/healthz")
        assert r.status_code == 503 and r.json()["listeners"]["flight"]["up"] is False
    finally:
        s.stop()


def test_token_create_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "quiver", "token", "create", "--data-dir", str(data)]
    r = subprocess.run([*cmd, "--kind", "admin", "--ttl", "600"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token.count(".") == 2 and "kind=admin" in r.stderr and token not in r.stderr
    bad = subprocess.run(
        [*cmd, "--kind", "agent", "--swarm", "ghost", "--agent", "a"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "ghost" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([*cmd, "--kind", "admin", "--ttl", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "ttl_seconds" in bad.stderr
    s = start_server(data, demo=False)
    try:
        assert s.http(token).get("/v1/whoami").json()["kind"] == "admin"
        busy = subprocess.run([*cmd, "--kind", "admin"], capture_output=True, text=True, timeout=60)
        assert busy.returncode == 1 and "in use" in busy.stderr and "POST /v1/tokens" in busy.stderr
    finally:
        s.stop()


def test_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "quiver.toml"
    cfg.write_text("[server]\nflight_port = 'high'\n")
    r = subprocess.run(
        [sys.executable, "-m", "quiver", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "server.flight_port" in r.stderr
