-- Least privilege: programs that write `users` need no right on any cacheward object.
--
-- The capture and version triggers run with their owner's rights (SECURITY DEFINER) and a pinned
-- search_path (cacheward's schema, then pg_temp last), so a writer needs neither INSERT on
-- cacheward_outbox nor USAGE on cacheward_version_seq, and cannot forge the change stream: only the
-- triggers write the outbox. The version column loses its default (evaluated with the inserter's
-- rights, it needed USAGE on the sequence); the BEFORE trigger sets it on every insert and update,
-- before the NOT NULL check. docs/operations.md lists the grants of each role; sql/roles.sql is an
-- optional snippet that makes them.

ALTER TABLE users ALTER COLUMN version DROP DEFAULT;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION cacheward_capture() SECURITY DEFINER SET search_path = %I, pg_temp',
        current_schema());
    EXECUTE format(
        'ALTER FUNCTION cacheward_bump_version() SECURITY DEFINER SET search_path = %I, pg_temp',
        current_schema());
END
$$;

-- Nobody but the owner may call them directly (a trigger function is not callable as a function
-- anyway; this keeps them off PUBLIC's list all the same).
REVOKE ALL ON FUNCTION cacheward_capture() FROM PUBLIC;
REVOKE ALL ON FUNCTION cacheward_bump_version() FROM PUBLIC;
