"""Client mistakes on the control plane: authentication before the body, bounded nesting and
size, strict types, JSON only, 405 with ``Allow``, and an OpenAPI schema that says all of it.
Every refusal is checked for its status, its ``error`` code and that nothing changed."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from catalog import InvalidArgument
from catalog.errors import MAX_DETAIL_CHARS
from control_plane.gate import MAX_JSON_BODY, decode_body
from tests.harness import Server
from tests.state import snapshot

DEEP_ARRAY = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
UNCLOSED = "[" * 100_000
JSON = {"content-type": "application/json"}


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    assert body["detail"] and "Traceback" not in body["detail"]
    assert len(body["detail"]) <= MAX_DETAIL_CHARS + 40  # + the '… (N more characters)' note
    return str(body["detail"])


def _operations(server: Server) -> list[tuple[str, str, bool]]:
    """(method, concrete path, takes a JSON body) of every authenticated operation, read from
    the live OpenAPI schema so that a new route is covered without editing this test. (The
    multipart upload of artefacts has its own refusals: tests/test_artefacts_http.py.)"""
    spec = server.http(None).get("/schema/openapi.json").json()
    out = []
    for template, item in spec["paths"].items():
        path = template.replace("{name}", "demo").replace("{jti}", "0" * 32).replace("{table}", "demo.orders")
        for method, op in item.items():
            if op.get("security"):
                json_body = "application/json" in op.get("requestBody", {}).get("content", {})
                out.append((method.upper(), path, json_body))
    return out


#: Routes for agent and swarm tokens only (the AGENT guard, control_plane/context.py).
AGENT_ROUTES = {"/v1/query"}


def _auth_failures(server: Server, request_id: str) -> list[dict[str, Any]]:
    events = server.catalog.audit.query(action="auth.failed", limit=10_000)
    return [e for e in (msgspec_dict(x) for x in events) if e["request_id"] == request_id]


def msgspec_dict(event: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.structs.asdict(event)


# --- defect 9: authenticate before parsing ---------------------------------------------------


@pytest.mark.parametrize(
    "token", [None, "garbage", "eyJhbGciOiJFZERTQSJ9.e30.AAAA"], ids=["none", "garbage", "forged"]
)
def test_bad_request_without_a_valid_token_is_401_and_audited(server: Server, token: str | None) -> None:
    """Every authenticated route, given a bad body (or a bad query) and no valid token,
    answers 401 and leaves an ``auth.failed`` record with the request's id — the body is
    never looked at, so fail2ban sees every attempt."""
    operations = _operations(server)
    assert len(operations) >= 15
    before = snapshot(server)
    http = server.http(token)
    for method, path, _ in operations:
        for body in ('{"name": ', DEEP_ARRAY):
            r = http.request(method, path + "?bogus=1", content=body, headers=JSON)
            detail = _error(r, 401, "UNAUTHENTICATED")
            assert r.headers["www-authenticate"] == "Bearer"
            (record,) = _auth_failures(server, r.headers["x-request-id"])
            assert record["outcome"] == "denied" and record["target"] == f"http:{method} {path}", record
            assert record["detail"] == detail
            if token:
                assert token not in str(record)
    assert snapshot(server) == before


def test_bad_request_with_an_admin_token_is_400(server: Server) -> None:
    """The same requests with a valid admin token reach the checks: 400, nothing changed,
    no auth failure recorded."""
    before = snapshot(server)
    admin = server.http()
    agent = server.http(server.demo_token)  # routes that run agent SQL refuse admin tokens (403)
    operations = _operations(server)
    assert len(operations) >= 15
    for method, path, has_body in operations:
        http = agent if path in AGENT_ROUTES else admin
        if has_body:
            for body in ('{"name": ', DEEP_ARRAY, DEEP_OBJECT, UNCLOSED, "[1, 2]"):
                r = http.request(method, path, content=body, headers=JSON)
                detail = _error(r, 400, "INVALID_ARGUMENT")
                assert "request body" in detail, detail
                assert not _auth_failures(server, r.headers["x-request-id"])
        else:
            r = http.request(method, path, params={"bogus": "1"})
            assert "unknown query parameter 'bogus'" in _error(r, 400, "INVALID_ARGUMENT")
    assert snapshot(server) == before


def test_an_agent_token_on_an_admin_route_is_403_before_the_body(server: Server) -> None:
    assert server.demo_token
    before = snapshot(server)
    r = server.http(server.demo_token).post("/v1/swarms", content=DEEP_ARRAY, headers=JSON)
    assert "admin token" in _error(r, 403, "PERMISSION_DENIED")
    assert snapshot(server) == before


# --- defect 7 (HTTP): nesting and size -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/swarms"),
        ("PUT", "/v1/swarms/demo/allowlist"),
        ("POST", "/v1/tokens"),
        ("POST", "/v1/tokens/refresh"),
    ],
)
@pytest.mark.parametrize("body", [DEEP_ARRAY, DEEP_OBJECT, UNCLOSED], ids=["array", "object", "unclosed"])
def test_deeply_nested_body_is_400(server: Server, method: str, path: str, body: str) -> None:
    """Refused at the first value that does not fit the route's model (a 500 before: the
    body was decoded untyped first, recursing into a RecursionError)."""
    before = snapshot(server)
    allowlist = server.http().get("/v1/swarms/demo/allowlist").json()
    r = server.http().request(method, path, content=body, headers=JSON)
    detail = _error(r, 400, "INVALID_ARGUMENT")
    assert detail.startswith("request body: ") and ("Expected `object" in detail or "unknown field" in detail)
    assert snapshot(server) == before
    assert server.http().get("/v1/swarms/demo/allowlist").json() == allowlist


@pytest.mark.parametrize(
    ("method", "path", "body", "where"),
    [
        ("POST", "/v1/swarms", '{"name": "n", "tables": ' + "[" * 100_000, "$.tables[0]"),
        ("POST", "/v1/swarms", '{"name": "n", "description": ' + '{"a":' * 50_000, "$.description"),
        ("POST", "/v1/tokens", '{"kind": "agent", "swarm": ' + "[" * 100_000, "$.swarm"),
        ("PUT", "/v1/swarms/demo/allowlist", '{"tables": [' + '{"a":' * 50_000, "$.tables[0]"),
    ],
)
def test_deep_values_inside_a_body_are_400(
    server: Server, method: str, path: str, body: str, where: str
) -> None:
    before = snapshot(server)
    r = server.http().request(method, path, content=body, headers=JSON)
    assert where in _error(r, 400, "INVALID_ARGUMENT")
    assert snapshot(server) == before


def test_an_untyped_model_cannot_recurse_past_a_400() -> None:
    """The last line of defence, for a model with an ``Any`` field."""
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        decode_body(DEEP_ARRAY.encode(), Any)
    assert decode_body(b'[[1], {"a": [2]}]', Any) == [[1], {"a": [2]}]


def test_oversized_body_is_413_and_without_a_token_401(server: Server) -> None:
    before = snapshot(server)
    big = '{"name": "big", "description": "' + "x" * MAX_JSON_BODY + '"}'
    detail = _error(server.http().post("/v1/swarms", content=big, headers=JSON), 413, "RESOURCE_EXHAUSTED")
    assert str(MAX_JSON_BODY) in detail
    _error(server.http(None).post("/v1/swarms", content=big, headers=JSON), 401, "UNAUTHENTICATED")
    assert snapshot(server) == before


def test_concurrent_hostile_bodies_leave_the_server_serving(server: Server) -> None:
    """Threads racing deep bodies, garbage tokens and good creates: every hostile request is
    a 4xx, every good one succeeds, every auth failure is audited once."""
    results: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def hostile(token: str | None) -> None:
        with httpx.Client(base_url=server.http_url, timeout=60) as c:
            headers = {**JSON, **({"authorization": f"Bearer {token}"} if token else {})}
            for body in (DEEP_ARRAY, DEEP_OBJECT):
                r = c.post("/v1/swarms", content=body, headers=headers)
                with lock:
                    results.append(("hostile", r.status_code, r.headers["x-request-id"]))

    def good(i: int) -> None:
        r = server.http().post("/v1/swarms", json={"name": f"race{i}"})
        with lock:
            results.append(("good", r.status_code, r.headers["x-request-id"]))

    threads = [threading.Thread(target=hostile, args=(t,)) for t in [None, "junk", server.admin_token] * 3]
    threads += [threading.Thread(target=good, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted({(kind, status) for kind, status, _ in results})
    assert statuses == [("good", 201), ("hostile", 400), ("hostile", 401)], statuses
    denied = [rid for kind, status, rid in results if status == 401]
    assert len(denied) == 12
    for rid in denied:
        assert len(_auth_failures(server, rid)) == 1
    names = {s.name for s in server.catalog.swarms.all()}
    assert {f"race{i}" for i in range(6)} <= names
    for i in range(6):
        assert server.http().delete(f"/v1/swarms/race{i}").status_code == 204


# --- defect 11 (HTTP): strict types, JSON only, 405 -----------------------------------------


@pytest.mark.parametrize("ttl", ["60", True, 60.0, [60], {"s": 60}])
def test_ttl_seconds_is_an_integer_on_every_route(server: Server, ttl: Any) -> None:
    before = snapshot(server)
    mint = server.http().post(
        "/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "t", "ttl_seconds": ttl}
    )
    assert "ttl_seconds" in _error(mint, 400, "INVALID_ARGUMENT")
    assert server.demo_token
    for token in (server.admin_token, server.demo_token):
        refresh = server.http(token).post("/v1/tokens/refresh", json={"ttl_seconds": ttl})
        assert "ttl_seconds" in _error(refresh, 400, "INVALID_ARGUMENT")
    assert snapshot(server) == before


def test_an_integer_ttl_works_on_both_routes(server: Server) -> None:
    r = server.http().post(
        "/v1/tokens", json={"kind": "agent", "swarm": "demo", "agent": "t2", "ttl_seconds": 60}
    )
    assert r.status_code == 201, r.text
    r = server.http(r.json()["token"]).post("/v1/tokens/refresh", json={"ttl_seconds": 30})
    assert r.status_code == 201, r.text
    r = server.http().post("/v1/tokens/refresh")  # no body at all: the body is optional here
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/swarms", '{"name": "ct"}'),
        ("PUT", "/v1/swarms/demo/allowlist", '{"tables": []}'),
        ("POST", "/v1/tokens", '{"kind": "admin"}'),
        ("POST", "/v1/tokens/refresh", '{"ttl_seconds": 60}'),
    ],
)
def test_json_routes_require_application_json(
    server: Server, method: str, path: str, body: str, content_type: str | None
) -> None:
    before = snapshot(server)
    allowlist = server.http().get("/v1/swarms/demo/allowlist").json()
    headers = {"content-type": content_type} if content_type else {}
    r = server.http().request(method, path, content=body, headers=headers)
    assert "Content-Type: application/json" in _error(r, 415, "INVALID_ARGUMENT")
    assert snapshot(server) == before
    assert server.http().get("/v1/swarms/demo/allowlist").json() == allowlist


def test_json_with_charset_is_accepted(server: Server) -> None:
    r = server.http().post(
        "/v1/swarms",
        content='{"name": "charset"}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    assert server.http().delete("/v1/swarms/charset").status_code == 204


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "/v1/swarms", {"GET", "POST"}),
        ("PUT", "/v1/swarms/demo", {"GET", "DELETE"}),
        ("POST", "/v1/swarms/demo/allowlist", {"GET", "PUT"}),
        ("GET", "/v1/tokens/refresh", {"POST"}),
        ("DELETE", "/healthz", {"GET"}),
    ],
)
def test_405_carries_allow_and_the_error_body(
    server: Server, method: str, path: str, allowed: set[str]
) -> None:
    for token in ("admin", None):
        r = server.http(token).request(method, path, content=b"[[[[", headers=JSON)
        detail = _error(r, 405, "METHOD_NOT_ALLOWED")
        assert allowed <= {m.strip() for m in r.headers["allow"].split(",")}, r.headers
        assert method in detail


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("acter=admin", "unknown query parameter 'acter'"),
        ("limit=5&limit=6", "given 2 times"),
        ("since=1.5e-40", "RFC 3339"),
        ("since=1700000000", "RFC 3339"),
        ("limit=1.5", "integer"),
        ("limit=true", "integer"),
    ],
)
def test_query_parameters_are_strict(server: Server, query: str, words: str) -> None:
    detail = _error(server.http().get(f"/v1/audit?{query}"), 400, "INVALID_ARGUMENT")
    assert words in detail, detail


def test_valid_query_parameters_still_work(server: Server) -> None:
    r = server.http().get(
        "/v1/audit", params={"limit": 3, "since": "2020-01-01T00:00:00Z", "action": "swarm.create"}
    )
    assert r.status_code == 200, r.text
    r = server.http().get("/v1/tokens", params={"include_inactive": "true", "limit": "5"})
    assert r.status_code == 200 and len(r.json()["tokens"]) <= 5


def test_echoed_values_are_bounded(server: Server) -> None:
    before = snapshot(server)
    r = server.http().post("/v1/swarms", json={"name": "x", "k" * 50_000: 1})
    assert "unknown field" in _error(r, 400, "INVALID_ARGUMENT")
    r = server.http().get("/v1/audit", params={"q" * 50_000: "1"})
    _error(r, 400, "INVALID_ARGUMENT")
    r = server.http().get("/v1/" + "n" * 5000)
    _error(r, 404, "NOT_FOUND")
    assert snapshot(server) == before


# --- the OpenAPI schema documents what the server answers -------------------------------------


def test_openapi_documents_the_error_body_and_every_status(server: Server) -> None:
    spec = server.http(None).get("/schema/openapi.json").json()
    error_body = spec["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"error", "detail"}
    assert "security" not in spec  # per operation: health and JWKS are public
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for template, item in spec["paths"].items():
        for method, op in item.items():
            label = f"{method.upper()} {template}"
            statuses = {int(s) for s in op["responses"]}
            for status, response in op["responses"].items():
                if int(status) >= 400 and (template, status) != ("/healthz", "503"):
                    assert response["content"]["application/json"]["schema"] == ref, label
            if op.get("security"):
                assert 401 in statuses, label
            if "requestBody" in op:
                assert {400, 413, 415} <= statuses, label
            if "{" in template:
                assert 404 in statuses, label
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "security" not in spec["paths"]["/.well-known/jwks.json"]["get"]
    assert {401, 403} <= {int(s) for s in spec["paths"]["/v1/swarms"]["get"]["responses"]}
    assert {409} <= {int(s) for s in spec["paths"]["/v1/swarms"]["post"]["responses"]}
    assert {403, 404, 422} <= {int(s) for s in spec["paths"]["/v1/tokens"]["post"]["responses"]}


@pytest.mark.parametrize(
    "body",
    [b'{"name": "\xe9"}', b'{"name": "ok", "description": "\xff\xfe"}', b"\xff\xfe{}", b'{"\xc3": 1}'],
)
def test_a_body_that_is_not_utf8_is_400(server: Server, body: bytes) -> None:
    """msgspec raises a bare UnicodeDecodeError for these (a 500 before)."""
    before = snapshot(server)
    r = server.http().post("/v1/swarms", content=body, headers=JSON)
    assert "JSON" in _error(r, 400, "INVALID_ARGUMENT")
    assert snapshot(server) == before


def test_query_range_errors_name_the_parameter_plainly(server: Server) -> None:
    detail = _error(server.http().get("/v1/audit", params={"limit": 10**9}), 400, "INVALID_ARGUMENT")
    assert detail.startswith("query limit: ") and "ParamType" not in detail, detail


def test_unrouted_answers_carry_a_request_id_too(server: Server) -> None:
    for r in (server.http().get("/v1/nowhere"), server.http(None).patch("/v1/swarms")):
        assert r.status_code in (404, 405) and len(r.headers["x-request-id"]) == 16, r.headers
    served = server.catalog.metrics.render().decode()
    assert 'method="unmatched",outcome="404"' in served and 'method="unmatched",outcome="405"' in served


def test_a_request_refused_for_its_body_or_query_does_not_mark_the_token_used(server: Server) -> None:
    """The gate authenticates before the body, but only the route's dependency — after the
    body and query are accepted — marks the token used."""
    import jwt

    token = server.mint("agent", agent="body-refused", ttl_seconds=600)
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    http = server.http(token)
    _error(http.post("/v1/tokens/refresh", content=DEEP_ARRAY, headers=JSON), 400, "INVALID_ARGUMENT")
    _error(http.post("/v1/tokens/refresh", json={"ttl_seconds": "60"}), 400, "INVALID_ARGUMENT")
    _error(
        http.post("/v1/tokens/refresh", content="{}", headers={"content-type": "text/plain"}),
        415,
        "INVALID_ARGUMENT",
    )
    _error(http.get("/v1/whoami", params={"x": "1"}), 400, "INVALID_ARGUMENT")
    server.catalog.maintain()
    assert server.catalog.tokens.get(jti).last_used_at is None
    assert http.get("/v1/whoami").status_code == 200
    server.catalog.maintain()
    assert server.catalog.tokens.get(jti).last_used_at is not None
