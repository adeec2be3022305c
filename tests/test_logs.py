"""Secrets never reach a log: not through a field, an exception's text, or a traceback's local
variables, in either log format (quiver/logs.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNlY3JldA"

_SCRIPT = textwrap.dedent(
    f"""
    import structlog
    from quiver import logs

    logs.configure(FMT, "info")
    log = structlog.get_logger("t")

    def handler(headers):
        raise ValueError("refused " + headers["authorization"])

    try:
        handler({{"authorization": "Bearer {TOKEN}"}})
    except ValueError as e:
        log.error("flight.internal_error", exc_info=e, token="{TOKEN}", note="bearer {TOKEN}")
    """
)


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_tokens_are_redacted_from_fields_exceptions_and_tracebacks(fmt: str) -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.replace("FMT", repr(fmt))],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "flight.internal_error" in done.stderr and "ValueError" in done.stderr
    assert TOKEN not in done.stderr and "c2lnbmF0dXJlLXNlY3JldA" not in done.stderr
    assert "[redacted" in done.stderr


class _Text(str):
    """A str subclass, as some libraries hand out."""


def test_redact_by_key_in_any_case_and_every_string_value() -> None:
    """The per-record redaction (its secrecy verdict remembered per key name): secret keys in
    any case are replaced, a None under one stays None, a JWT is masked in every string value
    (a str subclass too), and other values pass untouched — on the first record and on the
    ones after it."""
    from quiver.logs import redact

    for _ in range(3):
        event = redact(
            None,
            "info",
            {
                "event": "flight.call",
                "Authorization": f"Bearer {TOKEN}",
                "PASSWORD": "hunter2",
                "token": None,
                "note": f"bearer {TOKEN}",
                "wrapped": _Text(f"x {TOKEN} y"),
                "ms": 1.5,
                "fields": {"k": 1},
                "principal": "agent:bench/p1",
            },
        )
        assert event["Authorization"] == event["PASSWORD"] == "[redacted]"
        assert event["token"] is None
        assert event["note"] == "bearer [redacted-token]"
        assert event["wrapped"] == "x [redacted-token] y"
        assert (event["ms"], event["fields"], event["principal"]) == (1.5, {"k": 1}, "agent:bench/p1")


_STAMP_SCRIPT = textwrap.dedent(
    """
    import json, structlog
    from quiver import logs

    logs.configure("json", "info")
    # What the calling thread does to a record: the moment only, as a float (no formatting).
    event = {"event": "x"}
    for processor in structlog.get_config()["processors"]:
        event = processor(None, "info", event)
    print(json.dumps({"queued": type(event["timestamp"]).__name__}), flush=True)
    structlog.get_logger("t").info("stamped")
    logs.flush()
    """
)


def test_records_are_stamped_in_the_calling_thread_and_formatted_by_the_writer() -> None:
    """The calling thread stamps ``time.time()``; the writer writes it as structlog's
    ``TimeStamper(fmt="iso", utc=True)`` did in the calling thread (quiver/logs.py)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _STAMP_SCRIPT], capture_output=True, text=True, cwd=root, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0]) == {"queued": "float"}
    (line,) = [json.loads(x) for x in done.stderr.splitlines() if '"stamped"' in x]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", line["timestamp"]), line


@given(st.floats(min_value=0, max_value=2**34, allow_nan=False, allow_infinity=False))
def test_the_writer_formats_a_stamp_as_timestamper_iso_utc(stamp: float) -> None:
    from quiver.logs import _iso_timestamp

    want = datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")  # TimeStamper's form
    assert _iso_timestamp(None, "info", {"timestamp": stamp}) == {"timestamp": want}
    assert _iso_timestamp(None, "info", {"timestamp": want}) == {"timestamp": want}  # formatted already
    assert _iso_timestamp(None, "info", {}) == {}
