//! Planning a compression job and running it: group by layer, transform each group into one
//! output shard, then finalize the index, config, copied files and report.
//!
//! [`plan_job`] and [`run_group`] are shared by the local `compress` command and the workers;
//! [`compress_local`] strings them together on one machine, writing into a staging directory
//! that is renamed into place only once everything is written.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde_json::{json, Value};

use crate::checkpoint::{Checkpoint, CheckpointError, INDEX_FILE};
use crate::codec::{output_specs, transform, TransformError};
use crate::hf_config;
use crate::kernels::int_quant::Strategy;
use crate::plan::{group_tensors, shard_file_name};
use crate::recipe::{Recipe, TensorAction};
use crate::report::{Report, ShardReport, TensorReport, REPORT_VERSION};
use crate::safetensors::{ShardWriter, TensorInfo, WriteError};
use crate::source::ByteSource;

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The input is not a usable checkpoint.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor could not be transformed.
    #[error("{file}: {source}")]
    Transform {
        /// Input file holding the tensor.
        file: String,
        /// The error.
        #[source]
        source: TransformError,
    },
    /// Reading input bytes failed.
    #[error("{file}: reading tensor {tensor:?} (bytes {start}..{end}): {source}")]
    Read {
        /// Input file.
        file: String,
        /// Tensor.
        tensor: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset.
        end: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Writing an output shard failed.
    #[error("{file}: {source}")]
    Write {
        /// Output file.
        file: String,
        /// The error.
        #[source]
        source: WriteError,
    },
    /// The work was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The output location cannot be used.
    #[error("{path}: {problem}")]
    Output {
        /// Path.
        path: String,
        /// The problem.
        problem: String,
    },
}

/// One input tensor with its decided action.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedTensor {
    /// Index into the task's `inputs`.
    pub input: usize,
    /// Its header entry.
    pub info: TensorInfo,
    /// What happens to it.
    pub action: TensorAction,
}

/// An input file a task reads from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskInput {
    /// File name relative to the checkpoint root.
    pub file: String,
    /// Absolute offset of its data section.
    pub data_start: u64,
    /// File length, as seen at planning.
    pub len: u64,
}

/// One unit of work: a layer group written as one output shard. Self-contained, so a worker
/// needs nothing else to run it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskSpec {
    /// Group key (`encoder.layer.3`, `embeddings`, …).
    pub key: String,
    /// Output file name.
    pub file_name: String,
    /// Input files the tensors live in.
    pub inputs: Vec<TaskInput>,
    /// Tensors in output order.
    pub tensors: Vec<PlannedTensor>,
}

impl TaskSpec {
    /// Input bytes this task reads.
    pub fn bytes_in(&self) -> u64 {
        self.tensors.iter().map(|t| t.info.byte_len()).sum()
    }
}

/// A planned job.
#[derive(Debug, Clone)]
pub struct JobPlan {
    /// Tasks in output order.
    pub tasks: Vec<TaskSpec>,
}

impl JobPlan {
    /// Input tensor bytes over all tasks.
    pub fn bytes_in(&self) -> u64 {
        self.tasks.iter().map(TaskSpec::bytes_in).sum()
    }
}

/// Decides every tensor's action and groups tensors into output shards.
pub fn plan_job(ckpt: &Checkpoint, recipe: &Recipe) -> Result<JobPlan, CompressError> {
    let groups = group_tensors(ckpt.tensors.keys().map(String::as_str));
    let n = groups.len();
    let mut tasks = Vec::with_capacity(n);
    for (i, g) in groups.into_iter().enumerate() {
        let mut inputs: Vec<TaskInput> = Vec::new();
        let mut tensors = Vec::with_capacity(g.tensors.len());
        for name in &g.tensors {
            let Some((shard, info)) = ckpt.info(name) else {
                continue;
            };
            let input = match inputs.iter().position(|f| f.file == shard.file_name) {
                Some(i) => i,
                None => {
                    inputs.push(TaskInput {
                        file: shard.file_name.clone(),
                        data_start: shard.header.data_start(),
                        len: shard.source.len(),
                    });
                    inputs.len() - 1
                }
            };
            tensors.push(PlannedTensor {
                input,
                info: info.clone(),
                action: recipe.resolve(info),
            });
        }
        tasks.push(TaskSpec {
            key: g.key,
            file_name: shard_file_name(i + 1, n),
            inputs,
            tensors,
        });
    }
    Ok(JobPlan { tasks })
}

/// Reads the input bytes of one tensor.
fn read_tensor(
    sources: &[Arc<dyn ByteSource>],
    task: &TaskSpec,
    t: &PlannedTensor,
) -> Result<Vec<u8>, CompressError> {
    let (Some(src), Some(input)) = (sources.get(t.input), task.inputs.get(t.input)) else {
        return Err(CompressError::Transform {
            file: task.file_name.clone(),
            source: TransformError {
                tensor: t.info.name.clone(),
                problem: format!(
                    "task names input #{} but has {}",
                    t.input,
                    task.inputs.len()
                ),
            },
        });
    };
    let start = input.data_start + t.info.start;
    let end = input.data_start + t.info.end;
    let mut buf = vec![0u8; t.info.byte_len() as usize];
    src.read_exact_at(start, &mut buf)
        .map_err(|source| CompressError::Read {
            file: src.name().to_string(),
            tensor: t.info.name.clone(),
            start,
            end,
            source,
        })?;
    Ok(buf)
}

/// Called as tensors finish, for progress display and cancellation.
pub trait Progress: Sync {
    /// `bytes` more input bytes are done.
    fn advance(&self, bytes: u64);

    /// Whether the work should stop before the next tensor.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A progress sink that ignores updates.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _bytes: u64) {}
}

fn describe(action: &TensorAction) -> (&'static str, String) {
    match action {
        TensorAction::Keep(r) => ("keep", r.to_string()),
        TensorAction::Cast(d) => ("cast", d.to_string()),
        TensorAction::Quantize(p) => {
            let strat = match p.strategy {
                Strategy::Tensor => "tensor".to_string(),
                Strategy::Channel => "channel".to_string(),
                Strategy::Group(g) => format!("group {g}"),
            };
            let sym = if p.symmetric { "sym" } else { "asym" };
            (
                "quantize",
                format!("int{} {sym} {strat}, {} scale", p.bits, p.scale_dtype),
            )
        }
    }
}

/// Runs one task and writes its output shard to `sink`. `sources[i]` reads `task.inputs[i]`.
/// Returns the per-tensor report rows and the file length.
pub fn run_task<W: Write>(
    task: &TaskSpec,
    sources: &[Arc<dyn ByteSource>],
    sink: W,
    progress: &dyn Progress,
) -> Result<TaskOutput, CompressError> {
    let group = task;
    let wrap = |source: WriteError| CompressError::Write {
        file: group.file_name.clone(),
        source,
    };
    let specs: Vec<_> = group
        .tensors
        .iter()
        .flat_map(|t| output_specs(&t.info, &t.action))
        .collect();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = ShardWriter::new(sink, specs, &metadata).map_err(wrap)?;
    let mut rows = Vec::with_capacity(group.tensors.len());
    for t in &group.tensors {
        if progress.cancelled() {
            return Err(CompressError::Cancelled);
        }
        let bytes = read_tensor(sources, task, t)?;
        let encoded =
            transform(&t.info, &t.action, &bytes).map_err(|source| CompressError::Transform {
                // read_tensor succeeded, so the source exists.
                file: sources[t.input].name().to_string(),
                source,
            })?;
        drop(bytes);
        let mut bytes_out = 0;
        let mut outputs = Vec::with_capacity(encoded.tensors.len());
        for (spec, data) in &encoded.tensors {
            writer.write_tensor(&spec.name, data).map_err(wrap)?;
            bytes_out += data.len() as u64;
            outputs.push(spec.name.clone());
        }
        let (action, detail) = describe(&t.action);
        rows.push(TensorReport {
            name: t.info.name.clone(),
            shard: group.file_name.clone(),
            action: action.to_string(),
            detail,
            dtype: t.info.dtype.to_string(),
            shape: t.info.shape.clone(),
            bytes_in: t.info.byte_len(),
            bytes_out,
            outputs,
            error: encoded.stats.summary(),
        });
        progress.advance(t.info.byte_len());
    }
    let (_, len) = writer.finish().map_err(wrap)?;
    Ok(TaskOutput {
        tensors: rows,
        file_bytes: len,
    })
}

/// What a finished task produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskOutput {
    /// Report rows of its tensors.
    pub tensors: Vec<TensorReport>,
    /// Length of the output shard.
    pub file_bytes: u64,
}

/// What the finalizer needs besides the task outputs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobFiles {
    /// Parsed `config.json` of the input, when present.
    pub config: Option<Value>,
    /// Files copied unchanged.
    pub other_files: Vec<String>,
    /// Files left out.
    pub skipped_files: Vec<String>,
}

impl JobFiles {
    /// The files of a checkpoint.
    pub fn of(ckpt: &Checkpoint) -> Self {
        Self {
            config: ckpt.config.clone(),
            other_files: ckpt.other_files.clone(),
            skipped_files: ckpt.skipped_files.clone(),
        }
    }
}

/// The metadata files of a finished job.
#[derive(Debug, Clone)]
pub struct Finalized {
    /// `model.safetensors.index.json`.
    pub index: Value,
    /// Rewritten `config.json`, when the input had one.
    pub config: Option<Value>,
    /// `report.json`.
    pub report: Report,
}

/// Builds the index JSON, the rewritten config and the report once every task is done.
/// `outputs[i]` belongs to `tasks[i]`.
pub fn finalize_metadata(
    recipe: &Recipe,
    tasks: &[TaskSpec],
    outputs: Vec<TaskOutput>,
    files: &JobFiles,
) -> Finalized {
    let mut weight_map: Vec<(String, Value)> = Vec::new();
    let mut total_size = 0u64;
    let mut shards = Vec::with_capacity(tasks.len());
    let mut tensors = Vec::new();
    for (g, out) in tasks.iter().zip(outputs) {
        let mut count = 0;
        for r in &out.tensors {
            for o in &r.outputs {
                weight_map.push((o.clone(), json!(g.file_name)));
                count += 1;
            }
            total_size += r.bytes_out;
        }
        shards.push(ShardReport {
            file: g.file_name.clone(),
            group: g.key.clone(),
            tensors: count,
            file_bytes: out.file_bytes,
        });
        tensors.extend(out.tensors);
    }
    weight_map.sort_by(|a, b| a.0.cmp(&b.0));
    let index = json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map.into_iter().collect::<serde_json::Map<_, _>>(),
    });
    let actions: Vec<(&TensorInfo, TensorAction)> = tasks
        .iter()
        .flat_map(|g| g.tensors.iter().map(|t| (&t.info, t.action)))
        .collect();
    let config = files
        .config
        .as_ref()
        .map(|c| hf_config::rewrite(c, &actions));
    let mut report = Report {
        report_version: REPORT_VERSION,
        shardpress_version: env!("CARGO_PKG_VERSION").to_string(),
        recipe_name: recipe.name.clone(),
        recipe: recipe.source.clone(),
        totals: Default::default(),
        shards,
        tensors,
        copied_files: files.other_files.clone(),
        skipped_files: files.skipped_files.clone(),
    };
    report.compute_totals();
    Finalized {
        index,
        config,
        report,
    }
}

/// Options of a local run.
#[derive(Debug, Clone, Default)]
pub struct LocalOptions {
    /// Replace an existing output directory.
    pub overwrite: bool,
}

/// Pretty JSON with a trailing newline.
pub fn json_bytes(v: &impl serde::Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).unwrap_or_default();
    out.push(b'\n');
    out
}

fn out_err(path: &Path, problem: impl Into<String>) -> CompressError {
    CompressError::Output {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

fn io_out(path: &Path) -> impl Fn(std::io::Error) -> CompressError + '_ {
    move |e| out_err(path, e.to_string())
}

/// Refuses outputs that would overwrite or nest with the input.
fn check_output(input: &Path, out: &Path, overwrite: bool) -> Result<PathBuf, CompressError> {
    let input_abs = fs::canonicalize(input).map_err(io_out(input))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_out(&parent))?;
    let parent_abs = fs::canonicalize(&parent).map_err(io_out(&parent))?;
    let name = out
        .file_name()
        .ok_or_else(|| out_err(out, "output must name a directory"))?;
    let out_abs = parent_abs.join(name);
    if out_abs.starts_with(&input_abs) || input_abs.starts_with(&out_abs) {
        return Err(out_err(
            out,
            format!(
                "output overlaps the input {}; choose a directory outside it",
                input.display()
            ),
        ));
    }
    if let Ok(meta) = fs::symlink_metadata(&out_abs) {
        let empty_dir = meta.is_dir()
            && fs::read_dir(&out_abs)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty_dir && !overwrite {
            return Err(out_err(
                out,
                "already exists; choose another --out or pass --overwrite",
            ));
        }
        if !meta.is_dir() {
            return Err(out_err(out, "exists and is not a directory"));
        }
    }
    Ok(out_abs)
}

/// Compresses a local checkpoint into `out`, returning the report.
pub fn compress_local(
    input: &Path,
    recipe: &Recipe,
    out: &Path,
    opts: &LocalOptions,
    progress: &dyn Progress,
) -> Result<Report, CompressError> {
    let ckpt = Checkpoint::open_local(input)?;
    let out_abs = check_output(input, out, opts.overwrite)?;
    let plan = plan_job(&ckpt, recipe)?;
    let name = out_abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = out_abs.parent().unwrap_or(Path::new(".")).to_path_buf();
    let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_out(&staging))?;
    }
    fs::create_dir_all(&staging).map_err(io_out(&staging))?;
    let result = write_all(&ckpt, recipe, &plan, &staging, progress);
    match result {
        Ok(report) => {
            publish(&staging, &out_abs)?;
            Ok(report)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn write_all(
    ckpt: &Checkpoint,
    recipe: &Recipe,
    plan: &JobPlan,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<Report, CompressError> {
    let by_file: BTreeMap<&str, Arc<dyn ByteSource>> = ckpt
        .shards
        .iter()
        .map(|s| (s.file_name.as_str(), s.source.clone()))
        .collect();
    let results: Vec<Result<TaskOutput, CompressError>> = plan
        .tasks
        .par_iter()
        .with_max_len(1)
        .map(|task| {
            let sources: Vec<Arc<dyn ByteSource>> = task
                .inputs
                .iter()
                .filter_map(|i| by_file.get(i.file.as_str()).cloned())
                .collect();
            let path = staging.join(&task.file_name);
            let file = fs::File::create(&path).map_err(io_out(&path))?;
            run_task(task, &sources, BufWriter::new(file), progress)
        })
        .collect();
    let outputs = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let files = JobFiles::of(ckpt);
    let fin = finalize_metadata(recipe, &plan.tasks, outputs, &files);
    for rel in &ckpt.other_files {
        if rel == "config.json" && fin.config.is_some() {
            continue;
        }
        let from = Path::new(&ckpt.root).join(rel);
        let to = staging.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(io_out(p))?;
        }
        fs::copy(&from, &to).map_err(io_out(&from))?;
    }
    write_file(&staging.join(INDEX_FILE), &json_bytes(&fin.index))?;
    if let Some(c) = &fin.config {
        write_file(&staging.join("config.json"), &json_bytes(c))?;
    }
    write_file(&staging.join("report.json"), &json_bytes(&fin.report))?;
    Ok(fin.report)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CompressError> {
    fs::write(path, bytes).map_err(io_out(path))
}

/// Moves the finished staging directory into place, replacing an old output only after the
/// new one is complete.
fn publish(staging: &Path, out: &Path) -> Result<(), CompressError> {
    if out.exists() {
        let old = staging.with_extension("old");
        fs::rename(out, &old).map_err(io_out(out))?;
        fs::rename(staging, out).map_err(io_out(out))?;
        fs::remove_dir_all(&old).map_err(io_out(&old))?;
    } else {
        fs::rename(staging, out).map_err(io_out(out))?;
    }
    Ok(())
}
