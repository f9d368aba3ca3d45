-- How each finished task used its worker's memory pool (reserved, peak, wait, buffers).
ALTER TABLE tasks ADD COLUMN memory jsonb;

-- New columns go at the end so the view's existing columns stay as they were.
CREATE OR REPLACE VIEW job_status AS
SELECT
    j.id AS job_id,
    j.state,
    j.source_uri,
    j.destination_uri,
    j.recipe_name,
    j.idempotency_key,
    j.labels,
    j.tasks_total,
    count(t.seq) FILTER (WHERE t.state = 'queued')::integer    AS tasks_queued,
    count(t.seq) FILTER (WHERE t.state = 'leased')::integer    AS tasks_leased,
    count(t.seq) FILTER (WHERE t.state = 'succeeded')::integer AS tasks_succeeded,
    count(t.seq) FILTER (WHERE t.state = 'failed')::integer    AS tasks_failed,
    count(t.seq) FILTER (WHERE t.state = 'cancelled')::integer AS tasks_cancelled,
    j.bytes_in,
    coalesce(sum(t.output_bytes) FILTER (WHERE t.state = 'succeeded'), 0)::bigint AS bytes_out,
    CASE WHEN coalesce(sum(t.output_bytes) FILTER (WHERE t.state = 'succeeded'), 0) > 0
              AND count(t.seq) FILTER (WHERE t.state = 'succeeded') = j.tasks_total
         THEN j.bytes_in::double precision / sum(t.output_bytes) FILTER (WHERE t.state = 'succeeded')
         ELSE NULL END AS ratio,
    CASE WHEN j.bytes_in > 0
         THEN (coalesce(sum(t.bytes_in) FILTER (WHERE t.state = 'succeeded'), 0))::double precision / j.bytes_in
         WHEN j.state = 'succeeded' THEN 1.0
         ELSE 0.0 END AS progress,
    j.error,
    j.created_at,
    j.started_at,
    j.finished_at,
    j.finished_at - j.started_at AS duration,
    coalesce(max((t.memory ->> 'reserved')::bigint), 0)::bigint AS memory_reserved_bytes,
    coalesce(max((t.memory ->> 'peak')::bigint), 0)::bigint AS memory_peak_bytes,
    coalesce(sum((t.memory ->> 'wait_ms')::bigint), 0)::bigint AS memory_wait_ms,
    CASE WHEN coalesce(sum((t.memory ->> 'buffers')::bigint), 0) > 0
         THEN sum((t.memory ->> 'reused')::bigint)::double precision
              / sum((t.memory ->> 'buffers')::bigint)
         ELSE 0.0 END AS memory_reuse_rate
FROM jobs j
LEFT JOIN tasks t ON t.job_id = j.id
GROUP BY j.id;
