-- Declared tables ([tables.NAME] in the configuration): what every table's capture shares. Each
-- table's own capture is made from sql/table_capture.sql by `cacheward migrate`, which knows the
-- table's key and lookups from the configuration.
--
-- No column is added to an application's table: a row's version lives in cacheward_row_versions,
-- keyed by the table's name and the key's text, written by the capture in the writer's
-- transaction. A row no change has touched since its table was declared has none (version 0).

-- One outbox for every table: users' rows leave `tbl` NULL.
ALTER TABLE cacheward_outbox
    -- The declared table's name in cacheward.
    ADD COLUMN IF NOT EXISTS tbl         text,
    -- The key the row has now (insert, update), each column as PostgreSQL's text.
    ADD COLUMN IF NOT EXISTS row_key     text[],
    -- A key that no longer has this row (delete, or an update that changed the key).
    ADD COLUMN IF NOT EXISTS old_key     text[],
    -- The values of lookups the row no longer has, by lookup: {"by_email": ["a@example.com"]}.
    ADD COLUMN IF NOT EXISTS old_lookups jsonb;

CREATE TABLE IF NOT EXISTS cacheward_row_versions (
    tbl     text    NOT NULL,
    key     text[]  NOT NULL,
    -- Drawn from cacheward_version_seq by the change that left the row as it is.
    version bigint  NOT NULL,
    PRIMARY KEY (tbl, key)
);

-- Which captures `cacheward migrate` installed, and for what: `serve` refuses to start on a
-- declared table whose capture is missing or was made for another key; `migrate --prune` drops
-- the captures of tables no longer declared.
CREATE TABLE IF NOT EXISTS cacheward_tables (
    name         text        PRIMARY KEY,
    -- The table's oid and its name when the capture was installed.
    source       oid         NOT NULL,
    source_name  text        NOT NULL,
    key          text[]      NOT NULL,
    lookups      jsonb       NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- The wake-up every capture sends (users' inline one says the same).
CREATE OR REPLACE FUNCTION cacheward_wake() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    settings record;
BEGIN
    SELECT channel, notify INTO settings FROM cacheward_cdc_settings;
    IF settings.notify THEN
        PERFORM pg_notify(settings.channel, '');
    END IF;
END
$$;

DO $$
BEGIN
    EXECUTE format(
        'ALTER FUNCTION cacheward_wake() SECURITY DEFINER SET search_path = %I, pg_temp',
        current_schema());
END
$$;
REVOKE ALL ON FUNCTION cacheward_wake() FROM PUBLIC;
