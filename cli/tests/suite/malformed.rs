//! `shardpress compress` on malformed checkpoints and recipes, and on valid edge cases.
//!
//! Every checkpoint is written byte by byte into a temporary directory. A failing run must exit
//! with status 1 and print exactly one `error: ` line that names the offending file (and tensor,
//! where there is one), must leave neither the output directory nor a staging directory behind,
//! and must not touch its inputs. Successful runs are read back with the `safetensors` crate.

// clippy.toml allows expect() inside #[test] functions only; the helpers here fail the
// test the same way.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use shardpress_testkit::hostile::{
    f32_bytes, f32_ramp, header_json, index_json, malformed_checkpoints, malformed_recipes,
    raw_file, small_model, st_file, st_file_padded, t, Case, EMBED, HEAD, NORM, Q, SHARD1, SHARD2,
    T, UP,
};
use tempfile::TempDir;

/// A temporary workspace: the model directory `model/`, output `out/` next to it.
struct Work {
    dir: TempDir,
}

impl Work {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn model(&self) -> PathBuf {
        self.root().join("model")
    }

    fn out(&self) -> PathBuf {
        self.root().join("out")
    }

    /// Writes `bytes` to `model/<name>` and returns the path.
    fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.model().join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, bytes).expect("write");
        path
    }

    /// Writes a file next to the model directory (recipes).
    fn put_beside(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.root().join(name);
        fs::write(&path, bytes).expect("write");
        path
    }
}

/// Every file below `root` (recursively) with its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), fs::read(&path).expect("read"));
            }
        }
    }
    out
}

fn compress(input: &Path, recipe: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .arg("compress")
        .arg(input)
        .arg("--recipe")
        .arg(recipe)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env_remove("SHARDPRESS_RECIPE")
        .env_remove("SHARDPRESS_THREADS")
        .env_remove("SHARDPRESS_LOG")
        .output()
        .expect("run shardpress")
}

/// Runs `compress` on `input`, expecting a clean failure whose message contains every string
/// in `needles`. Returns the error line.
fn expect_failure(w: &Work, input: &Path, recipe: &str, needles: &[&str]) -> String {
    let before = snapshot(w.root());
    let out = compress(input, recipe, &w.out(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ctx = format!(
        "status {:?}\nstderr:\n{stderr}\nstdout:\n{stdout}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "panic: {ctx}");
    assert_eq!(out.status.code(), Some(1), "exit status: {ctx}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line on stderr: {ctx}");
    assert!(stderr.ends_with('\n'), "{ctx}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{ctx}");
    for n in needles {
        assert!(line.contains(n), "error should mention {n:?}: {ctx}");
    }
    assert!(!w.out().exists(), "--out was created: {ctx}");
    let leftovers: Vec<String> = fs::read_dir(w.root())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".out") || n.contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging left behind: {leftovers:?}: {ctx}"
    );
    assert_eq!(before, snapshot(w.root()), "inputs changed: {ctx}");
    line.to_string()
}

fn disp(p: &Path) -> String {
    p.display().to_string()
}

fn quoted(name: &str) -> String {
    format!("{name:?}")
}

// ---------------------------------------------------------------------------------------------
// Malformed single files
// ---------------------------------------------------------------------------------------------

#[test]
fn every_malformed_checkpoint_of_the_corpus() {
    for case in malformed_checkpoints() {
        let w = Work::new();
        write_case(&w, &case);
        let mut needles: Vec<String> = case.needles.clone();
        // The error names the file by its full path.
        if let Some(file) = case.needles.first() {
            needles[0] = disp(&w.model().join(file));
        }
        let refs: Vec<&str> = needles.iter().map(String::as_str).collect();
        expect_failure(&w, &w.model(), &case.recipe, &refs);
    }
}

#[test]
fn every_malformed_recipe_of_the_corpus() {
    for (text, want) in malformed_recipes() {
        let w = Work::new();
        w.put("model.safetensors", &st_file(&small_model()));
        let recipe = w.put_beside("recipe.toml", text.as_bytes());
        expect_failure(&w, &w.model(), &disp(&recipe), &[&disp(&recipe), want]);
    }
}

fn write_case(w: &Work, case: &Case) {
    for (name, bytes) in &case.files {
        w.put(name, bytes);
    }
}

#[test]
fn header_not_utf8() {
    let w = Work::new();
    let mut header = b"{\"a\xff\":{}}".to_vec();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.append(&mut header);
    let path = w.put("model.safetensors", &bytes);
    expect_failure(&w, &w.model(), "w8a16", &[&disp(&path), "UTF-8"]);
}

#[test]
fn header_not_an_object() {
    let w = Work::new();
    for header in ["[1,2,3]", "\"model\"", "42", "null"] {
        let path = w.put("model.safetensors", &raw_file(header, &[]));
        expect_failure(&w, &w.model(), "w8a16", &[&disp(&path)]);
    }
}

#[test]
fn trailing_bytes_after_last_tensor() {
    let w = Work::new();
    let header = format!(r#"{{"{Q}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}}}"#);
    let path = w.put("model.safetensors", &raw_file(&header, &[0; 19]));
    let line = expect_failure(&w, &w.model(), "w8a16", &[&disp(&path)]);
    assert!(line.contains("3 trailing bytes"), "{line}");
}

#[test]
fn duplicate_tensor_name() {
    let w = Work::new();
    let header = format!(
        r#"{{"{Q}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"{Q}":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}"#
    );
    let path = w.put("model.safetensors", &raw_file(&header, &[0; 8]));
    let line = expect_failure(&w, &w.model(), "w8a16", &[&disp(&path), &quoted(Q)]);
    assert!(line.contains("twice"), "{line}");

    // The same name spelled with a JSON escape is still the same name.
    let header = r#"{"ab":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a\u0062":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let path = w.put("model.safetensors", &raw_file(header, &[0; 8]));
    let line = expect_failure(&w, &w.model(), "w8a16", &[&disp(&path), "\"ab\""]);
    assert!(line.contains("twice"), "{line}");
}

#[test]
fn metadata_not_strings() {
    let w = Work::new();
    let header = format!(
        r#"{{"__metadata__":{{"format":1}},"{NORM}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#
    );
    let path = w.put("model.safetensors", &raw_file(&header, &[0; 4]));
    expect_failure(&w, &w.model(), "w8a16", &[&disp(&path), "__metadata__"]);
}

// ---------------------------------------------------------------------------------------------
// Malformed sharded checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn index_disagrees_about_where_a_tensor_is() {
    let w = Work::new();
    w.put(SHARD1, &st_file(&small_model()));
    w.put(
        SHARD2,
        &st_file(&[t(HEAD, "F32", &[2, 2], f32_bytes(&[1.0; 4]))]),
    );
    let index = w.put(
        "model.safetensors.index.json",
        &index_json(&[(Q, SHARD2), (NORM, SHARD1), (HEAD, SHARD2)]),
    );
    expect_failure(&w, &w.model(), "w8a16", &[&disp(&index), &quoted(Q)]);
}

#[test]
fn tensor_present_in_two_shards() {
    let w = Work::new();
    w.put(SHARD1, &st_file(&small_model()));
    let second = w.put(
        SHARD2,
        &st_file(&[
            t(Q, "F32", &[4, 8], f32_bytes(&f32_ramp(32, 1.0))),
            t(HEAD, "F32", &[2, 2], f32_bytes(&[1.0; 4])),
        ]),
    );
    w.put(
        "model.safetensors.index.json",
        &index_json(&[(Q, SHARD1), (NORM, SHARD1), (HEAD, SHARD2)]),
    );
    let line = expect_failure(&w, &w.model(), "w8a16", &[&disp(&second), &quoted(Q)]);
    assert!(line.contains(SHARD1), "{line}");
}

#[test]
fn index_with_path_traversal_shard_name() {
    let w = Work::new();
    // A real file sits where the traversal would lead, so only the name check stops it.
    fs::write(w.root().join("x.safetensors"), st_file(&small_model())).expect("write");
    w.put(SHARD1, &st_file(&small_model()));
    let index = w.put(
        "model.safetensors.index.json",
        &index_json(&[(Q, SHARD1), (NORM, SHARD1), (UP, "../x.safetensors")]),
    );
    expect_failure(
        &w,
        &w.model(),
        "w8a16",
        &[&disp(&index), "../x.safetensors", &quoted(UP)],
    );
}

// ---------------------------------------------------------------------------------------------
// Bad values, recipes and configs
// ---------------------------------------------------------------------------------------------

#[test]
fn nan_weight_in_bf16_matrix_of_a_sharded_checkpoint() {
    let w = Work::new();
    let mut values: Vec<u8> = f32_ramp(16, 0.5)
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    values[2 * 11..2 * 11 + 2].copy_from_slice(&0x7fc0u16.to_le_bytes()); // row 2, column 3
    w.put(SHARD1, &st_file(&small_model()));
    let second = w.put(SHARD2, &st_file(&[t(UP, "BF16", &[4, 4], values)]));
    w.put(
        "model.safetensors.index.json",
        &index_json(&[(Q, SHARD1), (NORM, SHARD1), (UP, SHARD2)]),
    );
    let line = expect_failure(&w, &w.model(), "w4a16", &[&disp(&second), &quoted(UP)]);
    assert!(
        line.contains("row 2") && line.contains("column 3"),
        "{line}"
    );
}

#[test]
fn missing_recipe() {
    let w = Work::new();
    w.put("model.safetensors", &st_file(&small_model()));
    let missing = disp(&w.root().join("nope.toml"));
    expect_failure(&w, &w.model(), &missing, &[&missing]);
}

#[test]
fn config_json_not_valid_json() {
    let w = Work::new();
    w.put("model.safetensors", &st_file(&small_model()));
    let config = w.put("config.json", b"{\"model_type\": \"llama\",");
    let line = expect_failure(&w, &w.model(), "w8a16", &[&disp(&config)]);
    assert!(line.contains("JSON"), "{line}");
}

#[test]
fn config_json_not_an_object() {
    let w = Work::new();
    w.put("model.safetensors", &st_file(&small_model()));
    let config = w.put("config.json", b"[1, 2]");
    expect_failure(&w, &w.model(), "w8a16", &[&disp(&config)]);
}

#[test]
fn malformed_single_file_input() {
    let w = Work::new();
    let path = w.put("weights.safetensors", &raw_file("[]", &[]));
    expect_failure(&w, &path, "w8a16", &[&disp(&path)]);
}

#[test]
fn missing_input() {
    let w = Work::new();
    fs::create_dir_all(w.model()).expect("mkdir");
    let missing = w.root().join("no-such-model");
    expect_failure(&w, &missing, "w8a16", &[&disp(&missing)]);
}

#[test]
fn directory_without_weights() {
    let w = Work::new();
    w.put("config.json", b"{}");
    expect_failure(&w, &w.model(), "w8a16", &[&disp(&w.model())]);
}

// ---------------------------------------------------------------------------------------------
// Valid edge cases
// ---------------------------------------------------------------------------------------------

/// One output tensor: dtype name, shape, bytes.
type Loaded = BTreeMap<String, (String, Vec<u64>, Vec<u8>)>;

/// Runs `compress`, expecting success, and loads every output shard named by the output index.
fn compress_ok(w: &Work, input: &Path, recipe: &str) -> Loaded {
    let before = snapshot(w.root());
    let out = compress(input, recipe, &w.out(), &["--quiet", "--threads", "2"]);
    let ctx = format!(
        "status {:?}\nstderr:\n{}\nstdout:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    assert!(out.stderr.is_empty(), "{ctx}");
    let after = snapshot(w.root());
    for (path, bytes) in &before {
        assert_eq!(
            after.get(path),
            Some(bytes),
            "input {} changed",
            path.display()
        );
    }
    let names: Vec<String> = fs::read_dir(w.root())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("partial")),
        "staging left behind: {names:?}"
    );
    assert!(w.out().join("report.json").is_file(), "no report.json");

    let index: Value = serde_json::from_slice(
        &fs::read(w.out().join("model.safetensors.index.json")).expect("index"),
    )
    .expect("index json");
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    let mut loaded = Loaded::new();
    let mut total = 0u64;
    let shard_files: std::collections::BTreeSet<&str> =
        weight_map.values().filter_map(Value::as_str).collect();
    for file in shard_files {
        let bytes = fs::read(w.out().join(file)).expect("shard");
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("prefix"));
        assert_eq!((8 + n) % 8, 0, "{file}: data section not 8-byte aligned");
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{file}: {e:?}"));
        for (name, view) in st.tensors() {
            assert_eq!(
                weight_map.get(&name).and_then(Value::as_str),
                Some(file),
                "index entry of {name}"
            );
            total += view.data().len() as u64;
            let shape = view.shape().iter().map(|d| *d as u64).collect();
            let prev = loaded.insert(
                name.clone(),
                (format!("{:?}", view.dtype()), shape, view.data().to_vec()),
            );
            assert!(prev.is_none(), "{name} written twice");
        }
    }
    assert_eq!(
        loaded.len(),
        weight_map.len(),
        "index lists missing tensors"
    );
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    loaded
}

/// Asserts that `name` was copied unchanged.
fn assert_kept(out: &Loaded, x: &T) {
    let got = out
        .get(x.name)
        .unwrap_or_else(|| panic!("{} missing from the output", x.name));
    assert_eq!(got.0, x.dtype, "{}", x.name);
    assert_eq!(got.1, x.shape, "{}", x.name);
    assert!(got.2 == x.data, "{} bytes changed", x.name);
}

/// Asserts `module.weight` was quantized to int8 per channel (w8a16) and decodes to within half
/// a step of the f32 `values`.
fn assert_int8_channel(out: &Loaded, weight: &str, rows: u64, cols: u64, values: &[f32]) {
    let m = weight.strip_suffix(".weight").expect(".weight");
    assert!(
        !out.contains_key(weight),
        "{weight} kept next to its packed form"
    );
    let packed = &out[&format!("{m}.weight_packed")];
    let scale = &out[&format!("{m}.weight_scale")];
    let shape = &out[&format!("{m}.weight_shape")];
    assert_eq!(
        (packed.0.as_str(), &packed.1),
        ("I32", &vec![rows, cols.div_ceil(4)])
    );
    assert_eq!((scale.0.as_str(), &scale.1), ("F32", &vec![rows, 1]));
    assert_eq!((shape.0.as_str(), &shape.1), ("I64", &vec![2]));
    let dims: Vec<i64> = shape
        .2
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8")))
        .collect();
    assert_eq!(dims, vec![rows as i64, cols as i64]);
    let words: Vec<u32> = packed
        .2
        .chunks(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
        .collect();
    let scales: Vec<f32> = scale
        .2
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
        .collect();
    let wpr = cols.div_ceil(4) as usize;
    for r in 0..rows as usize {
        for c in 0..cols as usize {
            let word = words[r * wpr + c / 4];
            let q = ((word >> (8 * (c % 4))) & 0xff) as i32 - 128;
            let deq = q as f32 * scales[r];
            let x = values[r * cols as usize + c];
            assert!(
                (deq - x).abs() <= scales[r] / 2.0 + 1e-6,
                "{weight}[{r},{c}]: {x} decoded to {deq}"
            );
        }
    }
}

#[test]
fn scalar_zero_sized_and_i64_tensors() {
    let w = Work::new();
    let qv = f32_ramp(24, 0.3);
    let tensors = vec![
        t("model.layers.0.attn.scale", "F32", &[], f32_bytes(&[0.125])),
        t("model.layers.0.attn.empty.weight", "F32", &[0, 4], vec![]),
        t("model.layers.0.mlp.gate.weight", "BF16", &[4, 0], vec![]),
        t(
            "model.layers.0.attn.position_ids",
            "I64",
            &[1, 3],
            [7i64, -1, i64::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        t("model.layers.0.attn.flag", "BOOL", &[], vec![1]),
        t(Q, "F32", &[3, 8], f32_bytes(&qv)),
    ];
    w.put("model.safetensors", &st_file(&tensors));
    let out = compress_ok(&w, &w.model(), "w8a16");
    for x in &tensors[..5] {
        assert_kept(&out, x);
    }
    assert_int8_channel(&out, Q, 3, 8, &qv);
    assert_eq!(out.len(), 5 + 3);
}

#[test]
fn space_padded_headers() {
    for pad in 0..=9 {
        let w = Work::new();
        let qv = f32_ramp(16, pad as f32);
        let tensors = vec![
            t(Q, "F32", &[2, 8], f32_bytes(&qv)),
            t(NORM, "F32", &[8], f32_bytes(&f32_ramp(8, 9.0))),
            t("model.layers.0.attn.ids", "U8", &[3], vec![1, 2, 3]),
        ];
        let bytes = st_file_padded(&tensors, pad);
        let out = compress_ok_at(&w, "model.safetensors", &bytes);
        assert_kept(&out, &tensors[1]);
        assert_kept(&out, &tensors[2]);
        assert_int8_channel(&out, Q, 2, 8, &qv);
    }
}

fn compress_ok_at(w: &Work, name: &str, bytes: &[u8]) -> Loaded {
    w.put(name, bytes);
    compress_ok(w, &w.model(), "w8a16")
}

#[test]
fn space_padded_header_both_alignments() {
    // Pick paddings so the data section starts on and off an 8-byte boundary.
    let tensors = || {
        vec![t(
            "model.layers.0.attn.ids",
            "I64",
            &[2],
            [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )]
    };
    let base = header_json(&tensors()).len();
    let aligned = (8 - (8 + base) % 8) % 8 + 8;
    let unaligned = aligned + 3;
    for pad in [aligned, unaligned] {
        let w = Work::new();
        let bytes = st_file_padded(&tensors(), pad);
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("prefix")) as usize;
        assert_eq!((8 + n).is_multiple_of(8), pad == aligned);
        let out = compress_ok_at(&w, "model.safetensors", &bytes);
        assert_kept(&out, &tensors()[0]);
    }
}

#[test]
fn single_file_given_directly() {
    let w = Work::new();
    let qv = f32_ramp(32, 4.0);
    let tensors = vec![
        t(Q, "F32", &[4, 8], f32_bytes(&qv)),
        t(NORM, "F32", &[8], f32_bytes(&f32_ramp(8, 1.5))),
        t(EMBED, "F32", &[5, 8], f32_bytes(&f32_ramp(40, 2.5))),
    ];
    let path = w.put("my-weights.safetensors", &st_file(&tensors));
    // Other files in the directory belong to no checkpoint when a file is given.
    w.put("config.json", b"this is not json");
    let out = compress_ok(&w, &path, "w8a16");
    assert_kept(&out, &tensors[1]);
    assert_kept(&out, &tensors[2]);
    assert_int8_channel(&out, Q, 4, 8, &qv);
    // The directory's config.json is not carried over; the output gets one that records
    // only how the weights are stored.
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.out().join("config.json")).expect("config.json"))
            .expect("config.json is JSON");
    let keys: Vec<&String> = config.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["quantization_config"]);
    assert_eq!(config["quantization_config"]["format"], "pack-quantized");
}

#[test]
fn sharded_checkpoint_with_a_layer_split_across_shards() {
    let w = Work::new();
    let qv = f32_ramp(32, 0.7);
    let upv = f32_ramp(48, 1.9);
    let first = vec![
        t(EMBED, "F32", &[6, 8], f32_bytes(&f32_ramp(48, 3.1))),
        t(Q, "F32", &[4, 8], f32_bytes(&qv)),
    ];
    let second = vec![
        t(NORM, "F32", &[8], f32_bytes(&f32_ramp(8, 0.2))),
        t(UP, "F32", &[6, 8], f32_bytes(&upv)),
        t(HEAD, "F32", &[6, 8], f32_bytes(&f32_ramp(48, 5.0))),
        t("model.norm.weight", "F32", &[8], f32_bytes(&[1.0; 8])),
    ];
    w.put(SHARD1, &st_file(&first));
    w.put(SHARD2, &st_file(&second));
    let entries: Vec<(&str, &str)> = first
        .iter()
        .map(|x| (x.name, SHARD1))
        .chain(second.iter().map(|x| (x.name, SHARD2)))
        .collect();
    w.put("model.safetensors.index.json", &index_json(&entries));
    w.put(
        "config.json",
        br#"{"model_type": "llama", "torch_dtype": "float32", "hidden_size": 8}"#,
    );
    w.put("tokenizer.json", b"{\"version\": \"1.0\"}");
    let out = compress_ok(&w, &w.model(), "w8a16");

    for x in [&first[0], &second[0], &second[2], &second[3]] {
        assert_kept(&out, x);
    }
    assert_int8_channel(&out, Q, 4, 8, &qv);
    assert_int8_channel(&out, UP, 6, 8, &upv);
    assert_eq!(out.len(), 4 + 2 * 3);

    // Both halves of layer 0 land in one output shard.
    let index: Value = serde_json::from_slice(
        &fs::read(w.out().join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let wm = &index["weight_map"];
    let q_shard = wm["model.layers.0.self_attn.q_proj.weight_packed"].as_str();
    assert!(q_shard.is_some());
    assert_eq!(
        q_shard,
        wm["model.layers.0.mlp.up_proj.weight_packed"].as_str()
    );
    assert_eq!(q_shard, wm[NORM].as_str());

    let config: Value =
        serde_json::from_slice(&fs::read(w.out().join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(
        config["quantization_config"]["quant_method"],
        "compressed-tensors"
    );
    assert_eq!(
        fs::read(w.out().join("tokenizer.json")).expect("tokenizer"),
        b"{\"version\": \"1.0\"}"
    );
}

#[test]
fn output_is_independent_of_thread_count() {
    let w = Work::new();
    let tensors = vec![
        t(Q, "F32", &[4, 8], f32_bytes(&f32_ramp(32, 0.1))),
        t(UP, "F32", &[8, 8], f32_bytes(&f32_ramp(64, 0.2))),
        t(
            "model.layers.1.mlp.up_proj.weight",
            "F32",
            &[8, 8],
            f32_bytes(&f32_ramp(64, 0.3)),
        ),
        t(NORM, "F32", &[8], f32_bytes(&f32_ramp(8, 0.4))),
    ];
    w.put("model.safetensors", &st_file(&tensors));
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out_dir = w.root().join(format!("out-{threads}"));
        let out = compress(
            &w.model(),
            "w4a16",
            &out_dir,
            &["--quiet", "--threads", threads],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut files = snapshot(&out_dir);
        for report in ["report.json", "report.md", "report.html"] {
            files.remove(&out_dir.join(report));
        }
        let files: BTreeMap<PathBuf, Vec<u8>> = files
            .into_iter()
            .map(|(p, b)| (p.strip_prefix(&out_dir).expect("prefix").to_path_buf(), b))
            .collect();
        outputs.push(files);
    }
    assert_eq!(outputs[0], outputs[1]);
}
