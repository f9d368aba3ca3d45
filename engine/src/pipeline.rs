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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::checkpoint::{Checkpoint, CheckpointError, INDEX_FILE};
use crate::codec::{output_specs, prune_method, TransformError};
use crate::hf_config;
use crate::kernels::int_quant::Strategy;
use crate::memory::{MemoryPool, PoolStats, Reservation};
use crate::plan::{group_tensors, shard_file_name};
use crate::recipe::{Recipe, TensorAction, WeightQuant};
use crate::report::{
    LayerReport, Report, ShardReport, StructuredReport, TensorReport, REPORT_VERSION,
};
use crate::safetensors::{ShardWriter, TensorInfo, WriteError};
use crate::source::ByteSource;
use crate::stream;
use crate::structured::{choose_units, sliced_info, Fate, LayerCut, Slice, Structure, Unit};

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
    /// A tensor cannot be processed within the memory limit.
    #[error("tensor {tensor:?}: {problem}")]
    Memory {
        /// Tensor.
        tensor: String,
        /// Why.
        problem: String,
    },
    /// The recipe cannot be applied to this checkpoint.
    #[error("{0}")]
    Plan(String),
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
    /// Output name, when structured pruning renumbers its layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_name: Option<String>,
    /// Part kept by structured pruning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slice: Option<Slice>,
}

impl PlannedTensor {
    /// The header entry of the tensor the action applies to: renamed and sliced.
    pub fn out_info(&self) -> TensorInfo {
        match (&self.out_name, &self.slice) {
            (None, None) => self.info.clone(),
            (name, slice) => sliced_info(
                &self.info,
                name.as_deref().unwrap_or(&self.info.name),
                slice.as_ref(),
            ),
        }
    }
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
    /// Entity tag of the file's version at planning, when the store has one; reads are
    /// pinned to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
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
    /// Structured pruning of this layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<LayerCut>,
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
    if let Some(qc) = ckpt
        .config
        .as_ref()
        .and_then(|c| c.get("quantization_config"))
    {
        let method = qc
            .get("quant_method")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        return Err(CompressError::Plan(format!(
            "config.json: the input is already compressed (quantization_config, quant_method {method:?}); decompress it first (`shardpress decompress`)"
        )));
    }
    let structure = match &recipe.structured {
        Some(spec) => Some(Structure::plan(ckpt, spec).map_err(CompressError::Plan)?),
        None => None,
    };
    let groups = group_tensors(ckpt.tensors.keys().map(String::as_str));
    let mut tasks = Vec::with_capacity(groups.len());
    for g in groups {
        let mut inputs: Vec<TaskInput> = Vec::new();
        let mut tensors = Vec::with_capacity(g.tensors.len());
        for name in &g.tensors {
            let Some((shard, info)) = ckpt.info(name) else {
                continue;
            };
            let (out_name, slice) = match structure.as_ref().map(|s| s.fate(name)) {
                Some(Fate::Drop) => continue,
                Some(Fate::Keep { name: out, slice }) => ((out != *name).then_some(out), slice),
                None => (None, None),
            };
            let input = match inputs.iter().position(|f| f.file == shard.file_name) {
                Some(i) => i,
                None => {
                    inputs.push(TaskInput {
                        file: shard.file_name.clone(),
                        data_start: shard.header.data_start(),
                        len: shard.source.len(),
                        etag: None,
                    });
                    inputs.len() - 1
                }
            };
            let mut planned = PlannedTensor {
                input,
                info: info.clone(),
                action: TensorAction::Keep(crate::recipe::KeepReason::NoRule),
                out_name,
                slice,
            };
            planned.action = recipe
                .resolve(&planned.out_info())
                .map_err(|e| CompressError::Plan(format!("recipe {}: {e}", recipe.name)))?;
            tensors.push(planned);
        }
        if tensors.is_empty() {
            continue;
        }
        let cut = structure.as_ref().and_then(|s| {
            let names: Vec<&str> = tensors.iter().map(|t| t.info.name.as_str()).collect();
            s.layer_cut(&names)
        });
        let key = match &cut {
            Some(c) => format!("{}.{}", crate::structured::STACK, c.output_layer),
            None => g.key,
        };
        tasks.push(TaskSpec {
            key,
            file_name: String::new(),
            inputs,
            tensors,
            cut,
        });
    }
    let n = tasks.len();
    for (i, t) in tasks.iter_mut().enumerate() {
        t.file_name = shard_file_name(i + 1, n);
    }
    Ok(JobPlan { tasks })
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

/// Report action name and detail of an action, e.g. ("quantize", "int4 sym group 128, …").
pub fn describe(action: &TensorAction) -> (&'static str, String) {
    match action {
        TensorAction::Keep(r) => ("keep", r.to_string()),
        TensorAction::Cast(d) => ("cast", d.to_string()),
        TensorAction::Prune(p) => (
            "prune",
            format!("{}, {}", p.method.describe(), p.storage.format_name()),
        ),
        TensorAction::Quantize(q) => {
            let weights = match q.weights {
                WeightQuant::Int(p) => {
                    let strat = match p.strategy {
                        Strategy::Tensor => "tensor".to_string(),
                        Strategy::Channel => "channel".to_string(),
                        Strategy::Group(g) => format!("group {g}"),
                    };
                    let sym = if p.symmetric { "sym" } else { "asym" };
                    format!(
                        "int{} {sym} {strat}, {} scale, {}",
                        p.bits,
                        p.scale_dtype,
                        p.observer.name()
                    )
                }
                WeightQuant::Float(p) => format!(
                    "{} {}, {} scale",
                    p.format.dtype(),
                    if p.per_channel { "channel" } else { "tensor" },
                    p.scale_dtype
                ),
            };
            let mut d = format!("{weights}, {}", q.format().name());
            if let Some(a) = q.activations {
                d.push_str(&format!(", dynamic {a:?} activations").to_lowercase());
            }
            if let Some(m) = q.prune {
                d = format!("{} then {d}", m.describe());
            }
            ("quantize", d)
        }
    }
}

/// Bytes a task should reserve from a pool with `limit`: what it needs to run every tensor
/// whole, or the whole limit when that is more (its large tensors then stream in row
/// blocks). `extra` is memory the caller takes from the reservation besides the tensors
/// (upload buffers). `Err` names a tensor that cannot fit even one block.
pub fn task_reservation(
    task: &TaskSpec,
    limit: Option<u64>,
    extra: u64,
    threads: usize,
) -> Result<u64, CompressError> {
    let whole = stream::whole_task_need(task, threads).saturating_add(extra);
    match limit {
        None => Ok(whole),
        Some(limit) if whole <= limit => Ok(whole),
        Some(limit) => {
            let budget = limit.checked_sub(extra).ok_or_else(|| CompressError::Memory {
                tensor: task.tensors.first().map(|t| t.info.name.clone()).unwrap_or_default(),
                problem: format!(
                    "the memory limit of {limit} bytes does not cover the {extra} bytes of buffers a task needs besides its tensors"
                ),
            })?;
            stream::check_fits(task, budget, threads)?;
            Ok(limit)
        }
    }
}

/// Runs one task and writes its output shard to `sink`. `sources[i]` reads `task.inputs[i]`.
/// Every tensor buffer comes from `memory`, whose free bytes are the budget; tensors that do
/// not fit are processed in row blocks. Returns the per-tensor report rows and the file
/// length.
pub fn run_task<W: Write>(
    task: &TaskSpec,
    sources: &[Arc<dyn ByteSource>],
    sink: W,
    progress: &dyn Progress,
    memory: &Reservation,
) -> Result<TaskOutput, CompressError> {
    let group = task;
    let wrap = |source: WriteError| CompressError::Write {
        file: group.file_name.clone(),
        source,
    };
    let budget = memory.available();
    let inputs = stream::Inputs { task, sources };
    let specs: Vec<_> = group
        .tensors
        .iter()
        .flat_map(|t| output_specs(&t.out_info(), &t.action))
        .collect();
    let units = match &task.cut {
        Some(cut) => choose_layer_units(&inputs, cut, memory, budget)?,
        None => KeptUnits::default(),
    };
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = ShardWriter::new(sink, specs, &metadata).map_err(wrap)?;
    let mut rows = Vec::with_capacity(group.tensors.len());
    for t in &group.tensors {
        if progress.cancelled() {
            return Err(CompressError::Cancelled);
        }
        let _span = tracing::debug_span!("tensor", tensor = %t.info.name).entered();
        let info = t.out_info();
        let kept: &[u64] = match t.slice.map(|s| s.unit) {
            Some(Unit::Mlp) => &units.mlp,
            Some(Unit::Heads) => &units.heads,
            None => &[],
        };
        let done = stream::stream_tensor(&inputs, t, kept, &mut writer, memory, budget, progress)?;
        tracing::debug!(bytes_in = t.info.byte_len(), "tensor done");
        let (action, detail) = describe(&t.action);
        rows.push(TensorReport {
            name: t.info.name.clone(),
            shard: group.file_name.clone(),
            action: action.to_string(),
            detail,
            dtype: t.info.dtype.to_string(),
            shape: info.shape.clone(),
            bytes_in: t.info.byte_len(),
            bytes_out: done.specs.iter().map(|s| s.byte_len().unwrap_or(0)).sum(),
            outputs: done.specs.iter().map(|s| s.name.clone()).collect(),
            pruned: prune_method(&t.action).map(|_| done.pruned),
            error: done.stats.summary(),
        });
        progress.advance(t.info.byte_len());
    }
    let (_, len) = writer.finish().map_err(wrap)?;
    Ok(TaskOutput {
        tensors: rows,
        file_bytes: len,
        layer: task.cut.as_ref().map(|c| LayerReport {
            source_layer: c.source_layer,
            output_layer: c.output_layer,
            mlp_kept: units.mlp,
            kv_heads_kept: units.heads,
        }),
    })
}

/// Units a layer keeps.
#[derive(Debug, Default)]
struct KeptUnits {
    mlp: Vec<u64>,
    heads: Vec<u64>,
}

/// Ranks a layer's neurons and head groups from its weights.
fn choose_layer_units(
    inputs: &stream::Inputs<'_>,
    cut: &LayerCut,
    memory: &Reservation,
    budget: u64,
) -> Result<KeptUnits, CompressError> {
    let mut kept = KeptUnits::default();
    for (unit, slot) in [(&cut.mlp, &mut kept.mlp), (&cut.heads, &mut kept.heads)] {
        let Some(unit) = unit else { continue };
        let mut scores = vec![0f64; unit.units as usize];
        for scorer in &unit.scorers {
            let Some(t) = inputs.task.tensors.get(scorer.tensor) else {
                continue;
            };
            stream::stream_scores(inputs, t, scorer, &mut scores, memory, budget)?;
        }
        *slot = choose_units(&scores, unit.keep);
    }
    Ok(kept)
}

/// What a finished task produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskOutput {
    /// Report rows of its tensors.
    pub tensors: Vec<TensorReport>,
    /// Length of the output shard.
    pub file_bytes: u64,
    /// What structured pruning kept in this layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerReport>,
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
    // Planning validated the structure against this same config.
    let structure = match (&recipe.structured, &files.config) {
        (Some(spec), Some(config)) => Structure::from_config(config, spec).ok(),
        _ => None,
    };
    let mut weight_map: Vec<(String, Value)> = Vec::new();
    let mut total_size = 0u64;
    let mut shards = Vec::with_capacity(tasks.len());
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    for (g, out) in tasks.iter().zip(outputs) {
        layers.extend(out.layer);
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
    let out_infos: Vec<(TensorInfo, TensorAction)> = tasks
        .iter()
        .flat_map(|g| g.tensors.iter().map(|t| (t.out_info(), t.action)))
        .collect();
    let actions: Vec<(&TensorInfo, TensorAction)> =
        out_infos.iter().map(|(i, a)| (i, *a)).collect();
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
        structured: recipe.structured.as_ref().map(|s| StructuredReport {
            dropped_layers: s.drop_layers.clone(),
            layers,
        }),
    };
    report.compute_totals();
    let config = match files.config.as_ref() {
        Some(c) => {
            let c = hf_config::rewrite(c, &actions, report.totals.global_sparsity);
            Some(match structure {
                Some(s) => s.rewrite_config(&c),
                None => c,
            })
        }
        // Without an input config, loaders and `decompress` still need to know the layout.
        None => hf_config::quantization_config(&actions, report.totals.global_sparsity)
            .map(|q| json!({ "quantization_config": q })),
    };
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
    /// Threads (default: all cores). Output bytes do not depend on it.
    pub threads: Option<usize>,
    /// Memory budget in bytes for tensor buffers (default: none).
    pub memory_limit: Option<u64>,
}

/// What a local run produced.
#[derive(Debug, Clone)]
pub struct LocalRun {
    /// The job report (also written as report.json).
    pub report: Report,
    /// How the memory pool was used.
    pub memory: PoolStats,
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
pub(crate) fn check_output(
    input: &Path,
    out: &Path,
    overwrite: bool,
) -> Result<PathBuf, CompressError> {
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

/// Creates an empty staging directory next to `out_abs`, renamed into place when complete.
pub(crate) fn staging_dir(out_abs: &Path) -> Result<PathBuf, CompressError> {
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
    Ok(staging)
}

/// Compresses a local checkpoint into `out`, returning the report and memory statistics.
pub fn compress_local(
    input: &Path,
    recipe: &Recipe,
    out: &Path,
    opts: &LocalOptions,
    progress: &dyn Progress,
) -> Result<LocalRun, CompressError> {
    let threads = match opts.threads {
        Some(n) => n.max(1),
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let kernels = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| CompressError::Plan(format!("starting {threads} threads: {e}")))?;
    let ckpt = Checkpoint::open_local(input)?;
    let out_abs = check_output(input, out, opts.overwrite)?;
    let plan = plan_job(&ckpt, recipe)?;
    let pool = MemoryPool::new(opts.memory_limit);
    // Every task's reservation is known before any work starts, so a tensor that cannot fit
    // fails here, before anything is written.
    let needs = plan
        .tasks
        .iter()
        .map(|t| task_reservation(t, opts.memory_limit, 0, threads))
        .collect::<Result<Vec<_>, _>>()?;
    let staging = staging_dir(&out_abs)?;
    let result = write_all(
        &ckpt, recipe, &plan, &needs, &pool, &kernels, &staging, progress,
    );
    match result {
        Ok(report) => {
            publish(&staging, &out_abs)?;
            Ok(LocalRun {
                report,
                memory: pool.stats(),
            })
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// Cancels the other tasks once one fails.
struct StopOnError<'a> {
    inner: &'a dyn Progress,
    failed: &'a AtomicBool,
}

impl Progress for StopOnError<'_> {
    fn advance(&self, bytes: u64) {
        self.inner.advance(bytes);
    }

    fn cancelled(&self) -> bool {
        self.failed.load(Ordering::Relaxed) || self.inner.cancelled()
    }
}

#[allow(clippy::too_many_arguments)]
fn write_all(
    ckpt: &Checkpoint,
    recipe: &Recipe,
    plan: &JobPlan,
    needs: &[u64],
    pool: &MemoryPool,
    kernels: &rayon::ThreadPool,
    staging: &Path,
    progress: &dyn Progress,
) -> Result<Report, CompressError> {
    let by_file: BTreeMap<&str, Arc<dyn ByteSource>> = ckpt
        .shards
        .iter()
        .map(|s| (s.file_name.as_str(), s.source.clone()))
        .collect();
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let guarded = StopOnError {
        inner: progress,
        failed: &failed,
    };
    let results: Vec<Mutex<Option<Result<TaskOutput, CompressError>>>> =
        plan.tasks.iter().map(|_| Mutex::new(None)).collect();
    // Task threads take tasks in order and reserve their memory before starting, outside
    // the kernel threads, so a task waiting for memory never holds any.
    let runners = kernels.current_num_threads().min(plan.tasks.len()).max(1);
    std::thread::scope(|scope| {
        for _ in 0..runners {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(task) = plan.tasks.get(i) else { break };
                if guarded.cancelled() {
                    break;
                }
                let outcome = pool
                    .reserve(needs[i])
                    .map_err(|e| CompressError::Memory {
                        tensor: task.key.clone(),
                        problem: e.to_string(),
                    })
                    .and_then(|memory| {
                        let sources: Vec<Arc<dyn ByteSource>> = task
                            .inputs
                            .iter()
                            .filter_map(|i| by_file.get(i.file.as_str()).cloned())
                            .collect();
                        let path = staging.join(&task.file_name);
                        let file = fs::File::create(&path).map_err(io_out(&path))?;
                        kernels.install(|| {
                            run_task(task, &sources, BufWriter::new(file), &guarded, &memory)
                        })
                    });
                if outcome.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(outcome);
                }
            });
        }
    });
    let mut outputs = Vec::with_capacity(plan.tasks.len());
    let mut first_error = None;
    for slot in results {
        match slot.into_inner().ok().flatten() {
            Some(Ok(o)) => outputs.push(o),
            // A task stopped because another failed reports that other failure.
            Some(Err(CompressError::Cancelled)) if !progress.cancelled() => {}
            Some(Err(e)) => {
                first_error.get_or_insert(e);
            }
            None => {}
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if outputs.len() != plan.tasks.len() {
        return Err(CompressError::Cancelled);
    }
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
    let md = crate::report_render::to_markdown(&fin.report);
    write_file(&staging.join("report.md"), md.as_bytes())?;
    let html = crate::report_render::to_html(&fin.report);
    write_file(&staging.join("report.html"), html.as_bytes())?;
    Ok(fin.report)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CompressError> {
    fs::write(path, bytes).map_err(io_out(path))
}

/// Moves the finished staging directory into place, replacing an old output only after the
/// new one is complete.
pub(crate) fn publish(staging: &Path, out: &Path) -> Result<(), CompressError> {
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
