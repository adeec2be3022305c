-- Usage budgets (issue 15, item 3): a swarm's daily limits and what was spent, per UTC day.
-- See catalog/budgets.py and proto_docs/governance.md.
CREATE TABLE _quiver.budgets (
    swarm      VARCHAR NOT NULL PRIMARY KEY,
    body       VARCHAR NOT NULL,            -- the PUT body as JSON (absent keys: no limit)
    updated_at TIMESTAMPTZ NOT NULL
);

-- One row per (day, swarm, agent); agent '' is the swarm's total. Written in batches.
CREATE TABLE _quiver.usage (
    day      DATE NOT NULL,
    swarm    VARCHAR NOT NULL,
    agent    VARCHAR NOT NULL,
    queries  BIGINT NOT NULL,
    rows     BIGINT NOT NULL,
    bytes    BIGINT NOT NULL,
    ms       DOUBLE NOT NULL,
    PRIMARY KEY (day, swarm, agent)
);
