//! `shardpress`: compress LLM checkpoints locally, and (with the service) submit and watch jobs.

mod commands;
mod service;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Compress large language model checkpoints: prune, quantize and cast safetensors weights
/// into a checkpoint vLLM and Transformers load.
#[derive(Debug, Parser)]
#[command(name = "shardpress", version, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter expression).
    #[arg(long, global = true, env = "SHARDPRESS_LOG", default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Compress(commands::compress::Args),
    Decompress(commands::decompress::Args),
    Recipes(commands::recipes::Args),
    Inspect(commands::inspect::Args),
    Submit(commands::submit::Args),
    Status(commands::status::Args),
    Watch(commands::watch::Args),
    List(commands::list::Args),
    Cancel(commands::cancel::Args),
    Worker(commands::worker::Args),
    Coordinator(commands::coordinator::Args),
    Bench(commands::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Compress(a) => commands::compress::run(a),
        Command::Decompress(a) => commands::decompress::run(a),
        Command::Recipes(a) => commands::recipes::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Submit(a) => commands::submit::run(a),
        Command::Status(a) => commands::status::run(a),
        Command::Watch(a) => commands::watch::run(a),
        Command::List(a) => commands::list::run(a),
        Command::Cancel(a) => commands::cancel::run(a),
        Command::Worker(a) => commands::worker::run(a),
        Command::Coordinator(a) => commands::coordinator::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): nothing more to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, without repeating a cause already in the message.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out.replace('\n', " ")
}
