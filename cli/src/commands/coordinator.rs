//! `shardpress coordinator`: run the coordinator of the service.

use std::net::SocketAddr;

use anyhow::Result;
use shardpress_coordinator::CoordinatorConfig;

use crate::service::{runtime, shutdown_signal, S3Args};

/// Run the coordinator of the service.
///
/// Serves the job API for clients and task leasing for workers, plans and finalizes jobs,
/// with Postgres as the job store. Runs until SIGTERM or Ctrl-C; a second signal exits at
/// once.
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
    let config = CoordinatorConfig {
        listen: args.listen,
        database_url: args.database_url,
        s3: args.s3.settings(),
        lease_seconds: args.lease_seconds,
        max_attempts: args.max_attempts,
    };
    runtime()?.block_on(async {
        let shutdown = shutdown_signal("coordinator");
        shardpress_coordinator::run(config, shutdown).await
    })
}
