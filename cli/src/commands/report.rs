//! `shardpress report`: show the report of a compressed checkpoint.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shardpress_engine::report::REPORT_VERSION;
use shardpress_engine::report_render::{to_html, to_markdown};
use shardpress_engine::Report;

/// Show the report of a compressed checkpoint directory (written by `compress`, or a job's
/// output downloaded from the store): totals, size per layer group and every transformed
/// tensor's bits per weight and error. The same directory holds `report.md` and a
/// self-contained `report.html` with charts.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Compressed checkpoint directory, or its report.json.
    input: PathBuf,

    /// What to print: `md` (tables), `json` (the raw report) or `html` (the page).
    #[arg(
        long,
        env = "SHARDPRESS_REPORT_FORMAT",
        value_enum,
        default_value = "md"
    )]
    format: Format,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// Markdown tables.
    Md,
    /// The report as written.
    Json,
    /// The HTML page.
    Html,
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let path = if args.input.is_dir() {
        args.input.join("report.json")
    } else {
        args.input.clone()
    };
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (is this the output directory of a finished compression?)",
            path.display()
        )
    })?;
    let report: Report = serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a Shardpress report", path.display()))?;
    if report.report_version != REPORT_VERSION {
        anyhow::bail!(
            "{}: report version {} is not the version {REPORT_VERSION} this shardpress reads",
            path.display(),
            report.report_version
        );
    }
    let text = match args.format {
        Format::Md => to_markdown(&report),
        Format::Html => to_html(&report),
        Format::Json => String::from_utf8_lossy(&bytes).into_owned(),
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        writeln!(out)?;
    }
    Ok(())
}
