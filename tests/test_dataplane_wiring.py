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


def test_the_guards_parser_cursors_are_reused_from_one_call_to_the_next(server: Server) -> None:
    """A new query shape is parsed on a cursor of the guard's private DuckDB; sixty of them,
    one call at a time, open at most a couple of cursors, not one each. The handlers run on
    gRPC's threads, whose Python thread state — with every thread-local — CPython makes and
    destroys on each entry into Python, so the per-thread cursor this used to keep was opened
    again on nearly every call (catalog/database.py ``CursorPool``)."""
    assert server.runtime.flight is not None
    cursors = server.runtime.flight.guard._cursors
    client, opts = server.flight(), call_options(server.demo_token)
    made = cursors.made
    for j in range(60):
        body = {"kind": "query", "sql": f"SELECT {j} AS shape_{j}"}  # a new shape: parsed
        info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(body).encode()), opts)
        assert client.do_get(info.endpoints[0].ticket, opts).read_all().column(0).to_pylist() == [j]
    assert cursors.made - made <= 2, cursors.made - made


def test_racing_parses_each_get_a_cursor_of_their_own(server: Server) -> None:
    """Eight threads parsing new shapes at once: every answer is its own (a cursor is never
    shared by two parses), and the pool keeps no more cursors than it may."""
    assert server.runtime.flight is not None
    cursors = server.runtime.flight.guard._cursors
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)
    tokens = [server.mint("agent", "demo", f"parser-{k}") for k in range(8)]

    def agent(k: int) -> None:
        try:
            client, opts = server.flight(), call_options(tokens[k])
            barrier.wait()
            for j in range(15):
                body = {"kind": "query", "sql": f"SELECT {k * 100 + j} AS race_{k}_{j}"}
                info = client.get_flight_info(
                    flight.FlightDescriptor.for_command(json.dumps(body).encode()), opts
                )
                got = client.do_get(info.endpoints[0].ticket, opts).read_all()
                assert got.column_names == [f"race_{k}_{j}"] and got.column(0).to_pylist() == [k * 100 + j]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(cursors._idle) <= cursors._keep
