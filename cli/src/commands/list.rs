//! `shardpress list`: list jobs, newest first, a page at a time.

use anyhow::Result;
use serde_json::json;
use shardpress_proto::v1::{Job, JobState, ListJobsRequest};

use crate::service::{
    job_client, job_json, rpc_error, runtime, state_name, state_of, ClientArgs, OutputFormat,
};

/// List jobs, newest first.
///
/// Optionally only those in some states. Shows one page; the token of the next page is
/// printed at the end (`--page-token` fetches it), or `--all` fetches every page.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only jobs in this state; repeat for several.
    #[arg(
        long = "state",
        value_enum,
        env = "SHARDPRESS_STATES",
        value_delimiter = ','
    )]
    states: Vec<StateArg>,

    /// Jobs per page.
    #[arg(long, env = "SHARDPRESS_PAGE_SIZE", default_value_t = 50)]
    page_size: u32,

    /// Continue from the page this token names (printed by the previous page).
    #[arg(long, env = "SHARDPRESS_PAGE_TOKEN")]
    page_token: Option<String>,

    /// Fetch every page.
    #[arg(
        long,
        env = "SHARDPRESS_LIST_ALL",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    all: bool,

    #[command(flatten)]
    client: ClientArgs,
}

/// A job state as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StateArg {
    Queued,
    Running,
    Finalizing,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for JobState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Queued => JobState::Queued,
            StateArg::Running => JobState::Running,
            StateArg::Finalizing => JobState::Finalizing,
            StateArg::Succeeded => JobState::Succeeded,
            StateArg::Failed => JobState::Failed,
            StateArg::Cancelled => JobState::Cancelled,
        }
    }
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.page_size >= 1, "--page-size must be at least 1");
    let states: Vec<i32> = args
        .states
        .iter()
        .map(|s| JobState::from(*s) as i32)
        .collect();
    let (jobs, next) = runtime()?.block_on(async {
        let mut client = job_client(&args.client).await?;
        let mut jobs = Vec::new();
        let mut token = args.page_token.clone().unwrap_or_default();
        loop {
            let page = client
                .list_jobs(ListJobsRequest {
                    states: states.clone(),
                    page_size: args.page_size,
                    page_token: token,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            jobs.extend(page.jobs);
            token = page.next_page_token;
            if !args.all || token.is_empty() {
                return anyhow::Ok((jobs, token));
            }
        }
    })?;
    match args.client.output {
        OutputFormat::Text => {
            print_table(&jobs);
            if !next.is_empty() {
                println!("more: shardpress list --page-token {next}");
            }
        }
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "jobs": jobs.iter().map(job_json).collect::<Vec<_>>(),
                "next_page_token": if next.is_empty() { None } else { Some(next) },
            }))?
        ),
    }
    Ok(())
}

fn print_table(jobs: &[Job]) {
    if jobs.is_empty() {
        println!("no jobs");
        return;
    }
    println!(
        "{:<36}  {:<10}  {:>6}  {:>9}  {:<12}  CREATED",
        "JOB", "STATE", "DONE", "TASKS", "RECIPE"
    );
    for j in jobs {
        let succeeded = j.tasks.map(|t| t.succeeded).unwrap_or(0);
        println!(
            "{:<36}  {:<10}  {:>5.1}%  {:>9}  {:<12}  {}",
            j.job_id,
            state_name(state_of(j)),
            j.progress * 100.0,
            format!("{succeeded}/{}", j.tasks_total),
            j.recipe_name,
            if j.created_at.is_empty() {
                "-"
            } else {
                &j.created_at
            }
        );
    }
}
