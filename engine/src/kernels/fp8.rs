//! FP8 weight quantization (e4m3 or e5m2) with one scale per tensor or per output channel.
//!
//! The scale maps a group's largest magnitude onto the format's largest finite value;
//! elements are divided by the stored (rounded) scale and converted with round to nearest
//! even, saturating at the largest finite value.

use float8::{F8E4M3, F8E5M2};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::kernels::convert::round_trip;
use crate::kernels::int_quant::QuantError;
use crate::metrics::ErrorStats;

/// The two FP8 encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Format {
    /// 4 exponent bits, 3 mantissa bits, no infinities; largest finite 448.
    E4m3,
    /// 5 exponent bits, 2 mantissa bits; largest finite 57344.
    E5m2,
}

impl Fp8Format {
    /// The safetensors dtype of the encoded elements.
    pub fn dtype(self) -> DType {
        match self {
            Fp8Format::E4m3 => DType::F8E4M3,
            Fp8Format::E5m2 => DType::F8E5M2,
        }
    }

    /// Largest finite value.
    pub fn max_finite(self) -> f32 {
        match self {
            Fp8Format::E4m3 => 448.0,
            Fp8Format::E5m2 => 57344.0,
        }
    }

    /// Encodes one value (round to nearest even, saturating).
    pub fn encode(self, x: f32) -> u8 {
        match self {
            Fp8Format::E4m3 => F8E4M3::from_f32(x).to_bits(),
            Fp8Format::E5m2 => F8E5M2::from_f32(x).to_bits(),
        }
    }

    /// Decodes one stored byte.
    pub fn decode(self, b: u8) -> f32 {
        match self {
            Fp8Format::E4m3 => F8E4M3::from_bits(b).to_f32(),
            Fp8Format::E5m2 => F8E5M2::from_bits(b).to_f32(),
        }
    }
}

/// FP8 quantization parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FloatParams {
    /// Encoding.
    pub format: Fp8Format,
    /// One scale per output channel (true) or for the whole tensor.
    pub per_channel: bool,
    /// Type the scales are stored in.
    pub scale_dtype: DType,
}

/// A matrix quantized to FP8.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Quantized {
    /// One byte per element, row-major.
    pub values: Vec<u8>,
    /// Scales as stored: one per row, or one.
    pub scales: Vec<f32>,
    /// Reconstruction error.
    pub stats: ErrorStats,
}

fn scale_for(absmax: f32, p: &FloatParams) -> Result<f32, f32> {
    if absmax == 0.0 {
        return Ok(1.0);
    }
    let raw = absmax / p.format.max_finite();
    let s = round_trip(p.scale_dtype, raw);
    if !s.is_finite() || s == 0.0 {
        return Err(raw);
    }
    Ok(s)
}

/// Quantizes a row-major `rows × cols` matrix of finite values.
pub fn quantize(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &FloatParams,
) -> Result<Fp8Quantized, QuantError> {
    let cols_us = (cols as usize).max(1);
    if let Some(i) = w.par_iter().position_first(|x| !x.is_finite()) {
        return Err(QuantError::NonFinite {
            row: (i / cols_us) as u64,
            col: (i % cols_us) as u64,
            value: w[i],
        });
    }
    let tensor = if p.per_channel {
        None
    } else {
        Some(tensor_scale(absmax(w, cols), p)?)
    };
    let mut stats = ErrorStats::default();
    let mut q = quantize_rows(w, rows, cols, p, tensor, 0, &mut stats)?;
    q.stats = stats;
    Ok(q)
}

/// Largest magnitude of a block of finite rows (combine blocks with `max`).
pub fn absmax(w: &[f32], cols: u64) -> f32 {
    let absmax_of = |row: &[f32]| row.iter().fold(0f32, |m, x| m.max(x.abs()));
    w.par_chunks((cols as usize).max(1))
        .map(absmax_of)
        .collect::<Vec<_>>()
        .into_iter()
        .fold(0f32, f32::max)
}

/// The per-tensor scale for a tensor whose largest magnitude is `absmax`.
pub fn tensor_scale(absmax: f32, p: &FloatParams) -> Result<f32, QuantError> {
    scale_for(absmax, p).map_err(|scale| QuantError::Scale {
        row: 0,
        group: 0,
        scale,
        dtype: p.scale_dtype,
    })
}

/// Quantizes `rows` finite rows starting at row `row0`; per-tensor scaling uses `tensor`
/// (from [`tensor_scale`]) and returns it as the one scale. Row errors are merged into
/// `stats` in row order.
pub fn quantize_rows(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &FloatParams,
    tensor: Option<f32>,
    row0: u64,
    stats: &mut ErrorStats,
) -> Result<Fp8Quantized, QuantError> {
    let cols_us = (cols as usize).max(1);
    let scales: Vec<f32> = match tensor {
        Some(s) if !p.per_channel => vec![s],
        _ => w
            .par_chunks(cols_us)
            .enumerate()
            .map(|(r, row)| {
                let m = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                scale_for(m, p).map_err(|scale| QuantError::Scale {
                    row: row0 + r as u64,
                    group: 0,
                    scale,
                    dtype: p.scale_dtype,
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<_, _>>()?,
    };
    debug_assert!(!p.per_channel || scales.len() as u64 == rows);
    let mut values = vec![0u8; w.len()];
    let parts: Vec<ErrorStats> = w
        .par_chunks(cols_us)
        .zip(values.par_chunks_mut(cols_us))
        .enumerate()
        .map(|(r, (row, out))| {
            let s = if p.per_channel { scales[r] } else { scales[0] };
            let mut stats = ErrorStats::default();
            for (o, &x) in out.iter_mut().zip(row) {
                *o = p.format.encode(x / s);
                stats.add(x, p.format.decode(*o) * s);
            }
            stats
        })
        .collect();
    for part in &parts {
        stats.merge(part);
    }
    Ok(Fp8Quantized {
        values,
        scales,
        stats: ErrorStats::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        let e4 = Fp8Format::E4m3;
        assert_eq!(e4.encode(448.0), 0x7e);
        assert_eq!(e4.encode(1.0e6), 0x7e, "saturates");
        assert_eq!(e4.encode(-1.0e6), 0xfe);
        assert_eq!(e4.encode(1.0), 0x38);
        assert_eq!(e4.encode(2f32.powi(-9)), 0x01, "smallest subnormal");
        assert_eq!(e4.decode(0x08), 2f32.powi(-6));
        // 1 + 1/16 lies halfway between 1 and 1.125: ties go to the even mantissa.
        assert_eq!(e4.encode(1.0625), 0x38);
        assert_eq!(e4.encode(1.1875), 0x3a);
        let e5 = Fp8Format::E5m2;
        assert_eq!(e5.encode(1.0), 0x3c);
        assert_eq!(e5.decode(0x7b), 57344.0);
        assert_eq!(e5.encode(1.0e9), 0x7b, "saturates");
    }

    #[test]
    fn channel_scales_map_the_row_maximum_to_the_largest_value() {
        let w = [1.0f32, -2.0, 0.5, 0.0, 0.0, 0.0];
        let p = FloatParams {
            format: Fp8Format::E4m3,
            per_channel: true,
            scale_dtype: DType::F32,
        };
        let q = quantize(&w, 2, 3, &p).expect("quantize");
        assert_eq!(q.scales, vec![2.0 / 448.0, 1.0]);
        assert_eq!(q.values[1], 0xfe);
        assert_eq!(&q.values[3..], &[0, 0, 0]);
        assert!(q.stats.summary().rel_error < 0.05);
        let e = quantize(&[1.0, f32::INFINITY], 1, 2, &p).expect_err("inf");
        assert!(matches!(e, QuantError::NonFinite { row: 0, col: 1, .. }));
    }
}
