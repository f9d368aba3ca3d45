//! `shardpress decompress`: turn a compressed checkpoint back into a plain dense one.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shardpress_engine::decompress::decompress_local;
use shardpress_engine::DType;

use crate::size::human;

/// Turn any Shardpress output (pack-quantized, int-quantized, float-quantized, sparse-bitmask)
/// back into a plain dense checkpoint that any tool loads.
///
/// Every compressed module becomes one dense `<module>.weight`, dequantized in f32 as
/// `(q - zero_point) * scale`; every float tensor is then written in one dtype (round to
/// nearest even). config.json loses its quantization_config; other files are copied.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Compressed checkpoint directory.
    input: PathBuf,

    /// Output directory; must not exist (or be empty) unless --overwrite.
    #[arg(long, short, env = "SHARDPRESS_OUT")]
    out: PathBuf,

    /// dtype of every float tensor (default: config.json's torch_dtype if bf16/f16/f32, else f32).
    #[arg(long, env = "SHARDPRESS_DTYPE", value_enum)]
    dtype: Option<Dtype>,

    /// Replace an existing output directory (only after the new one is complete).
    #[arg(
        long,
        env = "SHARDPRESS_OVERWRITE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    overwrite: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Dtype {
    Bf16,
    F16,
    F32,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let dtype = args.dtype.map(|d| match d {
        Dtype::Bf16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
    });
    let summary = decompress_local(&args.input, &args.out, dtype, args.overwrite)
        .with_context(|| format!("decompressing {}", args.input.display()))?;
    let modules: Vec<String> = summary
        .modules
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    writeln!(
        std::io::stdout().lock(),
        "{}: {} tensors, {} as {}; decoded {}",
        args.out.display(),
        summary.tensors,
        human(summary.bytes),
        summary.dtype.map(|d| d.to_string()).unwrap_or_default(),
        if modules.is_empty() {
            "nothing (no compressed modules)".to_string()
        } else {
            modules.join(", ")
        }
    )?;
    Ok(())
}
