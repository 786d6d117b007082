-- The slots of a Redis Cluster whose changes the CDC worker passed over (their primary did not
-- answer it), stored with its cursor until a worker has applied them: every daemon's health
-- monitor reads them at its PostgreSQL check and sends those slots' reads to PostgreSQL
-- meanwhile, a daemon that reaches the primary included (it would serve what the primary missed).
ALTER TABLE cacheward_cdc_cursors
    ADD COLUMN IF NOT EXISTS missed_slots integer[] NOT NULL DEFAULT '{}',
    -- The position the worker had read up to when it last passed a change over: the slots stay
    -- missed until a worker has applied everything up to it.
    ADD COLUMN IF NOT EXISTS missed_upto  bigint    NOT NULL DEFAULT 0;
