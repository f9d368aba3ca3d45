//! One tensor through its transform in row blocks that fit a memory budget.
//!
//! A tensor that fits is read and encoded whole. A larger one is split into blocks of rows:
//! statistics passes (per-tensor scales, a tensor-wide pruning threshold) read every block
//! first, then encoding passes read them again and append each output's bytes to the shard.
//! The shard is written front to back, so an output's bytes must be complete before the next
//! output starts: one pass streams an output and keeps the following ones in memory while
//! they fit a quarter of the budget; outputs that do not fit get a pass of their own. The
//! bytes are the same however the rows are split (see [`crate::codec::encode_block`]).

use std::io::Write;
use std::sync::Arc;

use crate::codec::{
    encode_block, needs_f32, output_specs, prune_method, Carry, GlobalsBuilder, TransformError,
};
use crate::kernels::int_quant::Strategy;
use crate::kernels::prune::{PruneMethod, PruneScope, ThresholdFinder};
use crate::memory::{Charge, PoolError, Reservation};
use crate::metrics::ErrorStats;
use crate::pipeline::{CompressError, PlannedTensor, Progress, TaskSpec};
use crate::recipe::{QuantFormat, TensorAction, WeightQuant};
use crate::safetensors::{ShardWriter, TensorInfo, TensorSpec, WriteError};
use crate::source::ByteSource;
use crate::structured::{add_scores, gather, Scorer};

/// Slack for small allocations that do not grow with the block.
const SLACK: u64 = 64 << 10;

/// Outputs kept in memory during a pass may use this fraction of the budget.
const HOLD_FRACTION: u64 = 4;

/// Memory model of encoding one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorCost {
    /// Rows of the tensor as written.
    pub rows: u64,
    /// Pooled bytes per row: what is read, the gathered copy and the f32 working copy.
    pub pooled_row: u64,
    /// Charged bytes per row: masks, encoded outputs and kernel intermediates.
    pub charged_row: u64,
    /// Bytes needed whatever the block size.
    pub fixed: u64,
    /// Blocks must hold a multiple of this many rows (packed zero points).
    pub row_multiple: u64,
    /// The tensor must be read whole (a sliced 1-D tensor).
    pub whole_only: bool,
    /// Byte length of each output, in write order.
    pub outputs: Vec<u64>,
}

impl TensorCost {
    /// Bytes to encode `rows` rows at once.
    pub fn block(&self, rows: u64) -> u64 {
        self.fixed
            .saturating_add(rows.saturating_mul(self.pooled_row.saturating_add(self.charged_row)))
    }

    /// Bytes to encode the whole tensor in one block.
    pub fn whole(&self) -> u64 {
        self.block(self.rows)
    }
}

fn width(info: &TensorInfo) -> u64 {
    u64::from(info.dtype.bits() / 8)
}

/// Bytes per row of the tensor as stored in the input (after slicing).
fn row_bytes(info: &TensorInfo) -> u64 {
    let (_, cols) = info.rows_cols();
    cols * width(info)
}

/// The memory model of `t`, with `threads` workers in its kernels.
pub fn tensor_cost(t: &PlannedTensor, threads: usize) -> TensorCost {
    let out = t.out_info();
    let (rows, cols) = out.rows_cols();
    let specs = output_specs(&out, &t.action);
    let outputs: Vec<u64> = specs.iter().map(|s| s.byte_len().unwrap_or(0)).collect();
    let sliced_1d = t.slice.is_some() && t.info.shape.len() < 2;
    let wide = match t.slice {
        Some(s) if s.axis != 0 && !sliced_1d => row_bytes(&t.info),
        _ => 0,
    };
    let out_row = row_bytes(&out);
    let f32_row = if needs_f32(&t.action) { cols * 4 } else { 0 };
    let per_row = |bytes: u64| if rows == 0 { 0 } else { bytes.div_ceil(rows) };
    let mut encoded_row: u64 = specs
        .iter()
        .zip(&outputs)
        .map(|(s, len)| {
            if s.name.ends_with(".compressed") {
                // Sparse values: a row may keep every element.
                out_row
            } else {
                per_row(*len)
            }
        })
        .sum();
    let mut extra_row = 0;
    match &t.action {
        TensorAction::Keep(_) => encoded_row = 0,
        TensorAction::Cast(_) => {}
        TensorAction::Prune(_) => extra_row += 2 * cols,
        TensorAction::Quantize(q) => {
            // Packed words are built before their bytes; int8 values are unpacked first.
            encoded_row *= 2;
            if q.prune.is_some() {
                extra_row += 2 * cols;
            }
            if q.format() != QuantFormat::PackQuantized {
                extra_row += cols;
            }
        }
    }
    let row_multiple = match &t.action {
        TensorAction::Quantize(q) => match (q.format(), q.weights) {
            (QuantFormat::PackQuantized, WeightQuant::Int(p))
                if !p.symmetric && p.strategy != Strategy::Tensor =>
            {
                p.pack_factor()
            }
            _ => 1,
        },
        _ => 1,
    };
    let small_outputs: u64 = outputs.iter().map(|l| (*l).min(4096)).sum();
    let threads = threads.max(1) as u64;
    let tensor_prune = matches!(
        prune_method(&t.action),
        Some(PruneMethod::Magnitude {
            scope: PruneScope::Tensor,
            ..
        })
    );
    // Per-row scratch in every kernel thread (cast round trips, row pruning indices).
    let fixed = SLACK
        + 2 * small_outputs
        + threads * 16 * cols
        + if tensor_prune {
            ThresholdFinder::MEMORY
        } else {
            0
        }
        + if sliced_1d { 2 * row_bytes(&t.info) } else { 0 };
    TensorCost {
        rows,
        pooled_row: out_row + wide + f32_row,
        charged_row: encoded_row + extra_row,
        fixed,
        row_multiple,
        whole_only: sliced_1d || rows <= 1,
        outputs,
    }
}

/// How a tensor is split under a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// Rows per block.
    pub rows_per_block: u64,
    /// Bytes of outputs that may be held in memory during a pass (0: every output but the
    /// streamed one gets its own pass).
    pub hold: u64,
}

/// Splits `cost`'s tensor into blocks that fit `budget`. `Err` says why no block fits.
pub fn blocking(cost: &TensorCost, budget: u64) -> Result<Blocking, String> {
    let rows = cost.rows.max(1);
    if cost.whole() <= budget {
        return Ok(Blocking {
            rows_per_block: rows,
            hold: 0,
        });
    }
    let need_one = cost.block(cost.row_multiple);
    if cost.whole_only {
        return Err(format!(
            "it must be processed whole and needs {} bytes, more than the memory budget of {budget} bytes",
            cost.whole()
        ));
    }
    let per_row = cost.pooled_row + cost.charged_row;
    for hold in [budget / HOLD_FRACTION, 0] {
        let room = budget.saturating_sub(cost.fixed).saturating_sub(hold);
        let r = (room / per_row.max(1)) / cost.row_multiple * cost.row_multiple;
        if r >= cost.row_multiple {
            return Ok(Blocking {
                rows_per_block: r.min(rows),
                hold,
            });
        }
    }
    Err(format!(
        "one block of {} row(s) needs {need_one} bytes, more than the memory budget of {budget} bytes; raise --memory-limit",
        cost.row_multiple
    ))
}

/// Bytes a task needs to run every tensor whole: the largest tensor (tensors run one after
/// another) or the largest scoring tensor of structured pruning.
pub fn whole_task_need(task: &TaskSpec, threads: usize) -> u64 {
    let tensors = task
        .tensors
        .iter()
        .map(|t| tensor_cost(t, threads).whole())
        .max()
        .unwrap_or(0);
    let scorers = scorer_costs(task).map(|c| c.whole()).max().unwrap_or(0);
    tensors.max(scorers)
}

/// Checks every tensor of `task` can be split to fit `budget`; `Err` names the first that
/// cannot.
pub fn check_fits(task: &TaskSpec, budget: u64, threads: usize) -> Result<(), CompressError> {
    for t in &task.tensors {
        blocking(&tensor_cost(t, threads), budget).map_err(|problem| CompressError::Memory {
            tensor: t.info.name.clone(),
            problem,
        })?;
    }
    for (t, c) in task
        .cut
        .iter()
        .flat_map(|cut| cut.mlp.iter().chain(cut.heads.iter()))
        .flat_map(|u| u.scorers.iter())
        .filter_map(|s| task.tensors.get(s.tensor))
        .zip(scorer_costs(task))
    {
        blocking(&c, budget).map_err(|problem| CompressError::Memory {
            tensor: t.info.name.clone(),
            problem,
        })?;
    }
    Ok(())
}

fn scorer_costs(task: &TaskSpec) -> impl Iterator<Item = TensorCost> + '_ {
    task.cut
        .iter()
        .flat_map(|cut| cut.mlp.iter().chain(cut.heads.iter()))
        .flat_map(|u| u.scorers.iter())
        .filter_map(|s| task.tensors.get(s.tensor))
        .map(scorer_costs_one)
}

/// Where a task's tensors are read from.
pub(crate) struct Inputs<'a> {
    pub(crate) task: &'a TaskSpec,
    pub(crate) sources: &'a [Arc<dyn ByteSource>],
}

impl Inputs<'_> {
    fn source(&self, t: &PlannedTensor) -> Result<(&dyn ByteSource, u64), CompressError> {
        match (self.sources.get(t.input), self.task.inputs.get(t.input)) {
            (Some(src), Some(input)) => Ok((src.as_ref(), input.data_start)),
            _ => Err(CompressError::Transform {
                file: self.task.file_name.clone(),
                source: TransformError {
                    tensor: t.info.name.clone(),
                    problem: format!(
                        "task names input #{} but has {}",
                        t.input,
                        self.task.inputs.len()
                    ),
                },
            }),
        }
    }

    /// Reads `buf.len()` bytes of `t`'s stored data starting `offset` bytes in.
    fn read(&self, t: &PlannedTensor, offset: u64, buf: &mut [u8]) -> Result<(), CompressError> {
        let (src, data_start) = self.source(t)?;
        let start = data_start + t.info.start + offset;
        // A read past the tensor's own bytes would take its neighbour's data.
        if offset.saturating_add(buf.len() as u64) > t.info.byte_len() {
            return Err(CompressError::Read {
                file: src.name().to_string(),
                tensor: t.info.name.clone(),
                start,
                end: start + buf.len() as u64,
                source: std::io::Error::other(format!(
                    "the range runs past the tensor's {} bytes",
                    t.info.byte_len()
                )),
            });
        }
        src.read_exact_at(start, buf)
            .map_err(|source| CompressError::Read {
                file: src.name().to_string(),
                tensor: t.info.name.clone(),
                start,
                end: start + buf.len() as u64,
                source,
            })
    }

    fn file_of(&self, t: &PlannedTensor) -> String {
        self.sources
            .get(t.input)
            .map(|s| s.name().to_string())
            .unwrap_or_else(|| self.task.file_name.clone())
    }
}

fn pool_err(tensor: &str) -> impl Fn(PoolError) -> CompressError + '_ {
    move |e| CompressError::Memory {
        tensor: tensor.to_string(),
        problem: e.to_string(),
    }
}

/// The bytes of rows `row0..row0 + n` of `t` as written (sliced when structured pruning
/// cuts it), in a pooled buffer, plus the charge of any gathered copy.
fn read_rows(
    inputs: &Inputs<'_>,
    t: &PlannedTensor,
    units: &[u64],
    row0: u64,
    n: u64,
    res: &Reservation,
) -> Result<(RowBytes, Option<Charge>), CompressError> {
    let name = t.info.name.as_str();
    let out = t.out_info();
    let out_row = row_bytes(&out);
    let in_row = row_bytes(&t.info);
    match t.slice {
        None => {
            let mut buf = res.buffer((n * in_row) as usize).map_err(pool_err(name))?;
            inputs.read(t, row0 * in_row, buf.bytes_mut())?;
            Ok((RowBytes::Pooled(buf), None))
        }
        Some(slice) if t.info.shape.len() < 2 => {
            let mut buf = res
                .buffer(t.info.byte_len() as usize)
                .map_err(pool_err(name))?;
            inputs.read(t, 0, buf.bytes_mut())?;
            let charge = res.charge(out.byte_len()).map_err(pool_err(name))?;
            let g = gather(&t.info, buf.bytes(), &slice, units);
            Ok((RowBytes::Owned(g), Some(charge)))
        }
        Some(slice) if slice.axis == 0 => {
            let mut buf = res.buffer((n * out_row) as usize).map_err(pool_err(name))?;
            // Output row r is input row `unit * len + r % len` of its unit, times the rows
            // under each index of axis 0.
            let (in_rows, _) = t.info.rows_cols();
            let per_index = (in_rows / t.info.shape[0].max(1)).max(1);
            let src_row = |r: u64| -> u64 {
                let (idx, within) = (r / per_index, r % per_index);
                let len = slice.unit_len.max(1);
                let unit = units.get((idx / len) as usize).copied().unwrap_or(0);
                (unit * len + idx % len) * per_index + within
            };
            let mut r = 0;
            while r < n {
                let first = src_row(row0 + r);
                let mut run = 1;
                while r + run < n && src_row(row0 + r + run) == first + run {
                    run += 1;
                }
                let dst =
                    &mut buf.bytes_mut()[(r * out_row) as usize..((r + run) * out_row) as usize];
                inputs.read(t, first * in_row, dst)?;
                r += run;
            }
            Ok((RowBytes::Pooled(buf), None))
        }
        Some(slice) => {
            let mut wide = res.buffer((n * in_row) as usize).map_err(pool_err(name))?;
            inputs.read(t, row0 * in_row, wide.bytes_mut())?;
            let mut block_info = t.info.clone();
            block_info.shape = vec![n, t.info.rows_cols().1];
            let charge = res.charge(n * out_row).map_err(pool_err(name))?;
            let g = gather(&block_info, wide.bytes(), &slice, units);
            Ok((RowBytes::Owned(g), Some(charge)))
        }
    }
}

enum RowBytes {
    Pooled(crate::memory::PoolBuf),
    Owned(Vec<u8>),
}

impl RowBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            RowBytes::Pooled(b) => b.bytes(),
            RowBytes::Owned(v) => v,
        }
    }
}

/// What encoding a tensor produced.
pub(crate) struct Streamed {
    pub(crate) specs: Vec<TensorSpec>,
    pub(crate) stats: ErrorStats,
    pub(crate) pruned: u64,
}

/// Reads, transforms and writes tensor `t` within `budget` bytes of `res`.
pub(crate) fn stream_tensor<W: Write>(
    inputs: &Inputs<'_>,
    t: &PlannedTensor,
    units: &[u64],
    writer: &mut ShardWriter<W>,
    res: &Reservation,
    budget: u64,
    progress: &dyn Progress,
) -> Result<Streamed, CompressError> {
    let info = t.out_info();
    let name = t.info.name.as_str();
    let threads = rayon::current_num_threads();
    let cost = tensor_cost(t, threads);
    let plan = blocking(&cost, budget).map_err(|problem| CompressError::Memory {
        tensor: name.to_string(),
        problem,
    })?;
    // A tensor without rows still takes one (empty) block: its shape outputs are written.
    let rows = cost.rows;
    let rpb = plan.rows_per_block.max(1);
    let blocks = rows.div_ceil(rpb).max(1);
    let specs = output_specs(&info, &t.action);
    let transform_err = |problem: String| CompressError::Transform {
        file: inputs.file_of(t),
        source: TransformError {
            tensor: info.name.clone(),
            problem,
        },
    };
    let wrap = |source: WriteError| CompressError::Write {
        file: inputs.task.file_name.clone(),
        source,
    };
    let (_, cols) = info.rows_cols();
    let f32_per_row = if needs_f32(&t.action) { cols * 4 } else { 0 };
    let block_range = |b: u64| -> (u64, u64) {
        let r0 = b * rpb;
        (r0, (rows - r0).min(rpb))
    };
    // A tensor read whole is read once for every pass.
    let mut reader = BlockReader {
        inputs,
        t,
        units,
        res,
        rows,
        rpb,
        current: None,
    };
    let prunes = prune_method(&t.action).is_some();

    // Statistics passes.
    let mut gb = GlobalsBuilder::new(&info, &t.action);
    while gb.pending() {
        for b in 0..blocks {
            check_cancel(progress)?;
            let (r0, n) = block_range(b);
            let bytes = reader.get(b)?;
            let mut w = res
                .buffer((n * f32_per_row) as usize)
                .map_err(pool_err(name))?;
            crate::codec::decode_rows(info.dtype, bytes, cols, r0, w.f32s_mut())
                .map_err(transform_err)?;
            let _mask = res
                .charge(if prunes { n * cols } else { 0 })
                .map_err(pool_err(name))?;
            gb.feed(w.f32s_mut()).map_err(transform_err)?;
        }
        gb.end_pass().map_err(transform_err)?;
    }
    let globals = gb.finish();

    // Encoding passes.
    let mut next = 0usize;
    let mut result: Option<Carry> = None;
    while next < specs.len() {
        let mut end = next + 1;
        let mut held = 0u64;
        while end < specs.len() && (blocks == 1 || held + cost.outputs[end] <= plan.hold) {
            held += cost.outputs[end];
            end += 1;
        }
        let _hold_charge = res
            .charge(if blocks == 1 { 0 } else { held })
            .map_err(pool_err(name))?;
        let mut kept: Vec<Vec<u8>> = (next + 1..end)
            .map(|j| Vec::with_capacity(cost.outputs[j] as usize))
            .collect();
        let mut carry = Carry::default();
        let mut written = 0u64;
        let mut complete = true;
        for b in 0..blocks {
            // Outputs that are already whole (shapes, per-tensor scales) need no more rows.
            if b > 0
                && written == cost.outputs[next]
                && (next + 1..end).all(|j| kept[j - next - 1].len() as u64 == cost.outputs[j])
            {
                complete = false;
                break;
            }
            check_cancel(progress)?;
            let (r0, n) = block_range(b);
            let bytes = reader.get(b)?;
            if let TensorAction::Keep(_) = t.action {
                writer.write_chunk(&specs[next].name, bytes).map_err(wrap)?;
                written += bytes.len() as u64;
                continue;
            }
            let mut w = res
                .buffer((n * f32_per_row) as usize)
                .map_err(pool_err(name))?;
            let _work = res
                .charge(n * cost.charged_row + cost.fixed)
                .map_err(pool_err(name))?;
            let pieces = encode_block(
                &info,
                &t.action,
                r0,
                bytes,
                w.f32s_mut(),
                &globals,
                &mut carry,
            )
            .map_err(transform_err)?;
            drop(w);
            for (j, piece) in pieces.into_iter().enumerate().skip(next).take(end - next) {
                if j == next {
                    writer.write_chunk(&specs[j].name, &piece).map_err(wrap)?;
                    written += piece.len() as u64;
                } else {
                    kept[j - next - 1].extend_from_slice(&piece);
                }
            }
        }
        for (j, bytes) in (next + 1..end).zip(&kept) {
            writer.write_chunk(&specs[j].name, bytes).map_err(wrap)?;
        }
        if complete && result.is_none() {
            result = Some(carry);
        }
        next = end;
    }
    let carry = result.unwrap_or_default();
    let pruned = carry.pruned();
    Ok(Streamed {
        specs,
        stats: carry.stats(),
        pruned,
    })
}

fn check_cancel(progress: &dyn Progress) -> Result<(), CompressError> {
    if progress.cancelled() {
        Err(CompressError::Cancelled)
    } else {
        Ok(())
    }
}

/// Reads row blocks of one tensor, keeping the last one so a tensor read whole is read once.
struct BlockReader<'a, 'b> {
    inputs: &'a Inputs<'b>,
    t: &'a PlannedTensor,
    units: &'a [u64],
    res: &'a Reservation,
    rows: u64,
    rpb: u64,
    current: Option<(u64, RowBytes, Option<Charge>)>,
}

impl BlockReader<'_, '_> {
    fn get(&mut self, b: u64) -> Result<&[u8], CompressError> {
        if self.current.as_ref().map(|c| c.0) != Some(b) {
            // Release the previous block before taking the next.
            self.current = None;
            let r0 = b * self.rpb;
            let n = (self.rows - r0).min(self.rpb);
            let (bytes, charge) = read_rows(self.inputs, self.t, self.units, r0, n, self.res)?;
            self.current = Some((b, bytes, charge));
        }
        Ok(self
            .current
            .as_ref()
            .map(|c| c.1.bytes())
            .unwrap_or_default())
    }
}

/// Adds the unit scores of scorer `s` (tensor `t`) to `scores`, reading it in row blocks.
pub(crate) fn stream_scores(
    inputs: &Inputs<'_>,
    t: &PlannedTensor,
    s: &Scorer,
    scores: &mut [f64],
    res: &Reservation,
    budget: u64,
) -> Result<(), CompressError> {
    let (rows, _) = t.info.rows_cols();
    let cost = scorer_costs_one(t);
    let plan = blocking(&cost, budget).map_err(|problem| CompressError::Memory {
        tensor: t.info.name.clone(),
        problem,
    })?;
    let in_row = row_bytes(&t.info);
    let rpb = plan.rows_per_block.max(1);
    let mut r0 = 0;
    while r0 < rows.max(1) {
        let n = (rows - r0).min(rpb);
        let mut buf = res
            .buffer((n * in_row) as usize)
            .map_err(pool_err(&t.info.name))?;
        inputs.read(t, r0 * in_row, buf.bytes_mut())?;
        add_scores(&t.info, buf.bytes(), s, scores, r0).map_err(|(row, col)| {
            CompressError::Transform {
                file: inputs.task.file_name.clone(),
                source: TransformError {
                    tensor: t.info.name.clone(),
                    problem: format!(
                        "non-finite weight at row {row}, column {col}; structured pruning cannot rank it"
                    ),
                },
            }
        })?;
        r0 += n;
        if rows == 0 {
            break;
        }
    }
    Ok(())
}

fn scorer_costs_one(t: &PlannedTensor) -> TensorCost {
    let (rows, cols) = t.info.rows_cols();
    TensorCost {
        rows,
        pooled_row: row_bytes(&t.info),
        charged_row: 0,
        fixed: 64 + cols * 4,
        row_multiple: 1,
        whole_only: rows <= 1,
        outputs: Vec::new(),
    }
}
