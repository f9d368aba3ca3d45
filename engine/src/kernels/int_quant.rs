//! Integer weight quantization (2 to 8 bits; symmetric or asymmetric; per tensor, per output
//! channel or per group of columns) with packing into 32-bit words.
//!
//! Values are stored offset-binary (`q + 2^(bits-1)`) and packed LSB-first along each row,
//! `32 / bits` values per little-endian word (so a 3-bit word holds 10 values and its top two
//! bits stay zero, as compressed-tensors packs them), the last word of a row zero-padded.
//!
//! The clipping range of each parameter group comes from an [`Observer`]: `minmax` takes the
//! group's range as is; `mse` tries ranges shrunk toward zero and keeps the one whose
//! quantization has the least squared error (the full range is one of the candidates, so it
//! never does worse than `minmax`).

use rayon::prelude::*;

use crate::dtype::DType;
use crate::kernels::convert::{decode_f32, round_trip};
use crate::kernels::lanes::{all_finite, chunk, range_with_zero, round_small, LaneStats, L};
use crate::metrics::ErrorStats;

/// How quantization parameters are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per output channel (row).
    Channel,
    /// One scale per `group_size` consecutive columns of each row.
    Group(u64),
}

/// How the clipping range of a parameter group is chosen.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Observer {
    /// The group's minimum and maximum.
    #[default]
    Minmax,
    /// The shrunk range with the least squared quantization error.
    Mse,
}

impl Observer {
    /// Name used in recipes and `quantization_config`.
    pub fn name(self) -> &'static str {
        match self {
            Observer::Minmax => "minmax",
            Observer::Mse => "mse",
        }
    }
}

/// Candidate ranges of the `mse` observer: the full range scaled by `1 - i / MSE_GRID` for
/// `i` in `0..MSE_STEPS`, i.e. shrunk by up to 20%.
const MSE_GRID: f32 = 100.0;
const MSE_STEPS: u32 = 20;

/// Smallest and largest bit width.
pub const MIN_BITS: u8 = 2;
/// Largest bit width.
pub const MAX_BITS: u8 = 8;

/// Integer quantization parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct IntParams {
    /// Bit width, 2 to 8.
    pub bits: u8,
    /// Symmetric (no zero point) or asymmetric.
    pub symmetric: bool,
    /// Parameter sharing.
    pub strategy: Strategy,
    /// Type the scales are stored in; quantization uses the stored (rounded) scale.
    pub scale_dtype: DType,
    /// Range observer.
    #[serde(default)]
    pub observer: Observer,
}

impl IntParams {
    /// Values per 32-bit word.
    pub fn pack_factor(&self) -> u64 {
        32 / u64::from(self.bits)
    }

    /// Number of parameter groups per row (and rows of parameters) for a `rows × cols` matrix.
    pub fn param_shape(&self, rows: u64, cols: u64) -> (u64, u64) {
        match self.strategy {
            Strategy::Tensor => (1, 1),
            Strategy::Channel => (rows, 1),
            Strategy::Group(g) => (rows, cols.div_ceil(g.max(1))),
        }
    }

    /// Packed words per row.
    pub fn words_per_row(&self, cols: u64) -> u64 {
        cols.div_ceil(self.pack_factor())
    }

    fn qrange(&self) -> (i32, i32) {
        let half = 1i32 << (self.bits - 1);
        (-half, half - 1)
    }
}

/// Why a tensor cannot be quantized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// A weight is NaN or infinite.
    #[error("non-finite weight {value} at row {row}, column {col}")]
    NonFinite {
        /// Row.
        row: u64,
        /// Column.
        col: u64,
        /// The value.
        value: f32,
    },
    /// A scale does not fit the scale dtype.
    #[error(
        "scale {scale:e} of row {row}, group {group} is not representable in {dtype}{}",
        scale_hint(*dtype)
    )]
    Scale {
        /// Row.
        row: u64,
        /// Group.
        group: u64,
        /// Unrounded scale.
        scale: f32,
        /// Scale dtype.
        dtype: DType,
    },
}

fn scale_hint(dtype: DType) -> &'static str {
    if dtype == DType::F32 {
        "; the weights are too large to quantize"
    } else {
        "; use scale_dtype = \"f32\""
    }
}

/// A quantized matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct IntQuantized {
    /// `rows × words_per_row` packed words.
    pub packed: Vec<u32>,
    /// Scales as stored (already rounded to the scale dtype), `param_shape` row-major.
    pub scales: Vec<f32>,
    /// Zero points in the signed range, `param_shape` row-major (all 0 when symmetric).
    pub zero_points: Vec<i8>,
    /// Reconstruction error against the input.
    pub stats: ErrorStats,
}

/// Quantizes a row-major `rows × cols` matrix.
pub fn quantize(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &IntParams,
) -> Result<IntQuantized, QuantError> {
    if let Some(i) = w.par_iter().position_first(|x| !x.is_finite()) {
        let c = (cols as usize).max(1);
        return Err(QuantError::NonFinite {
            row: (i / c) as u64,
            col: (i % c) as u64,
            value: w[i],
        });
    }
    let tensor = if p.strategy == Strategy::Tensor && rows * cols > 0 {
        let mut obs = TensorObserver::new(p);
        obs.range(w, cols);
        if obs.needs_errors() {
            obs.errors(w, cols)
                .map_err(|scale| tensor_scale_error(scale, p))?;
        }
        Some(obs.finish().map_err(|scale| tensor_scale_error(scale, p))?)
    } else {
        None
    };
    let mut stats = ErrorStats::default();
    let mut q = quantize_rows(w, rows, cols, p, tensor, 0, &mut stats)?;
    q.stats = stats;
    Ok(q)
}

/// The error for a per-tensor scale the scale dtype cannot hold.
pub fn tensor_scale_error(scale: f32, p: &IntParams) -> QuantError {
    QuantError::Scale {
        row: 0,
        group: 0,
        scale,
        dtype: p.scale_dtype,
    }
}

/// Scale and zero point of each `group`-wide part of one row (`row` numbers it in errors).
fn group_params(
    values: &[f32],
    group: usize,
    p: &IntParams,
    row: u64,
    scales: &mut [f32],
    zero_points: &mut [i8],
) -> Result<(), QuantError> {
    for (g, part) in values.chunks(group).enumerate() {
        let (s, z) = choose_params(part, p).map_err(|scale| QuantError::Scale {
            row,
            group: g as u64,
            scale,
            dtype: p.scale_dtype,
        })?;
        scales[g] = s;
        zero_points[g] = z;
    }
    Ok(())
}

/// Quantizes `rows` finite rows starting at row `row0` of a matrix. With the per-tensor
/// strategy the scale and zero point come from `tensor` (see [`TensorObserver`]) and the
/// returned `scales`/`zero_points` hold that one pair. Each row's error is merged into
/// `stats` in row order, so splitting a matrix into row blocks gives the same sums.
pub fn quantize_rows(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &IntParams,
    tensor: Option<(f32, i8)>,
    row0: u64,
    stats: &mut ErrorStats,
) -> Result<IntQuantized, QuantError> {
    let (rows_us, cols_us) = (rows as usize, cols as usize);
    debug_assert_eq!(w.len(), rows_us * cols_us);
    let (prow, pcols) = match p.strategy {
        Strategy::Tensor => (1, 1),
        _ => p.param_shape(rows, cols),
    };
    if rows_us == 0 || cols_us == 0 {
        let n = (prow * pcols) as usize;
        return Ok(IntQuantized {
            packed: Vec::new(),
            scales: vec![1.0; n],
            zero_points: vec![0; n],
            stats: ErrorStats::default(),
        });
    }
    let group = match p.strategy {
        Strategy::Group(g) => g as usize,
        _ => cols_us.max(1),
    };
    let wpr = p.words_per_row(cols) as usize;
    let mut packed = vec![0u32; rows_us * wpr];
    let mut scales = vec![0f32; (prow * pcols) as usize];
    let mut zero_points = vec![0i8; (prow * pcols) as usize];

    let row_results: Vec<Result<ErrorStats, QuantError>> = if p.strategy == Strategy::Tensor {
        let (s, z) = tensor.unwrap_or((1.0, 0));
        scales[0] = s;
        zero_points[0] = z;
        w.par_chunks(cols_us.max(1))
            .zip(packed.par_chunks_mut(wpr.max(1)))
            .map_init(Vec::new, |q, (row, out)| {
                Ok(encode_row(row, out, &[s], &[z], cols_us.max(1), p, q))
            })
            .collect()
    } else {
        w.par_chunks(cols_us.max(1))
            .zip(packed.par_chunks_mut(wpr.max(1)))
            .zip(scales.par_chunks_mut(pcols as usize))
            .zip(zero_points.par_chunks_mut(pcols as usize))
            .enumerate()
            .map_init(Vec::new, |q, (r, (((row, out), sc), zp))| {
                group_params(row, group, p, row0 + r as u64, sc, zp)?;
                Ok(encode_row(row, out, sc, zp, group, p, q))
            })
            .collect()
    };
    for r in row_results {
        stats.merge(&r?);
    }
    Ok(IntQuantized {
        packed,
        scales,
        zero_points,
        stats: ErrorStats::default(),
    })
}

/// [`quantize_rows`] for the channel and group strategies, straight from raw little-endian
/// elements of `dtype`: each row is decoded into a small buffer, checked and quantized while
/// it is in cache, so the f32 values never go through memory. Same bytes and errors as
/// decoding the block first (a non-finite value anywhere is reported before any scale
/// problem).
pub fn quantize_raw_rows(
    dtype: DType,
    bytes: &[u8],
    rows: u64,
    cols: u64,
    p: &IntParams,
    row0: u64,
    stats: &mut ErrorStats,
) -> Result<IntQuantized, QuantError> {
    let (rows_us, cols_us) = (rows as usize, cols as usize);
    let width = (dtype.bits() / 8) as usize;
    if rows_us == 0 || cols_us == 0 || width == 0 || p.strategy == Strategy::Tensor {
        let mut w = vec![0f32; bytes.len() / width.max(1)];
        decode_f32(dtype, bytes, &mut w);
        return quantize_rows(&w, rows, cols, p, None, row0, stats);
    }
    let (_, pcols) = p.param_shape(rows, cols);
    let pcols = pcols as usize;
    let group = match p.strategy {
        Strategy::Group(g) => (g as usize).max(1),
        _ => cols_us,
    };
    let wpr = p.words_per_row(cols) as usize;
    let mut packed = vec![0u32; rows_us * wpr];
    let mut scales = vec![0f32; rows_us * pcols];
    let mut zero_points = vec![0i8; rows_us * pcols];
    let results: Vec<Result<ErrorStats, QuantError>> = bytes
        .par_chunks(cols_us * width)
        .zip(packed.par_chunks_mut(wpr))
        .zip(scales.par_chunks_mut(pcols))
        .zip(zero_points.par_chunks_mut(pcols))
        .enumerate()
        .with_min_len((ROWS_ITEM / cols_us).max(1))
        .map_init(
            || (Vec::new(), Vec::new()),
            |(x, q), (r, (((raw, out), sc), zp))| {
                let row = row0 + r as u64;
                x.resize(cols_us, 0.0);
                decode_f32(dtype, raw, x);
                check_finite(x, row)?;
                group_params(x, group, p, row, sc, zp)?;
                Ok(encode_row(x, out, sc, zp, group, p, q))
            },
        )
        .collect();
    merge_rows(results, stats)?;
    Ok(IntQuantized {
        packed,
        scales,
        zero_points,
        stats: ErrorStats::default(),
    })
}

/// Elements per parallel work item when rows are short.
pub(crate) const ROWS_ITEM: usize = 1 << 14;

/// `Err` with the first non-finite value of a row.
pub(crate) fn check_finite(x: &[f32], row: u64) -> Result<(), QuantError> {
    if all_finite(x) {
        return Ok(());
    }
    let col = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(QuantError::NonFinite {
        row,
        col: col as u64,
        value: x.get(col).copied().unwrap_or(f32::NAN),
    })
}

/// Merges per-row results in row order; a non-finite value in any row wins over a scale
/// problem in an earlier one (as when the whole block is checked before quantizing).
pub(crate) fn merge_rows(
    results: Vec<Result<ErrorStats, QuantError>>,
    stats: &mut ErrorStats,
) -> Result<(), QuantError> {
    if let Some(Err(e)) = results
        .iter()
        .find(|r| matches!(r, Err(QuantError::NonFinite { .. })))
    {
        return Err(e.clone());
    }
    let mut total = *stats;
    for r in results {
        total.merge(&r?);
    }
    *stats = total;
    Ok(())
}

/// Chooses the per-tensor scale and zero point from row blocks fed in order: first every
/// block to [`TensorObserver::range`], then, when [`TensorObserver::needs_errors`], every
/// block again to [`TensorObserver::errors`]. Partial sums are taken per row and added in row
/// order, so the result does not depend on how the rows were split.
#[derive(Debug, Clone)]
pub struct TensorObserver {
    p: IntParams,
    lo: f32,
    hi: f32,
    candidates: Vec<(f32, i8)>,
    errors: Vec<f64>,
}

impl TensorObserver {
    /// An observer for `p` (whose strategy is per tensor).
    pub fn new(p: &IntParams) -> Self {
        Self {
            p: *p,
            lo: 0.0,
            hi: 0.0,
            candidates: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Takes the range of a block of finite rows.
    pub fn range(&mut self, w: &[f32], cols: u64) {
        let (lo, hi) = w
            .par_chunks((cols as usize).max(1))
            .map(range_of)
            .collect::<Vec<_>>()
            .into_iter()
            .fold((self.lo, self.hi), |(lo, hi), (a, b)| {
                (lo.min(a), hi.max(b))
            });
        self.lo = lo;
        self.hi = hi;
    }

    /// The parameters observed for.
    pub fn params(&self) -> IntParams {
        self.p
    }

    /// Whether a second pass over the rows is needed (the `mse` observer).
    pub fn needs_errors(&self) -> bool {
        self.p.observer == Observer::Mse
    }

    /// Adds a block's squared error under every candidate range. `Err` carries a candidate
    /// scale the scale dtype cannot hold.
    pub fn errors(&mut self, w: &[f32], cols: u64) -> Result<(), f32> {
        if self.candidates.is_empty() {
            let (lo, hi, p) = (self.lo, self.hi, self.p);
            self.candidates = (0..MSE_STEPS)
                .map(|i| {
                    let shrink = 1.0 - i as f32 / MSE_GRID;
                    params_for(lo * shrink, hi * shrink, &p)
                })
                .collect::<Result<_, _>>()?;
            self.errors = vec![0.0; self.candidates.len()];
        }
        let p = self.p;
        for (cand, total) in self.candidates.iter().zip(self.errors.iter_mut()) {
            let per_row: Vec<f64> = w
                .par_chunks((cols as usize).max(1))
                .map(|row| group_sq_err(row, cand.0, cand.1, &p))
                .collect();
            for e in per_row {
                *total += e;
            }
        }
        Ok(())
    }

    /// The chosen scale and zero point. `Err` carries a scale the scale dtype cannot hold.
    pub fn finish(&self) -> Result<(f32, i8), f32> {
        match self.p.observer {
            Observer::Minmax => params_for(self.lo, self.hi, &self.p),
            Observer::Mse => {
                let mut best = params_for(self.lo, self.hi, &self.p)?;
                let mut best_err = f64::INFINITY;
                for (cand, err) in self.candidates.iter().zip(&self.errors) {
                    // Strictly better only: ties keep the wider range, deterministically.
                    if *err < best_err {
                        best = *cand;
                        best_err = *err;
                    }
                }
                Ok(best)
            }
        }
    }
}

fn range_of(values: &[f32]) -> (f32, f32) {
    range_with_zero(values)
}

/// Squared error of quantizing `values` with scale `s` and zero point `z`.
fn group_sq_err(values: &[f32], s: f32, z: i8, p: &IntParams) -> f64 {
    let (qmin, qmax) = p.qrange();
    let z = i32::from(z);
    values
        .iter()
        .map(|&x| {
            let q = ((x / s).round_ties_even() as i32 + z).clamp(qmin, qmax);
            let d = f64::from(x) - f64::from((q - z) as f32 * s);
            d * d
        })
        .sum()
}

/// Scale and zero point of one parameter group, as the observer picks them.
fn choose_params(values: &[f32], p: &IntParams) -> Result<(f32, i8), f32> {
    let (lo, hi) = range_of(values);
    match p.observer {
        Observer::Minmax => params_for(lo, hi, p),
        Observer::Mse => {
            let mut best = params_for(lo, hi, p)?;
            let mut best_err = group_sq_err(values, best.0, best.1, p);
            for i in 1..MSE_STEPS {
                let shrink = 1.0 - i as f32 / MSE_GRID;
                let cand = params_for(lo * shrink, hi * shrink, p)?;
                let err = group_sq_err(values, cand.0, cand.1, p);
                // Strictly better only: ties keep the wider range, deterministically.
                if err < best_err {
                    best = cand;
                    best_err = err;
                }
            }
            Ok(best)
        }
    }
}

/// Scale and zero point for a group whose range (including 0) is `lo..=hi`; the scale is the
/// value stored in the scale dtype. Err carries an unrepresentable scale.
fn params_for(lo: f32, hi: f32, p: &IntParams) -> Result<(f32, i8), f32> {
    let (qmin, qmax) = p.qrange();
    if p.symmetric {
        let absmax = lo.abs().max(hi.abs());
        if absmax == 0.0 {
            return Ok((1.0, 0));
        }
        let raw = absmax / qmax as f32;
        let s = round_trip(p.scale_dtype, raw);
        if !s.is_finite() || s == 0.0 {
            return Err(raw);
        }
        Ok((s, 0))
    } else {
        let range = hi - lo;
        if range == 0.0 {
            return Ok((1.0, 0));
        }
        let raw = range / (qmax - qmin) as f32;
        let s = round_trip(p.scale_dtype, raw);
        if !s.is_finite() || s == 0.0 {
            return Err(raw);
        }
        let z = (qmin as f32 - lo / s).round_ties_even();
        let z = z.clamp(qmin as f32, qmax as f32) as i8;
        Ok((s, z))
    }
}

/// Quantizes one row into packed words; `scales`/`zps` hold one entry per group of `group`
/// columns (a single entry covers the whole row). `q` is scratch of at least `row.len()`.
///
/// Per group: divide by the scale, round to nearest even, add the zero point, clamp, store
/// offset-binary bytes; then pack the bytes into words. Same bits as
/// [`reference::encode_row`]; the error sums are taken per lane (see [`LaneStats`]).
fn encode_row(
    row: &[f32],
    out: &mut [u32],
    scales: &[f32],
    zps: &[i8],
    group: usize,
    p: &IntParams,
    q: &mut Vec<u8>,
) -> ErrorStats {
    let (qmin, qmax) = p.qrange();
    let offset = 1i32 << (p.bits - 1);
    q.resize(row.len(), 0);
    let mut acc = LaneStats::default();
    for ((xs, qs), (&s, &z)) in row
        .chunks(group.max(1))
        .zip(q.chunks_mut(group.max(1)))
        .zip(scales.iter().zip(zps))
    {
        quantize_group(xs, qs, s, i32::from(z), qmin, qmax, offset, &mut acc);
    }
    pack_row(q, out, u32::from(p.bits));
    acc.finish()
}

/// One element: `clamp(round_even(x / s) + z, qmin, qmax)`. The quotient is clamped to
/// ±512 first, which changes nothing after the final clamp (|z| ≤ 128, |q| ≤ 128) and keeps
/// [`round_small`] exact.
#[inline(always)]
fn quant_one(x: f32, s: f32, z: i32, qmin: i32, qmax: i32) -> i32 {
    let v = (x / s).clamp(-512.0, 512.0);
    (round_small(v) as i32 + z).clamp(qmin, qmax)
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn quantize_group(
    xs: &[f32],
    qs: &mut [u8],
    s: f32,
    z: i32,
    qmin: i32,
    qmax: i32,
    offset: i32,
    acc: &mut LaneStats,
) {
    let mut xc = xs.chunks_exact(L);
    let mut qc = qs.chunks_exact_mut(L);
    for (x, qo) in (&mut xc).zip(&mut qc) {
        let x = chunk(x);
        let mut deq = [0f32; L];
        for i in 0..L {
            let v = quant_one(x[i], s, z, qmin, qmax);
            qo[i] = (v + offset) as u8;
            deq[i] = (v - z) as f32 * s;
        }
        acc.add_chunk(&x, &deq);
    }
    let (xt, qt) = (xc.remainder(), qc.into_remainder());
    let mut deq = [0f32; L];
    for ((&x, qo), d) in xt.iter().zip(qt.iter_mut()).zip(deq.iter_mut()) {
        let v = quant_one(x, s, z, qmin, qmax);
        *qo = (v + offset) as u8;
        *d = (v - z) as f32 * s;
    }
    acc.add_tail(xt, &deq[..xt.len()]);
}

/// Packs offset-binary values of `bits` bits LSB-first, `32 / bits` per word, the last word
/// zero-padded.
fn pack_row(q: &[u8], out: &mut [u32], bits: u32) {
    match bits {
        8 => pack_fixed::<4>(q, out, 8),
        4 => pack_fixed::<8>(q, out, 4),
        2 => pack_fixed::<16>(q, out, 2),
        _ => {
            let pf = (32 / bits) as usize;
            for (o, c) in out.iter_mut().zip(q.chunks(pf)) {
                *o = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |w, (j, &v)| w | u32::from(v) << (j as u32 * bits));
            }
        }
    }
}

#[inline(always)]
fn pack_fixed<const PF: usize>(q: &[u8], out: &mut [u32], bits: u32) {
    let mut qc = q.chunks_exact(PF);
    for (o, c) in out.iter_mut().zip(&mut qc) {
        let mut w = 0u32;
        for (j, &v) in c.iter().enumerate() {
            w |= u32::from(v) << (j as u32 * bits);
        }
        *o = w;
    }
    let tail = qc.remainder();
    if !tail.is_empty() {
        if let Some(o) = out.get_mut(q.len() / PF) {
            *o = tail
                .iter()
                .enumerate()
                .fold(0u32, |w, (j, &v)| w | u32::from(v) << (j as u32 * bits));
        }
    }
}

/// Unpacks `rows × cols` signed values from packed rows.
pub fn unpack_values(packed: &[u32], rows: u64, cols: u64, bits: u8) -> Vec<i8> {
    let pf = (32 / u32::from(bits)) as usize;
    let wpr = (cols as usize).div_ceil(pf);
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity((rows * cols) as usize);
    for r in 0..rows as usize {
        let row = &packed[r * wpr..(r + 1) * wpr];
        for c in 0..cols as usize {
            let u = (row[c / pf] >> ((c % pf) as u32 * u32::from(bits))) & mask;
            out.push((u as i32 - offset) as i8);
        }
    }
    out
}

/// Packs signed zero points `[rows, cols]` offset-binary along the rows: word `(r / pf, c)`
/// holds rows `r` of column `c` LSB-first. Result shape `[ceil(rows / pf), cols]`.
pub fn pack_along_rows(values: &[i8], rows: u64, cols: u64, bits: u8) -> Vec<u32> {
    let pf = (32 / u32::from(bits)) as u64;
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let out_rows = rows.div_ceil(pf);
    let mut out = vec![0u32; (out_rows * cols) as usize];
    for r in 0..rows {
        for c in 0..cols {
            let v = ((i32::from(values[(r * cols + c) as usize]) + offset) as u32) & mask;
            let shift = ((r % pf) as u32) * u32::from(bits);
            out[((r / pf) * cols + c) as usize] |= v << shift;
        }
    }
    out
}

/// The inverse of [`pack_along_rows`]: `rows × cols` signed values from
/// `[ceil(rows / pf), cols]` words.
pub fn unpack_along_rows(words: &[u32], rows: u64, cols: u64, bits: u8) -> Vec<i8> {
    let pf = u64::from(32 / u32::from(bits));
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity((rows * cols) as usize);
    for r in 0..rows {
        for c in 0..cols {
            let word = words[((r / pf) * cols + c) as usize];
            let u = (word >> ((r % pf) as u32 * u32::from(bits))) & mask;
            out.push((u as i32 - offset) as i8);
        }
    }
    out
}

/// Plain element-at-a-time versions of the kernels, which tests compare with bit for bit.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

    /// Quantizes one row into packed words, one element at a time.
    pub fn encode_row(
        row: &[f32],
        out: &mut [u32],
        scales: &[f32],
        zps: &[i8],
        group: usize,
        p: &IntParams,
    ) -> ErrorStats {
        let (qmin, qmax) = p.qrange();
        let offset = 1i32 << (p.bits - 1);
        let bits = u32::from(p.bits);
        let pf = (32 / bits) as usize;
        let mask = (1u32 << bits) - 1;
        let mut stats = ErrorStats::default();
        out.fill(0);
        for (c, &x) in row.iter().enumerate() {
            let g = if scales.len() == 1 { 0 } else { c / group };
            let s = scales[g];
            let z = i32::from(zps[g]);
            let q = ((x / s).round_ties_even() as i32 + z).clamp(qmin, qmax);
            let deq = (q - z) as f32 * s;
            stats.add(x, deq);
            let u = ((q + offset) as u32) & mask;
            out[c / pf] |= u << ((c % pf) as u32 * bits);
        }
        stats
    }

    /// Range of a group and 0 with `f32::min`/`f32::max`.
    pub fn range_of(values: &[f32]) -> (f32, f32) {
        values
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)))
    }

    /// Quantizes a matrix (channel or group strategy) one element at a time.
    pub fn quantize(
        w: &[f32],
        rows: usize,
        cols: usize,
        p: &IntParams,
    ) -> (Vec<u32>, Vec<f32>, Vec<i8>, ErrorStats) {
        let group = match p.strategy {
            Strategy::Group(g) => g as usize,
            _ => cols,
        };
        let wpr = p.words_per_row(cols as u64) as usize;
        let mut packed = vec![0u32; rows * wpr];
        let (mut scales, mut zps) = (Vec::new(), Vec::new());
        let mut stats = ErrorStats::default();
        for (row, out) in w.chunks(cols).zip(packed.chunks_mut(wpr)) {
            let (mut sc, mut zp) = (Vec::new(), Vec::new());
            for part in row.chunks(group) {
                let (lo, hi) = range_of(part);
                let (s, z) = params_for(lo, hi, p).unwrap_or((1.0, 0));
                sc.push(s);
                zp.push(z);
            }
            stats.merge(&encode_row(row, out, &sc, &zp, group, p));
            scales.extend(sc);
            zps.extend(zp);
        }
        (packed, scales, zps, stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpack_row(words: &[u32], cols: usize, bits: u8) -> Vec<i32> {
        let pf = 32 / bits as usize;
        let offset = 1i32 << (bits - 1);
        (0..cols)
            .map(|c| {
                ((words[c / pf] >> ((c % pf) as u32 * u32::from(bits))) & ((1 << bits) - 1)) as i32
                    - offset
            })
            .collect()
    }

    fn params(bits: u8, symmetric: bool, strategy: Strategy) -> IntParams {
        IntParams {
            bits,
            symmetric,
            strategy,
            scale_dtype: DType::F32,
            observer: Observer::Minmax,
        }
    }

    #[test]
    fn int8_channel_symmetric_exact_values() {
        let w = [1.0f32, -0.5, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 1.0];
        let q = quantize(&w, 2, 5, &params(8, true, Strategy::Channel)).expect("quant");
        assert_eq!(q.scales, vec![1.0 / 127.0, 2.0 / 127.0]);
        assert_eq!(q.packed.len(), 4);
        assert_eq!(unpack_row(&q.packed[..2], 5, 8), vec![127, -64, 32, 0, 0]);
        assert_eq!(unpack_row(&q.packed[2..], 5, 8), vec![0, 0, 0, 127, 64]);
        // offset-binary: -64 + 128 = 64 at bits 8..16 of the first word.
        assert_eq!((q.packed[0] >> 8) & 0xff, 64);
    }

    #[test]
    fn all_zero_rows_get_finite_scale_and_exact_zeros() {
        let w = [0.0f32; 8];
        for sym in [true, false] {
            let q = quantize(&w, 2, 4, &params(4, sym, Strategy::Group(3))).expect("quant");
            assert!(q.scales.iter().all(|s| *s == 1.0));
            assert_eq!(q.stats.sum_sq_err, 0.0);
            assert_eq!(q.scales.len(), 4);
        }
    }

    #[test]
    fn ragged_groups_and_asymmetric_ranges() {
        let w: Vec<f32> = (0..14).map(|i| i as f32 * 0.1 + 0.05).collect();
        let p = params(4, false, Strategy::Group(4));
        let q = quantize(&w, 2, 7, &p).expect("quant");
        assert_eq!(q.scales.len(), 4);
        assert!(q.stats.max_abs_err <= q.scales.iter().cloned().fold(0.0, f32::max) / 2.0 + 1e-6);
        let zp = pack_along_rows(&q.zero_points, 2, 2, 4);
        assert_eq!(zp.len(), 2);
        assert_eq!(unpack_along_rows(&zp, 2, 2, 4), q.zero_points);
        assert_eq!((zp[0] & 0xf) as i32 - 8, i32::from(q.zero_points[0]));
        assert_eq!(((zp[0] >> 4) & 0xf) as i32 - 8, i32::from(q.zero_points[2]));
    }

    #[test]
    fn nan_is_reported_with_position() {
        let w = [1.0f32, 2.0, 3.0, f32::NAN];
        let e = quantize(&w, 2, 2, &params(8, true, Strategy::Channel)).expect_err("nan");
        assert!(
            matches!(e, QuantError::NonFinite { row: 1, col: 1, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn f16_scale_overflow_is_refused() {
        let w = [1.0e9f32, 1.0];
        let mut p = params(8, true, Strategy::Channel);
        p.scale_dtype = DType::F16;
        let e = quantize(&w, 1, 2, &p).expect_err("overflow");
        assert!(matches!(e, QuantError::Scale { row: 0, .. }), "{e:?}");
    }

    #[test]
    fn empty_matrices_quantize_to_nothing() {
        for strategy in [Strategy::Tensor, Strategy::Channel, Strategy::Group(4)] {
            let q = quantize(&[], 3, 0, &params(4, false, strategy)).expect("empty");
            assert!(q.packed.is_empty());
            assert_eq!(q.stats.n, 0);
        }
    }

    #[test]
    fn tensor_strategy_uses_one_scale() {
        let w = [1.0f32, -4.0, 2.0, 0.5];
        let q = quantize(&w, 2, 2, &params(8, true, Strategy::Tensor)).expect("quant");
        assert_eq!(q.scales, vec![4.0 / 127.0]);
        assert_eq!(unpack_row(&q.packed[..1], 2, 8), vec![32, -127]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        #[test]
        fn fast_kernel_matches_reference(
            bits in 2u8..=8,
            symmetric: bool,
            group in proptest::prop_oneof![proptest::strategy::Just(0u64), 1u64..40],
            rows in 1usize..4,
            cols in 1usize..90,
            seed: u64,
            scale in proptest::prop_oneof![
                proptest::strategy::Just(1e-3f32),
                proptest::strategy::Just(1.0f32),
                proptest::strategy::Just(300.0f32),
            ],
        ) {
            let mut state = seed;
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32;
                    // Some exact ties at half steps and some zeros.
                    match state % 7 {
                        0 => 0.0,
                        1 => ((u * 16.0).floor() + 0.5) * scale / 8.0,
                        _ => (u - 0.4) * scale,
                    }
                })
                .collect();
            let strategy = if group == 0 { Strategy::Channel } else { Strategy::Group(group) };
            let p = params(bits, symmetric, strategy);
            let fast = quantize(&w, rows as u64, cols as u64, &p).expect("finite");
            let (packed, scales, zps, stats) = reference::quantize(&w, rows, cols, &p);
            proptest::prop_assert_eq!(&fast.packed, &packed);
            proptest::prop_assert_eq!(&fast.scales, &scales);
            proptest::prop_assert_eq!(&fast.zero_points, &zps);
            proptest::prop_assert_eq!(fast.stats.n, stats.n);
            proptest::prop_assert_eq!(fast.stats.max_abs_err, stats.max_abs_err);
            // Error sums are added per lane: the same terms in another order.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-300);
            proptest::prop_assert!(close(fast.stats.sum_sq_err, stats.sum_sq_err));
            proptest::prop_assert!(close(fast.stats.sum_sq_ref, stats.sum_sq_ref));
        }
    }
}
