"""Configuration: file, then QUIVER_* environment, then CLI flags; every mistake is one line
naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog import ConfigError, load_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "quiver.toml"
    p.write_text(text)
    return p


def test_defaults() -> None:
    c = load_config(None, environ={})
    assert c.server.flight_port == 8815 and c.server.http_port == 8000
    assert c.limits.query_timeout_seconds == 30
    assert c.tokens.max_ttl_seconds >= c.tokens.default_ttl_seconds
    assert c.database_path == c.data_dir / "quiver.duckdb"


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    p = _write(tmp_path, '[server]\nflight_port = 9000\nhttp_port = 9001\ndata_dir = "/srv/q"\n')
    c = load_config(p, environ={"QUIVER_SERVER_HTTP_PORT": "9100", "QUIVER_LIMITS_MAX_ROWS": "50"})
    assert (c.server.flight_port, c.server.http_port, c.limits.max_rows) == (9000, 9100, 50)
    c = load_config(p, environ={"QUIVER_SERVER_HTTP_PORT": "9100"}, overrides={"server": {"http_port": 9200}})
    assert c.server.http_port == 9200 and str(c.data_dir) == "/srv/q"
    c = load_config(None, environ={"QUIVER_SERVER_HOST": "0.0.0.0", "QUIVER_SERVER_PUBLIC_METRICS": "true"})
    assert c.server.host == "0.0.0.0" and c.server.public_metrics is True


def test_existing_database_file(tmp_path: Path) -> None:
    c = load_config(None, environ={}, overrides={"server": {"database": str(tmp_path / "warehouse.duckdb")}})
    assert c.database_path == tmp_path / "warehouse.duckdb"


@pytest.mark.parametrize(
    ("text", "env", "words"),
    [
        ("[server]\nflight_prot = 1\n", {}, ["flight_prot"]),
        ("[servre]\nhost = 'x'\n", {}, ["servre"]),
        ("[server]\nflight_port = 70000\n", {}, ["server.flight_port", "<= 65535"]),
        ("[server]\nflight_port = 'abc'\n", {}, ["server.flight_port", "int"]),
        ("[limits]\nmax_rows = 0\n", {}, ["limits.max_rows", ">= 1"]),
        ("[limits]\nquery_timeout_seconds = -1\n", {}, ["limits.query_timeout_seconds"]),
        ("[server]\nlog_format = 'xml'\n", {}, ["server.log_format", "json"]),
        (
            "[tokens]\ndefault_ttl_seconds = 100\nmax_ttl_seconds = 10\n",
            {},
            ["default_ttl_seconds", "max_ttl_seconds"],
        ),
        ("server = 3\n", {}, ["server"]),
        ("[server\n", {}, ["not valid TOML"]),
        ("", {"QUIVER_SERVER_FLIGHTPORT": "1"}, ["QUIVER_SERVER_FLIGHTPORT", "flightport", "flight_port"]),
        ("", {"QUIVER_LIMITS_MAX_ROWS": "many"}, ["limits.max_rows"]),
        ("[flight]\nsplit_part_rows = 0\n", {}, ["flight.split_part_rows", ">= 1"]),
        ("", {"QUIVER_FLIGHT_SPLIT_MIN_ROWS": "-5"}, ["flight.split_min_rows", ">= 0"]),
    ],
)
def test_bad_config_is_one_line_naming_the_key(
    tmp_path: Path, text: str, env: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text), environ=env)
    message = str(ei.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_split_sizes_come_from_the_flight_section(tmp_path: Path) -> None:
    """The planner's endpoint split is configuration: file, then environment."""
    from flight_server.planner import SplitOptions

    text = "[flight]\nsplit_part_rows = 1000\nsplit_max_parts = 3\n"
    c = load_config(_write(tmp_path, text), environ={"QUIVER_FLIGHT_SPLIT_ALIGN_ROWS": "1"})
    assert SplitOptions.from_config(c.flight) == SplitOptions(
        part_rows=1000, max_parts=3, min_split_rows=500_000, align_rows=1
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_unrelated_quiver_variables_are_ignored() -> None:
    c = load_config(None, environ={"QUIVER_URL": "grpc://x:1", "QUIVER_TOKEN_FILE": "/t"})
    assert c.server.flight_port == 8815


def test_every_configuration_key_is_documented() -> None:
    """proto_docs/configuration.md (sync.md for the Snowflake side, federation.md for live
    tables) name every key."""
    import re
    from pathlib import Path

    import msgspec

    from catalog.config import Config

    docs = Path(__file__).resolve().parents[1] / "proto_docs"
    text = (docs / "configuration.md").read_text()
    sync_text = (docs / "sync.md").read_text()
    live_text = (docs / "federation.md").read_text()
    missing = []
    for section in msgspec.structs.fields(Config):
        page = (
            live_text
            if section.name == "live"
            else sync_text
            if section.name in ("snowflake", "sync")
            else text
        )
        for key in msgspec.structs.fields(section.type):
            pattern = rf"(?m)^\s*#?\s*{re.escape(key.name)}\s*=|`{re.escape(key.name)}`|\[\[{section.name}\.{key.name}\]\]"
            if not re.search(pattern, page):
                missing.append(f"{section.name}.{key.name}")
    assert not missing, missing
