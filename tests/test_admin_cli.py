"""``quiver admin swarms|allowlist|tokens`` against a real server, and ``quiver token create``
with the server stopped: tables by default, the route's JSON with ``--json``, exit codes
0 / 1 (refused, state unchanged) / 2 (usage, nothing sent)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_support import cli, error_lines, json_out, port_of, run_quiver, write_toml
from tests.harness import Server, start_server


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("admin-cli")
    server = start_server(root / "data")
    config = write_toml(
        root / "quiver.toml",
        {"server": {"data_dir": str(root / "data"), "http_port": port_of(server.http_url)}},
    )
    yield server, config
    server.stop()


def _swarms(server: Server) -> dict[str, Any]:
    return {s["name"]: s for s in server.http().get("/v1/swarms").json()["swarms"]}


def _audit_count(server: Server) -> int:
    return len(server.http().get("/v1/audit", params={"limit": 10000}).json()["events"])


def test_swarms_and_allowlists(admin_server: tuple[Server, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, config = admin_server
    c = ("--config", str(config))
    code, out, err = cli(capsys, "admin", "swarms", "create", "sales", "--table", "demo.orders", "--description", "the sales bots", *c)  # fmt: skip
    assert code == 0, err
    header, row = out.strip().splitlines()[-2:]
    assert header.split() == ["NAME", "CREATED", "TABLES", "DESCRIPTION"]
    assert row.startswith("sales ") and "demo.orders" in row and row.endswith("the sales bots")
    code, out, err = cli(capsys, "admin", "swarms", "list", "--json", *c)
    assert code == 0, err
    listed = {s["name"]: s for s in json_out(out)["swarms"]}
    assert listed["sales"]["tables"] == ["demo.orders"] and "demo" in listed

    code, out, err = cli(capsys, "admin", "allowlist", "set", "sales", "demo.*", *c)
    assert code == 0, err
    assert "matching now: demo.customers, demo.events, demo.orders" in out
    code, out, err = cli(capsys, "admin", "allowlist", "get", "sales", "--json", *c)
    assert code == 0 and json_out(out) == {
        "swarm": "sales",
        "tables": ["demo.*"],
        "matching": ["demo.customers", "demo.events", "demo.orders"],
        "warnings": [],
        "entries": ["demo.*"],
    }
    # A pattern that matches no table yet is kept (pre-provisioning) and named in a warning.
    code, out, err = cli(capsys, "admin", "allowlist", "set", "sales", "demo.*", "later.t", *c)
    assert code == 0, err
    assert "warning: later.t matches no table" in out
    code, out, err = cli(capsys, "admin", "allowlist", "set", "sales", "demo.*", *c)
    assert code == 0 and "warning" not in out, err

    # Usage: neither patterns nor --clear (or both) is exit 2, and nothing is sent.
    before = _audit_count(server)
    usage: list[tuple[str, ...]] = [("sales",), ("sales", "demo.orders", "--clear")]
    for argv in usage:
        code, out, err = cli(capsys, "admin", "allowlist", "set", *argv, *c)
        assert code == 2 and error_lines(err) == [
            "quiver admin allowlist set: give the new allowlist's TABLE patterns, or --clear for an empty one (not both)"
        ]
    assert _audit_count(server) == before
    code, out, err = cli(capsys, "admin", "allowlist", "set", "sales", "--clear", *c)
    assert code == 0 and "matching now: (no table)" in out

    # Refusals are the server's code and detail on one line; state is unchanged.
    before_swarms = _swarms(server)
    refused: list[tuple[tuple[str, ...], str]] = [
        (("swarms", "create", "Bad Name!"), "400 INVALID_ARGUMENT"),
        (("swarms", "create", "sales"), "409 ALREADY_EXISTS"),
        (("swarms", "delete", "ghost"), "404 NOT_FOUND"),
        (("allowlist", "set", "sales", "no-dot"), "400 INVALID_ARGUMENT"),
        (("allowlist", "get", "a/b?c"), "404 NOT_FOUND"),
        (("swarms", "delete", ".."), "404 NOT_FOUND"),
        (("allowlist", "set", ".", "demo.*"), "404 NOT_FOUND"),
    ]
    for argv, status in refused:
        code, out, err = cli(capsys, "admin", *argv, *c)
        assert code == 1, (argv, err)
        (line,) = error_lines(err)
        assert f"answered {status}: " in line and server.admin_token not in line, line
    assert _swarms(server) == before_swarms

    code, out, err = cli(capsys, "admin", "swarms", "delete", "sales", *c)
    assert code == 0 and "deleted swarm sales" in out
    assert "sales" not in _swarms(server)


def _usage_exit(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """argparse's own usage error (exit 2, nothing sent): its message."""
    with pytest.raises(SystemExit) as exited:
        cli(capsys, *argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_rules_and_attributes(admin_server: tuple[Server, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Entries with rules as JSON arguments, swarm attributes, agent-token attributes; a bad
    rule is the server's 422 (exit 1, nothing changed), a malformed argument exit 2."""
    server, config = admin_server
    c = ("--config", str(config))
    rule = '{"table": "demo.customers", "row_filter": "country = :country", "mask": {"email": "hash"}}'
    code, out, err = cli(capsys, "admin", "swarms", "create", "desk", "--table", rule, "--table", "demo.orders", *c)  # fmt: skip
    assert code == 0, err
    code, out, err = cli(capsys, "admin", "allowlist", "get", "desk", *c)
    assert code == 0, err
    assert (
        '  {"table": "demo.customers", "row_filter": "country = $country", "mask": {"email": "hash"}}' in out
    )
    before = server.http().get("/v1/swarms/desk").json()
    code, out, err = cli(capsys, "admin", "allowlist", "set", "desk", '{"table": "demo.customers", "row_filter": "count(*) > 1"}', *c)  # fmt: skip
    assert code == 1 and "answered 422 INVALID_ARGUMENT: " in err and "aggregate" in err
    assert "must be a JSON object" in _usage_exit(
        capsys, "admin", "allowlist", "set", "desk", '{"table": ', *c
    )
    assert server.http().get("/v1/swarms/desk").json() == before

    code, out, err = cli(capsys, "admin", "attributes", "set", "desk", "country=NL", "tier:=2", *c)
    assert code == 0, err
    assert out.splitlines()[-3:] == ["swarm desk: 2 attribute(s)", '  country = "NL"', "  tier = 2"]
    code, out, err = cli(capsys, "admin", "attributes", "get", "desk", "--json", *c)
    assert code == 0 and json_out(out) == {"swarm": "desk", "attributes": {"country": "NL", "tier": 2}}
    assert "takes a number" in _usage_exit(capsys, "admin", "attributes", "set", "desk", "tier:=two", *c)
    assert "is not NAME=VALUE" in _usage_exit(capsys, "admin", "attributes", "set", "desk", "novalue", *c)
    for argv in (("desk",), ("desk", "a=1", "--clear")):
        code, out, err = cli(capsys, "admin", "attributes", "set", *argv, *c)
        assert code == 2 and "or --clear to remove them all" in err, (argv, err)
    code, out, err = cli(capsys, "admin", "attributes", "set", "desk", "swarm=x", *c)
    assert code == 1 and "answered 422 INVALID_ARGUMENT: " in err and "reserved" in err
    assert server.http().get("/v1/swarms/desk/attributes").json()["attributes"] == {
        "country": "NL",
        "tier": 2,
    }

    code, out, err = cli(capsys, "admin", "tokens", "create", "--kind", "agent", "--swarm", "desk", "--agent", "nl", "--attribute", "country=NL", "--attribute", "level:=3", *c)  # fmt: skip
    assert code == 0, err
    token = out.strip().splitlines()[-1]
    assert server.catalog.tokens.check(token).attributes == (("country", "NL"), ("level", 3))
    assert "agent=nl expires_at=" in err and err.rstrip().endswith('attributes={"country": "NL", "level": 3}')
    code, out, err = cli(capsys, "admin", "attributes", "set", "desk", "--clear", *c)
    assert code == 0 and "swarm desk: 0 attribute(s)" in out
    assert cli(capsys, "admin", "swarms", "delete", "desk", *c)[0] == 0


def test_tokens_create_list_revoke(
    admin_server: tuple[Server, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server, config = admin_server
    c = ("--config", str(config))
    assert cli(capsys, "admin", "swarms", "create", "ops", "--table", "demo.customers", *c)[0] == 0
    tokens: dict[str, str] = {}
    for agent in ("a1", "a2", "a2"):
        code, out, err = cli(capsys, "admin", "tokens", "create", "--kind", "agent", "--swarm", "ops", "--agent", agent, "--ttl", "600", *c)  # fmt: skip
        assert code == 0, err
        token = out.strip().splitlines()[-1]
        assert token.count(".") == 2 and token not in err and "kind=agent swarm=ops" in err
        who = server.http(token).get("/v1/whoami").json()
        assert who["agent"] == agent and who["tables"] == ["demo.customers"]
        tokens[who["jti"]] = token

    code, out, err = cli(capsys, "admin", "tokens", "list", "--swarm", "ops", *c)
    assert code == 0, err
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("JTI"))
    rows = lines[header + 1 :]
    assert lines[header].split() == ["JTI", "KIND", "SWARM", "AGENT", "ACTIVE", "EXPIRES", "LAST", "USED"]
    assert sorted(r.split()[0] for r in rows) == sorted(tokens)
    assert all(token not in out for token in tokens.values())

    first = next(iter(tokens))
    code, out, err = cli(capsys, "admin", "tokens", "revoke", first, "--json", *c)
    assert code == 0 and json_out(out)["jti"] == first and json_out(out)["active"] is False
    assert server.http(tokens[first]).get("/v1/whoami").status_code == 401

    code, out, err = cli(capsys, "admin", "tokens", "revoke", "--swarm", "ops", "--agent", "a2", *c)
    assert code == 0, err
    assert "revoked 2 token(s) of agent a2 of swarm ops" in out.splitlines()
    assert all(server.http(t).get("/v1/whoami").status_code == 401 for t in tokens.values())
    code, out, err = cli(capsys, "admin", "tokens", "list", "--swarm", "ops", "--all", "--json", *c)
    assert code == 0 and {t["jti"] for t in json_out(out)["tokens"] if not t["active"]} == set(tokens)

    # Usage errors (exit 2) send nothing; refusals (exit 1) change nothing.
    before = _audit_count(server)
    usage = [("revoke",), ("revoke", first, "--swarm", "ops"), ("revoke", "--agent", "a1")]
    for argv in usage:
        code, out, err = cli(capsys, "admin", "tokens", *argv, *c)
        assert code == 2 and len(error_lines(err)) == 1, (argv, err)
    assert _audit_count(server) == before
    refused = [
        (("revoke", "no-such-jti"), "404 NOT_FOUND"),
        (("revoke", ".."), "404 NOT_FOUND"),
        (("revoke", "--swarm", "ghost"), "404 NOT_FOUND"),
        (("create", "--kind", "agent", "--swarm", "ops"), "400 INVALID_ARGUMENT"),
        (("create", "--kind", "admin", "--ttl", "-5"), "422 INVALID_ARGUMENT"),
        (("list", "--limit", "0"), "400 INVALID_ARGUMENT"),
    ]
    for argv, status in refused:
        code, out, err = cli(capsys, "admin", "tokens", *argv, *c)
        assert code == 1, (argv, err)
        (line,) = error_lines(err)
        assert f"answered {status}: " in line, line
    code, out, err = cli(capsys, "admin", "tokens", "list", "--swarm", "ops", "--json", *c)
    assert json_out(out) == {"tokens": []}  # the refused create minted nothing


def test_concurrent_admin_commands_serialize(
    admin_server: tuple[Server, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Threads running the command against the real server: one create wins, the rest are
    refused with 409, and deletes after it leave no swarm and no live token."""
    server, config = admin_server
    c = ("--config", str(config))
    codes: list[int] = []
    lock = threading.Lock()

    def create() -> None:
        from quiver.admin_cli import cmd_admin
        from quiver.cli import _load, build_parser
        from quiver.local_client import ServerRefused

        args = build_parser().parse_args(["admin", "swarms", "create", "contended", *c])
        try:
            code = cmd_admin(args, _load(args))
        except ServerRefused as e:
            code = e.status
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [0] + [409] * 7
    capsys.readouterr()
    assert list(_swarms(server)).count("contended") == 1
    assert cli(capsys, "admin", "swarms", "delete", "contended", *c)[0] == 0


def test_admin_needs_the_running_server_and_token_create_works_without_it(tmp_path: Path) -> None:
    """Server stopped: ``quiver admin`` says so; ``quiver token create --kind agent`` mints
    locally when the swarm is in the database, and says how to create it when not."""
    data = tmp_path / "data"
    server = start_server(data, demo=False)
    try:
        server.http().post("/v1/swarms", json={"name": "bots"}).raise_for_status()
    finally:
        server.stop()
    config = str(write_toml(tmp_path / "quiver.toml", {"server": {"data_dir": str(data), "http_port": 1}}))
    down = run_quiver("admin", "swarms", "list", "--config", config)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert error_lines(down.stderr) == [
        f"quiver: no server holds {data / 'quiver.duckdb'} (is `quiver serve` running with this config?): "
        "`quiver admin` works through the running server's control plane"
    ]
    mint = run_quiver(
        "token", "create", "--kind", "agent", "--swarm", "bots", "--agent", "b1", "--config", config
    )
    assert mint.returncode == 0, mint.stderr
    token = mint.stdout.strip()
    missing = run_quiver(
        "token", "create", "--kind", "agent", "--swarm", "ghost", "--agent", "b1", "--config", config
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert error_lines(missing.stderr) == [
        f"quiver: swarm 'ghost' does not exist in {data / 'quiver.duckdb'}; start the server (`quiver serve`), "
        "create it with `quiver admin swarms create ghost` and mint the token there with `quiver admin tokens create`"
    ]
    bad = run_quiver(
        "token", "create", "--kind", "agent", "--swarm", "No Such!", "--agent", "b1", "--config", config
    )
    assert bad.returncode == 1 and "is not valid" in bad.stderr
    server = start_server(data, demo=False)
    try:
        who = server.http(token).get("/v1/whoami")
        assert who.status_code == 200 and who.json()["swarm"] == "bots" and who.json()["agent"] == "b1"
        # Only the one agent token was minted (the refused ones left nothing).
        records = server.http().get("/v1/tokens", params={"swarm": "bots"}).json()["tokens"]
        assert [r["agent"] for r in records] == ["b1"]
        busy = run_quiver("token", "create", "--kind", "admin", "--data-dir", str(data))
        assert busy.returncode == 1 and "quiver admin tokens create" in busy.stderr
    finally:
        server.stop()


def test_help_names_every_command() -> None:
    for argv, words in (
        (("admin", "--help"), ["swarms", "allowlist", "tokens", "Exit codes"]),
        (("admin", "tokens", "revoke", "--help"), ["--swarm", "--agent", "jti"]),
        (("admin", "allowlist", "set", "--help"), ["--clear", "TABLE"]),
    ):
        r = run_quiver(*argv)
        assert r.returncode == 0 and all(w in r.stdout for w in words), r.stdout


def test_an_explicit_url_and_token_file_reach_a_server_of_another_data_dir(
    admin_server: tuple[Server, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An admin's laptop: no data directory of that server here, the URL and the token named
    on the command line. Without the token file the data dir's own rules apply (refused)."""
    server, _ = admin_server
    elsewhere = tmp_path / "laptop"
    config = str(write_toml(tmp_path / "laptop.toml", {"server": {"data_dir": str(elsewhere)}}))
    token_file = tmp_path / "admin.token"
    token_file.write_text(server.admin_token + "\n")
    code, out, err = cli(
        capsys, "admin", "swarms", "list", "--json", "--config", config, "--url", server.http_url,
        "--token-file", str(token_file),
    )  # fmt: skip
    assert code == 0, err
    assert "demo" in {s["name"] for s in json_out(out)["swarms"]}
    code, out, err = cli(capsys, "admin", "swarms", "list", "--config", config, "--url", server.http_url)
    assert code == 1 and "no server holds" in error_lines(err)[0]
    assert not elsewhere.exists()  # nothing was created on the laptop
