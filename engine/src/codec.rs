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
use crate::kernels::int_quant::{self, IntParams, QuantError, Strategy};
use crate::kernels::prune::{self, PruneMethod};
use crate::metrics::ErrorStats;
use crate::recipe::{QuantAction, QuantFormat, SparseStorage, TensorAction, WeightQuant};
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

/// Transforms one tensor's raw bytes according to `action`.
pub fn transform(
    info: &TensorInfo,
    action: &TensorAction,
    bytes: &[u8],
) -> Result<Encoded, TransformError> {
    let specs = output_specs(info, action);
    let fail = |problem: String| TransformError {
        tensor: info.name.clone(),
        problem,
    };
    match action {
        TensorAction::Keep(_) => Ok(Encoded {
            tensors: specs.into_iter().map(|s| (s, bytes.to_vec())).collect(),
            stats: ErrorStats::default(),
            pruned: None,
        }),
        TensorAction::Cast(dst) => {
            let (out, stats) =
                cast(info.dtype, *dst, bytes, info.numel() as usize).map_err(fail)?;
            Ok(Encoded {
                tensors: specs.into_iter().map(|s| (s, out.clone())).collect(),
                stats,
                pruned: None,
            })
        }
        TensorAction::Prune(p) => {
            let (rows, cols) = info.rows_cols();
            let w = decode_checked(info, bytes).map_err(|e| fail(e.to_string()))?;
            let keep = prune::mask(&w, cols, &p.method);
            let pruned = keep.iter().filter(|k| !**k).count() as u64;
            let mut stats = ErrorStats::default();
            for (x, k) in w.iter().zip(&keep) {
                stats.add(*x, if *k { *x } else { 0.0 });
            }
            let width = (info.dtype.bits() / 8) as usize;
            let blobs = match p.storage {
                SparseStorage::Dense => {
                    let mut out = bytes.to_vec();
                    for (elem, k) in out.chunks_exact_mut(width).zip(&keep) {
                        if !k {
                            elem.fill(0);
                        }
                    }
                    vec![out]
                }
                SparseStorage::Bitmask => {
                    let b = bitmask::compress(bytes, &keep, rows, cols, width);
                    vec![
                        i64_bytes(&[rows as i64, cols as i64]),
                        b.values,
                        b.bitmask,
                        i64_bytes(&b.row_offsets),
                    ]
                }
            };
            Ok(Encoded {
                tensors: specs.into_iter().zip(blobs).collect(),
                stats,
                pruned: Some(pruned),
            })
        }
        TensorAction::Quantize(q) => quantize(info, q, bytes, specs).map_err(fail),
    }
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Casts float elements; `Err` names the first finite element the target type cannot hold.
pub(crate) fn cast(
    src: DType,
    dst: DType,
    bytes: &[u8],
    numel: usize,
) -> Result<(Vec<u8>, ErrorStats), String> {
    let sw = (src.bits() / 8) as usize;
    let dw = (dst.bits() / 8) as usize;
    let mut out = vec![0u8; numel * dw];
    let parts: Vec<Result<ErrorStats, (usize, f32)>> = bytes
        .par_chunks(CHUNK * sw)
        .zip(out.par_chunks_mut(CHUNK * dw))
        .enumerate()
        .map(|(chunk, (inp, o))| {
            let n = inp.len() / sw;
            let mut orig = vec![0f32; n];
            let mut back = vec![0f32; n];
            decode_f32(src, inp, &mut orig);
            cast_bytes(src, dst, inp, o, &mut back);
            if let Some(i) = orig
                .iter()
                .zip(&back)
                .position(|(a, b)| a.is_finite() && !b.is_finite())
            {
                return Err((chunk * CHUNK + i, orig[i]));
            }
            Ok(ErrorStats::compare(&orig, &back))
        })
        .collect();
    let mut stats = ErrorStats::default();
    for p in parts {
        match p {
            Ok(p) => stats.merge(&p),
            Err((i, v)) => {
                return Err(format!(
                    "element {i} ({v:e}) overflows {dst}; cast to a wider type or leave this tensor alone"
                ))
            }
        }
    }
    Ok((out, stats))
}

/// Decodes a float tensor to f32, refusing NaN and infinities with their position.
fn decode_checked(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    let (_, cols) = info.rows_cols();
    let mut w = vec![0f32; info.numel() as usize];
    let sw = (info.dtype.bits() / 8) as usize;
    w.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * sw))
        .for_each(|(o, b)| decode_f32(info.dtype, b, o));
    let cols = (cols as usize).max(1);
    if let Some(i) = w.par_iter().position_first(|x| !x.is_finite()) {
        return Err(QuantError::NonFinite {
            row: (i / cols) as u64,
            col: (i % cols) as u64,
            value: w[i],
        });
    }
    Ok(w)
}

fn quantize(
    info: &TensorInfo,
    q: &QuantAction,
    bytes: &[u8],
    specs: Vec<TensorSpec>,
) -> Result<Encoded, String> {
    let (rows, cols) = info.rows_cols();
    let mut w = decode_checked(info, bytes).map_err(|e| e.to_string())?;
    let (pruned, removed) = match &q.prune {
        Some(method) => {
            let (count, removed) = prune_in_place(&mut w, cols, method);
            (Some(count), removed)
        }
        None => (None, ErrorStats::default()),
    };
    let (blobs, mut stats) = match (q.format(), q.weights) {
        (QuantFormat::PackQuantized, WeightQuant::Int(p)) => pack_quantized(&w, rows, cols, &p)?,
        (_, WeightQuant::Int(p)) => int_quantized(&w, rows, cols, &p)?,
        (_, WeightQuant::Float(p)) => float_quantized(&w, rows, cols, &p)?,
    };
    // Pruned elements decode to exactly zero, so their error is their own magnitude: adding
    // it gives the error against the unpruned input.
    stats.merge(&removed);
    Ok(Encoded {
        tensors: specs.into_iter().zip(blobs).collect(),
        stats,
        pruned,
    })
}

/// Zeroes the pruned elements; returns how many, and their contribution to the error
/// against the unpruned input (`n` zero: they are counted once the quantizer sees them).
fn prune_in_place(w: &mut [f32], cols: u64, method: &PruneMethod) -> (u64, ErrorStats) {
    let keep = prune::mask(w, cols, method);
    let mut removed = ErrorStats::default();
    let mut count = 0;
    for (x, k) in w.iter_mut().zip(&keep) {
        if !k {
            let e = f64::from(*x) * f64::from(*x);
            removed.sum_sq_err += e;
            removed.sum_sq_ref += e;
            removed.max_abs_err = removed.max_abs_err.max(x.abs());
            *x = 0.0;
            count += 1;
        }
    }
    (count, removed)
}

fn scale_bytes(scales: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(scales.len() * 4);
    for s in scales {
        encode_one(dtype, *s, &mut out);
    }
    out
}

fn pack_quantized(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &IntParams,
) -> Result<(Vec<Vec<u8>>, ErrorStats), String> {
    let q = int_quant::quantize(w, rows, cols, p).map_err(|e| e.to_string())?;
    let packed: Vec<u8> = q.packed.iter().flat_map(|w| w.to_le_bytes()).collect();
    let mut blobs = vec![
        packed,
        scale_bytes(&q.scales, p.scale_dtype),
        i64_bytes(&[rows as i64, cols as i64]),
    ];
    if !p.symmetric {
        let (prow, pcols) = p.param_shape(rows, cols);
        let words = int_quant::pack_along_rows(&q.zero_points, prow, pcols, p.bits);
        blobs.push(words.iter().flat_map(|w| w.to_le_bytes()).collect());
    }
    Ok((blobs, q.stats))
}

fn int_quantized(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &IntParams,
) -> Result<(Vec<Vec<u8>>, ErrorStats), String> {
    let q = int_quant::quantize(w, rows, cols, p).map_err(|e| e.to_string())?;
    let values = int_quant::unpack_values(&q.packed, rows, cols, p.bits);
    let mut blobs = vec![
        values.iter().map(|v| *v as u8).collect(),
        scale_bytes(&q.scales, p.scale_dtype),
    ];
    if !p.symmetric {
        blobs.push(q.zero_points.iter().map(|z| *z as u8).collect());
    }
    Ok((blobs, q.stats))
}

fn float_quantized(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &FloatParams,
) -> Result<(Vec<Vec<u8>>, ErrorStats), String> {
    let q = fp8::quantize(w, rows, cols, p).map_err(|e| e.to_string())?;
    Ok((
        vec![q.values, scale_bytes(&q.scales, p.scale_dtype)],
        q.stats,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fp8::Fp8Format;
    use crate::kernels::int_quant::Observer;
    use crate::kernels::prune::PruneScope;
    use crate::recipe::{ActStrategy, KeepReason, PruneAction};

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
