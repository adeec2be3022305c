"""The agents of the load test: well-behaved ones running an agent's mixed workload through
the shipped client, and hostile ones doing what issue #8 found could hurt the server.

Every agent is a thread with a token of its own (minted through the control plane for its
swarm). Every loop is bounded: a first pass over the agent's classes (or hostile kinds), then
until the run's deadline, at most ``MAX_ITERATIONS``; it ends at once when the server dies;
and every call carries a client-side timeout, so no agent can hang the run. Each request is recorded under an operation class with its latency and its outcome:
``ok``, or the error's stable ``code`` (``extra_info``); a code *inferred* from the gRPC
status because the server sent no ``extra_info`` carries a ``*`` (e.g. ``INTERNAL*``), and
control-plane answers are ``HTTP <status>``.
"""

from __future__ import annotations

import functools
import json
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pyarrow.flight as flight

from quiver_client import QuiverClient, QuiverClientError, client_error

MAX_ITERATIONS = 1_000_000  # per agent; the deadline normally ends the loop first
CALL_TIMEOUT_SECONDS = 60.0  # per call, client side
REUSE_STREAMS = 8  # concurrent DoGets of one ticket
FLOOD_BURST = 20  # bad-token calls per listener per flood round

# The good agents' mix (relative weights). Every agent first does each class once, in a
# random order, so even a short run covers them all.
GOOD_MIX: dict[str, int] = {
    "point": 25,
    "param": 20,
    "sample": 10,
    "profile": 5,
    "scan": 10,
    "list": 10,
    "whoami": 10,
    "async": 5,
    "http_whoami": 5,
}

# Hostile kinds, and the operation classes each produces.
HOSTILE_KINDS: dict[str, tuple[str, ...]] = {
    "constant": ("h.range", "h.repeat"),
    "reuse": ("h.reuse_info", "h.reuse_doget"),
    "flood": ("h.flood_flight", "h.flood_http"),
    "nested": ("h.nested_list", "h.nested_json"),
    "params": ("h.param_ref",),
    "oversize": ("h.big_command", "h.long_sql", "h.long_action", "h.long_query_id"),
}

_REFUSED = frozenset({"INVALID_ARGUMENT", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
# What issue #8 expects each hostile class to get: refusals with a code (never INTERNAL, never
# a code the server did not send); for ticket re-use, streams up to the per-principal cap.
EXPECTED: dict[str, frozenset[str]] = {
    "h.range": _REFUSED,
    "h.repeat": _REFUSED,
    "h.nested_list": frozenset({"INVALID_ARGUMENT"}),
    "h.nested_json": frozenset({"INVALID_ARGUMENT"}),
    "h.param_ref": frozenset({"INVALID_ARGUMENT"}),
    "h.reuse_info": frozenset({"ok"}),
    "h.reuse_doget": frozenset({"ok", "RESOURCE_EXHAUSTED"}),
    "h.flood_flight": frozenset({"UNAUTHENTICATED"}),
    "h.flood_http": frozenset({"HTTP 401"}),
    "h.big_command": frozenset({"INVALID_ARGUMENT"}),
    "h.long_sql": frozenset({"INVALID_ARGUMENT"}),
    "h.long_action": frozenset({"INVALID_ARGUMENT"}),
    "h.long_query_id": frozenset({"INVALID_ARGUMENT", "NOT_FOUND"}),
}


def expected(op: str, hostile: bool) -> frozenset[str]:
    """The outcomes that are right for ``op``: only "ok" for a well-behaved agent."""
    return EXPECTED.get(op, frozenset()) if hostile else frozenset({"ok"})


@dataclass(slots=True)
class Sample:
    op: str
    hostile: bool
    at: float  # seconds after the run's start, when the request finished
    seconds: float
    outcome: str  # "ok" or an error code


@dataclass
class Recorder:
    """Every request of the run, thread-safe."""

    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    #: per ticket re-use round: how many DoGets of the one ticket were streaming at once
    reuse_peaks: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: str, hostile: bool, seconds: float, outcome: str) -> None:
        sample = Sample(op, hostile, time.monotonic() - self.started, seconds, outcome)
        with self._lock:
            self.samples.append(sample)

    def add_reuse_peak(self, streams: int) -> None:
        with self._lock:
            self.reuse_peaks.append(streams)

    def timed(self, op: str, hostile: bool, call: Callable[[], Any]) -> Any:
        """Run ``call``, record it; return its value or None when it raised."""
        started = time.perf_counter()
        try:
            value = call()
        except Exception as e:
            self.add(op, hostile, time.perf_counter() - started, error_code(e))
            return None
        self.add(op, hostile, time.perf_counter() - started, "ok")
        return value


def error_code(exc: BaseException) -> str:
    """The stable code of a failure; ``*`` marks one the server did not send (no
    ``extra_info``: inferred from the gRPC status or the transport)."""
    if isinstance(exc, QuiverClientError):
        return exc.code
    if isinstance(exc, httpx.HTTPError):
        return f"HTTP {type(exc).__name__}"
    if isinstance(exc, flight.FlightError) and exc.extra_info:
        try:
            return str(json.loads(exc.extra_info)["code"])
        except (ValueError, KeyError, TypeError):
            pass
    return client_error(exc).code + "*"


@dataclass(frozen=True)
class Tables:
    """Row counts of the demo tables (keys are drawn from them)."""

    customers: int
    orders: int
    events: int


@dataclass
class Run:
    """What every agent shares: where the server is, when to stop."""

    flight_url: str
    http_url: str
    deadline: float  # time.monotonic()
    stop: threading.Event
    recorder: Recorder
    tables: Tables

    def going(self, i: int, first_pass: int = 0) -> bool:
        """Whether to start iteration ``i``: the first ``first_pass`` iterations run whatever
        the clock says (so that every class is exercised once even in a short run on a busy
        machine; each is a bounded number of calls), the rest until the deadline; none after
        ``stop`` (the server died)."""
        if self.stop.is_set():
            return False
        if i < first_pass:
            return True
        return i < MAX_ITERATIONS and time.monotonic() < self.deadline


# --- well-behaved agents -----------------------------------------------------------------


class GoodAgent:
    """An agent doing what agents do: point and parameterized queries, samples, profiles,
    small scans, listings, whoami, and an async query now and then — one call at a time."""

    def __init__(self, run: Run, index: int, token: str, tables: Sequence[str]) -> None:
        self.run = run
        self.index = index
        self.token = token
        self.readable = list(tables)  # "demo.orders", …
        self.rng = random.Random(1000 + index)

    def schedule(self) -> Callable[[], str]:
        first = list(GOOD_MIX)
        self.rng.shuffle(first)
        names, weights = list(GOOD_MIX), list(GOOD_MIX.values())

        def next_op() -> str:
            return first.pop() if first else self.rng.choices(names, weights)[0]

        return next_op

    def __call__(self) -> None:
        run, rec = self.run, self.run.recorder
        with (
            QuiverClient(run.flight_url, self.token, timeout=CALL_TIMEOUT_SECONDS) as client,
            httpx.Client(
                base_url=run.http_url,
                headers={"authorization": f"Bearer {self.token}"},
                timeout=CALL_TIMEOUT_SECONDS,
            ) as http,
        ):
            next_op = self.schedule()
            i = 0
            while run.going(i, len(GOOD_MIX)):
                i += 1
                op = next_op()
                rec.timed(op, False, functools.partial(self.do, op, client, http))

    def do(self, op: str, client: QuiverClient, http: httpx.Client) -> None:
        rng, t = self.rng, self.run.tables
        if op == "point":  # fresh literal SQL text each time: no cache answers it
            key = rng.randrange(1, t.orders + 1)
            rows = client.query(f"SELECT * FROM demo.orders WHERE order_id = {key}")
            _check(rows.column("order_id").to_pylist() == [key], op, f"order {key}: {rows.num_rows} rows")
        elif op == "param":
            client.query(
                "SELECT status, count(*) AS n, sum(amount) AS total FROM demo.orders "
                "WHERE customer_id = ? AND amount > $2 GROUP BY ALL ORDER BY status",
                [rng.randrange(1, t.customers + 1), rng.randrange(0, 500)],
            )
        elif op == "sample":
            rows = client.sample(rng.choice(self.readable), 50, method="random", seed=rng.randrange(1 << 31))
            _check(rows.num_rows == 50, op, f"{rows.num_rows} rows, not 50")
        elif op == "profile":
            client.profile(rng.choice(self.readable))
        elif op == "scan":
            rows = client.read("demo.customers")
            _check(rows.num_rows == t.customers, op, f"{rows.num_rows} customers, not {t.customers}")
        elif op == "list":
            listed = {x.name for x in client.tables()}
            _check(listed == set(self.readable), op, f"{sorted(listed)} != {sorted(self.readable)}")
        elif op == "whoami":
            me = client.whoami()
            _check(me["agent"] == f"agent-{self.index}", op, f"whoami says {me['agent']!r}")
        elif op == "http_whoami":
            r = http.get("/v1/whoami")
            if r.status_code != 200:
                raise QuiverClientError(f"HTTP {r.status_code}", r.text[:200])
        elif op == "async":
            query_id = client.submit(
                "SELECT customer_id, count(*) AS n FROM demo.orders WHERE amount > ? "
                "GROUP BY ALL ORDER BY n DESC, customer_id LIMIT 10",
                [rng.randrange(0, 900)],
            )
            status = client.wait(query_id, timeout=CALL_TIMEOUT_SECONDS)
            if status["state"] != "succeeded":
                raise QuiverClientError(str(status.get("code", "FAILED")), str(status)[:200])
            rows = client.result(query_id, wait=None)
            _check(0 < rows.num_rows <= 10, op, f"{rows.num_rows} rows, not 1..10")
        else:
            raise ValueError(op)


def _check(ok: bool, op: str, detail: str) -> None:
    """A wrong answer under load is an error too (``WRONG_RESULT``): one agent's rows, cache
    entries or identity must never leak into another's call."""
    if not ok:
        raise QuiverClientError("WRONG_RESULT", f"{op}: {detail}")


# --- hostile agents ------------------------------------------------------------------------


def _nested_list(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _nested_json(depth: int) -> bytes:
    """A query command whose one parameter is an array nested ``depth`` deep (built as text:
    Python's own JSON codec refuses such depths)."""
    return b'{"kind": "query", "sql": "SELECT ? AS v", "params": [' + b"[" * depth + b"]" * depth + b"]}"


class HostileAgent:
    """An agent that tries to hurt the server, round-robin over its ``kinds``. Each attempt
    is expected to be refused with a code (or, for ticket re-use, bounded by the server's
    concurrency cap); what actually happened is recorded, per operation class."""

    def __init__(
        self, run: Run, index: int, token: str, bad_tokens: dict[str, str], kinds: Sequence[str]
    ) -> None:
        self.run = run
        self.index = index
        self.token = token
        self.bad_tokens = bad_tokens  # label -> token (garbage, forged, expired, revoked)
        self.kinds = list(kinds)
        self.rng = random.Random(9000 + index)
        self.options = flight.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {token}".encode())], timeout=CALL_TIMEOUT_SECONDS
        )

    def __call__(self) -> None:
        run = self.run
        client = flight.FlightClient(run.flight_url)
        try:
            with httpx.Client(base_url=run.http_url, timeout=CALL_TIMEOUT_SECONDS) as http:
                i = 0
                while run.going(i, len(self.kinds)):
                    kind = self.kinds[i % len(self.kinds)]
                    i += 1
                    started = time.perf_counter()
                    try:
                        getattr(self, f"do_{kind}")(client, http)
                    except Exception as e:
                        elapsed = time.perf_counter() - started
                        run.recorder.add("harness_error", True, elapsed, type(e).__name__)
        finally:
            client.close()

    # Each do_* makes a bounded number of calls.
    def _query(self, client: flight.FlightClient, op: str, sql: str, params: list[Any] | None = None) -> None:
        """GetFlightInfo for ``sql`` and, should it be accepted, DoGet of its endpoints: what
        an attacker would do."""
        body: dict[str, Any] = {"kind": "query", "sql": sql}
        if params is not None:
            body["params"] = params
        self._command(client, op, body)

    def _command(self, client: flight.FlightClient, op: str, body: dict[str, Any] | bytes) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        descriptor = flight.FlightDescriptor.for_command(raw)

        def call() -> None:
            info = client.get_flight_info(descriptor, self.options)
            for endpoint in info.endpoints:
                client.do_get(endpoint.ticket, self.options).read_all()

        self.run.recorder.timed(op, True, call)

    def do_constant(self, client: flight.FlightClient, http: httpx.Client) -> None:
        self._query(client, "h.range", "SELECT length(range(150000000)) AS v")
        if not self.run.stop.is_set():
            self._query(client, "h.repeat", "SELECT length(repeat('x', 1000000000)) AS v")

    def do_nested(self, client: flight.FlightClient, http: httpx.Client) -> None:
        self._query(client, "h.nested_list", f"SELECT {_nested_list(70)} AS v")
        self._command(client, "h.nested_json", _nested_json(5000))

    def do_params(self, client: flight.FlightClient, http: httpx.Client) -> None:
        self._query(client, "h.param_ref", "SELECT $1000000 AS v", [1])

    def do_reuse(self, client: flight.FlightClient, http: httpx.Client) -> None:
        """One query ticket, ``REUSE_STREAMS`` DoGets of it at once (each re-runs the query
        today); fresh SQL text so that no cached result answers them."""
        rec = self.run.recorder
        # A result of many batches (every order row, and a volatile column so that no cached
        # result answers): the server's stream lasts until the client has read it (gRPC flow
        # control), so the overlap seen here is the overlap of the server's streams.
        sql = f"SELECT o.*, random() AS r FROM demo.orders o WHERE o.amount > {self.rng.randrange(10)}"
        descriptor = flight.FlightDescriptor.for_command(json.dumps({"kind": "query", "sql": sql}).encode())
        info = rec.timed("h.reuse_info", True, lambda: client.get_flight_info(descriptor, self.options))
        if info is None:
            return
        ticket = info.endpoints[0].ticket
        streaming: list[tuple[float, float]] = []

        def read() -> None:
            reader = client.do_get(ticket, self.options)  # returns once the server streams
            reader.read_chunk()  # the server is streaming this copy now
            began = time.monotonic()
            reader.read_all()
            streaming.append((began, time.monotonic()))

        with ThreadPoolExecutor(REUSE_STREAMS, thread_name_prefix="load-reuse") as pool:
            for _ in range(REUSE_STREAMS):
                pool.submit(rec.timed, "h.reuse_doget", True, read)
        rec.add_reuse_peak(max_overlap(streaming))

    def do_flood(self, client: flight.FlightClient, http: httpx.Client) -> None:
        rec = self.run.recorder
        labels = list(self.bad_tokens)
        for n in range(FLOOD_BURST):
            if self.run.stop.is_set():
                return
            token = self.bad_tokens[labels[n % len(labels)]]
            options = flight.FlightCallOptions(
                headers=[(b"authorization", f"Bearer {token}".encode())], timeout=CALL_TIMEOUT_SECONDS
            )
            rec.timed("h.flood_flight", True, functools.partial(_list_flights, client, options))
            rec.timed("h.flood_http", True, functools.partial(_http_refused, http, token))

    def do_oversize(self, client: flight.FlightClient, http: httpx.Client) -> None:
        rec = self.run.recorder
        padding = "x" * (2 * 1024 * 1024)
        self._command(client, "h.big_command", {"kind": "query", "sql": f"SELECT '{padding}' AS v"})
        self._query(client, "h.long_sql", "SELECT 1 AS v" + " " * 150_000)

        def action(name: str, body: bytes) -> None:
            list(client.do_action(flight.Action(name, body), self.options))

        rec.timed("h.long_action", True, lambda: action("x" * 100_000, b""))
        rec.timed(
            "h.long_query_id",
            True,
            lambda: action("query-status", json.dumps({"id": "q" * 100_000}).encode()),
        )


def max_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at the instant of a start comes first)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def _list_flights(client: flight.FlightClient, options: flight.FlightCallOptions) -> int:
    return len(list(client.list_flights(options=options)))


def _http_refused(http: httpx.Client, token: str) -> None:
    """A control-plane call with a bad token; its status is the outcome (401 expected)."""
    r = http.get("/v1/whoami", headers={"authorization": f"Bearer {token}"})
    if r.status_code != 200:
        raise QuiverClientError(f"HTTP {r.status_code}", r.text[:200])


def hostile_kinds(index: int, hostile: int, kinds: Sequence[str]) -> list[str]:
    """The kinds hostile agent ``index`` (of ``hostile``) cycles through. With as many agents
    as kinds (or more) each does one; with fewer, each of the first ``hostile - 1`` does one
    and the last does the rest, so that the slow kinds (``constant`` runs for seconds per
    query today) do not crowd out the others and every kind is exercised."""
    if hostile >= len(kinds):
        return [kinds[index % len(kinds)]]
    if index < hostile - 1:
        return [kinds[index]]
    return list(kinds[hostile - 1 :])
