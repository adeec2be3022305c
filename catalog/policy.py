"""Every decision about what a principal may read lives here.

A swarm's allowlist holds ``schema.table`` and ``schema.*`` patterns. Agents and swarm tokens
read exactly the data tables their swarm's allowlist matches; admin tokens read every data
table. The system schema is never readable. Matching is case-insensitive, as DuckDB's
identifiers are. The allowlists are held in memory (kept current by :class:`SwarmStore`), so
a decision on the hot path never touches the database.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

import structlog

from catalog.database import ARTEFACT_SCHEMA, SYSTEM_SCHEMA
from catalog.errors import InvalidArgument, PermissionDenied, Unavailable, bounded
from catalog.identity import Principal
from catalog.rules import Attributes, AttributeValue, TableRule, bindings
from catalog.tables import TableCatalog, TableInfo, TableRef, fold
from catalog.views import Views

log = structlog.get_logger(__name__)

_PART = r"[A-Za-z_][A-Za-z0-9_$]*"
PATTERN_RE = re.compile(rf"^({_PART})\.({_PART}|\*)$")
MAX_PATTERNS = 1000


def parse_pattern(raw: str) -> tuple[str, str]:
    """Validate one allowlist entry; return its lower-cased (schema, table-or-*)."""
    if not isinstance(raw, str):
        raise InvalidArgument("allowlist entries must be strings like 'demo.orders' or 'sales.*'")
    m = PATTERN_RE.match(raw.strip())
    if not m:
        raise InvalidArgument(
            f"allowlist entry {raw!r} is not valid: use 'schema.table' or 'schema.*' "
            "(unquoted identifiers: letters, digits, _ and $, not starting with a digit)"
        )
    schema, table = fold(m.group(1)), fold(m.group(2))
    if schema == SYSTEM_SCHEMA:
        raise InvalidArgument(
            f"allowlist entry {raw!r} names Quiver's system schema, which is never readable"
        )
    if schema == ARTEFACT_SCHEMA:
        raise InvalidArgument(
            f"allowlist entry {raw!r} names the schema of tabular artefacts, which is not allowlisted: "
            "an artefact is readable by its owner's swarm and those it is shared with"
        )
    return schema, table


def pattern_matches(pattern: str, ref: TableRef) -> bool:
    schema, _, table = pattern.partition(".")
    s, t = ref.key()
    return schema == s and (table == "*" or table == t)


#: Warnings named one by one in an allowlist answer; the rest are counted in one more line.
MAX_WARNINGS = 20


def allowlist_matches(patterns: Sequence[str], refs: Sequence[TableRef]) -> tuple[list[str], list[str]]:
    """The tables of ``refs`` that ``patterns`` match now, and a warning per pattern matching
    none (at most :data:`MAX_WARNINGS` named): such an entry is kept (pre-provisioning a table
    sync will bring), but a misspelt one would otherwise look the same as a correct one."""
    matching = [r.qualified for r in refs if any(pattern_matches(p, r) for p in patterns)]
    unmatched = [p for p in patterns if not any(pattern_matches(p, r) for r in refs)]
    warnings = [f"{bounded(p)} matches no table" for p in unmatched[:MAX_WARNINGS]]
    if len(unmatched) > MAX_WARNINGS:
        warnings.append(f"and {len(unmatched) - MAX_WARNINGS} more entries match no table")
    return matching, warnings


NOT_READABLE = "not readable: not in your allowlist or does not exist"

#: How many readable names a refusal suggests.
HINT_NAMES = 5


def closest_readable(wanted: str, readable: Iterable[str], n: int = HINT_NAMES) -> list[str]:
    """The ``n`` names of ``readable`` closest to ``wanted`` (a typo's likely intent), best
    first: by similarity to the whole ``schema.table`` or to the table part alone (an agent
    often gets the schema wrong), ties in name order. Ranked only among what the caller may
    read, so the answer for a table that exists but is not readable is the answer for one
    that does not exist (existence never leaks)."""
    target = fold(wanted)[:200]  # a refusal echoes at most a few hundred characters anyway
    target_table = target.rsplit(".", 1)[-1]

    def score(name: str) -> float:
        folded = fold(name)
        whole = difflib.SequenceMatcher(None, target, folded).ratio()
        table = difflib.SequenceMatcher(None, target_table, folded.rsplit(".", 1)[-1]).ratio()
        return max(whole, table)

    names = sorted(set(readable))
    return sorted(names, key=lambda name: (-score(name), name))[:n]


def readable_hint(wanted: str, readable: Sequence[str]) -> str:
    """What a refusal says one may read instead: every readable name when there are few,
    else the closest few and how many there are in all; "none" for an empty allowlist."""
    if not readable:
        return "none"
    closest = closest_readable(wanted, readable)
    hint = ", ".join(closest)
    if len(set(readable)) > len(closest):
        hint += f" (the {len(closest)} closest of {len(set(readable)):,}; ListFlights lists them all)"
    return hint


class ArtefactTables(Protocol):
    """What the policy asks the artefact store (catalog/artefacts.py)."""

    def readable_table(self, principal: Principal, name: str) -> TableRef | None: ...


class Policy:
    def __init__(self, tables: TableCatalog, mask_key: str | None = None) -> None:
        self._tables = tables
        self._allowlists: dict[str, tuple[str, ...]] = {}
        # swarm -> {(schema, table) folded: its rule}; swarm -> its attributes.
        self._rules: dict[str, dict[tuple[str, str], TableRule]] = {}
        self._attributes: dict[str, Attributes] = {}
        self._lock = threading.Lock()
        #: The relation texts of ruled reads (catalog/views.py).
        self.views = Views(tables, mask_key)
        # Set by Catalog: resolves artefacts."<id>" (None: no artefact is readable).
        self.artefacts: ArtefactTables | None = None

    # --- kept current by SwarmStore -------------------------------------------------
    def set_allowlist(self, swarm: str, patterns: Iterable[str]) -> None:
        with self._lock:
            self._allowlists[swarm] = tuple(patterns)

    def set_rules(self, swarm: str, rules: Iterable[TableRule]) -> None:
        """The swarm's ruled entries (validated, as committed); plain ones are not kept."""
        held: dict[tuple[str, str], TableRule] = {}
        for rule in rules:
            if not rule.is_plain:
                schema, _, table = rule.table.partition(".")
                held[(fold(schema), fold(table))] = rule
        with self._lock:
            self._rules[swarm] = held

    def set_attributes(self, swarm: str, attributes: Attributes) -> None:
        with self._lock:
            self._attributes[swarm] = dict(attributes)

    def drop_swarm(self, swarm: str) -> None:
        with self._lock:
            self._allowlists.pop(swarm, None)
            self._rules.pop(swarm, None)
            self._attributes.pop(swarm, None)

    def allowlist(self, swarm: str) -> tuple[str, ...]:
        return self._allowlists.get(swarm, ())

    def attributes(self, swarm: str) -> Attributes:
        return self._attributes.get(swarm, {})

    # --- decisions ------------------------------------------------------------------
    def rule_for(self, principal: Principal, ref: TableRef) -> TableRule | None:
        """The rule through which ``principal`` reads ``ref``, or None when it reads the table
        whole. Admins are never ruled; a ruled entry for a table wins over a ``schema.*``
        pattern that also matches it (the narrower grant is the one the admin wrote for it)."""
        if principal.is_admin or principal.swarm is None:
            return None
        return self._rules.get(principal.swarm, {}).get(ref.key())

    def bindings_for(self, principal: Principal) -> dict[str, AttributeValue | None]:
        """What ``$swarm``, ``$agent`` and ``$<attribute>`` bind to for ``principal``."""
        swarm_attributes = self.attributes(principal.swarm) if principal.swarm else {}
        return bindings(principal.swarm, principal.agent, swarm_attributes, dict(principal.attributes))

    def rule_scope(self, principal: Principal) -> tuple[object, ...] | None:
        """What a remembered decision about ``principal``'s SQL must be keyed on besides the
        allowlist: its swarm's rules and its bound values (None when no rule applies to it), so a
        changed rule or another agent's attributes never reuse a rewrite made for others."""
        if principal.is_admin or principal.swarm is None:
            return None
        rules = self._rules.get(principal.swarm)
        if not rules:
            return None
        bound = self.bindings_for(principal)
        return (
            tuple(sorted(rules.items())),
            tuple(sorted((k, type(v).__name__, v) for k, v in bound.items() if v is not None)),
        )

    def relation(
        self, principal: Principal, ref: TableRef, *, rowids: tuple[int, int | None] | None = None
    ) -> str:
        """What SQL names to read ``ref`` as ``principal``: ``ref.sql`` for a table read whole,
        the view of its rule for a ruled one (catalog/views.py) — on every read path.
        ``rowids`` (a split scan's range) is ANDed inside the view; for an unruled read the
        caller adds its own WHERE."""
        rule = self.rule_for(principal, ref)
        if rule is None:
            return ref.sql
        return self.views.relation(ref, rule, self.bindings_for(principal), rowids=rowids)

    def is_ruled(self, principal: Principal, ref: TableRef) -> bool:
        return self.rule_for(principal, ref) is not None

    def can_read(self, principal: Principal, ref: TableRef) -> bool:
        schema = fold(ref.schema)
        if schema == SYSTEM_SCHEMA:
            return False
        if schema == ARTEFACT_SCHEMA:
            # Visibility of the artefact, decided afresh on every call (an unshare, delete or
            # expiry takes effect at once); allowlists never grant it.
            return (
                self.artefacts is not None and self.artefacts.readable_table(principal, ref.name) is not None
            )
        if principal.is_admin:
            return True
        if principal.swarm is None:
            return False
        return any(pattern_matches(p, ref) for p in self.allowlist(principal.swarm))

    def resolve_artefact(self, principal: Principal, schema: str, name: str) -> TableRef | None:
        """``artefacts."<id>"`` when ``principal`` may read that tabular artefact, else None."""
        if fold(schema) != ARTEFACT_SCHEMA or self.artefacts is None:
            return None
        return self.artefacts.readable_table(principal, name)

    def readable_tables(self, principal: Principal) -> list[TableRef]:
        return [r for r in self._tables.list_refs() if self.can_read(principal, r)]

    def describe(self, principal: Principal, refs: list[TableRef]) -> list[TableInfo]:
        """:meth:`TableCatalog.describe` as ``principal`` sees the tables: a ruled table's
        schema is its view's (excluded columns absent, masked ones with the mask's type) and its
        row count the view's (a count over the filter, remembered per view text and data
        version: catalog/views.py), so ListFlights, Flight SQL and MCP list what a read returns."""
        ruled: dict[TableRef, str] = {}
        for ref in refs:
            try:
                ruled[ref] = self.relation(principal, ref)
            except PermissionDenied:
                continue  # its rule no longer fits the table: not listed (a read says why)
            except Unavailable as e:  # a ruled live table Snowflake cannot describe now
                log.warning("live.listing_skipped", table=ref.qualified, error=e.detail)
                continue
        refs = [ref for ref in refs if ref in ruled]
        plain = [ref for ref in refs if ruled[ref] == ref.sql]
        infos = {info.ref: info for info in self._tables.describe(plain)}
        live = self._tables.live
        for ref in refs:
            if ruled[ref] != ref.sql and live is not None and live.is_live(ref):
                # A ruled live table: its view's schema, bound on the table's empty stand-in
                # (catalog/live.py); its row count unknown (-1) — counting the view would run
                # a query in Snowflake on every listing, and Snowflake's count of the whole
                # table would say how many rows the filter hides.
                try:
                    schema = live.bind(ruled[ref], (), [ref])
                except Unavailable as e:
                    log.warning("live.listing_skipped", table=ref.qualified, error=e.detail)
                    continue
                infos[ref] = TableInfo(ref, -1, schema, 0, live=True)
        stored = [
            ref for ref in refs if ruled[ref] != ref.sql and not (live is not None and live.is_live(ref))
        ]
        if any(ref not in infos for ref in stored):
            with self._tables.db.reading() as cur:
                versions = self._tables.versions(cur)
                for ref in stored:
                    if ref not in infos:
                        version = versions.get(ref.key(), 0)
                        schema, rows = self.views.shape(cur, ruled[ref], version)
                        infos[ref] = TableInfo(ref, rows, schema, version)
        # A live table Snowflake cannot describe now is left out by TableCatalog.describe.
        return [infos[ref] for ref in refs if ref in infos]

    def readable_names(self, principal: Principal) -> list[str]:
        return [r.qualified for r in self.readable_tables(principal)]

    def require_readable(self, principal: Principal, schema: str, name: str) -> TableRef:
        """The canonical table, or the same refusal for 'absent' and 'not allowed' so that
        existence never leaks."""
        ref = self.resolve_artefact(principal, schema, name) or self._tables.resolve(schema, name)
        if ref is None or not self.can_read(principal, ref):
            hint = readable_hint(f"{schema}.{name}", self.readable_names(principal))
            raise PermissionDenied(f"{schema}.{name}: {NOT_READABLE}; you may read: {hint}")
        return ref
