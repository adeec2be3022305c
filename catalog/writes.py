"""Admin writes to the system schema, serialized in one place.

Swarms, allowlists and token records change through :meth:`AdminWrites.run` only, under one
process-wide lock. Why one lock and not DuckDB's MVCC alone: two transactions that update the
same rows conflict in DuckDB (``TransactionException``) and a check-then-insert in two
concurrent transactions either commits both (an allowlist PUT's delete sees only committed
rows, so two PUTs committed the union of their bodies) or fails one at COMMIT — each of which
once answered a 500 or left the catalog disagreeing with the in-memory policy. Serialized,
every change reads the state the previous one committed, and the caller updates the
in-memory copies (policy, swarm instances, revocations) while still holding the lock, so
memory always equals what committed. Admin writes are rare; a lock costs nothing on the hot
path, which never writes.

A conflict with a writer outside the lock (none of the admin tables today; the sync worker
and the audit log write other tables) is retried a few times, then answered as
:class:`WriteConflict` (409, ``ABORTED``) — never an internal error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

import duckdb
import structlog

from catalog.database import Database
from catalog.errors import Conflict, WriteConflict

log = structlog.get_logger(__name__)

T = TypeVar("T")

ATTEMPTS = 4


class AdminWrites:
    def __init__(self, db: Database) -> None:
        self._db = db
        # Re-entrant: a caller holds it across run() and its in-memory update.
        self.lock = threading.RLock()

    def run(self, what: str, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn`` in one transaction under the admin-write lock and return its result.

        ``fn`` must only touch the database (it may run again after a conflict); in-memory
        state is updated by the caller after ``run`` returns, inside ``with self.lock``.
        A :class:`~catalog.errors.QuiverError` raised by ``fn`` rolls back and propagates.
        """
        with self.lock:
            for attempt in range(1, ATTEMPTS + 1):
                cur = self._db.cursor()
                try:
                    cur.execute("BEGIN")
                    try:
                        result = fn(cur)
                        cur.execute("COMMIT")
                    except BaseException:
                        # DuckDB may already have aborted the transaction (a conflict does).
                        with suppress(duckdb.Error):
                            cur.execute("ROLLBACK")
                        raise
                    return result
                except duckdb.ConstraintException:
                    raise Conflict(f"{what}: it already exists (a concurrent request created it)") from None
                except duckdb.TransactionException as e:
                    log.warning("catalog.write_conflict", what=what, attempt=attempt, error=str(e)[:200])
                    if attempt < ATTEMPTS:
                        time.sleep(0.01 * attempt)
                finally:
                    cur.close()
            raise WriteConflict(
                f"{what} conflicted with a concurrent change {ATTEMPTS} times; nothing was changed, "
                "retry the request"
            )
