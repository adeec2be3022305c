-- Per-swarm (and per-agent) overrides of [limits] (issue 15, item 5): max_rows, the query
-- timeout, concurrency and calls per minute. See catalog/limits.py and proto_docs/limits.md.
CREATE TABLE _quiver.swarm_limits (
    swarm      VARCHAR NOT NULL PRIMARY KEY,
    body       VARCHAR NOT NULL,            -- the PUT body as JSON (absent keys: the default)
    updated_at TIMESTAMPTZ NOT NULL
);
