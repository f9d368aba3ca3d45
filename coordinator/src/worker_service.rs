//! `WorkerService`: leases, heartbeats, completions and failures, all fenced by lease tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use shardpress_engine::memory::ReservationStats;
use shardpress_engine::pipeline::TaskOutput;
use shardpress_engine::report::TensorReport;
use shardpress_proto::v1::worker_service_server::WorkerService;
use shardpress_proto::v1::{
    CompleteTaskRequest, CompleteTaskResponse, FailTaskRequest, FailTaskResponse, HeartbeatRequest,
    HeartbeatResponse, LeaseTasksRequest, LeaseTasksResponse, TaskLease,
};

use crate::db::Fenced;
use crate::error::{parse_id, ApiError};
use crate::{finalizer, Ctx};

const MAX_LEASE_BATCH: u32 = 64;
const MAX_ERROR_LEN: usize = 4096;

/// The worker API.
#[derive(Debug, Clone)]
pub struct Workers {
    ctx: Arc<Ctx>,
}

impl Workers {
    /// Serves workers from `ctx`.
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

fn task_seq(seq: u32) -> Result<i32, ApiError> {
    i32::try_from(seq).map_err(|_| ApiError::Invalid(format!("task_seq {seq} out of range")))
}

fn stale(why: String) -> Status {
    ApiError::Precondition(format!("stale lease: {why}")).into()
}

#[tonic::async_trait]
impl WorkerService for Workers {
    async fn lease_tasks(
        &self,
        request: Request<LeaseTasksRequest>,
    ) -> Result<Response<LeaseTasksResponse>, Status> {
        let req = request.into_inner();
        if req.worker_id.is_empty() || req.worker_id.len() > 256 {
            return Err(ApiError::Invalid("worker_id must be 1..256 bytes".into()).into());
        }
        let max = req.max_tasks.clamp(1, MAX_LEASE_BATCH);
        let secs = self.ctx.lease_seconds;
        let leased = self
            .ctx
            .store
            .lease(&req.worker_id, i64::from(max), f64::from(secs))
            .await
            .map_err(ApiError::from)?;
        let metrics = &self.ctx.metrics;
        let leases = leased
            .into_iter()
            .map(|(l, uris)| {
                metrics.tasks_leased.inc();
                if l.attempts > 1 {
                    metrics.tasks_retried.inc();
                }
                tracing::info!(job_id = %l.job_id, task = l.seq, attempt = l.attempts, worker = %req.worker_id, "task leased");
                TaskLease {
                    job_id: l.job_id.to_string(),
                    task_seq: l.seq as u32,
                    lease_token: l.lease_token.to_string(),
                    attempt: l.attempts as u32,
                    lease_seconds: secs,
                    spec_json: l.spec.to_string(),
                    source_uri: uris.source_uri,
                    destination_uri: uris.destination_uri,
                }
            })
            .collect();
        Ok(Response::new(LeaseTasksResponse { leases }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let job = parse_id("job_id", &req.job_id)?;
        let token = parse_id("lease_token", &req.lease_token)?;
        let seq = task_seq(req.task_seq)?;
        let done = i64::try_from(req.bytes_done).unwrap_or(i64::MAX);
        let r = self
            .ctx
            .store
            .heartbeat(job, seq, token, done, f64::from(self.ctx.lease_seconds))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(match r {
            Fenced::Done => HeartbeatResponse {
                keep_going: true,
                reason: String::new(),
            },
            Fenced::Stale(reason) => HeartbeatResponse {
                keep_going: false,
                reason,
            },
        }))
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<CompleteTaskResponse>, Status> {
        let req = request.into_inner();
        let job = parse_id("job_id", &req.job_id)?;
        let token = parse_id("lease_token", &req.lease_token)?;
        let seq = task_seq(req.task_seq)?;
        let tensors: Vec<TensorReport> = serde_json::from_str(&req.tensors_json)
            .map_err(|e| ApiError::Invalid(format!("tensors_json: {e}")))?;
        if req.sha256.len() != 64 || !req.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::Invalid("sha256 must be 64 hex digits".into()).into());
        }
        if req.output_etag.len() > 1024 {
            return Err(ApiError::Invalid("output_etag is longer than 1024 bytes".into()).into());
        }
        let layer = if req.layer_json.is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&req.layer_json)
                    .map_err(|e| ApiError::Invalid(format!("layer_json: {e}")))?,
            )
        };
        let output = TaskOutput {
            tensors,
            file_bytes: req.output_bytes,
            layer,
        };
        let bytes = i64::try_from(req.output_bytes)
            .map_err(|_| ApiError::Invalid("output_bytes out of range".into()))?;
        let (fenced, all_done, seconds) = self
            .ctx
            .store
            .complete(
                (job, seq, token),
                &req.output_key,
                bytes,
                (
                    &req.sha256,
                    Some(req.output_etag.as_str()).filter(|e| !e.is_empty()),
                ),
                &output,
                req.memory
                    .as_ref()
                    .map(|m| ReservationStats {
                        reserved: m.reserved_bytes,
                        peak: m.peak_bytes,
                        wait_ms: m.wait_ms,
                        buffers: m.buffers,
                        reused: m.reused,
                    })
                    .as_ref(),
            )
            .await
            .map_err(ApiError::from)?;
        let metrics = &self.ctx.metrics;
        if let Fenced::Stale(why) = fenced {
            metrics.reports_refused.inc();
            tracing::warn!(job_id = %job, task = seq, %why, "completion refused");
            return Err(stale(why));
        }
        metrics.tasks_completed.inc();
        metrics.bytes_written.inc_by(req.output_bytes);
        metrics
            .bytes_read
            .inc_by(output.tensors.iter().map(|t| t.bytes_in).sum());
        if let Some(seconds) = seconds {
            metrics.task_seconds.observe(seconds);
        }
        tracing::info!(job_id = %job, task = seq, bytes, "task completed");
        if all_done {
            let ctx = self.ctx.clone();
            tokio::spawn(async move { finalizer::finalize(&ctx, job).await });
        }
        Ok(Response::new(CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        request: Request<FailTaskRequest>,
    ) -> Result<Response<FailTaskResponse>, Status> {
        let req = request.into_inner();
        let job = parse_id("job_id", &req.job_id)?;
        let token = parse_id("lease_token", &req.lease_token)?;
        let seq = task_seq(req.task_seq)?;
        let mut error = req.error;
        if error.len() > MAX_ERROR_LEN {
            let mut cut = MAX_ERROR_LEN;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let r = self
            .ctx
            .store
            .fail(job, seq, token, &error, req.retryable)
            .await
            .map_err(ApiError::from)?;
        if let Fenced::Stale(why) = r {
            self.ctx.metrics.reports_refused.inc();
            return Err(stale(why));
        }
        self.ctx.metrics.tasks_failed.inc();
        tracing::warn!(job_id = %job, task = seq, retryable = req.retryable, %error, "task failed");
        Ok(Response::new(FailTaskResponse {}))
    }
}
