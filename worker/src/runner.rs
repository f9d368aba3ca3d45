//! The lease loop: keep a connection to the coordinator, lease as many tasks as there are free
//! slots, run each in its own tokio task, and drain them on shutdown.

use anyhow::Context as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardpress_engine::MemoryPool;

use crate::metrics::Metrics;
use shardpress_proto::auth::{endpoint, AuthChannel, Bearer};
use shardpress_proto::v1::worker_service_client::WorkerServiceClient;
use shardpress_proto::v1::LeaseTasksRequest;
use shardpress_storage::{s3_client, ObjectStore};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tonic::transport::Endpoint;
use tracing::{error, info, warn};

use crate::backoff::{jitter, Backoff};
use crate::task::{run_lease, Shared};
use crate::WorkerConfig;

/// Time allowed to open a connection to the coordinator.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a single RPC.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// First and largest delay between attempts to reach an unavailable coordinator.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Runs the worker until `shutdown` resolves, then drains the running tasks (see the crate
/// documentation). Returns an error only for an unusable configuration; a coordinator or
/// object store outage is waited out, and failing tasks are reported to the coordinator.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(config.concurrency >= 1, "concurrency must be at least 1");
    anyhow::ensure!(
        !config.worker_id.trim().is_empty(),
        "worker id must not be empty"
    );
    let endpoint = endpoint(&config.coordinator, &config.tls)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(RPC_TIMEOUT)
        .tcp_keepalive(Some(Duration::from_secs(30)));
    // Captures this runtime: the blocking storage adapters run their requests on it.
    let store = ObjectStore::new(s3_client(&config.s3).await);
    info!(
        worker_id = %config.worker_id,
        coordinator = %config.coordinator,
        concurrency = config.concurrency,
        memory_limit = ?config.memory_limit,
        "worker starting"
    );
    let (metrics, registry) = Metrics::new();
    let shared = Arc::new(Shared {
        store,
        abandon: Arc::new(AtomicBool::new(false)),
        memory: MemoryPool::new(config.memory_limit),
        metrics,
    });
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            info!(addr = %listener.local_addr()?, "metrics at /metrics");
            let sampled = shared.clone();
            let sampler = tokio::spawn(async move {
                let mut ticks = tokio::time::interval(Duration::from_secs(1));
                loop {
                    ticks.tick().await;
                    sampled.metrics.sample_pool(&sampled.memory);
                }
            });
            let server = tokio::spawn(shardpress_proto::metrics::serve(
                listener,
                Arc::new(registry),
            ));
            Some((server, sampler))
        }
        None => None,
    };
    let mut leaser = Leaser {
        endpoint,
        client: None,
        backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
        slots: Arc::new(Semaphore::new(config.concurrency)),
        shared: shared.clone(),
        config,
    };
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            () = leaser.cycle(&mut tasks) => {}
        }
    }
    drain(&mut tasks, leaser.config.shutdown_grace, &shared.abandon).await;
    if let Some((server, sampler)) = metrics_server {
        server.abort();
        sampler.abort();
    }
    info!("worker stopped");
    Ok(())
}

/// The state of the lease loop.
struct Leaser {
    config: WorkerConfig,
    endpoint: Endpoint,
    /// The current connection; `None` after a failure that calls for reconnecting.
    client: Option<WorkerServiceClient<AuthChannel>>,
    backoff: Backoff,
    /// One permit per task slot; a running task holds one.
    slots: Arc<Semaphore>,
    shared: Arc<Shared>,
}

impl Leaser {
    /// One round: wait for a free slot, lease up to the number of free slots, start the
    /// leased tasks; after an empty answer wait the poll interval, after an error back off.
    /// Cancel-safe: dropping it mid-way loses at most leases granted in an unanswered call,
    /// which then expire.
    async fn cycle(&mut self, tasks: &mut JoinSet<()>) {
        while let Some(done) = tasks.try_join_next() {
            log_task_end(done);
        }
        let Ok(first) = self.slots.clone().acquire_owned().await else {
            // The semaphore is never closed; nothing sensible to do but wait.
            tokio::time::sleep(self.config.poll_interval).await;
            return;
        };
        let mut permits = vec![first];
        while let Ok(p) = self.slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let mut client = self.connected().await;
        let request = LeaseTasksRequest {
            worker_id: self.config.worker_id.clone(),
            max_tasks: u32::try_from(permits.len()).unwrap_or(u32::MAX),
        };
        match client.lease_tasks(request).await {
            Ok(response) => {
                self.backoff.reset();
                let leases = response.into_inner().leases;
                if leases.is_empty() {
                    drop(permits);
                    tokio::time::sleep(jitter(self.config.poll_interval, 0.2)).await;
                    return;
                }
                if leases.len() > permits.len() {
                    warn!(
                        granted = leases.len(),
                        asked = permits.len(),
                        "coordinator granted more tasks than asked for; the extra leases will expire"
                    );
                }
                for (lease, permit) in leases.into_iter().zip(permits) {
                    info!(
                        job = %lease.job_id,
                        task = lease.task_seq,
                        attempt = lease.attempt,
                        "leased task"
                    );
                    tasks.spawn(run_lease(
                        self.shared.clone(),
                        client.clone(),
                        lease,
                        permit,
                    ));
                }
            }
            Err(status) => {
                drop(permits);
                let delay = self.backoff.next_delay();
                if status.code() == tonic::Code::Unauthenticated {
                    // Keeps trying: the coordinator's token may be rotated to ours.
                    error!(
                        "the coordinator refused this worker's credentials: {}; check \
                         --token / SHARDPRESS_WORKER_TOKEN; retrying in {:.1}s",
                        status.message(),
                        delay.as_secs_f64()
                    );
                } else {
                    warn!(
                        code = ?status.code(),
                        "LeaseTasks failed: {}; retrying in {:.1}s",
                        status.message(),
                        delay.as_secs_f64()
                    );
                }
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                ) {
                    // Start from a fresh connection next round.
                    self.client = None;
                }
                tokio::time::sleep(delay).await;
            }
        }
    }

    /// The current client, connecting first (and retrying forever) when there is none.
    async fn connected(&mut self) -> WorkerServiceClient<AuthChannel> {
        loop {
            if let Some(c) = &self.client {
                return c.clone();
            }
            match self.endpoint.connect().await {
                Ok(channel) => {
                    if self.backoff.failures() > 0 {
                        info!(coordinator = %self.config.coordinator, "connected to coordinator");
                    }
                    self.backoff.reset();
                    self.client = Some(WorkerServiceClient::with_interceptor(
                        channel,
                        Bearer::new(self.config.token.clone()),
                    ));
                }
                Err(e) => {
                    let delay = self.backoff.next_delay();
                    warn!(
                        coordinator = %self.config.coordinator,
                        "cannot reach coordinator: {}; retrying in {:.1}s",
                        error_chain(&e),
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// Waits up to `grace` for the running tasks; then tells the rest to stop at the next tensor
/// and drops them without reporting (their leases expire).
async fn drain(tasks: &mut JoinSet<()>, grace: Duration, abandon: &AtomicBool) {
    if tasks.is_empty() {
        return;
    }
    info!(
        running = tasks.len(),
        "shutting down: no new leases; waiting up to {}s for running tasks",
        grace.as_secs_f64()
    );
    let all_done = tokio::time::timeout(grace, async {
        while let Some(done) = tasks.join_next().await {
            log_task_end(done);
        }
    })
    .await;
    if all_done.is_err() {
        warn!(
            abandoned = tasks.len(),
            "grace period over; abandoning running tasks (their leases will expire)"
        );
        abandon.store(true, Ordering::SeqCst);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Logs a task future that panicked; a task's own outcome is logged by the task.
fn log_task_end(result: Result<(), JoinError>) {
    if let Err(e) = result {
        if e.is_panic() {
            error!("a task panicked outside the engine; its lease will expire: {e}");
        }
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
