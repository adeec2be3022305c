-- Token lineage and swarm instances (issue 8: allowlist races, mints racing a deletion,
-- refresh escaping revocation). See proto_docs/authentication.md, "Token chains".

-- A swarm instance id: a swarm deleted and re-created under the same name is a new swarm,
-- and tokens carry the id of the instance they were minted for (claim `sid`).
ALTER TABLE _quiver.swarms ADD COLUMN id VARCHAR;
UPDATE _quiver.swarms SET id = replace(CAST(gen_random_uuid() AS VARCHAR), '-', '');

-- One row per (swarm, pattern): rebuild the allowlist with a primary key, keeping each pair
-- once and dropping rows of swarms that no longer exist (concurrent PUTs used to commit the
-- union of their bodies, with duplicates).
CREATE TABLE _quiver.allowlist_v2 (
    swarm   VARCHAR NOT NULL,
    pattern VARCHAR NOT NULL,
    PRIMARY KEY (swarm, pattern)
);
INSERT INTO _quiver.allowlist_v2
    SELECT DISTINCT swarm, pattern FROM _quiver.allowlist
    WHERE swarm IN (SELECT name FROM _quiver.swarms);
DROP TABLE _quiver.allowlist;
ALTER TABLE _quiver.allowlist_v2 RENAME TO allowlist;

-- root_jti: the first token of a token's refresh chain (claim `root`); revoking any token
--   of a chain revokes the chain, and a refresh never outlives the root's expiry.
-- swarm_id: the swarm instance the token was minted for (claim `sid`).
-- legacy: issued before this migration, so its JWT carries neither claim; such tokens are
--   checked against these columns instead, each its own chain.
ALTER TABLE _quiver.tokens ADD COLUMN root_jti VARCHAR;
ALTER TABLE _quiver.tokens ADD COLUMN swarm_id VARCHAR;
ALTER TABLE _quiver.tokens ADD COLUMN legacy BOOLEAN DEFAULT false;
UPDATE _quiver.tokens SET root_jti = jti, legacy = true;
UPDATE _quiver.tokens AS t SET swarm_id = s.id
    FROM _quiver.swarms AS s
    WHERE t.swarm = s.name AND t.created_at >= s.created_at;
-- Tokens of a swarm that no longer exists, or of an earlier swarm of the same name (minted
-- while it was being deleted), were never meant to outlive it.
UPDATE _quiver.tokens SET revoked_at = now()
    WHERE swarm IS NOT NULL AND swarm_id IS NULL AND revoked_at IS NULL;
