-- Returns expired leases to the queue with exponential backoff and jitter, or fails the task
-- once its attempts are used up.
UPDATE tasks
SET state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
    error = 'lease expired after ' || attempts || ' attempt(s): worker ' || coalesce(lease_owner, '?')
            || ' stopped heartbeating',
    lease_token = NULL,
    lease_owner = NULL,
    lease_expires_at = NULL,
    not_before = now() + make_interval(secs => least(60.0, power(2, attempts)) * (0.5 + random() / 2))
WHERE state = 'leased' AND lease_expires_at < now()
RETURNING job_id, seq, state, error
