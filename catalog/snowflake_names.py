"""Snowflake object names (``DB.SCHEMA."Mixed.Name"``) split into the identifiers Snowflake
stores.

One splitter for the whole code base: the configuration check (``[[sync.tables]] source``,
catalog/config.py) counts the parts and the sync worker (sync/source.py) resolves them, so
both must agree on where a name breaks; :data:`quote_snowflake` writes a part back. It lives in ``catalog`` because ``sync`` may import
``catalog`` but not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass

from catalog.database import quote_ident

#: One stored identifier quoted for Snowflake SQL (the inverse of a part of
#: :func:`split_snowflake_name`): Snowflake's delimited identifiers are standard SQL's, as
#: DuckDB's are, so it is the same function.
quote_snowflake = quote_ident


def split_snowflake_name(text: str) -> list[str]:
    """Split on dots outside double quotes, into stored identifiers.

    Quoted parts keep their case (``""`` inside quotes is one literal ``"``); unquoted parts
    are stripped and upper-cased, as Snowflake resolves them. Surrounding whitespace of the
    whole name is ignored. Never raises: a name with an unbalanced quote reads to its end as
    quoted, and the caller decides what a wrong number of parts means.
    """
    parts: list[str] = []
    current, quoted, was_quoted, i = "", False, False, 0
    text = text.strip()
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if quoted and i + 1 < len(text) and text[i + 1] == '"':
                current += '"'
                i += 2
                continue
            quoted = not quoted
            was_quoted = True
        elif ch == "." and not quoted:
            parts.append(current if was_quoted else current.strip().upper())
            current, was_quoted = "", False
        else:
            current += ch
        i += 1
    parts.append(current if was_quoted else current.strip().upper())
    return parts


@dataclass(frozen=True, slots=True)
class SnowflakeTable:
    """A Snowflake table by its stored identifiers (unquoted names upper-cased): the source of
    a replicated table (sync/) and of a live one (catalog/live.py)."""

    database: str
    schema: str
    name: str

    @property
    def sql(self) -> str:
        return ".".join(quote_snowflake(p) for p in (self.database, self.schema, self.name))

    @property
    def label(self) -> str:
        """The name as one would type it: quoted only where Snowflake needs quotes."""
        return ".".join(_display(p) for p in (self.database, self.schema, self.name))


def _display(ident: str) -> str:
    plain = ident == ident.upper() and ident.replace("_", "").replace("$", "").isalnum()
    return ident if plain else f'"{ident}"'
