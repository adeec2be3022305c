"""structlog setup: JSON lines in production, readable console output in a terminal.

Secrets never reach a log: values under secret-sounding keys are replaced, and anything that
looks like a JWT is masked wherever it appears.

Libraries that log through the standard library (uvicorn's ``uvicorn.error``, the Snowflake
connector) and Python warnings go through the same processors, by structlog's
``ProcessorFormatter`` on the root handler: in JSON mode each is one JSON object with the
same keys as Quiver's own lines (``event``, ``level``, ``timestamp``) plus ``logger``, and
the same redaction. So the journal (or a log shipper) never sees a line of another shape.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from typing import Any

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


def configure(fmt: str = "auto", level: str = "info") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    lvl = getattr(logging, level.upper(), logging.INFO)
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        stamp,
    ]
    rendering: list[Any]
    if use_console:
        # No local variables in tracebacks (a handler's locals hold request headers), and the
        # rendered line is scrubbed once more: an exception's text is rendered only here.
        console = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        rendering = [redact, lambda logger, name, event: _scrub(console(logger, name, event))]
    else:
        # Tracebacks are rendered first, so that redact scrubs them too.
        rendering = [format_exc_info, redact, structlog.processors.JSONRenderer()]
    processors += rendering
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library go to stderr through the same
    # rendering (with their logger's name); warnings.warn() too, instead of its own format.
    handler = logging.StreamHandler(sys.stderr)
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
