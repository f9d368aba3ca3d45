//! Weight pruning masks: unstructured magnitude pruning and semi-structured N:M.
//!
//! A mask marks the elements that are kept. Selection is by magnitude with ties broken by
//! position (at equal |w| the earlier element is pruned first in magnitude pruning, and kept
//! first in N:M), so the mask is a pure function of the values.

use rayon::prelude::*;

/// Where magnitude pruning counts its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// The smallest elements of the whole tensor.
    Tensor,
    /// The smallest elements of each row, the same count in every row.
    Row,
}

/// A pruning method.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// Remove the `sparsity` fraction of elements with the smallest magnitude.
    Magnitude {
        /// Fraction removed, in `[0, 1)`.
        sparsity: f64,
        /// Where the count applies.
        scope: PruneScope,
    },
    /// Keep the `n` largest of every `m` consecutive elements of a row.
    NOfM {
        /// Kept per group.
        n: u32,
        /// Group length.
        m: u32,
    },
}

impl PruneMethod {
    /// `unstructured` or `N:M`, as `sparsity_config` names the structure.
    pub fn structure(&self) -> String {
        match self {
            PruneMethod::Magnitude { .. } => "unstructured".into(),
            PruneMethod::NOfM { n, m } => format!("{n}:{m}"),
        }
    }

    /// Short human description.
    pub fn describe(&self) -> String {
        match self {
            PruneMethod::Magnitude { sparsity, scope } => {
                let scope = match scope {
                    PruneScope::Tensor => "tensor",
                    PruneScope::Row => "row",
                };
                format!("{}% magnitude per {scope}", sparsity * 100.0)
            }
            PruneMethod::NOfM { n, m } => format!("{n}:{m}"),
        }
    }
}

/// Elements removed from `len` at `sparsity`; the small tolerance absorbs products such as
/// `0.29 * 100 = 28.999…` that are integers in decimal.
pub fn prune_count(len: u64, sparsity: f64) -> u64 {
    ((sparsity * len as f64) + 1e-9).floor().min(len as f64) as u64
}

/// Elements a `rows × cols` matrix keeps under `method` (N:M needs `cols % m == 0`).
pub fn kept_count(rows: u64, cols: u64, method: &PruneMethod) -> u64 {
    match *method {
        PruneMethod::Magnitude {
            sparsity,
            scope: PruneScope::Tensor,
        } => rows * cols - prune_count(rows * cols, sparsity),
        PruneMethod::Magnitude {
            sparsity,
            scope: PruneScope::Row,
        } => rows * (cols - prune_count(cols, sparsity)),
        PruneMethod::NOfM { n, m } => rows * (cols / u64::from(m)) * u64::from(n),
    }
}

/// Orders positions by magnitude, then position: a strict total order.
fn by_magnitude(w: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    move |a, b| {
        let (x, y) = (w[*a as usize].abs(), w[*b as usize].abs());
        x.total_cmp(&y).then(a.cmp(b))
    }
}

/// Keep-mask of a row-major matrix of finite values with `cols` columns (`true` = kept).
pub fn mask(w: &[f32], cols: u64, method: &PruneMethod) -> Vec<bool> {
    let cols_us = (cols as usize).max(1);
    let mut keep = vec![true; w.len()];
    match *method {
        PruneMethod::Magnitude {
            sparsity,
            scope: PruneScope::Tensor,
        } => {
            let mut finder = ThresholdFinder::new(w.len() as u64, sparsity);
            if finder.needs_pass() {
                finder.high_pass(w);
                finder.choose_high();
                finder.low_pass(w);
            }
            if let Some(t) = finder.finish() {
                t.apply_mask(w, &mut 0, &mut keep);
            }
        }
        PruneMethod::Magnitude {
            sparsity,
            scope: PruneScope::Row,
        } => {
            let k = prune_count(cols, sparsity) as usize;
            if k > 0 {
                keep.par_chunks_mut(cols_us)
                    .zip(w.par_chunks(cols_us))
                    .for_each(|(kr, row)| {
                        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
                        idx.select_nth_unstable_by(k - 1, by_magnitude(row));
                        for &i in &idx[..k] {
                            kr[i as usize] = false;
                        }
                    });
            }
        }
        PruneMethod::NOfM { n, m } => {
            let (n, m) = (n as usize, m as usize);
            keep.par_chunks_mut(cols_us)
                .zip(w.par_chunks(cols_us))
                .for_each(|(kr, row)| {
                    for (kg, g) in kr.chunks_mut(m).zip(row.chunks(m)) {
                        let mut idx: Vec<u32> = (0..g.len() as u32).collect();
                        // Largest first; at equal magnitude the earlier element wins.
                        idx.sort_by(|a, b| {
                            g[*b as usize]
                                .abs()
                                .total_cmp(&g[*a as usize].abs())
                                .then(a.cmp(b))
                        });
                        for &i in idx.iter().skip(n) {
                            kg[i as usize] = false;
                        }
                    }
                });
        }
    }
    keep
}

/// Tensor-scope magnitude pruning as a threshold on the magnitudes: every element with
/// `|x| < value` is pruned, and so are the first `ties` (in position order) with `|x| ==
/// value`. Found exactly with two histogram passes over the data, so it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threshold {
    /// Bit pattern of the threshold magnitude (for non-negative floats bit order is value
    /// order).
    pub bits: u32,
    /// Elements at the threshold that are pruned.
    pub ties: u64,
}

impl Threshold {
    /// Marks pruned elements of a block of finite values in `keep` (which it fully
    /// overwrites); `seen` counts threshold ties already pruned in earlier blocks.
    pub fn apply_mask(&self, w: &[f32], seen: &mut u64, keep: &mut [bool]) {
        for (x, k) in w.iter().zip(keep.iter_mut()) {
            let b = x.abs().to_bits();
            *k = if b < self.bits {
                false
            } else if b == self.bits && *seen < self.ties {
                *seen += 1;
                false
            } else {
                true
            };
        }
    }
}

const BINS: usize = 1 << 16;

/// Finds the [`Threshold`] that prunes exactly `prune_count(numel, sparsity)` elements: feed
/// every block to [`ThresholdFinder::high_pass`], call [`ThresholdFinder::choose_high`], then
/// feed every block to [`ThresholdFinder::low_pass`].
#[derive(Debug, Clone)]
pub struct ThresholdFinder {
    k: u64,
    hist: Vec<u64>,
    high: Option<(u32, u64)>,
    lows: bool,
}

impl ThresholdFinder {
    /// A finder for a tensor of `numel` elements.
    pub fn new(numel: u64, sparsity: f64) -> Self {
        Self {
            k: prune_count(numel, sparsity),
            hist: Vec::new(),
            high: None,
            lows: false,
        }
    }

    /// Whether anything is pruned (else no pass is needed).
    pub fn needs_pass(&self) -> bool {
        self.k > 0
    }

    /// Bytes the finder holds at most (one histogram, plus one while a pass adds to it).
    pub const MEMORY: u64 = 2 * (BINS as u64) * 8;

    fn histogram(w: &[f32], key: impl Fn(u32) -> Option<usize>) -> Vec<u64> {
        let mut h = vec![0u64; BINS];
        for x in w {
            if let Some(b) = key(x.abs().to_bits()) {
                h[b] += 1;
            }
        }
        h
    }

    fn add(&mut self, h: Vec<u64>) {
        if self.hist.is_empty() {
            self.hist = h;
        } else {
            for (x, y) in self.hist.iter_mut().zip(h) {
                *x += y;
            }
        }
    }

    /// First pass: counts the high 16 bits of every magnitude.
    pub fn high_pass(&mut self, w: &[f32]) {
        let h = Self::histogram(w, |b| Some((b >> 16) as usize));
        self.add(h);
    }

    /// Picks the high half of the threshold.
    pub fn choose_high(&mut self) {
        let (bin, below) = Self::locate(&self.hist, self.k);
        self.high = Some((bin, below));
        self.hist.clear();
        self.lows = true;
    }

    /// Second pass: counts the low 16 bits of magnitudes in the chosen high bin.
    pub fn low_pass(&mut self, w: &[f32]) {
        let Some((bin, _)) = self.high else { return };
        let h = Self::histogram(w, |b| ((b >> 16) == bin).then_some((b & 0xffff) as usize));
        self.add(h);
    }

    /// The bin holding the `k`-th smallest element, and how many elements lie below it.
    fn locate(hist: &[u64], k: u64) -> (u32, u64) {
        let mut below = 0u64;
        for (i, n) in hist.iter().enumerate() {
            if below + n >= k {
                return (i as u32, below);
            }
            below += n;
        }
        (BINS as u32 - 1, below)
    }

    /// The threshold, or `None` when nothing is pruned.
    pub fn finish(&self) -> Option<Threshold> {
        if self.k == 0 {
            return None;
        }
        let (high, below_high) = self.high?;
        if !self.lows || self.hist.is_empty() {
            return None;
        }
        let (low, below_low) = Self::locate(&self.hist, self.k - below_high);
        Some(Threshold {
            bits: (high << 16) | low,
            ties: self.k - below_high - below_low,
        })
    }
}

/// Zeroes the elements the mask removes.
pub fn apply(w: &mut [f32], keep: &[bool]) {
    for (x, k) in w.iter_mut().zip(keep) {
        if !k {
            *x = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_tensor_prunes_exactly_the_smallest_with_index_ties() {
        let w = [3.0f32, -1.0, 1.0, 0.5, -2.0, 1.0];
        let m = mask(
            &w,
            3,
            &PruneMethod::Magnitude {
                sparsity: 0.5,
                scope: PruneScope::Tensor,
            },
        );
        // 0.5, then the three magnitude-1 values tie: the first two by position go.
        assert_eq!(m, vec![true, false, false, false, true, true]);
    }

    #[test]
    fn magnitude_row_prunes_the_same_count_per_row() {
        let w = [1.0f32, 2.0, 3.0, 4.0, 8.0, 7.0, 6.0, 5.0];
        let m = mask(
            &w,
            4,
            &PruneMethod::Magnitude {
                sparsity: 0.25,
                scope: PruneScope::Row,
            },
        );
        assert_eq!(m, vec![false, true, true, true, true, true, true, false]);
        assert_eq!(prune_count(100, 0.29), 29);
        assert_eq!(prune_count(7, 0.5), 3);
    }

    #[test]
    fn n_of_m_keeps_the_largest_of_each_group() {
        let w = [0.1f32, -0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0];
        let m = mask(&w, 8, &PruneMethod::NOfM { n: 2, m: 4 });
        assert_eq!(m, vec![false, true, true, false, true, true, false, false]);
        let m = mask(&w, 4, &PruneMethod::NOfM { n: 1, m: 2 });
        assert_eq!(m, vec![false, true, true, false, true, false, true, false]);
    }
}
