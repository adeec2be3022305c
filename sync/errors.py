"""The one failure type of a sync run.

Whatever stops a run - the source refusing a connection or a query, a configured column that
is not there, a schema change the table's policy refuses, a stop request - is a
:class:`SyncFailed`. Its message is what status, the run history, the logs and the CLI show,
so it never carries a secret (source errors are scrubbed before they become one), and
``transient`` says whether the run's retry loop may try again.
"""

from __future__ import annotations


class SyncFailed(Exception):
    """A run failure with a message fit for status, logs and the CLI (no secrets)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient
