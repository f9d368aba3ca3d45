//! Reconstruction error of a transformed tensor against its input.

use serde::Serialize;

/// Running sums of reconstruction error, merged in a fixed order so results do not depend on
/// thread count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ErrorStats {
    /// Elements compared.
    pub n: u64,
    /// Σ (x − x̂)².
    pub sum_sq_err: f64,
    /// Σ x².
    pub sum_sq_ref: f64,
    /// max |x − x̂|.
    pub max_abs_err: f32,
}

impl ErrorStats {
    /// Adds one element: original `x`, reconstruction `y`.
    #[inline]
    pub fn add(&mut self, x: f32, y: f32) {
        let d = f64::from(x) - f64::from(y);
        self.n += 1;
        self.sum_sq_err += d * d;
        self.sum_sq_ref += f64::from(x) * f64::from(x);
        let a = (x - y).abs();
        if a > self.max_abs_err {
            self.max_abs_err = a;
        }
    }

    /// Compares two equal-length slices.
    pub fn compare(x: &[f32], y: &[f32]) -> Self {
        let mut s = Self::default();
        for (a, b) in x.iter().zip(y) {
            s.add(*a, *b);
        }
        s
    }

    /// Adds another partial result.
    pub fn merge(&mut self, o: &ErrorStats) {
        self.n += o.n;
        self.sum_sq_err += o.sum_sq_err;
        self.sum_sq_ref += o.sum_sq_ref;
        self.max_abs_err = self.max_abs_err.max(o.max_abs_err);
    }

    /// The summary numbers reported per tensor.
    pub fn summary(&self) -> ErrorSummary {
        let rel = if self.sum_sq_ref > 0.0 {
            (self.sum_sq_err / self.sum_sq_ref).sqrt()
        } else if self.sum_sq_err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        ErrorSummary {
            rel_error: finite(rel),
            mse: if self.n == 0 {
                0.0
            } else {
                self.sum_sq_err / self.n as f64
            },
            snr_db: if self.sum_sq_err > 0.0 && self.sum_sq_ref > 0.0 {
                Some(10.0 * (self.sum_sq_ref / self.sum_sq_err).log10())
            } else {
                None
            },
            max_abs_error: f64::from(self.max_abs_err),
        }
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        f64::MAX
    }
}

/// Error figures of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct ErrorSummary {
    /// ‖x − x̂‖ / ‖x‖ (Frobenius).
    pub rel_error: f64,
    /// Mean squared error.
    pub mse: f64,
    /// 10·log10(‖x‖² / ‖x − x̂‖²); absent when the reconstruction is exact.
    pub snr_db: Option<f64>,
    /// Largest absolute error.
    pub max_abs_error: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_values() {
        let s = ErrorStats::compare(&[3.0, 4.0], &[3.0, 3.0]);
        let m = s.summary();
        assert!((m.rel_error - 0.2).abs() < 1e-12);
        assert!((m.mse - 0.5).abs() < 1e-12);
        assert!((m.snr_db.unwrap_or(0.0) - 10.0 * 25f64.log10()).abs() < 1e-9);
        assert_eq!(m.max_abs_error, 1.0);
        let exact = ErrorStats::compare(&[1.0], &[1.0]).summary();
        assert_eq!(exact.snr_db, None);
        assert_eq!(exact.rel_error, 0.0);
    }
}
