-- The PostgreSQL store's statements, one per "-- name:" block. {schema} is the store's
-- quoted schema; $n are asyncpg parameters.

-- name: enqueue
-- A batch of messages (group commit); a repeated idempotency key inserts nothing, and
-- the caller looks the first message up by its key.
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int2[], $4::float8[], $5::float8[],
                         $6::text[], $7::text[], $8::text[])
        AS t(id, state, priority, due, created_at, idempotency_key, record, raw)
), inserted AS (
    INSERT INTO {schema}.messages (id, state, priority, due, created_at, finished_at,
                                   idempotency_key)
    SELECT id, state, priority, due, created_at,
           CASE WHEN state = 'failed' THEN created_at END, idempotency_key FROM input
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id
), bodies AS (
    INSERT INTO {schema}.bodies (id, record, raw)
    SELECT input.id, input.record::jsonb, input.raw FROM input JOIN inserted USING (id)
)
SELECT id FROM inserted;

-- name: by_key
SELECT id FROM {schema}.messages WHERE idempotency_key = $1;

-- name: claim
-- Up to $2 messages due by $1, in priority then due order, each under a fresh lease of
-- $3 seconds. Leases run on the database's clock: hosts' clocks never fence each other.
WITH picked AS (
    SELECT id, state FROM {schema}.messages
    WHERE state IN ('queued', 'scheduled', 'deferred') AND due <= $1
    ORDER BY priority, due, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {schema}.messages m
    SET state = 'active', lease_token = gen_random_uuid(),
        lease_until = extract(epoch FROM clock_timestamp()) + $3,
        claimed_by = $4, claimed_from = picked.state, accepted = NULL
    FROM picked WHERE m.id = picked.id
    RETURNING m.id, m.lease_token, m.priority
)
SELECT claimed.id, claimed.lease_token, b.record::text AS record, b.raw
FROM claimed JOIN {schema}.bodies b USING (id)
ORDER BY claimed.priority, claimed.id;

-- name: renew
-- The heartbeat: extend every lease this deliverer still holds; the tokens not returned
-- were lost (expired and taken by another deliverer).
UPDATE {schema}.messages SET lease_until = extract(epoch FROM clock_timestamp()) + $1
WHERE state = 'active' AND lease_token = ANY($2::uuid[])
RETURNING lease_token;

-- name: accepted
-- The server accepted these messages: recorded before anything else, each fenced by its
-- claim (a batch: the acceptances of concurrent senders share one commit).
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[]) AS t(id, token, entry)
)
UPDATE {schema}.messages m SET accepted = input.entry::jsonb
FROM input
WHERE m.id = input.id AND m.state = 'active' AND m.lease_token = input.token
RETURNING m.id;

-- name: settle
-- A batch of claimed messages to their next states, each fenced by its claim's token;
-- returns the ids written (a missing one lost its lease: nothing was written for it).
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::float8[], $5::int4[],
                         $6::float8[], $7::text[], $8::text[])
        AS t(id, token, state, due, attempts, finished_at, record, raw)
), moved AS (
    UPDATE {schema}.messages m
    SET state = input.state, due = input.due, attempts = input.attempts,
        finished_at = input.finished_at, lease_token = NULL, lease_until = NULL,
        claimed_by = NULL, claimed_from = NULL, accepted = NULL
    FROM input
    WHERE m.id = input.id AND m.state = 'active' AND m.lease_token = input.token
    RETURNING m.id
), written AS (
    UPDATE {schema}.bodies b
    SET record = input.record::jsonb, raw = coalesce(input.raw, b.raw)
    FROM input JOIN moved USING (id)
    WHERE b.id = input.id
    RETURNING b.id
)
SELECT id FROM written;

-- name: expired
-- Claims whose lease ran out (their deliverer died or stalled), a batch at a time.
SELECT m.id, m.lease_token, m.accepted::text AS accepted, b.record::text AS record
FROM {schema}.messages m JOIN {schema}.bodies b USING (id)
WHERE m.state = 'active' AND m.lease_until < extract(epoch FROM clock_timestamp())
ORDER BY m.lease_until
LIMIT $1
FOR UPDATE OF m SKIP LOCKED;

-- name: requeue
-- A claim with no acceptance goes back where it came from, unchanged (an expired one,
-- or one a stopping deliverer gives back).
UPDATE {schema}.messages
SET state = CASE WHEN claimed_from = 'deferred' THEN 'deferred' ELSE 'queued' END,
    lease_token = NULL, lease_until = NULL, claimed_by = NULL, claimed_from = NULL,
    accepted = NULL
WHERE id = $1 AND state = 'active' AND lease_token = $2 AND accepted IS NULL
RETURNING id;

-- name: counts
SELECT state, count(*) AS n FROM {schema}.messages GROUP BY state;

-- name: find
SELECT m.state, b.record::text AS record, m.attempts, m.finished_at
FROM {schema}.messages m JOIN {schema}.bodies b USING (id)
WHERE m.id = $1;

-- name: find_raw
SELECT b.raw FROM {schema}.bodies b WHERE b.id = $1;

-- name: state
SELECT state FROM {schema}.messages WHERE id = $1;

-- Queue operations (store.pgops): each change is one statement guarded by the states
-- it applies to, so it never races a deliverer's claim. No row: the message is in no
-- such state (or gone); the caller looks it up to say why.

-- name: ops_list
-- Messages in the states $1, oldest first (ids sort in creation order, byte-wise), at
-- most $2 (NULL: all).
SELECT m.id, m.state, m.attempts, m.created_at,
       (b.record->'recipients')::text AS recipients, (b.record->'subject')::text AS subject,
       (b.record->'last_error')::text AS last_error,
       (b.record->'next_attempt_at')::text AS next_attempt_at,
       (b.record->'priority')::text AS priority
FROM {schema}.messages m JOIN {schema}.bodies b USING (id)
WHERE m.state = ANY($1::text[])
ORDER BY m.id COLLATE "C"
LIMIT $2;

-- name: ops_show
-- The record, and the text only if $2; its size in bytes either way.
SELECT m.state, m.finished_at, b.record::text AS record,
       CASE WHEN $2::bool THEN b.raw END AS raw, octet_length(b.raw) AS raw_size
FROM {schema}.messages m JOIN {schema}.bodies b USING (id)
WHERE m.id = $1;

-- name: ops_ids
-- A page of the ids in state $1 after $2 (keyset), at most $3.
SELECT id FROM {schema}.messages WHERE state = $1 AND id > $2 ORDER BY id LIMIT $3;

-- name: ops_retry
-- The messages $1 that are in one of the states $3 (deferred, failed) back to queued,
-- due now ($2). A failed one loses its result and finish time, and the recipients it
-- retries are no longer refused. Returns each one moved with the state it left.
WITH old AS (
    SELECT id, state FROM {schema}.messages
    WHERE id = ANY($1::text[]) AND state = ANY($3::text[])
      AND state IN ('deferred', 'failed')
    ORDER BY id
    FOR UPDATE
), moved AS (
    UPDATE {schema}.messages m SET state = 'queued', due = $2::float8, finished_at = NULL
    FROM old WHERE m.id = old.id
    RETURNING m.id, old.state AS src
), body AS (
    UPDATE {schema}.bodies b
    SET record = CASE WHEN moved.src = 'failed' THEN
            (b.record - 'result' - 'finished_at')
            || CASE WHEN jsonb_typeof(b.record->'refused') = 'object' THEN
                   jsonb_build_object('refused', coalesce(
                       (SELECT jsonb_object_agg(r.key, r.value)
                        FROM jsonb_each(b.record->'refused') r
                        WHERE NOT coalesce(b.record->'recipients' ? r.key, false)),
                       '{}'::jsonb))
               ELSE '{}'::jsonb END
        ELSE b.record END
        || '{"state": "queued", "next_attempt_at": null}'::jsonb
    FROM moved WHERE b.id = moved.id
    RETURNING b.id
)
SELECT id, src FROM moved;

-- name: ops_hold
-- A queued, scheduled or deferred message to held ($2: now); returns the state it left.
WITH old AS (
    SELECT id, state FROM {schema}.messages
    WHERE id = $1 AND state IN ('queued', 'scheduled', 'deferred')
    FOR UPDATE
), moved AS (
    UPDATE {schema}.messages m SET state = 'held'
    FROM old WHERE m.id = old.id
    RETURNING m.id, old.state AS src
), body AS (
    UPDATE {schema}.bodies b
    SET record = b.record || jsonb_build_object('state', 'held', 'held_from', moved.src,
                                                'held_at', $2::float8)
    FROM moved WHERE b.id = moved.id
    RETURNING b.id
)
SELECT src FROM moved;

-- name: ops_release
-- A held message back: scheduled (due at its send_at) if its send_at is after $2 (now),
-- else queued (due now). Returns the state it went to.
WITH old AS (
    SELECT m.id,
           CASE WHEN jsonb_typeof(b.record->'send_at') = 'number'
                     AND (b.record->>'send_at')::float8 > $2::float8
                THEN (b.record->>'send_at')::float8 END AS send_at
    FROM {schema}.messages m JOIN {schema}.bodies b USING (id)
    WHERE m.id = $1 AND m.state = 'held'
    FOR UPDATE OF m
), moved AS (
    UPDATE {schema}.messages m
    SET state = CASE WHEN old.send_at IS NULL THEN 'queued' ELSE 'scheduled' END,
        due = coalesce(old.send_at, $2::float8)
    FROM old WHERE m.id = old.id
    RETURNING m.id, m.state, old.send_at
), body AS (
    UPDATE {schema}.bodies b
    SET record = (b.record - 'held_from' - 'held_at')
                 || jsonb_build_object('state', moved.state, 'next_attempt_at', moved.send_at)
    FROM moved WHERE b.id = moved.id
    RETURNING b.id
)
SELECT state FROM moved;

-- name: ops_delete
-- Any state but active; the body goes with it, and the idempotency key is free again.
DELETE FROM {schema}.messages WHERE id = $1 AND state <> 'active'
RETURNING state;

-- name: ops_purge
-- Up to $3 messages in state $1 (passed, failed, corrupt) finished before $2.
DELETE FROM {schema}.messages
WHERE id IN (
    SELECT id FROM {schema}.messages
    WHERE state = $1
      AND (finished_at < $2::float8 OR (finished_at IS NULL AND created_at < $2::float8))
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
  AND state = $1
RETURNING id;

-- name: ops_purge_beyond
-- Up to $3 messages in state $1 (passed or failed) beyond the newest $2: retention by
-- count ([server] keep_passed / keep_failed).
DELETE FROM {schema}.messages
WHERE id IN (
    SELECT id FROM {schema}.messages
    WHERE state = $1
    ORDER BY finished_at DESC NULLS LAST, id COLLATE "C" DESC
    OFFSET $2
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
  AND state = $1
RETURNING id;

-- name: give_back
-- A claim not started (its recipient domain is over its budget) goes back where it came
-- from, claimable from $3.
UPDATE {schema}.messages
SET state = CASE WHEN claimed_from = 'deferred' THEN 'deferred' ELSE 'queued' END,
    due = $3, lease_token = NULL, lease_until = NULL, claimed_by = NULL,
    claimed_from = NULL, accepted = NULL
WHERE id = $1 AND state = 'active' AND lease_token = $2 AND accepted IS NULL
RETURNING id;
