-- Every capture fires in every session, replicas' included. A trigger enabled the default way
-- fires only while session_replication_role is `origin`: a session that sets it to `replica`
-- (a bulk load skipping foreign-key checks, pg_restore, a logical replication subscriber's apply
-- worker) changed a captured table without a trace, and the cache kept the old row for good.
-- ENABLE ALWAYS: those changes are captured, and users' versions drawn, like any other.
-- (`ALTER TABLE … DISABLE TRIGGER` still stops a capture: `cacheward check --connect` names any
-- capture trigger that is missing or does not fire in every session, and the daemon's table check
-- makes a declared table whose capture is disabled unavailable.)
ALTER TABLE users
    ENABLE ALWAYS TRIGGER cacheward_users_version,
    ENABLE ALWAYS TRIGGER cacheward_capture_insert,
    ENABLE ALWAYS TRIGGER cacheward_capture_update,
    ENABLE ALWAYS TRIGGER cacheward_capture_delete,
    ENABLE ALWAYS TRIGGER cacheward_capture_truncate;

-- The declared tables' captures installed so far (sql/table_capture.sql installs the next ones
-- so): each trigger still there, on a table still there.
DO $always$
DECLARE
    capture record;
BEGIN
    FOR capture IN
        SELECT g.tgrelid::regclass AS source, g.tgname
        FROM cacheward_tables t
        JOIN pg_trigger g ON g.tgrelid = t.source
        WHERE g.tgname IN ('cacheward_' || t.name || '_insert', 'cacheward_' || t.name || '_update',
                           'cacheward_' || t.name || '_delete', 'cacheward_' || t.name || '_truncate')
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', capture.source, capture.tgname);
    END LOOP;
END
$always$;
