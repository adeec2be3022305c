"""The allowlist and the SQL guard hold for live tables exactly as for stored ones: the
project's escape corpus (tests/test_sqlguard.py) runs against a server where its tables
``demo.orders``, ``demo.customers`` and ``secret.salaries`` are live tables (Snowflake, the
fakesnow emulator) hiding the stored ones of the same name, and every statement gets the
corpus's own code — with nothing sent to Snowflake but metadata reads."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow.flight as flight
import pytest

from tests.harness import Server, call_options, error_info, start_server
from tests.sync_emulator import RECORDER, Emulator, Source
from tests.test_flight_sql_guard import CORPUS
from tests.test_sqlguard import SETUP

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def src(emu: Emulator) -> Source:
    s = Source(emu, "GUARD")
    s.execute(
        "CREATE TABLE ORDERS (ID NUMBER(9,0), CUSTOMER_ID NUMBER(9,0), STATUS VARCHAR, AMOUNT FLOAT, CREATED DATE)",
        "CREATE TABLE CUSTOMERS (ID NUMBER(9,0), NAME VARCHAR, REGION VARCHAR)",
        "CREATE TABLE SALARIES (ID NUMBER(9,0), PAY NUMBER(9,0))",
        "INSERT INTO SALARIES VALUES (1, 100001)",
    )
    return s


@pytest.fixture(scope="module")
def server(emu: Emulator, src: Source, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tables = [
        {"source": src.name("ORDERS"), "target": "demo.orders"},
        {"source": src.name("CUSTOMERS"), "target": "demo.customers"},
        {"source": src.name("SALARIES"), "target": "secret.salaries"},
    ]
    s = start_server(
        tmp_path_factory.mktemp("live-guard"),
        demo=False,
        snowflake=emu.snowflake_section(),
        live={"tables": tables, "cache_ttl_seconds": 0},
    )
    with s.catalog.db.transaction() as cur:
        cur.execute(SETUP)
    assert s.http().post("/v1/swarms", json={"name": "analysts", "tables": ["demo.*"]}).status_code == 201
    yield s
    s.stop()


@pytest.mark.parametrize(
    ("family", "sql", "code"), CORPUS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(CORPUS)]
)
def test_the_escape_corpus_holds_for_live_tables(
    server: Server, src: Source, family: str, sql: str, code: str
) -> None:
    token = server.mint("agent", "analysts", "guard-live")
    client = server.flight()
    mark = RECORDER.mark()
    with pytest.raises(flight.FlightError) as raised:
        info = client.get_flight_info(
            flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql})),
            call_options(token),
        )
        for endpoint in info.endpoints:
            client.do_get(endpoint.ticket, call_options(token)).read_all()
    assert error_info(raised.value)["code"] == code, (family, sql, error_info(raised.value))
    sent = [q for q in RECORDER.since(mark) if src.database in q and "information_schema" not in q]
    assert not sent, (family, sql, sent)


def test_the_live_secret_table_is_refused_with_the_words_of_a_missing_one(server: Server) -> None:
    token = server.mint("agent", "analysts", "guard-live2")
    client = server.flight()
    details = []
    for sql in ("SELECT * FROM secret.salaries", "SELECT * FROM secret.no_such_table"):
        with pytest.raises(flight.FlightError) as raised:
            client.get_flight_info(
                flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql})),
                call_options(token),
            )
        details.append(error_info(raised.value))
    assert [d["code"] for d in details] == ["PERMISSION_DENIED", "PERMISSION_DENIED"]
    # The same sentence; only the hint's order (closest names first) follows the name asked for.
    words = [d["detail"].split("; you may read:")[0] for d in details]
    assert words[0].replace("salaries", "X") == words[1].replace("no_such_table", "X")
