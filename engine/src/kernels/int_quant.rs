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
use crate::kernels::convert::round_trip;
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
            .map(|(row, out)| Ok(encode_row(row, out, &[s], &[z], cols_us.max(1), p)))
            .collect()
    } else {
        w.par_chunks(cols_us.max(1))
            .zip(packed.par_chunks_mut(wpr.max(1)))
            .zip(scales.par_chunks_mut(pcols as usize))
            .zip(zero_points.par_chunks_mut(pcols as usize))
            .enumerate()
            .map(|(r, (((row, out), sc), zp))| {
                for (g, chunk) in row.chunks(group).enumerate() {
                    let (s, z) = choose_params(chunk, p).map_err(|scale| QuantError::Scale {
                        row: row0 + r as u64,
                        group: g as u64,
                        scale,
                        dtype: p.scale_dtype,
                    })?;
                    sc[g] = s;
                    zp[g] = z;
                }
                Ok(encode_row(row, out, sc, zp, group, p))
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
    values
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &x| (lo.min(x), hi.max(x)))
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
/// columns (a single entry covers the whole row).
fn encode_row(
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
}
