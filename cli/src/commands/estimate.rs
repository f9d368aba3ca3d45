//! `shardpress estimate`: predicted output size of one or more recipes, from headers only.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shardpress_engine::estimate::{estimate_plan, SizeEstimate};
use shardpress_engine::pipeline::plan_job;
use shardpress_engine::{Checkpoint, Recipe};

use crate::size::human;

/// Predict, from the headers alone, what each recipe would write: output tensor bytes,
/// compression ratio and bits per weight, per layer group and in total. Quantized, packed,
/// cast and pruned (bitmask) formats all have sizes fixed by shapes and the recipe, so the
/// prediction equals the tensor bytes `compress` writes (headers excluded). Nothing is read
/// beyond the headers and nothing is written.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Checkpoint directory or single .safetensors file.
    input: PathBuf,

    /// Recipe to estimate (preset name or TOML file); repeat to compare several (comma-separated
    /// in SHARDPRESS_RECIPES). Default: every preset.
    #[arg(
        long = "recipe",
        short,
        env = "SHARDPRESS_RECIPES",
        value_delimiter = ','
    )]
    recipes: Vec<String>,

    /// Also print every layer group.
    #[arg(
        long,
        env = "SHARDPRESS_PER_LAYER",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    per_layer: bool,

    /// Output format on stdout.
    #[arg(long, env = "SHARDPRESS_OUTPUT", value_enum, default_value = "text")]
    output: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// A table per recipe.
    Text,
    /// JSON for programs.
    Json,
}

#[derive(Debug, serde::Serialize)]
struct RecipeEstimate {
    recipe: String,
    predicted_bytes: u64,
    overhead_bytes: u64,
    input_bytes: u64,
    params: u64,
    ratio: f64,
    bits_per_weight: f64,
    layers: Vec<LayerJson>,
}

#[derive(Debug, serde::Serialize)]
struct LayerJson {
    layer: String,
    params: u64,
    input_bytes: u64,
    predicted_bytes: u64,
    overhead_bytes: u64,
    bits_per_weight: f64,
}

impl From<&SizeEstimate> for LayerJson {
    fn from(e: &SizeEstimate) -> Self {
        Self {
            layer: e.layer.clone(),
            params: e.params,
            input_bytes: e.input_bytes,
            predicted_bytes: e.predicted_bytes,
            overhead_bytes: e.overhead_bytes,
            bits_per_weight: round(e.bits_per_weight()),
        }
    }
}

fn round(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let ckpt = Checkpoint::open_local(&args.input)?;
    let names: Vec<String> = if args.recipes.is_empty() {
        shardpress_engine::recipe::preset_names()
            .into_iter()
            .map(str::to_string)
            .collect()
    } else {
        args.recipes.clone()
    };
    let mut estimates = Vec::with_capacity(names.len());
    for name in &names {
        let recipe = Recipe::load(name)?;
        let plan = plan_job(&ckpt, &recipe).with_context(|| format!("planning recipe {name}"))?;
        let (layers, total) = estimate_plan(&plan);
        estimates.push(RecipeEstimate {
            recipe: recipe.name.clone(),
            predicted_bytes: total.predicted_bytes,
            overhead_bytes: total.overhead_bytes,
            input_bytes: total.input_bytes,
            params: total.params,
            ratio: round(total.ratio()),
            bits_per_weight: round(total.bits_per_weight()),
            layers: layers.iter().map(LayerJson::from).collect(),
        });
    }
    let mut out = std::io::stdout().lock();
    match args.output {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &estimates)?;
            writeln!(out)?;
        }
        Format::Text => {
            writeln!(
                out,
                "{}: {} tensors, {} weights, {} of tensor data",
                args.input.display(),
                ckpt.tensors.len(),
                estimates.first().map_or(0, |e| e.params),
                human(ckpt.tensor_bytes())
            )?;
            writeln!(
                out,
                "{:<22} {:>12} {:>12} {:>8} {:>10}",
                "recipe", "output", "overhead", "ratio", "bits/wt"
            )?;
            for e in &estimates {
                writeln!(
                    out,
                    "{:<22} {:>12} {:>12} {:>7.2}x {:>10.3}",
                    e.recipe,
                    human(e.predicted_bytes),
                    human(e.overhead_bytes),
                    e.ratio,
                    e.bits_per_weight
                )?;
                if args.per_layer {
                    for l in &e.layers {
                        writeln!(
                            out,
                            "  {:<20} {:>12} {:>12} {:>8} {:>10.3}",
                            l.layer,
                            human(l.predicted_bytes),
                            human(l.overhead_bytes),
                            "",
                            l.bits_per_weight
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}
