"""Status and health by composition (quiver/status.py, catalog/status.py): the runtime
assembles GET /v1/status and /healthz from the components it started, nothing registers
itself on the catalog, every section's shape is in the OpenAPI schema, the async-query
actions answer one typed Struct, and the answers hold under concurrent callers
(proto_docs/control_plane.md, "Status and sync answers"; proto_docs/actions.md)."""

from __future__ import annotations

import json
import re
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pyarrow.flight as flight
import pytest

from catalog import TableRef, Unavailable
from catalog.status import Health, Status, SyncStatus, SyncTriggered
from flight_server.profiles import ProfileCache
from flight_server.results import QueryStatus
from quiver.local_client import LocalServer, ServerRefused
from quiver.status import ProcessStatus, Sections, sync_section
from quiver.sync_cli import _Remote
from tests.harness import Server, call_options, error_info, start_server, wait_until

DOCS = Path(__file__).resolve().parents[1] / "proto_docs"


def _flight(server: Server) -> Any:
    assert server.runtime.flight is not None
    return server.runtime.flight


def _status(server: Server) -> Status:
    r = server.http().get("/v1/status")
    assert r.status_code == 200, r.text
    return msgspec.json.decode(r.content, type=Status, strict=True)


# --- nothing registers itself ------------------------------------------------------------------


def test_the_catalog_holds_no_registry_of_its_neighbours(server: Server) -> None:
    for gone in ("status_sections", "listeners", "health_probes", "sync", "require_sync", "health"):
        assert not hasattr(server.catalog, gone), gone


def test_building_a_component_does_not_replace_what_status_shows(server: Server) -> None:
    """Before, ``ProfileCache.for_catalog`` wrote its own ``stats`` into the catalog's
    registry: a second cache built on the same catalog (a tool, a test) silently took over
    the running server's "profiles" section. Now /v1/status shows what the runtime wired."""
    fs = _flight(server)
    fs.profiles.profile(TableRef("demo", "customers"))
    running = fs.profiles.stats()
    assert running.computed >= 1
    other = ProfileCache.for_catalog(server.catalog)
    assert other.stats().computed == 0
    shown = _status(server).profiles
    assert not isinstance(shown, msgspec.UnsetType)
    assert shown.computed == fs.profiles.stats().computed >= 1


def test_status_shows_the_result_cache_and_the_hot_table_cache(server: Server) -> None:
    """One ``cache`` section (the result cache and, under ``tables``, the hot-table cache),
    answered by the Flight server that owns both; the result cache no longer registers a
    second ``cache`` of its own."""
    client, opts = server.flight(), call_options(server.demo_token)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "events"), opts)
    for endpoint in info.endpoints:
        client.do_get(endpoint.ticket, opts).read_all()
    # Loaded while the data plane is idle (flight_server/table_cache.py "IdleFiller").
    held = _flight(server).table_cache
    wait_until(lambda: held.holds(TableRef("demo", "events")), what="the idle fill of demo.events")
    sql = json.dumps({"kind": "query", "sql": "SELECT count(*) AS n FROM demo.orders"}).encode()
    for _ in range(2):  # the second is a result-cache hit
        info = client.get_flight_info(flight.FlightDescriptor.for_command(sql), opts)
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    fs = _flight(server)
    cache = _status(server).cache
    assert not isinstance(cache, msgspec.UnsetType)
    assert cache.tables == fs.table_cache.stats()
    assert "demo.events" in {t.table for t in cache.tables.tables}
    result = fs.cache.stats()
    assert (cache.hits, cache.misses, cache.entries) == (result.hits, result.misses, result.entries)
    assert cache.hits >= 1 and cache.max_bytes == result.max_bytes


# --- the schema names every field ----------------------------------------------------------------


def _structs(root: type) -> set[type[msgspec.Struct]]:
    """Every Struct type reachable from ``root``'s fields."""
    seen: set[type[msgspec.Struct]] = set()
    todo: list[Any] = [root]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            if t in seen:
                continue
            seen.add(t)
            todo += [f.type for f in msgspec.structs.fields(t)]
        else:
            todo += list(typing.get_args(t))
    return seen


def test_openapi_names_the_fields_of_every_section(server: Server) -> None:
    spec = server.http(None).get("/schema/openapi.json").json()
    schemas = spec["components"]["schemas"]
    answers = {
        ("/v1/status", "get", "200"): Status,
        ("/healthz", "get", "200"): Health,
        ("/v1/sync", "get", "200"): SyncStatus,
        ("/v1/sync/{table}/run", "post", "202"): SyncTriggered,
    }
    for (path, method, code), root in answers.items():
        content = spec["paths"][path][method]["responses"][code]["content"]["application/json"]
        assert content["schema"] == {"$ref": f"#/components/schemas/{root.__name__}"}, path
        for struct in _structs(root):
            fields = {f.encode_name for f in msgspec.structs.fields(struct)}
            assert set(schemas[struct.__name__]["properties"]) == fields, struct.__name__
    sections = {f.name for f in msgspec.structs.fields(Status)}
    assert {"queries", "cache", "profiles", "async_queries", "sync", "backup"} <= sections
    for name in ("QueriesStatus", "CacheStatus", "TableCacheStatus", "ProfilesStatus", "AsyncQueriesStatus"):
        assert schemas[name]["required"], name  # every field of a section is always there


# --- one broken section hides nothing else -----------------------------------------------------


def test_a_failing_section_is_named_and_the_rest_is_served(server: Server) -> None:
    fs = _flight(server)

    def on_fire() -> Any:
        raise RuntimeError("disk on fire " + "x" * 5_000)

    report = ProcessStatus(
        server.catalog,
        Sections(
            queries=fs.queries_status,
            cache=fs.cache_status,
            profiles=on_fire,
            async_queries=fs.async_queries_status,
            sync=sync_section(None),
            backup=server.catalog.backups.status,
        ),
    )
    report.listener_up("flight", server.flight_url)
    status = report.status()
    assert not isinstance(status.section_errors, msgspec.UnsetType)
    assert set(status.section_errors) == {"profiles"}
    assert (
        status.section_errors["profiles"].startswith("disk on fire")
        and len(status.section_errors["profiles"]) < 400
    )
    assert isinstance(status.profiles, msgspec.UnsetType)
    assert not isinstance(status.cache, msgspec.UnsetType) and status.listeners["flight"].up
    body = json.loads(msgspec.json.encode(status))
    assert "profiles" not in body and body["sync"] == {"configured": False}
    # The running server's own report is unaffected.
    assert "section_errors" not in server.http().get("/v1/status").json()


def test_health_follows_the_listeners_the_runtime_marks(server: Server) -> None:
    report = ProcessStatus(server.catalog, Sections())
    assert report.health().status == "unavailable"  # no listener yet: not ready
    accepting = [True]
    report.listener_up("flight", server.flight_url, probe=lambda: accepting[0])
    assert report.health().status == "ok" and report.listeners_accept()
    accepting[0] = False  # the probe's connect fails: unhealthy, and no watchdog ping
    assert report.health().status == "unavailable" and not report.listeners_accept()
    accepting[0] = True
    report.listeners_down()  # stopping
    health = report.health()
    assert health.status == "unavailable" and not health.listeners["flight"].up
    assert server.http(None).get("/healthz").status_code == 200  # the running server's own


# --- sync without a sync worker ----------------------------------------------------------------


def test_sync_routes_without_sync_are_404_audited_and_change_nothing(server: Server) -> None:
    http = server.http()
    before = http.get("/v1/status").json()["sync"]
    r = http.get("/v1/sync")
    assert (r.status_code, r.json()["error"]) == (404, "NOT_FOUND") and "[[sync.tables]]" in r.json()[
        "detail"
    ]
    r = http.post("/v1/sync/demo.orders/run", params={"full": "true"})
    assert (r.status_code, r.json()["error"]) == (404, "NOT_FOUND")
    events = http.get("/v1/audit", params={"action": "sync.run"}).json()["events"]
    assert events[0]["target"] == "demo.orders" and events[0]["outcome"] == "not_found"
    assert http.get("/v1/status").json()["sync"] == before == {"configured": False}


def test_sync_cli_refuses_an_answer_that_is_not_its_struct(server: Server) -> None:
    """``quiver sync`` decodes strictly: a body of another shape is one clear UNAVAILABLE
    line naming the route and the Struct, never a KeyError (here: /v1/status's answer)."""
    with LocalServer(server.runtime.config, url=server.http_url) as local:
        remote = _Remote(local)
        with pytest.raises(Unavailable) as err:
            remote._decode("GET", "/v1/status", SyncStatus)
        with pytest.raises(ServerRefused) as refused:  # no sync on this server: its 404, said
            remote.status()
    assert "/v1/status answered a body that is not a SyncStatus" in err.value.detail
    assert len(err.value.detail) < 600
    assert refused.value.status == 404 and "sync is not configured" in refused.value.detail


# --- the async-query actions answer one Struct -----------------------------------------------------


def _documented_query_status_fields() -> tuple[set[str], set[str]]:
    """The fields actions.md's ``query-status`` row names: those of every answer (the braces),
    and those only an async export's status has."""
    row = next(
        line for line in (DOCS / "actions.md").read_text().splitlines() if line.startswith("| `query-status`")
    )
    always, _, rest = row.split("|")[3].partition("}")
    task = re.search(r"for an async export also ([^;(]*)", rest)
    assert task is not None, "actions.md: the query-status row names the fields of an async export"
    return set(re.findall(r'"(\w+)"', always)), set(re.findall(r'"(\w+)"', task.group(1)))


def _action(client: flight.FlightClient, token: str, name: str, body: dict[str, Any]) -> bytes:
    (result,) = client.do_action(flight.Action(name, json.dumps(body).encode()), call_options(token))
    return bytes(result.body.to_pybytes())


def test_async_query_actions_answer_the_documented_struct(server: Server) -> None:
    client, token = server.flight(), server.demo_token
    assert token is not None
    documented, task_only = _documented_query_status_fields()
    assert documented | task_only == {f.name for f in msgspec.structs.fields(QueryStatus)}
    raw = _action(client, token, "submit-query", {"sql": "SELECT 7 AS n", "max_rows": 5})
    submitted = msgspec.json.decode(raw, type=QueryStatus, strict=True)
    assert set(json.loads(raw)) == documented and submitted.state in ("queued", "running", "succeeded")

    def finished() -> QueryStatus | None:
        raw = _action(client, token, "query-status", {"id": submitted.id})
        s = msgspec.json.decode(raw, type=QueryStatus, strict=True)
        return s if s.state == "succeeded" else None

    done = wait_until(finished, what="the async query to succeed")
    assert (done.rows, done.max_rows, done.max_rows_reason, done.error) == (1, 5, "max_rows", None)
    cancelled = msgspec.json.decode(
        _action(client, token, "cancel-query", {"id": submitted.id}), type=QueryStatus, strict=True
    )
    assert cancelled.state == "succeeded" and not cancelled.cancel_requested  # finished: left as it is
    with pytest.raises(flight.FlightError) as err:
        _action(client, token, "query-status", {"id": "q_" + "z" * 500})
    info = error_info(err.value)
    assert info["code"] == "NOT_FOUND" and len(info["detail"]) < 400


# --- concurrent callers ----------------------------------------------------------------------------


@pytest.fixture
def busy(tmp_path: Path) -> Iterator[Server]:
    s = start_server(tmp_path / "data")
    yield s
    s.stop()


def test_status_and_health_hold_under_concurrent_callers(busy: Server) -> None:
    """Eight threads ask /v1/status, /healthz and /metrics while others query over Flight:
    every answer is 200 and decodes strictly into its Struct."""
    failures: list[str] = []
    token = busy.demo_token
    assert token is not None
    sql = json.dumps({"kind": "query", "sql": "SELECT customer_id, count(*) FROM demo.orders GROUP BY ALL"})

    def ask(_n: int) -> None:
        http = busy.http()
        for _ in range(15):
            r = http.get("/v1/status")
            if r.status_code != 200:
                failures.append(f"status {r.status_code}: {r.text[:200]}")
                continue
            status = msgspec.json.decode(r.content, type=Status, strict=True)
            if not isinstance(status.section_errors, msgspec.UnsetType):
                failures.append(f"section errors: {status.section_errors}")
            h = http.get("/healthz")
            msgspec.json.decode(h.content, type=Health, strict=True)
            if h.status_code != 200 or http.get("/metrics").status_code != 200:
                failures.append(f"healthz {h.status_code}")

    def query(n: int) -> None:
        client = busy.flight()
        for i in range(10):
            try:
                descriptor = flight.FlightDescriptor.for_command(
                    sql.replace("ALL", f"ALL LIMIT {n * 10 + i + 1}")
                )
                info = client.get_flight_info(descriptor, call_options(token))
                client.do_get(info.endpoints[0].ticket, call_options(token)).read_all()
            except flight.FlightError as e:
                failures.append(f"query: {e}")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=query, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    idle = wait_until(
        lambda: (q := _status(busy).queries) is not msgspec.UNSET and q.queries == 0 and q.streaming == 0,
        what="every admission slot to be free again",
    )
    assert idle
