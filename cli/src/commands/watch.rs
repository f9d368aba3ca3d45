//! `shardpress watch`: follow a job until it ends.

use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use shardpress_proto::v1::{Job, JobState, WatchJobRequest};
use tonic::Code;

use crate::service::{
    is_terminal, job_client, job_json, ratio_text, rpc_error, runtime, state_name, state_of,
    ClientArgs, JobClient, OutputFormat,
};
use crate::size::human;

/// Follow a job with a progress bar until it ends.
///
/// Exits 0 when it succeeded and 1 when it failed or was cancelled (printing why). With
/// `--output json`, prints one JSON object per change instead of the bar.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job id.
    job_id: String,

    #[command(flatten)]
    client: ClientArgs,
}

/// Steps of the bar: progress is shown to a tenth of a percent.
const BAR_STEPS: u64 = 1000;
/// How often a broken stream is opened again before giving up.
const MAX_RESUBSCRIBE: u32 = 5;

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let job = runtime()?.block_on(follow(&args))?;
    match state_of(&job) {
        JobState::Succeeded => {
            if args.client.output == OutputFormat::Text {
                println!(
                    "job {} succeeded: {} tasks, {} -> {} ({}), {}",
                    job.job_id,
                    job.tasks_total,
                    human(job.bytes_in),
                    human(job.bytes_out),
                    ratio_text(job.ratio),
                    job.destination_uri
                );
            }
            Ok(())
        }
        JobState::Cancelled => bail!("job {} was cancelled", job.job_id),
        _ if job.error.is_empty() => bail!("job {} failed", job.job_id),
        _ => bail!("job {} failed: {}", job.job_id, job.error),
    }
}

/// Streams the job's events until a terminal state and returns that last state. A stream
/// that breaks (coordinator restart, network) is opened again a few times.
async fn follow(args: &Args) -> Result<Job> {
    let mut client = job_client(&args.client).await?;
    let display = Display::new(args.client.output);
    let mut broken = 0;
    loop {
        match stream_once(&mut client, &args.job_id, &display).await? {
            StreamEnd::Terminal(job) => {
                display.finish();
                return Ok(*job);
            }
            StreamEnd::Broken(why) => {
                broken += 1;
                if broken > MAX_RESUBSCRIBE {
                    display.finish();
                    bail!("lost the job stream {broken} times, last: {why}");
                }
                display.note(&format!("job stream interrupted ({why}); reconnecting"));
                tokio::time::sleep(Duration::from_secs(1 << broken.min(4))).await;
            }
        }
    }
}

/// How one subscription ended.
enum StreamEnd {
    /// The job reached a terminal state.
    Terminal(Box<Job>),
    /// The stream broke before that; why.
    Broken(String),
}

async fn stream_once(client: &mut JobClient, job_id: &str, display: &Display) -> Result<StreamEnd> {
    let request = WatchJobRequest {
        job_id: job_id.to_string(),
    };
    let mut stream = match client.watch_job(request).await {
        Ok(s) => s.into_inner(),
        Err(s) if transient(s.code()) => return Ok(StreamEnd::Broken(rpc_error(s).to_string())),
        Err(s) => return Err(rpc_error(s)),
    };
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                let Some(job) = event.job else { continue };
                display.show(&job, &event.message);
                if is_terminal(state_of(&job)) {
                    return Ok(StreamEnd::Terminal(Box::new(job)));
                }
            }
            Ok(None) => return Ok(StreamEnd::Broken("stream ended early".into())),
            Err(s) if transient(s.code()) => {
                return Ok(StreamEnd::Broken(rpc_error(s).to_string()))
            }
            Err(s) => return Err(rpc_error(s)),
        }
    }
}

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown
    )
}

/// Shows events: a progress bar and state-change lines, or JSON lines.
struct Display {
    format: OutputFormat,
    bar: ProgressBar,
    last_state: std::cell::Cell<JobState>,
}

impl Display {
    fn new(format: OutputFormat) -> Self {
        let bar = match format {
            OutputFormat::Text => ProgressBar::new(BAR_STEPS),
            OutputFormat::Json => ProgressBar::hidden(),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}%  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Self {
            format,
            bar,
            last_state: std::cell::Cell::new(JobState::Unspecified),
        }
    }

    fn show(&self, job: &Job, message: &str) {
        let state = state_of(job);
        if self.format == OutputFormat::Json {
            println!("{}", json!({ "message": message, "job": job_json(job) }));
            return;
        }
        let position = (job.progress.clamp(0.0, 1.0) * BAR_STEPS as f64).round() as u64;
        self.bar.set_position(position);
        let succeeded = job.tasks.map(|t| t.succeeded).unwrap_or(0);
        let mut msg = format!(
            "{}  {succeeded}/{} tasks",
            state_name(state),
            job.tasks_total
        );
        if !message.is_empty() {
            msg.push_str("  ");
            msg.push_str(message);
        }
        self.bar.set_message(msg);
        if self.last_state.replace(state) != state {
            self.note(&format!("{}: {}", job.job_id, state_name(state)));
        }
    }

    /// A line above the bar, or on stderr when there is no bar (not a terminal).
    fn note(&self, line: &str) {
        if self.format == OutputFormat::Json {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
