"""Every Python block of proto_docs/ runs against a live server, so the wire contract's
examples cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import Server
from tests.test_dataplane_docs import DATA_PLANE_DOCS

DOCS = Path(__file__).resolve().parent.parent / "proto_docs"


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in sorted(DOCS.glob("*.md")):
        if page.name in DATA_PLANE_DOCS:  # run as sessions by tests/test_dataplane_docs.py
            continue
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", page.read_text(), re.S)):
            out.append((page.name, i, m.group(1)))
    return out


@pytest.mark.parametrize(("page", "index", "code"), _blocks(), ids=[f"{p}#{i}" for p, i, _ in _blocks()])
def test_example_runs(server: Server, page: str, index: int, code: str) -> None:
    assert server.demo_token is not None
    env = {
        **os.environ,
        "QUIVER_URL": server.flight_url,
        "QUIVER_HTTP": server.http_url,
        "QUIVER_TOKEN": server.demo_token,
        "QUIVER_ADMIN_TOKEN": server.admin_token,
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"{page} example {index} failed:\n{run.stderr}"
