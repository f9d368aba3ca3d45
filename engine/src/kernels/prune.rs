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
            let k = prune_count(w.len() as u64, sparsity) as usize;
            if k > 0 {
                let mut idx: Vec<u32> = (0..w.len() as u32).collect();
                idx.select_nth_unstable_by(k - 1, by_magnitude(w));
                for &i in &idx[..k] {
                    keep[i as usize] = false;
                }
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
