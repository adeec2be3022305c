"""The agent client is a package of its own that needs only pyarrow (quiver_client/).

Importing it must not import the server, DuckDB or ``catalog``, nor change process-wide
state: the server's ``traceback.format_exception`` filter (flight_server/errors.py) is
installed by a server when it starts, not by an import. Each check runs in a fresh
interpreter, where nothing else has been imported yet.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.flight as flight
import pytest

from flight_server.errors import flight_error, schema_call_error
from flight_server.truncation import RowCap
from quiver_client import QuiverClientError, client_error, row_cap
from quiver_client.wire import CAP_REASONS, ERROR_CODES, decode_error, encode_error

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import json, sys, traceback
original = traceback.format_exception
{imports}
print(json.dumps({{
    "modules": sorted(m for m in ("duckdb", "catalog", "flight_server", "msgspec", "structlog")
                      if m in sys.modules),
    "patched": traceback.format_exception is not original,
    "names": {names},
}}))
"""


def _probe(imports: str, names: str = "[]") -> dict[str, object]:
    code = _PROBE.format(imports=imports, names=names)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize(
    "imports",
    [
        "import quiver_client",
        "from quiver_client import QuiverClient, QuiverClientError, TruncatedResultError",
        "import quiver_client.wire",
    ],
)
def test_importing_the_client_imports_no_server_and_patches_nothing(imports: str) -> None:
    seen = _probe(imports)
    assert seen["modules"] == []
    assert seen["patched"] is False


def test_the_server_package_still_re_exports_the_client() -> None:
    seen = _probe(
        "import flight_server, quiver_client",
        "[flight_server.QuiverClient is quiver_client.QuiverClient]",
    )
    assert seen["names"] == [True]
    # Importing the server does not patch either: a server does, when it is built.
    assert seen["patched"] is False


def test_building_a_server_installs_the_traceback_filter(tmp_path: Path) -> None:
    code = (
        "import traceback; original = traceback.format_exception\n"
        "from pathlib import Path\n"
        "from tests.harness import start_server\n"
        f"s = start_server(Path({str(tmp_path)!r}), demo=False)\n"
        "try:\n"
        "    print('patched:', traceback.format_exception is not original)\n"
        "finally:\n"
        "    s.stop()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=240
    )
    assert "patched: True" in out.stdout.splitlines()


def test_the_wire_constants_are_the_servers() -> None:
    """What the server writes, the client reads, from the one definition in quiver_client.wire."""
    from catalog.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

    for err in (InvalidArgument("x"), NotFound("y"), PermissionDenied("z"), Unavailable("w")):
        sent = flight_error(err)
        assert decode_error(sent.extra_info) == (err.code, err.detail)
        got = client_error(sent)
        assert isinstance(got, QuiverClientError)
        assert (got.code, got.detail) == (err.code, err.detail)
        assert got.code in ERROR_CODES
        assert schema_call_error(sent).code == err.code
    assert decode_error(b"not json") is None
    assert decode_error(None) is None
    assert decode_error(encode_error("NOT_FOUND", "gone")) == ("NOT_FOUND", "gone")

    for reason in CAP_REASONS:
        cap = RowCap(10, reason, None)  # type: ignore[arg-type]
        assert row_cap(cap.info_metadata()) == {"max_rows": 10, "reason": reason, "truncated": None}
        assert row_cap(cap.stream_metadata()) == {"truncated": True, "max_rows": 10, "reason": reason}
    assert row_cap(b"") is None
    assert row_cap(b"[1]") is None
    assert isinstance(flight_error(InvalidArgument("x")), flight.FlightServerError)
