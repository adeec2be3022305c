-- Exports (catalog/exports.py): the caller's own row cap, so that a refresh re-runs the
-- export under the same cap (NULL: the server's [limits] max_rows applied).
ALTER TABLE _quiver.artefacts ADD COLUMN prov_max_rows BIGINT;
