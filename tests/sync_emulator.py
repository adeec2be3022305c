"""The fakesnow Snowflake emulator for the sync tests, bench and demo: its HTTP server (the
real ``snowflake-connector-python`` talks to it), in-process or as a subprocess.

Test-only patches of the emulator (never of Quiver):
- NULL timestamps: fakesnow 0.12.1 builds Snowflake's timestamp structs without the null
  mask, so NULL arrives as 1970-01-01. ``patch_null_timestamps`` adds the mask back.
- Credentials: fakesnow accepts any. ``require_password`` makes its login refuse every
  password but one, with Snowflake's own error (390100), so wrong credentials can be tested.
- A recording proxy (``RECORDER``, :class:`Recorder`) in front of its query and abort routes:
  the SQL text every query request carried (what pushdown tests check), the query id the
  emulator answered for each (``answered``: what the query log must show), how many sessions
  were opened (``logins``), every abort request
  the connector sent, and — for a test that names a marker — queries *held* as a slow
  warehouse would hold them, until an abort request for them arrives (then answered with
  Snowflake's own "SQL execution canceled", 000604) or the hold ends. fakesnow itself answers
  an abort request with success and does nothing; the hold is what lets a test see that the
  connector's cancel reaches the server for the query it means.

Not a patch but a way around the emulator: column comments. fakesnow 0.12.1 keeps table
comments (``CREATE TABLE … COMMENT = '…'``, ``COMMENT ON TABLE``, ``ALTER TABLE … SET COMMENT``)
and answers them in ``information_schema.tables.comment``, but of column comments it ignores
``CREATE TABLE (c INT COMMENT '…')`` ("CommentColumnConstraint unsupported") and ``ALTER TABLE …
ALTER COLUMN c COMMENT '…'``, and ``COMMENT ON COLUMN`` is run (DuckDB has it) and then fails
its own describe step (``001003 (42000): Parser Error: syntax error at or near "ON" LINE 1:
DESCRIBE COMMENT ON COLUMN …``), so the connector sees an error. ``Source.comment_on_column``
sets the comment on the emulator's own DuckDB connection instead; its
``information_schema.columns.comment`` answers it through the connector like Snowflake's.
(A table comment holding a single quote is an HTTP 500 of fakesnow, which formats it into
SQL unescaped: quotes are tested in column comments.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from sync import SyncService

_PATCHED = False
_REQUIRED_PASSWORD: dict[str, str | None] = {"value": None}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def patch_null_timestamps() -> None:
    import fakesnow.arrow as fa

    global _PATCHED
    if _PATCHED:
        return
    original = fa.timestamp_to_sf_struct

    def with_nulls(ts: pa.Array | pa.ChunkedArray) -> pa.Array:
        if isinstance(ts, pa.ChunkedArray):
            ts = ts.combine_chunks()
        struct = original(ts)
        if ts.null_count == 0:
            return struct
        return pa.StructArray.from_arrays(struct.flatten(), fields=list(struct.type), mask=ts.is_null())

    fa.timestamp_to_sf_struct = with_nulls
    _install_login_check()
    _install_recorder()
    _PATCHED = True


class Recorder:
    """What the emulator received (see the module docs). Thread-safe: the emulator's event
    loop appends, tests read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.queries: list[str] = []
        self.answered: list[tuple[str, str]] = []  # (SQL text, the queryId answered for it)
        self.logins = 0  # login requests (a session opened), accepted or not
        self.aborts: list[str] = []  # the SQL text each abort request named
        self.hold_marker: str | None = None
        self.hold_seconds = 30.0
        self._held: dict[str, asyncio.Event] = {}
        self._aborted: set[str] = set()
        self.held: list[str] = []

    def since(self, mark: int) -> list[str]:
        with self._lock:
            return self.queries[mark:]

    def mark(self) -> int:
        with self._lock:
            return len(self.queries)

    def record(self, sql: str) -> None:
        with self._lock:
            self.queries.append(sql)

    def answer(self, sql: str, query_id: str) -> None:
        with self._lock:
            self.answered.append((sql, query_id))

    def ids_of(self, marker: str) -> list[str]:
        """The query ids answered for queries whose text holds ``marker``, oldest first."""
        with self._lock:
            return [qid for sql, qid in self.answered if marker in sql]

    @contextlib.contextmanager
    def holding(self, marker: str, seconds: float = 30.0) -> Iterator[Recorder]:
        self.hold_marker, self.hold_seconds = marker, seconds
        try:
            yield self
        finally:
            self.hold_marker = None
            for event in list(self._held.values()):
                event.set()


RECORDER = Recorder()


async def _body_json(request: Any) -> dict[str, Any]:
    body = await request.body()
    if request.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return dict(json.loads(body))


def _install_recorder() -> None:
    import fakesnow.server as fss
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    original = fss.query_request

    async def query(request: Request) -> JSONResponse:
        sql = str((await _body_json(request)).get("sqlText", ""))
        RECORDER.record(sql)
        marker = RECORDER.hold_marker
        if marker is not None and marker in sql:
            request_id = request.query_params.get("requestId", "")
            event = asyncio.Event()
            RECORDER._held[request_id] = event
            RECORDER.held.append(sql)
            try:
                await asyncio.wait_for(event.wait(), RECORDER.hold_seconds)
                aborted = request_id in RECORDER._aborted
            except TimeoutError:
                aborted = False
            finally:
                RECORDER._held.pop(request_id, None)
            if aborted:
                return JSONResponse(
                    {
                        "data": {"errorCode": "000604", "sqlState": "57014"},
                        "code": "000604",
                        "message": "SQL execution canceled",
                        "success": False,
                    }
                )
        response = await original(request)
        try:
            query_id = json.loads(bytes(response.body))["data"].get("queryId")
        except (ValueError, KeyError, TypeError, AttributeError):
            query_id = None
        if query_id:
            RECORDER.answer(sql, str(query_id))
        return response

    async def abort(request: Request) -> JSONResponse:
        body = await _body_json(request)
        request_id = str(body.get("requestId", ""))
        with RECORDER._lock:
            RECORDER.aborts.append(str(body.get("sqlText", "")))
            RECORDER._aborted.add(request_id)
        event = RECORDER._held.get(request_id)
        if event is not None:
            event.set()
        return JSONResponse({"success": True})

    routes = fss.app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, Route) and route.path == "/queries/v1/query-request":
            routes[i] = Route(route.path, query, methods=list(route.methods or ["POST"]))
        elif isinstance(route, Route) and route.path == "/queries/v1/abort-request":
            routes[i] = Route(route.path, abort, methods=["POST"])


def _install_login_check() -> None:
    import fakesnow.server as fss
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    original = fss.login_request

    async def login(request: Request) -> JSONResponse:
        with RECORDER._lock:
            RECORDER.logins += 1
        wanted = _REQUIRED_PASSWORD["value"]
        if wanted is not None:
            body = await request.body()
            if request.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            given = json.loads(body)["data"].get("PASSWORD")
            if given != wanted:
                return JSONResponse(
                    {
                        "data": {"nextAction": "RETRY_LOGIN", "authnMethod": "USERNAME_PASSWORD"},
                        "code": "390100",
                        "message": "Incorrect username or password was specified.",
                        "success": False,
                    }
                )
            # Starlette keeps the body it read on the request: the original handler reads it again.
        return await original(request)

    routes = fss.app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, Route) and route.path == "/session/v1/login-request":
            routes[i] = Route(route.path, login, methods=list(route.methods or ["POST"]))


@contextlib.contextmanager
def require_password(password: str | None) -> Iterator[None]:
    previous = _REQUIRED_PASSWORD["value"]
    _REQUIRED_PASSWORD["value"] = password
    try:
        yield
    finally:
        _REQUIRED_PASSWORD["value"] = previous


class Emulator:
    """A running fakesnow HTTP server and how to reach it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.host = "127.0.0.1"

    def snowflake_section(self, **extra: Any) -> dict[str, Any]:
        """A ``[snowflake]`` config section pointing at the emulator."""
        return {
            "account": "fakesnow",
            "user": "quiver",
            "password": "emulator-password",
            "host": self.host,
            "port": self.port,
            "protocol": "http",
            "login_timeout": 10,
            "network_timeout": 10,
            "socket_timeout": 10,
            **extra,
        }

    def connect(self, database: str | None = None, schema: str | None = None) -> Any:
        import snowflake.connector

        kwargs: dict[str, Any] = {
            "user": "seed",
            "password": "emulator-password",
            "account": "fakesnow",
            "host": self.host,
            "port": self.port,
            "protocol": "http",
            "session_parameters": {"CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False},
            "network_timeout": 10,
            "socket_timeout": 10,
            "paramstyle": "qmark",
        }
        if database:
            kwargs["database"] = database
        if schema:
            kwargs["schema"] = schema
        return snowflake.connector.connect(**kwargs)

    def execute(self, *statements: str, database: str | None = None) -> None:
        con = self.connect(database)
        try:
            cur = con.cursor()
            for sql in statements:
                cur.execute(sql)
        finally:
            con.close()

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        con = self.connect()
        try:
            return list(con.cursor().execute(sql, params).fetchall())
        finally:
            con.close()

    @staticmethod
    def duck() -> Any:
        """The emulator's own DuckDB connection (in-process only): a fast path to seed large
        tables that the connector then reads like any other."""
        from fakesnow.server import shared_fs

        return shared_fs.duck_conn.cursor()


@contextlib.contextmanager
def emulator_in_process() -> Iterator[Emulator]:
    import logging

    import fakesnow.server as fss
    import uvicorn

    patch_null_timestamps()
    logging.getLogger("fakesnow.server").setLevel(logging.WARNING)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(fss.app, host="127.0.0.1", port=port, log_level="warning", log_config=None)
    )
    thread = threading.Thread(target=server.run, name="fakesnow", daemon=True)
    thread.start()
    from tests.harness import wait_until  # here, like the module's other imports: the child stays light

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError("the fakesnow emulator's thread died before it served")
        return bool(server.started)

    wait_until(started, 30, 0.02, what="the fakesnow emulator to start")
    try:
        yield Emulator(port)
    finally:
        server.should_exit = True
        thread.join(10)


class EmulatorProcess(Emulator):
    """fakesnow as a child process: a source that can be killed in the middle of a load."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port or free_port())
        env = dict(os.environ)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sync_emulator", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        from tests.harness import wait_until

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fakesnow emulator process exited ({self.proc.returncode})")
            with contextlib.closing(socket.socket()) as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 60, what="the fakesnow emulator process to listen")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Run the (patched) emulator in the foreground: ``python -m tests.sync_emulator PORT``."""
    import fakesnow.server as fss
    import uvicorn

    patch_null_timestamps()
    uvicorn.run(fss.app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    serve(int(sys.argv[1]), *(sys.argv[2:3]))


# --- helpers for the sync tests ------------------------------------------------------------------


def sync_config(data_dir: Any, emu: Emulator, tables: list[dict[str, Any]], *, snowflake: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, **sync: Any) -> Any:  # fmt: skip
    """A Quiver config replicating ``tables`` from the emulator into ``data_dir``."""
    from catalog import load_config

    overrides: dict[str, dict[str, Any]] = {
        "server": {"data_dir": str(data_dir), "flight_port": 0, "http_port": 0, "host": "127.0.0.1"},
        "snowflake": {**emu.snowflake_section(), **(snowflake or {})},
        "sync": {"retry_seconds": 0, "enabled": False, **sync, "tables": tables},
        "limits": limits or {},
    }
    return load_config(None, environ={}, overrides=overrides)


@contextlib.contextmanager
def sync_service(
    data_dir: Any, emu: Emulator, tables: list[dict[str, Any]], **kwargs: Any
) -> Iterator[SyncService]:
    """A real catalog (DuckDB file in ``data_dir``) and a SyncService over it."""
    from catalog import Catalog
    from sync import SyncService

    config = sync_config(data_dir, emu, tables, **kwargs)
    catalog = Catalog(config)
    service = SyncService(catalog, config)
    try:
        yield service
    finally:
        service.stop(5)
        catalog.close()


def replica(service: Any, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with service.catalog.db.reading() as cur:
        return list(cur.execute(sql, params or []).fetchall())


class Source:
    """One test's own database in the (shared, in-process) emulator."""

    _counter = 0

    def __init__(self, emu: Emulator, prefix: str = "T") -> None:
        Source._counter += 1
        self.emu = emu
        self.database = f"{prefix}{Source._counter}_{os.getpid()}".upper()
        emu.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        emu.execute(f"CREATE SCHEMA IF NOT EXISTS {self.database}.PUBLIC", database=self.database)

    def name(self, table: str) -> str:
        return f"{self.database}.PUBLIC.{table}"

    def execute(self, *statements: str, params: list[Any] | None = None) -> None:
        con = self.emu.connect(self.database, "PUBLIC")
        try:
            cur = con.cursor()
            for sql in statements:
                cur.execute(sql, params)
        finally:
            con.close()

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        con = self.emu.connect(self.database, "PUBLIC")
        try:
            return list(con.cursor().execute(sql, params).fetchall())
        finally:
            con.close()

    def comment_on_column(self, table: str, column: str, text: str | None) -> None:
        """Set (None: remove) a column's comment at the source, on the emulator's own DuckDB
        connection (in-process only; the module docs say why not ``COMMENT ON COLUMN``)."""
        literal = "NULL" if text is None else "'" + text.replace("'", "''") + "'"
        self.emu.duck().execute(f"COMMENT ON COLUMN {self.database}.PUBLIC.{table}.{column} IS {literal}")
