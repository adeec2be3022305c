-- Snowflake's own table and column comments of replicated tables, as the last successful sync
-- run read them (catalog/descriptions.py, proto_docs/sync.md "Comments"). Written in the run's
-- transaction; agents see them where the table or column has no description of Quiver's own
-- (a DuckDB comment: what an admin sets with PUT /v1/tables/{table}/description).
CREATE TABLE _quiver.source_comments (
    schema_name VARCHAR NOT NULL,   -- the replica's schema, as the sync target names it
    table_name  VARCHAR NOT NULL,   -- the replica's table
    column_name VARCHAR NOT NULL,   -- the replica's column; '' for the table's own comment
    comment     VARCHAR NOT NULL    -- bounded to MAX_DESCRIPTION characters, never empty
);
