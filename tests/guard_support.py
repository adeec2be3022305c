"""The SQL guard's test set-up, shared by its test modules: a real, locked-down DuckDB file
with the module's tables, the table catalog and a policy with the ``analysts`` swarm allowed
``demo.*``, and agents of that swarm."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from catalog.database import Database
from catalog.identity import Principal
from catalog.policy import Policy
from catalog.tables import TableCatalog


def guard_database(root: Path, setup: str) -> tuple[Database, TableCatalog, Policy]:
    """The database of ``root`` with ``setup`` (SQL) applied, its catalog and its policy."""
    db = Database(root / "quiver.duckdb", temp_dir=root / "tmp", lockdown=True)
    with db.transaction() as cur:
        cur.execute(setup)
    tables = TableCatalog(db)
    policy = Policy(tables)
    policy.set_allowlist("analysts", ["demo.*"])
    return db, tables, policy


def analyst(subject: str, *, kind: str = "agent", swarm: str | None = "analysts") -> Principal:
    """A principal for the guard: by default an agent of the ``analysts`` swarm."""
    return Principal(
        kind=kind,  # type: ignore[arg-type]
        jti=f"jti-{subject}",
        subject=subject,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        swarm=swarm,
        agent="a1" if kind == "agent" else None,
    )
