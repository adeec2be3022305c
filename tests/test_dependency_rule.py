"""The dependency rule (ARCHITECTURE.md): flight_server, control_plane and sync import catalog
and never each other; catalog imports none of them; the agent client imports nothing of the
server. Read from the source's own import statements (``ast``), not from text patterns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"catalog", "flight_server", "control_plane", "sync", "quiver", "quiver_client", "mcp_server"}
ALLOWED = {
    "catalog": {"catalog"},
    "flight_server": {"flight_server", "catalog", "quiver_client"},
    "control_plane": {"control_plane", "catalog"},
    "sync": {"sync", "catalog"},
    "quiver_client": {"quiver_client"},
    # MCP: tools on the catalog and the query port, proxied over Flight by the agent client.
    "mcp_server": {"mcp_server", "catalog", "quiver_client"},
}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(p for p in ALLOWED if (ROOT / p).is_dir()))
def test_packages_import_only_what_the_rule_allows(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert not {k: v for k, v in wrong.items() if v}, wrong
