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
from hypothesis import example, given
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
@example(0.0)
@example(1.0)
@example(1.9999996)  # rounds up into the next second
@example(1.0000005)
@example(1_764_720_000.0000025)
def test_the_writer_formats_a_stamp_as_timestamper_iso_utc(stamp: float) -> None:
    from quiver.logs import _iso_timestamp

    want = datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")  # TimeStamper's form
    assert _iso_timestamp(None, "info", {"timestamp": stamp}) == {"timestamp": want}
    assert _iso_timestamp(None, "info", {"timestamp": want}) == {"timestamp": want}  # formatted already
    assert _iso_timestamp(None, "info", {}) == {}


def test_the_writer_formats_consecutive_stamps_of_one_and_of_different_seconds() -> None:
    """The cached second is the stamp's own: a stamp of the next (or an earlier) second
    after a cached one is formatted anew."""
    from quiver.logs import _iso_timestamp

    for stamp in (100.5, 100.25, 101.0, 99.75, 101.9999999, 100.5):
        want = datetime.fromtimestamp(stamp, UTC).isoformat().replace("+00:00", "Z")
        assert _iso_timestamp(None, "info", {"timestamp": stamp})["timestamp"] == want


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(max_size=12), _json_values, max_size=8))
def test_a_json_line_reads_back_as_json_dumps_writes_it(event: dict[str, object]) -> None:
    """msgspec renders what ``json.dumps`` rendered (structlog's ``JSONRenderer``): the same
    object read back, one ASCII line whatever the text holds."""
    from quiver.logs import render_json

    line = render_json(None, "info", dict(event))
    assert line.isascii() and "\n" not in line
    assert json.loads(line) == json.loads(json.dumps(event))


def test_a_json_line_of_values_json_has_no_form_for() -> None:
    """Integers beyond 64 bits, non-ASCII text and objects: as ``json.dumps`` with
    structlog's fallback (``__structlog__``, else ``repr``) writes them."""
    from quiver.logs import render_json

    class Shown:
        def __structlog__(self) -> str:
            return "shown"

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    event = {"event": "x", "big": 2**70, "name": "Zoë ✓", "a": Shown(), "b": Opaque(), "n": [1, 2.5]}
    line = render_json(None, "info", dict(event))
    assert line.isascii()
    assert json.loads(line) == {
        "event": "x",
        "big": 2**70,
        "name": "Zoë ✓",
        "a": "shown",
        "b": "<opaque>",
        "n": [1, 2.5],
    }


def test_a_token_anywhere_in_a_json_line_is_masked() -> None:
    """A token in a nested value or in an object's repr is masked in the line (redact
    masks the top-level values before)."""
    from quiver.logs import render_json

    class Holder:
        def __repr__(self) -> str:
            return f"Holder({TOKEN})"

    line = render_json(None, "info", {"event": "x", "nested": {"h": [f"bearer {TOKEN}"]}, "o": Holder()})
    assert TOKEN not in line
    assert json.loads(line) == {
        "event": "x",
        "nested": {"h": ["bearer [redacted-token]"]},
        "o": "Holder([redacted-token])",
    }
