-- Optional: the three roles cacheward expects, with exactly the rights each needs. Not a migration
-- (`cacheward migrate` does not run it): run it once, after `cacheward migrate`, as a role that may
-- create roles and owns cacheward's objects (or a superuser), in the database cacheward uses, then
-- give the login roles their passwords. Rename the roles to your conventions if you like; the
-- grants are what matters. docs/operations.md explains each.
--
--   cacheward_owner    runs `cacheward migrate`: owns users, cacheward_* tables, the sequences and
--                      the trigger functions (which run with its rights).
--   cacheward_runtime  runs `cacheward serve` and `cacheward verify`: reads and writes users, reads
--                      the change stream, keeps its cursor. No DDL, owns nothing.
--   cacheward_writer   an example application role that writes users with plain SQL: rights on
--                      users only. The capture trigger runs with the owner's rights.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cacheward_owner') THEN
        CREATE ROLE cacheward_owner LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cacheward_runtime') THEN
        CREATE ROLE cacheward_runtime LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cacheward_writer') THEN
        CREATE ROLE cacheward_writer LOGIN;
    END IF;
END
$$;

-- The runtime role.
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO cacheward_runtime;
GRANT SELECT, DELETE ON cacheward_outbox TO cacheward_runtime;            -- read the stream, prune it
GRANT SELECT, UPDATE ON cacheward_cdc_settings TO cacheward_runtime;      -- channel, notify, pruned_upto
GRANT SELECT, INSERT, UPDATE ON cacheward_cdc_cursors TO cacheward_runtime;
GRANT SELECT, INSERT, UPDATE, DELETE ON cacheward_cdc_leases TO cacheward_runtime; -- who applies the stream
GRANT SELECT, USAGE ON SEQUENCE cacheward_version_seq TO cacheward_runtime; -- horizons and fences
GRANT SELECT ON cacheward_row_versions, cacheward_tables TO cacheward_runtime; -- declared tables
-- Each declared table: GRANT SELECT (and INSERT, UPDATE, DELETE when writable) ON it TO the runtime.

-- Writers: their rights on users, nothing of cacheward's.
GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON users TO cacheward_writer;

-- The sequences behind users.id (a serial column needs USAGE; an identity column does not) and
-- cacheward_outbox.id (the CDC worker reads how far it got, to refuse forged ids).
DO $$
DECLARE
    users_id text := pg_get_serial_sequence('users', 'id');
BEGIN
    IF users_id IS NOT NULL THEN
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO cacheward_runtime, cacheward_writer', users_id);
    END IF;
    EXECUTE format('GRANT SELECT ON SEQUENCE %s TO cacheward_runtime',
                   pg_get_serial_sequence('cacheward_outbox', 'id'));
END
$$;
