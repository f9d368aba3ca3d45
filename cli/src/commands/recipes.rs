//! `shardpress recipes`: list the presets or print one as TOML.

use anyhow::{bail, Result};
use shardpress_engine::recipe::{preset, PRESETS};
use shardpress_engine::Recipe;
use std::io::Write;

/// List the built-in recipes, or print one as TOML to start your own from.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Preset to print; without it, all presets are listed.
    name: Option<String>,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    match args.name {
        Some(name) => {
            let Some(text) = preset(&name) else {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!("no preset {name:?}; presets: {}", names.join(", "));
            };
            std::io::stdout().lock().write_all(text.as_bytes())?;
        }
        None => {
            let mut out = std::io::stdout().lock();
            for (name, text) in PRESETS {
                let recipe = Recipe::from_toml(text, name)?;
                let desc = recipe.source.description.unwrap_or_default();
                writeln!(out, "{name:<11} {desc}")?;
            }
        }
    }
    Ok(())
}
