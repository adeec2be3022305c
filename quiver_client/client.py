"""A small typed client for agents: ``QuiverClient(url, token)``.

It speaks the wire contract of proto_docs/ with plain ``pyarrow.flight`` and adds what every
agent would otherwise write itself:

* endpoints of one FlightInfo are fetched **in parallel** (threads; pyarrow releases the GIL
  while reading) and reassembled in order — a large scan arrives several times faster;
* every failure becomes :class:`QuiverClientError` with the server's stable ``code``
  (``extra_info``) and its ``detail`` sentence, including the cases the server cannot label
  (a query interrupted mid-stream, the server unreachable, a client-side deadline);
* results are ``pyarrow.Table`` or, for large ones, a ``RecordBatchReader`` that streams
  with bounded memory (a few batches per endpoint in flight);
* a result cut at a row cap (the server's ``[limits] max_rows``, your own ``max_rows``, a
  sample's cap) is never taken for the whole answer: the client warns with
  :class:`TruncatedResultWarning`, or raises :class:`TruncatedResultError` with
  ``on_truncation="raise"`` (proto_docs/client.md). It reads the cut from the FlightInfo's
  and the stream's ``app_metadata`` (proto_docs/descriptors.md, "Cut results").

Only ``pyarrow`` is needed; nothing of the server is imported (the wire constants both
sides share are in :mod:`quiver_client.wire`).
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from quiver_client.wire import (
    INLINE_HEADER,
    INLINE_MAX_BYTES,
    KEY_MAX_ROWS,
    KEY_REASON,
    KEY_TRUNCATED,
    TRUNCATED,
    decode_error,
    decode_row_cap,
)

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


OnTruncation = Literal["warn", "raise", "ignore"]


#: Each reason of :data:`~quiver_client.wire.CAP_REASONS`, in words.
_WHY: dict[str, str] = {
    "server_max_rows": "the server's limit [limits] max_rows",
    "max_rows": "your max_rows",
    "max_sample_rows": "the server's sample limit [limits] max_sample_rows",
}


def _truncation_detail(max_rows: int, reason: str) -> str:
    why = _WHY.get(reason, reason)
    return (
        f"the result was cut at {max_rows:,} rows ({why}): more rows exist; aggregate, filter "
        "or page (ORDER BY … LIMIT/OFFSET) instead of reading a partial answer as the whole"
    )


class TruncatedResultWarning(UserWarning):
    """A result was cut at a row cap: more rows existed than were returned. ``max_rows`` is
    the cap, ``reason`` why it applied (``server_max_rows``: the server's ``[limits]
    max_rows``; ``max_rows``: the caller's own; ``max_sample_rows``: a sample's cap)."""

    def __init__(self, max_rows: int, reason: str) -> None:
        super().__init__(_truncation_detail(max_rows, reason))
        self.max_rows = max_rows
        self.reason = reason


class TruncatedResultError(QuiverClientError):
    """A result was cut at a row cap, with ``on_truncation="raise"``; code ``TRUNCATED`` (the
    client's own: no server answers it). ``result`` holds the rows received (a
    ``pyarrow.Table``) when the whole cut result was read (``query``, ``read``, ``fetch`` …);
    it is None from a stream, which raises after its last batch."""

    def __init__(self, max_rows: int, reason: str, result: pa.Table | None = None) -> None:
        super().__init__(TRUNCATED, _truncation_detail(max_rows, reason))
        self.max_rows = max_rows
        self.reason = reason
        self.result = result


def row_cap(metadata: bytes | pa.Buffer | None) -> dict[str, Any] | None:
    """The row cap in a FlightInfo's or a record batch's ``app_metadata``
    (``{"max_rows", "reason", "truncated"}``), or None when there is none."""
    if metadata is None:
        return None
    return decode_row_cap(metadata.to_pybytes() if isinstance(metadata, pa.Buffer) else bytes(metadata))


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


def client_error(exc: BaseException) -> QuiverClientError:  # noqa: PLR0911  a dispatch on the pyarrow exception
    """The :class:`QuiverClientError` for anything pyarrow raised during a call."""
    if isinstance(exc, QuiverClientError):
        return exc
    message = str(exc)
    if isinstance(exc, flight.FlightError):
        coded = decode_error(exc.extra_info)
        if coded is not None:
            return QuiverClientError(*coded)
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


def _inlined(endpoints: list[flight.FlightEndpoint]) -> pa.RecordBatchReader | None:
    """The result a FlightInfo carries inline (one endpoint whose ``app_metadata`` is the
    result's Arrow IPC stream), or None when it must be fetched."""
    if len(endpoints) != 1 or not endpoints[0].app_metadata:
        return None
    try:
        return pa.ipc.open_stream(pa.py_buffer(endpoints[0].app_metadata))
    except pa.ArrowInvalid as e:
        raise QuiverClientError(
            "INTERNAL", f"the inline result in the FlightInfo is not an Arrow stream: {e}"
        ) from e


@dataclass(frozen=True, slots=True)
class TableListing:
    """A table the caller may read, from ListFlights."""

    schema_name: str
    table: str
    rows: int
    schema: pa.Schema
    #: The table's description and its columns' (ListFlights ``app_metadata``).
    description: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    #: When the table's data last changed (RFC 3339), None when unknown.
    changed_at: str | None = None

    @property
    def name(self) -> str:
        return f"{self.schema_name}.{self.table}"


def _listing_text(metadata: bytes | None) -> dict[str, Any]:
    """A listed table's descriptions (``{"description", "columns"}``), {} when none."""
    if not metadata:
        return {}
    try:
        value = json.loads(bytes(metadata))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


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
    """Quiver's data plane for one token. Thread-safe; close it (or use ``with``) when done.

    ``on_truncation`` says what a result cut at a row cap does (the server's ``[limits]
    max_rows``, the ``max_rows`` you passed, a percent sample's ``[limits] max_sample_rows``):
    ``"warn"`` (default) issues a :class:`TruncatedResultWarning` (Python's warning filters
    apply: ``warnings.simplefilter("error", TruncatedResultWarning)`` makes it an exception,
    and by default a repeated warning from one place is shown once); ``"raise"`` raises
    :class:`TruncatedResultError` (a table's rows are on it as ``.result``); ``"ignore"`` does
    neither. A result of exactly ``max_rows`` rows is not a cut: only one that had more.

    ``inline_bytes``: queries whose whole result is at most this many bytes of Arrow data
    arrive in their FlightInfo, in one round trip instead of two (proto_docs/descriptors.md,
    "Small results inline"; the server inlines at most 1 MiB); 0 turns it off.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float | None = None,
        parallelism: int = 8,
        tls_root_certs: bytes | None = None,
        on_truncation: OnTruncation = "warn",
        inline_bytes: int = INLINE_MAX_BYTES,
    ) -> None:
        if on_truncation not in ("warn", "raise", "ignore"):
            raise ValueError(f'on_truncation must be "warn", "raise" or "ignore", got {on_truncation!r}')
        if not isinstance(inline_bytes, int) or inline_bytes < 0:
            raise ValueError(f"inline_bytes must be a whole number of bytes >= 0, got {inline_bytes!r}")
        self.inline_bytes = inline_bytes
        self.on_truncation: OnTruncation = on_truncation
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
        self._options: (
            tuple[tuple[str, float | None, int], flight.FlightCallOptions, flight.FlightCallOptions] | None
        ) = None

    # --- plumbing -------------------------------------------------------------------------
    def _built(self) -> tuple[flight.FlightCallOptions, flight.FlightCallOptions]:
        """The call options (token, timeout) and those of a query's GetFlightInfo (with the
        header that takes a small result inline), built again only when a setting changed."""
        key = (self._token, self.timeout, self.inline_bytes)
        cached = self._options
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        auth = [(b"authorization", f"Bearer {self._token}".encode())]
        plain = flight.FlightCallOptions(headers=auth, timeout=self.timeout)
        query = plain
        if self.inline_bytes > 0:
            ask = (INLINE_HEADER.encode(), str(self.inline_bytes).encode())
            query = flight.FlightCallOptions(headers=[*auth, ask], timeout=self.timeout)
        self._options = (key, plain, query)
        return plain, query

    @property
    def options(self) -> flight.FlightCallOptions:
        """The call options: the token and the timeout."""
        return self._built()[0]

    @property
    def query_options(self) -> flight.FlightCallOptions:
        """The call options of a query's GetFlightInfo: :attr:`options`, and the header that
        takes a small result inline (``inline_bytes``; none when it is 0)."""
        return self._built()[1]

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as e:
            raise client_error(e) from e

    def _client_for(self, endpoint: flight.FlightEndpoint) -> flight.FlightClient:
        if not endpoint.locations:  # Quiver's endpoints: "fetch from the server you asked"
            return self._client
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

    def info(self, descriptor: flight.FlightDescriptor, *, inline: bool = False) -> flight.FlightInfo:
        """GetFlightInfo; ``inline``: a small result may come in it (:attr:`query_options`),
        which :meth:`fetch` and :meth:`fetch_stream` then read without a DoGet."""
        options = self.query_options if inline else self.options
        return self._call(lambda: self._client.get_flight_info(descriptor, options))

    def schema_of(self, descriptor: flight.FlightDescriptor) -> pa.Schema:
        return self._call(lambda: self._client.get_schema(descriptor, self.options).schema)

    def _truncated(self, cap: dict[str, Any], result: pa.Table | None = None) -> None:
        """Report a cut result as ``on_truncation`` says."""
        max_rows, reason = int(cap[KEY_MAX_ROWS]), str(cap.get(KEY_REASON, ""))
        if self.on_truncation == "raise":
            raise TruncatedResultError(max_rows, reason, result)
        if self.on_truncation == "warn":
            warnings.warn(TruncatedResultWarning(max_rows, reason), stacklevel=4)

    def fetch(self, info: flight.FlightInfo) -> pa.Table:
        """Every endpoint of ``info``, fetched in parallel, concatenated in order; a cut
        result is reported as ``on_truncation`` says."""
        endpoints = list(info.endpoints)
        inlined = _inlined(endpoints)
        if inlined is not None:  # the whole result, never a cut one: nothing to fetch
            return inlined.read_all()
        cap = row_cap(info.app_metadata)
        # Only a capped result whose cut only the stream can tell is read chunk by chunk (to
        # see the last batch's app_metadata); everything else is read whole by C++.
        watch = cap is not None and cap.get(KEY_TRUNCATED) is None
        cuts: list[dict[str, Any]] = []

        def read(endpoint: flight.FlightEndpoint) -> pa.Table:
            client = self._client_for(endpoint)
            if not watch:
                return self._call(lambda: client.do_get(endpoint.ticket, self.options).read_all())
            reader = self._call(lambda: client.do_get(endpoint.ticket, self.options))
            batches = list(self._guarded_batches(reader, cuts.append))
            return pa.Table.from_batches(batches, schema=reader.schema)

        if len(endpoints) == 1:
            table = read(endpoints[0])
        elif not endpoints:
            table = info.schema.empty_table()
        else:
            with ThreadPoolExecutor(
                min(len(endpoints), self.parallelism), thread_name_prefix="quiver-fetch"
            ) as pool:
                table = pa.concat_tables(list(pool.map(read, endpoints)))
        if cap is not None and cap.get(KEY_TRUNCATED) is True:
            cuts.append(cap)
        if cuts:
            self._truncated(cuts[0], table)
        return table

    def fetch_stream(self, info: flight.FlightInfo, *, buffer_batches: int = 4) -> pa.RecordBatchReader:
        """Every endpoint of ``info`` as one ordered stream; endpoints are read in parallel
        ahead of the consumer, each at most ``buffer_batches`` batches ahead."""
        endpoints = list(info.endpoints)
        inlined = _inlined(endpoints)
        if inlined is not None:
            return inlined
        # A cut is reported once, after the last batch: the one that carries it (even when the
        # FlightInfo already said so, as for the stored result of a cut async query).
        cuts: list[dict[str, Any]] = []
        if len(endpoints) == 1:
            endpoint = endpoints[0]
            client = self._client_for(endpoint)
            reader = self._call(lambda: client.do_get(endpoint.ticket, self.options))
            return pa.RecordBatchReader.from_batches(
                reader.schema, self._reported(self._guarded_batches(reader, cuts.append), cuts)
            )
        return pa.RecordBatchReader.from_batches(
            info.schema,
            self._reported(self._parallel_batches(endpoints, buffer_batches, cuts.append), cuts),
        )

    def _reported(
        self, batches: Iterator[pa.RecordBatch], cuts: list[dict[str, Any]]
    ) -> Iterator[pa.RecordBatch]:
        """``batches``, then the report of a cut they carried (``cuts``, filled as they are
        read): after the last batch, so a stream's consumer has every row first."""
        yield from batches
        if cuts:
            self._truncated(cuts[0])

    def _guarded_batches(
        self, reader: flight.FlightStreamReader, on_cut: Callable[[dict[str, Any]], None]
    ) -> Iterator[pa.RecordBatch]:
        """The batches of one DoGet, errors mapped; a batch whose ``app_metadata`` reports a
        cut is passed to ``on_cut``."""
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            except Exception as e:
                raise client_error(e) from e
            if chunk.app_metadata is not None:
                cap = row_cap(chunk.app_metadata)
                if cap is not None and cap.get(KEY_TRUNCATED) is True:
                    on_cut(cap)
            if chunk.data is not None:
                yield chunk.data

    def _parallel_batches(  # noqa: C901  producers, consumer and clean-up share one scope
        self,
        endpoints: list[flight.FlightEndpoint],
        depth: int,
        on_cut: Callable[[dict[str, Any]], None],
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
                    for batch in self._guarded_batches(reader, on_cut):
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
                text = _listing_text(info.app_metadata)
                out.append(
                    TableListing(
                        schema_name,
                        table,
                        info.total_records,
                        info.schema,
                        str(text.get("description", "")),
                        dict(text.get("columns", {})),
                        text.get("changed_at"),
                    )
                )
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
        return self.fetch(self.info(self._query(sql, params, max_rows), inline=True))

    def query_stream(
        self, sql: str, params: Sequence[Any] | None = None, max_rows: int | None = None
    ) -> pa.RecordBatchReader:
        return self.fetch_stream(self.info(self._query(sql, params, max_rows), inline=True))

    def query_schema(self, sql: str, params: Sequence[Any] | None = None) -> pa.Schema:
        return self.schema_of(self._query(sql, params, None))

    # --- actions ---------------------------------------------------------------------------------
    def action(self, name: str, body: dict[str, Any] | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else b""

        def run() -> Any:
            results = list(self._client.do_action(flight.Action(name, payload), self.options))
            return json.loads(results[0].body.to_pybytes()) if results else None

        return self._call(run)

    # --- artefacts (proto_docs/artefacts.md) ---------------------------------------------------
    def put_table(
        self,
        data: pa.Table | pa.RecordBatchReader,
        name: str,
        *,
        tags: Sequence[str] | None = None,
        description: str | None = None,
        ttl_seconds: int | None = None,
        max_chunksize: int = 65_536,
    ) -> dict[str, Any]:
        """Save ``data`` as a tabular artefact (DoPut) and return its metadata (``id``,
        ``rows``, ``sha256``, ``sql_name``, ``expires_at``, …). Batches are sent one by one, so
        a ``RecordBatchReader`` of any size streams with bounded memory on both sides; a
        refusal (a quota, a bad name) keeps nothing."""
        descriptor = self.command(
            "artefact",
            name=name,
            tags=list(tags) if tags is not None else None,
            description=description,
            ttl_seconds=ttl_seconds,
        )

        def run() -> dict[str, Any]:
            writer, results = self._client.do_put(descriptor, data.schema, self.options)
            try:
                # One dictionary per column for the whole upload (the server stores one IPC file).
                batches = (
                    data.unify_dictionaries().to_batches(max_chunksize)
                    if isinstance(data, pa.Table)
                    else data
                )
                for batch in batches:
                    writer.write_batch(batch)
                writer.done_writing()
                answer = results.read()
            finally:
                writer.close()
            if answer is None:
                raise QuiverClientError(
                    "INTERNAL", "the server answered the upload without the artefact's metadata"
                )
            return dict(json.loads(answer.to_pybytes()))

        return self._call(run)

    def get_artefact(self, artefact_id: str) -> pa.Table:
        """A tabular artefact you may see, whole (NOT_FOUND otherwise)."""
        return self.fetch(self.info(self.command("artefact", id=artefact_id)))

    def get_artefact_stream(self, artefact_id: str) -> pa.RecordBatchReader:
        """A tabular artefact as a stream of record batches (bounded memory)."""
        return self.fetch_stream(self.info(self.command("artefact", id=artefact_id)))

    def export(  # noqa: PLR0913  mirrors the export action's body, keyword arguments
        self,
        sql: str | None = None,
        params: Sequence[Any] | None = None,
        *,
        table: str | None = None,
        format: str = "parquet",
        name: str | None = None,
        ttl_seconds: int | None = None,
        max_rows: int | None = None,
        tags: Sequence[str] = (),
        description: str = "",
    ) -> dict[str, Any]:
        """Run ``sql`` (or read all of ``table``) into a file artefact in ``format`` (parquet,
        csv, ndjson, arrow): the server streams the result into the artefact and records its
        provenance. Answers ``{"artefact", "download", "stale", "changed", "rows",
        "truncated", "max_rows"}``; ``download`` is the artefact's path on the control plane."""
        if (sql is None) == (table is None):
            raise ValueError("export takes exactly one of sql or table")
        body: dict[str, Any] = {"format": format}
        if sql is not None:
            body["query"] = sql
            if params:
                body["params"] = list(params)
        else:
            body["table"] = table
        optional = {"name": name, "ttl_seconds": ttl_seconds, "max_rows": max_rows}
        body.update({k: v for k, v in optional.items() if v is not None})
        if tags:
            body["tags"] = list(tags)
        if description:
            body["description"] = description
        return dict(self.action("export", body))

    def artefacts(
        self,
        *,
        kind: str | None = None,
        tag: str | None = None,
        page_size: int = 100,
        after: str | None = None,
    ) -> dict[str, Any]:
        """One page of the artefacts you may see: ``{"items": [...], "next": id | None}``."""
        body: dict[str, Any] = {"page_size": page_size}
        body.update({k: v for k, v in {"kind": kind, "tag": tag, "after": after}.items() if v is not None})
        return dict(self.action("list-artefacts", body))

    def read_artefact(self, artefact_id: str, rows: int = 10) -> dict[str, Any]:
        """An artefact's metadata and bounded head: ``{"artefact", "columns", "rows", "text",
        "truncated"}``."""
        return dict(self.action("read-artefact", {"id": artefact_id, "rows": rows}))

    def refresh(self, artefact_id: str, ttl_seconds: int | None = None) -> dict[str, Any]:
        """Re-run an export you made, under your current allowlist, into a new artefact whose
        ``provenance.parent_id`` is ``artefact_id``; answers as :meth:`export`."""
        body: dict[str, Any] = {"id": artefact_id}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        return dict(self.action("refresh-artefact", body))

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
