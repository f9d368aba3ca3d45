//! `shardpress inspect`: validate a checkpoint from its headers and show the plan.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shardpress_engine::pipeline::{describe, plan_job};
use shardpress_engine::recipe::TensorAction;
use shardpress_engine::{Checkpoint, Recipe};

use crate::size::human;

/// Read only the headers of a checkpoint, validate them, and show how a recipe would treat
/// each tensor and which output shard it lands in. Nothing is written.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory or single .safetensors file.
    input: PathBuf,
    /// Recipe to plan with (preset name or TOML file).
    #[arg(long, short, env = "SHARDPRESS_RECIPE", default_value = "w8a16")]
    recipe: String,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let recipe = Recipe::load(&args.recipe)?;
    let ckpt = Checkpoint::open_local(&args.input)?;
    let plan = plan_job(&ckpt, &recipe).context("planning")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: {} shard(s), {} tensors, {} of tensor data; {} output shard(s) with recipe {}",
        args.input.display(),
        ckpt.shards.len(),
        ckpt.tensors.len(),
        human(ckpt.tensor_bytes()),
        plan.tasks.len(),
        recipe.name
    )?;
    for g in &plan.tasks {
        writeln!(out, "{}  [{}]  {}", g.file_name, g.key, human(g.bytes_in()))?;
        for t in &g.tensors {
            let (kind, detail) = describe(&t.action);
            let action = match &t.action {
                TensorAction::Keep(_) => format!("keep ({detail})"),
                TensorAction::Cast(_) => format!("cast to {detail}"),
                _ => format!("{kind} {detail}"),
            };
            let to = t.out_info();
            let renamed = if to.name != t.info.name || to.shape != t.info.shape {
                format!("  -> {} {:?}", to.name, to.shape)
            } else {
                String::new()
            };
            writeln!(
                out,
                "    {:<60} {:<5} {:<16} {}{}",
                t.info.name,
                t.info.dtype.to_string(),
                format!("{:?}", t.info.shape),
                action,
                renamed
            )?;
        }
    }
    if !ckpt.skipped_files.is_empty() {
        writeln!(out, "not carried over: {}", ckpt.skipped_files.join(", "))?;
    }
    Ok(())
}
