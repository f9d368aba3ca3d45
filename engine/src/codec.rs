//! Output layouts: which tensors a transformed input tensor becomes, and their bytes.
//!
//! Quantized weights use the compressed-tensors `pack-quantized` layout: for a module `m`,
//! `m.weight_packed` (I32 words of offset-binary values packed LSB-first along each row),
//! `m.weight_scale` (`[rows, groups]`, or `[1]` per tensor), `m.weight_zero_point` (asymmetric
//! only; I32, packed along the rows) and `m.weight_shape` (I64 `[rows, cols]`).

use rayon::prelude::*;

use crate::dtype::DType;
use crate::kernels::convert::{cast_bytes, decode_f32, encode_one};
use crate::kernels::int_quant::{self, IntParams, QuantError, Strategy};
use crate::metrics::ErrorStats;
use crate::recipe::TensorAction;
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
}

/// Module name of a `.weight` tensor (`a.b.weight` → `a.b`).
pub fn module_name(tensor: &str) -> &str {
    tensor.strip_suffix(".weight").unwrap_or(tensor)
}

/// The output tensors `info` becomes under `action`, in write order.
pub fn output_specs(info: &TensorInfo, action: &TensorAction) -> Vec<TensorSpec> {
    match action {
        TensorAction::Keep(_) => vec![TensorSpec::new(&info.name, info.dtype, info.shape.clone())],
        TensorAction::Cast(d) => vec![TensorSpec::new(&info.name, *d, info.shape.clone())],
        TensorAction::Quantize(p) => {
            let (rows, cols) = info.rows_cols();
            let m = module_name(&info.name);
            let (prow, pcols) = p.param_shape(rows, cols);
            let param_shape = if p.strategy == Strategy::Tensor {
                vec![1]
            } else {
                vec![prow, pcols]
            };
            let mut out = vec![
                TensorSpec::new(
                    format!("{m}.weight_packed"),
                    DType::I32,
                    vec![rows, p.words_per_row(cols)],
                ),
                TensorSpec::new(format!("{m}.weight_scale"), p.scale_dtype, param_shape),
                TensorSpec::new(format!("{m}.weight_shape"), DType::I64, vec![2]),
            ];
            if !p.symmetric {
                let zp_shape = if p.strategy == Strategy::Tensor {
                    vec![1]
                } else {
                    vec![prow.div_ceil(p.pack_factor()), pcols]
                };
                out.push(TensorSpec::new(
                    format!("{m}.weight_zero_point"),
                    DType::I32,
                    zp_shape,
                ));
            }
            out
        }
    }
}

/// Transforms one tensor's raw bytes according to `action`.
pub fn transform(
    info: &TensorInfo,
    action: &TensorAction,
    bytes: &[u8],
) -> Result<Encoded, TransformError> {
    let specs = output_specs(info, action);
    match action {
        TensorAction::Keep(_) => Ok(Encoded {
            tensors: specs.into_iter().map(|s| (s, bytes.to_vec())).collect(),
            stats: ErrorStats::default(),
        }),
        TensorAction::Cast(dst) => {
            let (out, stats) = cast(info.dtype, *dst, bytes, info.numel() as usize);
            Ok(Encoded {
                tensors: specs.into_iter().map(|s| (s, out.clone())).collect(),
                stats,
            })
        }
        TensorAction::Quantize(p) => quantize(info, p, bytes, specs),
    }
}

fn cast(src: DType, dst: DType, bytes: &[u8], numel: usize) -> (Vec<u8>, ErrorStats) {
    let sw = (src.bits() / 8) as usize;
    let dw = (dst.bits() / 8) as usize;
    let mut out = vec![0u8; numel * dw];
    let parts: Vec<ErrorStats> = bytes
        .par_chunks(CHUNK * sw)
        .zip(out.par_chunks_mut(CHUNK * dw))
        .map(|(inp, o)| {
            let n = inp.len() / sw;
            let mut orig = vec![0f32; n];
            let mut back = vec![0f32; n];
            decode_f32(src, inp, &mut orig);
            cast_bytes(src, dst, inp, o, &mut back);
            ErrorStats::compare(&orig, &back)
        })
        .collect();
    let mut stats = ErrorStats::default();
    for p in &parts {
        stats.merge(p);
    }
    (out, stats)
}

fn quantize(
    info: &TensorInfo,
    p: &IntParams,
    bytes: &[u8],
    specs: Vec<TensorSpec>,
) -> Result<Encoded, TransformError> {
    let (rows, cols) = info.rows_cols();
    let mut w = vec![0f32; info.numel() as usize];
    let sw = (info.dtype.bits() / 8) as usize;
    w.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * sw))
        .for_each(|(o, b)| decode_f32(info.dtype, b, o));
    let q = int_quant::quantize(&w, rows, cols, p).map_err(|e: QuantError| TransformError {
        tensor: info.name.clone(),
        problem: e.to_string(),
    })?;
    let mut packed = Vec::with_capacity(q.packed.len() * 4);
    for word in &q.packed {
        packed.extend_from_slice(&word.to_le_bytes());
    }
    let mut scales = Vec::with_capacity(q.scales.len() * 4);
    for s in &q.scales {
        encode_one(p.scale_dtype, *s, &mut scales);
    }
    let mut shape = Vec::with_capacity(16);
    shape.extend_from_slice(&(rows as i64).to_le_bytes());
    shape.extend_from_slice(&(cols as i64).to_le_bytes());
    let mut blobs = vec![packed, scales, shape];
    if !p.symmetric {
        let (prow, pcols) = p.param_shape(rows, cols);
        let words = int_quant::pack_along_rows(&q.zero_points, prow, pcols, p.bits);
        blobs.push(words.iter().flat_map(|w| w.to_le_bytes()).collect());
    }
    Ok(Encoded {
        tensors: specs.into_iter().zip(blobs).collect(),
        stats: q.stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::KeepReason;

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

    #[test]
    fn specs_match_encoded_sizes() {
        let t = info(DType::F32, vec![3, 10]);
        let bytes: Vec<u8> = (0..30)
            .flat_map(|i| (i as f32 - 15.0).to_le_bytes())
            .collect();
        for action in [
            TensorAction::Keep(KeepReason::NoRule),
            TensorAction::Cast(DType::BF16),
            TensorAction::Quantize(IntParams {
                bits: 8,
                symmetric: true,
                strategy: Strategy::Channel,
                scale_dtype: DType::F32,
            }),
            TensorAction::Quantize(IntParams {
                bits: 4,
                symmetric: false,
                strategy: Strategy::Group(4),
                scale_dtype: DType::BF16,
            }),
            TensorAction::Quantize(IntParams {
                bits: 2,
                symmetric: true,
                strategy: Strategy::Tensor,
                scale_dtype: DType::F16,
            }),
        ] {
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
        let p = IntParams {
            bits: 8,
            symmetric: true,
            strategy: Strategy::Channel,
            scale_dtype: DType::BF16,
        };
        let s = output_specs(&t, &TensorAction::Quantize(p));
        let got: Vec<(String, DType, Vec<u64>)> =
            s.into_iter().map(|s| (s.name, s.dtype, s.shape)).collect();
        assert_eq!(
            got,
            vec![
                ("l.0.q.weight_packed".into(), DType::I32, vec![5, 2]),
                ("l.0.q.weight_scale".into(), DType::BF16, vec![5, 1]),
                ("l.0.q.weight_shape".into(), DType::I64, vec![2]),
            ]
        );
    }
}
