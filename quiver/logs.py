"""structlog setup: JSON lines in production, readable console output in a terminal.

Secrets never reach a log: values under secret-sounding keys are replaced, and anything that
looks like a JWT is masked wherever it appears.

Libraries that log through the standard library (uvicorn's ``uvicorn.error``, the Snowflake
connector) and Python warnings go through the same processors, by structlog's
``ProcessorFormatter`` on the root handler: in JSON mode each is one JSON object with the
same keys as Quiver's own lines (``event``, ``level``, ``timestamp``) plus ``logger``, and
the same redaction. So the journal (or a log shipper) never sees a line of another shape.

Records are rendered and written by one background thread (:class:`LogWriter`), not by the
thread that logs: a Flight call's ``flight.call`` record used to be rendered to JSON, written
and flushed inside the RPC, before the client got its answer (tests/bench/RESULTS.md, "Agent
query path"). The calling thread only stamps the record (level, time, the exception it is
handling) and appends it to a bounded queue; the writer renders (redaction included), writes
and flushes in batches, in the order the records were queued. A full queue never blocks the
caller and never grows: the record is dropped and counted (``quiver_log_records_dropped_total``,
and a ``log.dropped`` record once the writer catches up). The queue is flushed at a clean
exit (``Runtime.stop``, and ``atexit`` for every command); a crash loses at most what was
queued (ARCHITECTURE.md, "Logging").
"""

from __future__ import annotations

import atexit
import collections
import datetime
import json
import logging
import math
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import IO, Any

import msgspec
import structlog

SECRET_KEYS = {
    "token",
    "password",
    "secret",
    "private_key",
    "authorization",
    "passphrase",
    "private_key_passphrase",
}
# What configure() put on the root logger, for reclaim_root().
_root: tuple[logging.Handler, int] | None = None
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


def _scrub(value: Any) -> Any:
    if isinstance(value, str) and "eyJ" in value:
        return JWT_RE.sub("[redacted-token]", value)
    return value


# Whether an event key names a secret (its lower case is in SECRET_KEYS), per key seen: every
# Flight call writes a record of a dozen keys, and lower-casing each of them on every record
# was a third of the record's cost. Keys are the code's own names; the bound is a backstop.
_SECRET_VERDICTS: dict[str, bool] = {}
_SECRET_VERDICTS_MAX = 4096


def redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    verdicts = _SECRET_VERDICTS
    for key, value in event.items():  # values are replaced in place: the keys do not change
        if value is None:
            continue
        secret = verdicts.get(key)
        if secret is None:
            secret = key.lower() in SECRET_KEYS
            if len(verdicts) < _SECRET_VERDICTS_MAX:
                verdicts[key] = secret
        if secret:
            event[key] = "[redacted]"
        elif value.__class__ is str:
            if "eyJ" in value:
                event[key] = JWT_RE.sub("[redacted-token]", value)
        elif isinstance(value, str):  # a str subclass: scrubbed the same way
            event[key] = _scrub(value)
    return event


def format_exc_info(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Render ``exc_info`` with an explicit frame limit: the server log keeps full tracebacks
    whatever ``sys.tracebacklimit`` says."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        if isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        elif not isinstance(exc_info, tuple):
            exc_info = sys.exc_info()
        if exc_info[0] is not None:
            event["exception"] = "".join(traceback.TracebackException(*exc_info, limit=100).format())
    return event


#: Records waiting for the writer thread at most; beyond that a record is dropped and counted.
#: A record is a small dict (a Flight call's has a dozen short values): ~10 MB at the very most.
QUEUE_RECORDS = 10_000
#: How long the writer gathers records after writing a batch (seconds): lines reach the
#: stream at most this much later than they were logged.
BATCH_SECONDS = 0.02

Render = Callable[[str, dict[str, Any]], str]


class _Flush:
    """A marker in the queue: set once every record queued before it was written."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class LogWriter:
    """One thread that renders and writes the records other threads queue (see the module
    docstring). ``submit`` never blocks: the queue is a deque whose length is checked before
    the append (appends are atomic under the GIL; several threads at the bound may overshoot
    it by one record each, no more). The writer is started by the first record."""

    def __init__(self, stream: IO[str], render: Render, max_records: int = QUEUE_RECORDS) -> None:
        self._stream = stream
        self._render = render
        self._max = max_records
        self._queue: collections.deque[tuple[str, dict[str, Any]] | str | _Flush] = collections.deque()
        self._wake = threading.Event()
        self._pause = threading.Event()  # set: the writer does not pause (a flush, a close)
        self._lock = threading.Lock()  # starting the thread; counting drops
        self._thread: threading.Thread | None = None
        self._closed = False
        self.dropped = 0  # records dropped since start (the metric)
        self._unreported = 0  # dropped and not yet told in a log.dropped record

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._queue)

    def submit(self, method: str, event: dict[str, Any]) -> None:
        """Queue a structlog record (rendered later by ``render(method, event)``)."""
        self._put((method, event))

    def submit_line(self, line: str) -> None:
        """Queue a line rendered already (the standard library's records)."""
        self._put(line)

    def _put(self, item: tuple[str, dict[str, Any]] | str) -> None:
        if len(self._queue) >= self._max or self._closed:
            with self._lock:
                self.dropped += 1
                self._unreported += 1
            return
        self._queue.append(item)
        if self._thread is None:
            self._start()
        if not self._wake.is_set():
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._loop, name="quiver-log-writer", daemon=True)
                thread.start()
                self._thread = thread

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued before this call was written (False: not within
        ``timeout`` seconds, or the writer is not running)."""
        if self._thread is None or not self._thread.is_alive():
            self._drain()  # nothing will write them: do it here (before start, after a stop)
            return True
        marker = _Flush()
        self._queue.append(marker)
        self._pause.set()
        self._wake.set()
        try:
            return marker.done.wait(timeout)
        finally:
            self._pause.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread; later records are dropped (counted)."""
        self.flush(timeout)
        with self._lock:
            self._closed = True
        self._pause.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._drain()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()  # before draining: a record queued from here on sets it again
            self._drain()
            # Gather what comes next for a moment instead of being woken by every record (a
            # Flight call writes two): the writer wakes at most 1/BATCH_SECONDS times a second.
            # A flush or a close does not wait for it.
            self._pause.wait(BATCH_SECONDS)

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            lines: list[str] = []
            markers: list[_Flush] = []
            while queue and len(lines) < 512:
                item = queue.popleft()
                if isinstance(item, _Flush):
                    markers.append(item)
                    break  # write what came before it, then tell the flusher
                if isinstance(item, str):
                    lines.append(item)
                    continue
                try:
                    lines.append(self._render(*item))
                except Exception as e:  # noqa: BLE001 - one bad record must not stop the writer
                    lines.append(f"log record not rendered: {type(e).__name__}")
                if len(lines) % 16 == 0:
                    # Let a request thread that waits for the GIL have it every few records
                    # (~0.3 ms): rendering a backlog in one go would hold it for the whole
                    # switch interval (5 ms) at a time.
                    time.sleep(0)
            if self._unreported:
                with self._lock:
                    count, self._unreported = self._unreported, 0
                lines.append(self._render("warning", {"event": "log.dropped", "records": count}))
            self._write(lines)
            for marker in markers:
                marker.done.set()

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # the stream is gone (closed at exit, a broken pipe)
            pass


def _queue_method(name: str) -> Callable[..., None]:
    """A logger method that queues the processed record (``event``) under level ``name``."""

    def queue(_self: object, **event: Any) -> None:
        writer = _writer
        if writer is not None:
            writer.submit(name, event)

    queue.__name__ = name
    return queue


class _QueuedLogger:
    """structlog's logger: hands the processed record to the current writer (looked up on
    every record, so a logger bound before a second ``configure`` writes to the new one)."""

    __slots__ = ()
    msg = info = _queue_method("info")
    debug = _queue_method("debug")
    warning = warn = _queue_method("warning")
    error = err = exception = _queue_method("error")
    critical = fatal = _queue_method("critical")


class _QueuedHandler(logging.Handler):
    """The root handler: formats a standard-library record where it is logged (its message,
    arguments and exception are of that moment) and queues the line, in order with
    structlog's records."""

    def emit(self, record: logging.LogRecord) -> None:
        writer = _writer
        if writer is None:
            return
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)
            return
        writer.submit_line(line)


def _capture_exc_info(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """``exc_info=True`` means "the exception being handled": take it now, in the thread
    that handles it, since the record is rendered later in another."""
    if event.get("exc_info") is True:
        event["exc_info"] = sys.exc_info()
    return event


def _stamp_now(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The moment of the record, in the calling thread: ``time.time()`` only. Formatting it
    (``datetime.isoformat``, what structlog's ``TimeStamper`` does in place) is the writer's
    work (:func:`_iso_timestamp`): it was a third of a record's cost in a Flight call."""
    event["timestamp"] = time.time()
    return event


# The last whole second formatted (seconds since the epoch, its ISO text up to the seconds):
# records come many to a second, and building a datetime for each was a quarter of the
# writer's cost per record. One tuple, replaced whole: safe to read from any thread.
_second: tuple[int, str] = (-1, "")


def _iso_timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """In the writer: the stamped moment as structlog's ``TimeStamper(fmt="iso", utc=True)``
    writes it (``2026-12-02T04:21:04.684142Z``, no fraction when it is 0); a stamp formatted
    already is left alone. The microseconds are rounded as ``datetime.fromtimestamp`` rounds
    them (half to even, carried into the second): tests/test_logs.py compares the two."""
    stamp = event.get("timestamp")
    if stamp.__class__ is float:
        global _second
        fraction, whole = math.modf(stamp)
        micros = round(fraction * 1e6)
        second = int(whole)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:
            second, micros = second - 1, micros + 1_000_000
        cached = _second
        if cached[0] == second:
            prefix = cached[1]
        else:
            prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).isoformat()[:19]
            _second = (second, prefix)
        event["timestamp"] = f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"
    return event


def _json_default(value: Any) -> Any:
    """A value JSON has no form for: what structlog's ``JSONRenderer`` writes for it (its
    ``__structlog__()``, else its ``repr``)."""
    own = getattr(value, "__structlog__", None)
    return own() if callable(own) else repr(value)


_JSON = msgspec.json.Encoder(enc_hook=_json_default)


def render_json(_: Any, __: str, event: dict[str, Any]) -> str:
    """A record as one JSON line, by msgspec: a fifth of the cost of structlog's
    ``JSONRenderer`` (``json.dumps``), which every Flight call's record went through in the
    writer thread while request threads waited for the GIL (tests/bench/PROFILE.md, section
    14). The line is ASCII, as ``json.dumps`` makes it (``\\u`` escapes), so that it can be
    written to a stream of any encoding: a record with other characters, or one msgspec
    cannot encode (an integer beyond 64 bits, a key that is not a string), is rendered by
    ``json.dumps`` instead. A token-shaped text anywhere in the line — a nested value, an
    object's ``repr`` — is masked as :func:`redact` masks a top-level one."""
    try:
        raw = _JSON.encode(event)
    except (TypeError, ValueError, OverflowError):
        raw = b""
    line = raw.decode("ascii") if raw and raw.isascii() else json.dumps(event, default=_json_default)
    return _scrub(line)


def _chain(processors: list[Any]) -> Render:
    def render(method: str, event: dict[str, Any]) -> str:
        out: Any = event
        for processor in processors:
            out = processor(None, method, out)
        return out if isinstance(out, str) else str(out)

    return render


_writer: LogWriter | None = None


def dropped_records() -> int:
    """Records dropped because the writer's queue was full (``quiver_log_records_dropped``)."""
    return _writer.dropped if _writer is not None else 0


def flush(timeout: float = 5.0) -> None:
    """Write every record queued so far (a clean stop calls it; so does ``atexit``)."""
    if _writer is not None:
        _writer.flush(timeout)


def _close_at_exit() -> None:
    if _writer is not None:
        _writer.close()


def configure(fmt: str = "auto", level: str = "info") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    lvl = getattr(logging, level.upper(), logging.INFO)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # In the calling thread: what belongs to the moment of the call. The rest is rendered by
    # the writer thread (LogWriter).
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _stamp_now,
        _capture_exc_info,
    ]
    rendering: list[Any]
    if use_console:
        # No local variables in tracebacks (a handler's locals hold request headers), and the
        # rendered line is scrubbed once more: an exception's text is rendered only here.
        console = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        rendering = [_iso_timestamp, redact, lambda logger, name, event: _scrub(console(logger, name, event))]
    else:
        # Tracebacks are rendered first, so that redact scrubs them too.
        rendering = [_iso_timestamp, format_exc_info, redact, render_json]
    global _writer
    if _writer is not None:  # configured again (a command that reconfigures): one writer
        _writer.close()
    else:
        atexit.register(_close_at_exit)
    _writer = LogWriter(sys.stderr, _chain(rendering))
    logger = _QueuedLogger()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=lambda *_: logger,
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library go to stderr through the same
    # rendering (with their logger's name); warnings.warn() too, instead of its own format.
    handler = _QueuedHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.processors.add_log_level, structlog.stdlib.add_logger_name, stamp],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    global _root
    # Other libraries speak from WARNING up; uvicorn's own lines (start, stop, refused
    # connections) at Quiver's level.
    _root = (handler, max(lvl, logging.WARNING))
    reclaim_root()
    logging.getLogger("uvicorn").setLevel(lvl)
    logging.captureWarnings(True)


def reclaim_root() -> None:
    """Put configure()'s handler and level back on the root logger, and send the
    ``litestar`` logger's lines to it. Building a Litestar app without
    ``logging_config=None`` applies Litestar's default logging config, which replaces the
    root handlers with its own plain-text format (``INFO - <time> - uvicorn.error - ...``)
    and gives ``litestar`` a handler of its own: the runtime calls this after building the
    control plane. Does nothing before configure() (tests that keep pytest's handlers)."""
    if _root is None:
        return
    handler, level = _root
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    framework = logging.getLogger("litestar")
    framework.handlers.clear()
    framework.propagate = True
