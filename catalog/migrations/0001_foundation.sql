-- Foundation: swarms, allowlists, tokens (by jti, never the token), audit, data versions.
CREATE TABLE _quiver.swarms (
    name        VARCHAR NOT NULL PRIMARY KEY,
    description VARCHAR NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL
);

-- No primary key: a PUT replaces a swarm's list by delete + insert in one transaction.
CREATE TABLE _quiver.allowlist (
    swarm   VARCHAR NOT NULL,
    pattern VARCHAR NOT NULL
);

CREATE TABLE _quiver.tokens (
    jti          VARCHAR NOT NULL PRIMARY KEY,
    kind         VARCHAR NOT NULL,
    swarm        VARCHAR,
    agent        VARCHAR,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    revoked_at   TIMESTAMPTZ,
    last_used_at TIMESTAMPTZ,
    created_by   VARCHAR,
    parent_jti   VARCHAR
);

CREATE SEQUENCE _quiver.audit_id;

CREATE TABLE _quiver.audit (
    id         BIGINT NOT NULL DEFAULT nextval('_quiver.audit_id'),
    occurred_at TIMESTAMPTZ NOT NULL,
    actor      VARCHAR,
    action     VARCHAR NOT NULL,
    target     VARCHAR,
    outcome    VARCHAR NOT NULL,
    client     VARCHAR,
    request_id VARCHAR,
    detail     VARCHAR
);

-- A counter per data table that every writer bumps when the table's contents change;
-- caches of profiles and query results are keyed by it.
CREATE TABLE _quiver.data_versions (
    schema_name VARCHAR NOT NULL,
    table_name  VARCHAR NOT NULL,
    version     BIGINT NOT NULL,
    changed_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE _quiver.settings (
    key   VARCHAR NOT NULL PRIMARY KEY,
    value VARCHAR NOT NULL
);
