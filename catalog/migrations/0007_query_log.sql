-- The query log (issue 15, item 4): one row per data-plane request, written in batches by
-- catalog/query_log.py and pruned after [query_log] retention_days. See
-- proto_docs/governance.md.
CREATE SEQUENCE _quiver.query_log_id;

CREATE TABLE _quiver.query_log (
    id          BIGINT NOT NULL DEFAULT nextval('_quiver.query_log_id'),
    occurred_at TIMESTAMPTZ NOT NULL,   -- when the request ended
    principal   VARCHAR NOT NULL,       -- agent:s/a, swarm:s, admin:x
    swarm       VARCHAR,
    agent       VARCHAR,
    kind        VARCHAR NOT NULL,       -- scan | sample | profile | query | export | ...
    via         VARCHAR NOT NULL,       -- flight | flight-sql | http
    tables      VARCHAR[] NOT NULL,
    sql_text    VARCHAR,                -- literals replaced by ? with redact_literals
    params      INTEGER NOT NULL,
    rows        BIGINT,                 -- NULL: not counted on this path
    bytes       BIGINT,
    ms          DOUBLE NOT NULL,
    outcome     VARCHAR NOT NULL,       -- ok | refused | failed
    error_code  VARCHAR,
    request_id  VARCHAR
);
