-- Claims up to $1 due tasks of active jobs for worker $2, for $3 seconds, in one statement.
-- SKIP LOCKED lets concurrent coordinators and lease calls take disjoint tasks.
WITH next AS (
    SELECT t.job_id, t.seq
    FROM tasks t
    JOIN jobs j ON j.id = t.job_id
    WHERE t.state = 'queued'
      AND t.not_before <= now()
      AND j.state IN ('queued', 'running')
    ORDER BY j.created_at, t.job_id, t.seq
    LIMIT $1
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE tasks t
SET state = 'leased',
    attempts = t.attempts + 1,
    lease_token = gen_random_uuid(),
    lease_owner = $2,
    lease_expires_at = now() + make_interval(secs => $3),
    bytes_done = 0,
    started_at = coalesce(t.started_at, now())
FROM next
WHERE t.job_id = next.job_id AND t.seq = next.seq
RETURNING t.job_id, t.seq, t.lease_token, t.attempts, t.spec
