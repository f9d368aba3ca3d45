//! Sparse bitmask storage of a 2-D tensor (the compressed-tensors `sparse-bitmask` layout):
//! the kept elements in row-major order, a bitmask of `[rows, ceil(cols / 8)]` bytes where
//! bit `c % 8` of byte `c / 8` marks a kept element at column `c`, and per-row offsets into
//! the values.
//!
//! The bitmask is the pruning mask, so the number of stored values is known when the job is
//! planned (a kept element that happens to be zero is stored as a zero value; decoders that
//! scatter values into the marked positions read it back the same). Works on raw element
//! bytes of any width, so values are stored exactly as they were.

use rayon::prelude::*;

/// A tensor in bitmask form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmaskTensor {
    /// Non-zero elements' bytes, row-major.
    pub values: Vec<u8>,
    /// Number of non-zero elements.
    pub nnz: u64,
    /// `rows × ceil(cols / 8)` bytes.
    pub bitmask: Vec<u8>,
    /// Index of each row's first value.
    pub row_offsets: Vec<i64>,
}

/// Bytes per row of the bitmask.
pub fn mask_row_bytes(cols: u64) -> u64 {
    cols.div_ceil(8)
}

/// Compresses `rows × cols` elements of `width` bytes each, keeping those `keep` marks.
///
/// Rows run in parallel: the kept count of every row gives its offset first, then each row
/// writes its mask bytes and its values into its own part of the output.
pub fn compress(bytes: &[u8], keep: &[bool], rows: u64, cols: u64, width: usize) -> BitmaskTensor {
    let cols_us = cols as usize;
    let rows_us = rows as usize;
    let mrow = mask_row_bytes(cols) as usize;
    let mut bitmask = vec![0u8; rows_us * mrow];
    if cols_us == 0 || width == 0 {
        return BitmaskTensor {
            values: Vec::new(),
            nnz: 0,
            bitmask,
            row_offsets: vec![0; rows_us],
        };
    }
    let counts: Vec<usize> = keep
        .par_chunks(cols_us)
        .map(|k| k.iter().map(|&b| usize::from(b)).sum())
        .collect();
    let mut row_offsets = Vec::with_capacity(rows_us);
    let mut nnz = 0usize;
    for c in &counts {
        row_offsets.push(nnz as i64);
        nnz += c;
    }
    let mut values = vec![0u8; nnz * width];
    let mut parts = Vec::with_capacity(rows_us);
    let mut rest = values.as_mut_slice();
    for c in &counts {
        let (part, tail) = rest.split_at_mut(c * width);
        parts.push(part);
        rest = tail;
    }
    bitmask
        .par_chunks_mut(mrow.max(1))
        .zip(bytes.par_chunks(cols_us * width))
        .zip(keep.par_chunks(cols_us))
        .zip(parts.into_par_iter())
        .with_min_len((ROW_ITEM / cols_us).max(1))
        .for_each(|(((m, row), kr), out)| {
            mask_bytes(kr, m);
            match width {
                2 => compact::<2>(row, kr, out),
                4 => compact::<4>(row, kr, out),
                _ => compact_any(row, kr, out, width),
            }
        });
    BitmaskTensor {
        values,
        nnz: nnz as u64,
        bitmask,
        row_offsets,
    }
}

/// Elements per parallel work item when rows are short.
const ROW_ITEM: usize = 1 << 14;

/// Bit `c % 8` of byte `c / 8` for every kept column.
fn mask_bytes(keep: &[bool], out: &mut [u8]) {
    for (o, k) in out.iter_mut().zip(keep.chunks(8)) {
        *o = k
            .iter()
            .enumerate()
            .fold(0u8, |b, (j, &x)| b | (u8::from(x) << j));
    }
}

/// Kept elements of `W` bytes, in order, without a branch per element: every element is
/// written to a small buffer at the next free slot, which advances only for kept ones.
fn compact<const W: usize>(row: &[u8], keep: &[bool], out: &mut [u8]) {
    const BLOCK: usize = 64;
    let mut n = 0usize;
    let mut buf = [[0u8; W]; BLOCK];
    for (es, ks) in row.chunks(BLOCK * W).zip(keep.chunks(BLOCK)) {
        let mut t = 0usize;
        for (e, &k) in es.chunks_exact(W).zip(ks) {
            buf[t] = std::array::from_fn(|i| e[i]);
            t += usize::from(k);
        }
        out[n * W..(n + t) * W].copy_from_slice(buf[..t].as_flattened());
        n += t;
    }
}

fn compact_any(row: &[u8], keep: &[bool], out: &mut [u8], width: usize) {
    let mut n = 0usize;
    for (e, &k) in row.chunks_exact(width).zip(keep) {
        if k {
            out[n..n + width].copy_from_slice(e);
            n += width;
        }
    }
}

/// The plain version, which tests compare with bit for bit.
#[cfg(test)]
pub(crate) mod reference {
    use super::*;

    /// Compresses one element at a time.
    pub fn compress(
        bytes: &[u8],
        keep: &[bool],
        rows: u64,
        cols: u64,
        width: usize,
    ) -> BitmaskTensor {
        let cols_us = cols as usize;
        let mrow = mask_row_bytes(cols) as usize;
        let mut bitmask = vec![0u8; rows as usize * mrow];
        let mut row_offsets = Vec::with_capacity(rows as usize);
        let mut values = Vec::new();
        let mut nnz = 0u64;
        if cols_us == 0 || width == 0 {
            row_offsets.resize(rows as usize, 0);
            return BitmaskTensor {
                values,
                nnz,
                bitmask,
                row_offsets,
            };
        }
        for (r, (row, kr)) in bytes
            .chunks_exact(cols_us * width)
            .zip(keep.chunks_exact(cols_us))
            .enumerate()
        {
            row_offsets.push(nnz as i64);
            let mask = &mut bitmask[r * mrow..(r + 1) * mrow];
            for (c, (elem, k)) in row.chunks_exact(width).zip(kr).enumerate() {
                if *k {
                    mask[c / 8] |= 1 << (c % 8);
                    values.extend_from_slice(elem);
                    nnz += 1;
                }
            }
        }
        BitmaskTensor {
            values,
            nnz,
            bitmask,
            row_offsets,
        }
    }
}

/// Why bitmask data cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmaskError {
    /// The bitmask does not have `rows × ceil(cols/8)` bytes.
    #[error("bitmask has {got} bytes, expected {want} for the shape")]
    MaskSize {
        /// Bytes present.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// The set bits and the values disagree.
    #[error("bitmask marks {marked} non-zero elements but {stored} values are stored")]
    Count {
        /// Set bits.
        marked: u64,
        /// Values present.
        stored: u64,
    },
    /// A bit is set in the padding past the last column.
    #[error("row {row}: bits set past the last column")]
    Padding {
        /// Row.
        row: u64,
    },
}

/// Expands bitmask data back into `rows × cols` elements of `width` bytes.
pub fn expand(
    values: &[u8],
    mask: &[u8],
    rows: u64,
    cols: u64,
    width: usize,
) -> Result<Vec<u8>, BitmaskError> {
    let mrow = mask_row_bytes(cols) as usize;
    let want = rows.checked_mul(mask_row_bytes(cols));
    if want != Some(mask.len() as u64) {
        return Err(BitmaskError::MaskSize {
            got: mask.len() as u64,
            want: want.unwrap_or(u64::MAX),
        });
    }
    let marked: u64 = mask.iter().map(|b| u64::from(b.count_ones())).sum();
    let stored = (values.len() / width.max(1)) as u64;
    if marked != stored || !values.len().is_multiple_of(width.max(1)) {
        return Err(BitmaskError::Count { marked, stored });
    }
    let cols_us = cols as usize;
    // Rows and columns are bounded by the mask just checked, except when there are no rows.
    let total = (rows as usize)
        .checked_mul(cols_us)
        .and_then(|n| n.checked_mul(width))
        .ok_or(BitmaskError::MaskSize {
            got: mask.len() as u64,
            want: u64::MAX,
        })?;
    let mut out = vec![0u8; total];
    let mut next = 0usize;
    for r in 0..rows as usize {
        let m = &mask[r * mrow..(r + 1) * mrow];
        for (byte_i, byte) in m.iter().enumerate() {
            let mut bits = *byte;
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let c = byte_i * 8 + bit;
                if c >= cols_us {
                    return Err(BitmaskError::Padding { row: r as u64 });
                }
                let at = (r * cols_us + c) * width;
                out[at..at + width].copy_from_slice(&values[next..next + width]);
                next += width;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_layout_and_round_trip() {
        // 2 × 10 f32, kept at (0,0), (0,9), (1,3).
        let mut w = [0f32; 20];
        w[0] = 1.5;
        w[9] = -2.0;
        w[13] = 0.25;
        let keep: Vec<bool> = w.iter().map(|x| *x != 0.0).collect();
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = compress(&bytes, &keep, 2, 10, 4);
        assert_eq!(b.nnz, 3);
        assert_eq!(b.bitmask, vec![0b0000_0001, 0b0000_0010, 0b0000_1000, 0]);
        assert_eq!(b.row_offsets, vec![0, 2]);
        let vals: Vec<f32> = b
            .values
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(vals, vec![1.5, -2.0, 0.25]);
        let back = expand(&b.values, &b.bitmask, 2, 10, 4).expect("expand");
        assert_eq!(back, bytes);
        assert!(matches!(
            expand(&b.values[..4], &b.bitmask, 2, 10, 4),
            Err(BitmaskError::Count {
                marked: 3,
                stored: 1
            })
        ));
        let mut bad = b.bitmask.clone();
        bad[1] |= 0x80;
        assert!(expand(&b.values, &bad, 2, 10, 4).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parallel_compress_matches_reference(
            rows in 0u64..6,
            cols in 0u64..150,
            width in proptest::sample::select(vec![1usize, 2, 4, 8]),
            seed: u64,
        ) {
            let n = (rows * cols) as usize;
            let bytes: Vec<u8> = (0..n * width).map(|i| (i as u64).wrapping_mul(seed | 1) as u8).collect();
            let keep: Vec<bool> = (0..n).map(|i| !(i as u64 ^ seed).count_ones().is_multiple_of(3)).collect();
            let fast = compress(&bytes, &keep, rows, cols, width);
            proptest::prop_assert_eq!(&fast, &reference::compress(&bytes, &keep, rows, cols, width));
            if n > 0 {
                let back = expand(&fast.values, &fast.bitmask, rows, cols, width).expect("expand");
                let want: Vec<u8> = bytes
                    .chunks_exact(width)
                    .zip(&keep)
                    .flat_map(|(e, k)| if *k { e.to_vec() } else { vec![0; width] })
                    .collect();
                proptest::prop_assert_eq!(back, want);
            }
        }
    }
}
