"""The control plane's contract: routes, status codes, JSON errors, and that a refused
request changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.harness import Server
from tests.state import snapshot


def _error(r: Any, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert body["detail"] and "Traceback" not in body["detail"]
    return str(body["detail"])


def test_health_jwks_and_openapi(server: Server) -> None:
    anon = server.http(None)
    r = anon.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert set(r.json()["listeners"]) == {"flight", "http"}
    jwks = anon.get("/.well-known/jwks.json").json()
    (key,) = jwks["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA" and key["kid"]
    spec = anon.get("/schema/openapi.json").json()
    for path in ("/v1/swarms", "/v1/tokens", "/v1/tokens/{jti}", "/v1/tables", "/v1/status", "/v1/audit"):
        assert path in spec["paths"], path
    assert "x-request-id" in r.headers


def test_metrics_need_admin(server: Server) -> None:
    _error(server.http(None).get("/metrics"), 401, "UNAUTHENTICATED")
    r = server.http().get("/metrics")
    assert r.status_code == 200
    assert "quiver_requests_total" in r.text and "quiver_uptime_seconds" in r.text


def test_swarm_lifecycle_and_allowlist(server: Server) -> None:
    http = server.http()
    r = http.post("/v1/swarms", json={"name": "analysts", "description": "BI agents"})
    assert r.status_code == 201, r.text
    assert r.json()["tables"] == []
    r = http.put(
        "/v1/swarms/analysts/allowlist", json={"tables": ["demo.orders", "DEMO.Customers", "sales.*"]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tables"] == ["demo.customers", "demo.orders", "sales.*"]
    assert body["matching"] == ["demo.customers", "demo.orders"]
    assert http.get("/v1/swarms/analysts/allowlist").json()["tables"] == body["tables"]
    assert "analysts" in [s["name"] for s in http.get("/v1/swarms").json()["swarms"]]
    tables = {t["table"]: t for t in http.get("/v1/tables").json()["tables"]}
    assert tables["demo.orders"]["swarms"] == ["analysts", "demo"]
    assert tables["demo.events"]["swarms"] == ["demo"]
    assert tables["demo.orders"]["rows"] == 20_000 and tables["demo.orders"]["data_version"] >= 1
    assert http.delete("/v1/swarms/analysts").status_code == 204
    _error(http.get("/v1/swarms/analysts"), 404, "NOT_FOUND")


def test_allowlist_entries_matching_no_table_are_kept_with_a_warning(server: Server) -> None:
    """Pre-provisioning: an entry no table matches yet is saved (sync may bring the table),
    and the answer names it, so a typo does not pass silently; exact matches warn nothing."""
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "prov"}).status_code == 201
    r = http.put("/v1/swarms/prov/allowlist", json={"tables": ["demo.orders", "demo.*"]})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == []
    r = http.put("/v1/swarms/prov/allowlist", json={"tables": ["demo.orders", "demo.nope", "later.*"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tables"] == ["demo.nope", "demo.orders", "later.*"]  # saved, all of them
    assert body["matching"] == ["demo.orders"]
    assert body["warnings"] == ["demo.nope matches no table", "later.* matches no table"]
    assert server.catalog.swarms.get_allowlist("prov").patterns == body["tables"]
    assert http.get("/v1/swarms/prov/allowlist").json()["warnings"] == body["warnings"]
    # Bounded: 20 named (each entry echoed at most ~80 characters), the rest counted.
    many = [f"s{i}.{'t' * 200}" for i in range(30)]
    body = http.put("/v1/swarms/prov/allowlist", json={"tables": many}).json()
    assert len(body["tables"]) == 30 and len(body["warnings"]) == 21
    assert body["warnings"][-1] == "and 10 more entries match no table"
    assert all(len(w) < 160 for w in body["warnings"])
    spec = http.get("/schema/openapi.json").json()
    assert "warnings" in spec["components"]["schemas"]["AllowlistOut"]["properties"]


def test_deleting_a_swarm_revokes_its_tokens(server: Server) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "doomed", "tables": ["demo.*"]}).status_code == 201
    token = server.mint("agent", swarm="doomed", agent="x")
    assert server.http(token).get("/v1/whoami").status_code == 200
    assert http.delete("/v1/swarms/doomed").status_code == 204
    _error(server.http(token).get("/v1/whoami"), 401, "UNAUTHENTICATED")


BAD_REQUESTS: list[tuple[str, str, Any, int, str, str]] = [
    # (method, path, body (str = raw), status, code, words the detail must contain)
    ("POST", "/v1/swarms", '{"name": ', 400, "INVALID_ARGUMENT", "JSON"),
    ("POST", "/v1/swarms", "[1, 2]", 400, "INVALID_ARGUMENT", "object"),
    ("POST", "/v1/swarms", {"name": "x1", "colour": "red"}, 400, "INVALID_ARGUMENT", "colour"),
    ("POST", "/v1/swarms", {"name": 42}, 400, "INVALID_ARGUMENT", "name"),
    ("POST", "/v1/swarms", {}, 400, "INVALID_ARGUMENT", "name"),
    ("POST", "/v1/swarms", {"name": "Bad Name!"}, 400, "INVALID_ARGUMENT", "swarm name"),
    ("POST", "/v1/swarms", {"name": "demo"}, 409, "ALREADY_EXISTS", "already exists"),
    ("POST", "/v1/swarms", {"name": "x2", "tables": ["no-dots"]}, 400, "INVALID_ARGUMENT", "schema.table"),
    (
        "POST",
        "/v1/swarms",
        {"name": "x3", "tables": ["_quiver.tokens"]},
        400,
        "INVALID_ARGUMENT",
        "system schema",
    ),
    ("GET", "/v1/swarms/ghost", None, 404, "NOT_FOUND", "ghost"),
    ("DELETE", "/v1/swarms/ghost", None, 404, "NOT_FOUND", "ghost"),
    ("GET", "/v1/swarms/ghost/allowlist", None, 404, "NOT_FOUND", "ghost"),
    ("PUT", "/v1/swarms/ghost/allowlist", {"tables": ["demo.*"]}, 404, "NOT_FOUND", "ghost"),
    ("PUT", "/v1/swarms/demo/allowlist", {"tables": "demo.*"}, 400, "INVALID_ARGUMENT", "tables"),
    ("PUT", "/v1/swarms/demo/allowlist", {"tables": ["demo.*", "a.b.c"]}, 400, "INVALID_ARGUMENT", "a.b.c"),
    ("PUT", "/v1/swarms/demo/allowlist", {"tabels": ["demo.*"]}, 400, "INVALID_ARGUMENT", "tabels"),
    (
        "POST",
        "/v1/tokens",
        {"kind": "agent", "swarm": "demo", "agent": "a", "ttl_seconds": -5},
        422,
        "INVALID_ARGUMENT",
        "ttl_seconds",
    ),
    (
        "POST",
        "/v1/tokens",
        {"kind": "agent", "swarm": "demo", "agent": "a", "ttl_seconds": 0},
        422,
        "INVALID_ARGUMENT",
        "ttl_seconds",
    ),
    (
        "POST",
        "/v1/tokens",
        {"kind": "agent", "swarm": "demo", "agent": "a", "ttl_seconds": 10**9},
        422,
        "INVALID_ARGUMENT",
        "maximum",
    ),
    (
        "POST",
        "/v1/tokens",
        {"kind": "agent", "swarm": "demo", "agent": "a", "ttl_seconds": "sixty"},
        400,
        "INVALID_ARGUMENT",
        "ttl_seconds",
    ),
    ("POST", "/v1/tokens", {"kind": "root"}, 400, "INVALID_ARGUMENT", "kind"),
    ("POST", "/v1/tokens", {"kind": "agent", "swarm": "ghost", "agent": "a"}, 404, "NOT_FOUND", "ghost"),
    ("POST", "/v1/tokens", {"kind": "agent", "swarm": "demo"}, 400, "INVALID_ARGUMENT", "agent"),
    ("POST", "/v1/tokens", {"kind": "swarm"}, 400, "INVALID_ARGUMENT", "swarm"),
    ("POST", "/v1/tokens", {"kind": "admin", "swarm": "demo"}, 400, "INVALID_ARGUMENT", "admin"),
    (
        "POST",
        "/v1/tokens",
        {"kind": "agent", "swarm": "demo", "agent": "a", "extra": 1},
        400,
        "INVALID_ARGUMENT",
        "extra",
    ),
    ("DELETE", "/v1/tokens/0000000000000000", None, 404, "NOT_FOUND", "0000000000000000"),
    ("GET", "/v1/audit?limit=0", None, 400, "INVALID_ARGUMENT", "limit"),
    ("GET", "/v1/audit?since=yesterday", None, 400, "INVALID_ARGUMENT", "since"),
    ("GET", "/v1/nowhere", None, 404, "NOT_FOUND", "/v1/nowhere"),
    ("PATCH", "/v1/swarms", {}, 405, "METHOD_NOT_ALLOWED", ""),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "words"), BAD_REQUESTS)
def test_bad_request_is_refused_and_changes_nothing(
    server: Server, method: str, path: str, body: Any, status: int, code: str, words: str
) -> None:
    before = snapshot(server)
    kwargs: dict[str, Any] = {}
    if isinstance(body, str):
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    r = server.http().request(method, path, **kwargs)
    detail = _error(r, status, code)
    assert words.lower() in detail.lower(), detail
    assert snapshot(server) == before


def test_oversized_body_is_413(server: Server) -> None:
    before = snapshot(server)
    r = server.http().post("/v1/swarms", json={"name": "big", "description": "x" * (2 << 20)})
    _error(r, 413, "RESOURCE_EXHAUSTED")
    assert snapshot(server) == before


def test_mutations_and_auth_failures_are_audited(server: Server) -> None:
    http = server.http()
    assert http.post("/v1/swarms", json={"name": "audited"}).status_code == 201
    assert http.post("/v1/swarms", json={"name": "audited"}).status_code == 409
    server.http("not-a-token").get("/v1/swarms")
    events = http.get("/v1/audit", params={"action": "swarm.create"}).json()["events"]
    outcomes = [(e["target"], e["outcome"]) for e in events if e["target"] == "audited"]
    assert ("audited", "ok") in outcomes and ("audited", "already_exists") in outcomes
    ok = next(e for e in events if e["target"] == "audited" and e["outcome"] == "ok")
    assert ok["actor"] == "admin:admin" and ok["client"] == "127.0.0.1" and len(ok["request_id"]) == 16
    failures = http.get("/v1/audit", params={"action": "auth.failed", "limit": 5}).json()["events"]
    assert failures[0]["outcome"] == "denied" and failures[0]["target"] == "http:GET /v1/swarms"
    assert "not-a-token" not in str(failures)
    http.delete("/v1/swarms/audited")


def test_status_reports_listeners_and_database(server: Server) -> None:
    status = server.http().get("/v1/status").json()
    assert status["version"] and status["uptime_seconds"] >= 0
    assert status["listeners"]["flight"]["up"] and status["listeners"]["http"]["up"]
    assert status["database"]["bytes"] > 0 and status["tables"] == 3
