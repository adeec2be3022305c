"""How the source's columns differ from the replica's: a pure function over plain data.

The run reads the source's columns (``information_schema``) and the replica's
(``duckdb_columns()``) and hands both here; what comes back is what changed, in the words
status and the audit log show, and the DDL that evolves the replica in place. Whether the
run then evolves, resyncs or refuses is the strategy's decision (sync/strategy.py), made
from this diff and the table's ``on_schema_change`` policy (proto_docs/sync.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from catalog import quote_ident
from catalog.config import SyncTableConfig
from sync.typemap import SourceColumn, fingerprint, is_widening


@dataclass(frozen=True, slots=True)
class SchemaDiff:
    """What a run found changed between the source and the replica.

    ``changes`` are one line each (``column X BIGINT added``); ``ddl`` evolves the replica in
    place (added columns, widened types), in source column order. ``incompatible`` is a type
    change that would lose values; ``structural`` says the replica's shape no longer matches
    what the policy keeps (any DDL, an incompatible type, or a dropped column the policy does
    not keep)."""

    changes: tuple[str, ...] = ()
    ddl: tuple[str, ...] = ()
    incompatible: bool = False
    structural: bool = False


def diff_schema(
    columns: Sequence[SourceColumn],
    replica: Mapping[str, str],
    entry: SyncTableConfig,
    *,
    target_sql: str,
    last_fingerprint: str | None,
) -> SchemaDiff:
    """Compare the source's ``columns`` with the replica's ``{column name: DuckDB type}``,
    under the table's ``on_schema_change`` policy and ``mode`` (``entry``).

    Names compare case-insensitively (DuckDB's rule); types compare as DuckDB spells them.
    A column dropped at the source is a change unless the policy is ``evolve`` and the
    source's column list is the one the last run recorded (``last_fingerprint``): an evolving
    replica keeps the old column (NULL in new rows) and says so once, on the run that saw the
    source change, not on every run after it.
    """
    policy, mode = entry.on_schema_change, entry.mode
    source_changed = last_fingerprint not in (None, fingerprint(list(columns)))
    have = {name.lower(): (name, dtype) for name, dtype in replica.items()}
    changes: list[str] = []
    ddl: list[str] = []
    incompatible = False
    for c in columns:
        found = have.get(c.target_name.lower())
        if found is None:
            changes.append(f"column {c.target_name} {c.duckdb_type} added")
            ddl.append(f"ALTER TABLE {target_sql} ADD COLUMN {quote_ident(c.target_name)} {c.duckdb_type}")
            continue
        name, old = found
        if old.upper() == c.duckdb_type.upper():
            continue
        if is_widening(old, c.duckdb_type):
            changes.append(f"column {c.target_name} widened {old} -> {c.duckdb_type}")
            ddl.append(f"ALTER TABLE {target_sql} ALTER COLUMN {quote_ident(name)} TYPE {c.duckdb_type}")
        else:
            changes.append(f"column {c.target_name} changed {old} -> {c.duckdb_type} (incompatible)")
            incompatible = True
    wanted = {c.target_name.lower() for c in columns}
    removed = [name for key, (name, _) in have.items() if key not in wanted]
    if removed and (policy != "evolve" or source_changed):
        keep = " (kept: NULL in new rows)" if policy == "evolve" and mode != "full" else ""
        changes.extend(f"column {name} dropped at the source{keep}" for name in removed)
    structural = bool(ddl) or incompatible or (bool(removed) and policy != "evolve")
    return SchemaDiff(tuple(changes), tuple(ddl), incompatible, structural)
