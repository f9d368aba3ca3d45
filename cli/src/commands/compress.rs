//! `shardpress compress`: run a recipe over a local checkpoint, on this machine.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use shardpress_engine::pipeline::{CompressError, Progress};
use shardpress_engine::report::TensorReport;
use shardpress_engine::{compress_local, LocalOptions, PoolStats, Recipe, Report};

use crate::size::human;

/// More threads than this only costs memory: the work is split per tensor and per row.
const MAX_THREADS: usize = 1024;

const RECIPE_HELP: &str = "\
RECIPES
  A recipe is a preset name or a TOML file of ordered rules. Each tensor takes the action of the
  first rule whose targets match its name (globs, or regexes written \"re:...\"). Tensors matching
  `ignore` (default: norms, biases, embeddings, lm_head), 1-D tensors, non-float tensors and
  tensors no rule matches are copied byte for byte. Prune and quantize apply to 2-D .weight
  matrices only.

    name = \"my-w4\"
    ignore = [\"re:(?i).*norm.*\", \"*.bias\", \"re:.*embed.*\", \"lm_head.weight\"]
    [[rules]]
    targets = [\"re:.*layers\\\\.0\\\\..*\"]      # keep the first block in full precision
    action = \"keep\"                            # keep | cast | prune | quantize
    [[rules]]
    targets = [\"*.weight\"]
    action = \"quantize\"
    type = \"int\"                               # int (2-8 bits) | float (FP8)
    bits = 4                                   # 2 to 8
    symmetric = true                           # false: scale and zero point
    strategy = \"group\"                         # tensor | channel | group
    group_size = 128                           # any size; a ragged last group is fine
    scale_dtype = \"auto\"                       # auto (the tensor's dtype) | f32 | f16 | bf16
    observer = \"minmax\"                        # minmax | mse (least-squares clipping range)
    activations = \"none\"                       # none | token | tensor: dynamic 8-bit activations
                                               #   (int: needs bits = 8; float: format = e4m3|e5m2)
    # prune = \"2:4\"                            # optional, before quantizing: \"magnitude\" | \"N:M\"
    # indivisible = \"dense\"                    # N:M on columns not divisible by M: error | dense
  Pruning alone: action = \"prune\", prune = \"magnitude\" with sparsity = 0.5 and
  prune_scope = \"tensor\"|\"row\", or prune = \"N:M\"; storage = \"bitmask\" (sparse-bitmask) or
  \"dense\" (zeros in place).
  Structured pruning (Llama-style models, coupled tensors pruned together in every layer):
    [structured]
    mlp_ratio = 0.25                           # MLP neurons removed per layer
    head_ratio = 0.25                          # attention heads removed, in key/value groups
    drop_layers = [30, 31]                     # whole layers removed; config.json follows

PRESETS (`shardpress recipes NAME` prints one as TOML; sizes relative to bf16 weights)
  bf16        cast all float tensors to bfloat16           loads anywhere
  fp16        cast all float tensors to float16            loads anywhere
  w8a16       int8 per output channel, pack-quantized      ~0.5x; vLLM, Transformers
  w8a16-mse   w8a16 with the mse observer                  ~0.5x; vLLM, Transformers
  w4a16       int4 sym, groups of 128, pack-quantized      ~0.27x; vLLM, Transformers
  w4a16-asym  int4 asym (zero points), groups of 128       ~0.28x; vLLM, Transformers
  w8a8        int8 per channel + dynamic per-token int8    ~0.5x; vLLM int-quantized
  fp8         e4m3 per channel + dynamic per-token fp8     ~0.5x; vLLM float-quantized
  sparse50    50% magnitude pruning, sparse-bitmask        ~0.53-0.56x of the input; decompress to load
  2of4        2:4 pruning, sparse-bitmask                  ~0.53-0.56x of the input; decompress to load
  2of4-w4a16  2:4 pruning then int4 g128, zeros exact      ~0.27x; vLLM, Transformers
  `shardpress decompress` turns any output back into a plain dense checkpoint.

OUTPUT
  One safetensors shard per layer group (model-00001-of-000NN.safetensors), the index json,
  config.json (with quantization_config when weights are quantized or pruned), every other file
  of the input (tokenizer, ...) and report.json with per-tensor sizes and errors. The output is
  written to a hidden staging directory and renamed into place only when complete.";

/// Compress a checkpoint on this machine, without a database or object store.
#[derive(Debug, clap::Args)]
#[command(after_long_help = RECIPE_HELP)]
pub struct Args {
    /// Checkpoint directory (model.safetensors, or shards with model.safetensors.index.json)
    /// or a single .safetensors file.
    input: PathBuf,

    /// Preset name (see `shardpress recipes`) or path to a recipe TOML file.
    #[arg(long, short, env = "SHARDPRESS_RECIPE")]
    recipe: String,

    /// Output directory; must not exist (or be empty) unless --overwrite.
    #[arg(long, short, env = "SHARDPRESS_OUT")]
    out: PathBuf,

    /// Worker threads (default: all cores). Output bytes do not depend on it.
    #[arg(long, env = "SHARDPRESS_THREADS")]
    threads: Option<usize>,

    /// Memory budget for tensor buffers, e.g. 512MiB or 4GiB (default: no limit). Tensors
    /// larger than the budget are processed in row blocks; tasks wait for memory instead of
    /// exceeding it. Output bytes do not depend on it. Allow about 64 MiB more for the
    /// process itself.
    #[arg(long, env = "SHARDPRESS_MEMORY_LIMIT", value_parser = parse_limit)]
    memory_limit: Option<u64>,

    /// Replace an existing output directory (only after the new one is complete).
    #[arg(
        long,
        env = "SHARDPRESS_OVERWRITE",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    overwrite: bool,

    /// No progress bar or summary table.
    #[arg(
        long,
        short,
        env = "SHARDPRESS_QUIET",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    quiet: bool,

    /// Summary format on stdout.
    #[arg(long, env = "SHARDPRESS_OUTPUT", value_enum, default_value = "text")]
    output: OutputFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

struct Bar(ProgressBar);

/// Set by the first Ctrl-C or SIGTERM: the run stops at the next tensor and removes its
/// staging directory.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn cancelled(&self) -> bool {
        INTERRUPTED.load(Ordering::Relaxed)
    }
}

/// First signal: stop cleanly; second: exit at once.
fn handle_interrupts() {
    let installed = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::Relaxed) {
            eprintln!("second interrupt: exiting now; a hidden .partial directory may remain");
            std::process::exit(130);
        }
        eprintln!("interrupted: stopping and removing the partial output (again to exit at once)");
    });
    if let Err(e) = installed {
        tracing::warn!("cannot handle Ctrl-C: {e}");
    }
}

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    let recipe = Recipe::load(&args.recipe)?;
    if let Some(n) = args.threads {
        anyhow::ensure!(
            (1..=MAX_THREADS).contains(&n),
            "--threads must be 1 to {MAX_THREADS}, got {n}"
        );
    }
    let total = input_bytes(&args.input);
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = Bar(bar);
    let started = Instant::now();
    let opts = LocalOptions {
        overwrite: args.overwrite,
        threads: args.threads,
        memory_limit: args.memory_limit,
    };
    handle_interrupts();
    let run = match compress_local(&args.input, &recipe, &args.out, &opts, &progress) {
        Err(CompressError::Cancelled) => {
            progress.0.finish_and_clear();
            eprintln!("interrupted: {} was not changed", args.out.display());
            std::process::exit(130);
        }
        other => other?,
    };
    let report = &run.report;
    progress.0.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "output": args.out.display().to_string(),
                "recipe": report.recipe_name,
                "seconds": secs,
                "totals": report.totals,
                "shards": report.shards.len(),
                "memory": memory_json(&run.memory),
            }))?
        )?,
        OutputFormat::Text if !args.quiet => {
            print_summary(&mut out, &args, report, secs)?;
            writeln!(out, "{}", memory_line(&run.memory))?;
        }
        OutputFormat::Text => {}
    }
    Ok(())
}

fn parse_limit(text: &str) -> Result<u64, String> {
    match crate::size::parse_size(text)? {
        0 => Err("the memory limit must be more than 0 bytes".to_string()),
        n => Ok(n),
    }
}

/// The pool statistics as JSON.
pub fn memory_json(m: &PoolStats) -> serde_json::Value {
    serde_json::json!({
        "limit_bytes": m.limit(),
        "peak_reserved_bytes": m.peak_reserved,
        "peak_in_use_bytes": m.peak_in_use,
        "reservations": m.reservations,
        "waits": m.waits,
        "wait_ms": m.wait_ms,
        "buffers": m.buffers,
        "reuse_rate": m.reuse_rate(),
    })
}

/// One line about the memory pool.
pub fn memory_line(m: &PoolStats) -> String {
    let limit = m
        .limit()
        .map_or("no limit".to_string(), |l| format!("limit {}", human(l)));
    format!(
        "memory: {limit}, peak in buffers {}, {} task(s) waited for memory ({:.1}s), {:.0}% of {} buffers reused",
        human(m.peak_in_use),
        m.waits,
        m.wait_ms as f64 / 1000.0,
        m.reuse_rate() * 100.0,
        m.buffers
    )
}

/// Tensor bytes of the input for the progress bar; 0 (unknown) when it cannot be read yet,
/// in which case the real error comes from the compression itself.
fn input_bytes(input: &std::path::Path) -> u64 {
    shardpress_engine::Checkpoint::open_local(input)
        .map(|c| c.tensor_bytes())
        .unwrap_or(0)
}

fn print_summary(
    out: &mut impl Write,
    args: &Args,
    report: &Report,
    secs: f64,
) -> std::io::Result<()> {
    let t = &report.totals;
    writeln!(
        out,
        "{} -> {}  recipe {}  {} shard(s)  {:.1}s  {}/s",
        args.input.display(),
        args.out.display(),
        report.recipe_name,
        report.shards.len(),
        secs,
        human((t.bytes_in as f64 / secs.max(1e-9)) as u64)
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<9} {:>7} {:>11} {:>11} {:>6} {:>9} {:>9}",
        "action", "tensors", "bytes in", "bytes out", "ratio", "mean err", "max err"
    )?;
    for action in ["prune", "quantize", "cast", "keep"] {
        let rows: Vec<&TensorReport> = report
            .tensors
            .iter()
            .filter(|r| r.action == action)
            .collect();
        if rows.is_empty() {
            continue;
        }
        print_row(out, action, &rows)?;
    }
    let all: Vec<&TensorReport> = report.tensors.iter().collect();
    print_row(out, "total", &all)?;
    let mut worst: Vec<&TensorReport> = report
        .tensors
        .iter()
        .filter(|r| r.action != "keep")
        .collect();
    worst.sort_by(|a, b| b.error.rel_error.total_cmp(&a.error.rel_error));
    if !worst.is_empty() {
        writeln!(out)?;
        writeln!(out, "largest relative errors:")?;
        for r in worst.iter().take(5) {
            let snr = r
                .error
                .snr_db
                .map_or("exact".to_string(), |s| format!("{s:.1} dB"));
            writeln!(
                out,
                "  {:<56} {:<28} {:>8.4}%  SNR {snr}",
                r.name,
                r.detail,
                r.error.rel_error * 100.0
            )?;
        }
    }
    writeln!(out)?;
    writeln!(out, "report: {}", args.out.join("report.json").display())
}

fn print_row(out: &mut impl Write, label: &str, rows: &[&TensorReport]) -> std::io::Result<()> {
    let bytes_in: u64 = rows.iter().map(|r| r.bytes_in).sum();
    let bytes_out: u64 = rows.iter().map(|r| r.bytes_out).sum();
    let mean = rows.iter().map(|r| r.error.rel_error).sum::<f64>() / rows.len().max(1) as f64;
    let max = rows.iter().map(|r| r.error.rel_error).fold(0.0, f64::max);
    let ratio = if bytes_out == 0 {
        0.0
    } else {
        bytes_in as f64 / bytes_out as f64
    };
    writeln!(
        out,
        "{:<9} {:>7} {:>11} {:>11} {:>5.2}x {:>8.4}% {:>8.4}%",
        label,
        rows.len(),
        human(bytes_in),
        human(bytes_out),
        ratio,
        mean * 100.0,
        max * 100.0
    )
}
