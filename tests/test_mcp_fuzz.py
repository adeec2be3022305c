"""Arbitrary JSON as tool arguments: every answer is a tool result — an answer or a refusal
with a caller's code — never INTERNAL, a protocol failure or a 500, and nothing is kept."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Server
from tests.test_mcp import TOOLS, artefact_count, tool

pytestmark = pytest.mark.slow

CALLER_CODES = {
    "INVALID_ARGUMENT",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        ["demo.orders", "SELECT 1", "SELECT * FROM demo.orders", "head", "random", "json", "csv"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.sampled_from(
    [
        "sql",
        "params",
        "max_rows",
        "format",
        "table",
        "rows",
        "percent",
        "seed",
        "method",
        "columns",
        "id",
        "kind",
        "name",
        "after",
        "page_size",
    ]
)
arguments = st.dictionaries(names | st.text(max_size=10), values, max_size=5)


@pytest.fixture(scope="module")
def token(server: Server) -> str:
    return server.mint(agent="fuzzer")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(TOOLS)), args=arguments)
def test_any_arguments_get_a_tool_result(server: Server, token: str, name: str, args: dict[str, Any]) -> None:
    result = tool(server, name, args, token)
    if result.is_error:
        body = result.structured_content
        assert isinstance(body, dict) and body["code"] in CALLER_CODES, (name, args, body)
        assert len(body["detail"]) <= 2000


def test_fuzzing_kept_no_artefact(server: Server, token: str) -> None:
    # Exports that succeeded are the fuzzer's own; a refused one left nothing behind.
    before = artefact_count(server, token)
    tool(server, "export_query", {"sql": "SELECT * FROM nowhere"}, token)
    tool(server, "export_query", {"sql": 7}, token)
    assert artefact_count(server, token) == before
