-- The capture of one declared table, made by `cacheward migrate` for each [tables.NAME] section
-- (src/store/pg/tables.rs fills in the {{placeholders}}: names quoted, key columns cast to text).
-- As users' (sql/0002_cdc.sql): statement-level triggers with transition tables, one outbox row
-- per changed row, an empty NOTIFY per statement that changed any, SECURITY DEFINER with a pinned
-- search_path so that writers need no right on anything of cacheward's; nothing here raises.
--
-- Every change draws a version from cacheward_version_seq while it holds the row's lock, so the
-- versions of one key grow with every committed change, across delete and re-insert. The version
-- is kept in cacheward_row_versions (no column is added to the table) and is the outbox row's.
-- An update is matched old to new by the key: a row whose key changed is a delete of the old key
-- and an insert of the new one. A lookup whose value changed names its old value in old_lookups,
-- read from the OLD row, so that the old lookup key is invalidated.

CREATE OR REPLACE FUNCTION {{function}}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = {{schema}}, pg_temp AS $capture$
DECLARE
    captured bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        WITH changes AS (
            INSERT INTO cacheward_outbox (op, tbl, row_key, version)
            SELECT 'insert', '{{name}}', ARRAY[{{new_key}}], nextval('cacheward_version_seq')
            FROM cacheward_new n
            RETURNING row_key, version
        ), kept AS (
            INSERT INTO cacheward_row_versions (tbl, key, version)
            SELECT '{{name}}', row_key, version FROM changes
            ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version
        )
        SELECT count(*) INTO captured FROM changes;
    ELSIF TG_OP = 'UPDATE' THEN
        WITH changes AS (
            INSERT INTO cacheward_outbox (op, tbl, row_key, old_key, old_lookups, version)
            SELECT 'update', '{{name}}',
                   CASE WHEN n.{{first}} IS NOT NULL THEN ARRAY[{{new_key}}] END,
                   CASE WHEN n.{{first}} IS NULL THEN ARRAY[{{old_key}}] END,
                   CASE WHEN n.{{first}} IS NULL THEN {{old_lookups}}
                        WHEN o.{{first}} IS NULL THEN NULL ELSE {{changed_lookups}} END,
                   nextval('cacheward_version_seq')
            FROM cacheward_new n FULL JOIN cacheward_old o ON {{same_key}}
            RETURNING row_key, old_key, version
        ), kept AS (
            INSERT INTO cacheward_row_versions (tbl, key, version)
            SELECT '{{name}}', row_key, version FROM changes WHERE row_key IS NOT NULL
            ON CONFLICT (tbl, key) DO UPDATE SET version = excluded.version
        ), gone AS (
            DELETE FROM cacheward_row_versions v USING changes c
            WHERE v.tbl = '{{name}}' AND v.key = c.old_key
        )
        SELECT count(*) INTO captured FROM changes;
    ELSIF TG_OP = 'DELETE' THEN
        WITH changes AS (
            INSERT INTO cacheward_outbox (op, tbl, old_key, old_lookups, version)
            SELECT 'delete', '{{name}}', ARRAY[{{old_key}}], {{old_lookups}},
                   nextval('cacheward_version_seq')
            FROM cacheward_old o
            RETURNING old_key
        ), gone AS (
            DELETE FROM cacheward_row_versions v USING changes c
            WHERE v.tbl = '{{name}}' AND v.key = c.old_key
        )
        SELECT count(*) INTO captured FROM changes;
    ELSE
        -- TRUNCATE holds an exclusive lock: every row it removes has a version <= this one, and
        -- every row inserted after it gets a larger one.
        INSERT INTO cacheward_outbox (op, tbl, version)
        SELECT 'truncate', '{{name}}', last_value FROM cacheward_version_seq;
        DELETE FROM cacheward_row_versions WHERE tbl = '{{name}}';
        captured := 1;
    END IF;
    IF captured > 0 THEN
        PERFORM cacheward_wake();
    END IF;
    RETURN NULL;
END
$capture$;

REVOKE ALL ON FUNCTION {{function}}() FROM PUBLIC;

CREATE OR REPLACE TRIGGER cacheward_{{name}}_insert
    AFTER INSERT ON {{source}} REFERENCING NEW TABLE AS cacheward_new
    FOR EACH STATEMENT EXECUTE FUNCTION {{function}}();
CREATE OR REPLACE TRIGGER cacheward_{{name}}_update
    AFTER UPDATE ON {{source}} REFERENCING OLD TABLE AS cacheward_old NEW TABLE AS cacheward_new
    FOR EACH STATEMENT EXECUTE FUNCTION {{function}}();
CREATE OR REPLACE TRIGGER cacheward_{{name}}_delete
    AFTER DELETE ON {{source}} REFERENCING OLD TABLE AS cacheward_old
    FOR EACH STATEMENT EXECUTE FUNCTION {{function}}();
CREATE OR REPLACE TRIGGER cacheward_{{name}}_truncate
    BEFORE TRUNCATE ON {{source}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{function}}();
-- In every session, replicas' too (session_replication_role = replica: a bulk load, pg_restore, a
-- logical replication subscriber): see sql/0007_capture_always.sql.
ALTER TABLE {{source}}
    ENABLE ALWAYS TRIGGER cacheward_{{name}}_insert,
    ENABLE ALWAYS TRIGGER cacheward_{{name}}_update,
    ENABLE ALWAYS TRIGGER cacheward_{{name}}_delete,
    ENABLE ALWAYS TRIGGER cacheward_{{name}}_truncate;

INSERT INTO cacheward_tables (name, source, source_name, key, lookups)
VALUES ('{{name}}', {{source_literal}}::regclass::oid, {{source_literal}}, {{key_literal}}, {{lookups_literal}})
ON CONFLICT (name) DO UPDATE
SET source = excluded.source, source_name = excluded.source_name, key = excluded.key,
    lookups = excluded.lookups, installed_at = now();
