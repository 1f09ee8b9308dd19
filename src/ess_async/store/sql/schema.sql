-- ess_async's PostgreSQL store, schema version 1. {schema} is the store's schema
-- ([store] schema, default "ess"), quoted by the loader. Times are POSIX seconds from
-- the deliverers' clocks (the same numbers the file store's records hold).

CREATE TABLE {schema}.messages (
    -- The hot table: narrow, one row per message, updated at every state change.
    id text PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('queued', 'scheduled', 'active', 'deferred',
                                         'held', 'passed', 'failed', 'corrupt')),
    priority smallint NOT NULL,                -- 0 high, 1 normal, 2 low
    due double precision NOT NULL,             -- claimable from then on
    attempts integer NOT NULL DEFAULT 0,
    created_at double precision NOT NULL,
    finished_at double precision,
    idempotency_key text,                      -- sha256 of the caller's key
    -- The claim: a fresh token per claim fences every write of that attempt.
    lease_token uuid,
    lease_until double precision,
    claimed_by text,
    claimed_from text,                         -- the state it was claimed from
    accepted jsonb                             -- the server accepted it (this claim)
);

-- Claims scan only claimable rows, in the order they are sent.
CREATE INDEX messages_claimable ON {schema}.messages (priority, due, id)
    WHERE state IN ('queued', 'scheduled', 'deferred');
CREATE INDEX messages_leased ON {schema}.messages (lease_until) WHERE state = 'active';
CREATE INDEX messages_finished ON {schema}.messages (state, finished_at)
    WHERE state IN ('passed', 'failed', 'corrupt');
CREATE INDEX messages_state ON {schema}.messages (state, id);
-- Idempotency: one message per key while it is stored.
CREATE UNIQUE INDEX messages_idempotency ON {schema}.messages (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE {schema}.bodies (
    -- The record (everything but the hot columns) and the message text: written at
    -- enqueue and at each settle, read once per claim.
    id text PRIMARY KEY REFERENCES {schema}.messages (id) ON DELETE CASCADE,
    record jsonb NOT NULL,
    raw text NOT NULL
);

-- A queue table is update-heavy: vacuum it often.
ALTER TABLE {schema}.messages SET (autovacuum_vacuum_scale_factor = 0.02,
                                   autovacuum_analyze_scale_factor = 0.02);
