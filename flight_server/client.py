"""A small typed client for agents: ``QuiverClient(url, token)``.

It speaks the wire contract of proto_docs/ with plain ``pyarrow.flight`` and adds what every
agent would otherwise write itself:

* endpoints of one FlightInfo are fetched **in parallel** (threads; pyarrow releases the GIL
  while reading) and reassembled in order — a large scan arrives several times faster;
* every failure becomes :class:`QuiverClientError` with the server's stable ``code``
  (``extra_info``) and its ``detail`` sentence, including the cases the server cannot label
  (a query interrupted mid-stream, the server unreachable, a client-side deadline);
* results are ``pyarrow.Table`` or, for large ones, a ``RecordBatchReader`` that streams
  with bounded memory (a few batches per endpoint in flight).

Only ``pyarrow`` is needed; nothing of the server is imported.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

T = TypeVar("T")

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
_REUSE = "arrow-flight-reuse-connection://?"
_DONE = object()


class QuiverClientError(Exception):
    """A refusal or failure, with the server's stable ``code`` (UNAUTHENTICATED,
    PERMISSION_DENIED, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
    CANCELLED, UNAVAILABLE, INTERNAL) and a ``detail`` sentence that says what to change."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return self.code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


_CLASS_CODES: tuple[tuple[type[flight.FlightError], str], ...] = (
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
    (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightCancelledError, "CANCELLED"),
    (flight.FlightUnavailableError, "UNAVAILABLE"),
    (flight.FlightInternalError, "INTERNAL"),
)


_CODED = re.compile(r"^(?:Unknown error: )?([A-Z_]{5,}): (.*?)(?:\. Detail: .*)?$", re.DOTALL)
_FLIGHT_STATUS = re.compile(
    r"^(.*?)\. Detail: (Unauthenticated|Unauthorized|Unavailable|Cancelled|TimedOut|Internal)"
)
_STATUS_WORDS = {
    "unauthenticated": "UNAUTHENTICATED",
    "unauthorized": "PERMISSION_DENIED",
    "unavailable": "UNAVAILABLE",
    "cancelled": "CANCELLED",
    "timedout": "DEADLINE_EXCEEDED",
    "internal": "INTERNAL",
}


def client_error(exc: BaseException) -> QuiverClientError:
    """The :class:`QuiverClientError` for anything pyarrow raised during a call."""
    if isinstance(exc, QuiverClientError):
        return exc
    message = str(exc)
    if isinstance(exc, flight.FlightError) and exc.extra_info:
        try:
            info = json.loads(exc.extra_info)
            return QuiverClientError(str(info["code"]), str(info["detail"]))
        except (ValueError, KeyError, TypeError):
            pass
    head = message.split(". gRPC client debug context", 1)[0].strip()
    if not isinstance(exc, flight.FlightError):
        # pyarrow's get_schema raises plain Arrow errors (apache/arrow #43556); Quiver puts
        # the code first in the message of those (proto_docs/errors.md).
        m = _CODED.match(head)
        if m:
            return QuiverClientError(m.group(1), m.group(2))
        m = _FLIGHT_STATUS.search(head)
        if m:
            code = _STATUS_WORDS.get(m.group(2).lower(), "INTERNAL")
            return QuiverClientError(code, m.group(1).strip())
    if "INTERRUPT Error" in message:
        # DuckDB was interrupted after the stream had started: the server could no longer
        # attach a code. Its cause is the query time limit (or a server shutdown).
        return QuiverClientError(
            "DEADLINE_EXCEEDED",
            "the query was interrupted by the server while streaming (the query time limit "
            "[limits] query_timeout_seconds, or a shutdown); narrow the query or use submit()",
        )
    if isinstance(exc, flight.FlightTimedOutError):
        return QuiverClientError("DEADLINE_EXCEEDED", f"the call exceeded its deadline: {head}")
    for cls, code in _CLASS_CODES:
        if isinstance(exc, cls):
            return QuiverClientError(code, head)
    if isinstance(exc, flight.FlightError):
        return QuiverClientError("INTERNAL", head)
    return QuiverClientError("INTERNAL", f"{type(exc).__name__}: {head}")


@dataclass(frozen=True, slots=True)
class TableListing:
    """A table the caller may read, from ListFlights."""

    schema_name: str
    table: str
    rows: int
    schema: pa.Schema

    @property
    def name(self) -> str:
        return f"{self.schema_name}.{self.table}"


def _path(table: str | Sequence[str]) -> list[str]:
    if isinstance(table, str):
        schema, dot, name = table.partition(".")
        if not dot or not schema or not name:
            raise QuiverClientError("INVALID_ARGUMENT", f'a table is named "schema.table", got {table!r}')
        return [schema, name]
    parts = list(table)
    if len(parts) != 2:
        raise QuiverClientError("INVALID_ARGUMENT", f"a table is (schema, table), got {parts!r}")
    return parts


class QuiverClient:
    """Quiver's data plane for one token. Thread-safe; close it (or use ``with``) when done."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float | None = None,
        parallelism: int = 8,
        tls_root_certs: bytes | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if tls_root_certs is not None:
            kwargs["tls_root_certs"] = tls_root_certs
        self.url = url
        self.parallelism = max(1, parallelism)
        self._kwargs = kwargs
        self._client = flight.FlightClient(url, **kwargs)
        self._others: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()
        self.timeout = timeout
        self._token = token

    # --- plumbing -------------------------------------------------------------------------
    @property
    def options(self) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(
            headers=[(b"authorization", f"Bearer {self._token}".encode())], timeout=self.timeout
        )

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as e:
            raise client_error(e) from e

    def _client_for(self, endpoint: flight.FlightEndpoint) -> flight.FlightClient:
        uris = [
            loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri) for loc in endpoint.locations
        ]
        uri = next((u for u in uris if u != _REUSE), None)
        if uri is None or uri == self.url:
            return self._client
        with self._lock:
            other = self._others.get(uri)
            if other is None:
                other = self._others[uri] = flight.FlightClient(uri, **self._kwargs)
            return other

    @staticmethod
    def command(kind: str, **fields: Any) -> flight.FlightDescriptor:
        body = {"kind": kind, **{k: v for k, v in fields.items() if v is not None}}
        return flight.FlightDescriptor.for_command(json.dumps(body).encode())

    def info(self, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        return self._call(lambda: self._client.get_flight_info(descriptor, self.options))

    def schema_of(self, descriptor: flight.FlightDescriptor) -> pa.Schema:
        return self._call(lambda: self._client.get_schema(descriptor, self.options).schema)

    def fetch(self, info: flight.FlightInfo) -> pa.Table:
        """Every endpoint of ``info``, fetched in parallel, concatenated in order."""
        endpoints = list(info.endpoints)

        def read(endpoint: flight.FlightEndpoint) -> pa.Table:
            client = self._client_for(endpoint)
            return self._call(lambda: client.do_get(endpoint.ticket, self.options).read_all())

        if len(endpoints) == 1:
            return read(endpoints[0])
        if not endpoints:
            return info.schema.empty_table()
        with ThreadPoolExecutor(
            min(len(endpoints), self.parallelism), thread_name_prefix="quiver-fetch"
        ) as pool:
            tables = list(pool.map(read, endpoints))
        return pa.concat_tables(tables)

    def fetch_stream(self, info: flight.FlightInfo, *, buffer_batches: int = 4) -> pa.RecordBatchReader:
        """Every endpoint of ``info`` as one ordered stream; endpoints are read in parallel
        ahead of the consumer, each at most ``buffer_batches`` batches ahead."""
        endpoints = list(info.endpoints)
        if len(endpoints) == 1:
            endpoint = endpoints[0]
            client = self._client_for(endpoint)
            reader = self._call(lambda: client.do_get(endpoint.ticket, self.options))
            return pa.RecordBatchReader.from_batches(reader.schema, self._guarded_batches(reader))
        return pa.RecordBatchReader.from_batches(
            info.schema, self._parallel_batches(endpoints, buffer_batches)
        )

    def _guarded_batches(self, reader: flight.FlightStreamReader) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            except Exception as e:
                raise client_error(e) from e
            if chunk.data is not None:
                yield chunk.data

    def _parallel_batches(
        self, endpoints: list[flight.FlightEndpoint], depth: int
    ) -> Iterator[pa.RecordBatch]:
        queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=max(1, depth)) for _ in endpoints]
        stop = threading.Event()
        slots = threading.Semaphore(self.parallelism)

        def put(q: queue.Queue[Any], item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce(i: int) -> None:
            endpoint, q = endpoints[i], queues[i]
            with slots:
                if stop.is_set():
                    return
                try:
                    client = self._client_for(endpoint)
                    reader = client.do_get(endpoint.ticket, self.options)
                    for batch in self._guarded_batches(reader):
                        if not put(q, batch):
                            reader.cancel()
                            return
                    put(q, _DONE)
                except Exception as e:  # noqa: BLE001 - handed to the consumer
                    put(q, client_error(e))

        threads = [
            threading.Thread(target=produce, args=(i,), name=f"quiver-fetch-{i}", daemon=True)
            for i in range(len(endpoints))
        ]
        for t in threads:
            t.start()
        try:
            for q in queues:
                while True:
                    item = q.get()
                    if item is _DONE:
                        break
                    if isinstance(item, QuiverClientError):
                        raise item
                    yield item
        finally:
            stop.set()

    # --- tables -------------------------------------------------------------------------------
    def tables(self) -> list[TableListing]:
        def run() -> list[TableListing]:
            out = []
            for info in self._client.list_flights(options=self.options):
                schema_name, table = (p.decode() for p in info.descriptor.path)
                out.append(TableListing(schema_name, table, info.total_records, info.schema))
            return out

        return self._call(run)

    def schema(self, table: str | Sequence[str]) -> pa.Schema:
        return self.schema_of(flight.FlightDescriptor.for_path(*_path(table)))

    def read(self, table: str | Sequence[str]) -> pa.Table:
        return self.fetch(self.info(flight.FlightDescriptor.for_path(*_path(table))))

    def read_stream(self, table: str | Sequence[str]) -> pa.RecordBatchReader:
        return self.fetch_stream(self.info(flight.FlightDescriptor.for_path(*_path(table))))

    def sample(
        self,
        table: str,
        rows: int | None = None,
        *,
        percent: float | None = None,
        method: str | None = None,
        seed: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """First ``rows`` rows; ``percent`` (random, reproducible with ``seed``); or
        ``rows`` with ``method="random"`` (reservoir, reproducible with ``seed``)."""
        descriptor = self.command(
            "sample",
            table=table,
            rows=rows,
            percent=percent,
            method=method,
            seed=seed,
            columns=list(columns) if columns is not None else None,
        )
        return self.fetch(self.info(descriptor))

    def profile(self, table: str, columns: Sequence[str] | None = None) -> pa.Table:
        descriptor = self.command("profile", table=table, columns=list(columns) if columns else None)
        return self.fetch(self.info(descriptor))

    # --- SQL -----------------------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any] | None, max_rows: int | None) -> flight.FlightDescriptor:
        return self.command("query", sql=sql, params=list(params) if params else None, max_rows=max_rows)

    def query(self, sql: str, params: Sequence[Any] | None = None, max_rows: int | None = None) -> pa.Table:
        return self.fetch(self.info(self._query(sql, params, max_rows)))

    def query_stream(
        self, sql: str, params: Sequence[Any] | None = None, max_rows: int | None = None
    ) -> pa.RecordBatchReader:
        return self.fetch_stream(self.info(self._query(sql, params, max_rows)))

    def query_schema(self, sql: str, params: Sequence[Any] | None = None) -> pa.Schema:
        return self.schema_of(self._query(sql, params, None))

    # --- actions ---------------------------------------------------------------------------------
    def action(self, name: str, body: dict[str, Any] | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else b""

        def run() -> Any:
            results = list(self._client.do_action(flight.Action(name, payload), self.options))
            return json.loads(results[0].body.to_pybytes()) if results else None

        return self._call(run)

    def actions(self) -> dict[str, str]:
        return self._call(lambda: {a.type: a.description for a in self._client.list_actions(self.options)})

    def whoami(self) -> dict[str, Any]:
        return dict(self.action("whoami"))

    def refresh_token(self, ttl_seconds: int | None = None, *, use: bool = True) -> dict[str, Any]:
        """A new token for the same identity; with ``use`` this client switches to it."""
        issued = dict(self.action("refresh-token", {"ttl_seconds": ttl_seconds} if ttl_seconds else None))
        if use:
            self._token = issued["token"]
        return issued

    def submit(self, sql: str, params: Sequence[Any] | None = None, max_rows: int | None = None) -> str:
        """Run a query in the background; returns its id at once."""
        body: dict[str, Any] = {"sql": sql}
        if params:
            body["params"] = list(params)
        if max_rows is not None:
            body["max_rows"] = max_rows
        return str(self.action("submit-query", body)["id"])

    def status(self, query_id: str) -> dict[str, Any]:
        return dict(self.action("query-status", {"id": query_id}))

    def cancel(self, query_id: str) -> dict[str, Any]:
        return dict(self.action("cancel-query", {"id": query_id}))

    def wait(self, query_id: str, timeout: float = 300.0, poll: float = 0.05) -> dict[str, Any]:
        """Poll ``status`` until the query has finished (or ``timeout`` seconds passed)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(query_id)
            if status["state"] in TERMINAL_STATES:
                return status
            if time.monotonic() >= deadline:
                raise QuiverClientError(
                    "DEADLINE_EXCEEDED", f"query {query_id} still {status['state']} after {timeout:g} s"
                )
            time.sleep(poll)
            poll = min(poll * 1.5, 1.0)

    def result(self, query_id: str, *, wait: float | None = 300.0) -> pa.Table:
        """The result of a submitted query; waits up to ``wait`` seconds for it to finish."""
        if wait:
            self.wait(query_id, timeout=wait)
        return self.fetch(self.info(self.command("result", id=query_id)))

    def result_stream(self, query_id: str) -> pa.RecordBatchReader:
        return self.fetch_stream(self.info(self.command("result", id=query_id)))

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        for client in [self._client, *self._others.values()]:
            client.close()

    def __enter__(self) -> QuiverClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
