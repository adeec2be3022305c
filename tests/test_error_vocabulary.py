"""One vocabulary of failure (flight_server/errors.py ``classify``): a DuckDB fault gets the same
code whether DuckDB raised it directly (planning, the head of a DoGet), through Arrow while a
stream was fed (an OSError/ArrowInvalid carrying DuckDB's message), or in an async query."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_server.errors import classify, duckdb_error, stream_error
from tests.harness import Server, call_options, error_info, wait_until
from tests.test_dataplane import cmd

MESSAGES: list[tuple[type[duckdb.Error], str, str]] = [
    (
        duckdb.ConversionException,
        "Conversion Error: Could not convert string 'x' to INT32",
        "INVALID_ARGUMENT",
    ),
    (duckdb.InvalidInputException, "Invalid Input Error: boom", "INVALID_ARGUMENT"),
    (duckdb.OutOfRangeException, "Out of Range Error: Overflow in multiplication", "INVALID_ARGUMENT"),
    (duckdb.BinderException, 'Binder Error: Referenced column "nope" not found', "INVALID_ARGUMENT"),
    (duckdb.ParserException, 'Parser Error: syntax error at or near "selec"', "INVALID_ARGUMENT"),
    (duckdb.CatalogException, "Catalog Error: Table with name nope does not exist!", "INVALID_ARGUMENT"),
    (duckdb.ConstraintException, "Constraint Error: NOT NULL constraint failed", "INVALID_ARGUMENT"),
    (duckdb.NotImplementedException, "Not implemented Error: this", "INVALID_ARGUMENT"),
    (duckdb.TypeMismatchException, "Type Mismatch Error: x", "INVALID_ARGUMENT"),
    (
        duckdb.PermissionException,
        "Permission Error: file system operations are disabled",
        "PERMISSION_DENIED",
    ),
    (
        duckdb.OutOfMemoryException,
        "Out of Memory Error: failed to allocate data of size 16.0 MiB",
        "RESOURCE_EXHAUSTED",
    ),
    (duckdb.InterruptException, "INTERRUPT Error: Interrupted!", "CANCELLED"),
]


@pytest.mark.parametrize(("cls", "message", "code"), MESSAGES, ids=[m[1].split(":")[0] for m in MESSAGES])
def test_every_path_gives_one_fault_one_code(cls: type[duckdb.Error], message: str, code: str) -> None:
    direct = duckdb_error(cls(message))
    assert direct.code == code
    for carried in (OSError(message), pa.ArrowInvalid(message), pa.ArrowException(message)):
        via_arrow = classify(carried)
        assert via_arrow is not None and via_arrow.code == code
        assert via_arrow.detail == direct.detail
        streamed = stream_error(carried, "rid", timed_out=False, timeout_seconds=1.0)
        assert json.loads(streamed.extra_info)["code"] == code


def test_an_interrupt_after_the_deadline_is_deadline_exceeded_on_every_path() -> None:
    for exc in (
        duckdb.InterruptException("INTERRUPT Error: Interrupted!"),
        OSError("INTERRUPT Error: Interrupted!"),
    ):
        err = classify(exc, timed_out=True, timeout_seconds=2)
        assert err is not None and err.code == "DEADLINE_EXCEEDED"


def test_faults_of_ours_are_not_classified() -> None:
    assert classify(duckdb.IOException("IO Error: disk on fire")) is None
    assert classify(OSError("something else entirely")) is None
    assert classify(ValueError("a bug")) is None


# A conversion that fails at run time, on the 6th row: the same fault on the DoGet path and
# the async path.
RUNTIME_FAULT = "SELECT CAST(CASE WHEN range > 5 THEN 'x' ELSE '1' END AS INTEGER) AS v FROM range(10)"


def test_doget_and_async_queries_agree_on_a_runtime_fault(server: Server) -> None:
    client, opts = server.flight(), call_options(server.demo_token)
    with pytest.raises(flight.FlightError) as caught:
        info = client.get_flight_info(cmd(kind="query", sql=RUNTIME_FAULT), opts)
        client.do_get(info.endpoints[0].ticket, opts).read_all()
    on_doget = error_info(caught.value)

    def action(name: str, body: dict[str, object]) -> dict[str, object]:
        (result,) = client.do_action(flight.Action(name, json.dumps(body).encode()), opts)
        return json.loads(result.body.to_pybytes())

    submitted = action("submit-query", {"sql": RUNTIME_FAULT})
    status = wait_until(
        lambda: (
            (s := action("query-status", {"id": submitted["id"]}))["state"] not in ("queued", "running") and s
        ),
        30,
        what="the async query to finish",
    )
    assert status["state"] == "failed"
    error = status["error"]
    assert isinstance(error, dict)
    assert on_doget["code"] == error["code"] == "INVALID_ARGUMENT"
    assert "Could not convert" in on_doget["detail"] and "Could not convert" in str(error["detail"])
