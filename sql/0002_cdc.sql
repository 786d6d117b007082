-- Change capture: every change to `users` leaves a row in an outbox, in the same transaction, and
-- wakes the daemon with a constant, empty NOTIFY. The daemon reads the outbox after a durable cursor,
-- refetches the current rows of the names it mentions and writes them to Redis (src/cdc.rs).
--
-- Statement-level triggers with transition tables: one INSERT into the outbox and at most one NOTIFY
-- per statement, however many rows it touched. The NOTIFY payload is empty, so no row can exceed its
-- 8000-byte limit, and nothing here raises: plain SQL from other programs never fails because of it.

CREATE TABLE IF NOT EXISTS cacheward_outbox (
    -- Allocated in time order (CACHE 1): the cursor logic depends on it.
    id           bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    op           text        NOT NULL,
    -- The name the row has now (insert, update).
    username     text,
    -- A name that no longer has this row (delete, or an update that renamed it).
    old_username text,
    -- The row's version after the change (insert, update), its last version (delete), or the
    -- version horizon at the time (truncate): a tombstone with it refuses every older value.
    version      bigint      NOT NULL
);

-- Settings the trigger reads; the daemon writes cdc.channel and cdc.notify here when it starts.
CREATE TABLE IF NOT EXISTS cacheward_cdc_settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    channel     text    NOT NULL DEFAULT 'cacheward_users',
    notify      boolean NOT NULL DEFAULT true,
    -- Highest outbox id ever pruned: a cursor below it has missed changes and must resync.
    pruned_upto bigint  NOT NULL DEFAULT 0
);
INSERT INTO cacheward_cdc_settings DEFAULT VALUES ON CONFLICT DO NOTHING;

-- One durable position per cache (consumer): every outbox row with id <= position was applied,
-- except the rows of the transactions listed in pending, which were still running.
CREATE TABLE IF NOT EXISTS cacheward_cdc_cursors (
    consumer   text        PRIMARY KEY,
    position   bigint      NOT NULL,
    pending    jsonb       NOT NULL DEFAULT '[]',
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION cacheward_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    captured bigint;
    settings record;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cacheward_outbox (op, username, version)
        SELECT 'insert', n.username, n.version FROM cacheward_new n;
    ELSIF TG_OP = 'UPDATE' THEN
        -- A full join, so that even an update of the primary key loses no name.
        INSERT INTO cacheward_outbox (op, username, old_username, version)
        SELECT 'update', n.username,
               CASE WHEN o.username IS DISTINCT FROM n.username THEN o.username END,
               coalesce(n.version, o.version)
        FROM cacheward_new n FULL JOIN cacheward_old o ON o.id = n.id;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO cacheward_outbox (op, old_username, version)
        SELECT 'delete', o.username, o.version FROM cacheward_old o;
    ELSE
        -- TRUNCATE holds an exclusive lock: every row it removes has a version <= this one, and every
        -- row inserted after it gets a larger one.
        INSERT INTO cacheward_outbox (op, version)
        SELECT 'truncate', last_value FROM cacheward_version_seq;
    END IF;
    GET DIAGNOSTICS captured = ROW_COUNT;
    IF captured > 0 THEN
        SELECT channel, notify INTO settings FROM cacheward_cdc_settings;
        IF settings.notify THEN
            PERFORM pg_notify(settings.channel, '');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER cacheward_capture_insert
    AFTER INSERT ON users REFERENCING NEW TABLE AS cacheward_new
    FOR EACH STATEMENT EXECUTE FUNCTION cacheward_capture();
CREATE OR REPLACE TRIGGER cacheward_capture_update
    AFTER UPDATE ON users REFERENCING OLD TABLE AS cacheward_old NEW TABLE AS cacheward_new
    FOR EACH STATEMENT EXECUTE FUNCTION cacheward_capture();
CREATE OR REPLACE TRIGGER cacheward_capture_delete
    AFTER DELETE ON users REFERENCING OLD TABLE AS cacheward_old
    FOR EACH STATEMENT EXECUTE FUNCTION cacheward_capture();
CREATE OR REPLACE TRIGGER cacheward_capture_truncate
    BEFORE TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION cacheward_capture();
