//! `shardpress cancel`: stop a job.

use anyhow::Result;
use shardpress_proto::v1::CancelJobRequest;

use crate::service::{
    job_client, job_json, rpc_error, runtime, state_name, state_of, ClientArgs, OutputFormat,
};

/// Cancel a job.
///
/// Queued tasks are dropped and running ones stop at their next heartbeat; a job that already
/// ended is left as it is. Prints the job's state afterwards.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Job id.
    job_id: String,

    #[command(flatten)]
    client: ClientArgs,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let job = runtime()?.block_on(async {
        let mut client = job_client(&args.client).await?;
        client
            .cancel_job(CancelJobRequest {
                job_id: args.job_id.clone(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(rpc_error)
    })?;
    match args.client.output {
        OutputFormat::Text => println!("{} {}", job.job_id, state_name(state_of(&job))),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&job_json(&job))?),
    }
    Ok(())
}
