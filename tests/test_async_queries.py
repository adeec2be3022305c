"""Async queries: lifecycle, cancellation, timeout, caps, binding to the principal, TTL, and
every bad request — on a real DuckDB database, with the real IPC files on disk.

The unit tests drive :class:`QueryManager` with a plain prepare function (parameters bound
by DuckDB) and its typed methods; the server tests at the end go through the Flight actions,
whose bodies the server decodes (flight_server/commands.py) and whose queries the planner
prepares (``Planner.prepare``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from catalog import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Principal,
    ResourceExhausted,
    Unavailable,
)
from catalog.clock import SYSTEM_CLOCK, Clock
from catalog.config import ResultsConfig
from catalog.database import Database
from flight_server.results import ACTION_DESCRIPTIONS, PreparedQuery, QueryError, QueryManager, QueryStatus
from tests.harness import FakeClock, Server, call_options, error_info, wait_until

SLOW_SQL = "SELECT sum(a.range * b.range) AS s FROM range(200000) a, range(200000) b"


def principal(name: str, kind: str = "agent") -> Principal:
    return Principal(
        kind=kind,  # type: ignore[arg-type]
        jti=f"jti-{name}",
        subject=f"agent:demo/{name}" if kind == "agent" else "admin",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        swarm="demo" if kind == "agent" else None,
        agent=name if kind == "agent" else None,
    )


ALICE, BOB = principal("alice"), principal("bob")


def prepare(_principal: Principal, request: dict[str, Any]) -> PreparedQuery:
    sql = request.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise InvalidArgument('"sql" must be a non-empty string')
    params = request.get("params", [])
    return PreparedQuery(run=lambda cur: cur.sql(sql, params=params).to_arrow_reader(10_000), sql=sql)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    root = tmp_path_factory.mktemp("async")
    database = Database(root / "a.duckdb", temp_dir=root / "tmp", lockdown=False, threads=2)
    with database.transaction() as cur:
        cur.execute("CREATE TABLE nums AS SELECT i, i % 7 AS k, 'v' || i AS s FROM range(100000) t(i)")
    yield database
    database.close()


@pytest.fixture
def make(db: Database, tmp_path: Path) -> Iterator[Any]:
    managers: list[QueryManager] = []

    def build(clock: Clock = SYSTEM_CLOCK, **config: Any) -> QueryManager:
        m = QueryManager(db, tmp_path / "results", ResultsConfig(**config), clock=clock)
        managers.append(m)
        return m

    yield build
    for m in managers:
        m.close()


def submit(m: QueryManager, who: Principal, sql: str, params: list[Any] | None = None) -> str:
    status = m.submit(who, prepare(who, {"sql": sql, "params": params or []}))
    assert status.state in ("queued", "running")
    return str(status.id)


def error_of(status: QueryStatus) -> QueryError:
    """The error of a failed or cancelled query (narrowed for the type checker)."""
    assert status.error is not None, status
    return status.error


def wait_state(
    m: QueryManager, who: Principal, qid: str, states: tuple[str, ...], timeout: float = 30
) -> QueryStatus:
    return wait_until(
        lambda: (s := m.status(who, qid)).state in states and s, timeout, 0.02, f"query {qid} in {states}"
    )


def test_lifecycle_result_streamed_to_ipc_file(make: Any, db: Database) -> None:
    m = make()
    qid = submit(m, ALICE, "SELECT i, s FROM nums WHERE k = ? ORDER BY i", [3])
    status = wait_state(m, ALICE, qid, ("succeeded",))
    with db.reading() as cur:
        expected = cur.sql("SELECT i, s FROM nums WHERE k = 3 ORDER BY i").to_arrow_table()
    assert status.rows == expected.num_rows == 14286
    assert status.error is None and status.expires_at is not None
    path = m.dir / f"{qid}.arrows"
    assert status.bytes == path.stat().st_size > 0
    assert status.finished_at is not None and status.started_at is not None
    assert status.elapsed_seconds >= 0 and status.finished_at >= status.started_at

    schema, reader, rows = m.open_result(ALICE, qid)
    assert isinstance(reader, pa.RecordBatchReader) and rows == expected.num_rows
    table = reader.read_all()
    assert table.equals(expected) and schema.equals(expected.schema)
    info = m.result_info(ALICE, qid)
    assert (info.rows, info.bytes) == (rows, status.bytes)
    # The result can be read again until it expires.
    assert m.open_result(ALICE, qid)[1].read_all().num_rows == rows
    assert m.stats().retained == 1 and m.stats().result_bytes == status.bytes


def test_foreign_and_unknown_ids_look_the_same(make: Any) -> None:
    m = make()
    qid = submit(m, ALICE, "SELECT 42 AS answer")
    wait_state(m, ALICE, qid, ("succeeded",))
    errors = []
    for who, ident in ((BOB, qid), (ALICE, "q_doesnotexist")):
        for call in (m.status, m.cancel, m.open_result, m.result_info):
            with pytest.raises(NotFound) as err:
                call(who, ident)
            errors.append(err.value.detail.replace(ident, "<id>"))
    assert len(set(errors)) == 1 and "unknown or expired query id" in errors[0]
    # Bob's attempts changed nothing for Alice.
    assert m.status(ALICE, qid).state == "succeeded"
    assert m.open_result(ALICE, qid)[1].read_all().column(0).to_pylist() == [42]


def test_cancel_interrupts_a_running_query_and_others_keep_running(make: Any) -> None:
    m = make(workers=2)
    slow = submit(m, ALICE, SLOW_SQL)
    wait_state(m, ALICE, slow, ("running",))
    quick = submit(m, BOB, "SELECT count(*) AS n FROM nums")
    assert wait_state(m, BOB, quick, ("succeeded",)).rows == 1
    status = m.cancel(ALICE, slow)
    assert status.cancel_requested is True
    # Interrupted, not run to completion (which would take far longer than the wait allows).
    status = wait_state(m, ALICE, slow, ("cancelled",), timeout=10)
    assert error_of(status).code == "CANCELLED"
    with pytest.raises(Cancelled):
        m.open_result(ALICE, slow)
    assert not list(m.dir.glob(f"{slow}*")), "no partial file may remain"
    # Cancelling a finished query changes nothing.
    assert m.cancel(ALICE, slow).state == "cancelled"
    assert m.cancel(BOB, quick).state == "succeeded"


def test_timeout_interrupts_with_deadline_exceeded(make: Any) -> None:
    m = make(timeout_seconds=0.3)
    qid = submit(m, ALICE, SLOW_SQL)
    status = wait_state(m, ALICE, qid, ("failed",))
    assert error_of(status).code == "DEADLINE_EXCEEDED"
    assert "timeout_seconds" in error_of(status).detail
    with pytest.raises(DeadlineExceeded):
        m.result_info(ALICE, qid)


def test_per_principal_cap_and_queued_cancel(make: Any) -> None:
    m = make(workers=1, max_active_per_principal=2)
    first = submit(m, ALICE, SLOW_SQL)
    wait_state(m, ALICE, first, ("running",))
    second = submit(m, ALICE, "SELECT 1 AS one")
    assert m.status(ALICE, second).state == "queued"  # the only worker is busy
    with pytest.raises(ResourceExhausted) as err:
        submit(m, ALICE, "SELECT 2")
    assert "limit is 2" in err.value.detail
    # The cap is per principal: Bob can still queue.
    bob = submit(m, BOB, "SELECT 3 AS three")
    with pytest.raises(Unavailable) as still:
        m.open_result(ALICE, second)
    assert "query-status" in still.value.detail
    cancelled = m.cancel(ALICE, second)
    assert cancelled.state == "cancelled" and cancelled.started_at is None
    m.cancel(ALICE, first)
    wait_state(m, ALICE, first, ("cancelled",))
    assert wait_state(m, BOB, bob, ("succeeded",)).rows == 1
    # Slots are free again.
    again = submit(m, ALICE, "SELECT 4 AS four")
    assert wait_state(m, ALICE, again, ("succeeded",)).rows == 1


def test_runtime_error_is_the_querys_error(make: Any) -> None:
    m = make()
    qid = submit(m, ALICE, "SELECT CASE WHEN i > 90000 THEN error('boom at ' || i) END AS x FROM nums")
    status = wait_state(m, ALICE, qid, ("failed",))
    assert error_of(status).code == "INVALID_ARGUMENT" and "boom at" in error_of(status).detail
    with pytest.raises(InvalidArgument) as err:
        m.open_result(ALICE, qid)
    assert qid in err.value.detail and "boom at" in err.value.detail
    conversion = submit(m, ALICE, "SELECT s::INTEGER AS n FROM nums")
    status = wait_state(m, ALICE, conversion, ("failed",))
    assert error_of(status).code == "INVALID_ARGUMENT" and "Conversion Error" in error_of(status).detail


def test_result_too_large_fails_and_leaves_no_file(make: Any) -> None:
    m = make(max_result_bytes=100_000)
    qid = submit(m, ALICE, "SELECT * FROM nums")
    status = wait_state(m, ALICE, qid, ("failed",))
    assert error_of(status).code == "RESOURCE_EXHAUSTED" and "max_result_bytes" in error_of(status).detail
    assert not list(m.dir.iterdir())


def test_ttl_expiry_deletes_status_and_file(make: Any) -> None:
    clock = FakeClock()
    m = make(ttl_seconds=0.5, clock=clock)  # the sweeper passes every 0.2 s
    qid = submit(m, ALICE, "SELECT 1 AS one")
    status = wait_state(m, ALICE, qid, ("succeeded",))
    assert status.expires_at is not None
    assert datetime.fromisoformat(status.expires_at).timestamp() == clock.time() + 0.5
    path = m.dir / f"{qid}.arrows"
    clock.advance(0.25)
    assert m.sweep() == 0 and path.exists() and m.status(ALICE, qid).state == "succeeded"
    clock.advance(0.25)
    with pytest.raises(NotFound):  # expired at once, even before the sweeper passed
        m.status(ALICE, qid)
    wait_until(lambda: not path.exists(), 5, what="the sweeper to delete the result file")
    assert m.stats().retained == 0


def test_close_cancels_running_queries_and_removes_files(db: Database, tmp_path: Path) -> None:
    m = QueryManager(db, tmp_path / "r", ResultsConfig(workers=1))
    done = m.submit(ALICE, prepare(ALICE, {"sql": "SELECT 1 AS one"})).id
    wait_state(m, ALICE, done, ("succeeded",))
    running = m.submit(ALICE, prepare(ALICE, {"sql": SLOW_SQL})).id
    wait_state(m, ALICE, running, ("running",))
    m.submit(BOB, prepare(BOB, {"sql": "SELECT 2 AS two"}))
    closing = threading.Thread(target=m.close)
    closing.start()
    closing.join(10)  # close interrupts the running query rather than waiting for it
    assert not closing.is_alive(), "close() waited for the running query"
    assert not list((tmp_path / "r").iterdir())
    with pytest.raises(Exception, match="shutting down"):
        m.submit(ALICE, prepare(ALICE, {"sql": "SELECT 1"}))


def test_leftover_files_from_an_earlier_process_are_removed(db: Database, tmp_path: Path) -> None:
    d = tmp_path / "r"
    d.mkdir()
    (d / "q_old.arrows").write_bytes(b"stale")
    (d / "q_old.partial").write_bytes(b"stale")
    m = QueryManager(db, d, ResultsConfig())
    try:
        assert not list(d.iterdir())
    finally:
        m.close()


# --- through the Flight server ----------------------------------------------------------------


def _action(client: flight.FlightClient, token: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    results = list(client.do_action(flight.Action(name, json.dumps(body).encode()), call_options(token)))
    return json.loads(results[0].body.to_pybytes())


def _require_wiring(server: Server) -> flight.FlightClient:
    client = server.flight()
    names = {a.type for a in client.list_actions(call_options(server.admin_token))}
    if "submit-query" not in names:
        pytest.skip("the Flight server does not register submit-query yet (core wires QueryManager)")
    return client


BAD_BODIES: list[tuple[str, bytes, str]] = [
    ("submit-query", b"not json", "JSON object"),
    ("submit-query", b"[1, 2]", "JSON object"),
    ("submit-query", b"", "JSON object"),
    ("submit-query", b"null", "JSON object"),
    ("submit-query", b'{"sql": ""}', "'sql'"),
    ("submit-query", b'{"sql": 7}', "'sql'"),
    ("submit-query", b'{"sql": "SELECT 1", "max_row": 5}', "unknown field 'max_row'"),
    ("submit-query", b'{"kind": "sample", "table": "x"}', "takes a query"),
    ("submit-query", b'{"table": "x", "kind": "sample"}', "takes a query"),
    ("query-status", b"{}", '"id"'),
    ("query-status", b"", '"id"'),
    ("query-status", b'{"id": 7}', '"id"'),
    ("query-status", b'{"id": ""}', '"id"'),
    ("query-status", b'{"id": "q_x", "extra": 1, "more": 2}', "unexpected field(s): extra, more"),
    ("cancel-query", b'{"query": "q_x"}', "unexpected field"),
    ("cancel-query", b"\xff\xfe", "JSON object"),
    ("refresh-token", b'{"ttl": 60}', "unexpected field(s): ttl"),
    ("refresh-token", b'{"ttl_seconds": "soon"}', "'ttl_seconds'"),
    ("refresh-token", b"[]", "JSON object"),
]


def test_bad_action_bodies_change_nothing(server: Server) -> None:
    """Each action body the server decodes (one decoder, flight_server/commands.py) is refused
    with INVALID_ARGUMENT and a sentence naming what to send; nothing is queued or issued."""
    client = _require_wiring(server)
    agent = server.demo_token
    assert agent is not None and server.runtime.flight is not None
    queries = server.runtime.flight.queries
    before = queries.stats()
    with server.catalog.db.reading() as cur:
        tokens = cur.execute("SELECT count(*) FROM _quiver.tokens").fetchone()
    for name, body, needle in BAD_BODIES:
        with pytest.raises(flight.FlightServerError) as err:
            list(client.do_action(flight.Action(name, body), call_options(agent)))
        info = error_info(err.value)
        assert info["code"] == "INVALID_ARGUMENT", (name, body, info)
        assert needle in info["detail"], (name, body, info["detail"])
        assert len(info["detail"]) < 400
    with pytest.raises(flight.FlightServerError) as missing:
        list(client.do_action(flight.Action("query-status", b'{"id": "q_unknown"}'), call_options(agent)))
    assert error_info(missing.value)["code"] == "NOT_FOUND"
    assert queries.stats() == before
    with server.catalog.db.reading() as cur:
        assert cur.execute("SELECT count(*) FROM _quiver.tokens").fetchone() == tokens
    assert set(ACTION_DESCRIPTIONS) == {"submit-query", "query-status", "cancel-query"}


def test_submit_query_refuses_exactly_what_the_query_descriptor_refuses(server: Server) -> None:
    """submit-query runs the planner's query path (Planner.prepare → Planner.query): one bad
    query gets the same code and detail from both, and nothing is queued."""
    client = _require_wiring(server)
    agent = server.demo_token
    assert agent is not None and server.runtime.flight is not None
    before = server.runtime.flight.queries.stats()
    bad: list[dict[str, Any]] = [
        {"sql": "SELEC 1"},
        {"sql": "SELECT * FROM _quiver.tokens"},
        {"sql": "SELECT nope FROM demo.orders"},
        {"sql": "SELECT ? + 1", "params": ["x", "y"]},
        {"sql": "SELECT 1", "max_rows": 0},
        {"sql": "SELECT 1", "max_rows": 10**12},
        {"sql": " "},
    ]
    for body in bad:
        descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "query", **body}))
        with pytest.raises(flight.FlightError) as planned:
            client.get_flight_info(descriptor, call_options(agent))
        with pytest.raises(flight.FlightError) as submitted:
            _action(client, agent, "submit-query", body)
        assert error_info(submitted.value) == error_info(planned.value), body
        assert type(submitted.value) is type(planned.value)
    assert server.runtime.flight.queries.stats() == before


def test_flight_async_lifecycle_and_binding(server: Server) -> None:
    client = _require_wiring(server)
    agent, other = server.demo_token, server.mint(agent="async-other")
    assert agent is not None
    status = _action(
        client, agent, "submit-query", {"sql": "SELECT * FROM demo.orders WHERE quantity = ?", "params": [3]}
    )
    qid = status["id"]
    status = wait_until(
        lambda: (
            (s := _action(client, agent, "query-status", {"id": qid}))["state"]
            in ("succeeded", "failed", "cancelled")
            and s
        ),
        what="the async query to finish",
    )
    assert status["state"] == "succeeded", status
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "result", "id": qid}))
    info = client.get_flight_info(descriptor, call_options(agent))
    assert info.total_records == status["rows"]
    table = pa.concat_tables(client.do_get(e.ticket, call_options(agent)).read_all() for e in info.endpoints)
    assert table.num_rows == status["rows"] > 0
    assert set(table.column("quantity").to_pylist()) == {3}

    # Another principal: the id does not exist for them, on every path.
    for call in (
        lambda: _action(client, other, "query-status", {"id": qid}),
        lambda: _action(client, other, "cancel-query", {"id": qid}),
        lambda: client.get_flight_info(descriptor, call_options(other)),
    ):
        with pytest.raises(flight.FlightServerError) as err:
            call()
        assert error_info(err.value)["code"] == "NOT_FOUND"


def test_flight_async_refusals(server: Server) -> None:
    client = _require_wiring(server)
    agent = server.demo_token
    assert agent is not None
    with pytest.raises(flight.FlightUnauthorizedError) as denied:
        _action(client, agent, "submit-query", {"sql": "SELECT * FROM _quiver.tokens"})
    assert error_info(denied.value)["code"] == "PERMISSION_DENIED"
    with pytest.raises(flight.FlightServerError) as bad:
        _action(client, agent, "submit-query", {"sql": "SELEC 1"})
    assert error_info(bad.value)["code"] == "INVALID_ARGUMENT"
    status = _action(client, agent, "submit-query", {"sql": SLOW_SQL.replace("200000", "300000")})
    cancelled = _action(client, agent, "cancel-query", {"id": status["id"]})
    assert cancelled["state"] in ("cancelled", "running")
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "result", "id": status["id"]}))
    wait_until(
        lambda: _action(client, agent, "query-status", {"id": status["id"]})["state"] == "cancelled",
        10,
        what="the query to be cancelled",
    )
    with pytest.raises(flight.FlightCancelledError) as err:
        client.get_flight_info(descriptor, call_options(agent))
    assert error_info(err.value)["code"] == "CANCELLED"


def test_total_bytes_of_kept_results_is_bounded(make: Any) -> None:
    m = make(max_total_bytes=600_000)
    first = submit(m, ALICE, "SELECT * FROM nums WHERE i < 20000")
    size = wait_state(m, ALICE, first, ("succeeded",)).bytes
    assert 200_000 < size < 600_000
    second = submit(m, BOB, "SELECT * FROM nums")  # would take the total beyond the budget
    status = wait_state(m, BOB, second, ("failed",))
    assert error_of(status).code == "RESOURCE_EXHAUSTED" and "max_total_bytes" in error_of(status).detail
    # The failed one released its bytes: a small one still fits, and the first is intact.
    third = submit(m, BOB, "SELECT * FROM nums WHERE i < 100")
    assert wait_state(m, BOB, third, ("succeeded",)).rows == 100
    assert m.open_result(ALICE, first)[1].read_all().num_rows == 20000
    assert m.stats().result_bytes == size + m.status(BOB, third).bytes
