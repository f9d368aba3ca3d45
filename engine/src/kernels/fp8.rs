//! FP8 weight quantization (e4m3 or e5m2) with one scale per tensor or per output channel.
//!
//! The scale maps a group's largest magnitude onto the format's largest finite value;
//! elements are divided by the stored (rounded) scale and converted with round to nearest
//! even, saturating at the largest finite value.

use float8::{F8E4M3, F8E5M2};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::kernels::convert::decode_f32;
use crate::kernels::convert::round_trip;
use crate::kernels::int_quant::{check_finite, merge_rows, QuantError, ROWS_ITEM};
use crate::kernels::lanes::{self, chunk, round_small, LaneStats, L};
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
    w.par_chunks((cols as usize).max(1))
        .map(lanes::absmax)
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
                scale_for(lanes::absmax(row), p).map_err(|scale| QuantError::Scale {
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
            encode_row(p.format, row, s, out)
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

/// [`quantize_rows`] with one scale per row, straight from raw little-endian elements of
/// `dtype`: each row is decoded into a small buffer, checked and encoded while in cache.
/// Same bytes and errors as decoding the block first.
pub fn quantize_raw_rows(
    dtype: DType,
    bytes: &[u8],
    rows: u64,
    cols: u64,
    p: &FloatParams,
    row0: u64,
    stats: &mut ErrorStats,
) -> Result<Fp8Quantized, QuantError> {
    let cols_us = cols as usize;
    let width = (dtype.bits() / 8) as usize;
    if rows == 0 || cols_us == 0 || width == 0 || !p.per_channel {
        let mut w = vec![0f32; bytes.len() / width.max(1)];
        decode_f32(dtype, bytes, &mut w);
        return quantize_rows(&w, rows, cols, p, None, row0, stats);
    }
    let mut values = vec![0u8; rows as usize * cols_us];
    let mut scales = vec![0f32; rows as usize];
    let results: Vec<Result<ErrorStats, QuantError>> = bytes
        .par_chunks(cols_us * width)
        .zip(values.par_chunks_mut(cols_us))
        .zip(scales.par_iter_mut())
        .enumerate()
        .with_min_len((ROWS_ITEM / cols_us).max(1))
        .map_init(Vec::new, |x, (r, ((raw, out), sc))| {
            let row = row0 + r as u64;
            x.resize(cols_us, 0.0);
            decode_f32(dtype, raw, x);
            check_finite(x, row)?;
            let s = scale_for(lanes::absmax(x), p).map_err(|scale| QuantError::Scale {
                row,
                group: 0,
                scale,
                dtype: p.scale_dtype,
            })?;
            *sc = s;
            Ok(encode_row(p.format, x, s, out))
        })
        .collect();
    merge_rows(results, stats)?;
    Ok(Fp8Quantized {
        values,
        scales,
        stats: ErrorStats::default(),
    })
}

/// Bit layout of an FP8 format, for the vectorised encoder.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// f32 mantissa bits dropped (23 − mantissa bits).
    shift: u32,
    /// f32 bits of the smallest normal value.
    min_normal: u32,
    /// Subtracted from the rounded f32 bits (shifted) to rebias the exponent.
    rebias: u32,
    /// Largest finite code.
    max_code: u32,
    /// Largest finite value.
    max_value: f32,
    /// 1 / spacing of the subnormals.
    sub_scale: f32,
}

impl Fp8Format {
    fn layout(self) -> Layout {
        match self {
            // e4m3: bias 7, 3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9.
            Fp8Format::E4m3 => Layout {
                shift: 20,
                min_normal: 121 << 23,
                rebias: 120 << 3,
                max_code: 0x7e,
                max_value: 448.0,
                sub_scale: 512.0,
            },
            // e5m2: bias 15, 2 mantissa bits, smallest normal 2^-14, subnormal step 2^-16.
            Fp8Format::E5m2 => Layout {
                shift: 21,
                min_normal: 113 << 23,
                rebias: 112 << 2,
                max_code: 0x7b,
                max_value: 57344.0,
                sub_scale: 65536.0,
            },
        }
    }
}

/// Encodes one finite value without branches: its code and the value the code stands for.
///
/// Normal range: round the f32 bits to the format's mantissa width (to nearest, ties to
/// even: add half an ulp minus one plus the lowest kept bit), rebias the exponent and
/// saturate. Below the smallest normal the spacing is fixed, so the code is the value
/// divided by the spacing, rounded. Same codes as [`Fp8Format::encode`] on finite input.
#[inline(always)]
fn encode_one(l: &Layout, y: f32) -> (u8, f32) {
    let bits = y.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits & 0x7fff_ffff;
    let half = (1u32 << (l.shift - 1)) - 1;
    let r = (a + half + ((a >> l.shift) & 1)) >> l.shift;
    let normal_code = r.wrapping_sub(l.rebias).min(l.max_code);
    let normal_value = f32::from_bits(r << l.shift).min(l.max_value);
    let sub = round_small(f32::from_bits(a) * l.sub_scale);
    let is_sub = a < l.min_normal;
    let code = if is_sub { sub as u32 } else { normal_code };
    let value = if is_sub {
        sub / l.sub_scale
    } else {
        normal_value
    };
    (
        (code | (sign >> 24)) as u8,
        f32::from_bits(value.to_bits() | sign),
    )
}

/// Encodes a row of finite values divided by `s`, returning its reconstruction error.
fn encode_row(format: Fp8Format, row: &[f32], s: f32, out: &mut [u8]) -> ErrorStats {
    let l = format.layout();
    let mut acc = LaneStats::default();
    let mut xc = row.chunks_exact(L);
    let mut oc = out.chunks_exact_mut(L);
    for (x, o) in (&mut xc).zip(&mut oc) {
        let x = chunk(x);
        let mut deq = [0f32; L];
        for i in 0..L {
            let (c, v) = encode_one(&l, x[i] / s);
            o[i] = c;
            deq[i] = v * s;
        }
        acc.add_chunk(&x, &deq);
    }
    let (xt, ot) = (xc.remainder(), oc.into_remainder());
    let mut deq = [0f32; L];
    for ((&x, o), d) in xt.iter().zip(ot.iter_mut()).zip(deq.iter_mut()) {
        let (c, v) = encode_one(&l, x / s);
        *o = c;
        *d = v * s;
    }
    acc.add_tail(xt, &deq[..xt.len()]);
    acc.finish()
}

/// Plain element-at-a-time versions, which tests compare with bit for bit.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

    /// Encodes a row with the `float8` crate, one element at a time.
    pub fn encode_row(format: Fp8Format, row: &[f32], s: f32, out: &mut [u8]) -> ErrorStats {
        let mut stats = ErrorStats::default();
        for (o, &x) in out.iter_mut().zip(row) {
            *o = format.encode(x / s);
            stats.add(x, format.decode(*o) * s);
        }
        stats
    }
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

    fn check_codes(format: Fp8Format, ys: impl Iterator<Item = f32>) {
        let l = format.layout();
        for y in ys.filter(|y| y.is_finite()) {
            let (c, v) = encode_one(&l, y);
            assert_eq!(
                c,
                format.encode(y),
                "{format:?} code of {y:e} ({:#x})",
                y.to_bits()
            );
            assert_eq!(
                v.to_bits(),
                format.decode(c).to_bits(),
                "{format:?} value of {y:e}"
            );
        }
    }

    #[test]
    fn encoder_matches_float8_on_every_bf16_value_and_strided_f32() {
        for format in [Fp8Format::E4m3, Fp8Format::E5m2] {
            // Every bf16 bit pattern, and every f32 pattern at a stride that hits all
            // exponents and many mantissa tails, plus the neighbours of each code's midpoints.
            check_codes(
                format,
                (0..=u16::MAX).map(|h| f32::from_bits(u32::from(h) << 16)),
            );
            check_codes(format, (0..=u32::MAX).step_by(4093).map(f32::from_bits));
            check_codes(
                format,
                (0..=255u8).flat_map(|c| {
                    let m = format.decode(c);
                    let n = format.decode(c.wrapping_add(1));
                    let mid = (m + n) / 2.0;
                    [
                        mid,
                        f32::from_bits(mid.to_bits().wrapping_add(1)),
                        f32::from_bits(mid.to_bits().wrapping_sub(1)),
                    ]
                }),
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_row_matches_reference(
            xs in proptest::collection::vec(-1.0e4f32..1.0e4, 0..70),
            s in 1.0e-3f32..30.0,
            e5: bool,
        ) {
            let format = if e5 { Fp8Format::E5m2 } else { Fp8Format::E4m3 };
            let mut a = vec![0u8; xs.len()];
            let mut b = vec![0u8; xs.len()];
            let fast = encode_row(format, &xs, s, &mut a);
            let slow = reference::encode_row(format, &xs, s, &mut b);
            proptest::prop_assert_eq!(a, b);
            proptest::prop_assert_eq!(fast.n, slow.n);
            proptest::prop_assert_eq!(fast.max_abs_err, slow.max_abs_err);
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y.abs().max(1e-300);
            proptest::prop_assert!(close(fast.sum_sq_err, slow.sum_sq_err));
            proptest::prop_assert!(close(fast.sum_sq_ref, slow.sum_sq_ref));
        }
    }
}
