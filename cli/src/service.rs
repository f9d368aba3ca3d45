//! What the service commands share: the coordinator connection, the async runtime, gRPC error
//! messages, signal handling and the text and JSON forms of a job.

use std::future::Future;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use shardpress_proto::auth::{endpoint, AuthChannel, Bearer, ClientTls, Token};
use shardpress_proto::v1::job_service_client::JobServiceClient;
use shardpress_proto::v1::{Job, JobState};

use crate::size::human;

/// Where the coordinator listens unless told otherwise.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// Options of every command that talks to the job service.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Coordinator gRPC endpoint.
    #[arg(long, env = "SHARDPRESS_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,

    /// Output format on stdout.
    #[arg(long, env = "SHARDPRESS_OUTPUT", value_enum, default_value = "text")]
    pub output: OutputFormat,

    #[command(flatten)]
    pub auth: AuthArgs,
}

/// Credentials and TLS trust for talking to the coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Bearer token the coordinator expects from clients.
    #[arg(long, env = "SHARDPRESS_CLIENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// File holding the token (instead of --token).
    #[arg(long, env = "SHARDPRESS_CLIENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM certificate authority to trust for an https:// coordinator [default: the
    /// system's roots].
    #[arg(long, env = "SHARDPRESS_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// Output format of the client commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Lines for people.
    Text,
    /// JSON for programs.
    Json,
}

/// Object store options shared by the worker and the coordinator.
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// S3 endpoint URL, for S3-compatible stores (MinIO, Ceph, ...); default: AWS.
    #[arg(long, env = "SHARDPRESS_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// Address buckets as endpoint/bucket/key instead of bucket.endpoint/key.
    #[arg(
        long,
        env = "SHARDPRESS_S3_PATH_STYLE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub s3_path_style: bool,

    /// S3 region; default: from the AWS environment and config files.
    #[arg(long, env = "SHARDPRESS_S3_REGION")]
    pub s3_region: Option<String>,

    /// Seconds an S3 request may wait for the first byte of its response, and a response
    /// body for its next piece, before the attempt is retried [default: 60].
    #[arg(
        long,
        env = "SHARDPRESS_S3_READ_TIMEOUT",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub s3_read_timeout: Option<u64>,
}

impl S3Args {
    /// The storage settings these options describe.
    pub fn settings(&self) -> shardpress_storage::S3Settings {
        shardpress_storage::S3Settings {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            path_style: self.s3_path_style,
            read_timeout: self.s3_read_timeout.map(std::time::Duration::from_secs),
            ..shardpress_storage::S3Settings::default()
        }
    }
}

/// A multi-threaded tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The job service client the commands use.
pub type JobClient = JobServiceClient<AuthChannel>;

/// Connects to the coordinator's job service with the token and TLS trust of `args`.
pub async fn job_client(args: &ClientArgs) -> Result<JobClient> {
    let url = &args.coordinator;
    let token = Token::load(
        args.auth.token.as_deref(),
        args.auth.token_file.as_deref(),
        "the client token",
    )?;
    let tls = ClientTls {
        ca: args.auth.tls_ca.clone(),
    };
    let channel = endpoint(url, &tls)?
        .connect()
        .await
        .map_err(|e| anyhow!("cannot connect to coordinator at {url}: {}", chain(&e)))?;
    Ok(JobServiceClient::with_interceptor(
        channel,
        Bearer::new(token),
    ))
}

/// A failed RPC as one line: the status message and its code.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let message = status.message().trim();
    if message.is_empty() {
        anyhow!("{:?}", status.code())
    } else {
        anyhow!("{} ({:?})", message.replace('\n', " "), status.code())
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
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

/// Resolves at the first SIGTERM or Ctrl-C; a second one exits the process at once.
/// Must be called inside a tokio runtime.
pub fn shutdown_signal(what: &'static str) -> impl Future<Output = ()> + Send + 'static {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        next_signal().await;
        tracing::warn!("{what}: shutting down (send the signal again to exit at once)");
        let _ = tx.send(());
        next_signal().await;
        tracing::warn!("{what}: second signal, exiting now");
        std::process::exit(130);
    });
    async move {
        // A dropped sender (the signal task ended) also counts as shutdown.
        let _ = rx.await;
    }
}

/// The next Ctrl-C or SIGTERM.
async fn next_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// The job's state, decoded.
pub fn state_of(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// `running`, `succeeded`, ...
pub fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Finalizing => "finalizing",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// Whether a job in this state will not change again.
pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled
    )
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        json!(s)
    }
}

/// The job as a JSON object; absent timestamps and error are `null`.
pub fn job_json(job: &Job) -> Value {
    let tasks = job.tasks.unwrap_or_default();
    let mut labels: Vec<(&String, &String)> = job.labels.iter().collect();
    labels.sort();
    json!({
        "job_id": job.job_id,
        "state": state_name(state_of(job)),
        "source_uri": job.source_uri,
        "destination_uri": job.destination_uri,
        "recipe_name": job.recipe_name,
        "labels": labels.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "progress": job.progress,
        "tasks_total": job.tasks_total,
        "tasks": {
            "queued": tasks.queued,
            "leased": tasks.leased,
            "succeeded": tasks.succeeded,
            "failed": tasks.failed,
            "cancelled": tasks.cancelled,
        },
        "bytes_in": job.bytes_in,
        "bytes_out": job.bytes_out,
        "ratio": job.ratio,
        "error": non_empty(&job.error),
        "created_at": non_empty(&job.created_at),
        "started_at": non_empty(&job.started_at),
        "finished_at": non_empty(&job.finished_at),
        "idempotency_key": job.idempotency_key,
        "memory": {
            "largest_reservation_bytes": job.memory_reserved_bytes,
            "peak_task_bytes": job.memory_peak_bytes,
            "wait_ms": job.memory_wait_ms,
            "reuse_rate": job.memory_reuse_rate,
        },
    })
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The job as aligned `field  value` lines.
pub fn job_text(job: &Job) -> String {
    let tasks = job.tasks.unwrap_or_default();
    let mut lines = vec![
        format!("job          {}", job.job_id),
        format!("state        {}", state_name(state_of(job))),
        format!("recipe       {}", or_dash(&job.recipe_name)),
        format!("source       {}", job.source_uri),
        format!("destination  {}", job.destination_uri),
        format!(
            "progress     {:.1}%  ({} of {} tasks succeeded)",
            job.progress * 100.0,
            tasks.succeeded,
            job.tasks_total
        ),
        format!(
            "tasks        queued {}  leased {}  succeeded {}  failed {}  cancelled {}",
            tasks.queued, tasks.leased, tasks.succeeded, tasks.failed, tasks.cancelled
        ),
        format!(
            "bytes        in {}  out {}  ratio {}",
            human(job.bytes_in),
            human(job.bytes_out),
            ratio_text(job.ratio)
        ),
    ];
    if job.memory_reserved_bytes > 0 {
        lines.push(format!(
            "memory       peak {} per task (largest reservation {})  waited {:.1}s  {:.0}% of buffers reused",
            human(job.memory_peak_bytes),
            human(job.memory_reserved_bytes),
            job.memory_wait_ms as f64 / 1000.0,
            job.memory_reuse_rate * 100.0
        ));
    }
    if !job.labels.is_empty() {
        let mut labels: Vec<String> = job.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        lines.push(format!("labels       {}", labels.join(" ")));
    }
    lines.push(format!("created      {}", or_dash(&job.created_at)));
    lines.push(format!("started      {}", or_dash(&job.started_at)));
    lines.push(format!("finished     {}", or_dash(&job.finished_at)));
    if !job.error.is_empty() {
        lines.push(format!("error        {}", job.error.replace('\n', " ")));
    }
    lines.join("\n")
}

/// `4.07x`, or `-` before anything was written.
pub fn ratio_text(ratio: f64) -> String {
    if ratio > 0.0 && ratio.is_finite() {
        format!("{ratio:.2}x")
    } else {
        "-".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardpress_proto::v1::TaskCounts;

    fn job() -> Job {
        Job {
            job_id: "j1".into(),
            state: JobState::Running as i32,
            source_uri: "s3://in/m/".into(),
            destination_uri: "s3://out/m/".into(),
            recipe_name: "w8a16".into(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            tasks: Some(TaskCounts {
                queued: 3,
                leased: 2,
                succeeded: 5,
                failed: 1,
                cancelled: 0,
            }),
            tasks_total: 11,
            bytes_in: 90_868_376,
            bytes_out: 22_000_000,
            ratio: 4.13,
            progress: 0.452,
            created_at: "2025-01-01T00:00:00Z".into(),
            ..Default::default()
        }
    }

    #[test]
    fn text_form_shows_state_progress_tasks_and_bytes() {
        let t = job_text(&job());
        assert!(t.contains("state        running"), "{t}");
        assert!(t.contains("45.2%  (5 of 11 tasks succeeded)"), "{t}");
        assert!(
            t.contains("queued 3  leased 2  succeeded 5  failed 1"),
            "{t}"
        );
        assert!(t.contains("in 86.7 MiB"), "{t}");
        assert!(t.contains("ratio 4.13x"), "{t}");
        assert!(t.contains("labels       team=ml"), "{t}");
        assert!(t.contains("finished     -"), "{t}");
        assert!(!t.contains("error"), "{t}");
    }

    #[test]
    fn json_form_names_the_state_and_nulls_absent_fields() {
        let j = job_json(&job());
        assert_eq!(j["state"], "running");
        assert_eq!(j["tasks"]["succeeded"], 5);
        assert_eq!(j["labels"]["team"], "ml");
        assert!(j["finished_at"].is_null());
        assert!(j["error"].is_null());
    }

    #[test]
    fn rpc_errors_are_one_line_with_the_code() {
        let e = rpc_error(tonic::Status::not_found("no job j9\nat all"));
        assert_eq!(e.to_string(), "no job j9 at all (NotFound)");
        assert_eq!(
            rpc_error(tonic::Status::unavailable("")).to_string(),
            "Unavailable"
        );
    }

    #[test]
    fn terminal_states() {
        assert!(is_terminal(JobState::Succeeded));
        assert!(is_terminal(JobState::Cancelled));
        assert!(!is_terminal(JobState::Finalizing));
    }
}
