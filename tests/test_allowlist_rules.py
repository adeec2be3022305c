"""Allowlist entries with rules, swarm attributes and agent-token attributes — the control
plane's half of proto_docs/governance.md, "Rules and attributes" — on a real server: what is
accepted and how it is stored and shown, every bad input a 422 (or the gate's 400) naming the
problem with the stored allowlist, the attributes and the in-memory policy unchanged, tokens
carrying their attributes through refreshes, memory equal to the database after racing
admin writes, and the rules surviving a restart and a snapshot."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import msgspec
import pyarrow.flight as flight
import pytest

from catalog.errors import Unprocessable
from catalog.identity import Principal
from catalog.rules import MAX_ROW_FILTER_CHARS, TableRule
from catalog.tables import TableRef
from tests.harness import Server, call_options, start_server

CUSTOMERS = TableRef("demo", "customers")
RULE = {
    "table": "demo.customers",
    "except_columns": ["address"],
    "row_filter": "country = :country AND segment <> ':segment'",
    "mask": {"email": "hash"},
}


def new_swarm(server: Server, prefix: str, tables: list[Any] | None = None) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    r = server.http().post("/v1/swarms", json={"name": name, "tables": tables or ["demo.orders"]})
    assert r.status_code == 201, r.text
    return name


def agent(swarm: str, name: str = "a1") -> Principal:
    """A principal of ``swarm`` (what the policy is asked about; never a token)."""
    from datetime import UTC, datetime

    return Principal(
        kind="agent", jti="j", subject="s", expires_at=datetime.now(UTC), swarm=swarm, agent=name
    )


def state(server: Server, swarm: str) -> dict[str, Any]:
    """What is stored (HTTP and the database) and what is held in memory for ``swarm``."""
    catalog = server.catalog
    committed = catalog.swarms.get_allowlist(swarm)
    return {
        "http": server.http().get(f"/v1/swarms/{swarm}").json(),
        "patterns": committed.patterns,
        "rules": committed.rules,
        "attributes": catalog.swarms.get_attributes(swarm),
        "policy": catalog.policy.allowlist(swarm),
        "policy_rule": catalog.policy.rule_for(agent(swarm), CUSTOMERS),
        "policy_attributes": dict(catalog.policy.attributes(swarm)),
    }


def refusal(r: httpx.Response, status: int = 422) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == "INVALID_ARGUMENT"
    assert len(body["detail"]) <= 600 and "Traceback" not in body["detail"]
    return str(body["detail"])


# --- accepted ----------------------------------------------------------------------------------


def test_a_ruled_entry_is_stored_canonically_and_held_by_the_policy(server: Server) -> None:
    swarm = new_swarm(server, "ruled")
    http = server.http()
    r = http.put(f"/v1/swarms/{swarm}/allowlist", json={"tables": ["demo.orders", RULE, "later.*"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tables"] == ["demo.customers", "demo.orders", "later.*"]
    assert out["matching"] == ["demo.customers", "demo.orders"]
    assert out["warnings"] == ["later.* matches no table"]
    shown = {
        "table": "demo.customers",
        "except_columns": ["address"],
        # :name is written $name; the ':segment' inside a string literal is no parameter.
        "row_filter": "country = $country AND segment <> ':segment'",
        "mask": {"email": "hash"},
    }
    assert out["entries"] == [shown, "demo.orders", "later.*"]
    rule = server.catalog.policy.rule_for(agent(swarm), CUSTOMERS)
    assert rule == TableRule(
        table="demo.customers",
        except_columns=("address",),
        row_filter="country = $country AND segment <> ':segment'",
        parameters=("country",),
        mask=(("email", "hash"),),
    )
    assert server.catalog.policy.allowlist(swarm) == ("demo.customers", "demo.orders", "later.*")
    # The admin view round-trips: PUT what GET shows and nothing changes.
    view = http.get(f"/v1/swarms/{swarm}").json()
    assert view["entries"] == out["entries"] and view["tables"] == out["tables"]
    assert view["attributes"] == {} and view["budget"] == {}
    assert http.put(f"/v1/swarms/{swarm}/allowlist", json={"tables": view["entries"]}).json() == out
    assert server.catalog.policy.rule_for(agent(swarm), CUSTOMERS) == rule


def test_rule_details_columns_case_order_and_plain_objects(server: Server) -> None:
    """Columns are matched case-insensitively and kept in the table's order and spelling; a
    rule on a table wins over a schema.* pattern; an object with no rules is a plain entry."""
    swarm = new_swarm(server, "details")
    body = {
        "tables": [
            {
                "table": "DEMO.Customers",
                "columns": ["EMAIL", "customer_id", "Country"],
                "mask": {"Email": "last4"},
            },
            {"table": "demo.orders"},
            "demo.*",
        ]
    }
    r = server.http().put(f"/v1/swarms/{swarm}/allowlist", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["entries"] == [
        "demo.*",
        {
            "table": "demo.customers",
            "columns": ["customer_id", "email", "country"],
            "mask": {"email": "last4"},
        },
        "demo.orders",
    ]
    rule = server.catalog.policy.rule_for(agent(swarm), CUSTOMERS)
    assert (
        rule is not None and rule.columns == ("customer_id", "email", "country") and rule.row_filter is None
    )
    assert server.catalog.policy.rule_for(agent(swarm), TableRef("demo", "orders")) is None
    admin = Principal(kind="admin", jti="j", subject="admin", expires_at=agent(swarm).expires_at)
    assert server.catalog.policy.rule_for(admin, CUSTOMERS) is None


@pytest.mark.parametrize(
    ("predicate", "canonical", "parameters"),
    [
        (
            "country IN ('NL', 'BE') AND NOT is_active IS NULL",
            "country IN ('NL', 'BE') AND NOT is_active IS NULL",
            (),
        ),
        ("lower(name) LIKE :prefix || '%' OR customer_id BETWEEN :lo AND :hi", None, ("hi", "lo", "prefix")),
        ("CASE WHEN segment = 'smb' THEN credit_limit < :cap ELSE true END", None, ("cap",)),
        ("CAST(customer_id AS VARCHAR) = :agent OR $swarm = 'x'", None, ("agent", "swarm")),
        ("list_contains(tags, :tag) AND signup_at >= DATE '2020-01-01'", None, ("tag",)),
        (
            "coalesce(email, '') ILIKE '%@example.com' AND customer_id::BIGINT % 2 = 0",
            "coalesce(email, '') ILIKE '%@example.com' AND customer_id::BIGINT % 2 = 0",
            (),
        ),
        ("  :Country = country OR $TIER > 2 ", "$country = country OR $tier > 2", ("country", "tier")),
    ],
)
def test_predicates_in_the_documented_subset_are_accepted(
    server: Server, predicate: str, canonical: str | None, parameters: tuple[str, ...]
) -> None:
    swarm = new_swarm(server, "pred")
    r = server.http().put(
        f"/v1/swarms/{swarm}/allowlist",
        json={"tables": [{"table": "demo.customers", "row_filter": predicate}]},
    )
    assert r.status_code == 200, r.text
    rule = server.catalog.policy.rule_for(agent(swarm), CUSTOMERS)
    assert rule is not None and rule.parameters == parameters
    assert rule.row_filter == (canonical or predicate.strip().replace(":", "$"))
    assert rule.row_filter is not None and ":" not in rule.row_filter.replace("::", "").replace("'", "")


# --- refused -----------------------------------------------------------------------------------


def ruled(**fields: Any) -> dict[str, Any]:
    return {"table": "demo.customers", **fields}


def filtered(predicate: str) -> dict[str, Any]:
    return ruled(row_filter=predicate)


BAD_ENTRIES: list[tuple[str, list[Any], str]] = [
    ("subquery", [filtered("country IN (SELECT status FROM demo.orders)")], "subqueries"),
    ("exists", [filtered("EXISTS (SELECT 1)")], "subqueries"),
    ("other table", [filtered("demo.orders.status = 'paid'")], "another table"),
    ("qualified", [filtered("o.country = 'NL'")], "another table"),
    ("unknown column", [filtered("nosuch = 1")], "'nosuch' is not a column"),
    ("rowid", [filtered("rowid < 10")], "'rowid' is not a column"),
    ("line comment", [filtered("country = 'NL' -- and more")], "comment"),
    ("block comment", [filtered("/* x */ country = 'NL'")], "comment"),
    ("two statements", [filtered("country = 'NL'; SELECT 1")], "several statements"),
    ("two expressions", [filtered("country = 'NL', segment = 'smb'")], "not a valid SQL predicate"),
    ("order by", [filtered("country = 'NL' ORDER BY 1")], "one condition"),
    ("limit", [filtered("true LIMIT 1")], "one condition"),
    ("union", [filtered("true UNION SELECT 1")], "one condition"),
    ("unbalanced", [filtered("country = 'NL') OR (true")], "not a valid SQL predicate"),
    ("aggregate", [filtered("count(*) > 1")], "aggregate"),
    ("aggregate sum", [filtered("sum(customer_id) > 1")], "aggregate"),
    ("window", [filtered("row_number() OVER () < 10")], "window"),
    ("unsafe function", [filtered("current_setting('threads') = '1'")], "current_setting() is not allowed"),
    ("file function", [filtered("length(getenv('HOME')) > 0")], "getenv() is not allowed"),
    ("volatile", [filtered("random() < 0.5")], "random() is not allowed"),
    ("schema function", [filtered("main.lower(country) = 'nl'")], "by their name alone"),
    ("positional ?", [filtered("country = ?")], "positional parameters"),
    ("positional $1", [filtered("country = $1")], "positional parameters"),
    ("star", [filtered("COLUMNS(*) IS NOT NULL")], "COLUMNS"),
    ("lambda", [filtered("list_filter(tags, x -> x = 'vip') = []")], "not allowed"),
    ("struct field", [filtered("address.city = 'Paris'")], "another table or a field"),
    ("not a condition", [filtered("customer_id + 1")], "BOOLEAN"),
    ("does not bind", [filtered("country + 1 = 2")], "does not bind"),
    ("unsafe cast", [filtered("CAST(country AS MAP(VARCHAR, VARCHAR)) IS NULL")], "cast to"),
    ("empty filter", [filtered("   ")], "empty"),
    ("long filter", [filtered("customer_id = 1 OR " * (MAX_ROW_FILTER_CHARS // 18) + "true")], "at most"),
    ("deep filter", [filtered("NOT " * 990 + "true")], "row_filter"),
    ("colon alone", [filtered(":")], "not a valid SQL predicate"),
    ("quoted parameter", [filtered('country = :"x"')], "write each parameter as :name"),
    ("glued colon", [filtered("country=segment:x")], "put a space before each :parameter"),
    ("unknown mask kind", [ruled(mask={"email": "rot13"})], "Invalid enum value 'rot13'"),
    ("mask unknown column", [ruled(mask={"mail": "hash"})], "'mail', which is not a column"),
    ("mask excluded column", [ruled(except_columns=["email"], mask={"email": "hash"})], "leave out"),
    ("columns unknown", [ruled(columns=["customer_id", "ssn"])], "'ssn', which is not a column"),
    ("except unknown", [ruled(except_columns=["ssn"])], "'ssn', which is not a column"),
    ("column twice", [ruled(columns=["email", "EMAIL"])], "twice"),
    ("both lists", [ruled(columns=["email"], except_columns=["name"])], "not both"),
    ("no columns", [ruled(columns=[])], "at least one column"),
    (
        "every column excluded",
        [
            ruled(
                except_columns=[
                    "customer_id",
                    "name",
                    "email",
                    "country",
                    "segment",
                    "signup_at",
                    "is_active",
                    "credit_limit",
                    "tags",
                    "address",
                ]
            )
        ],
        "excludes every column",
    ),
    ("rule on a pattern", [{"table": "demo.*", "columns": ["email"]}], "not the pattern"),
    ("missing table", [{"table": "demo.nope", "row_filter": "true"}], "does not exist"),
    ("system table", [{"table": "_quiver.tokens", "columns": ["jti"]}], "system schema"),
    ("bad table name", [{"table": "a.b.c"}], "is not valid"),
    ("same table twice", [ruled(columns=["email"]), ruled(columns=["name"])], "has a rule already"),
    ("string and rule", ["demo.customers", ruled(columns=["email"])], "both as a string and with a rule"),
    ("unknown field", [ruled(row_filters="true")], "unknown field `row_filters`"),
    ("wrong type", [ruled(columns="email")], "Expected `array"),
    ("no table", [{"columns": ["email"]}], "missing required field `table`"),
]


@pytest.mark.parametrize(("case", "entries", "needle"), BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
def test_a_bad_rule_is_a_422_naming_it_and_nothing_changes(
    server: Server, case: str, entries: list[Any], needle: str
) -> None:
    swarm = new_swarm(server, "bad", tables=["demo.orders", RULE])
    server.http().put(f"/v1/swarms/{swarm}/attributes", json={"country": "NL"})
    before = state(server, swarm)
    detail = refusal(
        server.http().put(f"/v1/swarms/{swarm}/allowlist", json={"tables": ["demo.orders", *entries]})
    )
    assert needle in detail, (case, detail)
    assert state(server, swarm) == before
    # The same entries refuse a new swarm, which is then not created.
    name = f"badnew-{os.urandom(3).hex()}"
    assert needle in refusal(server.http().post("/v1/swarms", json={"name": name, "tables": entries}))
    assert server.http().get(f"/v1/swarms/{name}").status_code == 404
    assert not server.catalog.swarms.exists(name) and server.catalog.policy.allowlist(name) == ()


def test_echoed_values_in_refusals_are_bounded(server: Server) -> None:
    swarm = new_swarm(server, "echo")
    before = state(server, swarm)
    huge = "x" * 50_000
    for entry in (
        ruled(columns=[huge]),
        ruled(mask={huge: "hash"}),
        filtered(f"{huge} = 1"),
        {"table": huge},
    ):
        detail = refusal(server.http().put(f"/v1/swarms/{swarm}/allowlist", json={"tables": [entry]}), 422)
        assert len(detail) < 600
    assert state(server, swarm) == before


def test_entries_of_the_wrong_json_type_stop_at_the_gate(server: Server) -> None:
    swarm = new_swarm(server, "gate")
    before = state(server, swarm)
    for entry in (5, [["demo.orders"]], ruled(mask={"email": {"kind": "hash"}})):
        detail = refusal(server.http().put(f"/v1/swarms/{swarm}/allowlist", json={"tables": [entry]}), 400)
        assert detail.startswith("request body: ")
    assert state(server, swarm) == before


# --- swarm attributes ----------------------------------------------------------------------------


def test_swarm_attributes_are_stored_shown_and_audited(server: Server) -> None:
    swarm = new_swarm(server, "attrs")
    http = server.http()
    body = {"country": "NL", "tier": 2, "ratio": 0.5, "Region_1": "emea"}
    r = http.put(f"/v1/swarms/{swarm}/attributes", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"swarm": swarm, "attributes": body}
    assert http.get(f"/v1/swarms/{swarm}/attributes").json() == {"swarm": swarm, "attributes": body}
    assert http.get(f"/v1/swarms/{swarm}").json()["attributes"] == body
    assert dict(server.catalog.policy.attributes(swarm)) == body
    bound = server.catalog.policy.bindings_for(agent(swarm, "a7"))
    assert bound == {
        "country": "NL",
        "tier": 2,
        "ratio": 0.5,
        "region_1": "emea",
        "swarm": swarm,
        "agent": "a7",
    }
    assert http.put(f"/v1/swarms/{swarm}/attributes", json={}).json()["attributes"] == {}
    assert dict(server.catalog.policy.attributes(swarm)) == {}
    events = http.get("/v1/audit", params={"action": "attributes.put"}).json()["events"]
    assert [e["outcome"] for e in events if e["target"] == swarm] == ["ok", "ok"]
    for r in (
        http.get("/v1/swarms/nope-nope/attributes"),
        http.put("/v1/swarms/nope-nope/attributes", json={"a": 1}),
    ):
        assert r.status_code == 404 and r.json()["error"] == "NOT_FOUND", r.text
    # The refused PUT neither created the swarm nor left attributes for it.
    assert not server.catalog.swarms.exists("nope-nope")
    assert dict(server.catalog.policy.attributes("nope-nope")) == {}
    with server.catalog.db.reading() as cur:
        assert cur.execute(
            "SELECT count(*) FROM _quiver.swarm_attributes WHERE swarm = 'nope-nope'"
        ).fetchone() == (0,)


BAD_ATTRIBUTES: list[tuple[str, Any, str]] = [
    ("nested object", {"a": {"b": 1}}, "not nested"),
    ("list", {"a": [1, 2]}, "not nested"),
    ("boolean", {"a": True}, "a boolean"),
    ("null", {"a": None}, "null"),
    ("reserved swarm", {"swarm": "x"}, "reserved"),
    ("reserved agent", {"Agent": "x"}, "reserved"),
    ("not an identifier", {"1a": "x"}, "not an identifier"),
    ("dashes", {"a-b": "x"}, "not an identifier"),
    ("long name", {"a" * 65: "x"}, "not an identifier"),
    ("long value", {"a": "x" * 1001}, "at most 1,000"),
    ("too many", {f"a{i}": i for i in range(65)}, "at most 64"),
    ("case twins", {"Country": "NL", "country": "BE"}, "differ only in case"),
    ("huge integer", {"a": 2**70}, "out of range"),
]


@pytest.mark.parametrize(("case", "body", "needle"), BAD_ATTRIBUTES, ids=[c[0] for c in BAD_ATTRIBUTES])
def test_bad_swarm_attributes_are_a_422_and_nothing_changes(
    server: Server, case: str, body: Any, needle: str
) -> None:
    swarm = new_swarm(server, "badattr")
    assert server.http().put(f"/v1/swarms/{swarm}/attributes", json={"country": "NL"}).status_code == 200
    before = state(server, swarm)
    detail = refusal(server.http().put(f"/v1/swarms/{swarm}/attributes", json=body))
    assert needle in detail, (case, detail)
    assert state(server, swarm) == before
    events = server.http().get("/v1/audit", params={"action": "attributes.put"}).json()["events"]
    assert [e["outcome"] for e in events if e["target"] == swarm] == ["invalid_argument", "ok"]


def test_attributes_that_are_not_an_object_are_refused(server: Server) -> None:
    swarm = new_swarm(server, "notobj")
    before = state(server, swarm)
    for body in ([1], "x", 3):
        refusal(server.http().put(f"/v1/swarms/{swarm}/attributes", json=body), 400)
    assert state(server, swarm) == before


# --- agent attributes in tokens ------------------------------------------------------------------


def tokens_recorded(server: Server) -> int:
    with server.catalog.db.reading() as cur:
        row = cur.execute("SELECT count(*) FROM _quiver.tokens").fetchone()
    assert row is not None
    return int(row[0])


def test_agent_attributes_travel_in_the_token_and_its_refreshes(server: Server) -> None:
    swarm = new_swarm(server, "tokattr", tables=[RULE])
    http = server.http()
    r = http.post(
        "/v1/tokens",
        json={"kind": "agent", "swarm": swarm, "agent": "nl-1", "attributes": {"country": "NL", "tier": 3}},
    )
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["attributes"] == {"country": "NL", "tier": 3}
    principal = server.catalog.tokens.check(issued["token"])
    assert principal.attributes == (("country", "NL"), ("tier", 3))
    assert server.catalog.policy.bindings_for(principal)["country"] == "NL"
    # whoami lists table names, never the rule text.
    who = server.http(issued["token"]).get("/v1/whoami").json()
    assert who["tables"] == ["demo.customers"]
    assert "country" not in json.dumps(who) and "row_filter" not in json.dumps(who)
    # A refresh carries exactly the same attributes, and cannot be given others.
    refreshed = server.http(issued["token"]).post("/v1/tokens/refresh", json={"ttl_seconds": 600})
    assert refreshed.status_code == 201, refreshed.text
    assert server.catalog.tokens.check(refreshed.json()["token"]).attributes == principal.attributes
    again = server.http(refreshed.json()["token"]).post(
        "/v1/tokens/refresh", json={"attributes": {"country": "BE"}}
    )
    assert "attributes" in refusal(again, 400)
    assert server.catalog.tokens.check(refreshed.json()["token"]).attributes == principal.attributes
    # So does the Flight action refresh-token (the same TokenService.refresh).
    client = server.flight()
    action = flight.Action("refresh-token", b'{"ttl_seconds": 600}')
    answer = next(iter(client.do_action(action, call_options(refreshed.json()["token"])))).body.to_pybytes()
    assert json.loads(answer)["attributes"] == {"country": "NL", "tier": 3}
    assert server.catalog.tokens.check(json.loads(answer)["token"]).attributes == principal.attributes
    # A token without attributes has none.
    assert server.catalog.tokens.check(server.mint(swarm=swarm, agent="plain")).attributes == ()


def test_a_swarm_token_may_mint_agent_tokens_with_attributes(server: Server) -> None:
    swarm = new_swarm(server, "swarmmint")
    swarm_token = server.mint(kind="swarm", swarm=swarm)
    r = server.http(swarm_token).post(
        "/v1/tokens", json={"kind": "agent", "agent": "s1", "attributes": {"country": "FR"}}
    )
    assert r.status_code == 201, r.text
    assert server.catalog.tokens.check(r.json()["token"]).attributes == (("country", "FR"),)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"kind": "swarm", "swarm": "{swarm}", "attributes": {"a": 1}}, "attributes are for agent tokens"),
        ({"kind": "admin", "attributes": {}}, "attributes are for agent tokens"),
        ({"kind": "agent", "swarm": "{swarm}", "agent": "x", "attributes": {"agent": "y"}}, "reserved"),
        ({"kind": "agent", "swarm": "{swarm}", "agent": "x", "attributes": {"a": {"b": 1}}}, "not nested"),
        ({"kind": "agent", "swarm": "{swarm}", "agent": "x", "attributes": {"a": False}}, "a boolean"),
        (
            {
                "kind": "agent",
                "swarm": "{swarm}",
                "agent": "x",
                "attributes": {f"a{i}": "v" * 100 for i in range(30)},
            },
            "a token carries at most 2,048",
        ),
    ],
)
def test_bad_token_attributes_are_a_422_and_no_token_is_issued(
    server: Server, body: dict[str, Any], needle: str
) -> None:
    swarm = new_swarm(server, "badtok")
    body = {k: (swarm if v == "{swarm}" else v) for k, v in body.items()}
    before = tokens_recorded(server)
    assert needle in refusal(server.http().post("/v1/tokens", json=body))
    assert tokens_recorded(server) == before


# --- memory equals the database ------------------------------------------------------------------


def committed_in_db(server: Server, swarm: str) -> tuple[list[str], list[TableRule], dict[str, Any]]:
    with server.catalog.db.reading() as cur:
        rows = cur.execute(
            "SELECT pattern, rule FROM _quiver.allowlist WHERE swarm = ? ORDER BY pattern", [swarm]
        ).fetchall()
        attrs = cur.execute("SELECT body FROM _quiver.swarm_attributes WHERE swarm = ?", [swarm]).fetchall()
    rules = [msgspec.json.decode(r, type=TableRule) for _, r in rows if r is not None]
    return [p for p, _ in rows], rules, (json.loads(attrs[0][0]) if attrs else {})


def held_in_memory(server: Server, swarm: str) -> tuple[list[str], list[TableRule], dict[str, Any]]:
    policy = server.catalog.policy
    rule = policy.rule_for(agent(swarm), CUSTOMERS)
    return list(policy.allowlist(swarm)), [rule] if rule else [], dict(policy.attributes(swarm))


def test_racing_allowlist_and_attribute_writes_leave_memory_equal_to_the_database(server: Server) -> None:
    swarm = new_swarm(server, "race")
    bodies = [
        {"tables": ["demo.orders", filtered(f"customer_id > {i}")]} if i % 3 else {"tables": [f"s{i}.*"]}
        for i in range(12)
    ]
    statuses: list[int] = []
    lock = threading.Lock()

    def put(i: int) -> None:
        with httpx.Client(
            base_url=server.http_url, headers={"authorization": f"Bearer {server.admin_token}"}
        ) as c:
            for j in range(4):
                if (i + j) % 2:
                    r = c.put(f"/v1/swarms/{swarm}/allowlist", json=bodies[(i * 4 + j) % len(bodies)])
                else:
                    r = c.put(f"/v1/swarms/{swarm}/attributes", json={"n": i * 10 + j, "who": f"t{i}"})
                with lock:
                    statuses.append(r.status_code)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses and all(s in (200, 409) for s in statuses), statuses
    assert statuses.count(200) >= len(statuses) // 2
    assert held_in_memory(server, swarm) == committed_in_db(server, swarm)


# --- durability --------------------------------------------------------------------------------


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[Path, list[Server]]]:
    servers: list[Server] = []
    yield tmp_path / "data", servers
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop()


def test_rules_and_attributes_survive_a_restart_and_are_in_a_snapshot(
    own_server: tuple[Path, list[Server]],
) -> None:
    data_dir, servers = own_server
    first = start_server(data_dir)
    servers.append(first)
    swarm = new_swarm(first, "durable", tables=["demo.orders", RULE])
    assert first.http().put(f"/v1/swarms/{swarm}/attributes", json={"country": "NL"}).status_code == 200
    held = held_in_memory(first, swarm)
    view = first.http().get(f"/v1/swarms/{swarm}").json()
    with (
        first.catalog.db.snapshot() as copy,
        contextlib.closing(duckdb.connect(str(copy), read_only=True)) as con,
    ):
        rules = con.execute(
            "SELECT pattern, rule FROM _quiver.allowlist WHERE swarm = ? AND rule IS NOT NULL", [swarm]
        ).fetchall()
        attrs = con.execute("SELECT body FROM _quiver.swarm_attributes WHERE swarm = ?", [swarm]).fetchall()
    assert [p for p, _ in rules] == ["demo.customers"] and msgspec.json.decode(
        rules[0][1], type=TableRule
    ) == held[1][0]
    assert json.loads(attrs[0][0]) == {"country": "NL"}
    first.stop()
    servers.remove(first)
    second = start_server(data_dir)
    servers.append(second)
    assert held_in_memory(second, swarm) == held
    assert second.http().get(f"/v1/swarms/{swarm}").json() == view
    # Deleting the swarm drops its rules and attributes, in memory and on disk.
    assert second.http().delete(f"/v1/swarms/{swarm}").status_code == 204
    assert held_in_memory(second, swarm) == ([], [], {})
    assert committed_in_db(second, swarm) == ([], [], {})


def test_text_no_json_body_can_carry_is_refused_in_the_catalog_too(server: Server) -> None:
    """A lone surrogate cannot arrive over HTTP (the gate's decoder refuses it), but the store
    is called directly too (quiver/demo.py): still a 422, not DuckDB's TypeError."""
    swarm = new_swarm(server, "surrogate")
    before = state(server, swarm)
    with pytest.raises(Unprocessable, match="lone surrogate"):
        server.catalog.swarms.set_allowlist(swarm, [filtered("country = '\ud800'")])
    assert state(server, swarm) == before
