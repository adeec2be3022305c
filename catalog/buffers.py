"""A bounded in-memory buffer of records that a background flush writes in batches.

The audit log (catalog/audit.py) and the query log (catalog/query_log.py) both take a record on
the request's path and write it later, in one transaction per batch (housekeeping, a read, or
shutdown). This holds the part they share: appending under a lock, the bound (beyond it a
record is counted as dropped, never blocking the request) and taking the whole batch at once.
Each log keeps its own write lock, taken *before* :meth:`RecordBuffer.take`, so that a reader's
flush that finds the buffer empty waits for the flush that took the records to commit them.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class RecordBuffer(Generic[T]):
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._items: list[T] = []
        self._dropped = 0

    def add(self, item: T) -> None:
        """Keep ``item`` for the next flush, or count it as dropped when the buffer is full."""
        with self._lock:
            if len(self._items) >= self._limit:
                self._dropped += 1
                return
            self._items.append(item)

    def take(self) -> tuple[list[T], int]:
        """Everything buffered, and how many records were dropped since the last take."""
        with self._lock:
            items, self._items = self._items, []
            dropped, self._dropped = self._dropped, 0
        return items, dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
