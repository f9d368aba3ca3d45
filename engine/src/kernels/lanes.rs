//! Building blocks for kernels the compiler vectorises: fixed-width lane arrays processed in
//! chunks, so loops carry no dependency from one element to the next and have no branches
//! per element.
//!
//! Everything here is exact and deterministic: the result depends only on the input and its
//! order, never on the machine (only baseline x86-64 / aarch64 instructions are assumed, no
//! build-host features).

use crate::metrics::ErrorStats;

/// Elements per chunk: two SSE registers of f32, one AVX register.
pub const L: usize = 8;

/// Rounds to the nearest integer, ties to even, for `|v| <= 2^22`.
///
/// Adding and subtracting 1.5 · 2^23 leaves an integer because the sum lies where f32 has
/// unit spacing, and the hardware's default rounding is to nearest even. Unlike
/// `round_ties_even` this needs no SSE4.1 and no library call, so it vectorises on baseline
/// x86-64. (A negative value that rounds to zero comes out as +0.0, not -0.0.)
#[inline(always)]
pub fn round_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Smallest and largest of `values` and 0, as the lane-wise minimum and maximum.
///
/// For finite input this is exactly the fold with `f32::min`/`f32::max` from 0 (up to the
/// sign of a zero result, which every caller treats alike).
pub fn range_with_zero(values: &[f32]) -> (f32, f32) {
    let mut lo = [0f32; L];
    let mut hi = [0f32; L];
    let mut chunks = values.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
            hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        lo[i] = if x < lo[i] { x } else { lo[i] };
        hi[i] = if x > hi[i] { x } else { hi[i] };
    }
    let lo = lo.iter().fold(0f32, |a, &b| if b < a { b } else { a });
    let hi = hi.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    (lo, hi)
}

/// Largest magnitude of `values` (0 for none).
pub fn absmax(values: &[f32]) -> f32 {
    let mut m = [0f32; L];
    let mut chunks = values.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            let a = c[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
        }
    }
    for (i, &x) in chunks.remainder().iter().enumerate() {
        let a = x.abs();
        m[i] = if a > m[i] { a } else { m[i] };
    }
    m.iter().fold(0f32, |a, &b| if b > a { b } else { a })
}

/// Whether every value is finite (no NaN, no infinity).
pub fn all_finite(values: &[f32]) -> bool {
    let mut bad = [0u32; L];
    let mut chunks = values.chunks_exact(L);
    for c in &mut chunks {
        for i in 0..L {
            bad[i] |= u32::from(c[i].to_bits() & 0x7f80_0000 == 0x7f80_0000);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .any(|x| x.to_bits() & 0x7f80_0000 == 0x7f80_0000);
    !tail && bad.iter().all(|b| *b == 0)
}

/// Reconstruction error sums kept per lane, so the additions of neighbouring elements are
/// independent; [`LaneStats::finish`] adds the lanes in lane order. The result is a fixed
/// function of the input sequence (element `i` always goes to lane `i % L` of its chunk).
#[derive(Debug, Clone, Copy, Default)]
pub struct LaneStats {
    n: u64,
    err: [f64; L],
    refsq: [f64; L],
    max: [f32; L],
}

impl LaneStats {
    /// Adds a chunk of originals `x` and reconstructions `y`.
    #[inline(always)]
    pub fn add_chunk(&mut self, x: &[f32; L], y: &[f32; L]) {
        for i in 0..L {
            let d = f64::from(x[i]) - f64::from(y[i]);
            self.err[i] += d * d;
            self.refsq[i] += f64::from(x[i]) * f64::from(x[i]);
            let a = (x[i] - y[i]).abs();
            self.max[i] = if a > self.max[i] { a } else { self.max[i] };
        }
        self.n += L as u64;
    }

    /// Adds fewer than `L` elements (a chunk's tail), lane by lane.
    #[inline]
    pub fn add_tail(&mut self, x: &[f32], y: &[f32]) {
        for (i, (&a, &b)) in x.iter().zip(y).enumerate().take(L) {
            let d = f64::from(a) - f64::from(b);
            self.err[i] += d * d;
            self.refsq[i] += f64::from(a) * f64::from(a);
            let e = (a - b).abs();
            self.max[i] = if e > self.max[i] { e } else { self.max[i] };
            self.n += 1;
        }
    }

    /// The sums, lanes added in order.
    pub fn finish(&self) -> ErrorStats {
        ErrorStats {
            n: self.n,
            sum_sq_err: self.err.iter().sum(),
            sum_sq_ref: self.refsq.iter().sum(),
            max_abs_err: self.max.iter().fold(0f32, |a, &b| a.max(b)),
        }
    }
}

/// Copies a chunk of `L` into an array (the compiler drops the bounds checks).
#[inline(always)]
pub fn chunk(c: &[f32]) -> [f32; L] {
    std::array::from_fn(|i| c[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_small_matches_round_ties_even() {
        let mut v = -4096.0f32;
        while v <= 4096.0 {
            for d in [0.0f32, 0.25, 0.5, 0.5000001, 0.4999999, 0.75] {
                let x = v + d;
                assert_eq!(round_small(x), x.round_ties_even() + 0.0, "{x}");
            }
            v += 1.0;
        }
        assert_eq!(round_small(2.5), 2.0);
        assert_eq!(round_small(-2.5), -2.0);
        assert_eq!(round_small(3.5), 4.0);
    }

    #[test]
    fn reductions_match_folds() {
        let v: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 - 60.0).collect();
        for n in [0, 1, 7, 8, 9, 16, 37] {
            let s = &v[..n];
            let lo = s.iter().fold(0f32, |a, &b| a.min(b));
            let hi = s.iter().fold(0f32, |a, &b| a.max(b));
            assert_eq!(range_with_zero(s), (lo, hi));
            assert_eq!(absmax(s), s.iter().fold(0f32, |a, b| a.max(b.abs())));
        }
        assert!(all_finite(&v));
        let mut w = v.clone();
        w[36] = f32::NAN;
        assert!(!all_finite(&w));
        w[36] = 0.0;
        w[3] = f32::NEG_INFINITY;
        assert!(!all_finite(&w));
    }

    #[test]
    fn lane_stats_agree_with_sequential_sums() {
        let x: Vec<f32> = (0..29).map(|i| i as f32 * 0.5 - 3.0).collect();
        let y: Vec<f32> = x.iter().map(|v| (v * 2.0).round() / 2.0 + 0.25).collect();
        let mut s = LaneStats::default();
        let mut cx = x.chunks_exact(L);
        let mut cy = y.chunks_exact(L);
        for (a, b) in (&mut cx).zip(&mut cy) {
            s.add_chunk(&chunk(a), &chunk(b));
        }
        s.add_tail(cx.remainder(), cy.remainder());
        let got = s.finish();
        let want = ErrorStats::compare(&x, &y);
        assert_eq!(got.n, want.n);
        assert_eq!(got.max_abs_err, want.max_abs_err);
        // Sums of exactly representable squares: the order does not matter here.
        assert_eq!(got.sum_sq_err, want.sum_sq_err);
        assert_eq!(got.sum_sq_ref, want.sum_sq_ref);
    }
}
