"""Who may call what on the control plane (router guards), metrics tokens on both listeners,
and the typed /v1/status answer (proto_docs/control_plane.md, proto_docs/authentication.md)."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.flight as flight
import pytest

from catalog.status import Status
from control_plane.app import ROUTERS, create_app
from control_plane.context import ADMIN, METRICS, TOKEN, Access
from tests.harness import Server, call_options, error_info, start_server

PUBLIC = {("GET", "/healthz"), ("GET", "/.well-known/jwks.json")}


def _operations(server: Server) -> list[tuple[str, str, dict[str, Any]]]:
    spec = server.http(None).get("/schema/openapi.json").json()
    return [
        (method.upper(), path, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "delete", "patch"}
    ]


def _concrete(path: str) -> str:
    """A path with every ``{parameter}`` filled in."""
    out = []
    for part in path.split("/"):
        out.append("x.y" if part.startswith("{") else part)
    return "/".join(out)


@pytest.fixture(scope="module")
def metrics_token(server: Server) -> str:
    return server.mint("metrics", swarm=None)


def test_every_route_declares_who_may_call_it(server: Server) -> None:
    """Policy lives on the routers: every route is public by name, or under an Access guard;
    no handler asks for an ``admin``/``principal`` argument to be authorised."""
    assert server.runtime.status is not None
    app = create_app(server.catalog, report=server.runtime.status)  # the same routers as the running server's
    seen: dict[tuple[str, str], Access | None] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if handler.handler_name not in {h for r in ROUTERS for h in _names(r)}:
                continue  # the OpenAPI schema's own routes
            assert not {"admin", "principal"} & set(handler.parsed_fn_signature.parameters), handler
            for method in handler.http_methods - {"OPTIONS", "HEAD"}:
                seen[(method, route.path)] = Access.of(handler)
    public = {k for k, v in seen.items() if v is None}
    assert public == PUBLIC
    assert seen[("GET", "/metrics")] == METRICS
    assert seen[("GET", "/v1/swarms")] == ADMIN and seen[("GET", "/v1/tokens")] == ADMIN
    assert seen[("POST", "/v1/tokens")] == TOKEN and seen[("GET", "/v1/whoami")] == TOKEN


def _names(router: Any) -> set[str]:
    return {h.handler_name for route in router.routes for h in getattr(route, "route_handlers", [])}


def test_openapi_marks_exactly_the_guarded_routes_as_needing_a_token(server: Server) -> None:
    for method, path, op in _operations(server):
        public = (method, path) in PUBLIC
        assert ("security" in op) is not public, (method, path)
        if not public:
            assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_a_metrics_token_reads_metrics(server: Server, metrics_token: str) -> None:
    r = server.http(metrics_token).get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "quiver_requests_total" in r.text or "# HELP" in r.text
    me = server.catalog.tokens.check(metrics_token)
    assert me.kind == "metrics" and me.swarm is None and me.is_metrics and not me.is_admin


def test_a_metrics_token_is_refused_on_every_other_route(server: Server, metrics_token: str) -> None:
    """Iterates the OpenAPI paths: every route that takes a token refuses a metrics token with
    403 before anything else (before 404 for a path that names nothing, before the body), and
    nothing changes: no swarm created, the token not marked used, no token minted."""
    jti = server.catalog.tokens.check(metrics_token).jti
    server.catalog.tokens.flush_last_used()
    before = server.catalog.tokens.get(jti).last_used_at
    swarms_before = [s.name for s in server.catalog.swarms.all()]
    tokens_before = len(server.catalog.tokens.list(include_inactive=True, limit=10_000))
    client = server.http(metrics_token)
    checked = 0
    for method, path, op in _operations(server):
        if (method, path) in PUBLIC or (method, path) == ("GET", "/metrics") or "security" not in op:
            continue
        body = {"name": "metrics-made", "kind": "admin", "tables": [], "swarm": "demo"}
        r = client.request(method, _concrete(path), json=body if method in {"POST", "PUT"} else None)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"] == "PERMISSION_DENIED", (method, path)
        assert "metrics" in r.json()["detail"], (method, path)
        checked += 1
    assert checked >= 15
    assert [s.name for s in server.catalog.swarms.all()] == swarms_before
    assert len(server.catalog.tokens.list(include_inactive=True, limit=10_000)) == tokens_before
    server.catalog.tokens.flush_last_used()
    assert server.catalog.tokens.get(jti).last_used_at == before


def test_a_metrics_token_is_refused_on_flight(server: Server, metrics_token: str) -> None:
    client = server.flight()
    opts = call_options(metrics_token)
    calls = {
        "list_flights": lambda: list(client.list_flights(options=opts)),
        "whoami": lambda: list(client.do_action(flight.Action("whoami", b""), options=opts)),
        "refresh": lambda: list(client.do_action(flight.Action("refresh-token", b"{}"), options=opts)),
        "get_flight_info": lambda: client.get_flight_info(
            flight.FlightDescriptor.for_path("demo", "orders"), options=opts
        ),
    }
    server.catalog.audit.flush()
    audited_before = len(server.catalog.audit.query(action="auth.failed", limit=10_000))
    for name, call in calls.items():
        with pytest.raises(flight.FlightError) as e:
            call()
        info = error_info(e.value)
        assert info["code"] == "PERMISSION_DENIED", (name, info)
        assert "metrics" in info["detail"], name
    # GetSchema is refused in the middleware (pyarrow's client calls every status an OSError):
    # gRPC PERMISSION_DENIED ("Unauthorized"), the sentence in the message.
    with pytest.raises(OSError, match=r"metrics token may read GET /metrics.*Detail: Unauthorized"):
        client.get_schema(flight.FlightDescriptor.for_path("demo", "orders"), options=opts)
    server.catalog.audit.flush()
    assert (
        len(server.catalog.audit.query(action="auth.failed", limit=10_000)) >= audited_before + len(calls) + 1
    )


def test_who_mints_a_metrics_token(server: Server, metrics_token: str) -> None:
    admin = server.http()
    r = admin.post("/v1/tokens", json={"kind": "metrics", "swarm": "demo"})
    assert (r.status_code, r.json()["error"]) == (400, "INVALID_ARGUMENT")
    assert "metrics tokens take neither" in r.json()["detail"]
    swarm_token = server.mint("swarm", swarm="demo")
    r = server.http(swarm_token).post("/v1/tokens", json={"kind": "metrics"})
    assert (r.status_code, r.json()["error"]) == (403, "PERMISSION_DENIED")
    r = server.http(metrics_token).post("/v1/tokens", json={"kind": "metrics"})
    assert (r.status_code, r.json()["error"]) == (403, "PERMISSION_DENIED")
    listed = admin.get("/v1/tokens").json()["tokens"]
    assert any(t["kind"] == "metrics" and t["swarm"] is None for t in listed)


def test_metrics_and_admin_routes_raced_with_a_metrics_token(server: Server, metrics_token: str) -> None:
    """Threads hit /metrics and admin routes with the same metrics token: every /metrics is
    200, every other answer 403, none anything else."""
    results: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        client = server.http(metrics_token)
        for j in range(10):
            path = "/metrics" if (i + j) % 2 else ("/v1/status" if j % 3 else "/v1/tokens")
            r = client.get(path)
            with lock:
                results.append((path, r.status_code))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 60
    assert all(code == (200 if path == "/metrics" else 403) for path, code in results), results


def test_a_revoked_metrics_token_is_401(server: Server) -> None:
    token = server.mint("metrics", swarm=None)
    jti = server.catalog.tokens.check(token).jti
    assert server.http().delete(f"/v1/tokens/{jti}").status_code == 200
    r = server.http(token).get("/metrics")
    assert (r.status_code, r.json()["error"]) == (401, "UNAUTHENTICATED")


# --- the typed /v1/status -----------------------------------------------------------------


def test_status_is_the_declared_struct(server: Server) -> None:
    r = server.http().get("/v1/status")
    assert r.status_code == 200
    status = msgspec.json.decode(r.content, type=Status, strict=True)
    assert status.listeners["http"].up and status.database.bytes > 0
    assert not isinstance(status.cache, msgspec.UnsetType) and status.cache.tables.budget_bytes >= 0
    assert r.json()["sync"] == {"configured": False}  # the JSON as before it was typed
    assert "section_errors" not in r.json()
    declared = {f.name for f in msgspec.structs.fields(Status)}
    # Every section of a running server is there: nothing is registered, so nothing is missed.
    assert set(r.json()) == declared - {"section_errors"}


def test_openapi_describes_status_and_sync(server: Server) -> None:
    spec = server.http(None).get("/schema/openapi.json").json()
    ok = spec["paths"]["/v1/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Status"}
    schemas = spec["components"]["schemas"]
    assert {"version", "uptime_seconds", "listeners", "database", "cache", "queries", "sync"} <= set(
        schemas["Status"]["properties"]
    )
    assert set(schemas["CacheStatus"]["required"]) >= {"hits", "misses", "tables"}
    sync = spec["paths"]["/v1/sync"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert sync == {"$ref": "#/components/schemas/SyncStatus"}
    assert set(schemas["SyncTable"]["required"]) == {
        "table", "source", "mode", "watermark", "running", "next_run_at", "last_run"
    }  # fmt: skip
    run = spec["paths"]["/v1/sync/{table}/run"]["post"]["responses"]["202"]["content"]
    assert run["application/json"]["schema"] == {"$ref": "#/components/schemas/SyncTriggered"}


def test_public_metrics_need_no_token_and_still_take_a_metrics_token(tmp_path: Path) -> None:
    s = start_server(tmp_path / "data", demo=False, server={"public_metrics": True})
    try:
        assert s.http(None).get("/metrics").status_code == 200
        token = s.mint("metrics", swarm=None)
        assert s.http(token).get("/metrics").status_code == 200
        assert s.http(token).get("/v1/status").status_code == 403
    finally:
        s.stop()


# --- the API docs UIs, offline ------------------------------------------------------------

_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/schema/swagger", "/schema/redoc", "/schema"])
def test_api_docs_pages_reference_only_local_assets(server: Server, page: str) -> None:
    """The UIs work without internet access: every script, style and icon of the page is
    served by Quiver itself (from the drf-spectacular-sidecar package), and answers 200 with
    a JS/CSS/PNG content type."""
    client = server.http(None)
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _URL.findall(r.text)
    assert urls, r.text[:500]
    assert not re.search(r"https?://|//cdn|googleapis", r.text.split("<body>")[0]), r.text[:1500]
    kinds = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in urls:
        assert url.startswith("/schema/assets/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        expected = next(v for k, v in kinds.items() if url.endswith(k))
        assert asset.headers["content-type"].split(";")[0] == expected, (url, asset.headers)
        assert len(asset.content) > 500, url
    assert any(u.endswith(".js") for u in urls)
    assert "django" not in sys.modules  # the assets package is located, never imported


def test_api_docs_assets_refuse_what_is_not_there(server: Server) -> None:
    client = server.http(None)
    for path in ("/schema/assets/nope.js", "/schema/assets/%2e%2e/%2e%2e/apps.py"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", (path, r.text)
    r = client.get("/schema/assets/swagger-ui-dist/swagger-ui.css", params={"v": "1"})
    assert (r.status_code, r.json()["error"]) == (400, "INVALID_ARGUMENT")


def test_the_cli_mints_a_metrics_token_with_the_server_stopped(tmp_path: Path) -> None:
    """`quiver token create --kind metrics` (for Prometheus' credentials file): it reads
    /metrics of the server it was minted for, and nothing else."""
    import subprocess
    import sys

    from tests.harness import start_server

    data = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, "-m", "quiver", "token", "create", "--kind", "metrics", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert "kind=metrics" in done.stderr
    server = start_server(data)
    try:
        assert server.http(token).get("/metrics").status_code == 200
        refused = server.http(token).get("/v1/swarms")
        assert refused.status_code == 403 and refused.json()["error"] == "PERMISSION_DENIED"
    finally:
        server.stop()
