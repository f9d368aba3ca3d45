//! Output layouts: which tensors a transformed input tensor becomes, and their bytes.
//!
//! For a module `m` (tensor `m.weight`, `rows × cols`), in compressed-tensors layouts:
//! - `pack-quantized` (integer weights, 2 to 8 bits): `m.weight_packed` (I32 words of
//!   offset-binary values packed LSB-first along each row), `m.weight_scale` (`[rows, groups]`,
//!   or `[1]` per tensor), `m.weight_shape` (I64 `[rows, cols]`) and, when asymmetric,
//!   `m.weight_zero_point` (I32, packed along the rows);
//! - `int-quantized` (8-bit integer weights with activation quantization): `m.weight` (I8),
//!   `m.weight_scale` and, when asymmetric, `m.weight_zero_point` (I8, the scale's shape);
//! - `float-quantized` (FP8): `m.weight` (F8_E4M3 or F8_E5M2) and `m.weight_scale`;
//! - `sparse-bitmask` (pruned, unquantized): `m.shape` (I64 `[2]`), `m.compressed` (the kept
//!   values, 1-D, original dtype), `m.bitmask` (U8 `[rows, ceil(cols / 8)]`) and
//!   `m.row_offsets` (I64 `[rows]`).
//!
//! Pruned tensors stored densely, and pruned-then-quantized ones, keep their zeros in place.

use rayon::prelude::*;

use crate::dtype::DType;
use crate::kernels::bitmask;
use crate::kernels::convert::{cast_bytes, decode_f32, encode_one};
use crate::kernels::fp8::{self, FloatParams};
use crate::kernels::int_quant::{
    self, tensor_scale_error, IntParams, QuantError, Strategy, TensorObserver,
};
use crate::kernels::lanes;
use crate::kernels::prune::{self, PruneMethod, PruneScope, Threshold, ThresholdFinder};
use crate::metrics::ErrorStats;
use crate::recipe::{QuantFormat, SparseStorage, TensorAction, WeightQuant};
use crate::safetensors::{TensorInfo, TensorSpec};

/// Elements per parallel work item in elementwise kernels.
const CHUNK: usize = 1 << 16;

/// A tensor that could not be transformed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("tensor {tensor:?}: {problem}")]
pub struct TransformError {
    /// Tensor name.
    pub tensor: String,
    /// What went wrong.
    pub problem: String,
}

/// Output tensors of one input tensor, with their bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Output tensors in write order.
    pub tensors: Vec<(TensorSpec, Vec<u8>)>,
    /// Reconstruction error.
    pub stats: ErrorStats,
    /// Elements set to zero by pruning, when pruned.
    pub pruned: Option<u64>,
}

/// Module name of a `.weight` tensor (`a.b.weight` → `a.b`).
pub fn module_name(tensor: &str) -> &str {
    tensor.strip_suffix(".weight").unwrap_or(tensor)
}

fn param_shape(strategy: Strategy, rows: u64, cols: u64) -> Vec<u64> {
    match strategy {
        Strategy::Tensor => vec![1],
        Strategy::Channel => vec![rows, 1],
        Strategy::Group(g) => vec![rows, cols.div_ceil(g.max(1))],
    }
}

/// The output tensors `info` becomes under `action`, in write order.
pub fn output_specs(info: &TensorInfo, action: &TensorAction) -> Vec<TensorSpec> {
    let (rows, cols) = info.rows_cols();
    let m = module_name(&info.name);
    match action {
        TensorAction::Keep(_) => vec![TensorSpec::new(&info.name, info.dtype, info.shape.clone())],
        TensorAction::Cast(d) => vec![TensorSpec::new(&info.name, *d, info.shape.clone())],
        TensorAction::Prune(p) => match p.storage {
            SparseStorage::Dense => {
                vec![TensorSpec::new(&info.name, info.dtype, info.shape.clone())]
            }
            SparseStorage::Bitmask => vec![
                TensorSpec::new(format!("{m}.shape"), DType::I64, vec![2]),
                TensorSpec::new(
                    format!("{m}.compressed"),
                    info.dtype,
                    vec![prune::kept_count(rows, cols, &p.method)],
                ),
                TensorSpec::new(
                    format!("{m}.bitmask"),
                    DType::U8,
                    vec![rows, bitmask::mask_row_bytes(cols)],
                ),
                TensorSpec::new(format!("{m}.row_offsets"), DType::I64, vec![rows]),
            ],
        },
        TensorAction::Quantize(q) => match (q.format(), q.weights) {
            (QuantFormat::PackQuantized, WeightQuant::Int(p)) => {
                let mut out = vec![
                    TensorSpec::new(
                        format!("{m}.weight_packed"),
                        DType::I32,
                        vec![rows, p.words_per_row(cols)],
                    ),
                    TensorSpec::new(
                        format!("{m}.weight_scale"),
                        p.scale_dtype,
                        param_shape(p.strategy, rows, cols),
                    ),
                    TensorSpec::new(format!("{m}.weight_shape"), DType::I64, vec![2]),
                ];
                if !p.symmetric {
                    let zp_shape = match p.strategy {
                        Strategy::Tensor => vec![1],
                        _ => {
                            let (prow, pcols) = p.param_shape(rows, cols);
                            vec![prow.div_ceil(p.pack_factor()), pcols]
                        }
                    };
                    out.push(TensorSpec::new(
                        format!("{m}.weight_zero_point"),
                        DType::I32,
                        zp_shape,
                    ));
                }
                out
            }
            (_, WeightQuant::Int(p)) => {
                let shape = param_shape(p.strategy, rows, cols);
                let mut out = vec![
                    TensorSpec::new(format!("{m}.weight"), DType::I8, vec![rows, cols]),
                    TensorSpec::new(format!("{m}.weight_scale"), p.scale_dtype, shape.clone()),
                ];
                if !p.symmetric {
                    out.push(TensorSpec::new(
                        format!("{m}.weight_zero_point"),
                        DType::I8,
                        shape,
                    ));
                }
                out
            }
            (_, WeightQuant::Float(p)) => {
                let strategy = if p.per_channel {
                    Strategy::Channel
                } else {
                    Strategy::Tensor
                };
                vec![
                    TensorSpec::new(format!("{m}.weight"), p.format.dtype(), vec![rows, cols]),
                    TensorSpec::new(
                        format!("{m}.weight_scale"),
                        p.scale_dtype,
                        param_shape(strategy, rows, cols),
                    ),
                ]
            }
        },
    }
}

/// Whole-tensor values the encoding of a row block depends on, found by statistics passes
/// over the tensor before it is encoded (see [`GlobalsBuilder`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Globals {
    /// Tensor-scope magnitude pruning threshold.
    pub threshold: Option<Threshold>,
    /// Per-tensor integer scale and zero point.
    pub int_tensor: Option<(f32, i8)>,
    /// Per-tensor FP8 scale.
    pub fp8_tensor: Option<f32>,
}

/// State carried from one row block of a tensor to the next, in row order.
#[derive(Debug, Clone, Default)]
pub struct Carry {
    ties_seen: u64,
    stats: ErrorStats,
    removed: ErrorStats,
    pruned: u64,
    nnz: u64,
}

impl Carry {
    /// Reconstruction error over the rows seen, including pruned elements.
    pub fn stats(&self) -> ErrorStats {
        let mut s = self.stats;
        s.merge(&self.removed);
        s
    }

    /// Elements pruned so far.
    pub fn pruned(&self) -> u64 {
        self.pruned
    }
}

/// The pruning an action applies before storing or quantizing, if any.
pub fn prune_method(action: &TensorAction) -> Option<PruneMethod> {
    match action {
        TensorAction::Prune(p) => Some(p.method),
        TensorAction::Quantize(q) => q.prune,
        _ => None,
    }
}

/// Whether encoding `action` works on decoded f32 values (else on raw bytes).
pub fn needs_f32(action: &TensorAction) -> bool {
    matches!(action, TensorAction::Prune(_) | TensorAction::Quantize(_))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    High,
    Low,
    Range,
    Errors,
    Absmax,
    Done,
}

/// Computes [`Globals`] from passes over a tensor's rows: while [`GlobalsBuilder::pending`],
/// feed every row block in order to [`GlobalsBuilder::feed`], then call
/// [`GlobalsBuilder::end_pass`]. A tensor whose encoding needs nothing global takes no pass.
#[derive(Debug, Clone)]
pub struct GlobalsBuilder {
    cols: u64,
    method: Option<PruneMethod>,
    finder: Option<ThresholdFinder>,
    observer: Option<TensorObserver>,
    float: Option<FloatParams>,
    absmax: f32,
    ties_seen: u64,
    stage: Stage,
    globals: Globals,
}

impl GlobalsBuilder {
    /// A builder for `info` (the tensor as encoded) under `action`.
    pub fn new(info: &TensorInfo, action: &TensorAction) -> Self {
        let (_, cols) = info.rows_cols();
        let method = prune_method(action);
        let finder = match method {
            Some(PruneMethod::Magnitude {
                sparsity,
                scope: PruneScope::Tensor,
            }) => Some(ThresholdFinder::new(info.numel(), sparsity)).filter(|f| f.needs_pass()),
            _ => None,
        };
        let (observer, float) = match action {
            TensorAction::Quantize(q) => match q.weights {
                WeightQuant::Int(p) if p.strategy == Strategy::Tensor && info.numel() > 0 => {
                    (Some(TensorObserver::new(&p)), None)
                }
                WeightQuant::Float(p) if !p.per_channel => (None, Some(p)),
                _ => (None, None),
            },
            _ => (None, None),
        };
        let mut b = Self {
            cols,
            method,
            finder,
            observer,
            float,
            absmax: 0.0,
            ties_seen: 0,
            stage: Stage::High,
            globals: Globals::default(),
        };
        b.stage = b.first_stage();
        b
    }

    fn first_stage(&self) -> Stage {
        if self.finder.is_some() {
            Stage::High
        } else {
            self.after_prune()
        }
    }

    fn after_prune(&self) -> Stage {
        if self.observer.is_some() {
            Stage::Range
        } else if self.float.is_some() {
            Stage::Absmax
        } else {
            Stage::Done
        }
    }

    /// Whether another pass is needed.
    pub fn pending(&self) -> bool {
        self.stage != Stage::Done
    }

    /// Passes still to come, counting the current one.
    pub fn passes_left(&self) -> usize {
        let mut n = 0;
        let mut st = self.stage;
        loop {
            st = match st {
                Stage::High => Stage::Low,
                Stage::Low => self.after_prune(),
                Stage::Range => match &self.observer {
                    Some(o) if o.needs_errors() => Stage::Errors,
                    _ => Stage::Done,
                },
                Stage::Errors | Stage::Absmax => Stage::Done,
                Stage::Done => return n,
            };
            n += 1;
        }
    }

    /// Feeds the next row block (decoded, finite); the builder may overwrite it.
    pub fn feed(&mut self, w: &mut [f32]) -> Result<(), String> {
        let cols = self.cols;
        match self.stage {
            Stage::High => {
                if let Some(f) = &mut self.finder {
                    f.high_pass(w);
                }
            }
            Stage::Low => {
                if let Some(f) = &mut self.finder {
                    f.low_pass(w);
                }
            }
            Stage::Range | Stage::Errors | Stage::Absmax => {
                if let Some(m) = &self.method {
                    let mut keep = vec![true; w.len()];
                    block_mask(
                        w,
                        cols,
                        m,
                        self.globals.threshold.as_ref(),
                        &mut self.ties_seen,
                        &mut keep,
                    );
                    prune::apply(w, &keep);
                }
                match self.stage {
                    Stage::Range => {
                        if let Some(o) = &mut self.observer {
                            o.range(w, cols);
                        }
                    }
                    Stage::Errors => {
                        if let Some(o) = &mut self.observer {
                            o.errors(w, cols).map_err(|scale| {
                                tensor_scale_error(scale, &o_params(o)).to_string()
                            })?;
                        }
                    }
                    _ => self.absmax = self.absmax.max(fp8::absmax(w, cols)),
                }
            }
            Stage::Done => {}
        }
        Ok(())
    }

    /// Ends a pass over all blocks.
    pub fn end_pass(&mut self) -> Result<(), String> {
        self.ties_seen = 0;
        self.stage = match self.stage {
            Stage::High => {
                if let Some(f) = &mut self.finder {
                    f.choose_high();
                }
                Stage::Low
            }
            Stage::Low => {
                self.globals.threshold = self.finder.as_ref().and_then(ThresholdFinder::finish);
                self.after_prune()
            }
            Stage::Range if self.observer.as_ref().is_some_and(|o| o.needs_errors()) => {
                Stage::Errors
            }
            Stage::Range | Stage::Errors => {
                if let Some(o) = &self.observer {
                    let params = o_params(o);
                    self.globals.int_tensor = Some(
                        o.finish()
                            .map_err(|scale| tensor_scale_error(scale, &params).to_string())?,
                    );
                }
                Stage::Done
            }
            Stage::Absmax => {
                if let Some(p) = &self.float {
                    self.globals.fp8_tensor =
                        Some(fp8::tensor_scale(self.absmax, p).map_err(|e| e.to_string())?);
                }
                Stage::Done
            }
            Stage::Done => Stage::Done,
        };
        Ok(())
    }

    /// The values found.
    pub fn finish(&self) -> Globals {
        self.globals
    }
}

fn o_params(o: &TensorObserver) -> IntParams {
    o.params()
}

/// The keep-mask of a row block: tensor-scope magnitude pruning by `threshold` (counting
/// ties across blocks in `seen`), the other methods row by row.
fn block_mask(
    w: &[f32],
    cols: u64,
    method: &PruneMethod,
    threshold: Option<&Threshold>,
    seen: &mut u64,
    keep: &mut [bool],
) {
    match method {
        PruneMethod::Magnitude {
            scope: PruneScope::Tensor,
            ..
        } => match threshold {
            Some(t) => t.apply_mask(w, seen, keep),
            None => keep.fill(true),
        },
        _ => keep.copy_from_slice(&prune::mask(w, cols, method)),
    }
}

/// Decodes a row block (whose first row is `row0`) to f32, refusing NaN and infinities with
/// their position.
pub fn decode_rows(
    dtype: DType,
    bytes: &[u8],
    cols: u64,
    row0: u64,
    out: &mut [f32],
) -> Result<(), TransformProblem> {
    let sw = (dtype.bits() / 8) as usize;
    let finite = out
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * sw))
        .map(|(o, b)| {
            decode_f32(dtype, b, o);
            lanes::all_finite(o)
        })
        .reduce(|| true, |a, b| a && b);
    let cols = (cols as usize).max(1);
    if finite {
        return Ok(());
    }
    if let Some(i) = out.par_iter().position_first(|x| !x.is_finite()) {
        return Err(QuantError::NonFinite {
            row: row0 + (i / cols) as u64,
            col: (i % cols) as u64,
            value: out[i],
        }
        .to_string());
    }
    Ok(())
}

/// A problem with a tensor's values, to be named with the tensor.
pub type TransformProblem = String;

/// Encodes one row block (rows `row0..`, raw `bytes` in the input dtype) of the tensor `info`
/// into its pieces of each output of [`output_specs`], in order. Outputs that do not grow
/// with the rows (shapes, per-tensor scales) come whole with the block at row 0 and empty
/// otherwise. `w` is scratch for the block's f32 values when [`needs_f32`]. Blocks must come
/// in row order with one `carry`; splitting rows into blocks does not change any byte.
pub fn encode_block(
    info: &TensorInfo,
    action: &TensorAction,
    row0: u64,
    bytes: &[u8],
    w: &mut [f32],
    g: &Globals,
    carry: &mut Carry,
) -> Result<Vec<Vec<u8>>, TransformProblem> {
    let (rows, cols) = info.rows_cols();
    let width = (info.dtype.bits() / 8) as usize;
    let block_rows = if cols == 0 || width == 0 {
        if row0 == 0 {
            rows
        } else {
            0
        }
    } else {
        (bytes.len() / (cols as usize * width)) as u64
    };
    let first = row0 == 0;
    let stat = |v: Vec<u8>| if first { v } else { Vec::new() };
    match action {
        TensorAction::Keep(_) => Ok(vec![bytes.to_vec()]),
        TensorAction::Cast(dst) => {
            let out = cast_rows(info.dtype, *dst, bytes, cols, row0, &mut carry.stats)?;
            Ok(vec![out])
        }
        TensorAction::Prune(p) => {
            let w = &mut w[..bytes.len() / width.max(1)];
            decode_rows(info.dtype, bytes, cols, row0, w)?;
            let mut keep = vec![true; w.len()];
            block_mask(
                w,
                cols,
                &p.method,
                g.threshold.as_ref(),
                &mut carry.ties_seen,
                &mut keep,
            );
            let c = (cols as usize).max(1);
            let per_row: Vec<(ErrorStats, u64)> = w
                .par_chunks(c)
                .zip(keep.par_chunks(c))
                .with_min_len((CHUNK / c).max(1))
                .map(|(row, kr)| pruned_row_stats(row, kr))
                .collect();
            for (rs, pruned) in &per_row {
                carry.stats.merge(rs);
                carry.pruned += pruned;
            }
            Ok(match p.storage {
                SparseStorage::Dense => {
                    let mut out = bytes.to_vec();
                    for (elem, k) in out.chunks_exact_mut(width.max(1)).zip(&keep) {
                        if !k {
                            elem.fill(0);
                        }
                    }
                    vec![out]
                }
                SparseStorage::Bitmask => {
                    let b = bitmask::compress(bytes, &keep, block_rows, cols, width);
                    let offsets: Vec<i64> =
                        b.row_offsets.iter().map(|o| o + carry.nnz as i64).collect();
                    carry.nnz += b.nnz;
                    vec![
                        stat(i64_bytes(&[rows as i64, cols as i64])),
                        b.values,
                        b.bitmask,
                        i64_bytes(&offsets),
                    ]
                }
            })
        }
        TensorAction::Quantize(q) => {
            // Without pruning, per-row parameters are computed from each row alone, so rows
            // go from raw bytes to output while in cache.
            let fused = q.prune.is_none()
                && match q.weights {
                    WeightQuant::Int(p) => p.strategy != Strategy::Tensor,
                    WeightQuant::Float(p) => p.per_channel,
                };
            let w = &mut w[..if fused { 0 } else { bytes.len() / width.max(1) }];
            if !fused {
                decode_rows(info.dtype, bytes, cols, row0, w)?;
            }
            if let Some(method) = &q.prune {
                let mut keep = vec![true; w.len()];
                block_mask(
                    w,
                    cols,
                    method,
                    g.threshold.as_ref(),
                    &mut carry.ties_seen,
                    &mut keep,
                );
                let c = (cols as usize).max(1);
                for (row, kr) in w.chunks_mut(c).zip(keep.chunks(c)) {
                    let mut removed = ErrorStats::default();
                    for (x, k) in row.iter_mut().zip(kr) {
                        if !k {
                            let e = f64::from(*x) * f64::from(*x);
                            removed.sum_sq_err += e;
                            removed.sum_sq_ref += e;
                            removed.max_abs_err = removed.max_abs_err.max(x.abs());
                            *x = 0.0;
                            carry.pruned += 1;
                        }
                    }
                    carry.removed.merge(&removed);
                }
            }
            let err = |e: QuantError| e.to_string();
            let w: &[f32] = w;
            // Integer codes of the block: from the raw bytes when fused, else from `w`.
            let int_block = |p: &IntParams, stats: &mut ErrorStats| {
                if fused {
                    int_quant::quantize_raw_rows(
                        info.dtype, bytes, block_rows, cols, p, row0, stats,
                    )
                } else {
                    int_quant::quantize_rows(w, block_rows, cols, p, g.int_tensor, row0, stats)
                }
            };
            match (q.format(), q.weights) {
                (QuantFormat::PackQuantized, WeightQuant::Int(p)) => {
                    let r = int_block(&p, &mut carry.stats).map_err(err)?;
                    let tensor = p.strategy == Strategy::Tensor;
                    let mut blobs = vec![
                        u32_bytes(&r.packed),
                        if tensor {
                            stat(scale_bytes(&r.scales, p.scale_dtype))
                        } else {
                            scale_bytes(&r.scales, p.scale_dtype)
                        },
                        stat(i64_bytes(&[rows as i64, cols as i64])),
                    ];
                    if !p.symmetric {
                        blobs.push(if tensor {
                            stat(u32_bytes(&int_quant::pack_along_rows(
                                &r.zero_points,
                                1,
                                1,
                                p.bits,
                            )))
                        } else {
                            let (prow, pcols) = p.param_shape(block_rows, cols);
                            u32_bytes(&int_quant::pack_along_rows(
                                &r.zero_points,
                                prow,
                                pcols,
                                p.bits,
                            ))
                        });
                    }
                    Ok(blobs)
                }
                (_, WeightQuant::Int(p)) => {
                    let r = int_block(&p, &mut carry.stats).map_err(err)?;
                    let tensor = p.strategy == Strategy::Tensor;
                    let values = int_quant::unpack_values(&r.packed, block_rows, cols, p.bits);
                    let scales = scale_bytes(&r.scales, p.scale_dtype);
                    let zps: Vec<u8> = r.zero_points.iter().map(|z| *z as u8).collect();
                    let mut blobs = vec![
                        values.iter().map(|v| *v as u8).collect(),
                        if tensor { stat(scales) } else { scales },
                    ];
                    if !p.symmetric {
                        blobs.push(if tensor { stat(zps) } else { zps });
                    }
                    Ok(blobs)
                }
                (_, WeightQuant::Float(p)) => {
                    let r = if fused {
                        fp8::quantize_raw_rows(
                            info.dtype,
                            bytes,
                            block_rows,
                            cols,
                            &p,
                            row0,
                            &mut carry.stats,
                        )
                    } else {
                        fp8::quantize_rows(
                            w,
                            block_rows,
                            cols,
                            &p,
                            g.fp8_tensor,
                            row0,
                            &mut carry.stats,
                        )
                    }
                    .map_err(err)?;
                    let scales = scale_bytes(&r.scales, p.scale_dtype);
                    Ok(vec![
                        r.values,
                        if p.per_channel { scales } else { stat(scales) },
                    ])
                }
            }
        }
    }
}

/// Reconstruction error of a pruned row (kept elements exact, pruned ones zero) and the
/// number pruned, summed per lane.
fn pruned_row_stats(row: &[f32], keep: &[bool]) -> (ErrorStats, u64) {
    let mut acc = lanes::LaneStats::default();
    let mut kept = 0u64;
    let mut xc = row.chunks_exact(lanes::L);
    let mut kc = keep.chunks_exact(lanes::L);
    for (x, k) in (&mut xc).zip(&mut kc) {
        let x = lanes::chunk(x);
        let y: [f32; lanes::L] = std::array::from_fn(|i| if k[i] { x[i] } else { 0.0 });
        kept += k.iter().map(|&b| u64::from(b)).sum::<u64>();
        acc.add_chunk(&x, &y);
    }
    let (xt, kt) = (xc.remainder(), kc.remainder());
    let mut y = [0f32; lanes::L];
    for ((x, k), o) in xt.iter().zip(kt).zip(y.iter_mut()) {
        *o = if *k { *x } else { 0.0 };
    }
    kept += kt.iter().map(|&b| u64::from(b)).sum::<u64>();
    acc.add_tail(xt, &y[..xt.len()]);
    (acc.finish(), row.len() as u64 - kept)
}

/// Transforms one whole tensor's raw bytes according to `action`: the statistics passes
/// and one block holding every row.
pub fn transform(
    info: &TensorInfo,
    action: &TensorAction,
    bytes: &[u8],
) -> Result<Encoded, TransformError> {
    let fail = |problem: String| TransformError {
        tensor: info.name.clone(),
        problem,
    };
    let specs = output_specs(info, action);
    let width = (info.dtype.bits() / 8) as usize;
    let (_, cols) = info.rows_cols();
    let mut w = if needs_f32(action) {
        vec![0f32; bytes.len() / width.max(1)]
    } else {
        Vec::new()
    };
    let mut gb = GlobalsBuilder::new(info, action);
    while gb.pending() {
        decode_rows(info.dtype, bytes, cols, 0, &mut w).map_err(fail)?;
        gb.feed(&mut w).map_err(fail)?;
        gb.end_pass().map_err(fail)?;
    }
    let mut carry = Carry::default();
    let blobs =
        encode_block(info, action, 0, bytes, &mut w, &gb.finish(), &mut carry).map_err(fail)?;
    Ok(Encoded {
        tensors: specs.into_iter().zip(blobs).collect(),
        stats: carry.stats(),
        pruned: prune_method(action).map(|_| carry.pruned),
    })
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 4];
    for (o, x) in out.chunks_exact_mut(4).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

/// Casts a whole buffer of float elements; `Err` names the first finite element the target
/// type cannot hold.
pub(crate) fn cast(
    src: DType,
    dst: DType,
    bytes: &[u8],
    numel: usize,
) -> Result<(Vec<u8>, ErrorStats), String> {
    let mut stats = ErrorStats::default();
    let cols = numel.clamp(1, CHUNK) as u64;
    let out = cast_rows(src, dst, bytes, cols, 0, &mut stats)?;
    Ok((out, stats))
}

/// Casts rows of `cols` float elements (a last partial row is allowed), merging each row's
/// error into `stats` in order; `Err` names the first finite element the target type cannot
/// hold, counting elements from row 0 of the tensor (`row0` is the block's first row).
fn cast_rows(
    src: DType,
    dst: DType,
    bytes: &[u8],
    cols: u64,
    row0: u64,
    stats: &mut ErrorStats,
) -> Result<Vec<u8>, String> {
    let sw = (src.bits() / 8) as usize;
    let dw = (dst.bits() / 8) as usize;
    let numel = bytes.len() / sw.max(1);
    let cols = (cols as usize).max(1);
    let mut out = vec![0u8; numel * dw];
    // Several rows per work item when rows are short; errors are still kept per row.
    let rows_per_item = (CHUNK / cols).max(1);
    let parts: Vec<Result<Vec<ErrorStats>, (usize, f32)>> = bytes
        .par_chunks(rows_per_item * cols * sw)
        .zip(out.par_chunks_mut(rows_per_item * cols * dw))
        .enumerate()
        .map(|(item, (inp, o))| {
            let mut orig = vec![0f32; cols];
            let mut back = vec![0f32; cols];
            let mut row_stats = Vec::with_capacity(rows_per_item);
            for (r, (ri, ro)) in inp
                .chunks(cols * sw)
                .zip(o.chunks_mut(cols * dw))
                .enumerate()
            {
                let n = ri.len() / sw;
                decode_f32(src, ri, &mut orig[..n]);
                cast_bytes(src, dst, ri, ro, &mut back[..n]);
                if let Some(i) = orig[..n]
                    .iter()
                    .zip(&back[..n])
                    .position(|(a, b)| a.is_finite() && !b.is_finite())
                {
                    return Err(((item * rows_per_item + r) * cols + i, orig[i]));
                }
                row_stats.push(ErrorStats::compare(&orig[..n], &back[..n]));
            }
            Ok(row_stats)
        })
        .collect();
    for p in parts {
        match p {
            Ok(rows) => rows.iter().for_each(|r| stats.merge(r)),
            Err((i, v)) => {
                let i = row0 as usize * cols + i;
                return Err(format!(
                    "element {i} ({v:e}) overflows {dst}; cast to a wider type or leave this tensor alone"
                ));
            }
        }
    }
    Ok(out)
}

fn scale_bytes(scales: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(scales.len() * 4);
    for s in scales {
        encode_one(dtype, *s, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fp8::Fp8Format;
    use crate::kernels::int_quant::Observer;
    use crate::recipe::{ActStrategy, KeepReason, PruneAction, QuantAction};

    fn info(dtype: DType, shape: Vec<u64>) -> TensorInfo {
        let end = dtype.byte_size(shape.iter().product()).unwrap_or(0);
        TensorInfo {
            name: "l.0.q.weight".into(),
            dtype,
            shape,
            start: 0,
            end,
        }
    }

    fn int(bits: u8, symmetric: bool, strategy: Strategy, scale_dtype: DType) -> IntParams {
        IntParams {
            bits,
            symmetric,
            strategy,
            scale_dtype,
            observer: Observer::Minmax,
        }
    }

    fn quant(weights: WeightQuant, act: bool, prune: Option<PruneMethod>) -> TensorAction {
        TensorAction::Quantize(QuantAction {
            weights,
            activations: act.then_some(ActStrategy::Token),
            prune,
        })
    }

    fn all_actions() -> Vec<TensorAction> {
        let half = PruneMethod::Magnitude {
            sparsity: 0.5,
            scope: PruneScope::Tensor,
        };
        let mut v = vec![
            TensorAction::Keep(KeepReason::NoRule),
            TensorAction::Cast(DType::BF16),
            TensorAction::Prune(PruneAction {
                method: half,
                storage: SparseStorage::Bitmask,
            }),
            TensorAction::Prune(PruneAction {
                method: PruneMethod::NOfM { n: 2, m: 5 },
                storage: SparseStorage::Dense,
            }),
            quant(
                WeightQuant::Int(int(8, false, Strategy::Channel, DType::F32)),
                true,
                None,
            ),
            quant(
                WeightQuant::Float(FloatParams {
                    format: Fp8Format::E4m3,
                    per_channel: true,
                    scale_dtype: DType::BF16,
                }),
                true,
                Some(half),
            ),
        ];
        for bits in 2..=8 {
            for (sym, strategy) in [
                (true, Strategy::Tensor),
                (false, Strategy::Group(4)),
                (false, Strategy::Channel),
            ] {
                v.push(quant(
                    WeightQuant::Int(int(bits, sym, strategy, DType::F16)),
                    false,
                    None,
                ));
            }
        }
        v
    }

    #[test]
    fn specs_match_encoded_sizes() {
        let t = info(DType::F32, vec![3, 10]);
        let bytes: Vec<u8> = (0..30)
            .flat_map(|i| (i as f32 - 15.0).to_le_bytes())
            .collect();
        for action in all_actions() {
            let e = transform(&t, &action, &bytes).expect("transform");
            for (spec, data) in &e.tensors {
                assert_eq!(
                    spec.byte_len(),
                    Some(data.len() as u64),
                    "{action:?} {}",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn int8_layout_names_and_shapes() {
        let t = info(DType::BF16, vec![5, 7]);
        let layout = |action: TensorAction| -> Vec<(String, DType, Vec<u64>)> {
            output_specs(&t, &action)
                .into_iter()
                .map(|s| (s.name, s.dtype, s.shape))
                .collect()
        };
        let p = int(8, true, Strategy::Channel, DType::BF16);
        assert_eq!(
            layout(quant(WeightQuant::Int(p), false, None)),
            vec![
                ("l.0.q.weight_packed".into(), DType::I32, vec![5, 2]),
                ("l.0.q.weight_scale".into(), DType::BF16, vec![5, 1]),
                ("l.0.q.weight_shape".into(), DType::I64, vec![2]),
            ]
        );
        let asym = int(8, false, Strategy::Channel, DType::BF16);
        assert_eq!(
            layout(quant(WeightQuant::Int(asym), true, None)),
            vec![
                ("l.0.q.weight".into(), DType::I8, vec![5, 7]),
                ("l.0.q.weight_scale".into(), DType::BF16, vec![5, 1]),
                ("l.0.q.weight_zero_point".into(), DType::I8, vec![5, 1]),
            ]
        );
        let three = int(3, false, Strategy::Group(3), DType::F32);
        assert_eq!(
            layout(quant(WeightQuant::Int(three), false, None)),
            vec![
                ("l.0.q.weight_packed".into(), DType::I32, vec![5, 1]),
                ("l.0.q.weight_scale".into(), DType::F32, vec![5, 3]),
                ("l.0.q.weight_shape".into(), DType::I64, vec![2]),
                ("l.0.q.weight_zero_point".into(), DType::I32, vec![1, 3]),
            ]
        );
        assert_eq!(
            layout(TensorAction::Prune(PruneAction {
                method: PruneMethod::NOfM { n: 1, m: 7 },
                storage: SparseStorage::Bitmask,
            })),
            vec![
                ("l.0.q.shape".into(), DType::I64, vec![2]),
                ("l.0.q.compressed".into(), DType::BF16, vec![5]),
                ("l.0.q.bitmask".into(), DType::U8, vec![5, 1]),
                ("l.0.q.row_offsets".into(), DType::I64, vec![5]),
            ]
        );
    }

    #[test]
    fn pruned_then_quantized_keeps_zeros_and_counts_the_pruning_error() {
        let t = info(DType::F32, vec![2, 8]);
        let w: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) * 0.1).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let nm = PruneMethod::NOfM { n: 2, m: 4 };
        let p = int(4, false, Strategy::Group(8), DType::F32);
        let e =
            transform(&t, &quant(WeightQuant::Int(p), false, Some(nm)), &bytes).expect("transform");
        assert_eq!(e.pruned, Some(8));
        let packed: Vec<u32> = e.tensors[0]
            .1
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let q = int_quant::unpack_values(&packed, 2, 8, 4);
        let zp_word = u32::from_le_bytes([
            e.tensors[3].1[0],
            e.tensors[3].1[1],
            e.tensors[3].1[2],
            e.tensors[3].1[3],
        ]);
        for r in 0..2 {
            let z = ((zp_word >> (4 * r)) & 0xf) as i32 - 8;
            for c in 0..8 {
                let kept_in_group = {
                    let g = &w[r * 8 + c / 4 * 4..r * 8 + c / 4 * 4 + 4];
                    let mut mags: Vec<f32> = g.iter().map(|x| x.abs()).collect();
                    mags.sort_by(|a, b| b.total_cmp(a));
                    w[r * 8 + c].abs() >= mags[1]
                };
                if !kept_in_group {
                    assert_eq!(i32::from(q[r * 8 + c]), z, "pruned ({r},{c}) decodes to 0");
                }
            }
        }
        // The error includes the pruned elements' magnitudes.
        let pruned_sq: f64 = [0.55f32, 0.45, 0.15, 0.05, 0.05, 0.15, 0.45, 0.55]
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum();
        assert!(e.stats.sum_sq_err >= pruned_sq - 1e-6, "{:?}", e.stats);
    }
}
