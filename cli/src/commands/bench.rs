//! `shardpress bench`: kernel throughput at several thread counts against a memory baseline
//! measured in the same run, optionally numpy versions of the same kernels, and end-to-end
//! `compress` of a checkpoint against copying its files.
//!
//! Every figure is a ratio to something measured in the same process on the same bytes, so
//! numbers from a busy machine still compare. Nothing here is asserted; it prints.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use shardpress_engine::codec::{
    decode_rows, encode_block, needs_f32, Carry, GlobalsBuilder, TransformError,
};
use shardpress_engine::kernels::convert::decode_f32;
use shardpress_engine::pipeline::NoProgress;
use shardpress_engine::recipe::TensorAction;
use shardpress_engine::safetensors::TensorInfo;
use shardpress_engine::{compress_local, DType, LocalOptions, Recipe};

/// The numpy versions of the kernels; run by `--python`.
const NUMPY_SCRIPT: &str = include_str!("../../../bench/numpy_kernels.py");

/// Measure kernel and end-to-end throughput as ratios to baselines measured in the same run.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB of bf16 input each kernel transforms per repetition.
    #[arg(long, env = "SHARDPRESS_BENCH_MIB", default_value_t = 256)]
    mib: u64,

    /// Columns of the benchmark matrix (input features of a linear layer).
    #[arg(long, env = "SHARDPRESS_BENCH_COLS", default_value_t = 4096)]
    cols: u64,

    /// Repetitions per measurement; the fastest is reported.
    #[arg(long, env = "SHARDPRESS_BENCH_REPS", default_value_t = 3)]
    reps: u32,

    /// Thread counts to measure, comma separated; the first is the reference for scaling.
    #[arg(
        long,
        env = "SHARDPRESS_BENCH_THREADS",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    threads: Vec<usize>,

    /// Only kernels whose name contains one of these words (comma separated).
    #[arg(long, env = "SHARDPRESS_BENCH_ONLY", value_delimiter = ',')]
    only: Vec<String>,

    /// Also compress this checkpoint (a directory or .safetensors file) and compare with
    /// copying its files.
    #[arg(long, env = "SHARDPRESS_BENCH_CHECKPOINT")]
    checkpoint: Option<PathBuf>,

    /// Recipe of the end-to-end run.
    #[arg(long, env = "SHARDPRESS_RECIPE", default_value = "w8a16")]
    recipe: String,

    /// Directory for the end-to-end outputs and the numpy input (default: the system
    /// temporary directory). Everything written there is removed afterwards.
    #[arg(long, env = "SHARDPRESS_BENCH_SCRATCH")]
    scratch: Option<PathBuf>,

    /// A Python interpreter with numpy: times the numpy versions of the kernels on the same
    /// data.
    #[arg(long, env = "SHARDPRESS_PYTHON")]
    python: Option<PathBuf>,
}

/// One benchmarked kernel: a preset whose action is applied to a `.weight` matrix, or the
/// plain bf16 decode.
struct Kernel {
    name: &'static str,
    preset: Option<&'static str>,
    /// Target as a fraction of the memory baseline, per thread.
    target: Option<f64>,
}

const KERNELS: &[Kernel] = &[
    Kernel {
        name: "decode bf16->f32",
        preset: None,
        target: None,
    },
    Kernel {
        name: "int8 channel (w8a16)",
        preset: Some("w8a16"),
        target: Some(0.5),
    },
    Kernel {
        name: "int4 g128 sym (w4a16)",
        preset: Some("w4a16"),
        target: Some(0.35),
    },
    Kernel {
        name: "int4 g128 asym (w4a16-asym)",
        preset: Some("w4a16-asym"),
        target: Some(0.35),
    },
    Kernel {
        name: "fp8 e4m3 channel (fp8)",
        preset: Some("fp8"),
        target: Some(0.5),
    },
    Kernel {
        name: "magnitude 50% bitmask (sparse50)",
        preset: Some("sparse50"),
        target: Some(0.25),
    },
    Kernel {
        name: "2:4 bitmask (2of4)",
        preset: Some("2of4"),
        target: Some(0.25),
    },
];

/// Fraction of one thread's throughput the second thread should add at least.
const SCALING_TARGET: f64 = 1.8;
/// How much faster than numpy the kernels should be.
const NUMPY_TARGET: f64 = 10.0;
/// End-to-end compress against copying.
const E2E_TARGET: f64 = 0.5;

/// Runs the command.
pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(
        !args.threads.is_empty() && args.threads.iter().all(|t| (1..=1024).contains(t)),
        "--threads must list thread counts from 1 to 1024"
    );
    anyhow::ensure!(args.cols >= 128, "--cols must be at least 128");
    // The kernels hold the input, an f32 copy and outputs at once: about 4x --mib in all.
    anyhow::ensure!(
        (1..=16384).contains(&args.mib),
        "--mib must be from 1 to 16384 (the run holds about 4x that in memory)"
    );
    if let Some(python) = &args.python {
        anyhow::ensure!(
            python.is_file(),
            "--python {}: no such file",
            python.display()
        );
    }
    if let Some(dir) = &args.checkpoint {
        shardpress_engine::Checkpoint::open_local(dir)
            .with_context(|| format!("--checkpoint {}", dir.display()))?;
    }
    let cols = args.cols - args.cols % 128;
    let rows = (args.mib << 20) / 2 / cols;
    anyhow::ensure!(
        rows >= 1,
        "--mib {} is too small for {cols} columns",
        args.mib
    );
    let bytes = synth_bf16(rows * cols);
    let gb = bytes.len() as f64 / 1e9;
    let pools = args
        .threads
        .iter()
        .map(|&n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .with_context(|| format!("starting {n} threads"))
        })
        .collect::<Result<Vec<_>>>()?;

    println!(
        "input: bf16 matrix {rows} x {cols} ({:.0} MiB), best of {} runs; GB/s are input bytes per second",
        bytes.len() as f64 / 1048576.0,
        args.reps
    );
    println!(
        "baseline: a loop reading 2 bytes and writing 1 over the same input, at each thread count\n"
    );
    let mut out = vec![0u8; bytes.len() / 2];
    let base: Vec<f64> = pools
        .iter()
        .map(|pool| {
            gb / best(args.reps, || {
                pool.install(|| read2_write1(&bytes, &mut out))
            })
        })
        .collect();

    let mut header = format!("{:<34}", "kernel");
    for t in &args.threads {
        header += &format!(" {:>9} {:>7}", format!("{t}T GB/s"), "x base");
    }
    header += &format!(" {:>8} {:>7} {:>9}", "scaling", "target", "cpu busy");
    println!("{header}");
    let mut line = format!("{:<34}", "memory baseline (read 2, write 1)");
    for b in &base {
        line += &format!(" {b:>9.2} {:>7.2}", 1.0);
    }
    line += &format!(" {:>8.2}", base.last().unwrap_or(&0.0) / base[0]);
    println!("{line}");

    let mut w = Vec::new();
    let mut measured = Vec::new();
    for k in KERNELS {
        if !args.only.is_empty() && !args.only.iter().any(|o| k.name.contains(o.as_str())) {
            continue;
        }
        let info = TensorInfo {
            name: "model.layers.0.mlp.down_proj.weight".into(),
            dtype: DType::BF16,
            shape: vec![rows, cols],
            start: 0,
            end: bytes.len() as u64,
        };
        let action = match k.preset {
            Some(p) => Some(
                Recipe::load(p)?
                    .resolve(&info)
                    .map_err(|e| anyhow::anyhow!("preset {p}: {e}"))?,
            ),
            None => None,
        };
        let mut speeds = Vec::new();
        let mut shares = Vec::new();
        let mut outputs = Vec::new();
        for (pool, &threads) in pools.iter().zip(&args.threads) {
            let mut last = None;
            let (secs, cpu) = best_with_cpu(args.reps, || {
                pool.install(|| match &action {
                    Some(a) => last = Some(encode_whole(&info, a, &bytes, &mut w)),
                    None => decode_only(&bytes, &mut w),
                })
            });
            if let Some(r) = last {
                outputs.push(r?);
            }
            speeds.push(gb / secs);
            shares.push(cpu.map(|c| c / (secs * threads as f64)));
        }
        let mut line = format!("{:<34}", k.name);
        for (s, b) in speeds.iter().zip(&base) {
            line += &format!(" {s:>9.2} {:>7.2}", s / b);
        }
        line += &format!(" {:>8.2}", speeds.last().unwrap_or(&0.0) / speeds[0]);
        line += &format!(
            " {:>7}",
            k.target.map(|t| format!(">={t}")).unwrap_or_default()
        );
        line += &format!(
            " {:>9}",
            shares
                .iter()
                .map(|s| s.map_or("-".to_string(), |s| format!("{:.0}%", s * 100.0)))
                .collect::<Vec<_>>()
                .join("/")
        );
        if outputs.windows(2).any(|p| p[0] != p[1]) {
            line += "  OUTPUT DIFFERS ACROSS THREAD COUNTS";
        }
        println!("{line}");
        measured.push((k, speeds));
    }
    println!(
        "\ntargets: x base at every thread count as listed; scaling (last/first thread count) >= {SCALING_TARGET}"
    );
    println!(
        "cpu busy: CPU time of the fastest run / (wall time x threads) per thread count; well under 100% means other processes took the cores and the figure is low"
    );

    if let Some(py) = &args.python {
        println!();
        numpy_compare(py, &args, &bytes, rows, cols, &measured)?;
    }
    if let Some(ckpt) = &args.checkpoint {
        println!();
        end_to_end(ckpt, &args)?;
    }
    Ok(())
}

/// Deterministic bf16 weights, roughly normal with standard deviation 0.02 (a sum of four
/// uniforms from a splitmix64 stream), rounded to nearest even.
fn synth_bf16(n: u64) -> Vec<u8> {
    let mut out = vec![0u8; n as usize * 2];
    out.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(chunk, o)| {
            let mut state = (chunk as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
            for e in o.chunks_exact_mut(2) {
                let mut sum = 0f32;
                for _ in 0..4 {
                    state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^= z >> 31;
                    sum += (z >> 40) as f32 / (1u64 << 24) as f32;
                }
                // Four uniforms on [0, 1): mean 2, variance 1/3.
                let x = (sum - 2.0) * 0.02 * 3f32.sqrt();
                let b = x.to_bits();
                let rounded = (b + 0x7fff + ((b >> 16) & 1)) >> 16;
                e.copy_from_slice(&(rounded as u16).to_le_bytes());
            }
        });
    out
}

/// The memory baseline: the high byte of every 2-byte element, in parallel chunks.
fn read2_write1(inp: &[u8], out: &mut [u8]) {
    out.par_chunks_mut(1 << 20)
        .zip(inp.par_chunks(2 << 20))
        .for_each(|(o, i)| {
            for (d, s) in o.iter_mut().zip(i.chunks_exact(2)) {
                *d = s[1];
            }
        });
    std::hint::black_box(&out);
}

/// bf16 to f32 into a reused buffer, in parallel chunks.
fn decode_only(bytes: &[u8], w: &mut Vec<f32>) {
    w.resize(bytes.len() / 2, 0.0);
    w.par_chunks_mut(1 << 16)
        .zip(bytes.par_chunks(2 << 16))
        .for_each(|(o, b)| decode_f32(DType::BF16, b, o));
    std::hint::black_box(&w);
}

/// Transforms a whole tensor as `compress` does without a memory limit: the statistics
/// passes the action needs, then one block of every row; `w` is reused f32 scratch.
fn encode_whole(
    info: &TensorInfo,
    action: &TensorAction,
    bytes: &[u8],
    w: &mut Vec<f32>,
) -> Result<Vec<Vec<u8>>, TransformError> {
    let fail = |problem: String| TransformError {
        tensor: info.name.clone(),
        problem,
    };
    let (_, cols) = info.rows_cols();
    if needs_f32(action) {
        w.resize(bytes.len() / 2, 0.0);
    }
    let mut gb = GlobalsBuilder::new(info, action);
    while gb.pending() {
        decode_rows(info.dtype, bytes, cols, 0, w).map_err(fail)?;
        gb.feed(w).map_err(fail)?;
        gb.end_pass().map_err(fail)?;
    }
    let mut carry = Carry::default();
    encode_block(info, action, 0, bytes, w, &gb.finish(), &mut carry).map_err(fail)
}

/// Seconds of the fastest of `reps` runs.
fn best(reps: u32, f: impl FnMut()) -> f64 {
    best_with_cpu(reps, f).0
}

/// Seconds of the fastest of `reps` runs and the process CPU seconds it used (`None` where
/// `/proc/self/stat` is missing).
fn best_with_cpu(reps: u32, mut f: impl FnMut()) -> (f64, Option<f64>) {
    let mut best = (Duration::MAX, None);
    for _ in 0..reps {
        let c = cpu_seconds();
        let t = Instant::now();
        f();
        let wall = t.elapsed();
        if wall < best.0 {
            best = (wall, c.zip(cpu_seconds()).map(|(a, b)| b - a));
        }
    }
    (best.0.as_secs_f64(), best.1)
}

/// User plus system CPU time of this process, from `/proc/self/stat` (in 1/100 s ticks,
/// the fixed USER_HZ of Linux).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Writes the input to the scratch directory, runs the numpy versions on it and prints the
/// ratio of each kernel at the first thread count to numpy.
fn numpy_compare(
    py: &Path,
    args: &Args,
    bytes: &[u8],
    rows: u64,
    cols: u64,
    measured: &[(&Kernel, Vec<f64>)],
) -> Result<()> {
    let dir = tempfile_dir(args.scratch.as_deref(), "numpy")?;
    let data = dir.join("input.bf16");
    std::fs::write(&data, bytes).with_context(|| format!("writing {}", data.display()))?;
    let script = dir.join("numpy_kernels.py");
    std::fs::write(&script, NUMPY_SCRIPT)?;
    let run = Command::new(py)
        .arg(&script)
        .arg(&data)
        .arg(rows.to_string())
        .arg(cols.to_string())
        .arg(args.reps.to_string())
        .stderr(Stdio::inherit())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let run = run.with_context(|| format!("running {}", py.display()))?;
    if !run.status.success() {
        bail!("{} exited with {}", py.display(), run.status);
    }
    let text = String::from_utf8_lossy(&run.stdout);
    let t0 = args.threads[0];
    println!(
        "{:<34} {:>11} {:>9} {:>9} {:>7}",
        "numpy (same data)",
        "numpy GB/s",
        format!("{t0}T GB/s"),
        "x numpy",
        "target"
    );
    for line in text.lines() {
        let Some((key, val)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(np) = val.trim().parse::<f64>() else {
            continue;
        };
        let ours = measured
            .iter()
            .find(|(k, _)| k.preset.unwrap_or("decode") == key.trim())
            .map(|(k, s)| (k.name, s[0]));
        if let Some((name, s)) = ours {
            println!(
                "{name:<34} {np:>11.3} {s:>9.2} {:>9.1} {:>7}",
                s / np,
                format!(">={NUMPY_TARGET}")
            );
        }
    }
    Ok(())
}

/// A fresh directory under `scratch` (or the temporary directory).
fn tempfile_dir(scratch: Option<&Path>, what: &str) -> Result<PathBuf> {
    let root = scratch.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let dir = root.join(format!("shardpress-bench-{what}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Times copying the checkpoint's files against compressing it, both into the scratch
/// directory, after one untimed copy that brings the input into the page cache. Neither
/// syncs to disk.
fn end_to_end(ckpt: &Path, args: &Args) -> Result<()> {
    let recipe = Recipe::load(&args.recipe)?;
    let files = list_files(ckpt)?;
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let dir = tempfile_dir(args.scratch.as_deref(), "e2e")?;
    let copy = || -> Result<()> {
        let to = dir.join("copy");
        std::fs::create_dir_all(&to)?;
        for (i, f) in files.iter().enumerate() {
            std::fs::copy(f, to.join(format!("{i}")))
                .with_context(|| format!("copying {}", f.display()))?;
        }
        Ok(())
    };
    let clean = |name: &str| {
        let _ = std::fs::remove_dir_all(dir.join(name));
    };
    let result = (|| -> Result<(f64, f64, f64)> {
        copy()?;
        clean("copy");
        let mut cp = f64::MAX;
        let mut comp = [f64::MAX, f64::MAX];
        for _ in 0..args.reps {
            let t = Instant::now();
            copy()?;
            cp = cp.min(t.elapsed().as_secs_f64());
            clean("copy");
            for (slot, threads) in comp.iter_mut().zip([None, Some(1)]) {
                let opts = LocalOptions {
                    overwrite: true,
                    threads,
                    memory_limit: None,
                };
                let t = Instant::now();
                compress_local(ckpt, &recipe, &dir.join("out"), &opts, &NoProgress)?;
                *slot = slot.min(t.elapsed().as_secs_f64());
                clean("out");
            }
        }
        Ok((cp, comp[0], comp[1]))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (cp, all, one) = result?;
    let gb = total as f64 / 1e9;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "end to end: {} ({:.2} GB in {} files), recipe {}, best of {}",
        ckpt.display(),
        gb,
        files.len(),
        recipe.name,
        args.reps
    );
    println!(
        "{:<34} {:>9} {:>9} {:>7}",
        "run", "GB/s", "x copy", "target"
    );
    println!(
        "{:<34} {:>9.2} {:>9.2}",
        "copy files (std::fs::copy)",
        gb / cp,
        1.0
    );
    println!(
        "{:<34} {:>9.2} {:>9.2} {:>7}",
        format!("compress, {threads} threads"),
        gb / all,
        cp / all,
        format!(">={E2E_TARGET}")
    );
    println!(
        "{:<34} {:>9.2} {:>9.2}",
        "compress, 1 thread",
        gb / one,
        cp / one
    );
    Ok(())
}

/// Files of a checkpoint directory (recursively), or the file itself.
fn list_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}
