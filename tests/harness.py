"""Real servers on ephemeral ports for tests: a ``quiver serve`` runtime in-process (or as a
subprocess), with real clients. Nothing of Quiver's own is mocked."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pyarrow as pa
import pyarrow.flight as flight

from catalog import Catalog, Config, load_config
from catalog.clock import SYSTEM_CLOCK, Clock
from catalog.errors import MAX_DETAIL_CHARS
from flight_server.server import QuiverFlightServer
from quiver.runtime import Runtime

T = TypeVar("T")

DEMO_SCALE = 0.01  # customers 1,000 · orders 20,000 · events 50,000


#: ``[tokens]`` for tests that read what the housekeeping thread would flush (token last-used
#: times, the query log, usage counters): a flush an hour, so what is buffered stays buffered
#: until a read (or the test) flushes it (``start_server(..., tokens=QUIET)``).
QUIET: dict[str, Any] = {"last_used_flush_seconds": 3600.0}


#: ``[flight]`` keys that split small tables too: the 50,000-row demo.events becomes several
#: endpoints (``start_server(..., flight=SMALL_SPLIT)``).
SMALL_SPLIT: dict[str, Any] = {"split_part_rows": 10_000, "split_min_rows": 20_000, "split_align_rows": 1}
#: ``[cache]`` of a server whose hot-table cache is filled by the first scan as it streams
#: (the default fills it while the data plane is idle: flight_server/table_cache.py).
SCAN_FILL: dict[str, Any] = {"table_fill": "scan"}


def make_config(data_dir: Path, **sections: dict[str, Any]) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "server": {
            "data_dir": str(data_dir),
            "flight_port": 0,
            "http_port": 0,
            "host": "127.0.0.1",
        },
        "demo": {"scale": DEMO_SCALE},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(None, environ={}, overrides=overrides)


def wait_until(
    condition: Callable[[], T | Literal[False] | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail with
    ``what`` (and the last value) after ``timeout`` seconds. The one deadline loop of the
    suite: tests wait for a condition, never for a fixed time. ``cond and value`` is a
    condition too: the False or None it returns while waiting is not part of the result's type."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}: {value!r}")
        time.sleep(interval)


class FakeClock:
    """A :class:`catalog.clock.Clock` that stands still until a test moves it: passed to
    :func:`start_server`, it lets a test expire tokens and tickets by advancing it instead of
    sleeping. It starts at the host's time, so what the server signs looks ordinary, in
    whole seconds, so that advancing it by whole or binary-exact amounts gives exact sums."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wall = float(int(time.time()))
        self._mono = float(int(time.monotonic()))

    def time(self) -> float:
        with self._lock:
            return self._wall

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        """Move both readings forward by ``seconds``."""
        assert seconds >= 0, "a clock does not go back"
        with self._lock:
            self._wall += seconds
            self._mono += seconds


def call_options(token: str | None, timeout: float | None = 30.0) -> flight.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {token}".strip().encode())] if token is not None else []
    return flight.FlightCallOptions(headers=headers, timeout=timeout)


def error_info(exc: flight.FlightError) -> dict[str, Any]:
    """The ``{"code", "detail"}`` that every Quiver Flight error carries in extra_info."""
    assert exc.extra_info, f"no extra_info on {exc!r}"
    return json.loads(exc.extra_info)


def flight_query(
    server: Server, token: str, sql: str, params: list[Any] | None = None, **extra: Any
) -> pa.Table:
    """A ``{"kind": "query"}`` command over Flight, every endpoint read, as one table."""
    client = server.flight()
    opts = call_options(token)
    body: dict[str, Any] = {"kind": "query", "sql": sql, **extra}
    if params is not None:
        body["params"] = params
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(body)), opts)
    tables = [client.do_get(e.ticket, opts).read_all() for e in info.endpoints]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def flight_query_error(
    server: Server, token: str, sql: str, params: list[Any] | None = None
) -> dict[str, Any]:
    """The ``{"code", "detail"}`` of a :func:`flight_query` that must be refused."""
    try:
        flight_query(server, token, sql, params)
    except flight.FlightError as e:
        return error_info(e)
    raise AssertionError(f"not refused: {sql[:200]}")


def flight_sql_connect(server: Server, token: str, **kwargs: Any) -> Any:
    """An ADBC Flight SQL connection to ``server`` as ``token`` (autocommit, as BI tools use)."""
    import adbc_driver_flightsql.dbapi as flight_sql  # only the tests that use ADBC load it

    return flight_sql.connect(
        server.flight_url,
        db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {token}"},
        autocommit=True,
        **kwargs,
    )


#: What a client's mistake may be answered with (never INTERNAL), and how long its detail may be.
CLIENT_ERROR_CODES = {
    "INVALID_ARGUMENT",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
}
DETAIL_BOUND = MAX_DETAIL_CHARS + 40


def client_error_info(exc: flight.FlightError) -> dict[str, Any]:
    """:func:`error_info` of a refusal of hostile input: no traceback, a client error's
    code, a bounded detail (the fuzz tests' one check)."""
    assert "Traceback" not in str(exc)
    info = error_info(exc)
    assert info["code"] in CLIENT_ERROR_CODES, info
    assert len(info["detail"]) <= DETAIL_BOUND
    return info


@dataclass
class Server:
    runtime: Runtime
    data_dir: Path
    flight_url: str
    http_url: str
    admin_token: str
    demo_token: str | None
    _clients: list[Any] = field(default_factory=list)

    @property
    def catalog(self) -> Catalog:
        assert self.runtime.catalog is not None
        return self.runtime.catalog

    @property
    def agent_token(self) -> str:
        """The demo agent's token (a server started with the demo data has one)."""
        assert self.demo_token is not None, "this server was started without the demo"
        return self.demo_token

    @property
    def flight_service(self) -> QuiverFlightServer:
        """The running Flight service itself, for the counters tests read."""
        assert self.runtime.flight is not None
        return self.runtime.flight

    def flight(self) -> flight.FlightClient:
        client = flight.FlightClient(self.flight_url)
        self._clients.append(client)
        return client

    def http(self, token: str | None = "admin") -> httpx.Client:
        """An HTTP client; ``token="admin"`` uses the admin token, None sends none."""
        headers = {}
        if token == "admin":
            token = self.admin_token
        if token is not None:
            headers["authorization"] = f"Bearer {token}".strip()
        client = httpx.Client(base_url=self.http_url, headers=headers, timeout=30)
        self._clients.append(client)
        return client

    def mint(
        self,
        kind: str = "agent",
        swarm: str | None = "demo",
        agent: str | None = "a1",
        **extra: Any,
    ) -> str:
        body: dict[str, Any] = {"kind": kind, **extra}
        if swarm is not None:
            body["swarm"] = swarm
        if agent is not None and kind == "agent":
            body["agent"] = agent
        r = self.http().post("/v1/tokens", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def stop(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self.runtime.stop()


def start_server(
    data_dir: Path, *, demo: bool = True, clock: Clock = SYSTEM_CLOCK, **sections: dict[str, Any]
) -> Server:
    """A server in this process; ``clock`` is what its token and ticket expiry read."""
    config = make_config(data_dir, **sections)
    runtime = Runtime(config, demo_data=demo, grace_seconds=5, clock=clock)
    endpoints = runtime.start()
    admin = (data_dir / "admin.token").read_text().strip()
    demo_token = (data_dir / "demo-agent.token").read_text().strip() if demo else None
    return Server(runtime, data_dir, endpoints.flight_url, endpoints.http_url, admin, demo_token)


class ServeProcess:
    """``quiver serve`` as a real subprocess (signals, stdout banner, exit code)."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.data_dir = data_dir
        full_env = {**os.environ, "QUIVER_DEMO_SCALE": str(DEMO_SCALE), **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quiver",
                "serve",
                "--data-dir",
                str(data_dir),
                "--flight-port",
                "0",
                "--http-port",
                "0",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self.banner: list[str] = []
        self.flight_url = self.http_url = ""
        assert self.proc.stdout is not None and self.proc.stderr is not None  # both PIPEs
        for line in self.proc.stdout:
            self.banner.append(line.rstrip("\n"))
            if "Arrow Flight:" in line:
                self.flight_url = line.split("Arrow Flight:")[1].strip()
            if "Control plane:" in line:
                self.http_url = line.split("Control plane:")[1].split()[0]
            if "Stop with Ctrl-C" in line:
                break
        if not self.flight_url:
            self.proc.kill()
            raise RuntimeError(
                "quiver serve did not start:\n" + "\n".join(self.banner) + self.proc.stderr.read()
            )

    def stop(self, sig: int | None = None, timeout: float = 30) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
