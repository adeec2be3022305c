"""Admins list the queries running now, of every principal (``GET /v1/queries?running=true``)
and cancel any of them (``DELETE /v1/queries/{id}``, audited): a real server, a long query
streamed or submitted by an agent in a thread, the admin's HTTP client racing it."""

from __future__ import annotations

import json
import threading
from typing import Any

import pyarrow.flight as flight
import pytest

from tests.harness import Server, call_options, error_info, wait_until

LONG_SQL = "SELECT sum(a.range * b.range) AS s FROM range(300000) a, range(300000) b"


def _running(server: Server) -> list[dict[str, Any]]:
    r = server.http().get("/v1/queries", params={"running": "true"})
    assert r.status_code == 200, r.text
    return list(r.json()["queries"])


def _one_running(server: Server, kind: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((q for q in _running(server) if q["kind"] == kind), None)

    return wait_until(found, what=f"a running {kind} listed")


def _stream_in_thread(server: Server, token: str) -> tuple[threading.Thread, list[BaseException]]:
    """Start the long query as a Flight client would (GetFlightInfo, then DoGet) in a thread;
    what it raised lands in the list."""
    client = server.flight()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            cmd = flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": LONG_SQL}))
            info = client.get_flight_info(cmd, call_options(token, timeout=120))
            client.do_get(info.endpoints[0].ticket, call_options(token, timeout=120)).read_all()
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _audited(server: Server, target: str) -> list[dict[str, Any]]:
    server.catalog.audit.flush()
    events = server.http().get("/v1/audit", params={"action": "query.cancel"}).json()["events"]
    return [e for e in events if e["target"] == target]


def test_an_admin_lists_and_cancels_a_running_stream(server: Server) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    token = server.mint("agent", "demo", "runner-1")
    thread, outcome = _stream_in_thread(server, token)
    entry = _one_running(server, "stream")
    assert entry["principal"] == "agent:demo/runner-1"
    assert entry["what"] == "query" and entry["via"] == "flight"
    assert "range(300000)" in entry["sql"] and entry["started_at"].endswith("+00:00")
    assert entry["id"].startswith("s_")
    assert flight_server.admission.streams() == 1

    r = server.http().delete(f"/v1/queries/{entry['id']}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": entry["id"], "stopped": True}
    thread.join(60)
    assert not thread.is_alive()
    (error,) = outcome
    assert isinstance(error, flight.FlightCancelledError), error
    assert error_info(error)["code"] == "CANCELLED"
    wait_until(lambda: flight_server.admission.streams() == 0, what="its admission slot free")
    assert all(q["id"] != entry["id"] for q in _running(server))
    (event,) = _audited(server, entry["id"])
    assert event["outcome"] == "ok" and event["actor"].startswith("admin")
    # The slot is free for real: the same agent's next query runs.
    opts = call_options(token)
    cmd = flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": "SELECT 1 AS x"}))
    info = server.flight().get_flight_info(cmd, opts)
    assert server.flight().do_get(info.endpoints[0].ticket, opts).read_all().num_rows == 1


def test_an_admin_cancels_an_async_query_the_same_way(server: Server) -> None:
    token = server.mint("agent", "demo", "runner-2")
    client = server.flight()
    body = json.dumps({"sql": LONG_SQL}).encode()
    (answer,) = client.do_action(flight.Action("submit-query", body), call_options(token))
    query_id = json.loads(answer.body.to_pybytes())["id"]
    entry = _one_running(server, "async")
    assert (
        entry["id"] == query_id and entry["principal"] == "agent:demo/runner-2" and entry["what"] == "query"
    )
    r = server.http().delete(f"/v1/queries/{query_id}")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == query_id

    def state() -> str:
        status_body = json.dumps({"id": query_id}).encode()
        (res,) = client.do_action(flight.Action("query-status", status_body), call_options(token))
        return str(json.loads(res.body.to_pybytes())["state"])

    wait_until(lambda: state() == "cancelled", what="the async query cancelled")
    assert all(q["id"] != query_id for q in _running(server))
    assert _audited(server, query_id)[0]["outcome"] == "ok"


def test_an_unknown_id_is_404_and_cancels_nothing(server: Server) -> None:
    flight_server = server.runtime.flight
    assert flight_server is not None
    token = server.mint("agent", "demo", "runner-3")
    thread, outcome = _stream_in_thread(server, token)
    entry = _one_running(server, "stream")
    for bad in ("s_nope", "q_nope", "x" * 5000):
        r = server.http().delete(f"/v1/queries/{bad}")
        assert r.status_code == 404, r.text
        body = r.json()
        assert body["error"] == "NOT_FOUND" and len(body["detail"]) < 400, body
    # Nothing changed: the stream still runs, listed as before.
    assert [q["id"] for q in _running(server) if q["kind"] == "stream"] == [entry["id"]]
    assert thread.is_alive() and not outcome
    assert _audited(server, "s_nope")[0]["outcome"] == "not_found"
    assert server.http().delete(f"/v1/queries/{entry['id']}").status_code == 200
    thread.join(60)
    assert isinstance(outcome[0], flight.FlightCancelledError)
    wait_until(lambda: flight_server.admission.streams() == 0, what="its admission slot free")


def test_concurrent_cancels_of_one_query_all_answer_cleanly(server: Server) -> None:
    """Admins racing the same DELETE: each answer is 200 or 404, never a 500; the stream ends."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    thread, outcome = _stream_in_thread(server, server.mint("agent", "demo", "runner-4"))
    entry = _one_running(server, "stream")
    codes: list[int] = []

    def cancel() -> None:
        codes.append(server.http().delete(f"/v1/queries/{entry['id']}").status_code)

    racers = [threading.Thread(target=cancel) for _ in range(6)]
    for t in racers:
        t.start()
    for t in racers:
        t.join(60)
    assert set(codes) <= {200, 404} and 200 in codes and len(codes) == 6, codes
    thread.join(60)
    assert isinstance(outcome[0], flight.FlightCancelledError)
    wait_until(lambda: flight_server.admission.streams() == 0, what="its admission slot free")


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/queries?running=true"), ("DELETE", "/v1/queries/s_x")]
)
def test_only_admins_list_and_cancel(server: Server, method: str, path: str) -> None:
    r = server.http(server.agent_token).request(method, path)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "PERMISSION_DENIED"
    assert server.http(None).request(method, path).status_code == 401


def test_running_takes_no_log_filter(server: Server) -> None:
    r = server.http().get("/v1/queries", params={"running": "true", "swarm": "demo"})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "INVALID_ARGUMENT" and "swarm" in r.json()["detail"]
    assert server.http().get("/v1/queries", params={"running": "false"}).json()["next_cursor"] is None or True
    spec = server.http().get("/schema/openapi.json").json()
    assert "delete" in spec["paths"]["/v1/queries/{query_id}"]
    assert "RunningQueryInfo" in spec["components"]["schemas"]


def test_an_admin_cancels_a_post_v1_query_run(server: Server) -> None:
    """``POST /v1/query`` runs through the data plane's query port: listed as a ``run`` and
    cancelled like a stream; the agent gets CANCELLED, never a 500."""
    flight_server = server.runtime.flight
    assert flight_server is not None
    token = server.mint("agent", "demo", "runner-5")
    answers: list[Any] = []

    def run() -> None:
        answers.append(server.http(token).post("/v1/query", json={"sql": LONG_SQL}, timeout=120))

    thread = threading.Thread(target=run)
    thread.start()
    entry = _one_running(server, "run")
    assert entry["id"].startswith("h_") and entry["via"] == "http"
    assert entry["principal"] == "agent:demo/runner-5" and "range(300000)" in entry["sql"]
    r = server.http().delete(f"/v1/queries/{entry['id']}")
    assert r.status_code == 200, r.text
    assert r.json() == {"id": entry["id"], "stopped": True}
    thread.join(60)
    (answer,) = answers
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "CANCELLED"
    assert all(q["id"] != entry["id"] for q in _running(server))
    wait_until(lambda: flight_server.admission.streams() == 0, what="its admission slot free")
    ok = server.http(token).post("/v1/query", json={"sql": "SELECT 1 AS x"})
    assert ok.status_code == 200, ok.text
