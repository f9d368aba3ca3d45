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
            let rows_per_item = (ITEM / cols_us).max(1);
            keep.par_chunks_mut(cols_us * rows_per_item)
                .zip(w.par_chunks(cols_us * rows_per_item))
                .for_each(|(kr, rows)| {
                    for (kr, row) in kr.chunks_mut(cols_us).zip(rows.chunks(cols_us)) {
                        n_of_m_row(row, kr, n, m);
                    }
                });
        }
    }
    keep
}

/// Elements per parallel work item.
const ITEM: usize = 1 << 16;

/// N:M keep-mask of one row: in every `m` consecutive elements (the last group may be
/// shorter) the `n` largest magnitudes are kept, the earlier element first at equal
/// magnitude. An element is kept when fewer than `n` elements of its group beat it, which
/// needs no sorting and no allocation; 2:4 and 1:2 run as fixed-size loops.
fn n_of_m_row(row: &[f32], keep: &mut [bool], n: usize, m: usize) {
    match m {
        4 => n_of_m_fixed::<4>(row, keep, n),
        2 => n_of_m_fixed::<2>(row, keep, n),
        8 => n_of_m_fixed::<8>(row, keep, n),
        _ => {
            for (g, k) in row.chunks(m.max(1)).zip(keep.chunks_mut(m.max(1))) {
                n_of_m_group(g, k, n);
            }
        }
    }
}

fn n_of_m_fixed<const M: usize>(row: &[f32], keep: &mut [bool], n: usize) {
    let mut gs = row.chunks_exact(M);
    let mut ks = keep.chunks_exact_mut(M);
    for (g, k) in (&mut gs).zip(&mut ks) {
        let a: [u32; M] = std::array::from_fn(|i| g[i].abs().to_bits());
        for i in 0..M {
            let mut beaten = 0usize;
            for j in 0..M {
                // j beats i: larger, or equal and earlier.
                beaten += usize::from(a[j] > a[i] || (a[j] == a[i] && j < i));
            }
            k[i] = beaten < n;
        }
    }
    n_of_m_group(gs.remainder(), ks.into_remainder(), n);
}

fn n_of_m_group(g: &[f32], k: &mut [bool], n: usize) {
    for (i, ki) in k.iter_mut().enumerate().take(g.len()) {
        let ai = g[i].abs().to_bits();
        let beaten = g
            .iter()
            .enumerate()
            .filter(|(j, x)| {
                let aj = x.abs().to_bits();
                aj > ai || (aj == ai && *j < i)
            })
            .count();
        *ki = beaten < n;
    }
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
        let t = self.bits;
        // Everything strictly below goes; ties are kept for now and counted per item.
        let ties: Vec<u64> = w
            .par_chunks(ITEM)
            .zip(keep.par_chunks_mut(ITEM))
            .map(|(x, k)| {
                let mut eq = 0u64;
                for (x, k) in x.iter().zip(k.iter_mut()) {
                    let b = x.abs().to_bits();
                    *k = b >= t;
                    eq += u64::from(b == t);
                }
                eq
            })
            .collect();
        let remaining = self.ties.saturating_sub(*seen);
        if remaining == 0 {
            return;
        }
        // The first `remaining` ties in position order are pruned: each item knows from the
        // counts before it how many of its own ties that covers.
        let mut before = 0u64;
        let quota: Vec<u64> = ties
            .iter()
            .map(|&eq| {
                let q = remaining.saturating_sub(before).min(eq);
                before += eq;
                q
            })
            .collect();
        w.par_chunks(ITEM)
            .zip(keep.par_chunks_mut(ITEM))
            .zip(quota.par_iter())
            .for_each(|((x, k), &q)| {
                let mut left = q;
                for (x, k) in x.iter().zip(k.iter_mut()) {
                    if left == 0 {
                        break;
                    }
                    if x.abs().to_bits() == t {
                        *k = false;
                        left -= 1;
                    }
                }
            });
        *seen += quota.iter().sum::<u64>();
    }
}

const BINS: usize = 1 << 16;

/// Elements per item of a histogram pass.
const HIST_ITEM: usize = 1 << 20;

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
    /// While a pass runs each thread also holds a 256 KiB item histogram and a 512 KiB sum,
    /// which the process allowance covers.
    pub const MEMORY: u64 = 2 * (BINS as u64) * 8;

    /// Counts per bin, items counted in parallel with 32-bit bins (an item has fewer than
    /// 2^32 elements) and added up; integer sums, so the result does not depend on the split.
    fn histogram(w: &[f32], key: impl Fn(u32) -> Option<usize> + Sync) -> Vec<u64> {
        w.par_chunks(HIST_ITEM)
            .map(|c| {
                let mut h = vec![0u32; BINS];
                for x in c {
                    if let Some(b) = key(x.abs().to_bits()) {
                        h[b] += 1;
                    }
                }
                h
            })
            .fold(
                || vec![0u64; BINS],
                |mut acc, h| {
                    for (a, b) in acc.iter_mut().zip(&h) {
                        *a += u64::from(*b);
                    }
                    acc
                },
            )
            .reduce(
                || vec![0u64; BINS],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += y;
                    }
                    a
                },
            )
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

/// Plain versions of the selections, which tests compare with bit for bit.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

    /// N:M by sorting each group's positions.
    pub fn n_of_m(w: &[f32], cols: usize, n: usize, m: usize) -> Vec<bool> {
        let mut keep = vec![true; w.len()];
        for (kr, row) in keep.chunks_mut(cols).zip(w.chunks(cols)) {
            for (kg, g) in kr.chunks_mut(m).zip(row.chunks(m)) {
                let mut idx: Vec<u32> = (0..g.len() as u32).collect();
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
        }
        keep
    }

    /// Threshold mask one element at a time.
    pub fn apply_mask(t: &Threshold, w: &[f32], seen: &mut u64, keep: &mut [bool]) {
        for (x, k) in w.iter().zip(keep.iter_mut()) {
            let b = x.abs().to_bits();
            *k = if b < t.bits {
                false
            } else if b == t.bits && *seen < t.ties {
                *seen += 1;
                false
            } else {
                true
            };
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

    /// Values with many exact ties in magnitude, as bf16 weights have.
    fn tied_values(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 20) % 9) as f32 * 0.25;
                if state & 1 == 0 {
                    v
                } else {
                    -v
                }
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn n_of_m_matches_sorting(
            seed: u64,
            rows in 1usize..5,
            groups in 1usize..20,
            m in 1usize..10,
            n_frac in 0usize..10,
            ragged in 0usize..3,
        ) {
            let n = n_frac % m;
            let cols = groups * m + if m > 1 { ragged % m } else { 0 };
            let w = tied_values(seed, rows * cols);
            let got = mask(&w, cols as u64, &PruneMethod::NOfM { n: n as u32, m: m as u32 });
            proptest::prop_assert_eq!(got, reference::n_of_m(&w, cols, n, m));
        }

        #[test]
        fn threshold_mask_matches_sequential(
            seed: u64,
            len in 0usize..300_000,
            sparsity in 0.0f64..0.99,
            split in 0usize..300_000,
        ) {
            let w = tied_values(seed, len);
            let mut finder = ThresholdFinder::new(len as u64, sparsity);
            if !finder.needs_pass() {
                return Ok(());
            }
            finder.high_pass(&w);
            finder.choose_high();
            finder.low_pass(&w);
            let Some(t) = finder.finish() else {
                return Err(proptest::test_runner::TestCaseError::fail("no threshold"));
            };
            // Two blocks, as streaming feeds them.
            let split = split.min(len);
            let (mut a, mut b) = (vec![true; len], vec![true; len]);
            let (mut seen_a, mut seen_b) = (0u64, 0u64);
            t.apply_mask(&w[..split], &mut seen_a, &mut a[..split]);
            t.apply_mask(&w[split..], &mut seen_a, &mut a[split..]);
            reference::apply_mask(&t, &w[..split], &mut seen_b, &mut b[..split]);
            reference::apply_mask(&t, &w[split..], &mut seen_b, &mut b[split..]);
            proptest::prop_assert_eq!(seen_a, seen_b);
            proptest::prop_assert_eq!(&a, &b);
            let pruned = a.iter().filter(|k| !**k).count() as u64;
            proptest::prop_assert_eq!(pruned, prune_count(len as u64, sparsity));
        }
    }
}
