"""proto_docs/ cannot rot: every ```python block of the data-plane documents runs against a
live server (the blocks of one document share a session, top to bottom), and every action
and error code the server knows is documented."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from catalog import errors
from flight_server.server import ACTIONS
from tests.harness import Server, start_server

DOCS = Path(__file__).resolve().parents[1] / "proto_docs"
DATA_PLANE_DOCS = [
    "descriptors.md",
    "tickets.md",
    "actions.md",
    "errors.md",
    "client.md",
    "limits.md",
    "flight-sql.md",
]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(
        tmp_path_factory.mktemp("docs"),
        limits={"query_timeout_seconds": 2, "max_concurrent_queries": 2},
    )
    yield s
    s.stop()


def blocks(name: str) -> list[str]:
    return BLOCK.findall((DOCS / name).read_text())


@pytest.mark.parametrize("name", DATA_PLANE_DOCS)
def test_examples_run(server: Server, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    assert server.demo_token is not None
    monkeypatch.setenv("QUIVER_URL", server.flight_url)
    monkeypatch.setenv("QUIVER_TOKEN", server.demo_token)
    monkeypatch.setenv("QUIVER_OTHER_TOKEN", server.mint("agent", "demo", f"docs-{name}"))
    monkeypatch.setenv("QUIVER_HTTP", server.http_url)  # limits.md: an admin sets a swarm's limits
    monkeypatch.setenv("QUIVER_ADMIN_TOKEN", server.admin_token)
    code = blocks(name)
    assert code, f"{name} has no runnable example"
    session: dict[str, object] = {"__name__": f"proto_docs.{name}"}
    for i, block in enumerate(code):
        try:
            exec(compile(block, f"proto_docs/{name}#{i + 1}", "exec"), session)
        except Exception as e:
            raise AssertionError(f"proto_docs/{name}, example {i + 1} failed: {e!r}\n{block}") from e


def test_every_action_is_documented() -> None:
    text = (DOCS / "actions.md").read_text()
    for name in ACTIONS:
        assert f"`{name}`" in text, name


def test_every_error_code_is_documented() -> None:
    text = (DOCS / "errors.md").read_text()
    codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.QuiverError) and cls.code != "ALREADY_EXISTS"
    }
    for code in codes:
        assert f"`{code}`" in text, code


def test_every_command_kind_is_documented() -> None:
    from flight_server.commands import KINDS

    text = (DOCS / "descriptors.md").read_text()
    for kind in KINDS:
        assert f'{{"kind": "{kind}"}}' in text, kind
