"""structlog setup: JSON lines in production, readable console output in a terminal.

Secrets never reach a log: values under secret-sounding keys are replaced, and anything that
looks like a JWT is masked wherever it appears.
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
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")


def _scrub(value: Any) -> Any:
    if isinstance(value, str) and "eyJ" in value:
        return JWT_RE.sub("[redacted-token]", value)
    return value


def redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_KEYS and event[key] is not None:
            event[key] = "[redacted]"
        else:
            event[key] = _scrub(event[key])
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


class _FullTracebackFormatter(logging.Formatter):
    """Tracebacks with an explicit limit, like :func:`format_exc_info`."""

    def formatException(self, ei: Any) -> str:
        return "".join(traceback.TracebackException(*ei, limit=100).format()).rstrip()


def configure(fmt: str = "auto", level: str = "info") -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_console:
        # No local variables in tracebacks (a handler's locals hold request headers), and the
        # rendered line is scrubbed once more: an exception's text is rendered only here.
        console = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        processors += [redact, lambda logger, name, event: _scrub(console(logger, name, event))]
    else:
        # Tracebacks are rendered first, so that redact scrubs them too.
        processors += [format_exc_info, redact, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (uvicorn) go to stderr too.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FullTracebackFormatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(lvl, logging.WARNING))
