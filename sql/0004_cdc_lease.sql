-- Which daemon applies a cache's change stream, and until when: a lease, renewed by its holder at
-- least every second, taken over by another daemon once it has expired.
--
-- It replaces a session advisory lock, which lives as long as its server backend: a leader whose
-- connection went half-open (a frozen backend, a partition, a failover that left the old session
-- behind) kept the lock and stopped the stream for as long as that backend lived. A lease expires
-- by itself; a leader that lost it cannot store its cursor any more (its Redis writes are versioned
-- and harmless), so there is never more than one cursor writer.
CREATE TABLE IF NOT EXISTS cacheward_cdc_leases (
    consumer   text        PRIMARY KEY,
    holder     text        NOT NULL,
    expires_at timestamptz NOT NULL
);
