//! End-to-end tests of `shardpress compress` on a real checkpoint,
//! all-MiniLM-L6-v2 (a 6-layer BERT in F32 safetensors).
//!
//! The outputs are checked by `tests/python/verify_output.py`, `decode_output.py` and
//! `check_quality.py`: numpy decoders written from the format descriptions alone. `scripts/test.sh` fetches the
//! model, builds the Python environment and sets the two variables read here:
//!
//! - `SHARDPRESS_MODEL_DIR`: the unpacked model directory
//! - `SHARDPRESS_PYTHON`: a python with numpy and safetensors installed

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

/// Presets that quantize or prune, with the bounds `check_quality.py` enforces on the real
/// checkpoint (relative Frobenius error of each 2-D weight, mean and max; sparsity; N:M).
const COMPRESSION_PRESETS: [(&str, &str); 9] = [
    ("w8a16", r#"{"mean_rel_max": 0.01, "max_rel_max": 0.025}"#),
    (
        "w8a16-mse",
        r#"{"mean_rel_max": 0.01, "max_rel_max": 0.025}"#,
    ),
    ("w4a16", r#"{"mean_rel_max": 0.13, "max_rel_max": 0.15}"#),
    (
        "w4a16-asym",
        r#"{"mean_rel_max": 0.13, "max_rel_max": 0.15}"#,
    ),
    ("w8a8", r#"{"mean_rel_max": 0.01, "max_rel_max": 0.025}"#),
    ("fp8", r#"{"mean_rel_max": 0.05}"#),
    ("sparse50", r#"{"sparsity": 0.5}"#),
    ("2of4", r#"{"nm": [2, 4]}"#),
    ("2of4-w4a16", r#"{"nm": [2, 4], "zeros_preserved": true}"#),
];

struct Setup {
    model: PathBuf,
    python: PathBuf,
}

fn setup() -> Setup {
    let var = |name: &str| match std::env::var_os(name) {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => panic!(
            "{name} is not set. These tests need the real model and the Python verifier: \
             run `scripts/test.sh` from the repository root (it fetches the model, creates the \
             Python environment and sets SHARDPRESS_MODEL_DIR and SHARDPRESS_PYTHON)."
        ),
    };
    let setup = Setup {
        model: var("SHARDPRESS_MODEL_DIR"),
        python: var("SHARDPRESS_PYTHON"),
    };
    assert!(
        setup.model.join("model.safetensors").is_file(),
        "SHARDPRESS_MODEL_DIR={} holds no model.safetensors; run `scripts/test.sh`",
        setup.model.display()
    );
    assert!(
        setup.python.is_file(),
        "SHARDPRESS_PYTHON={} does not exist; run `scripts/test.sh`",
        setup.python.display()
    );
    setup
}

fn verifier_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/verify_output.py")
}

fn describe(output: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn compress(model: &Path, recipe: &str, out: &Path, threads: u32) {
    let output = Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .arg("compress")
        .arg(model)
        .args([
            "--recipe",
            recipe,
            "--threads",
            &threads.to_string(),
            "--quiet",
        ])
        .arg("--out")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shardpress: {e}"));
    assert!(
        output.status.success(),
        "shardpress compress --recipe {recipe} --threads {threads} failed\n{}",
        describe(&output)
    );
}

fn run_verifier(setup: &Setup, out: &Path, recipe: &str) -> Output {
    Command::new(&setup.python)
        .arg(verifier_script())
        .arg("--input")
        .arg(&setup.model)
        .arg("--output")
        .arg(out)
        .args(["--recipe", recipe])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", setup.python.display()))
}

/// Runs the verifier, requires it to pass and returns its JSON summary.
fn verify(setup: &Setup, out: &Path, recipe: &str) -> Value {
    let output = run_verifier(setup, out, recipe);
    // The failed checks are listed on stderr; stdout repeats them in JSON.
    assert!(
        output.status.success(),
        "verify_output.py rejected the {recipe} output ({})\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "verify_output.py printed no JSON summary: {e}\n{}",
            describe(&output)
        )
    });
    assert_eq!(summary["ok"], Value::Bool(true), "summary: {summary}");
    summary
}

fn count(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no integer {key}: {summary}"))
}

fn rel_error(summary: &Value, key: &str) -> f64 {
    summary["rel_error"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("summary has no rel_error.{key}: {summary}"))
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&read(path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Name, dtype and shape of every tensor in the input's model.safetensors.
fn input_tensors(model: &Path) -> Vec<(String, Dtype, Vec<usize>)> {
    let bytes = read(&model.join("model.safetensors"));
    let (_, metadata) = SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("input model.safetensors does not parse: {e}"));
    let mut tensors: Vec<_> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.dtype, info.shape.clone()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Whether the default ignore list of the quantize presets keeps `name`.
fn ignored_by_default(name: &str) -> bool {
    let lower = name.to_lowercase();
    lower.contains("norm")
        || lower.ends_with(".bias")
        || lower.contains("embed")
        || lower.contains("lm_head")
        || lower.split('.').any(|part| part == "wte" || part == "wpe")
}

/// The input tensors a quantize preset must quantize: 2-D float `*.weight`
/// tensors outside the ignore list.
fn quantizable(model: &Path) -> BTreeSet<String> {
    input_tensors(model)
        .into_iter()
        .filter(|(name, dtype, shape)| {
            is_float(*dtype)
                && shape.len() == 2
                && name.ends_with(".weight")
                && !ignored_by_default(name)
        })
        .map(|(name, _, _)| name)
        .collect()
}

/// Layer groups of the input: `encoder.layer.N` for numbered blocks,
/// otherwise the first name component (`embeddings`, `pooler`).
fn layer_groups(model: &Path) -> BTreeSet<String> {
    input_tensors(model)
        .into_iter()
        .map(|(name, _, _)| {
            let parts: Vec<&str> = name.split('.').collect();
            match parts
                .iter()
                .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                Some(i) => parts[..=i].join("."),
                None => parts[0].to_string(),
            }
        })
        .collect()
}

/// Every file under `root` (hidden ones included), by relative path.
fn files(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, found: &mut BTreeSet<PathBuf>) {
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path();
            if path.is_dir() {
                walk(root, &path, found);
            } else if let Ok(relative) = path.strip_prefix(root) {
                found.insert(relative.to_path_buf());
            }
        }
    }
    let mut found = BTreeSet::new();
    walk(root, root, &mut found);
    found
}

/// A content hash and the size of every file under `root`.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
    files(root)
        .into_iter()
        .map(|relative| {
            let bytes = read(&root.join(&relative));
            let mut hasher = DefaultHasher::new();
            hasher.write(&bytes);
            let entry = (bytes.len() as u64, hasher.finish());
            (relative, entry)
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for relative in files(from) {
        let target = to.join(&relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        fs::copy(from.join(&relative), &target)
            .unwrap_or_else(|e| panic!("cannot copy {}: {e}", relative.display()));
    }
}

/// `shardpress estimate` predicts exactly the tensor bytes `compress` wrote to `out`
/// (every output shard's size less its header), in total and per layer group.
#[allow(clippy::expect_used)] // a test helper: broken fixtures fail loudly
fn assert_estimate_exact(model: &Path, recipe: &str, out: &Path) {
    let output = Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .arg("estimate")
        .arg(model)
        .args(["--recipe", recipe, "--output", "json"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run shardpress: {e}"));
    assert!(output.status.success(), "{}", describe(&output));
    let all: Value = serde_json::from_slice(&output.stdout).expect("estimate json");
    let estimate = &all[0];
    assert_eq!(estimate["recipe"], Value::from(recipe), "{all}");
    let mut written = BTreeMap::new();
    for entry in fs::read_dir(out).expect("output dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = read(&path);
            let header = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            written.insert(name.expect("name"), bytes.len() as u64 - 8 - header);
        }
    }
    let total: u64 = written.values().sum();
    assert_eq!(estimate["predicted_bytes"], Value::from(total), "{recipe}");
    let layers = estimate["layers"].as_array().expect("layers");
    assert_eq!(
        layers.len(),
        written.len(),
        "{recipe}: one output shard per layer group"
    );
    let mut predicted: Vec<u64> = layers
        .iter()
        .map(|l| l["predicted_bytes"].as_u64().expect("bytes"))
        .collect();
    let mut actual: Vec<u64> = written.values().copied().collect();
    predicted.sort_unstable();
    actual.sort_unstable();
    assert_eq!(predicted, actual, "{recipe}: per layer group");
    let params = estimate["params"].as_f64().expect("params");
    let bits = estimate["bits_per_weight"].as_f64().expect("bits");
    assert!(
        (bits - total as f64 * 8.0 / params).abs() < 1e-3,
        "{recipe}: {bits}"
    );
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// Compresses with `recipe`, runs the verifier and checks the counts every
/// recipe shares; returns the summary.
fn compress_and_verify(setup: &Setup, recipe: &str) -> Value {
    let tmp = temp_dir();
    let out = tmp.path().join("out");
    compress(&setup.model, recipe, &out, 2);
    let summary = verify(setup, &out, recipe);

    let inputs = input_tensors(&setup.model);
    assert_eq!(count(&summary, "tensors_in"), inputs.len() as u64);
    assert_eq!(
        count(&summary, "quantized") + count(&summary, "cast") + count(&summary, "kept"),
        inputs.len() as u64,
        "summary: {summary}"
    );
    assert_eq!(
        count(&summary, "shards"),
        layer_groups(&setup.model).len() as u64,
        "expected one shard per layer group {:?}",
        layer_groups(&setup.model)
    );
    let copied: Vec<&str> = summary["copied_files"]
        .as_array()
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for file in ["1_Pooling/config.json", "tokenizer.json", "vocab.txt"] {
        assert!(copied.contains(&file), "{file} not copied: {copied:?}");
    }

    let report = read_json(&out.join("report.json"));
    assert_eq!(report["recipe_name"], Value::from(recipe));
    assert_eq!(report["totals"]["tensors"], Value::from(inputs.len()));
    summary
}

#[test]
fn pinned_model_has_the_expected_tensors() {
    let setup = setup();
    let tensors = input_tensors(&setup.model);
    assert_eq!(tensors.len(), 104, "all-MiniLM-L6-v2 has 104 tensors");
    // Six encoder layers with six Linear weights each, plus the pooler.
    assert_eq!(quantizable(&setup.model).len(), 6 * 6 + 1);
    assert_eq!(layer_groups(&setup.model).len(), 8);
}

#[test]
fn w8a16_real_model_verifies() {
    let setup = setup();
    let summary = compress_and_verify(&setup, "w8a16");
    let expected = quantizable(&setup.model).len() as u64;
    assert_eq!(count(&summary, "quantized"), expected, "summary: {summary}");
    assert_eq!(count(&summary, "cast"), 0);
    assert_eq!(count(&summary, "tensors_out"), 104 + 2 * expected);
    let mean = rel_error(&summary, "mean");
    let max = rel_error(&summary, "max");
    assert!(
        mean > 0.0 && mean < 0.01,
        "w8a16 mean relative error {mean}"
    );
    assert!(max < 0.025, "w8a16 max relative error {max}");
    assert_eq!(
        summary["quantized_value_range"],
        serde_json::json!([-127, 127])
    );
    let ignore = &summary["config"]["ignore"];
    assert_eq!(
        ignore,
        &serde_json::json!([
            "embeddings.position_embeddings",
            "embeddings.token_type_embeddings",
            "embeddings.word_embeddings"
        ]),
        "quantization_config.ignore"
    );
    // 8-bit weights are a quarter of F32; the embeddings stay F32.
    let ratio = count(&summary, "bytes_in") as f64 / count(&summary, "bytes_out") as f64;
    assert!(ratio > 1.4 && ratio < 1.7, "w8a16 size ratio {ratio}");
}

#[test]
fn w4a16_real_model_verifies() {
    let setup = setup();
    let summary = compress_and_verify(&setup, "w4a16");
    let expected = quantizable(&setup.model).len() as u64;
    assert_eq!(count(&summary, "quantized"), expected, "summary: {summary}");
    assert_eq!(count(&summary, "cast"), 0);
    let mean = rel_error(&summary, "mean");
    let max = rel_error(&summary, "max");
    assert!(
        mean > 0.01 && mean < 0.13,
        "w4a16 mean relative error {mean}"
    );
    assert!(max < 0.15, "w4a16 max relative error {max}");
    let range = &summary["quantized_value_range"];
    assert!(
        range[0].as_i64() >= Some(-8) && range[1].as_i64() <= Some(7),
        "4-bit values out of range: {range}"
    );
}

/// Shared checks of the two cast presets.
fn check_cast(recipe: &str, max_rel: f64) {
    let setup = setup();
    let summary = compress_and_verify(&setup, recipe);
    let inputs = input_tensors(&setup.model);
    let tmp = temp_dir();
    let out = tmp.path().join("out");
    compress(&setup.model, recipe, &out, 1);
    assert_estimate_exact(&setup.model, recipe, &out);
    let floats = inputs.iter().filter(|(_, d, _)| is_float(*d)).count() as u64;
    assert_eq!(count(&summary, "cast"), floats, "summary: {summary}");
    assert_eq!(count(&summary, "kept"), inputs.len() as u64 - floats);
    assert_eq!(count(&summary, "quantized"), 0);
    assert_eq!(count(&summary, "tensors_out"), inputs.len() as u64);
    let max = rel_error(&summary, "max");
    assert!(
        max > 0.0 && max < max_rel,
        "{recipe} max relative error {max}"
    );
    let ratio = count(&summary, "bytes_in") as f64 / count(&summary, "bytes_out") as f64;
    assert!((ratio - 2.0).abs() < 0.01, "{recipe} size ratio {ratio}");
}

#[test]
fn bf16_real_model_verifies() {
    // Round to nearest even keeps the error within half an ulp: 2^-9 relative.
    check_cast("bf16", 1.0 / 256.0);
}

#[test]
fn fp16_real_model_verifies() {
    check_cast("fp16", 1.0 / 2048.0);
}

#[test]
fn output_is_identical_across_thread_counts_and_input_is_untouched() {
    let setup = setup();
    let before = snapshot(&setup.model);
    for recipe in shardpress_engine::recipe::preset_names() {
        let tmp = temp_dir();
        let one = tmp.path().join("threads-1");
        let two = tmp.path().join("threads-2");
        compress(&setup.model, recipe, &one, 1);
        compress(&setup.model, recipe, &two, 2);

        let names_one = files(&one);
        let names_two = files(&two);
        assert_eq!(
            names_one, names_two,
            "{recipe}: --threads 1 and --threads 2 wrote different file lists"
        );
        for name in &names_one {
            assert!(
                read(&one.join(name)) == read(&two.join(name)),
                "{recipe}: {} differs between --threads 1 and --threads 2",
                name.display()
            );
        }
        let leftovers: BTreeSet<PathBuf> = fs::read_dir(tmp.path())
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", tmp.path().display()))
            .filter_map(|entry| entry.ok().map(|e| PathBuf::from(e.file_name())))
            .collect();
        assert_eq!(
            leftovers,
            BTreeSet::from([PathBuf::from("threads-1"), PathBuf::from("threads-2")]),
            "{recipe}: staging files left beside the output"
        );
    }
    assert!(
        before == snapshot(&setup.model),
        "compress modified the input directory {}",
        setup.model.display()
    );
}

/// Overwrites the data of `tensor` in the output shard that holds it.
fn corrupt_tensor(out: &Path, tensor: &str, edit: impl FnOnce(&mut [u8])) {
    let index = read_json(&out.join("model.safetensors.index.json"));
    let shard = index["weight_map"][tensor]
        .as_str()
        .unwrap_or_else(|| panic!("{tensor} not in the index"));
    let path = out.join(shard);
    let mut bytes = read(&path);
    let (header_len, metadata) = SafeTensors::read_metadata(&bytes)
        .unwrap_or_else(|e| panic!("{shard} does not parse: {e}"));
    let info = metadata
        .info(tensor)
        .unwrap_or_else(|| panic!("{tensor} not in {shard}"));
    let start = 8 + header_len + info.data_offsets.0;
    let end = 8 + header_len + info.data_offsets.1;
    edit(&mut bytes[start..end]);
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The verifier must reject an output that differs from a correct one in a
/// single place, and name that place.
#[test]
fn verifier_rejects_corrupted_outputs() {
    let setup = setup();
    let tmp = temp_dir();
    let good = tmp.path().join("good");
    compress(&setup.model, "w8a16", &good, 2);
    verify(&setup, &good, "w8a16");

    type Corruption = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corruption, &str)> = vec![
        (
            "kept I64 tensor changed",
            Box::new(|out| {
                corrupt_tensor(out, "embeddings.position_ids", |data| data[8] ^= 1);
            }),
            "embeddings.position_ids",
        ),
        (
            "scales zeroed",
            Box::new(|out| {
                corrupt_tensor(
                    out,
                    "encoder.layer.2.attention.self.query.weight_scale",
                    |data| data.fill(0),
                );
            }),
            "encoder.layer.2.attention.self.query.weight",
        ),
        (
            "packed values shifted",
            Box::new(|out| {
                corrupt_tensor(out, "encoder.layer.4.output.dense.weight_packed", |data| {
                    data.rotate_left(1)
                });
            }),
            "encoder.layer.4.output.dense.weight",
        ),
        (
            "config num_bits wrong",
            Box::new(|out| {
                let path = out.join("config.json");
                let mut config = read_json(&path);
                config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] =
                    Value::from(4);
                fs::write(&path, config.to_string())
                    .unwrap_or_else(|e| panic!("cannot write config.json: {e}"));
            }),
            "num_bits",
        ),
        (
            "copied file missing",
            Box::new(|out| {
                fs::remove_file(out.join("1_Pooling/config.json"))
                    .unwrap_or_else(|e| panic!("cannot remove 1_Pooling/config.json: {e}"));
            }),
            "1_Pooling/config.json",
        ),
    ];
    for (i, (what, corrupt, needle)) in cases.iter().enumerate() {
        let bad = tmp.path().join(format!("bad-{i}"));
        copy_dir(&good, &bad);
        corrupt(&bad);
        let output = run_verifier(&setup, &bad, "w8a16");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "verifier accepted an output with {what}\n{}",
            describe(&output)
        );
        assert!(
            stderr.contains(needle),
            "verifier rejected the output with {what} without naming {needle}\n{}",
            describe(&output)
        );
    }
}

fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(name)
}

/// Runs a checker script, requires success and returns its JSON summary.
fn run_checker(setup: &Setup, script: &str, args: &[&std::ffi::OsStr]) -> Value {
    let output = Command::new(&setup.python)
        .arg(python_script(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", setup.python.display()));
    assert!(
        output.status.success(),
        "{script} {args:?} failed\n{}",
        describe(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON summary: {e}\n{}",
            describe(&output)
        )
    })
}

fn decompress(out: &Path, dense: &Path, dtype: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .arg("decompress")
        .arg(out)
        .arg("--out")
        .arg(dense)
        .args(["--dtype", dtype])
        .output()
        .unwrap_or_else(|e| panic!("cannot run shardpress: {e}"));
    assert!(
        output.status.success(),
        "shardpress decompress {} failed\n{}",
        out.display(),
        describe(&output)
    );
}

/// Runs the independent decoder over `out` and requires it to agree with `dense` (written by
/// `shardpress decompress --dtype DTYPE`) to the bit; returns its summary.
fn decode_agrees(setup: &Setup, out: &Path, dense: &Path, dtype: &str) -> Value {
    run_checker(
        setup,
        "decode_output.py",
        &[
            "--output".as_ref(),
            out.as_os_str(),
            "--decompressed".as_ref(),
            dense.as_os_str(),
            "--dtype".as_ref(),
            dtype.as_ref(),
        ],
    )
}

#[test]
fn every_compression_preset_decodes_to_the_bit_and_meets_its_error_bound() {
    let setup = setup();
    let matrices = quantizable(&setup.model).len() as u64;
    for (i, (recipe, expect)) in COMPRESSION_PRESETS.iter().enumerate() {
        let tmp = temp_dir();
        let out = tmp.path().join("out");
        let dense = tmp.path().join("dense");
        compress(&setup.model, recipe, &out, 2);
        assert_estimate_exact(&setup.model, recipe, &out);
        // Alternate target dtypes so both the f32 and the bf16 paths are compared.
        let dtype = if i % 2 == 0 { "f32" } else { "bf16" };
        decompress(&out, &dense, dtype);
        let decoded = decode_agrees(&setup, &out, &dense, dtype);
        assert_eq!(decoded["tensors"], Value::from(104), "{recipe}: {decoded}");
        let compressed: u64 = decoded["by_format"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| *k != "uncompressed" && *k != "dense")
                    .filter_map(|(_, v)| v.as_u64())
                    .sum()
            })
            .unwrap_or(0);
        let quality = run_checker(
            &setup,
            "check_quality.py",
            &[
                "--input".as_ref(),
                setup.model.as_os_str(),
                "--output".as_ref(),
                out.as_os_str(),
                "--expect".as_ref(),
                expect.as_ref(),
            ],
        );
        let report = read_json(&out.join("report.json"));
        let totals = &report["totals"];
        let config = read_json(&out.join("config.json"));
        let qc = &config["quantization_config"];
        match *recipe {
            "sparse50" | "2of4" => {
                assert_eq!(compressed, matrices, "{recipe}: {decoded}");
                assert_eq!(quality["pruned"], Value::from(matrices), "{recipe}");
                assert_eq!(totals["pruned"], Value::from(matrices), "{recipe}");
                assert_eq!(totals["global_sparsity"], Value::from(0.5), "{recipe}");
                assert_eq!(qc["sparsity_config"]["format"], "sparse-bitmask");
                assert!(qc.get("config_groups").is_none(), "{recipe}: {qc}");
            }
            _ => {
                assert_eq!(compressed, matrices, "{recipe}: {decoded}");
                assert_eq!(quality["quantized"], Value::from(matrices), "{recipe}");
                assert_eq!(totals["quantized"], Value::from(matrices), "{recipe}");
                let format = match *recipe {
                    "w8a8" => "int-quantized",
                    "fp8" => "float-quantized",
                    _ => "pack-quantized",
                };
                assert_eq!(qc["format"], format, "{recipe}: {qc}");
                let group = &qc["config_groups"]["group_0"];
                assert_eq!(group["format"], format, "{recipe}");
                let act = &group["input_activations"];
                match *recipe {
                    "w8a8" | "fp8" => {
                        assert_eq!(act["strategy"], "token", "{recipe}");
                        assert_eq!(act["dynamic"], true, "{recipe}");
                        assert_eq!(act["num_bits"], 8, "{recipe}");
                    }
                    _ => assert!(act.is_null(), "{recipe}: {act}"),
                }
            }
        }
        if *recipe == "2of4-w4a16" {
            assert_eq!(qc["sparsity_config"]["format"], "dense");
            assert_eq!(qc["sparsity_config"]["sparsity_structure"], "2:4");
        }
    }
}

#[test]
fn the_mse_observer_beats_minmax_on_every_int4_tensor() {
    let setup = setup();
    let tmp = temp_dir();
    let recipe = tmp.path().join("w4a16-mse.toml");
    let text = shardpress_engine::recipe::preset("w4a16")
        .unwrap_or_else(|| panic!("no w4a16 preset"))
        .replace("name = \"w4a16\"", "name = \"w4a16-mse\"")
        + "observer = \"mse\"\n";
    fs::write(&recipe, text).unwrap_or_else(|e| panic!("cannot write the recipe: {e}"));
    let minmax = tmp.path().join("minmax");
    let mse = tmp.path().join("mse");
    compress(&setup.model, "w4a16", &minmax, 2);
    compress(
        &setup.model,
        recipe
            .to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 temp path")),
        &mse,
        2,
    );
    let summary = run_checker(
        &setup,
        "check_quality.py",
        &[
            "--input".as_ref(),
            setup.model.as_os_str(),
            "--output".as_ref(),
            mse.as_os_str(),
            "--expect".as_ref(),
            r#"{"mean_rel_max": 0.13, "max_rel_max": 0.15}"#.as_ref(),
            "--compare-mse".as_ref(),
            minmax.as_os_str(),
        ],
    );
    let cmp = &summary["compare_mse"];
    assert_eq!(cmp["compared"], Value::from(37), "{summary}");
    assert_eq!(cmp["better"], Value::from(37), "{summary}");
    let config = read_json(&mse.join("config.json"));
    assert_eq!(
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["observer"],
        "mse"
    );
}

/// Recipe variants beyond the presets: odd bit widths, per-tensor scales, e5m2, asymmetric
/// int8 with activations, row-scoped magnitude pruning stored dense, N:M other than 2:4.
const VARIANTS: [(&str, &str); 6] = [
    (
        "int3-asym-g64",
        "bits = 3\nsymmetric = false\nstrategy = \"group\"\ngroup_size = 64\naction = \"quantize\"",
    ),
    (
        "int5-tensor",
        "bits = 5\nstrategy = \"tensor\"\naction = \"quantize\"\nscale_dtype = \"bf16\"",
    ),
    (
        "int7-channel-mse",
        "bits = 7\nstrategy = \"channel\"\nobserver = \"mse\"\naction = \"quantize\"",
    ),
    (
        "fp8-e5m2-tensor",
        "type = \"float\"\nformat = \"e5m2\"\nstrategy = \"tensor\"\naction = \"quantize\"",
    ),
    (
        "w8a8-asym",
        "bits = 8\nsymmetric = false\nactivations = \"tensor\"\naction = \"quantize\"",
    ),
    (
        "prune-row-dense-then-3of8",
        "action = \"prune\"\nprune = \"magnitude\"\nsparsity = 0.3\nprune_scope = \"row\"\nstorage = \"dense\"",
    ),
];

#[test]
fn recipe_variants_decode_to_the_bit() {
    let setup = setup();
    for (name, rule) in VARIANTS {
        let tmp = temp_dir();
        let recipe = tmp.path().join(format!("{name}.toml"));
        let mut text = format!("name = \"{name}\"\n[[rules]]\ntargets = [\"*.weight\"]\n{rule}\n");
        if name == "prune-row-dense-then-3of8" {
            // The first rule takes the attention weights; the rest get 3:8 then int4.
            text = format!(
                "name = \"{name}\"\n[[rules]]\ntargets = [\"re:.*attention.*\"]\n{rule}\n[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 4\nprune = \"3:8\"\n"
            );
        }
        fs::write(&recipe, text).unwrap_or_else(|e| panic!("cannot write {name}: {e}"));
        let out = tmp.path().join("out");
        let dense = tmp.path().join("dense");
        let recipe_arg = recipe
            .to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 temp path"));
        compress(&setup.model, recipe_arg, &out, 2);
        decompress(&out, &dense, "f32");
        let decoded = decode_agrees(&setup, &out, &dense, "f32");
        assert_eq!(decoded["tensors"], Value::from(104), "{name}: {decoded}");
        let report = read_json(&out.join("report.json"));
        let totals = &report["totals"];
        if name == "prune-row-dense-then-3of8" {
            // 24 attention matrices pruned and stored dense, 13 pruned 3:8 then quantized.
            assert_eq!(totals["pruned"], Value::from(37), "{name}: {totals}");
            assert_eq!(totals["quantized"], Value::from(13), "{name}: {totals}");
        } else {
            assert_eq!(totals["quantized"], Value::from(37), "{name}: {totals}");
        }
    }
}
