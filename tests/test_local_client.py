"""The one client of the local control plane (quiver/local_client.py) that ``quiver sync``,
``quiver backup`` and ``quiver admin`` share: it reaches a TLS-only server (issue 9, bug 1:
``quiver sync`` built ``http://`` URLs of its own), checks the database lock first, proves
the server on the port is this data directory's before sending the admin token, reads the
token afresh per request, and prints a refusal as one line."""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog import Unavailable
from quiver.local_client import LocalServer, NotThisServer, ServerRefused, database_in_use
from tests.cli_support import cli, error_lines, json_out, port_of, run_quiver, write_toml
from tests.harness import DEMO_SCALE, ServeProcess, Server, make_config, start_server
from tests.sync_emulator import Emulator, Source
from tests.test_tls import make_certificates

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def src(emu: Emulator) -> Source:
    s = Source(emu, "LCL")
    s.execute("CREATE TABLE ORDERS (ID NUMBER(38,0), STATUS VARCHAR, UPDATED_AT NUMBER(38,0))")
    s.execute("INSERT INTO ORDERS SELECT SEQ4(), 'placed', 1 FROM TABLE(GENERATOR(ROWCOUNT => 500))")
    return s


def _sync(src: Source) -> dict[str, Any]:
    table = {
        "source": src.name("ORDERS"),
        "target": "sales.orders",
        "primary_key": ["ID"],
        "interval_seconds": 3600,
    }
    return {"enabled": False, "retry_seconds": 0, "tables": [table]}  # fmt: skip


def _cli_config(path: Path, server: Server, emu: Emulator, src: Source, **sections: dict[str, Any]) -> Path:
    """The command's view of ``server``: its data dir, port, [snowflake] and [[sync.tables]]."""
    base: dict[str, Any] = {
        "server": {"data_dir": str(server.data_dir), "http_port": port_of(server.http_url)},
        "snowflake": emu.snowflake_section(),
        "sync": _sync(src),
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_toml(path, base)


def _ca_of(tls: dict[str, str]) -> str:
    """The test CA that signed a ``make_certificates`` certificate (written beside it)."""
    return str(Path(tls["cert_file"]).parent / "ca.pem")


def _auth_failures(server: Server, ca: str | None = None) -> list[dict[str, Any]]:
    """The server's audited authentication failures (``ca``: the test CA of a TLS server)."""
    verify = ssl.create_default_context(cafile=ca) if ca else True
    with httpx.Client(verify=verify, timeout=30) as client:
        r = client.get(
            f"{server.http_url}/v1/audit",
            params={"limit": 1000},
            headers={"authorization": f"Bearer {server.admin_token}"},
        )
    return [e for e in r.json()["events"] if e["action"] == "auth.failed"]


# --- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_sync_server(
    emu: Emulator, src: Source, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, dict[str, str]]]:
    root = tmp_path_factory.mktemp("tls-sync")
    _, cert, key = make_certificates(root / "pki")  # the CA is pki/ca.pem (_ca_of)
    tls = {"cert_file": str(cert), "key_file": str(key)}
    server = start_server(
        root / "data", demo=False, snowflake=emu.snowflake_section(), sync=_sync(src), tls=tls
    )
    yield server, tls
    server.stop()


def test_sync_run_and_status_reach_a_tls_server(
    tls_sync_server: tuple[Server, dict[str, str]], emu: Emulator, src: Source, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The regression: ``quiver sync`` called http:// on a TLS-only control plane and ended in
    'in use by another process, and no control plane answers'."""
    server, tls = tls_sync_server
    assert server.http_url.startswith("https://")
    config = _cli_config(tmp_path / "quiver.toml", server, emu, src, tls=tls)
    code, out, err = cli(capsys, "sync", "run", "--config", str(config), "--table", "sales.orders")
    assert code == 0 and "sales.orders: ok (full) read 500 rows, wrote 500" in out, err
    assert f"triggered on the server at {server.http_url}" in err
    code, out, err = cli(capsys, "sync", "status", "--config", str(config), "--json")
    assert code == 0, err
    (table,) = json_out(out)["tables"]
    assert table["table"] == "sales.orders" and table["last_run"]["outcome"] == "ok"
    code, out, err = cli(capsys, "sync", "status", "--config", str(config))
    assert code == 0 and "sales.orders " in out, err
    # The refusal of a bad request over TLS is Quiver's detail on one line.
    code, out, err = cli(capsys, "sync", "run", "--config", str(config), "--table", "sales.nope")
    assert code == 1
    (line,) = error_lines(err)
    assert "answered 404 NOT_FOUND" in line and "sales.nope" in line and server.admin_token not in line


def test_backup_and_admin_reach_a_tls_server(
    tls_sync_server: tuple[Server, dict[str, str]], emu: Emulator, src: Source, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    server, tls = tls_sync_server
    config = _cli_config(tmp_path / "quiver.toml", server, emu, src, tls=tls)
    code, out, err = cli(capsys, "backup", "--config", str(config), "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert (
        Path(out.strip().splitlines()[-1]).parent == tmp_path / "out" and "through the running server" in err
    )
    # --url with https is checked against the configured certificate too (it was system trust only).
    url = f"https://localhost:{port_of(server.http_url)}"
    code, out, err = cli(capsys, "admin", "swarms", "list", "--config", str(config), "--url", url, "--json")
    assert code == 0 and json_out(out) == {"swarms": []}, err


def test_an_untrusted_certificate_is_one_line_and_no_token_is_sent(
    tls_sync_server: tuple[Server, dict[str, str]], emu: Emulator, src: Source, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A configuration whose cert_file is not what the server presents (another CA's)."""
    server, tls = tls_sync_server
    _, other_cert, other_key = make_certificates(tmp_path / "other-pki")
    other = {"cert_file": str(other_cert), "key_file": str(other_key)}
    config = _cli_config(tmp_path / "quiver.toml", server, emu, src, tls=other)
    before = _auth_failures(server, _ca_of(tls))
    for argv in (["sync", "status"], ["admin", "swarms", "list"], ["backup"]):
        code, _, err = cli(capsys, *argv, "--config", str(config))
        assert code == 1, argv
        (line,) = error_lines(err)
        assert (
            line.startswith(f"quiver: TLS with {server.http_url} failed (")
            and "CERTIFICATE_VERIFY_FAILED" in line
        )
        assert "check [tls] cert_file" in line
    assert _auth_failures(server, _ca_of(tls)) == before


def test_backup_and_sync_status_reach_a_tls_server_in_another_process(
    emu: Emulator, src: Source, tmp_path: Path
) -> None:
    """As on the VM: the server is another process (the database's file lock, not this
    process's DuckDB instance, says it runs) and speaks TLS only."""
    _, cert, key = make_certificates(tmp_path / "pki")
    data = tmp_path / "data"
    sections: dict[str, Any] = {
        "server": {"data_dir": str(data), "host": "127.0.0.1"},
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "snowflake": emu.snowflake_section(),
        "sync": _sync(src),
        "demo": {"scale": DEMO_SCALE},
    }
    serve = ServeProcess(data, "--config", str(write_toml(tmp_path / "serve.toml", sections)))
    try:
        assert serve.http_url.startswith("https://127.0.0.1:")
        sections["server"]["http_port"] = port_of(serve.http_url)
        config = str(write_toml(tmp_path / "quiver.toml", sections))
        assert database_in_use(make_config(data))
        status = run_quiver("sync", "status", "--config", config, "--json")
        assert status.returncode == 0, status.stderr
        assert [t["table"] for t in json.loads(status.stdout)["tables"]] == ["sales.orders"]
        backup = run_quiver("backup", "--config", config, "--output", str(tmp_path / "out"))
        assert backup.returncode == 0, backup.stderr
        assert Path(backup.stdout.strip()).is_file() and "through the running server" in backup.stderr
    finally:
        serve.stop()
    assert not database_in_use(make_config(data))


# --- whose server ---------------------------------------------------------------------------------


@pytest.fixture
def two_quivers(emu: Emulator, src: Source, tmp_path: Path) -> Iterator[tuple[Path, Server, Path]]:
    """Data dir A (its server stopped), server B on a port of its own, and A's configuration
    naming B's port: (A's data dir, B, A's config)."""
    a = tmp_path / "a"
    start_server(a, demo=False).stop()  # A's database, signing key and admin.token exist
    b = start_server(tmp_path / "b", demo=False, snowflake=emu.snowflake_section(), sync=_sync(src))
    try:
        config = write_toml(
            tmp_path / "a.toml",
            {
                "server": {"data_dir": str(a), "http_port": port_of(b.http_url)},
                "snowflake": emu.snowflake_section(),
                "sync": _sync(src),
            },
        )
        yield a, b, config
    finally:
        b.stop()


def test_a_stopped_server_s_commands_never_call_the_quiver_on_its_port(
    two_quivers: tuple[Path, Server, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The regression: with A stopped and B on A's port, ``quiver sync status`` sent B A's
    admin token and printed B's '401 token signature invalid'. A's database is free, so the
    commands work on it directly (or say the server is stopped) and B hears nothing."""
    a, b, config = two_quivers
    before = _auth_failures(b)
    code, out, err = cli(capsys, "sync", "status", "--config", str(config), "--json")
    assert code == 0 and json_out(out)["tables"][0]["last_run"] is None, err  # A's own state
    code, out, err = cli(capsys, "backup", "--config", str(config), "--output", str(tmp_path / "out"))
    assert code == 0 and "directly (server stopped)" in err
    code, out, err = cli(capsys, "admin", "swarms", "list", "--config", str(config))
    assert code == 1
    (line,) = error_lines(err)
    assert f"no server holds {a / 'quiver.duckdb'}" in line
    assert _auth_failures(b) == before


def test_a_foreign_server_on_the_port_is_refused_before_the_token_is_sent(
    two_quivers: tuple[Path, Server, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A's server runs (its database is locked) but on another port than A's configuration
    says, where B answers: every command refuses in one line, and B never sees A's token."""
    a, b, config = two_quivers
    a_server = start_server(a, demo=False)  # on an ephemeral port, not the configured one
    try:
        a_token = (a / "admin.token").read_text().strip()
        before = _auth_failures(b)
        expected = (
            f"quiver: the server on {b.http_url} is not the Quiver of {a} (its signing key differs); "
            "stop it or point --config at its data dir"
        )
        for argv in (
            ["sync", "status", "--config", str(config)],
            ["sync", "run", "--config", str(config)],
            ["backup", "--config", str(config)],
            ["admin", "swarms", "list", "--config", str(config)],
            ["admin", "tokens", "create", "--kind", "admin", "--config", str(config)],
        ):
            code, out, err = cli(capsys, *argv)
            assert code == 1, argv
            assert error_lines(err) == [expected], argv
            assert a_token not in out + err
        assert _auth_failures(b) == before
        events = b.http().get("/v1/audit", params={"limit": 1000}).json()["events"]
        assert a_token not in json.dumps(events)
        # B's state is untouched: nothing was triggered or backed up there.
        assert b.http().get("/v1/sync").json()["tables"][0]["last_run"] is None
        assert not b.catalog.config.backup_dir.exists() or not list(b.catalog.config.backup_dir.iterdir())
        # Pointed at its own server, the same data dir works.
        own = ("--config", str(config), "--url", a_server.http_url)
        code, out, err = cli(capsys, "admin", "swarms", "list", *own)
        assert code == 0, err
        # ... and A's own answer (its server runs without [[sync.tables]]) is one line.
        code, out, err = cli(capsys, "sync", "status", *own)
        assert code == 1 and error_lines(err) == [
            f"quiver: GET {a_server.http_url}/v1/sync answered 404 NOT_FOUND: sync is not configured: "
            "add [snowflake] and [[sync.tables]] to quiver.toml"
        ]
    finally:
        a_server.stop()


class _NotQuiver(http.server.BaseHTTPRequestHandler):
    """Some other web service on the port: every path is a 404 page."""

    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(f"{self.path} {self.headers.get('authorization')}")
        self.send_error(404, "Not Found", "no such page\non this\nserver")

    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_that_is_not_quiver_is_refused_in_one_line(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a_server = start_server(a, demo=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotQuiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        config = make_config(a, server={"http_port": httpd.server_address[1]})
        with LocalServer(config) as client, pytest.raises(NotThisServer) as refused:
            client.request("GET", "/v1/swarms")
        assert refused.value.detail == (
            f"the server on http://127.0.0.1:{httpd.server_address[1]} is not a Quiver "
            "(GET /.well-known/jwks.json answered 404); stop it or point --config at the right port"
        )
        assert _NotQuiver.seen == ["/.well-known/jwks.json None"]  # no token went out
    finally:
        httpd.shutdown()
        a_server.stop()


def test_nothing_listening_is_one_line_naming_the_url(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a_server = start_server(a, demo=False)
    try:
        config = make_config(a, server={"http_port": 1})
        with LocalServer(config) as client, pytest.raises(Unavailable) as refused:
            client.request("GET", "/v1/swarms")
        detail = refused.value.detail
        assert "\n" not in detail and "no control plane answers at http://127.0.0.1:1 " in detail
    finally:
        a_server.stop()


# --- the admin token --------------------------------------------------------------------------------


def test_the_token_file_is_read_for_every_request(fresh_server: Server, tmp_path: Path) -> None:
    """The server renews admin.token while it runs; a client that read it once would use a
    stale token (here: one revoked and replaced between two requests)."""
    server = fresh_server
    token_file = tmp_path / "ops.token"
    first = server.http().post("/v1/tokens", json={"kind": "admin", "ttl_seconds": 600}).json()
    token_file.write_text(first["token"] + "\n")
    with LocalServer(server.catalog.config, url=server.http_url, token_file=token_file) as client:
        assert client.json("GET", "/v1/whoami")["jti"] == first["jti"]
        server.http().delete(f"/v1/tokens/{first['jti']}")
        with pytest.raises(ServerRefused) as refused:
            client.request("GET", "/v1/whoami")
        assert refused.value.status == 401 and refused.value.error == "UNAUTHENTICATED"
        assert first["token"] not in refused.value.detail and str(token_file) in refused.value.detail
        second = server.http().post("/v1/tokens", json={"kind": "admin", "ttl_seconds": 600}).json()
        token_file.write_text(second["token"])
        assert client.json("GET", "/v1/whoami")["jti"] == second["jti"]


def test_concurrent_commands_through_one_client(fresh_server: Server) -> None:
    """Threads sharing one client (one verified connection pool) against the real server."""
    server = fresh_server
    results: list[int] = []
    errors: list[BaseException] = []
    with LocalServer(server.catalog.config, url=server.http_url) as client:

        def work(i: int) -> None:
            try:
                r = client.request("POST", "/v1/swarms", json={"name": f"race-{i % 3}"})
                results.append(r.status_code)
            except ServerRefused as e:
                results.append(e.status)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert sorted(results) == [201] * 3 + [409] * 9
    names = {s["name"] for s in server.http().get("/v1/swarms").json()["swarms"]}
    assert {"race-0", "race-1", "race-2"} <= names
