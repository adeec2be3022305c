"""One helper per concern in the data plane: the whoami answer, times in answers, the query
digest — each checked against the real server and against the other place that used to
hold a copy."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pyarrow.flight as flight

from catalog.clock import iso
from catalog.identity import WhoAmI
from flight_server.cache import sql_digest
from flight_server.planner import _query_label
from tests.harness import Server, call_options


def _whoami(server: Server, token: str) -> dict[str, object]:
    client = server.flight()
    try:
        (result,) = list(client.do_action(flight.Action("whoami", b""), call_options(token)))
        return dict(json.loads(result.body.to_pybytes()))
    finally:
        client.close()


def test_whoami_answers_the_whoami_struct_and_agrees_with_the_control_plane(server: Server) -> None:
    """One Struct (catalog.identity.WhoAmI) for both listeners: the same fields in the same
    order and the same values, written the same way (expires_at in RFC 3339, UTC)."""
    assert server.demo_token is not None
    for token in (server.demo_token, server.admin_token):
        answer = _whoami(server, token)
        assert list(answer) == list(WhoAmI.__struct_fields__)
        typed = msgspec.convert(answer, WhoAmI)  # the documented types
        assert typed.expires_at.utcoffset() is not None and typed.expires_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        http = server.http(token).get("/v1/whoami").json()
        assert http == answer and list(http) == list(answer)


def test_whoami_under_concurrent_calls_answers_each_caller(server: Server) -> None:
    assert server.demo_token is not None
    other = server.mint(agent="wiring-other")
    seen: list[tuple[str, object]] = []
    errors: list[BaseException] = []

    def ask(token: str, name: str) -> None:
        try:
            for _ in range(10):
                seen.append((name, _whoami(server, token)["agent"]))
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    threads = [
        threading.Thread(target=ask, args=(tok, name))
        for tok, name in [(server.demo_token, "demo-agent"), (other, "wiring-other")] * 3
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(seen) == 60 and all(name == agent for name, agent in seen)


def test_iso_is_one_format_for_timestamps_and_datetimes() -> None:
    at = datetime(2026, 1, 31, 12, 0, 0, 500_000, tzinfo=UTC)
    assert iso(at) == iso(at.timestamp()) == "2026-01-31T12:00:00.500000+00:00"
    # A naive datetime is UTC (DuckDB's TIMESTAMP of Quiver's own state), not local time.
    assert iso(at.replace(tzinfo=None)) == iso(at)
    assert iso(at.astimezone(timezone(timedelta(hours=-5)))) == iso(at)
    assert iso(None) is None


def test_the_query_label_and_the_cache_key_use_the_guards_fingerprint(server: Server) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    principal = server.catalog.tokens.verify(server.admin_token)
    guarded = flight_server.planner.check_sql(principal, "SELECT count(*) FROM demo.orders")
    assert sql_digest(guarded.normalized) == guarded.fingerprint
    assert _query_label(guarded.normalized) == f"query:{guarded.fingerprint[:12]}"
