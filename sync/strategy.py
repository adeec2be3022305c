"""Which strategy a run uses (full, append or merge) and whether it may run at all: a pure
function of the configuration, the schema diff and the table's recorded state.

The rules (proto_docs/sync.md, "Strategies" and "Schema changes"):

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

from sync.schema_diff import Mode, Policy, SchemaDiff

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
    *,
    mode: Mode,
    policy: Policy,
    full: bool,
    has_watermark: bool,
    reconcile_seconds: float | None,
    last_full_at: datetime | None,
    now: datetime,
) -> Plan:
    """Decide the run's plan. ``diff`` is None when the replica does not exist yet;
    ``full`` is a full run asked for by an operator (``--full``, ``?full=true``);
    ``has_watermark`` says whether an earlier run recorded where it got to."""
    if diff is None:
        return Plan("full")
    changes = diff.changes
    refused = bool(changes) and policy == "fail" and not full
    if full or mode == "full":
        return Plan("full", changes=changes, refused=refused)
    if refused:
        return Plan(mode, changes=changes, refused=True)
    if not has_watermark:
        return Plan("full", changes=changes)
    if diff.structural and (policy == "resync" or diff.incompatible):
        return Plan("full", changes=(*changes, "full resync"))
    reconcile = (
        mode == "merge"
        and reconcile_seconds is not None
        and (last_full_at is None or (now - last_full_at).total_seconds() >= reconcile_seconds)
    )
    return Plan(mode, ddl=diff.ddl, changes=changes, reconcile=reconcile)
