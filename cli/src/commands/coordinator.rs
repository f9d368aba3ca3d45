//! `shardpress coordinator`: run the coordinator of the service.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use shardpress_coordinator::CoordinatorConfig;
use shardpress_proto::auth::{server_tls, Token};

use crate::service::{runtime, shutdown_signal, S3Args};

/// Run the coordinator of the service.
///
/// Serves the job API for clients and task leasing for workers, plans and finalizes jobs,
/// with Postgres as the job store. Runs until SIGTERM or Ctrl-C; a second signal exits at
/// once.
///
/// Authentication: with --client-token the job API (submit, status, list, watch, cancel)
/// requires `authorization: Bearer <token>`; with --worker-token so does the worker API. The
/// two must differ. TLS: --tls-cert and --tls-key (PEM) serve HTTPS; clients then use an
/// https:// URL.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "SHARDPRESS_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,

    /// Postgres connection URL, e.g. postgres://user:password@host/shardpress.
    #[arg(long, env = "SHARDPRESS_DATABASE_URL", hide_env_values = true)]
    database_url: String,

    /// Seconds a task lease lasts without a heartbeat.
    #[arg(long, env = "SHARDPRESS_LEASE_SECONDS", default_value_t = 60)]
    lease_seconds: u32,

    /// Attempts of a task (retryable failures and expired leases) before its job fails.
    #[arg(long, env = "SHARDPRESS_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,

    /// Token clients must present (16 to 4096 visible ASCII characters).
    #[arg(long, env = "SHARDPRESS_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,

    /// File holding the client token (instead of --client-token).
    #[arg(long, env = "SHARDPRESS_CLIENT_TOKEN_FILE")]
    client_token_file: Option<PathBuf>,

    /// Token workers must present; must differ from the client token.
    #[arg(long, env = "SHARDPRESS_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,

    /// File holding the worker token (instead of --worker-token).
    #[arg(long, env = "SHARDPRESS_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,

    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, env = "SHARDPRESS_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SHARDPRESS_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Address to serve Prometheus metrics on, at /metrics (default: not served), e.g.
    /// 0.0.0.0:9090.
    #[arg(long, env = "SHARDPRESS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    #[command(flatten)]
    s3: S3Args,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.lease_seconds >= 1,
        "--lease-seconds must be at least 1"
    );
    anyhow::ensure!(args.max_attempts >= 1, "--max-attempts must be at least 1");
    let client_token = Token::load(
        args.client_token.as_deref(),
        args.client_token_file.as_deref(),
        "the client token",
    )?;
    let worker_token = Token::load(
        args.worker_token.as_deref(),
        args.worker_token_file.as_deref(),
        "the worker token",
    )?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(server_tls(cert, key)?),
        _ => None,
    };
    let mut config = CoordinatorConfig::new(args.listen, args.database_url, args.s3.settings());
    config.lease_seconds = args.lease_seconds;
    config.max_attempts = args.max_attempts;
    config.client_token = client_token;
    config.worker_token = worker_token;
    config.tls = tls;
    config.metrics_listen = args.metrics_listen;
    runtime()?.block_on(async {
        let shutdown = shutdown_signal("coordinator");
        shardpress_coordinator::run(config, shutdown).await
    })
}
