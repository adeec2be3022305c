"""``hash`` masks are keyed (catalog/views.py ``mask_expression``, catalog/keys.py
``load_or_create_mask_key``), on real servers over the demo data: a masked value is SHA-256 of
the server's mask key and the clear value, so an agent cannot compute the hash of a value it
guesses — with an unkeyed hash, ``WHERE email = sha256('ada@example.com')`` confirms a guess,
and a column of a small domain (a country) reads back whole from a table of its hashes. The
key is made at the first start (0600, beside the signing key), kept across restarts, never
shown to an agent, and a file that is not a key stops the start."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.flight as flight
import pytest

from catalog import ConfigError
from catalog.keys import MASK_KEY_FILE
from tests.harness import Server, call_options, flight_query, start_server

RULE = {"table": "demo.customers", "mask": {"email": "hash", "country": "hash"}}
SQL = "SELECT customer_id, email, country FROM demo.customers WHERE email IS NOT NULL ORDER BY customer_id LIMIT 5"


def _agent(server: Server) -> str:
    r = server.http().post("/v1/swarms", json={"name": "masked", "tables": [RULE]})
    assert r.status_code in (201, 409), r.text
    return server.mint(swarm="masked")


def _clear(server: Server) -> list[dict[str, object]]:
    with server.catalog.db.reading() as cur:
        return cur.sql(SQL).to_arrow_table().to_pylist()


def test_a_hash_mask_is_keyed_and_a_guess_cannot_be_checked(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        key_file = tmp_path / "keys" / MASK_KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert len(key) == 64 and int(key, 16) >= 0
        agent = _agent(server)
        got = flight_query(server, agent, SQL).to_pylist()
        clear = _clear(server)
        assert [r["customer_id"] for r in got] == [r["customer_id"] for r in clear]
        with server.catalog.db.reading() as cur:
            for seen, row in zip(got, clear, strict=True):
                for column in ("email", "country"):
                    keyed, plain = cur.execute(
                        "SELECT sha256(? || CAST(? AS VARCHAR)), sha256(CAST(? AS VARCHAR))",
                        [key, row[column], row[column]],
                    ).fetchone() or (None, None)
                    assert seen[column] == keyed != plain
        # The guesses an unkeyed hash would confirm find nothing.
        email, country = clear[0]["email"], clear[0]["country"]
        for column, value in (("email", email), ("country", country)):
            guess = f"SELECT count(*) AS n FROM demo.customers WHERE {column} = sha256(?)"
            assert flight_query(server, agent, guess, [value]).to_pylist() == [{"n": 0}]
        # Equal values still hash equally: masked columns group and join.
        groups = flight_query(server, agent, "SELECT count(DISTINCT country) AS n FROM demo.customers")
        with server.catalog.db.reading() as cur:
            assert (
                groups.to_pylist()
                == cur.sql("SELECT count(DISTINCT country) AS n FROM demo.customers")
                .to_arrow_table()
                .to_pylist()
            )
        # The key is in no answer an agent can get: not in an error of a ruled read.
        with pytest.raises(flight.FlightError) as e:
            server.flight().get_flight_info(
                flight.FlightDescriptor.for_command(
                    b'{"kind": "query", "sql": "SELECT email + 1 FROM demo.customers"}'
                ),
                call_options(agent),
            )
        assert key not in str(e.value) and "sha256" not in str(e.value)
    finally:
        server.stop()

    # A restart keeps the key, so masked values stay what they were.
    again = start_server(tmp_path)
    try:
        assert key_file.read_text().strip() == key
        assert flight_query(again, _agent(again), SQL).to_pylist() == got
    finally:
        again.stop()


#: Failing reads of a masked column, each an error an agent gets back: none may carry the key.
FAILING = (
    "SELECT email + 1 FROM demo.customers",
    "SELECT CAST(email AS INTEGER) FROM demo.customers",
    "SELECT email FROM demo.customers WHERE email = 5",
    "SELECT sum(email) FROM demo.customers",
    "SELECT error(email) FROM demo.customers",
    "SELECT regexp_matches(email, '(') FROM demo.customers",
    "SELECT strptime(email, '%Y') FROM demo.customers",
    "SELECT email FROM demo.customers GROUP BY ALL HAVING email > 1",
    "SELECT * FROM (SELECT email, 1 / 0 AS z FROM demo.customers) WHERE z::INT = email::INT",
)


def test_no_error_of_a_masked_read_carries_the_key(tmp_path: Path) -> None:
    """The key is in the view's text; an error of a ruled read withholds DuckDB's message where
    it could quote values or text (governance.md), over Flight and over POST /v1/query."""
    server = start_server(tmp_path)
    try:
        key = (tmp_path / "keys" / MASK_KEY_FILE).read_text().strip()
        agent = _agent(server)
        for sql in FAILING:
            with pytest.raises(flight.FlightError) as e:
                flight_query(server, agent, sql)
            assert key not in str(e.value) and "sha256" not in str(e.value).lower(), sql
            r = server.http(agent).post("/v1/query", json={"sql": sql})
            assert r.status_code == 400 and r.json()["error"] == "INVALID_ARGUMENT", (sql, r.text)
            assert key not in r.text and "sha256" not in r.text.lower(), sql
        assert flight_query(server, agent, SQL).num_rows == 5  # nothing changed by the failures
    finally:
        server.stop()


def test_a_file_that_is_not_a_mask_key_stops_the_start(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    server.stop()
    key_file = tmp_path / "keys" / MASK_KEY_FILE
    key_file.write_text("not a key\n")
    with pytest.raises(ConfigError, match="is not a mask key"):  # one line from `quiver serve`
        start_server(tmp_path)
    assert key_file.read_text() == "not a key\n"  # left for the operator to restore
    served = subprocess.run(
        [
            sys.executable,
            "-m",
            "quiver",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--flight-port",
            "0",
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        served.returncode == 2 and "is not a mask key" in served.stderr and "Traceback" not in served.stderr
    )
    assert key_file.read_text() == "not a key\n"
