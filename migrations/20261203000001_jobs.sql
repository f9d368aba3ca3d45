-- Jobs, their tasks (one per output shard), per-tensor results and an event log.

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    state            text NOT NULL CHECK (state IN
                       ('queued', 'running', 'finalizing', 'succeeded', 'failed', 'cancelled')),
    source_uri       text NOT NULL,
    destination_uri  text NOT NULL,
    recipe_name      text NOT NULL,
    -- The recipe as given (engine RecipeFile), so finalizing does not depend on presets.
    recipe           jsonb NOT NULL,
    labels           jsonb NOT NULL DEFAULT '{}',
    -- config.json, files to copy and files left out (engine JobFiles), as JSON text: jsonb
    -- would reorder config.json's keys, and the output must match the input's order.
    files            text NOT NULL DEFAULT '{}',
    tasks_total      integer NOT NULL DEFAULT 0,
    bytes_in         bigint NOT NULL DEFAULT 0,
    error            text,
    finalize_until   timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_active ON jobs (state) WHERE state IN ('queued', 'running', 'finalizing');

CREATE TABLE tasks (
    job_id            uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq               integer NOT NULL,
    group_key         text NOT NULL,
    state             text NOT NULL CHECK (state IN
                        ('queued', 'leased', 'succeeded', 'failed', 'cancelled')),
    -- Engine TaskSpec: input ranges, actions, output file name.
    spec              jsonb NOT NULL,
    bytes_in          bigint NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    not_before        timestamptz NOT NULL DEFAULT now(),
    lease_token       uuid,
    lease_owner       text,
    lease_expires_at  timestamptz,
    bytes_done        bigint NOT NULL DEFAULT 0,
    output_key        text,
    output_bytes      bigint,
    output_sha256     text,
    -- Engine TaskOutput: per-tensor report rows and file length.
    result            jsonb,
    error             text,
    started_at        timestamptz,
    finished_at       timestamptz,
    PRIMARY KEY (job_id, seq)
);

-- The claim query scans only queued tasks that are due.
CREATE INDEX tasks_claimable ON tasks (not_before, job_id, seq) WHERE state = 'queued';
-- The reaper scans only leased tasks.
CREATE INDEX tasks_leased ON tasks (lease_expires_at) WHERE state = 'leased';

CREATE TABLE tensor_results (
    job_id         uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name           text NOT NULL,
    task_seq       integer NOT NULL,
    action         text NOT NULL,
    detail         text NOT NULL,
    dtype          text NOT NULL,
    shape          bigint[] NOT NULL,
    bytes_in       bigint NOT NULL,
    bytes_out      bigint NOT NULL,
    rel_error      double precision NOT NULL,
    mse            double precision NOT NULL,
    snr_db         double precision,
    max_abs_error  double precision NOT NULL,
    PRIMARY KEY (job_id, name)
);

CREATE TABLE job_events (
    id       bigserial PRIMARY KEY,
    job_id   uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at       timestamptz NOT NULL DEFAULT now(),
    kind     text NOT NULL,
    message  text NOT NULL
);

CREATE INDEX job_events_job ON job_events (job_id, id);

-- Stable, documented view of job status for users and dashboards (see README).
CREATE VIEW job_status AS
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
    j.finished_at - j.started_at AS duration
FROM jobs j
LEFT JOIN tasks t ON t.job_id = j.id
GROUP BY j.id;
