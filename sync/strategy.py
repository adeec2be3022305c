"""Which strategy a run uses (full, append or merge) and whether it may run at all: a pure
function of the configuration, the schema diff and the table's recorded state.

The rules (proto_docs/sync.md, "Strategies" and "Schema evolution"):

- no replica yet, a requested ``--full`` run, or ``mode = "full"``: a full load (swap);
- ``on_schema_change = "fail"`` with any change: refused, unless the run is a requested
  full run (that is how an operator accepts the new schema);
- no watermark yet (never synced incrementally): a full load;
- a structural change the policy will not evolve in place (``resync``, or a type change that
  would lose values): a full resync;
- otherwise the configured mode, with the diff's DDL applied first; a merge also scans the
  source's keys to remove deleted rows when ``reconcile_seconds`` have passed since the last
  full pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from catalog.config import SyncTableConfig
from sync.schema_diff import SchemaDiff
from sync.state import TableState

Strategy = Literal["full", "append", "merge"]


@dataclass(frozen=True, slots=True)
class Plan:
    """A run's decision: how it loads, what DDL it applies first, what it reports changed."""

    strategy: Strategy
    ddl: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()
    reconcile: bool = False
    # on_schema_change = "fail" and the schema changed: the run must stop before loading.
    refused: bool = False


def choose_plan(
    diff: SchemaDiff | None,
    entry: SyncTableConfig,
    state: TableState | None,
    *,
    full: bool,
    now: datetime,
) -> Plan:
    """Decide the run's plan from the table's configuration and the state the last run left.
    ``diff`` is None when the replica does not exist yet; ``full`` is a full run asked for by
    an operator (``--full``, ``?full=true``)."""
    mode, policy = entry.mode, entry.on_schema_change
    if diff is None:
        return Plan("full")
    changes = diff.changes
    refused = bool(changes) and policy == "fail" and not full
    if full or mode == "full":
        return Plan("full", changes=changes, refused=refused)
    if refused:
        return Plan(mode, changes=changes, refused=True)
    if state is None or state.watermark is None:  # never synced incrementally
        return Plan("full", changes=changes)
    if diff.structural and (policy == "resync" or diff.incompatible):
        return Plan("full", changes=(*changes, "full resync"))
    every, last = entry.reconcile_seconds, state.last_full_at
    reconcile = (
        mode == "merge" and every is not None and (last is None or (now - last).total_seconds() >= every)
    )
    return Plan(mode, ddl=diff.ddl, changes=changes, reconcile=reconcile)
