//! `shardpress worker`: run a worker process of the service.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use shardpress_proto::auth::{ClientTls, Token};
use shardpress_worker::{default_worker_id, WorkerConfig};

use crate::service::{runtime, shutdown_signal, S3Args, DEFAULT_COORDINATOR};
use crate::size::parse_size;

/// Run a worker of the service.
///
/// Leases compression tasks from the coordinator, reads the inputs from S3 and writes the
/// output shards back. Runs until SIGTERM or Ctrl-C, then lets running tasks finish for up to
/// --shutdown-grace seconds; a second signal exits at once.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Coordinator gRPC endpoint.
    #[arg(long, env = "SHARDPRESS_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,

    /// Tasks run at once.
    #[arg(long, env = "SHARDPRESS_CONCURRENCY", default_value_t = shardpress_worker::DEFAULT_CONCURRENCY)]
    concurrency: usize,

    /// Memory budget for tensor buffers and uploads, shared by all running tasks, e.g. 512MiB
    /// or 4GiB (default: no limit). Tasks wait for memory rather than exceed it; tensors
    /// larger than the budget are read and written in row blocks. A task needs at least
    /// 24 MiB for its upload besides its tensors. Allow about 64 MiB more for the process.
    #[arg(long, env = "SHARDPRESS_MEMORY_LIMIT", value_parser = parse_size)]
    memory_limit: Option<u64>,

    /// Name to lease under [default: hostname-pid-random].
    #[arg(long, env = "SHARDPRESS_WORKER_ID")]
    worker_id: Option<String>,

    /// Seconds between lease requests while there is no work (jittered).
    #[arg(long, env = "SHARDPRESS_POLL_INTERVAL", default_value_t = 2.0)]
    poll_interval: f64,

    /// Seconds running tasks may take to finish after a shutdown signal.
    #[arg(long, env = "SHARDPRESS_SHUTDOWN_GRACE", default_value_t = 60.0)]
    shutdown_grace: f64,

    /// Bearer token the coordinator expects from workers.
    #[arg(long, env = "SHARDPRESS_WORKER_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// File holding the worker token (instead of --token).
    #[arg(long, env = "SHARDPRESS_WORKER_TOKEN_FILE")]
    token_file: Option<PathBuf>,

    /// PEM certificate authority to trust for an https:// coordinator [default: the
    /// system's roots].
    #[arg(long, env = "SHARDPRESS_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Address to serve Prometheus metrics on, at /metrics (default: not served), e.g.
    /// 0.0.0.0:9091.
    #[arg(long, env = "SHARDPRESS_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,

    #[command(flatten)]
    s3: S3Args,
}

fn seconds(flag: &str, value: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{flag} must be a number of seconds >= 0, got {value}"))
}

/// The worker configuration the arguments describe.
fn config(args: Args) -> Result<WorkerConfig> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    if let Some(limit) = args.memory_limit {
        anyhow::ensure!(limit > 0, "--memory-limit must be more than 0 bytes");
    }
    let worker_id = match args.worker_id {
        Some(id) if id.trim().is_empty() => anyhow::bail!("--worker-id must not be empty"),
        Some(id) => id,
        None => default_worker_id(),
    };
    let mut config = WorkerConfig::new(args.coordinator, args.s3.settings());
    config.worker_id = worker_id;
    config.concurrency = args.concurrency;
    config.memory_limit = args.memory_limit;
    config.poll_interval = seconds("--poll-interval", args.poll_interval)?;
    config.shutdown_grace = seconds("--shutdown-grace", args.shutdown_grace)?;
    config.token = Token::load(
        args.token.as_deref(),
        args.token_file.as_deref(),
        "the worker token",
    )?;
    config.tls = ClientTls { ca: args.tls_ca };
    config.metrics_listen = args.metrics_listen;
    Ok(config)
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let config = config(args)?;
    let grace = config.shutdown_grace;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let shutdown = shutdown_signal("worker");
        shardpress_worker::run(config, shutdown).await
    });
    // Engine work on blocking threads stops at its next tensor once abandoned; do not wait
    // for it longer than that could reasonably take.
    rt.shutdown_timeout(grace.min(Duration::from_secs(10)));
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<WorkerConfig> {
        let mut all = vec!["worker"];
        all.extend_from_slice(argv);
        config(Cli::try_parse_from(all)?.args)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).expect("config");
        assert_eq!(c.coordinator, DEFAULT_COORDINATOR);
        assert_eq!(c.concurrency, 2);
        assert_eq!(c.memory_limit, None);
        assert!(c.worker_id.contains(&std::process::id().to_string()));
        assert_eq!(c.shutdown_grace, Duration::from_secs(60));
        assert!(!c.s3.path_style);
        assert_eq!(c.s3.read_timeout, None);
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--coordinator",
            "http://c:1",
            "--concurrency",
            "4",
            "--memory-limit",
            "4GiB",
            "--worker-id",
            "w1",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--s3-path-style",
            "--s3-region",
            "eu-west-1",
            "--poll-interval",
            "0.5",
            "--s3-read-timeout",
            "5",
        ])
        .expect("config");
        assert_eq!(c.coordinator, "http://c:1");
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.memory_limit, Some(4 << 30));
        assert_eq!(c.worker_id, "w1");
        assert_eq!(c.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.s3.path_style);
        assert_eq!(c.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.poll_interval, Duration::from_millis(500));
        assert_eq!(c.s3.read_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--memory-limit", "lots"]).is_err());
        assert!(parse(&["--memory-limit", "0"]).is_err());
        assert!(parse(&["--concurrency", "0"]).is_err());
        assert!(parse(&["--worker-id", " "]).is_err());
        assert!(parse(&["--shutdown-grace", "-1"]).is_err());
        assert!(parse(&["--s3-read-timeout", "0"]).is_err());
    }
}
