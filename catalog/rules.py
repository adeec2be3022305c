"""Row and column rules of allowlist entries, and the attributes their row filters bind
(proto_docs/governance.md).

An allowlist entry is a pattern (``"sales.orders"``, ``"sales.*"``) or a :class:`TableRule`
for one table: which columns exist for the swarm (``columns`` *or* ``except_columns``), which
rows (``row_filter``, a SQL predicate over the table's own columns and the parameters
``$swarm``, ``$agent`` and ``$<attribute>``) and how columns are masked before anything else
sees them (``mask``). The data plane reads a ruled table through the *view* the rule defines
for the calling principal (:meth:`catalog.policy.Policy.rule_for`, :func:`bindings`), on every
path; what is not in the view does not exist for the caller.

This module holds the shapes every layer shares. A rule is validated once, when the allowlist
is saved (control plane, 422 on any fault); what is held here has passed that check, so the
data plane never re-validates it on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import msgspec

from catalog.tables import fold

MaskKind = Literal["hash", "null", "redact", "last4"]
MASK_KINDS: tuple[str, ...] = ("hash", "null", "redact", "last4")

#: What an attribute value may be: flat scalars only (a row filter compares columns with them).
AttributeValue = str | int | float
Attributes = Mapping[str, AttributeValue]

#: Parameter names every principal binds, whatever its attributes: its swarm and agent name.
BUILTIN_PARAMETERS: tuple[str, ...] = ("swarm", "agent")


class TableRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One table's rules for one swarm, as validated and stored.

    ``table`` is the folded ``schema.table``; column names are as the table spells them;
    ``row_filter`` is the canonical predicate text, parameters spelled ``$name``;
    ``parameters`` the names it uses (folded), for binding and for the admin view."""

    table: str
    columns: tuple[str, ...] | None = None
    except_columns: tuple[str, ...] | None = None
    row_filter: str | None = None
    parameters: tuple[str, ...] = ()
    mask: tuple[tuple[str, MaskKind], ...] = ()

    @property
    def is_plain(self) -> bool:
        """True when the rule restricts nothing (the entry behaves as a plain string)."""
        return (
            self.columns is None and self.except_columns is None and self.row_filter is None and not self.mask
        )


def bindings(
    swarm: str | None, agent: str | None, swarm_attributes: Attributes, agent_attributes: Attributes
) -> dict[str, AttributeValue | None]:
    """The values a row filter's parameters take for one principal: its swarm's attributes,
    overridden by the agent's own (given when its token was minted), then ``swarm`` and
    ``agent`` themselves, which no attribute can override. Names are folded as DuckDB folds
    identifiers. A parameter absent from the result binds NULL: the comparison is unknown and
    no row passes, so a missing attribute never widens what a principal sees."""
    out: dict[str, AttributeValue | None] = {}
    for source in (swarm_attributes, agent_attributes):
        for name, value in source.items():
            out[fold(name)] = value
    out["swarm"] = swarm
    out["agent"] = agent
    return out
