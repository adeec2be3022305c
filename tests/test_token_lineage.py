"""Token chains: a refresh rotates a credential within what an admin granted, revoking any
token of a chain revokes the chain (on both listeners, and after a restart), and an admin
revokes every token of one agent or one swarm in one call."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import jwt
import pyarrow.flight as flight
import pytest

from catalog.database import Database
from catalog.keys import SigningKey
from tests.harness import Server, call_options, start_server
from tests.state import snapshot
from tests.test_admin_races import _restart, restartable  # noqa: F401 - the fixture

MAX_TTL = 30 * 24 * 3600


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _refresh(server: Server, token: str, ttl: int | None = None) -> dict[str, Any]:
    body = {"ttl_seconds": ttl} if ttl is not None else None
    r = server.http(token).post("/v1/tokens/refresh", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def _flight_refresh(server: Server, token: str, ttl: int) -> dict[str, Any]:
    action = flight.Action("refresh-token", json.dumps({"ttl_seconds": ttl}).encode())
    (result,) = list(server.flight().do_action(action, call_options(token)))
    return json.loads(result.body.to_pybytes())


def _works(server: Server, token: str) -> bool:
    """Whether the token is accepted on both listeners (and they agree)."""
    http_ok = server.http(token).get("/v1/whoami").status_code == 200
    try:
        list(server.flight().do_action(flight.Action("whoami", b""), call_options(token)))
        flight_ok = True
    except flight.FlightUnauthenticatedError:
        flight_ok = False
    assert http_ok == flight_ok
    return http_ok


def _jti(token: str) -> str:
    return str(_claims(token)["jti"])


def _exp(issued: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(issued["expires_at"])


def test_refresh_never_outlives_the_grant_it_descends_from(server: Server) -> None:
    r = server.http().post(
        "/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "rot", "ttl_seconds": 600}
    )
    root = r.json()
    granted = _exp(root)
    assert _claims(root["token"])["root"] == root["jti"]
    token = root["token"]
    steps = [
        lambda t: _refresh(server, t, MAX_TTL),
        lambda t: _refresh(server, t),  # the default TTL (a day) is more than was granted too
        lambda t: _flight_refresh(server, t, MAX_TTL),
        lambda t: _refresh(server, t, MAX_TTL),
    ]
    for step in steps:
        fresh = step(token)
        assert _exp(fresh) <= granted, (fresh["expires_at"], granted)
        assert _claims(fresh["token"])["root"] == root["jti"]
        assert fresh["jti"] != _jti(token)
        token = fresh["token"]
    # a shorter TTL still shortens: refresh rotates, it may also narrow
    short = _refresh(server, token, 60)
    assert _exp(short) <= datetime.now(UTC) + timedelta(seconds=61)
    listed = {t["jti"]: t for t in server.http().get("/v1/tokens", params={"swarm": "demo"}).json()["tokens"]}
    assert listed[short["jti"]]["root_jti"] == root["jti"]


def test_revoking_any_token_of_a_chain_revokes_the_chain(restartable: list[Server]) -> None:  # noqa: F811
    server = restartable[0]
    admin = server.http()
    first = server.mint("agent", agent="chained", ttl_seconds=600)
    second = _refresh(server, first)["token"]
    third = _refresh(server, second)["token"]
    other = server.mint("agent", agent="chained", ttl_seconds=600)  # another chain, same agent
    assert all(_works(server, t) for t in (first, second, third, other))

    r = admin.delete(f"/v1/tokens/{_jti(second)}")  # the middle of the chain
    assert r.status_code == 200 and not r.json()["active"]
    assert not any(_works(server, t) for t in (first, second, third))
    assert _works(server, other)
    r = server.http(third).post("/v1/tokens/refresh", json={})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    rows = {t.jti: t for t in server.catalog.tokens.list(include_inactive=True, limit=10_000)}
    assert all(rows[_jti(t)].revoked_at is not None for t in (first, second, third))
    assert rows[_jti(other)].revoked_at is None

    server = _restart(restartable)
    assert not any(_works(server, t) for t in (first, second, third))
    assert _works(server, other)


def test_a_swarm_tokens_chain_takes_its_agents_with_it(server: Server) -> None:
    admin = server.http()
    swarm = server.mint("swarm", swarm="demo", agent=None, ttl_seconds=600)
    granted = server.catalog.tokens.check(swarm).expires_at
    rotated = _refresh(server, swarm, MAX_TTL)
    assert _exp(rotated) <= granted
    r = server.http(rotated["token"]).post(
        "/v1/tokens", json={"kind": "agent", "agent": "kid", "ttl_seconds": MAX_TTL}
    )
    assert r.status_code == 201, r.text
    kid = r.json()
    assert _exp(kid) <= granted
    assert _claims(kid["token"])["grant"] == _jti(swarm)
    kid_rotated = _refresh(server, kid["token"], MAX_TTL)
    assert _exp(kid_rotated) <= _exp(kid)
    # revoking a kid's chain leaves the swarm token alone
    sibling = server.http(rotated["token"]).post("/v1/tokens", json={"kind": "agent", "agent": "sib"}).json()
    assert admin.delete(f"/v1/tokens/{sibling['jti']}").status_code == 200
    assert not _works(server, sibling["token"]) and _works(server, rotated["token"])

    # revoking the original swarm token: the rotated one, and every agent either minted, die
    assert admin.delete(f"/v1/tokens/{_jti(swarm)}").status_code == 200
    for t in (swarm, rotated["token"], kid["token"], kid_rotated["token"]):
        assert not _works(server, t)
    r = server.http(rotated["token"]).post("/v1/tokens", json={"kind": "agent", "agent": "late"})
    assert r.status_code == 401


def test_refreshes_racing_a_revocation_never_escape_it(server: Server) -> None:
    root = server.mint("agent", agent="racer", ttl_seconds=600)
    tokens = [root] + [_refresh(server, root)["token"] for _ in range(5)]
    clients = [server.http(t) for t in tokens]
    admin = server.http()
    barrier = threading.Barrier(len(tokens) + 1)
    obtained: list[str] = []

    def refresh(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            r = clients[i].post("/v1/tokens/refresh", json={"ttl_seconds": 600})
            if r.status_code != 201:
                assert r.status_code == 401, r.text
                return
            obtained.append(r.json()["token"])

    def revoke() -> int:
        barrier.wait()
        return admin.delete(f"/v1/tokens/{_jti(tokens[3])}").status_code

    with ThreadPoolExecutor(len(tokens) + 1) as pool:
        futures = [pool.submit(refresh, i) for i in range(len(tokens))]
        status = pool.submit(revoke).result()
        for f in futures:
            f.result()
    assert status == 200
    assert not any(_works(server, t) for t in tokens + obtained)


def test_revoke_every_token_of_one_agent(server: Server) -> None:
    admin = server.http()
    a1 = server.mint("agent", agent="bulk", ttl_seconds=600)
    a2 = _refresh(server, a1)["token"]
    a3 = server.mint("agent", agent="bulk", ttl_seconds=600)
    bystander = server.mint("agent", agent="bystander", ttl_seconds=600)
    r = admin.post("/v1/tokens/revoke", json={"swarm": "demo", "agent": "bulk"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["swarm"] == "demo" and body["agent"] == "bulk" and body["revoked"] == 3
    assert sorted(body["jtis"]) == sorted(_jti(t) for t in (a1, a2, a3))
    assert not any(_works(server, t) for t in (a1, a2, a3))
    assert _works(server, bystander) and _works(server, server.demo_token or "")
    again = admin.post("/v1/tokens/revoke", json={"swarm": "demo", "agent": "bulk"}).json()
    assert again["revoked"] == 0 and again["jtis"] == []


def test_revoke_every_token_of_one_swarm(server: Server) -> None:
    admin = server.http()
    assert admin.post("/v1/swarms", json={"name": "bulkswarm", "tables": ["demo.orders"]}).status_code == 201
    swarm = server.mint("swarm", swarm="bulkswarm", agent=None, ttl_seconds=600)
    kid = server.http(swarm).post("/v1/tokens", json={"kind": "agent", "agent": "k"}).json()["token"]
    agent = server.mint("agent", swarm="bulkswarm", agent="direct", ttl_seconds=600)
    r = admin.post("/v1/tokens/revoke", json={"swarm": "bulkswarm"})
    assert r.status_code == 200 and r.json()["revoked"] == 3 and r.json()["agent"] is None
    assert not any(_works(server, t) for t in (swarm, kid, agent))
    assert _works(server, server.demo_token or "")
    # the swarm itself stays, and new tokens for it work
    assert admin.get("/v1/swarms/bulkswarm").json()["tables"] == ["demo.orders"]
    assert _works(server, server.mint("agent", swarm="bulkswarm", agent="after"))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"swarm": "nosuchswarm"}, 404, "NOT_FOUND"),
        ({"swarm": "demo", "agent": "nobody-here"}, 404, "NOT_FOUND"),
        ({"swarm": "Not A Name" * 100}, 400, "INVALID_ARGUMENT"),
        ({"swarm": "demo", "agent": "bad agent/name"}, 400, "INVALID_ARGUMENT"),
        ({"swarm": "demo", "agnet": "typo"}, 400, "INVALID_ARGUMENT"),
        ({"agent": "demo-agent"}, 400, "INVALID_ARGUMENT"),
        ({"swarm": 7}, 400, "INVALID_ARGUMENT"),
    ],
)
def test_revoke_all_refusals_change_nothing(
    server: Server, body: dict[str, Any], status: int, code: str
) -> None:
    before = snapshot(server)
    r = server.http().post("/v1/tokens/revoke", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and len(r.json()["detail"]) < 600
    assert snapshot(server) == before


def test_revoke_all_needs_an_admin(server: Server) -> None:
    swarm = server.mint("swarm", swarm="demo", agent=None, ttl_seconds=600)
    before = snapshot(server)
    for token in (swarm, server.demo_token):
        r = server.http(token).post("/v1/tokens/revoke", json={"swarm": "demo"})
        assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    r = server.http(None).post("/v1/tokens/revoke", json={"swarm": "demo"})
    assert r.status_code == 401
    assert snapshot(server) == before


# --- upgrading a catalog that predates lineage (migration 0004) -----------------------------
def _legacy_token(
    key: SigningKey, jti: str, kind: str, swarm: str | None, agent: str | None, exp: datetime
) -> str:
    now = int(datetime.now(UTC).timestamp())
    sub = {"admin": "admin", "swarm": f"swarm:{swarm}", "agent": f"agent:{swarm}/{agent}"}[kind]
    claims = {
        "iss": "quiver",
        "sub": sub,
        "jti": jti,
        "iat": now,
        "exp": int(exp.timestamp()),
        "kind": kind,
        "swarm": swarm,
        "agent": agent,
    }
    return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})


def test_upgrade_dedupes_allowlists_and_keeps_only_the_right_legacy_tokens(tmp_path: Path) -> None:
    from catalog import migrations as mig

    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    key = SigningKey.load_or_create(data / "keys" / "signing.pem")
    db_path = data / "quiver.duckdb"
    con = duckdb.connect(str(db_path))
    con.execute("CREATE SCHEMA _quiver")
    con.execute(
        "CREATE TABLE _quiver.schema_migrations (version INTEGER NOT NULL PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    from importlib import resources

    for version, name in ((1, "0001_foundation"), (3, "0003_sync")):
        con.execute(resources.files(mig).joinpath(f"{name}.sql").read_text())
        con.execute("INSERT INTO _quiver.schema_migrations (version, name) VALUES (?, ?)", [version, name])
    now = datetime.now(UTC)
    exp = now + timedelta(hours=1)
    old = now - timedelta(hours=2)
    con.execute("INSERT INTO _quiver.swarms VALUES ('keep', '', ?)", [now - timedelta(hours=1)])
    con.executemany(
        "INSERT INTO _quiver.allowlist VALUES (?, ?)",
        [["keep", "demo.orders"], ["keep", "demo.orders"], ["keep", "demo.events"], ["gone", "demo.*"]],
    )
    tokens = {
        "good": ("agent", "keep", "a", now - timedelta(minutes=5)),
        "gone": ("agent", "gone", "a", now - timedelta(minutes=5)),  # its swarm was deleted
        "earlier": ("agent", "keep", "b", old),  # minted for an earlier swarm 'keep'
        "admin": ("admin", None, None, now - timedelta(minutes=5)),
    }
    for jti, (kind, swarm, agent, created) in tokens.items():
        con.execute(
            "INSERT INTO _quiver.tokens VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, 'cli', NULL)",
            [jti, kind, swarm, agent, created, exp],
        )
    con.close()
    assert db_path.name == "quiver.duckdb"

    server = start_server(data)
    try:
        assert server.catalog.db.path == db_path
        assert server.http().get("/v1/swarms/keep/allowlist").json()["tables"] == [
            "demo.events",
            "demo.orders",
        ]
        with server.catalog.db.reading() as cur:
            assert cur.execute("SELECT count(*) FROM _quiver.allowlist WHERE swarm = 'gone'").fetchone() == (
                0,
            )
        legacy = {j: _legacy_token(key, j, k, s, a, exp) for j, (k, s, a, _) in tokens.items()}
        assert _works(server, legacy["good"]) and _works(server, legacy["admin"])
        assert not _works(server, legacy["gone"]) and not _works(server, legacy["earlier"])
        # a legacy token rotates into a chain of its own, bounded by its own expiry
        fresh = _refresh(server, legacy["good"], MAX_TTL)
        assert _exp(fresh) <= exp and _claims(fresh["token"])["root"] == "good"
        assert server.http().delete("/v1/tokens/good").status_code == 200
        assert not _works(server, fresh["token"]) and not _works(server, legacy["good"])
    finally:
        server.stop()
    # the migrated file opens again (nothing applied twice)
    Database(db_path, temp_dir=tmp_path / "tmp", lockdown=False).close()


def test_revoking_an_unknown_jti_is_404_with_a_bounded_echo(server: Server) -> None:
    before = snapshot(server)
    r = server.http().delete("/v1/tokens/" + "f" * 5000)
    assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND"
    assert len(r.json()["detail"]) < 300
    assert snapshot(server) == before
