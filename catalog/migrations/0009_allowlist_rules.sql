-- Row and column rules of allowlist entries, and swarm attributes (issue 15, items 1-2).
-- See catalog/rules.py and proto_docs/governance.md, "Rules and attributes".

-- A ruled entry keeps its pattern ('schema.table', folded) and holds its validated
-- catalog.rules.TableRule as msgspec JSON; NULL for a plain entry (a string).
ALTER TABLE _quiver.allowlist ADD COLUMN rule VARCHAR;

-- The attributes an admin set on a swarm: one flat JSON object of strings and numbers,
-- bound into row filters as $<name> (agents' own attributes, from their tokens, override them).
CREATE TABLE _quiver.swarm_attributes (
    swarm      VARCHAR NOT NULL PRIMARY KEY,
    body       VARCHAR NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
