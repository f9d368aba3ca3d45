//! `shardpress status`: show one job.

use anyhow::Result;
use shardpress_proto::v1::GetJobRequest;

use crate::service::{
    job_client, job_json, job_text, rpc_error, runtime, ClientArgs, OutputFormat,
};

/// Show a job.
///
/// State, progress, tasks by state, bytes in and out, ratio, error and timestamps.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job id, as printed by `shardpress submit`.
    job_id: String,

    #[command(flatten)]
    client: ClientArgs,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let job = runtime()?.block_on(async {
        let mut client = job_client(&args.client).await?;
        client
            .get_job(GetJobRequest {
                job_id: args.job_id.clone(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(rpc_error)
    })?;
    match args.client.output {
        OutputFormat::Text => println!("{}", job_text(&job)),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&job_json(&job))?),
    }
    Ok(())
}
