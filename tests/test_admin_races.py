"""Concurrent admin writes against the real control plane: threads race the HTTP endpoints,
then the committed state, the in-memory policy and the behaviour after a restart must agree.

Every round starts its threads on a barrier so the requests really overlap.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pyarrow.flight as flight
import pytest

from catalog import Unauthenticated
from tests.harness import Server, call_options, start_server

THREADS = 6


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(0..n-1)`` on n threads released together."""
    barrier = threading.Barrier(n)

    def go(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def _client(server: Server, token: str | None = "admin") -> httpx.Client:
    return server.http(token)


def _db_allowlist(server: Server, swarm: str) -> list[str]:
    with server.catalog.db.reading() as cur:
        rows = cur.execute(
            "SELECT pattern FROM _quiver.allowlist WHERE swarm = ? ORDER BY pattern", [swarm]
        ).fetchall()
    return [r[0] for r in rows]


def _flight_tables(server: Server, token: str) -> list[str]:
    client = server.flight()
    (result,) = list(client.do_action(flight.Action("whoami", b""), call_options(token)))
    return list(json.loads(result.body.to_pybytes())["tables"])


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[list[Server]]:
    """A list holding the current server; a test may replace it with a restarted one."""
    servers = [start_server(tmp_path / "data")]
    yield servers
    servers[-1].stop()


def _restart(servers: list[Server]) -> Server:
    servers[-1].stop()
    servers.append(start_server(servers[-1].data_dir))
    return servers[-1]


# --- defect 3: parallel allowlist PUTs ------------------------------------------------------
LISTS = [
    ["demo.orders"],
    ["demo.customers"],
    ["demo.events"],
    ["demo.orders", "demo.customers"],
    ["demo.customers", "demo.events"],
    ["demo.*"],
]


def test_parallel_allowlist_puts_commit_exactly_one_list(restartable: list[Server]) -> None:
    server = restartable[0]
    http = _client(server)
    assert http.post("/v1/swarms", json={"name": "race3", "tables": []}).status_code == 201
    agent = server.mint("agent", swarm="race3", agent="reader")
    clients = [_client(server) for _ in range(THREADS)]
    for _round in range(5):
        statuses = _race(
            THREADS,
            lambda i: clients[i].put("/v1/swarms/race3/allowlist", json={"tables": LISTS[i]}).status_code,
        )
        assert all(s in (200, 409) for s in statuses), statuses
        assert 200 in statuses
        committed = _db_allowlist(server, "race3")
        assert committed in [sorted(x) for x in LISTS], committed  # one body, never a union
        assert list(server.catalog.policy.allowlist("race3")) == committed
        assert http.get("/v1/swarms/race3/allowlist").json()["tables"] == committed
        assert http.get("/v1/swarms/race3").json()["tables"] == committed

    # nothing else changed: the other swarm and its agent are as they were
    assert http.get("/v1/swarms/demo").json()["tables"] == ["demo.*"]
    assert _flight_tables(server, server.demo_token or "") == ["demo.customers", "demo.events", "demo.orders"]
    committed = _db_allowlist(server, "race3")
    readable = _flight_tables(server, agent)
    server = _restart(restartable)
    assert _db_allowlist(server, "race3") == committed
    assert list(server.catalog.policy.allowlist("race3")) == committed
    assert _flight_tables(server, agent) == readable


def test_allowlist_pairs_are_unique_in_the_database(server: Server) -> None:
    import duckdb

    http = _client(server)
    assert http.post("/v1/swarms", json={"name": "uniq3", "tables": ["demo.orders"]}).status_code == 201
    with server.catalog.db.reading() as cur, pytest.raises(duckdb.ConstraintException):
        cur.execute("INSERT INTO _quiver.allowlist (swarm, pattern) VALUES ('uniq3', 'demo.orders')")
    assert _db_allowlist(server, "uniq3") == ["demo.orders"]


# --- defect 7 (admin part): parallel creates and revokes ------------------------------------
def test_parallel_creates_of_one_swarm_answer_one_201_and_409s(server: Server) -> None:
    clients = [_client(server) for _ in range(THREADS)]
    for n in range(3):
        name = f"dup{n}"

        def create(i: int, name: str = name) -> httpx.Response:
            return clients[i].post("/v1/swarms", json={"name": name, "tables": [LISTS[i][0]]})

        responses = _race(THREADS, create)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] + [409] * (THREADS - 1), [r.text for r in responses]
        for r in responses:
            if r.status_code == 409:
                assert r.json()["error"] == "ALREADY_EXISTS" and name in r.json()["detail"]
        winner = next(r.json() for r in responses if r.status_code == 201)
        assert _db_allowlist(server, name) == winner["tables"]
        assert list(server.catalog.policy.allowlist(name)) == winner["tables"]


def test_parallel_revokes_of_one_jti_are_idempotent(server: Server) -> None:
    clients = [_client(server) for _ in range(THREADS)]
    for n in range(3):
        token = server.mint("agent", agent=f"revoked-{n}")
        jti = server.catalog.tokens.verify(token).jti

        def revoke(i: int, jti: str = jti) -> httpx.Response:
            return clients[i].delete(f"/v1/tokens/{jti}")

        responses = _race(THREADS, revoke)
        assert [r.status_code for r in responses] == [200] * THREADS, [r.text for r in responses]
        assert len({r.json()["revoked_at"] for r in responses}) == 1
        assert server.http(token).get("/v1/whoami").status_code == 401


def test_revokes_race_last_used_flushes(server: Server) -> None:
    """The housekeeping flush updates the same token rows a revoke does: both serialize."""
    tokens = [server.mint("agent", agent=f"busy-{n}") for n in range(THREADS)]
    jtis = [server.catalog.tokens.verify(t).jti for t in tokens]
    admin = _client(server)
    errors: list[str] = []
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            for t in tokens:
                with contextlib.suppress(Unauthenticated):  # revoked meanwhile
                    server.catalog.tokens.verify(t)
            try:
                server.catalog.tokens.flush_last_used()
            except Exception as e:  # the assertion below reports it
                errors.append(repr(e))

    threads = [threading.Thread(target=flusher) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for jti in jtis:
            r = admin.delete(f"/v1/tokens/{jti}")
            assert r.status_code == 200, r.text
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


# --- defect 4: mints racing a swarm's deletion ----------------------------------------------
def test_tokens_minted_while_their_swarm_is_deleted_never_work(restartable: list[Server]) -> None:
    server = restartable[0]
    admin = _client(server)
    minters = [_client(server) for _ in range(8)]
    survivors: list[tuple[str, str]] = []  # (swarm, token) answered 201
    for n in range(6):
        name = f"doomed{n}"
        assert admin.post("/v1/swarms", json={"name": name, "tables": ["demo.orders"]}).status_code == 201
        swarm_token = server.mint("swarm", swarm=name, agent=None, ttl_seconds=600)
        as_swarm = [_client(server, swarm_token) for _ in range(4)]

        def act(i: int, name: str = name, as_swarm: list[httpx.Client] = as_swarm) -> httpx.Response:
            if i == 0:
                return admin.delete(f"/v1/swarms/{name}")
            if i % 2:
                body = {"kind": "agent", "swarm": name, "agent": f"a{i}", "ttl_seconds": 600}
                return minters[i].post("/v1/tokens", json=body)
            return as_swarm[i % 4].post("/v1/tokens", json={"kind": "agent", "agent": f"s{i}"})

        responses = _race(9, act)
        assert responses[0].status_code == 204, responses[0].text
        for r in responses[1:]:
            assert r.status_code in (201, 401, 404), r.text
            if r.status_code == 201:
                survivors.append((name, r.json()["token"]))
        survivors.append((name, swarm_token))
        # the same name again, with other tables: a new swarm, not the old one come back
        assert admin.post("/v1/swarms", json={"name": name, "tables": ["demo.*"]}).status_code == 201

    def refused(srv: Server) -> None:
        for _name, token in survivors:
            r = srv.http(token).get("/v1/whoami")
            assert r.status_code == 401, r.text
            r = srv.http(token).post("/v1/tokens/refresh", json={"ttl_seconds": 60})
            assert r.status_code == 401, r.text
            with pytest.raises(flight.FlightUnauthenticatedError):
                _flight_tables(srv, token)

    refused(server)
    refused(_restart(restartable))


def test_mixed_admin_writes_on_one_swarm_never_fail_and_leave_one_truth(restartable: list[Server]) -> None:  # noqa: C901  one scenario: each thread cycles through six writes
    """Creates, deletes, allowlist PUTs, mints, refreshes and bulk revocations of one swarm
    at once: only documented answers, and afterwards the database, the in-memory policy, GET
    and the data plane agree; no token of a deleted instance works."""
    server = restartable[0]
    clients = [_client(server) for _ in range(8)]
    tokens: list[str] = []
    lock = threading.Lock()

    def act(i: int) -> list[int]:
        http = clients[i]
        statuses = []
        for n in range(6):
            op = (i + n) % 6
            if op == 0:
                r = http.post("/v1/swarms", json={"name": "chaos", "tables": LISTS[n % len(LISTS)]})
            elif op == 1:
                r = http.delete("/v1/swarms/chaos")
            elif op == 2:
                r = http.put("/v1/swarms/chaos/allowlist", json={"tables": LISTS[(i + n) % len(LISTS)]})
            elif op == 3:
                r = http.post("/v1/tokens", json={"kind": "agent", "swarm": "chaos", "agent": f"c{i}"})
                if r.status_code == 201:
                    with lock:
                        tokens.append(r.json()["token"])
            elif op == 4:
                r = http.post("/v1/tokens/revoke", json={"swarm": "chaos"})
            else:
                with lock:
                    mine = tokens[-1] if tokens else None
                if mine is None:
                    continue
                r = server.http(mine).post("/v1/tokens/refresh", json={"ttl_seconds": 60})
                if r.status_code == 201:
                    with lock:
                        tokens.append(r.json()["token"])
            assert r.status_code < 500, r.text
            if r.status_code >= 400:
                assert set(r.json()) == {"error", "detail"} and r.json()["detail"], r.text
            statuses.append(r.status_code)
        return statuses

    answered = [s for batch in _race(8, act) for s in batch]
    assert set(answered) <= {200, 201, 204, 401, 404, 409}, answered

    def consistent(srv: Server) -> None:
        admin = _client(srv)
        r = admin.get("/v1/swarms/chaos")
        instance = srv.catalog.swarms.instance("chaos")
        if r.status_code == 404:
            assert instance is None and list(srv.catalog.policy.allowlist("chaos")) == []
            assert _db_allowlist(srv, "chaos") == []
        else:
            assert instance is not None
            assert (
                r.json()["tables"]
                == _db_allowlist(srv, "chaos")
                == list(srv.catalog.policy.allowlist("chaos"))
            )
        for token in tokens:
            principal = None
            with contextlib.suppress(Unauthenticated):
                principal = srv.catalog.tokens.check(token)
            if principal is not None:  # only tokens of the instance that exists now work
                assert principal.swarm_id == instance
                assert _flight_tables(srv, token) == sorted(
                    t
                    for t in ("demo.customers", "demo.events", "demo.orders")
                    if any(p in (t, "demo.*") for p in _db_allowlist(srv, "chaos"))
                )

    consistent(server)
    consistent(_restart(restartable))


def test_a_write_that_keeps_conflicting_answers_409_aborted_and_changes_nothing(server: Server) -> None:
    """A writer outside the admin-write lock (here: an open transaction on the same row, as
    a future writer or an operator's session could hold) makes every retry conflict."""
    token = server.mint("agent", agent="contended", ttl_seconds=600)
    jti = server.catalog.tokens.check(token).jti
    outside = server.catalog.db.cursor()
    try:
        outside.execute("BEGIN")
        outside.execute("UPDATE _quiver.tokens SET revoked_at = now() WHERE jti = ?", [jti])  # rolled back
        r = server.http().delete(f"/v1/tokens/{jti}")
        assert r.status_code == 409, r.text
        assert r.json()["error"] == "ABORTED" and "retry" in r.json()["detail"]
        assert server.http(token).get("/v1/whoami").status_code == 200  # not revoked in memory
    finally:
        outside.execute("ROLLBACK")
        outside.close()
    assert server.catalog.tokens.get(jti).revoked_at is None  # nor in the database
    assert server.http().delete(f"/v1/tokens/{jti}").status_code == 200
    assert server.http(token).get("/v1/whoami").status_code == 401
