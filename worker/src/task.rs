//! One leased task: parse its spec, run the engine on the S3 objects it names, upload the
//! output shard, and report the result; a heartbeat keeps the lease alive meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardpress_engine::pipeline::{
    run_task, task_reservation, CompressError, Progress, TaskOutput, TaskSpec,
};
use shardpress_engine::safetensors::WriteError;
use shardpress_engine::source::ByteSource;
use shardpress_engine::MemoryPool;
use shardpress_proto::auth::AuthChannel;
use shardpress_proto::v1::worker_service_client::WorkerServiceClient;
use shardpress_proto::v1::{
    CompleteTaskRequest, FailTaskRequest, HeartbeatRequest, TaskLease, TaskMemory,
};
use shardpress_storage::{MultipartWriter, ObjectStore, S3Uri, StorageError};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::runner::error_chain;
use prometheus_client::metrics::histogram::Histogram;

/// What every task of a worker shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: ObjectStore,
    /// Set when the shutdown grace period is over: every task stops at the next tensor.
    pub(crate) abandon: Arc<AtomicBool>,
    /// The byte budget every task's buffers come from.
    pub(crate) memory: MemoryPool,
    /// The worker's Prometheus metrics.
    pub(crate) metrics: Metrics,
}

/// Lowers the running-tasks gauge when a task ends, however it ends.
struct Running<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Memory of a task's upload besides its tensors: the part being filled and those in flight.
const UPLOAD_MEMORY: u64 = shardpress_storage::UPLOAD_MEMORY;

/// How many times a result is offered to an unavailable coordinator before giving up (the
/// lease then expires and the task runs again elsewhere).
const REPORT_ATTEMPTS: u32 = 6;

/// Runs one leased task to the end, holding `permit` (its slot) until then.
pub(crate) async fn run_lease(
    shared: Arc<Shared>,
    client: WorkerServiceClient<AuthChannel>,
    lease: TaskLease,
    permit: OwnedSemaphorePermit,
) {
    let span = info_span!(
        "task",
        job = %lease.job_id,
        task = lease.task_seq,
        attempt = lease.attempt
    );
    async move {
        let _permit = permit;
        let started = Instant::now();
        let metrics = &shared.metrics;
        metrics.running.inc();
        let _running = Running(&metrics.running);
        let outcome = match execute(&shared, &client, &lease).await {
            Outcome::Done(done) => {
                let read: u64 = done.output.tensors.iter().map(|t| t.bytes_in).sum();
                let written = done.bytes;
                if complete(&client, &lease, done, started).await {
                    metrics.bytes_read.inc_by(read);
                    metrics.bytes_written.inc_by(written);
                    "completed"
                } else {
                    "dropped"
                }
            }
            Outcome::Failed { message, retryable } => {
                warn!(retryable, "task failed: {message}");
                fail(&client, &lease, message, retryable).await;
                "failed"
            }
            Outcome::Dropped(why) => {
                info!("task dropped without reporting: {why}");
                "dropped"
            }
        };
        metrics.ended(outcome, started.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await
}

/// A finished output shard.
#[derive(Debug)]
struct Done {
    key: String,
    bytes: u64,
    sha256: String,
    etag: Option<String>,
    output: TaskOutput,
    memory: TaskMemory,
}

/// How a task ended.
#[derive(Debug)]
enum Outcome {
    /// Uploaded; report with `CompleteTask`.
    Done(Done),
    /// Report with `FailTask`.
    Failed { message: String, retryable: bool },
    /// The lease is no longer ours (or the worker is shutting down): report nothing.
    Dropped(String),
}

impl Outcome {
    fn fatal(message: impl Into<String>) -> Self {
        Outcome::Failed {
            message: message.into(),
            retryable: false,
        }
    }
}

async fn execute(
    shared: &Arc<Shared>,
    client: &WorkerServiceClient<AuthChannel>,
    lease: &TaskLease,
) -> Outcome {
    let spec: TaskSpec = match serde_json::from_str(&lease.spec_json) {
        Ok(s) => s,
        Err(e) => return Outcome::fatal(format!("task spec is not a valid TaskSpec: {e}")),
    };
    let source = match S3Uri::parse(&lease.source_uri) {
        Ok(u) => u,
        Err(e) => return Outcome::fatal(format!("source URI {:?}: {e}", lease.source_uri)),
    };
    let destination = match S3Uri::parse(&lease.destination_uri) {
        Ok(u) => u,
        Err(e) => {
            return Outcome::fatal(format!("destination URI {:?}: {e}", lease.destination_uri))
        }
    };
    let progress = Arc::new(
        TaskProgress::new(shared.abandon.clone()).timing(shared.metrics.tensor_seconds.clone()),
    );
    // Stops the heartbeat however this function is left: return, cancellation or panic.
    let _heartbeat = AbortOnDrop(tokio::spawn(heartbeat_loop(
        client.clone(),
        lease.clone(),
        progress.clone(),
    )));
    debug!(
        shard = %spec.file_name,
        tensors = spec.tensors.len(),
        bytes_in = spec.bytes_in(),
        "running task"
    );
    let store = shared.store.clone();
    let memory = shared.memory.clone();
    let blocking_progress = progress.clone();
    // The engine's per-tensor spans nest under this task's span on the blocking thread.
    let span = tracing::Span::current();
    let joined = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        run_blocking(
            &store,
            &memory,
            &source,
            &destination,
            &spec,
            &blocking_progress,
        )
    })
    .await;
    let outcome = match joined {
        Ok(outcome) => outcome,
        Err(e) => match e.try_into_panic() {
            Ok(payload) => Outcome::fatal(format!(
                "the worker panicked while running the task: {}",
                panic_message(payload.as_ref())
            )),
            Err(e) => Outcome::Dropped(format!("the task was cancelled: {e}")),
        },
    };
    match outcome {
        // A failure caused by stopping (or racing with it) is not the task's fault.
        Outcome::Failed { .. } if progress.cancelled() => Outcome::Dropped(progress.reason()),
        other => other,
    }
}

/// The blocking part: read, transform and upload. Runs on a blocking thread because the
/// storage adapters block on the runtime.
fn run_blocking(
    store: &ObjectStore,
    memory: &MemoryPool,
    source: &S3Uri,
    destination: &S3Uri,
    spec: &TaskSpec,
    progress: &TaskProgress,
) -> Outcome {
    // The task waits here, holding nothing, until the pool has room for it.
    let threads = rayon::current_num_threads();
    let reservation =
        match task_reservation(spec, memory.limit(), UPLOAD_MEMORY, threads).and_then(|need| {
            memory.reserve(need).map_err(|e| CompressError::Memory {
                tensor: spec.key.clone(),
                problem: e.to_string(),
            })
        }) {
            Ok(r) => r,
            Err(e) => return classify(e, progress),
        };
    if progress.cancelled() {
        return Outcome::Dropped(progress.reason());
    }
    let upload_buffers = match reservation.charge(UPLOAD_MEMORY) {
        Ok(c) => c,
        Err(e) => return Outcome::fatal(format!("reserving upload buffers: {e}")),
    };
    let sources: Vec<Arc<dyn ByteSource>> = spec
        .inputs
        .iter()
        .map(|input| {
            let key = source.key(&input.file);
            let name = format!("s3://{}/{}", source.bucket, key);
            Arc::new(store.versioned_source(
                &source.bucket,
                &key,
                input.etag.as_deref(),
                input.len,
                &name,
            )) as Arc<dyn ByteSource>
        })
        .collect();
    let key = destination.key(&spec.file_name);
    let object = format!("s3://{}/{}", destination.bucket, key);
    let mut writer = store.multipart_writer(&destination.bucket, &key);
    let output = match run_task(spec, &sources, &mut writer, progress, &reservation) {
        Ok(o) => o,
        Err(e) => {
            abort_upload(writer, &object);
            return classify(e, progress);
        }
    };
    if progress.cancelled() {
        abort_upload(writer, &object);
        return Outcome::Dropped(progress.reason());
    }
    let (bytes, sha256) = match writer.finish() {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Failed {
                message: format!("{object}: finishing the upload: {e}"),
                retryable: e.is_retryable(),
            }
        }
    };
    // The entity tag the store gave the shard; the finalizer checks it is unchanged.
    let etag = match store
        .handle()
        .block_on(store.head(&destination.bucket, &key))
    {
        Ok(Some(meta)) if meta.size == bytes => meta.etag,
        Ok(Some(meta)) => {
            return Outcome::Failed {
                message: format!(
                    "{object}: the store holds {} bytes right after an upload of {bytes}",
                    meta.size
                ),
                retryable: true,
            }
        }
        Ok(None) => {
            return Outcome::Failed {
                message: format!("{object}: missing right after its upload"),
                retryable: true,
            }
        }
        Err(e) => {
            return Outcome::Failed {
                message: format!("{object}: checking the upload: {e}"),
                retryable: e.is_retryable(),
            }
        }
    };
    let used = reservation.stats();
    let memory = TaskMemory {
        reserved_bytes: used.reserved,
        peak_bytes: used.peak,
        wait_ms: used.wait_ms,
        buffers: used.buffers,
        reused: used.reused,
        limit_bytes: memory.limit().unwrap_or(0),
    };
    drop(upload_buffers);
    drop(reservation);
    if bytes != output.file_bytes {
        return Outcome::fatal(format!(
            "{object}: uploaded {bytes} bytes but the shard has {}",
            output.file_bytes
        ));
    }
    Outcome::Done(Done {
        key,
        bytes,
        sha256,
        etag,
        output,
        memory,
    })
}

/// Aborts an unfinished upload and waits for the store to confirm, so no parts are left
/// behind. (Dropping the writer, as a panic would, also aborts, but in the background.)
fn abort_upload(writer: MultipartWriter, object: &str) {
    if let Err(e) = writer.abort() {
        warn!("{object}: could not abort the unfinished upload: {e}");
    }
}

/// Sorts an engine error into retryable (the input or the store may answer next time) and
/// fatal (the checkpoint, the spec or the recipe is wrong, and will be wrong again). A read
/// or upload failure is retryable unless the store said it is permanent (a missing object,
/// denied access, a range past the end).
fn classify(e: CompressError, progress: &TaskProgress) -> Outcome {
    let retryable = match &e {
        CompressError::Cancelled => return Outcome::Dropped(progress.reason()),
        CompressError::Read { source: io, .. }
        | CompressError::Write {
            source: WriteError::Io(io),
            ..
        } => storage_error(io).is_none_or(StorageError::is_retryable),
        CompressError::Write { .. }
        | CompressError::Transform { .. }
        | CompressError::Checkpoint(_)
        | CompressError::Plan(_)
        | CompressError::Memory { .. }
        | CompressError::Output { .. } => false,
    };
    Outcome::Failed {
        message: error_chain(&e),
        retryable,
    }
}

/// The storage error inside an I/O error raised by a storage adapter, if any.
fn storage_error(e: &std::io::Error) -> Option<&StorageError> {
    StorageError::find_in(e)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// Progress of one task: input bytes done (sent with heartbeats) and the stop flags the
/// engine checks before each tensor.
#[derive(Debug)]
struct TaskProgress {
    done: AtomicU64,
    /// Where tensor durations go, and when the last tensor ended.
    timing: Option<(Histogram, std::sync::Mutex<Instant>)>,
    /// Set when the coordinator withdrew the lease.
    revoked: AtomicBool,
    /// The worker-wide flag set when the shutdown grace period is over.
    abandon: Arc<AtomicBool>,
}

impl TaskProgress {
    fn new(abandon: Arc<AtomicBool>) -> Self {
        Self {
            done: AtomicU64::new(0),
            timing: None,
            revoked: AtomicBool::new(false),
            abandon,
        }
    }

    /// Records each tensor's duration (from the previous tensor's end) in `histogram`.
    fn timing(mut self, histogram: Histogram) -> Self {
        self.timing = Some((histogram, std::sync::Mutex::new(Instant::now())));
        self
    }

    fn bytes_done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    fn reason(&self) -> String {
        if self.revoked.load(Ordering::SeqCst) {
            "the lease is no longer this worker's".to_string()
        } else {
            "the worker is shutting down".to_string()
        }
    }
}

impl Progress for TaskProgress {
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        if let Some((histogram, last)) = &self.timing {
            let now = Instant::now();
            let mut last = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            histogram.observe(now.duration_since(*last).as_secs_f64());
            *last = now;
        }
    }

    fn cancelled(&self) -> bool {
        self.revoked.load(Ordering::SeqCst) || self.abandon.load(Ordering::SeqCst)
    }
}

/// Aborts a spawned task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Time between heartbeats: a third of the lease, so two can be lost before it expires.
fn heartbeat_period(lease_seconds: u32) -> Duration {
    (Duration::from_secs(u64::from(lease_seconds.max(1))) / 3).max(Duration::from_millis(100))
}

/// Renews the lease until the task ends (the caller aborts this loop) or the coordinator
/// withdraws it, in which case the task is told to stop. The first heartbeat goes out at
/// once: it reports the start and catches a lease withdrawn between leasing and starting.
async fn heartbeat_loop(
    mut client: WorkerServiceClient<AuthChannel>,
    lease: TaskLease,
    progress: Arc<TaskProgress>,
) {
    let lease_length = Duration::from_secs(u64::from(lease.lease_seconds.max(1)));
    let period = heartbeat_period(lease.lease_seconds);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed = Instant::now();
    loop {
        ticks.tick().await;
        let mut request = tonic::Request::new(HeartbeatRequest {
            job_id: lease.job_id.clone(),
            task_seq: lease.task_seq,
            lease_token: lease.lease_token.clone(),
            bytes_done: progress.bytes_done(),
        });
        request.set_timeout(period);
        match client.heartbeat(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if !response.keep_going {
                    info!(reason = %response.reason, "coordinator withdrew the lease; stopping");
                    progress.revoke();
                    return;
                }
                renewed = Instant::now();
            }
            Err(status) if matches!(status.code(), Code::NotFound | Code::FailedPrecondition) => {
                info!(
                    code = ?status.code(),
                    "coordinator no longer knows this lease ({}); stopping",
                    status.message()
                );
                progress.revoke();
                return;
            }
            Err(status) => {
                if renewed.elapsed() >= lease_length {
                    warn!(
                        "no heartbeat got through for {}s, longer than the lease; stopping",
                        renewed.elapsed().as_secs()
                    );
                    progress.revoke();
                    return;
                }
                warn!(
                    code = ?status.code(),
                    "heartbeat failed: {}; retrying",
                    status.message()
                );
            }
        }
    }
}

/// Whether an RPC error may go away by itself, so the call is worth repeating.
fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    )
}

/// Calls `rpc` until it succeeds, fails for good, or [`REPORT_ATTEMPTS`] transient failures.
async fn with_retries<T, F, Fut>(name: &str, mut rpc: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    let mut attempt = 1;
    loop {
        match rpc().await {
            Err(status) if transient(status.code()) && attempt < REPORT_ATTEMPTS => {
                let delay = backoff.next_delay();
                warn!(
                    code = ?status.code(),
                    "{name} failed: {}; retrying in {:.1}s",
                    status.message(),
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Reports a finished task; returns whether the coordinator accepted it.
async fn complete(
    client: &WorkerServiceClient<AuthChannel>,
    lease: &TaskLease,
    done: Done,
    started: Instant,
) -> bool {
    let tensors_json = match serde_json::to_string(&done.output.tensors) {
        Ok(j) => j,
        Err(e) => {
            fail(
                client,
                lease,
                format!("cannot encode the task report: {e}"),
                false,
            )
            .await;
            return false;
        }
    };
    let request = CompleteTaskRequest {
        job_id: lease.job_id.clone(),
        task_seq: lease.task_seq,
        lease_token: lease.lease_token.clone(),
        output_key: done.key.clone(),
        output_bytes: done.bytes,
        sha256: done.sha256.clone(),
        output_etag: done.etag.clone().unwrap_or_default(),
        tensors_json,
        layer_json: done
            .output
            .layer
            .as_ref()
            .and_then(|l| serde_json::to_string(l).ok())
            .unwrap_or_default(),
        memory: Some(done.memory),
    };
    let result = with_retries("CompleteTask", || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.complete_task(request).await }
    })
    .await;
    match result {
        Ok(_) => {
            info!(
                key = %done.key,
                bytes = done.bytes,
                seconds = started.elapsed().as_secs_f64(),
                memory_reserved = done.memory.reserved_bytes,
                memory_peak = done.memory.peak_bytes,
                memory_wait_ms = done.memory.wait_ms,
                buffers = done.memory.buffers,
                buffers_reused = done.memory.reused,
                "task completed"
            );
            true
        }
        Err(status) if status.code() == Code::FailedPrecondition => {
            warn!(
                key = %done.key,
                "coordinator refused the result, the lease is stale: {}",
                status.message()
            );
            false
        }
        Err(status) => {
            error!(
                code = ?status.code(),
                key = %done.key,
                "could not report the finished task (its lease will expire and it will run again): {}",
                status.message()
            );
            false
        }
    }
}

async fn fail(
    client: &WorkerServiceClient<AuthChannel>,
    lease: &TaskLease,
    message: String,
    retryable: bool,
) {
    let request = FailTaskRequest {
        job_id: lease.job_id.clone(),
        task_seq: lease.task_seq,
        lease_token: lease.lease_token.clone(),
        error: message,
        retryable,
    };
    let result = with_retries("FailTask", || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.fail_task(request).await }
    })
    .await;
    match result {
        Ok(_) => {}
        Err(status) if status.code() == Code::FailedPrecondition => warn!(
            "coordinator refused the failure report, the lease is stale: {}",
            status.message()
        ),
        Err(status) => error!(
            code = ?status.code(),
            "could not report the failure (its lease will expire): {}",
            status.message()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardpress_engine::codec::TransformError;

    fn progress() -> TaskProgress {
        TaskProgress::new(Arc::new(AtomicBool::new(false)))
    }

    fn retryable(o: Outcome) -> Option<bool> {
        match o {
            Outcome::Failed { retryable, .. } => Some(retryable),
            _ => None,
        }
    }

    #[test]
    fn read_errors_are_retryable_and_name_the_range() {
        let e = CompressError::Read {
            file: "s3://b/m/model.safetensors".into(),
            tensor: "w".into(),
            start: 8,
            end: 16,
            source: std::io::Error::other("connection reset"),
        };
        let o = classify(e, &progress());
        match &o {
            Outcome::Failed { message, .. } => {
                assert!(message.contains("s3://b/m/model.safetensors"), "{message}");
                assert!(message.contains("bytes 8..16"), "{message}");
                assert!(message.contains("connection reset"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(retryable(o), Some(true));
    }

    #[test]
    fn transform_and_spec_errors_are_fatal() {
        let t = CompressError::Transform {
            file: "m.safetensors".into(),
            source: TransformError {
                tensor: "w".into(),
                problem: "non-finite".into(),
            },
        };
        assert_eq!(retryable(classify(t, &progress())), Some(false));
        let w = CompressError::Write {
            file: "out".into(),
            source: WriteError::Spec {
                name: "w".into(),
                problem: "bad".into(),
            },
        };
        assert_eq!(retryable(classify(w, &progress())), Some(false));
        let io = CompressError::Write {
            file: "out".into(),
            source: WriteError::Io(std::io::Error::other("reset")),
        };
        assert_eq!(retryable(classify(io, &progress())), Some(true));
    }

    #[test]
    fn cancelled_is_dropped_not_reported() {
        let p = progress();
        p.revoke();
        assert!(p.cancelled());
        assert!(matches!(
            classify(CompressError::Cancelled, &p),
            Outcome::Dropped(_)
        ));
    }

    #[test]
    fn heartbeat_period_is_a_third_of_the_lease() {
        assert_eq!(heartbeat_period(30), Duration::from_secs(10));
        assert_eq!(heartbeat_period(0), Duration::from_secs(1) / 3);
    }

    #[test]
    fn abandon_flag_cancels_every_task() {
        let flag = Arc::new(AtomicBool::new(false));
        let p = TaskProgress::new(flag.clone());
        assert!(!p.cancelled());
        flag.store(true, Ordering::SeqCst);
        assert!(p.cancelled());
        assert_eq!(p.reason(), "the worker is shutting down");
    }
}
