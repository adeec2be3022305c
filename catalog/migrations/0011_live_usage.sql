-- Live tables in the query log and the budgets (issue 16, item 4): the Snowflake side of a
-- request, and the daily count of requests that ran SQL in Snowflake. See catalog/query_log.py,
-- catalog/budgets.py, proto_docs/federation.md ("Costs") and proto_docs/governance.md.
ALTER TABLE _quiver.query_log ADD COLUMN remote VARCHAR;                 -- 'snowflake' or NULL
ALTER TABLE _quiver.query_log ADD COLUMN remote_query_ids VARCHAR[];     -- Snowflake query ids, in order
ALTER TABLE _quiver.usage ADD COLUMN live_queries BIGINT NOT NULL DEFAULT 0;
