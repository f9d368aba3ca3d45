//! Element conversions between stored float formats and f32 working buffers.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::dtype::DType;

/// Decodes little-endian elements of `dtype` from `bytes` into `out` (one f32 per element).
///
/// Only the float types the engine transforms are accepted; `bytes.len()` must equal
/// `out.len() * size_of(dtype)`, which callers guarantee from validated headers.
pub fn decode_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        DType::F16 => {
            // `half` converts slices with F16C when the CPU has it (detected at run time).
            let mut buf = [f16::ZERO; 256];
            for (o, b) in out.chunks_mut(256).zip(bytes.chunks(512)) {
                let n = o.len().min(b.len() / 2);
                for (h, e) in buf.iter_mut().zip(b.chunks_exact(2)) {
                    *h = f16::from_bits(u16::from_le_bytes([e[0], e[1]]));
                }
                buf[..n].convert_to_f32_slice(&mut o[..n]);
            }
        }
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F64 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                *o = f64::from_le_bytes(a) as f32;
            }
        }
        _ => out.fill(f32::NAN),
    }
}

/// Rounds an f32 to what `dtype` stores (round to nearest even) and back.
pub fn round_trip(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Appends `x` encoded as `dtype` (little-endian) to `out`.
pub fn encode_one(dtype: DType, x: f32, out: &mut Vec<u8>) {
    match dtype {
        DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_bits().to_le_bytes()),
        DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes()),
        DType::F64 => out.extend_from_slice(&f64::from(x).to_le_bytes()),
        _ => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Casts raw elements of `src` to `dst` (bf16, f16 or f32), writing into `out` and the
/// decoded value of each written element into `back`, for error metrics.
///
/// Rounding is to nearest even. f64 inputs are first narrowed to f32 with round-to-odd, which
/// keeps the final rounding correct (f32 carries more than two extra bits over bf16 and f16).
pub fn cast_bytes(src: DType, dst: DType, bytes: &[u8], out: &mut [u8], back: &mut [f32]) {
    let width = (dst.bits() / 8) as usize;
    let src_width = (src.bits() / 8) as usize;
    for ((o, b), r) in out
        .chunks_exact_mut(width)
        .zip(bytes.chunks_exact(src_width))
        .zip(back.iter_mut())
    {
        let v = read_f32(src, b);
        match dst {
            DType::BF16 => {
                let h = bf16::from_f32(v);
                o.copy_from_slice(&h.to_bits().to_le_bytes());
                *r = h.to_f32();
            }
            DType::F16 => {
                let h = f16::from_f32(v);
                o.copy_from_slice(&h.to_bits().to_le_bytes());
                *r = h.to_f32();
            }
            _ => {
                o.copy_from_slice(&v.to_le_bytes());
                *r = v;
            }
        }
    }
}

/// Narrows f64 to f32 rounding to odd: truncate toward zero, then set the last mantissa bit
/// when the result is inexact.
fn f64_to_f32_round_odd(x: f64) -> f32 {
    let f = x as f32;
    if !x.is_finite() || f64::from(f) == x || f.is_infinite() {
        return f;
    }
    // `f` is the nearest f32; step toward zero if it lies beyond `x`.
    let truncated = if f64::from(f).abs() > x.abs() {
        f32::from_bits(f.to_bits() - 1)
    } else {
        f
    };
    f32::from_bits(truncated.to_bits() | 1)
}

fn read_f32(dtype: DType, b: &[u8]) -> f32 {
    match dtype {
        DType::BF16 => f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        DType::F16 => f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F64 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            f64_to_f32_round_odd(f64::from_le_bytes(a))
        }
        _ => f32::NAN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_decode_matches_half() {
        let vals = [0.0f32, -1.5, 3.140625, 65504.0, f32::INFINITY];
        let mut bytes = Vec::new();
        for v in vals {
            bytes.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
        }
        let mut out = [0f32; 5];
        decode_f32(DType::BF16, &bytes, &mut out);
        for (o, v) in out.iter().zip(vals) {
            assert_eq!(*o, bf16::from_f32(v).to_f32());
        }
    }

    #[test]
    fn cast_rounds_up_past_halfway_from_low_bits() {
        // 0x3ca48007: the low half is above the tie, so bf16 rounds up to 0x3ca5.
        let bytes = f32::from_bits(0x3ca4_8007).to_le_bytes();
        let mut out = [0u8; 2];
        let mut back = [0f32; 1];
        cast_bytes(DType::F32, DType::BF16, &bytes, &mut out, &mut back);
        assert_eq!(u16::from_le_bytes(out), 0x3ca5);
        // From f64 just above the halfway point between two bf16 values.
        let x = 1.0f64 + 2f64.powi(-8) + 2f64.powi(-40);
        cast_bytes(
            DType::F64,
            DType::BF16,
            &x.to_le_bytes(),
            &mut out,
            &mut back,
        );
        assert_eq!(u16::from_le_bytes(out), 0x3f81);
        let tie = 1.0f64 + 2f64.powi(-8);
        cast_bytes(
            DType::F64,
            DType::BF16,
            &tie.to_le_bytes(),
            &mut out,
            &mut back,
        );
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
    }

    #[test]
    fn cast_rounds_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values; ties go to the even mantissa (1.0).
        let x = 1.0f32 + 2f32.powi(-8);
        let bytes = x.to_le_bytes();
        let mut out = [0u8; 2];
        let mut back = [0f32; 1];
        cast_bytes(DType::F32, DType::BF16, &bytes, &mut out, &mut back);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        assert_eq!(back[0], 1.0);
        cast_bytes(DType::F32, DType::F16, &bytes, &mut out, &mut back);
        assert_eq!(back[0], x);
    }

    #[test]
    fn f16_slice_decode_matches_per_element_for_every_pattern() {
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
        let mut out = vec![0f32; 1 << 16];
        decode_f32(DType::F16, &bytes, &mut out);
        for (h, o) in (0..=u16::MAX).zip(&out) {
            let want = f16::from_bits(h).to_f32();
            // NaN payloads may differ between the two paths; NaN stays NaN.
            if want.is_nan() {
                assert!(o.is_nan(), "{h:#x}");
            } else {
                assert_eq!(o.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
    }
}
