"""Lines of libraries that log through the standard library (uvicorn), and Python warnings,
are rendered like Quiver's own (quiver/logs.py): one JSON object per line with ``event``,
``level``, ``timestamp`` and ``logger``, and tokens redacted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.harness import ServeProcess

FAKE = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNlY3JldA"


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines at all"
    out = []
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line[:300]!r}") from None
        assert isinstance(obj, dict), line
        assert {"event", "level", "timestamp"} <= set(obj), line
        out.append(obj)
    return out


def test_quiver_serve_writes_only_json_lines_uvicorns_included(tmp_path: Path) -> None:
    serve = ServeProcess(
        tmp_path / "data", env={"QUIVER_SERVER_LOG_FORMAT": "json", "QUIVER_SERVER_LOG_LEVEL": "info"}
    )
    try:
        admin = (tmp_path / "data" / "admin.token").read_text().strip()
        with httpx.Client(base_url=serve.http_url, timeout=10) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/v1/swarms", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            assert http.get("/v1/swarms", headers={"Authorization": f"Bearer {FAKE}"}).status_code == 401
            # A bearer token in the request target of a request uvicorn cannot parse.
            url = urlsplit(serve.http_url)
            with socket.create_connection((url.hostname, url.port), timeout=10) as s:
                s.sendall(f"GET /?t={admin} HTTP/1.1\r\nHost: x\r\nBad Header Line {FAKE}\r\n\r\n".encode())
                s.recv(4096)
    finally:
        code = serve.stop()
    assert code == 0
    assert serve.proc.stderr is not None
    stderr = serve.proc.stderr.read()
    lines = _json_lines(stderr)
    assert admin not in stderr and FAKE not in stderr and "c2lnbmF0dXJlLXNlY3JldA" not in stderr
    uvicorn = [line for line in lines if line.get("logger", "").startswith("uvicorn")]
    events = [line["event"] for line in uvicorn]
    assert any(e.startswith("Started server process") for e in events), events
    assert "Invalid HTTP request received." in events, events
    assert any(e.startswith("Finished server process") for e in events), events
    assert {line["level"] for line in uvicorn} <= {"info", "warning", "error"}
    assert any(line["event"] == "quiver.started" for line in lines)


_SCRIPT = textwrap.dedent(
    f"""
    import logging, warnings
    from quiver import logs

    logs.configure(FMT, "info")
    try:
        raise ValueError("refused {FAKE}")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application (token %s)", "{FAKE}")
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    warnings.warn("deprecated, bearer {FAKE}")
    logging.getLogger("chatty.library").info("below WARNING: not shown")
    """
)


def _run(fmt: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.replace("FMT", repr(fmt))],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_foreign_lines_tracebacks_and_warnings_are_json_and_redacted() -> None:
    stderr = _run("json")
    assert FAKE not in stderr and "c2lnbmF0dXJlLXNlY3JldA" not in stderr
    lines = _json_lines(stderr)
    assert [(line["logger"], line["level"]) for line in lines] == [
        ("uvicorn.error", "error"),
        ("uvicorn.error", "warning"),
        ("py.warnings", "warning"),
    ]
    assert lines[0]["event"] == "Exception in ASGI application (token [redacted-token])"
    assert "ValueError: refused [redacted-token]" in lines[0]["exception"]
    assert "deprecated, bearer [redacted-token]" in lines[2]["event"]


def test_foreign_lines_are_redacted_in_console_format_too() -> None:
    stderr = _run("console")
    assert FAKE not in stderr and "c2lnbmF0dXJlLXNlY3JldA" not in stderr
    assert "Exception in ASGI application" in stderr and "uvicorn.error" in stderr
    assert "ValueError: refused [redacted-token]" in stderr
    assert "below WARNING" not in stderr
