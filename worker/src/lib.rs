//! Worker: leases tasks from the coordinator and runs the compression engine on them.
//!
//! A worker is stateless. It asks the coordinator's `WorkerService` for as many tasks as it
//! has free slots (`concurrency`), runs each one with [`shardpress_engine::pipeline::run_task`]
//! reading the input objects by byte range and streaming the output shard to a multipart
//! upload, and reports the result with `CompleteTask` or `FailTask`. While a task runs, a
//! heartbeat renews its lease; when the coordinator says the lease is gone (expired, job
//! cancelled) the task stops at the next tensor and its upload is aborted.
//!
//! A coordinator outage never stops the worker: it reconnects with a jittered, capped backoff.
//! When the `shutdown` future passed to [`run`] resolves, the worker stops leasing, lets the
//! running tasks finish for up to [`WorkerConfig::shutdown_grace`], then abandons the rest
//! (their leases expire and the coordinator hands them out again).

mod backoff;
pub mod metrics;
mod runner;
mod task;

use std::time::Duration;

pub use runner::run;
use shardpress_proto::auth::{ClientTls, Token};
pub use shardpress_storage::S3Settings;

/// Tasks run at once unless configured otherwise.
pub const DEFAULT_CONCURRENCY: usize = 2;
/// Pause between lease requests that returned nothing.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long running tasks may take to finish after shutdown is requested.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// URL of the coordinator's gRPC endpoint, e.g. `http://coordinator:50051`.
    pub coordinator: String,
    /// Name this worker leases under; see [`default_worker_id`].
    pub worker_id: String,
    /// Tasks run at once (at least 1).
    pub concurrency: usize,
    /// Memory budget in bytes for every task's buffers (see `shardpress_engine::memory`).
    pub memory_limit: Option<u64>,
    /// Object store access.
    pub s3: S3Settings,
    /// Pause between lease requests that returned nothing (jittered by ±20%).
    pub poll_interval: Duration,
    /// How long running tasks may take to finish after shutdown is requested.
    pub shutdown_grace: Duration,
    /// Bearer token presented to the coordinator's worker API.
    pub token: Option<Token>,
    /// TLS trust for an `https://` coordinator.
    pub tls: ClientTls,
    /// Address of the Prometheus endpoint (`GET /metrics`; none: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl WorkerConfig {
    /// A configuration with the defaults: a fresh worker id, [`DEFAULT_CONCURRENCY`] slots,
    /// no memory limit, [`DEFAULT_POLL_INTERVAL`] and [`DEFAULT_SHUTDOWN_GRACE`].
    pub fn new(coordinator: impl Into<String>, s3: S3Settings) -> Self {
        Self {
            coordinator: coordinator.into(),
            worker_id: default_worker_id(),
            concurrency: DEFAULT_CONCURRENCY,
            memory_limit: None,
            s3,
            poll_interval: DEFAULT_POLL_INTERVAL,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            token: None,
            tls: ClientTls::default(),
            metrics_listen: None,
        }
    }
}

/// `hostname-pid-random`: names the machine and process in the coordinator's records and
/// stays unique when a process restarts with the same pid (e.g. pid 1 in a container).
pub fn default_worker_id() -> String {
    let suffix: u32 = rand::random();
    format!(
        "{}-{}-{:06x}",
        hostname(),
        std::process::id(),
        suffix & 0x00ff_ffff
    )
}

/// The machine's host name, or `worker` when it cannot be found.
fn hostname() -> String {
    let from_file = |path: &str| std::fs::read_to_string(path).ok();
    let raw = from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    // Keep the id printable and free of separators a log parser might trip on.
    let name: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if name.is_empty() {
        "worker".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_worker_id_names_host_and_pid_and_differs_per_call() {
        let a = default_worker_id();
        let b = default_worker_id();
        assert_ne!(a, b, "random suffix");
        let pid = std::process::id().to_string();
        let parts: Vec<&str> = a.rsplitn(3, '-').collect();
        assert_eq!(parts.len(), 3, "{a}");
        assert_eq!(parts[0].len(), 6, "{a}");
        assert!(parts[0].chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_eq!(parts[1], pid, "{a}");
        assert!(!parts[2].is_empty(), "{a}");
        assert_eq!(parts[2], hostname());
    }

    #[test]
    fn config_defaults() {
        let c = WorkerConfig::new("http://127.0.0.1:50051", S3Settings::default());
        assert_eq!(c.concurrency, 2);
        assert_eq!(c.memory_limit, None);
        assert_eq!(c.shutdown_grace, Duration::from_secs(60));
        assert!(c.worker_id.contains(&std::process::id().to_string()));
    }
}
