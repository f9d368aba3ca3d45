//! Shardpress coordinator: the job API, planner, task leasing and finalizer, and the only
//! database client. Stateless apart from Postgres, so several replicas can serve one database.

mod convert;
pub mod db;
mod error;
mod finalizer;
mod job_service;
pub mod metrics;
mod planner;
mod worker_service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;

use shardpress_proto::auth::{RequireToken, Token};
use shardpress_proto::v1::job_service_server::JobServiceServer;
use shardpress_proto::v1::worker_service_server::WorkerServiceServer;
use shardpress_proto::v1::FILE_DESCRIPTOR_SET;
use shardpress_storage::{s3_client, ObjectStore, S3Settings};

pub use job_service::Jobs;
pub use worker_service::Workers;

/// Largest request accepted (a task completion carries per-tensor rows).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// Postgres URL.
    pub database_url: String,
    /// Object store access.
    pub s3: S3Settings,
    /// Seconds a lease lasts without a heartbeat.
    pub lease_seconds: u32,
    /// Attempts per task before the job fails.
    pub max_attempts: u32,
    /// Token the job API requires from clients (none: open).
    pub client_token: Option<Token>,
    /// Token the worker API requires from workers (none: open).
    pub worker_token: Option<Token>,
    /// TLS identity to serve with (none: plain HTTP/2).
    pub tls: Option<ServerTlsConfig>,
    /// Address of the Prometheus endpoint (`GET /metrics`; none: not served).
    pub metrics_listen: Option<SocketAddr>,
}

impl CoordinatorConfig {
    /// Settings with the default lease (60 s) and attempts (3), no tokens and no TLS.
    pub fn new(listen: SocketAddr, database_url: String, s3: S3Settings) -> Self {
        Self {
            listen,
            database_url,
            s3,
            lease_seconds: 60,
            max_attempts: 3,
            client_token: None,
            worker_token: None,
            tls: None,
            metrics_listen: None,
        }
    }
}

/// What the services share.
#[derive(Debug)]
pub struct Ctx {
    /// Job store.
    pub store: db::Store,
    /// Object store.
    pub objects: ObjectStore,
    /// Lease length.
    pub lease_seconds: u32,
    /// Attempts per task.
    pub max_attempts: u32,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
}

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    serve(listener, config, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let pool = db::connect(&config.database_url).await?;
    let client = s3_client(&config.s3).await;
    let objects = ObjectStore::new(client);
    anyhow::ensure!(
        config.lease_seconds >= 1,
        "--lease-seconds must be at least 1"
    );
    anyhow::ensure!(
        config.max_attempts >= 1,
        "--max-attempts must be at least 1"
    );
    if let (Some(c), Some(w)) = (&config.client_token, &config.worker_token) {
        anyhow::ensure!(
            !c.same_as(w),
            "the client and worker tokens must differ: a client could otherwise act as a worker"
        );
    }
    let (metrics, registry) = metrics::Metrics::new();
    let ctx = Arc::new(Ctx {
        store: db::Store::new(pool),
        objects,
        lease_seconds: config.lease_seconds,
        max_attempts: config.max_attempts,
        metrics,
    });
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
            Some(tokio::spawn(shardpress_proto::metrics::serve(
                listener,
                Arc::new(registry),
            )))
        }
        None => None,
    };

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<JobServiceServer<Jobs>>()
        .await;
    health_reporter
        .set_serving::<WorkerServiceServer<Workers>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection service")?;

    let sweeper = tokio::spawn(sweep(ctx.clone(), sweep_interval(config.lease_seconds)));
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && (config.client_token.is_none() || config.worker_token.is_none())
    {
        tracing::warn!(
            %addr,
            "serving beyond loopback without client and worker tokens: anyone who can reach \
             this address can submit jobs or lease tasks"
        );
    }
    tracing::info!(
        %addr,
        tls = config.tls.is_some(),
        client_auth = config.client_token.is_some(),
        worker_auth = config.worker_token.is_some(),
        "coordinator serving"
    );
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = config.tls {
        server = server.tls_config(tls).context("setting up TLS")?;
    }
    let result = server
        .add_service(health)
        .add_service(reflection)
        .add_service(InterceptedService::new(
            JobServiceServer::new(Jobs::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            RequireToken::new(config.client_token, "client"),
        ))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(Workers::new(ctx.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            RequireToken::new(config.worker_token, "worker"),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    sweeper.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    result.context("serving gRPC")
}

fn sweep_interval(lease_seconds: u32) -> Duration {
    Duration::from_millis((u64::from(lease_seconds) * 1000 / 4).clamp(200, 5000))
}

/// Periodically requeues expired leases and finalizes finished jobs. Every step is a fenced
/// database update, so replicas running it at once do not conflict.
async fn sweep(ctx: Arc<Ctx>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match ctx.store.expire_leases().await {
            Ok(0) => {}
            Ok(n) => {
                ctx.metrics.lease_expiries.inc_by(n as u64);
                tracing::info!(expired = n, "requeued expired leases");
            }
            Err(e) => tracing::warn!(error = %e, "expiring leases"),
        }
        match ctx.store.finalizable().await {
            Ok(jobs) => {
                for job in jobs {
                    finalizer::finalize(&ctx, job).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing finalizable jobs"),
        }
        match ctx.store.state_counts().await {
            Ok((jobs, tasks)) => ctx.metrics.set_states(&jobs, &tasks),
            Err(e) => tracing::debug!(error = %e, "counting jobs and tasks for metrics"),
        }
    }
}
