-- Sync worker: per-table replication state and run history.
-- The watermark commits in the same transaction as the table contents it describes.
CREATE TABLE _quiver.sync_state (
    target             VARCHAR NOT NULL PRIMARY KEY, -- "schema.table", lower case
    source             VARCHAR NOT NULL,
    mode               VARCHAR NOT NULL,
    watermark          VARCHAR,       -- ISO text of the cursor's high-water mark
    watermark_kind     VARCHAR,       -- how to read it back: timestamp, timestamptz, date, integer, decimal, text
    schema_fingerprint VARCHAR,       -- sha256 of the source columns and types last loaded
    source_columns     VARCHAR,       -- JSON: [[name, snowflake type], ...] last loaded
    last_full_at       TIMESTAMPTZ,   -- last full load or reconcile (merge: deletes seen)
    last_started_at    TIMESTAMPTZ,
    last_ended_at      TIMESTAMPTZ,
    last_rows_read     BIGINT,
    last_rows_written  BIGINT,
    last_bytes         BIGINT,
    last_outcome       VARCHAR,       -- ok | failed
    last_error         VARCHAR,
    consecutive_failures INTEGER NOT NULL DEFAULT 0
);

CREATE SEQUENCE _quiver.sync_run_id;

CREATE TABLE _quiver.sync_runs (
    id           BIGINT NOT NULL DEFAULT nextval('_quiver.sync_run_id'),
    target       VARCHAR NOT NULL,
    source       VARCHAR NOT NULL,
    mode         VARCHAR NOT NULL,     -- the strategy this run used (full for resyncs)
    trigger      VARCHAR NOT NULL,     -- schedule | api | cli
    started_at   TIMESTAMPTZ NOT NULL,
    ended_at     TIMESTAMPTZ,
    rows_read    BIGINT NOT NULL DEFAULT 0,
    rows_written BIGINT NOT NULL DEFAULT 0,
    rows_deleted BIGINT NOT NULL DEFAULT 0,
    bytes        BIGINT NOT NULL DEFAULT 0,
    outcome      VARCHAR NOT NULL,     -- ok | failed
    error        VARCHAR,
    watermark    VARCHAR,
    schema_changes VARCHAR             -- JSON list of the changes applied, if any
);
