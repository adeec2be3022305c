"""The buffered logs (audit, query log): a read sees every record made before it, even while
another thread's flush is writing them.

Both logs buffer records in memory and let housekeeping write them in batches; a read flushes
first. A flush used to take the buffer and only then wait for the table's write lock, so a
reader's flush that came in between found the buffer empty and read the table before the
records were committed: an audit query right after a refused request could miss it. The
write lock is now taken before the buffer.

The test holds the write lock itself — what a retention prune or another flush's write does —
so that housekeeping's flush and the reader's line up the way they did in the race.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from catalog import Principal
from tests.harness import Server


def _race(write_lock: threading.Lock, flush: Callable[[], object], read: Callable[[], bool]) -> bool:
    """Housekeeping's flush, then a reader, both while the write lock is held; the reader's
    verdict once the lock is released."""
    seen: list[bool] = []
    write_lock.acquire()
    try:
        housekeeping = threading.Thread(target=flush)
        housekeeping.start()
        time.sleep(0.2)  # ordering only: housekeeping reaches the lock first
        reader = threading.Thread(target=lambda: seen.append(read()))
        reader.start()
        time.sleep(0.2)
    finally:
        write_lock.release()
    housekeeping.join(30)
    reader.join(30)
    assert not housekeeping.is_alive() and not reader.is_alive()
    return seen == [True]


def test_an_audit_query_sees_events_a_concurrent_flush_is_writing(fresh_server: Server) -> None:
    audit = fresh_server.catalog.audit
    audit.flush()
    audit.record("race.check", outcome="ok", target="t1")
    assert _race(
        audit._write_lock,
        audit.flush,
        lambda: [e.target for e in audit.query(action="race.check")] == ["t1"],
    )


def test_the_query_log_sees_records_a_concurrent_flush_is_writing(fresh_server: Server) -> None:
    qlog = fresh_server.catalog.query_log
    qlog.flush()
    who = Principal(
        kind="agent",
        jti="j-race",
        subject="agent:demo/racer",
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
        swarm="demo",
        agent="racer",
    )
    qlog.record(who, kind="query", via="flight", sql="SELECT 1", seconds=0.001)
    assert _race(
        qlog._write_lock,
        qlog.flush,
        lambda: [r.principal for r in qlog.query(agent="racer").queries] == [who.label],
    )
