//! The job store: every state change of jobs and tasks, in Postgres.
//!
//! Nothing that matters lives in coordinator memory, so replicas can share one database. Task
//! state changes by a worker are fenced by its lease token and checked with `rows_affected`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{FromRow, Postgres, Transaction};
use uuid::Uuid;

use shardpress_engine::memory::ReservationStats;
use shardpress_engine::pipeline::{JobFiles, TaskOutput, TaskSpec};
use shardpress_engine::recipe::RecipeFile;

/// Embedded migrations from the repository's `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Job states as stored.
pub const TERMINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Connects with retries (the database may still be starting) and applies migrations; sqlx
/// holds a Postgres advisory lock while migrating, so replicas starting together are safe.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let mut delay = Duration::from_millis(200);
    let pool = loop {
        match PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
        {
            Ok(p) => break p,
            Err(e) if delay < Duration::from_secs(30) => {
                tracing::warn!(error = %e, retry_in = ?delay, "database not reachable");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(anyhow::anyhow!("connecting to the database: {e}")),
        }
    };
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("applying migrations: {e}"))?;
    Ok(pool)
}

/// A new job with its tasks, inserted in one transaction.
#[derive(Debug)]
pub struct NewJob<'a> {
    /// Job id.
    pub id: Uuid,
    /// Client idempotency key.
    pub idempotency_key: &'a str,
    /// Source URI.
    pub source_uri: &'a str,
    /// Destination URI.
    pub destination_uri: &'a str,
    /// Recipe name.
    pub recipe_name: &'a str,
    /// Recipe as given.
    pub recipe: &'a RecipeFile,
    /// Labels.
    pub labels: Value,
    /// Config and files for the finalizer.
    pub files: &'a JobFiles,
    /// Tasks in output order.
    pub tasks: &'a [TaskSpec],
    /// Attempts per task.
    pub max_attempts: i32,
    /// When planning already failed: the job is stored failed with this error, without tasks.
    pub error: Option<String>,
}

/// A row of the `job_status` view.
#[derive(Debug, Clone, FromRow)]
pub struct JobStatus {
    pub job_id: Uuid,
    pub state: String,
    pub source_uri: String,
    pub destination_uri: String,
    pub recipe_name: String,
    pub idempotency_key: String,
    pub labels: Value,
    pub tasks_total: i32,
    pub tasks_queued: i32,
    pub tasks_leased: i32,
    pub tasks_succeeded: i32,
    pub tasks_failed: i32,
    pub tasks_cancelled: i32,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub ratio: Option<f64>,
    pub progress: f64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub memory_reserved_bytes: i64,
    pub memory_peak_bytes: i64,
    pub memory_wait_ms: i64,
    pub memory_reuse_rate: f64,
}

/// A task handed to a worker.
#[derive(Debug, Clone, FromRow)]
pub struct Leased {
    pub job_id: Uuid,
    pub seq: i32,
    pub lease_token: Uuid,
    pub attempts: i32,
    pub spec: Value,
}

/// Where a job reads and writes, for leases.
#[derive(Debug, Clone, FromRow)]
pub struct JobUris {
    pub id: Uuid,
    pub source_uri: String,
    pub destination_uri: String,
}

/// Everything the finalizer needs.
#[derive(Debug, Clone)]
pub struct FinalizeInput {
    pub job_id: Uuid,
    pub source_uri: String,
    pub destination_uri: String,
    pub recipe: RecipeFile,
    pub files: JobFiles,
    pub tasks: Vec<FinishedTask>,
}

/// A succeeded task as the finalizer needs it.
#[derive(Debug, Clone)]
pub struct FinishedTask {
    pub spec: TaskSpec,
    pub output: TaskOutput,
    /// Key of the uploaded shard in the destination bucket.
    pub key: String,
    /// Its size as the worker reported it.
    pub bytes: i64,
    /// Hex SHA-256 of its bytes as the worker computed them.
    pub sha256: String,
    /// Its entity tag right after the upload, when the store gave one.
    pub etag: Option<String>,
}

/// A finished task's stored outputs.
#[derive(Debug, FromRow)]
struct DoneTask {
    spec: Value,
    result: Option<Value>,
    output_key: Option<String>,
    output_bytes: Option<i64>,
    output_sha256: Option<String>,
    output_etag: Option<String>,
}

/// Outcome of a fenced task update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced {
    /// Applied.
    Done,
    /// The lease is not (or no longer) the caller's.
    Stale(String),
}

const STATUS_COLUMNS: &str = "job_id, state, source_uri, destination_uri, recipe_name, idempotency_key, labels, tasks_total, tasks_queued, tasks_leased, tasks_succeeded, tasks_failed, tasks_cancelled, bytes_in, bytes_out, ratio, progress, error, created_at, started_at, finished_at, memory_reserved_bytes, memory_peak_bytes, memory_wait_ms, memory_reuse_rate";

/// Postgres-backed job store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Wraps a connected pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Job id already registered under an idempotency key.
    pub async fn job_by_key(&self, key: &str) -> sqlx::Result<Option<Uuid>> {
        sqlx::query_scalar("SELECT id FROM jobs WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
    }

    /// Inserts a job and all its tasks atomically. Returns the id of the job that holds the
    /// idempotency key: this one, or one a concurrent submit inserted first.
    pub async fn insert_job(&self, job: NewJob<'_>) -> anyhow::Result<(Uuid, bool)> {
        let mut tx = self.pool.begin().await?;
        let bytes_in: i64 = job.tasks.iter().map(|t| t.bytes_in() as i64).sum();
        let state = if job.error.is_some() {
            "failed"
        } else {
            "queued"
        };
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO jobs (id, idempotency_key, state, source_uri, destination_uri, recipe_name,
                               recipe, labels, files, tasks_total, bytes_in, error, finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                     CASE WHEN $3 = 'failed' THEN now() END)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING id",
        )
        .bind(job.id)
        .bind(job.idempotency_key)
        .bind(state)
        .bind(job.source_uri)
        .bind(job.destination_uri)
        .bind(job.recipe_name)
        .bind(serde_json::to_value(job.recipe)?)
        .bind(&job.labels)
        .bind(serde_json::to_string(job.files)?)
        .bind(job.tasks.len() as i32)
        .bind(bytes_in)
        .bind(&job.error)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = inserted else {
            tx.rollback().await?;
            let existing = self
                .job_by_key(job.idempotency_key)
                .await?
                .ok_or_else(|| anyhow::anyhow!("idempotency key vanished"))?;
            return Ok((existing, false));
        };
        if job.error.is_none() {
            for (seq, task) in job.tasks.iter().enumerate() {
                sqlx::query(
                    "INSERT INTO tasks (job_id, seq, group_key, state, spec, bytes_in, max_attempts)
                     VALUES ($1, $2, $3, 'queued', $4, $5, $6)",
                )
                .bind(id)
                .bind(seq as i32)
                .bind(&task.key)
                .bind(serde_json::to_value(task)?)
                .bind(task.bytes_in() as i64)
                .bind(job.max_attempts)
                .execute(&mut *tx)
                .await?;
            }
        }
        event(
            &mut tx,
            id,
            "submitted",
            &format!("{} task(s) planned", job.tasks.len()),
        )
        .await?;
        if let Some(e) = &job.error {
            event(&mut tx, id, "failed", e).await?;
        }
        tx.commit().await?;
        Ok((id, true))
    }

    /// Status of one job.
    pub async fn status(&self, id: Uuid) -> sqlx::Result<Option<JobStatus>> {
        sqlx::query_as(&format!(
            "SELECT {STATUS_COLUMNS} FROM job_status WHERE job_id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
    }

    /// Jobs newest first, optionally filtered by state, after a `(created_at, id)` cursor.
    pub async fn list(
        &self,
        states: &[String],
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> sqlx::Result<Vec<JobStatus>> {
        let (at, id) = match after {
            Some((a, i)) => (Some(a), Some(i)),
            None => (None, None),
        };
        sqlx::query_as(&format!(
            "SELECT {STATUS_COLUMNS} FROM job_status
             WHERE (cardinality($1::text[]) = 0 OR state = ANY($1))
               AND ($2::timestamptz IS NULL OR (created_at, job_id) < ($2, $3))
             ORDER BY created_at DESC, job_id DESC
             LIMIT $4"
        ))
        .bind(states)
        .bind(at)
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    /// Cancels a job that has not ended: queued tasks are cancelled at once, leased ones stop
    /// at their next heartbeat. Returns false when the job had already ended.
    pub async fn cancel(&self, id: Uuid) -> sqlx::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = now(), updated_at = now()
             WHERE id = $1 AND state IN ('queued', 'running', 'finalizing')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            sqlx::query(
                "UPDATE tasks SET state = 'cancelled', finished_at = now()
                 WHERE job_id = $1 AND state = 'queued'",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            event(&mut tx, id, "cancelled", "cancelled by request").await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Leases up to `max` tasks to `worker` for `lease_seconds`.
    pub async fn lease(
        &self,
        worker: &str,
        max: i64,
        lease_seconds: f64,
    ) -> sqlx::Result<Vec<(Leased, JobUris)>> {
        let leased: Vec<Leased> = sqlx::query_as(include_str!("sql/lease.sql"))
            .bind(max)
            .bind(worker)
            .bind(lease_seconds)
            .fetch_all(&self.pool)
            .await?;
        if leased.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = leased.iter().map(|l| l.job_id).collect();
        let uris: Vec<JobUris> = sqlx::query_as(
            "UPDATE jobs SET state = CASE WHEN state = 'queued' THEN 'running' ELSE state END,
                             started_at = coalesce(started_at, now()), updated_at = now()
             WHERE id = ANY($1)
             RETURNING id, source_uri, destination_uri",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(leased
            .into_iter()
            .filter_map(|l| {
                let u = uris.iter().find(|u| u.id == l.job_id)?.clone();
                Some((l, u))
            })
            .collect())
    }

    /// Renews a lease; `Stale` says why the worker should stop.
    pub async fn heartbeat(
        &self,
        job: Uuid,
        seq: i32,
        token: Uuid,
        bytes_done: i64,
        lease_seconds: f64,
    ) -> sqlx::Result<Fenced> {
        let n = sqlx::query(
            "UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => $5), bytes_done = $4
             FROM jobs j
             WHERE t.job_id = $1 AND t.seq = $2 AND t.lease_token = $3 AND t.state = 'leased'
               AND j.id = t.job_id AND j.state IN ('queued', 'running')",
        )
        .bind(job)
        .bind(seq)
        .bind(token)
        .bind(bytes_done)
        .bind(lease_seconds)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 1 {
            return Ok(Fenced::Done);
        }
        Ok(Fenced::Stale(self.why_stale(job, seq, token).await?))
    }

    async fn why_stale(&self, job: Uuid, seq: i32, token: Uuid) -> sqlx::Result<String> {
        let row: Option<(String, String, Option<Uuid>)> = sqlx::query_as(
            "SELECT j.state, t.state, t.lease_token FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.job_id = $1 AND t.seq = $2",
        )
        .bind(job)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => format!("job {job} has no task {seq}"),
            Some((js, _, _)) if TERMINAL.contains(&js.as_str()) => format!("job {job} is {js}"),
            Some((_, ts, Some(t))) if t != token => {
                format!("task {seq} of job {job} is leased by another worker ({ts})")
            }
            Some((_, ts, _)) => format!("task {seq} of job {job} is {ts}, not leased by you"),
        })
    }

    /// Records a finished task, fenced by its lease. Returns whether every task of the job is
    /// now done, and the seconds since the task was first leased.
    pub async fn complete(
        &self,
        (job, seq, token): (Uuid, i32, Uuid),
        output_key: &str,
        output_bytes: i64,
        (sha256, etag): (&str, Option<&str>),
        output: &TaskOutput,
        memory: Option<&ReservationStats>,
    ) -> anyhow::Result<(Fenced, bool, Option<f64>)> {
        let mut tx = self.pool.begin().await?;
        let updated: Option<Option<f64>> = sqlx::query_scalar(
            "UPDATE tasks t SET state = 'succeeded', output_key = $4, output_bytes = $5,
                    output_sha256 = $6, result = $7, finished_at = now(), lease_token = NULL,
                    lease_expires_at = NULL, error = NULL, bytes_done = t.bytes_in,
                    memory = $8, output_etag = $9
             FROM jobs j
             WHERE t.job_id = $1 AND t.seq = $2 AND t.lease_token = $3 AND t.state = 'leased'
               AND j.id = t.job_id AND j.state IN ('queued', 'running')
             RETURNING extract(epoch FROM now() - t.started_at)::float8",
        )
        .bind(job)
        .bind(seq)
        .bind(token)
        .bind(output_key)
        .bind(output_bytes)
        .bind(sha256)
        .bind(serde_json::to_value(output)?)
        .bind(memory.map(serde_json::to_value).transpose()?)
        .bind(etag)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(seconds) = updated else {
            tx.rollback().await?;
            return Ok((
                Fenced::Stale(self.why_stale(job, seq, token).await?),
                false,
                None,
            ));
        };
        sqlx::query("DELETE FROM tensor_results WHERE job_id = $1 AND task_seq = $2")
            .bind(job)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        for r in &output.tensors {
            sqlx::query(
                "INSERT INTO tensor_results (job_id, name, task_seq, action, detail, dtype, shape,
                     bytes_in, bytes_out, rel_error, mse, snr_db, max_abs_error)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            )
            .bind(job)
            .bind(&r.name)
            .bind(seq)
            .bind(&r.action)
            .bind(&r.detail)
            .bind(&r.dtype)
            .bind(r.shape.iter().map(|d| *d as i64).collect::<Vec<i64>>())
            .bind(r.bytes_in as i64)
            .bind(r.bytes_out as i64)
            .bind(r.error.rel_error)
            .bind(r.error.mse)
            .bind(r.error.snr_db)
            .bind(r.error.max_abs_error)
            .execute(&mut *tx)
            .await?;
        }
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE job_id = $1 AND state <> 'succeeded'",
        )
        .bind(job)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((Fenced::Done, left == 0, seconds))
    }

    /// Records a failed attempt, fenced by its lease: retryable failures requeue the task until
    /// its attempts are used up; anything else fails the job with the task's error.
    pub async fn fail(
        &self,
        job: Uuid,
        seq: i32,
        token: Uuid,
        error: &str,
        retryable: bool,
    ) -> anyhow::Result<Fenced> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, i32, i32, String)> = sqlx::query_as(
            "UPDATE tasks SET
                 state = CASE WHEN $5 AND attempts < max_attempts THEN 'queued' ELSE 'failed' END,
                 error = $4, lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL,
                 not_before = now() + make_interval(secs => least(60.0, power(2, attempts)) * (0.5 + random() / 2)),
                 finished_at = CASE WHEN $5 AND attempts < max_attempts THEN NULL ELSE now() END
             WHERE job_id = $1 AND seq = $2 AND lease_token = $3 AND state = 'leased'
             RETURNING state, attempts, max_attempts, group_key",
        )
        .bind(job)
        .bind(seq)
        .bind(token)
        .bind(error)
        .bind(retryable)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, attempts, max, group)) = row else {
            tx.rollback().await?;
            return Ok(Fenced::Stale(self.why_stale(job, seq, token).await?));
        };
        if state == "failed" {
            let why = if retryable {
                format!("task {seq} ({group}) failed after {attempts} of {max} attempts: {error}")
            } else {
                format!("task {seq} ({group}) failed: {error}")
            };
            fail_job(&mut tx, job, &why).await?;
        } else {
            event(
                &mut tx,
                job,
                "retry",
                &format!("task {seq} ({group}) attempt {attempts} failed: {error}"),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Fenced::Done)
    }

    /// Jobs by state, and the tasks of unfinished jobs by state, for the metrics gauges.
    pub async fn state_counts(&self) -> sqlx::Result<(Vec<(String, i64)>, Vec<(String, i64)>)> {
        let jobs = sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let tasks = sqlx::query_as(
            "SELECT t.state, count(*) FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE j.state IN ('queued', 'running', 'finalizing') GROUP BY t.state",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok((jobs, tasks))
    }

    /// Requeues tasks whose leases expired (or fails them after their last attempt, failing
    /// the job). Returns how many leases expired.
    pub async fn expire_leases(&self) -> sqlx::Result<usize> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(Uuid, i32, String, Option<String>)> =
            sqlx::query_as(include_str!("sql/expire.sql"))
                .fetch_all(&mut *tx)
                .await?;
        for (job, seq, state, error) in &rows {
            let msg = error.clone().unwrap_or_default();
            if state == "failed" {
                fail_job(&mut tx, *job, &format!("task {seq} failed: {msg}")).await?;
            } else {
                event(&mut tx, *job, "requeued", &format!("task {seq}: {msg}")).await?;
            }
        }
        tx.commit().await?;
        Ok(rows.len())
    }

    /// Jobs whose tasks are all done but that are not finalized (or whose finalizer died).
    pub async fn finalizable(&self) -> sqlx::Result<Vec<Uuid>> {
        sqlx::query_scalar(
            "SELECT j.id FROM jobs j
             WHERE (j.state = 'running' OR (j.state = 'finalizing' AND j.finalize_until < now()))
               AND j.tasks_total > 0
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.state <> 'succeeded')",
        )
        .fetch_all(&self.pool)
        .await
    }

    /// Claims a job for finalizing for `secs` seconds; `None` when another finalizer has it or
    /// it is not ready.
    pub async fn claim_finalize(
        &self,
        id: Uuid,
        secs: f64,
    ) -> anyhow::Result<Option<FinalizeInput>> {
        let claimed: Option<(String, String, Value, String)> = sqlx::query_as(
            "UPDATE jobs SET state = 'finalizing', finalize_until = now() + make_interval(secs => $2),
                    updated_at = now()
             WHERE id = $1
               AND (state = 'running' OR (state = 'finalizing' AND finalize_until < now()))
               AND tasks_total > 0
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = $1 AND t.state <> 'succeeded')
             RETURNING source_uri, destination_uri, recipe, files",
        )
        .bind(id)
        .bind(secs)
        .fetch_optional(&self.pool)
        .await?;
        let Some((source_uri, destination_uri, recipe, files)) = claimed else {
            return Ok(None);
        };
        let rows: Vec<DoneTask> = sqlx::query_as(
            "SELECT spec, result, output_key, output_bytes, output_sha256, output_etag
             FROM tasks WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        let mut tasks = Vec::with_capacity(rows.len());
        for DoneTask {
            spec,
            result,
            output_key: key,
            output_bytes: bytes,
            output_sha256: sha256,
            output_etag: etag,
        } in rows
        {
            tasks.push(FinishedTask {
                spec: serde_json::from_value(spec)?,
                output: serde_json::from_value(result.unwrap_or(Value::Null))?,
                key: key.unwrap_or_default(),
                bytes: bytes.unwrap_or(0),
                sha256: sha256.unwrap_or_default(),
                etag,
            });
        }
        Ok(Some(FinalizeInput {
            job_id: id,
            source_uri,
            destination_uri,
            recipe: serde_json::from_value(recipe)?,
            files: serde_json::from_str(&files)?,
            tasks,
        }))
    }

    /// Marks a finalizing job succeeded.
    pub async fn succeed(&self, id: Uuid) -> sqlx::Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = 'succeeded', finished_at = now(), finalize_until = NULL,
                    updated_at = now()
             WHERE id = $1 AND state = 'finalizing'",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            event(&mut tx, id, "succeeded", "output written").await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Fails a job that has not ended.
    pub async fn fail_job(&self, id: Uuid, error: &str) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        fail_job(&mut tx, id, error).await?;
        tx.commit().await
    }

    /// Appends to the job's event log.
    pub async fn event(&self, id: Uuid, kind: &str, message: &str) -> sqlx::Result<()> {
        let mut tx = self.pool.begin().await?;
        event(&mut tx, id, kind, message).await?;
        tx.commit().await
    }
}

async fn event(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    kind: &str,
    message: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO job_events (job_id, kind, message) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(kind)
        .bind(message)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn fail_job(tx: &mut Transaction<'_, Postgres>, id: Uuid, error: &str) -> sqlx::Result<()> {
    let n = sqlx::query(
        "UPDATE jobs SET state = 'failed', error = $2, finished_at = now(), finalize_until = NULL,
                updated_at = now()
         WHERE id = $1 AND state IN ('queued', 'running', 'finalizing')",
    )
    .bind(id)
    .bind(error)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n == 1 {
        sqlx::query(
            "UPDATE tasks SET state = 'cancelled', finished_at = now()
             WHERE job_id = $1 AND state = 'queued'",
        )
        .bind(id)
        .execute(&mut **tx)
        .await?;
        event(tx, id, "failed", error).await?;
    }
    Ok(())
}
