//! Property tests of every output codec through the whole local path: a random checkpoint is
//! compressed with a preset, decompressed back to f32 with `decompress_local`, and each weight
//! must come back within the codec's own bound:
//!
//! - casts (bf16): within half a bf16 ulp of the input;
//! - int8 per channel / int4 per group, symmetric or with zero points: within half a scale step,
//!   the step being the row's or group's range over the codes available;
//! - FP8 e4m3 per channel: within 2^-4 relative (3 mantissa bits) plus half the smallest
//!   subnormal step of the channel's scale;
//! - magnitude and 2:4 pruning stored as sparse bitmasks: kept values exact, exactly the
//!   requested count pruned, and no pruned value larger than a kept one (per tensor or per
//!   group of 4);
//! - 2:4 then int4: the 2:4 zeros stay exact zeros and the rest within the int4 bound.
//!
//! Output bytes must also be the same on a second run with another thread count.

// clippy.toml allows expect() inside #[test] functions only; the helpers here fail the
// test the same way.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;

use shardpress_engine::decompress::decompress_local;
use shardpress_engine::dtype::DType;
use shardpress_engine::safetensors::{ShardWriter, TensorSpec};
use shardpress_engine::{compress_local, LocalOptions, Recipe};

/// One weight matrix of the generated checkpoint.
#[derive(Debug, Clone)]
struct Weight {
    name: String,
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

/// Values spread over several orders of magnitude, with exact zeros and ties.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -1.0f32..1.0,
        1 => -40.0f32..40.0,
        1 => Just(0.0f32),
        1 => Just(0.25f32),
        1 => -1e-3f32..1e-3,
    ]
}

/// Up to three weights whose column counts are multiples of 4 (for 2:4) and sometimes span
/// more than one group of 128.
fn weights() -> impl Strategy<Value = Vec<Weight>> {
    let one = (
        1usize..6,
        prop_oneof![Just(4usize), Just(8), Just(12), Just(132), Just(256)],
    )
        .prop_flat_map(|(rows, cols)| {
            vec(value(), rows * cols).prop_map(move |values| (rows, cols, values))
        });
    vec(one, 1..4).prop_map(|ws| {
        ws.into_iter()
            .enumerate()
            .map(|(i, (rows, cols, values))| Weight {
                name: format!("model.layers.{i}.mlp.up_proj.weight"),
                rows,
                cols,
                values,
            })
            .collect()
    })
}

fn write_checkpoint(dir: &Path, weights: &[Weight]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let specs: Vec<TensorSpec> = weights
        .iter()
        .map(|w| TensorSpec::new(&w.name, DType::F32, vec![w.rows as u64, w.cols as u64]))
        .collect();
    let file = std::fs::File::create(dir.join("model.safetensors")).expect("create");
    let mut writer = ShardWriter::new(file, specs, &Default::default()).expect("writer");
    for w in weights {
        let bytes: Vec<u8> = w.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        writer.write_tensor(&w.name, &bytes).expect("write");
    }
    writer.finish().expect("finish");
}

/// Every tensor of every shard under `dir`, as f32 values (after decompression all are f32).
fn read_f32(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("deserialize");
        for (name, view) in st.tensors() {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            out.insert(name, values);
        }
    }
    out
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let p = e.expect("entry").path();
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read(&p).expect("read"))
        })
        .filter(|(n, _)| n != "report.json")
        .collect()
}

/// Compresses `weights` with `preset` on 1 and 2 threads, checks both outputs are the same
/// bytes, and returns the decompressed weights.
fn round_trip(weights: &[Weight], preset: &str) -> BTreeMap<String, Vec<f32>> {
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("in");
    write_checkpoint(&input, weights);
    let recipe = Recipe::load(preset).expect("preset");
    let mut outputs = Vec::new();
    for threads in [1, 2] {
        let out = tmp.path().join(format!("out-{threads}"));
        let opts = LocalOptions {
            overwrite: false,
            threads: Some(threads),
            memory_limit: None,
        };
        compress_local(
            &input,
            &recipe,
            &out,
            &opts,
            &shardpress_engine::pipeline::NoProgress,
        )
        .unwrap_or_else(|e| panic!("{preset}: {e}"));
        outputs.push(out);
    }
    assert!(
        files(&outputs[0]) == files(&outputs[1]),
        "{preset}: output depends on the thread count"
    );
    let dense = tmp.path().join("dense");
    decompress_local(&outputs[0], &dense, Some(DType::F32), false)
        .unwrap_or_else(|e| panic!("{preset}: decompress: {e}"));
    read_f32(&dense)
}

fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// Checks every element against `bound(row, col, x)`.
fn check_within(
    preset: &str,
    w: &Weight,
    got: &[f32],
    bound: impl Fn(usize, usize, f32) -> f32,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), w.values.len(), "{}: {}", preset, w.name);
    for r in 0..w.rows {
        for c in 0..w.cols {
            let (x, y) = (w.values[r * w.cols + c], got[r * w.cols + c]);
            let b = bound(r, c, x);
            prop_assert!(
                (x - y).abs() <= b,
                "{}: {}[{},{}] = {} came back as {} (bound {})",
                preset,
                w.name,
                r,
                c,
                x,
                y,
                b
            );
        }
    }
    Ok(())
}

/// Half a step of symmetric `bits`-bit codes over groups of `group` columns (0 = whole row).
fn int_sym_bound(w: &Weight, bits: u32, group: usize) -> impl Fn(usize, usize, f32) -> f32 + '_ {
    let levels = ((1u32 << (bits - 1)) - 1) as f32;
    move |r, c, _| {
        let g = if group == 0 { w.cols } else { group };
        let start = r * w.cols + (c / g) * g;
        let end = (start + g).min((r + 1) * w.cols);
        let m = max_abs(&w.values[start..end]);
        // Half a step, widened by the f32 rounding of the scale and of the product.
        m / levels * 0.5 * (1.0 + 1e-4) + m * 1e-6
    }
}

/// Half a step of asymmetric `bits`-bit codes over groups of `group` columns; the range
/// always includes zero so zeros stay exact.
fn int_asym_bound(w: &Weight, bits: u32, group: usize) -> impl Fn(usize, usize, f32) -> f32 + '_ {
    let steps = ((1u32 << bits) - 1) as f32;
    move |r, c, _| {
        let start = r * w.cols + (c / group) * group;
        let end = (start + group).min((r + 1) * w.cols);
        let g = &w.values[start..end];
        let hi = g.iter().fold(0.0f32, |m, x| m.max(*x));
        let lo = g.iter().fold(0.0f32, |m, x| m.min(*x));
        (hi - lo) / steps * (0.5 + 1e-3) + (hi - lo) * 1e-6
    }
}

fn check_pruned(
    preset: &str,
    w: &Weight,
    got: &[f32],
    group: Option<usize>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), w.values.len());
    let chunk = group.unwrap_or(w.values.len());
    let mut pruned_total = 0usize;
    for (orig, back) in w.values.chunks(chunk).zip(got.chunks(chunk)) {
        let mut kept_min = f32::INFINITY;
        let mut pruned_max = 0.0f32;
        let mut pruned = 0usize;
        for (x, y) in orig.iter().zip(back) {
            if *y == 0.0 && *x != 0.0 {
                pruned += 1;
                pruned_max = pruned_max.max(x.abs());
            } else {
                prop_assert_eq!(
                    x.to_bits(),
                    y.to_bits(),
                    "{}: {} kept value changed",
                    preset,
                    w.name
                );
                if *x != 0.0 {
                    kept_min = kept_min.min(x.abs());
                }
            }
        }
        let zeros_in = orig.iter().filter(|x| **x == 0.0).count();
        if let Some(g) = group {
            // N:M prunes exactly half of each group; inputs that are already zero count.
            prop_assert_eq!(
                pruned + zeros_in.min(g / 2),
                g / 2,
                "{}: {} group",
                preset,
                w.name
            );
            prop_assert!(pruned + zeros_in >= g / 2);
        }
        prop_assert!(
            pruned_max <= kept_min,
            "{}: {} pruned {} but kept {}",
            preset,
            w.name,
            pruned_max,
            kept_min
        );
        pruned_total += pruned;
    }
    if group.is_none() {
        let n = w.values.len();
        let zeros_in = w.values.iter().filter(|x| **x == 0.0).count();
        let target = n / 2;
        prop_assert_eq!(
            pruned_total + zeros_in.min(target),
            target,
            "{}: {}",
            preset,
            w.name
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { cases: 24, ..Config::default() })]

    #[test]
    fn every_codec_decodes_within_its_bound(ws in weights()) {
        let bf16 = round_trip(&ws, "bf16");
        let w8 = round_trip(&ws, "w8a16");
        let w8a8 = round_trip(&ws, "w8a8");
        let w4 = round_trip(&ws, "w4a16");
        let w4asym = round_trip(&ws, "w4a16-asym");
        let fp8 = round_trip(&ws, "fp8");
        let sparse = round_trip(&ws, "sparse50");
        let two4 = round_trip(&ws, "2of4");
        let two4w4 = round_trip(&ws, "2of4-w4a16");
        for w in &ws {
            let get = |m: &BTreeMap<String, Vec<f32>>, p: &str| -> Vec<f32> {
                m.get(&w.name).cloned().unwrap_or_else(|| panic!("{p}: {} missing", w.name))
            };
            check_within("bf16", w, &get(&bf16, "bf16"), |_, _, x| x.abs() / 256.0)?;
            check_within("w8a16", w, &get(&w8, "w8a16"), int_sym_bound(w, 8, 0))?;
            check_within("w8a8", w, &get(&w8a8, "w8a8"), int_sym_bound(w, 8, 0))?;
            check_within("w4a16", w, &get(&w4, "w4a16"), int_sym_bound(w, 4, 128))?;
            check_within("w4a16-asym", w, &get(&w4asym, "w4a16-asym"), int_asym_bound(w, 4, 128))?;
            check_within("fp8", w, &get(&fp8, "fp8"), |r, _, x| {
                let m = max_abs(&w.values[r * w.cols..(r + 1) * w.cols]);
                let scale = m / 448.0;
                x.abs() / 16.0 * (1.0 + 1e-4) + scale * 2f32.powi(-10) + m * 1e-6
            })?;
            check_pruned("sparse50", w, &get(&sparse, "sparse50"), None)?;
            check_pruned("2of4", w, &get(&two4, "2of4"), Some(4))?;
            let got = get(&two4w4, "2of4-w4a16");
            let pattern = get(&two4, "2of4");
            for (i, (p, g)) in pattern.iter().zip(&got).enumerate() {
                if *p == 0.0 {
                    prop_assert_eq!(*g, 0.0, "2of4-w4a16: {}[{}] pruned but not zero", w.name, i);
                }
            }
            // int4 over the values that 2:4 kept.
            let kept = Weight { values: pattern, ..w.clone() };
            check_within("2of4-w4a16", &kept, &got, int_sym_bound(&kept, 4, 128))?;
        }
    }
}
