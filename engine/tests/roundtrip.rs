//! Property tests of the safetensors writer and header parser, and of integer quantization.
//!
//! (a) Files written by `ShardWriter` deserialize with the reference `safetensors` crate and
//!     with our own `read_header` to the same tensors, with the data section 8-byte aligned.
//! (b) `read_header` returns `Ok` or `Err` (never panics) on arbitrary and mutated bytes, and
//!     whatever it accepts tiles the data section exactly.
//! (c) `int_quant::quantize` packs values that a test-local unpacker decodes to within half a
//!     scale step of the input, maps zeros to exact zeros, and gives the same result on one or
//!     two threads.

// clippy.toml allows expect() inside #[test] functions only; the helpers here fail the
// test the same way.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::Config;

use shardpress_engine::dtype::DType;
use shardpress_engine::kernels::int_quant::{
    quantize, IntParams, IntQuantized, Observer, QuantError, Strategy as Sharing,
};
use shardpress_engine::safetensors::{read_header, ShardHeader, ShardWriter, TensorSpec};
use shardpress_engine::source::MemSource;

// ---------------------------------------------------------------------------------------------
// Shared generators
// ---------------------------------------------------------------------------------------------

/// Element types of whole bytes that the reference crate (0.6) also knows.
const BYTE_DTYPES: [DType; 16] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::F8E5M2,
    DType::F8E4M3,
    DType::F8E8M0,
    DType::I16,
    DType::U16,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::U32,
    DType::F32,
    DType::F64,
    DType::I64,
    DType::U64,
];

/// A tensor to write: name, type, shape and its bytes.
#[derive(Debug, Clone)]
struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// Names with ASCII, quotes, backslashes, slashes, control characters and non-ASCII text.
fn name_strategy() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-zA-Z0-9_.\"\\\\/ \\x00-\\x1F\u{e9}\u{6f22}\u{1F980}]{0,12}")
        .expect("valid regex")
        .prop_filter("reserved key", |n| n != "__metadata__")
}

/// Shapes of rank 0 (scalar) to 3 with dimensions that may be zero.
fn shape_strategy() -> impl Strategy<Value = Vec<u64>> {
    vec(0u64..=5, 0..=3)
}

fn byte_len(dtype: DType, shape: &[u64]) -> usize {
    let numel: u64 = shape.iter().product();
    dtype.byte_size(numel).expect("whole bytes") as usize
}

/// Tensor type and shape with random bytes of exactly the right length.
fn body_strategy() -> impl Strategy<Value = (DType, Vec<u64>, Vec<u8>)> {
    (
        proptest::sample::select(BYTE_DTYPES.to_vec()),
        shape_strategy(),
    )
        .prop_flat_map(|(dtype, shape)| {
            let len = byte_len(dtype, &shape);
            vec(any::<u8>(), len).prop_map(move |data| (dtype, shape.clone(), data))
        })
}

/// Up to 8 tensors with distinct names, in random order.
fn tensors_strategy() -> impl Strategy<Value = Vec<Tensor>> {
    btree_map(name_strategy(), body_strategy(), 0..8)
        .prop_map(|m| {
            m.into_iter()
                .map(|(name, (dtype, shape, data))| Tensor {
                    name,
                    dtype,
                    shape,
                    data,
                })
                .collect::<Vec<_>>()
        })
        .prop_shuffle()
}

fn metadata_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map("[a-z\"\u{e9} ]{0,6}", "[a-z0-9\"\\\\\u{e9} ]{0,8}", 0..3)
}

/// Writes `tensors` with `ShardWriter`, feeding each tensor's bytes in chunks of `chunk`.
fn write_file(tensors: &[Tensor], metadata: &BTreeMap<String, String>, chunk: usize) -> Vec<u8> {
    let specs = tensors
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut w = ShardWriter::new(Vec::new(), specs, metadata).expect("writer");
    for t in tensors {
        if chunk == 0 {
            w.write_tensor(&t.name, &t.data).expect("write_tensor");
        } else {
            for piece in t.data.chunks(chunk) {
                w.write_chunk(&t.name, piece).expect("write_chunk");
            }
        }
    }
    let (bytes, len) = w.finish().expect("finish");
    assert_eq!(bytes.len() as u64, len, "reported length");
    bytes
}

/// Checks what `read_header` accepted: every tensor has the byte size its shape needs and the
/// tensors, in the returned order, tile the data section from 0 to its end.
fn assert_tiles(h: &ShardHeader, file_len: u64) -> Result<(), TestCaseError> {
    let data_len = file_len
        .checked_sub(h.data_start())
        .ok_or_else(|| TestCaseError::fail("data start past the end"))?;
    let mut pos = 0u64;
    for t in &h.tensors {
        prop_assert_eq!(
            Some(t.byte_len()),
            t.dtype.byte_size(t.numel()),
            "{}",
            t.name
        );
        prop_assert_eq!(
            t.start,
            pos,
            "tensor {:?} does not start where the last ended",
            t.name
        );
        pos = t.end;
    }
    prop_assert_eq!(pos, data_len);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// (a) Writer round trip
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(Config { cases: 128, ..Config::default() })]

    #[test]
    fn writer_output_reads_back_with_both_parsers(
        tensors in tensors_strategy(),
        metadata in metadata_strategy(),
        chunk in 0usize..=9,
    ) {
        let bytes = write_file(&tensors, &metadata, chunk);

        // Length prefix and alignment of the data section.
        prop_assert!(bytes.len() >= 8);
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        prop_assert_eq!((8 + n) % 8, 0, "data section must start on an 8-byte boundary");

        // The reference implementation.
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| TestCaseError::fail(format!("safetensors refused the file: {e:?}")))?;
        prop_assert_eq!(st.len(), tensors.len());
        for t in &tensors {
            let view = st
                .tensor(&t.name)
                .map_err(|e| TestCaseError::fail(format!("{:?} missing: {e:?}", t.name)))?;
            prop_assert_eq!(format!("{:?}", view.dtype()), t.dtype.name());
            let shape: Vec<u64> = view.shape().iter().map(|d| *d as u64).collect();
            prop_assert_eq!(&shape, &t.shape);
            prop_assert_eq!(view.data(), &t.data[..]);
        }
        let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let want_meta: Option<HashMap<String, String>> = if metadata.is_empty() {
            None
        } else {
            Some(metadata.clone().into_iter().collect())
        };
        prop_assert_eq!(st_meta.metadata(), &want_meta);

        // Our own parser.
        let src = MemSource::new("roundtrip.safetensors", bytes.clone());
        let h = read_header(&src).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(h.header_len, n);
        prop_assert_eq!(h.data_start() % 8, 0);
        prop_assert_eq!(&h.metadata, &metadata);
        prop_assert_eq!(h.tensors.len(), tensors.len());
        for t in &tensors {
            let info = h
                .tensor(&t.name)
                .ok_or_else(|| TestCaseError::fail(format!("{:?} missing", t.name)))?;
            prop_assert_eq!(info.dtype, t.dtype);
            prop_assert_eq!(&info.shape, &t.shape);
            let start = (h.data_start() + info.start) as usize;
            let end = (h.data_start() + info.end) as usize;
            prop_assert_eq!(&bytes[start..end], &t.data[..]);
        }
        assert_tiles(&h, bytes.len() as u64)?;
    }
}

// ---------------------------------------------------------------------------------------------
// (b) The header parser on hostile input
// ---------------------------------------------------------------------------------------------

/// One edit of a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the byte at a position (taken modulo the length).
    Set(usize, u8),
    /// Remove the byte at a position.
    Delete(usize),
    /// Insert a byte before a position.
    Insert(usize, u8),
    /// Cut the file at a position.
    Truncate(usize),
    /// Replace the 8-byte header length.
    Prefix(u64),
    /// Add or subtract a little from the header length.
    NudgePrefix(i8),
    /// Append bytes.
    Append(Vec<u8>),
}

fn mutation_strategy() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop_oneof![
            any::<u64>(),
            0u64..512,
            Just(1u64 << 40),
            Just(u64::MAX),
            Just(100_000_000u64),
        ]
        .prop_map(Mutation::Prefix),
        2 => any::<i8>().prop_map(Mutation::NudgePrefix),
        1 => vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Set(p, b) if len > 0 => bytes[p % len] = *b,
        Mutation::Delete(p) if len > 0 => {
            bytes.remove(p % len);
        }
        Mutation::Insert(p, b) => bytes.insert(p % (len + 1), *b),
        Mutation::Truncate(p) => bytes.truncate(p % (len + 1)),
        Mutation::Prefix(v) if len >= 8 => bytes[..8].copy_from_slice(&v.to_le_bytes()),
        Mutation::NudgePrefix(d) if len >= 8 => {
            let v = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            let v = v.wrapping_add_signed(i64::from(*d));
            bytes[..8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
        _ => {}
    }
}

/// Runs the parser; on success the result must describe a consistent file.
fn parse_any(bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let len = bytes.len() as u64;
    let src = MemSource::new("fuzz.safetensors", bytes);
    if let Ok(h) = read_header(&src) {
        prop_assert!(h.data_start() <= len);
        assert_tiles(&h, len)?;
    }
    Ok(())
}

/// A file with a correct length prefix and header text built from JSON-ish fragments.
fn jsonish_file() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"dtype\"".to_string()),
        Just("\"shape\"".to_string()),
        Just("\"data_offsets\"".to_string()),
        Just("\"__metadata__\"".to_string()),
        Just("\"F32\"".to_string()),
        Just("\"U8\"".to_string()),
        Just("\"F4\"".to_string()),
        Just("null".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("1e400".to_string()),
        Just(" ".to_string()),
        "[a-z\"\\\\]{1,3}",
        (0u32..40).prop_map(|n| n.to_string()),
    ];
    (vec(fragment, 0..48), vec(any::<u8>(), 0..64)).prop_map(|(parts, data)| {
        let json = parts.concat();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(&data);
        out
    })
}

proptest! {
    #![proptest_config(Config { cases: 256, ..Config::default() })]

    #[test]
    fn parser_survives_random_bytes(bytes in vec(any::<u8>(), 0..300)) {
        parse_any(bytes)?;
    }

    #[test]
    fn parser_survives_random_bytes_with_a_fitting_length(
        body in vec(any::<u8>(), 0..200),
        extra in 0u64..4,
    ) {
        let mut bytes = (body.len() as u64 + extra).to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        parse_any(bytes)?;
    }

    #[test]
    fn parser_survives_jsonish_headers(bytes in jsonish_file()) {
        parse_any(bytes)?;
    }

    #[test]
    fn parser_survives_mutations_of_valid_files(
        tensors in tensors_strategy(),
        mutations in vec(mutation_strategy(), 1..5),
    ) {
        let mut bytes = write_file(&tensors, &BTreeMap::new(), 0);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        parse_any(bytes)?;
    }

    #[test]
    fn parser_survives_header_edits(
        tensors in tensors_strategy(),
        edits in vec((any::<usize>(), "[\\[\\]{}:,\"0-9a-zA-Z_ -]"), 1..4),
    ) {
        // Text edits keep the header UTF-8 so they reach the JSON and tiling checks.
        let bytes = write_file(&tensors, &BTreeMap::new(), 0);
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let mut json: Vec<char> = std::str::from_utf8(&bytes[8..8 + n])
            .expect("writer emits UTF-8")
            .chars()
            .collect();
        for (pos, text) in &edits {
            let at = pos % (json.len() + 1);
            if at < json.len() && pos % 2 == 0 {
                json.remove(at);
            }
            for (i, c) in text.chars().enumerate() {
                json.insert(at.min(json.len()) + i, c);
            }
        }
        let json: String = json.into_iter().collect();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(json.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        parse_any(out)?;
    }
}

// ---------------------------------------------------------------------------------------------
// (c) Integer quantization
// ---------------------------------------------------------------------------------------------

/// Decodes row `r` of the packed words: `32 / bits` offset-binary values per little-endian
/// word, least significant bits first. Also returns the padding bits of the row's last word.
fn unpack_row(packed: &[u32], r: usize, cols: usize, bits: u8) -> (Vec<i32>, u32) {
    let per_word = 32 / usize::from(bits);
    let words = cols.div_ceil(per_word);
    let row = &packed[r * words..(r + 1) * words];
    let mask = (1u64 << bits) - 1;
    let offset = 1i32 << (bits - 1);
    let values = (0..cols)
        .map(|c| {
            let word = u64::from(row[c / per_word]);
            let shift = (c % per_word) * usize::from(bits);
            ((word >> shift) & mask) as i32 - offset
        })
        .collect();
    let used = (cols - (words - 1) * per_word) * usize::from(bits);
    let padding = if used >= 32 {
        0
    } else {
        row[words - 1] >> used
    };
    (values, padding)
}

fn pools() -> &'static (rayon::ThreadPool, rayon::ThreadPool) {
    static POOLS: OnceLock<(rayon::ThreadPool, rayon::ThreadPool)> = OnceLock::new();
    POOLS.get_or_init(|| {
        let build = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .expect("thread pool")
        };
        (build(1), build(2))
    })
}

fn weight_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        2 => Just(0.0f32),
        1 => Just(-0.0f32),
        6 => -4.0f32..4.0,
        2 => -1000.0f32..1000.0,
        1 => (-3i32..=3).prop_map(|k| k as f32 * 0.125),
    ]
}

/// A matrix of 1..=7 rows and 1..=70 columns with its quantization parameters.
fn quant_case() -> impl Strategy<Value = (u64, u64, Vec<f32>, IntParams)> {
    (1u64..=7, 1u64..=70).prop_flat_map(|(rows, cols)| {
        let strategy = prop_oneof![
            Just(Sharing::Tensor),
            Just(Sharing::Channel),
            (1u64..=cols + 8).prop_map(Sharing::Group),
            proptest::sample::select(vec![1u64, 2, 3, 4, 8, 16, 32, 128]).prop_map(Sharing::Group),
        ];
        let params = (
            2u8..=8,
            any::<bool>(),
            strategy,
            proptest::sample::select(vec![DType::F32, DType::F32, DType::BF16, DType::F16]),
            proptest::sample::select(vec![Observer::Minmax, Observer::Mse]),
        )
            .prop_map(
                |(bits, symmetric, strategy, scale_dtype, observer)| IntParams {
                    bits,
                    symmetric,
                    strategy,
                    scale_dtype,
                    observer,
                },
            );
        (
            Just(rows),
            Just(cols),
            vec(weight_strategy(), (rows * cols) as usize),
            params,
        )
    })
}

/// Index into the scales and zero points of element (`r`, `c`).
fn param_index(p: &IntParams, r: usize, c: usize, cols: u64) -> usize {
    match p.strategy {
        Sharing::Tensor => 0,
        Sharing::Channel => r,
        Sharing::Group(g) => r * cols.div_ceil(g) as usize + c / g as usize,
    }
}

fn check_quantized(
    w: &[f32],
    rows: u64,
    cols: u64,
    p: &IntParams,
    q: &IntQuantized,
) -> Result<(), TestCaseError> {
    let (prows, pcols) = p.param_shape(rows, cols);
    let per_word = 32 / u64::from(p.bits);
    prop_assert_eq!(q.packed.len() as u64, rows * cols.div_ceil(per_word));
    prop_assert_eq!(q.scales.len() as u64, prows * pcols);
    prop_assert_eq!(q.zero_points.len(), q.scales.len());
    let qmin = -(1i32 << (p.bits - 1));
    let qmax = (1i32 << (p.bits - 1)) - 1;
    for (i, (s, z)) in q.scales.iter().zip(&q.zero_points).enumerate() {
        prop_assert!(s.is_finite() && *s > 0.0, "scale {} is {}", i, s);
        if p.symmetric {
            prop_assert_eq!(*z, 0, "symmetric zero point {}", i);
        }
        prop_assert!(
            (qmin..=qmax).contains(&i32::from(*z)),
            "zero point {} = {}",
            i,
            z
        );
    }
    for r in 0..rows as usize {
        let (values, padding) = unpack_row(&q.packed, r, cols as usize, p.bits);
        prop_assert_eq!(padding, 0, "padding bits of row {} are not zero", r);
        for (c, &v) in values.iter().enumerate() {
            let x = w[r * cols as usize + c];
            let k = param_index(p, r, c, cols);
            let s = q.scales[k];
            let z = i32::from(q.zero_points[k]);
            prop_assert!((qmin..=qmax).contains(&v), "value {} out of range", v);
            let deq = (v - z) as f32 * s;
            if x == 0.0 {
                prop_assert_eq!(deq, 0.0, "zero at ({}, {}) decoded to {}", r, c, deq);
                continue;
            }
            let lo = (qmin - z) as f32 * s;
            let hi = (qmax - z) as f32 * s;
            let eps = 1e-6 * (x.abs() + s);
            let err = (deq - x).abs();
            if (lo..=hi).contains(&x) {
                prop_assert!(
                    err <= s / 2.0 + eps,
                    "({}, {}): {} decoded to {} (scale {}, zero {}, error {})",
                    r,
                    c,
                    x,
                    deq,
                    s,
                    z,
                    err
                );
            } else {
                // Outside the representable range the value clamps to the nearer end.
                let bound = x.clamp(lo, hi);
                prop_assert!(
                    (deq - bound).abs() <= eps,
                    "({}, {}): {} outside [{}, {}] decoded to {}",
                    r,
                    c,
                    x,
                    lo,
                    hi,
                    deq
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 192, ..Config::default() })]

    #[test]
    fn quantize_decodes_within_half_a_step((rows, cols, w, p) in quant_case()) {
        let (one, two) = pools();
        let a = one.install(|| quantize(&w, rows, cols, &p));
        let b = two.install(|| quantize(&w, rows, cols, &p));
        prop_assert_eq!(&a, &b, "1-thread and 2-thread results differ");
        let q = match a {
            Ok(q) => q,
            // A 16-bit scale type cannot hold every scale; f32 always can for these inputs.
            Err(QuantError::Scale { .. }) if p.scale_dtype != DType::F32 => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        };
        check_quantized(&w, rows, cols, &p, &q)?;
        if p.observer == Observer::Mse {
            // The full range is one of the mse observer's candidates: never worse than minmax.
            let minmax = IntParams { observer: Observer::Minmax, ..p };
            if let Ok(m) = quantize(&w, rows, cols, &minmax) {
                prop_assert!(
                    q.stats.sum_sq_err <= m.stats.sum_sq_err * (1.0 + 1e-9) + 1e-30,
                    "mse {} > minmax {}",
                    q.stats.sum_sq_err,
                    m.stats.sum_sq_err
                );
            }
        } else if p.scale_dtype == DType::F32 {
            // With exact scales and the full range nothing is clamped: the whole row stays
            // within half a step.
            let max_scale = q.scales.iter().copied().fold(0.0f32, f32::max);
            prop_assert!(q.stats.max_abs_err <= max_scale / 2.0 + 1e-6 * (1000.0 + max_scale));
        }
    }

    #[test]
    fn quantize_reports_the_first_non_finite_weight(
        (rows, cols, mut w, p) in quant_case(),
        at in any::<usize>(),
        bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
    ) {
        let i = at % w.len();
        w[i] = bad;
        let e = quantize(&w, rows, cols, &p);
        let (row, col) = ((i as u64) / cols, (i as u64) % cols);
        prop_assert!(
            matches!(e, Err(QuantError::NonFinite { row: r, col: c, .. }) if r == row && c == col),
            "{:?}",
            e
        );
    }
}

#[test]
fn quantize_known_small_case() {
    // One row of four 4-bit values, asymmetric: range 0..=3 gives scale 0.2, zero point -8.
    let w = [0.0f32, 1.0, 2.0, 3.0];
    let p = IntParams {
        bits: 4,
        symmetric: false,
        strategy: Sharing::Channel,
        scale_dtype: DType::F32,
        observer: Observer::Minmax,
    };
    let q = quantize(&w, 1, 4, &p).expect("quantize");
    assert_eq!(q.scales, vec![3.0 / 15.0]);
    assert_eq!(q.zero_points, vec![-8]);
    let (values, padding) = unpack_row(&q.packed, 0, 4, 4);
    assert_eq!(values, vec![-8, -3, 2, 7]);
    assert_eq!(padding, 0);
}
