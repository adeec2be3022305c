"""Token lifecycle across both listeners, and every way a token can be wrong."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import jwt
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.harness import FakeClock, Server, call_options, error_info
from tests.state import snapshot


def _flight_whoami(server: Server, token: str | None) -> dict[str, Any]:
    results = list(server.flight().do_action(flight.Action("whoami", b""), call_options(token)))
    return json.loads(results[0].body.to_pybytes())


def _flight_refused(server: Server, token: str | None) -> dict[str, Any]:
    with pytest.raises(flight.FlightUnauthenticatedError) as ei:
        list(server.flight().list_flights(options=call_options(token)))
    info = error_info(ei.value)
    assert info["code"] == "UNAUTHENTICATED"
    assert "Traceback" not in str(ei.value)
    return info


def _http_refused(server: Server, token: str | None) -> str:
    r = server.http(token).get("/v1/whoami")
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "UNAUTHENTICATED"
    assert r.headers["www-authenticate"] == "Bearer"
    return str(r.json()["detail"])


def test_lifecycle_across_both_listeners(server: Server) -> None:
    http = server.http()
    r = http.post(
        "/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "lifecycle", "ttl_seconds": 600}
    )
    assert r.status_code == 201
    issued = r.json()
    token, jti = issued["token"], issued["jti"]
    assert issued["kind"] == "agent" and issued["swarm"] == "demo" and issued["agent"] == "lifecycle"

    who = _flight_whoami(server, token)
    assert who["kind"] == "agent" and who["swarm"] == "demo" and who["agent"] == "lifecycle"
    assert who["jti"] == jti
    assert who["tables"] == ["demo.customers", "demo.events", "demo.orders"]
    assert server.http(token).get("/v1/whoami").json()["jti"] == jti

    listed = {t["jti"]: t for t in http.get("/v1/tokens").json()["tokens"]}
    assert listed[jti]["active"] and "token" not in listed[jti]

    # the token itself is never stored
    with server.catalog.db.reading() as cur:
        dump = str(cur.execute("SELECT * FROM _quiver.tokens").fetchall())
    assert token not in dump and token.split(".")[2] not in dump

    r = http.delete(f"/v1/tokens/{jti}")
    assert r.status_code == 200 and r.json()["revoked_at"] and not r.json()["active"]
    assert "revoked" in _flight_refused(server, token)["detail"]
    assert "revoked" in _http_refused(server, token)
    assert jti not in {t["jti"] for t in http.get("/v1/tokens").json()["tokens"]}
    assert jti in {
        t["jti"] for t in http.get("/v1/tokens", params={"include_inactive": True}).json()["tokens"]
    }


def test_last_used_is_recorded_in_batches(server: Server) -> None:
    token = server.mint("agent", agent="lastused")
    jti = _flight_whoami(server, token)["jti"]
    server.catalog.maintain()  # what the housekeeping thread does on its timer
    listed = {t["jti"]: t for t in server.http().get("/v1/tokens").json()["tokens"]}
    assert listed[jti]["last_used_at"] is not None


def test_refused_requests_do_not_mark_a_token_used(server: Server) -> None:
    """last_used_at records requests a token was allowed to make: a token that fails
    verification, a revoked token and a token refused by an admin-only route leave it alone."""
    tokens = server.catalog.tokens
    swarm_token = server.mint("swarm", swarm="demo", agent=None, ttl_seconds=600)
    swarm_jti = jwt.decode(swarm_token, options={"verify_signature": False})["jti"]
    as_swarm = server.http(swarm_token)
    for route in ("/v1/swarms", "/v1/tokens", "/v1/status", "/v1/audit"):
        assert as_swarm.get(route).status_code == 403
    assert as_swarm.put("/v1/swarms/demo/allowlist", json={"tables": []}).status_code == 403
    assert as_swarm.post("/v1/tokens/revoke", json={"swarm": "demo"}).status_code == 403
    server.catalog.maintain()
    assert tokens.get(swarm_jti).last_used_at is None

    agent = server.mint("agent", agent="unused-after-revoke", ttl_seconds=600)
    agent_jti = jwt.decode(agent, options={"verify_signature": False})["jti"]
    assert server.http().delete(f"/v1/tokens/{agent_jti}").status_code == 200
    assert server.http(agent).get("/v1/whoami").status_code == 401
    _flight_refused(server, agent)
    tampered = agent[:-4] + ("AAAA" if not agent.endswith("AAAA") else "BBBB")
    _http_refused(server, tampered)
    server.catalog.maintain()
    assert tokens.get(agent_jti).last_used_at is None

    # an accepted request does count, on either listener
    assert as_swarm.get("/v1/whoami").status_code == 200
    server.catalog.maintain()
    assert tokens.get(swarm_jti).last_used_at is not None


def test_swarm_token_mints_agents_for_its_own_swarm_only(server: Server) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "other", "tables": ["demo.orders"]}).status_code == 201
    swarm_token = server.mint("swarm", swarm="demo", agent=None, ttl_seconds=120)
    as_swarm = server.http(swarm_token)
    r = as_swarm.post("/v1/tokens", json={"kind": "agent", "agent": "child", "ttl_seconds": 3600})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["swarm"] == "demo"
    # clamped to the swarm token's own expiry
    swarm_exp = server.catalog.tokens.verify(swarm_token).expires_at
    assert datetime.fromisoformat(child["expires_at"]) <= swarm_exp

    before = snapshot(server)
    r = as_swarm.post("/v1/tokens", json={"kind": "agent", "swarm": "other", "agent": "spy"})
    assert (
        r.status_code == 403
        and r.json()["error"] == "PERMISSION_DENIED"
        and "own swarm" in r.json()["detail"]
    )
    r = as_swarm.post("/v1/tokens", json={"kind": "swarm", "swarm": "demo"})
    assert r.status_code == 403 and "only agent tokens" in r.json()["detail"]
    r = as_swarm.post("/v1/tokens", json={"kind": "admin"})
    assert r.status_code == 403
    agent = server.http(child["token"])
    r = agent.post("/v1/tokens", json={"kind": "agent", "swarm": "other", "agent": "spy"})
    assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED"
    r = agent.post("/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "sibling"})
    assert r.status_code == 403
    for route in ("/v1/swarms", "/v1/tokens", "/v1/tables", "/v1/status", "/v1/audit", "/metrics"):
        r = as_swarm.get(route)
        assert r.status_code == 403 and r.json()["error"] == "PERMISSION_DENIED", route
    r = as_swarm.post("/v1/swarms", json={"name": "takeover"})
    assert r.status_code == 403
    r = as_swarm.put("/v1/swarms/demo/allowlist", json={"tables": ["demo.*", "secret.*"]})
    assert r.status_code == 403
    assert snapshot(server) == before

    # revoking the swarm token revokes what it minted
    http.delete(f"/v1/tokens/{server.catalog.tokens.verify(swarm_token).jti}")
    _http_refused(server, child["token"])
    http.delete("/v1/swarms/other")


def test_refresh_on_both_listeners(server: Server) -> None:
    token = server.mint("agent", agent="refresher", ttl_seconds=300)
    old_jti = server.catalog.tokens.verify(token).jti
    r = server.http(token).post("/v1/tokens/refresh", json={"ttl_seconds": 900})
    assert r.status_code == 201, r.text
    fresh = r.json()
    assert fresh["jti"] != old_jti and fresh["agent"] == "refresher"
    assert _flight_whoami(server, fresh["token"])["jti"] == fresh["jti"]
    body = json.dumps({"ttl_seconds": 60}).encode()
    (result,) = list(server.flight().do_action(flight.Action("refresh-token", body), call_options(token)))
    via_flight = json.loads(result.body.to_pybytes())
    assert via_flight["jti"] not in (old_jti, fresh["jti"]) and via_flight["kind"] == "agent"
    r = server.http(token).post("/v1/tokens/refresh", json={"ttl_seconds": 10**9})
    assert r.status_code == 422


LEEWAY = 5  # [tokens] leeway_seconds of the clocked_server fixture


def _accepted(server: Server, token: str) -> bool:
    """Whether both listeners accept ``token`` (and they agree)."""
    http_ok = server.http(token).get("/v1/whoami").status_code == 200
    try:
        _flight_whoami(server, token)
        flight_ok = True
    except flight.FlightUnauthenticatedError:
        flight_ok = False
    assert http_ok == flight_ok, (http_ok, flight_ok)
    return http_ok


def test_expired_token_refused_on_both_listeners(clocked_server: Server, clock: FakeClock) -> None:
    """Expiry is read on the server's clock, with the leeway: accepted until ``exp + leeway``,
    refused from then on -- whether the token was verified before (the verified-token cache)
    or is presented for the first time (decoded afresh)."""
    server = clocked_server
    seen = server.mint("agent", agent="shortlived", ttl_seconds=60)
    unseen = server.mint("agent", agent="shortlived-unseen", ttl_seconds=60)
    assert _flight_whoami(server, seen)["agent"] == "shortlived"
    clock.advance(60 + LEEWAY - 1)
    assert _accepted(server, seen)
    clock.advance(1)
    for token in (seen, unseen):
        assert "expired" in _flight_refused(server, token)["detail"]
        assert "expired" in _http_refused(server, token)


def test_tokens_minted_after_the_clock_moved_are_valid(clocked_server: Server, clock: FakeClock) -> None:
    """The token's iat and exp are signed with the server's clock and checked on it: a token
    minted an hour "later" is neither "not yet valid" nor expired (PyJWT's own time checks,
    which read the host's clock, are not what decides)."""
    clock.advance(3600)
    r = clocked_server.http().post("/v1/tokens", json={"kind": "admin", "ttl_seconds": 30})
    assert r.status_code == 201, r.text
    issued = r.json()
    claims = jwt.decode(issued["token"], options={"verify_signature": False})
    assert claims["iat"] == int(clock.time()) and claims["exp"] == int(clock.time()) + 30
    assert datetime.fromisoformat(issued["expires_at"]).timestamp() == claims["exp"]
    assert _accepted(clocked_server, issued["token"])
    clock.advance(30 + LEEWAY)
    assert not _accepted(clocked_server, issued["token"])


def test_refresh_is_clamped_on_the_servers_clock(clocked_server: Server, clock: FakeClock) -> None:
    """A refresh expires ``ttl`` after now (the server's clock), never after the chain's
    root: exact instants, because the clock stands still between calls."""
    server = clocked_server
    root = server.http().post(
        "/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "clamped", "ttl_seconds": 600}
    )
    assert root.status_code == 201, root.text
    granted = datetime.fromisoformat(root.json()["expires_at"])
    clock.advance(500)
    now = int(clock.time())
    short = server.http(root.json()["token"]).post("/v1/tokens/refresh", json={"ttl_seconds": 50})
    assert short.status_code == 201, short.text
    assert datetime.fromisoformat(short.json()["expires_at"]).timestamp() == now + 50
    long = server.http(short.json()["token"]).post("/v1/tokens/refresh", json={"ttl_seconds": 300})
    assert long.status_code == 201, long.text
    assert datetime.fromisoformat(long.json()["expires_at"]) == granted
    clock.advance(100 + LEEWAY)
    assert not _accepted(server, long.json()["token"])
    r = server.http(long.json()["token"]).post("/v1/tokens/refresh", json={"ttl_seconds": 60})
    assert r.status_code == 401 and "expired" in r.json()["detail"]


def _signed(server: Server, **claims: Any) -> str:
    """A token signed with the server's own active key (what a bug in the issuer, or a
    restored key, could produce): its claims are the only thing wrong with it."""
    key = server.catalog.keys.active
    return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})


def test_signed_tokens_with_bad_times_are_refused(clocked_server: Server, clock: FakeClock) -> None:
    server = clocked_server
    now = int(clock.time())
    base = {"iss": "quiver", "sub": "admin", "kind": "admin", "swarm": None, "agent": None}
    ok = _signed(server, **base, jti="times-ok", root="times-ok", iat=now + LEEWAY, exp=now + 60)
    assert _accepted(server, ok)  # an iat within the leeway ahead: clocks drift
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "future-iat": ({"iat": now + LEEWAY + 1, "exp": now + 60}, "not yet valid (iat)"),
        "future-nbf": ({"iat": now, "nbf": now + LEEWAY + 1, "exp": now + 60}, "not yet valid (nbf)"),
        "text-exp": ({"iat": now, "exp": "soon"}, "(exp) must be an integer"),
        "text-iat": ({"iat": "now", "exp": now + 60}, "(iat) must be an integer"),
        "huge-exp": ({"iat": now, "exp": 10**20}, "(exp) out of range"),
        "expired": ({"iat": now - 120, "exp": now - LEEWAY}, "expired"),
    }
    before = snapshot(server)
    for name, (times, needle) in cases.items():
        token = _signed(server, **base, jti=f"times-{name}", root=f"times-{name}", **times)
        assert needle in _flight_refused(server, token)["detail"], name
        assert needle in _http_refused(server, token), name
    assert snapshot(server) == before


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": "quiver",
        "sub": "admin",
        "jti": "forged",
        "iat": now,
        "exp": now + 600,
        "kind": "admin",
        "swarm": None,
        "agent": None,
        **extra,
    }


def _forgeries() -> dict[str, str | None]:
    other_key = Ed25519PrivateKey.generate()
    return {
        "missing": None,
        "garbage": "not-a-token",
        "empty-bearer": "",
        "other-key": jwt.encode(_claims(), other_key, algorithm="EdDSA"),
        "alg-none": _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(_claims()) + ".",
        "hs256": jwt.encode(_claims(), "secret-guess-secret-guess-32bytes!", algorithm="HS256"),
        "expired-other-key": jwt.encode(_claims(exp=1), other_key, algorithm="EdDSA"),
        "huge": "x" * 5_000,
    }


@pytest.mark.parametrize("case", list(_forgeries()))
def test_forged_and_malformed_tokens_refused(server: Server, case: str) -> None:
    token = _forgeries()[case]
    before = snapshot(server)
    _flight_refused(server, token)
    _http_refused(server, token)
    r = server.http(token).post("/v1/swarms", json={"name": "forged"})
    assert r.status_code == 401
    assert snapshot(server) == before


def test_alg_none_with_a_real_payload_is_refused(server: Server) -> None:
    """Take a genuine admin token, swap its header to alg none and drop the signature."""
    header, payload, _sig = server.admin_token.split(".")
    forged = _b64({"alg": "none", "typ": "JWT"}) + "." + payload + "."
    _flight_refused(server, forged)
    _http_refused(server, forged)
    tampered = header + "." + _b64({**_claims(), "kind": "admin"}) + "." + _sig
    assert "signature" in _http_refused(server, tampered)


def test_wrong_scheme_is_refused(server: Server) -> None:
    r = server.http(None).get("/v1/whoami", headers={"authorization": f"Basic {server.admin_token}"})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Token {server.admin_token}".encode())])
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(server.flight().list_flights(options=opts))


def test_every_flight_rpc_requires_a_token(server: Server) -> None:
    client = server.flight()
    for token in (None, "bad"):
        opts = call_options(token)
        calls = {
            "list_flights": lambda o=opts: list(client.list_flights(options=o)),
            "get_flight_info": lambda o=opts: client.get_flight_info(
                flight.FlightDescriptor.for_path("demo", "orders"), o
            ),
            "do_get": lambda o=opts: client.do_get(flight.Ticket(b"qv1.x"), o).read_all(),
            "do_action": lambda o=opts: list(client.do_action(flight.Action("whoami", b""), o)),
            "list_actions": lambda o=opts: list(client.list_actions(o)),
        }
        for name, call in calls.items():
            with pytest.raises(flight.FlightUnauthenticatedError) as ei:
                call()
            assert error_info(ei.value)["code"] == "UNAUTHENTICATED", name


def test_get_schema_refusals_carry_the_code_and_no_traceback(server: Server) -> None:
    """pyarrow cannot send GetSchema errors as FlightErrors (see flight_server.errors):
    the code travels as the message prefix, and no traceback leaks."""
    client = server.flight()
    # refused in the middleware with the gRPC status UNAUTHENTICATED (pyarrow calls it OSError)
    with pytest.raises(OSError) as unauth:
        client.get_schema(flight.FlightDescriptor.for_path("demo", "orders"), call_options(None))
    assert "missing token" in str(unauth.value) and "Traceback" not in str(unauth.value)
    cases = [
        (server.demo_token, ("secret", "stuff"), "PERMISSION_DENIED"),
        (server.demo_token, ("only-one-part",), "INVALID_ARGUMENT"),
    ]
    for token, path, code in cases:
        with pytest.raises(pa.ArrowException) as ei:
            client.get_schema(flight.FlightDescriptor.for_path(*path), call_options(token))
        message = str(ei.value)
        assert code in message, message
        assert "Traceback" not in message and ".py" not in message, message
    schema = client.get_schema(
        flight.FlightDescriptor.for_path("demo", "orders"), call_options(server.demo_token)
    )
    assert "order_id" in schema.schema.names


def test_auth_failures_on_flight_are_audited_with_client_address(server: Server) -> None:
    _flight_refused(server, "garbage-token-for-audit")
    events = server.http().get("/v1/audit", params={"action": "auth.failed", "limit": 20}).json()["events"]
    flight_events = [e for e in events if (e["target"] or "").startswith("flight:")]
    assert flight_events and flight_events[0]["client"].startswith("ipv4:127.0.0.1")
    assert "garbage-token-for-audit" not in json.dumps(events)


def test_expiry_is_reported_as_utc(server: Server) -> None:
    r = server.http().post("/v1/tokens", json={"kind": "admin", "ttl_seconds": 60})
    exp = datetime.fromisoformat(r.json()["expires_at"])
    assert exp.tzinfo is not None and exp > datetime.now(UTC)
