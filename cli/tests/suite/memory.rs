//! The memory limit: output bytes do not depend on it, the pool never exceeds it, and a
//! tensor whose rows cannot fit is refused before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use shardpress_engine::pipeline::NoProgress;
use shardpress_engine::{compress_local, LocalOptions, LocalRun, Recipe};
use shardpress_testkit::llama::{write_llama, Dims};

/// Large enough that the embedding, the head and the MLP matrices each exceed [`LIMIT`].
const DIMS: Dims = Dims {
    hidden: 512,
    heads: 16,
    kv_heads: 8,
    head_dim: 32,
    intermediate: 768,
    layers: 2,
    vocab: 1024,
};

/// 2 MiB: under the whole-tensor need of the embedding (2 MiB of f32 plus its working
/// memory) and of every quantized MLP matrix.
const LIMIT: u64 = 2 << 20;

/// Recipes covering every path that needs whole-tensor statistics or a row multiple:
/// tensor-scope pruning stored sparse (the embedding too), per-tensor int scales with the
/// mse observer after pruning, per-tensor FP8, 3-bit zero points packed ten rows a word.
const MIXED: &str = r#"
name = "mixed"
ignore = ["re:.*norm.*"]

[[rules]]
targets = ["model.embed_tokens.weight"]
action = "prune"
prune = "magnitude"
sparsity = 0.4
prune_scope = "tensor"
storage = "bitmask"

[[rules]]
targets = ["lm_head.weight"]
action = "quantize"
type = "float"
format = "e4m3"
strategy = "tensor"

[[rules]]
targets = ["re:.*self_attn.*"]
action = "quantize"
bits = 4
symmetric = true
strategy = "tensor"
observer = "mse"
prune = "magnitude"
sparsity = 0.3

[[rules]]
targets = ["re:.*mlp.*"]
action = "quantize"
bits = 3
symmetric = false
strategy = "group"
group_size = 64
observer = "mse"
"#;

/// Structured pruning reads scorers and gathers rows and columns in blocks too.
const STRUCTURED: &str = r#"
name = "structured-w8"
[structured]
mlp_ratio = 0.25
head_ratio = 0.5

[[rules]]
targets = ["*.weight"]
action = "quantize"
bits = 8
strategy = "channel"
"#;

fn model() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap_or_else(|e| panic!("mkdir: {e}"));
    write_llama(&model, &DIMS);
    (tmp, model)
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("{e}"));
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).unwrap_or_else(|err| panic!("{name}: {err}"));
            (name, bytes)
        })
        .collect()
}

fn run(model: &Path, recipe: &Recipe, out: &Path, threads: usize, limit: Option<u64>) -> LocalRun {
    let opts = LocalOptions {
        overwrite: false,
        threads: Some(threads),
        memory_limit: limit,
    };
    compress_local(model, recipe, out, &opts, &NoProgress)
        .unwrap_or_else(|e| panic!("{} with limit {limit:?}: {e}", recipe.name))
}

#[test]
fn output_bytes_do_not_depend_on_the_memory_limit() {
    let (tmp, model) = model();
    let mut recipes: Vec<Recipe> = [
        "bf16",
        "w8a16-mse",
        "w4a16-asym",
        "w8a8",
        "fp8",
        "sparse50",
        "2of4",
        "2of4-w4a16",
    ]
    .iter()
    .map(|p| Recipe::load(p).unwrap_or_else(|e| panic!("{p}: {e}")))
    .collect();
    for text in [MIXED, STRUCTURED] {
        recipes.push(Recipe::from_toml(text, "test").unwrap_or_else(|e| panic!("{e}")));
    }
    for recipe in &recipes {
        let whole = tmp.path().join(format!("{}-whole", recipe.name));
        let limited = tmp.path().join(format!("{}-limited", recipe.name));
        let a = run(&model, recipe, &whole, 1, None);
        let b = run(&model, recipe, &limited, 2, Some(LIMIT));
        let (fa, fb) = (files(&whole), files(&limited));
        assert_eq!(
            fa.keys().collect::<Vec<_>>(),
            fb.keys().collect::<Vec<_>>(),
            "{}",
            recipe.name
        );
        for (name, bytes) in &fa {
            assert!(
                fb.get(name) == Some(bytes),
                "{}: {name} differs with --memory-limit",
                recipe.name
            );
        }
        let m = b.memory;
        assert_eq!(m.limit(), Some(LIMIT));
        assert!(m.peak_reserved <= LIMIT, "{}: {m:?}", recipe.name);
        assert!(m.peak_in_use <= LIMIT, "{}: {m:?}", recipe.name);
        assert_eq!((m.reserved, m.in_use), (0, 0), "everything returned");
        // Row blocks mean more, smaller buffers than whole tensors.
        assert!(
            m.buffers > a.memory.buffers,
            "{}: {} buffers with the limit, {} without: nothing was split",
            recipe.name,
            m.buffers,
            a.memory.buffers
        );
        assert!(
            a.memory.peak_in_use > LIMIT,
            "{}: {:?}",
            recipe.name,
            a.memory
        );
        assert!(
            m.reused > 0,
            "returned buffers are reused: {}: {m:?}",
            recipe.name
        );
    }
}

/// Under 1.2 MiB the embedding's pruning histograms leave no room to keep its bitmask and
/// row offsets while the values stream, so each output of that tensor gets a pass of its own.
#[test]
fn outputs_too_large_to_hold_get_passes_of_their_own() {
    let (tmp, model) = model();
    let recipe = Recipe::from_toml(MIXED, "test").unwrap_or_else(|e| panic!("{e}"));
    let whole = tmp.path().join("whole");
    let tight = tmp.path().join("tight");
    run(&model, &recipe, &whole, 2, None);
    let limit = 1_228_800;
    let b = run(&model, &recipe, &tight, 1, Some(limit));
    assert!(
        files(&whole) == files(&tight),
        "outputs differ at {limit} bytes"
    );
    assert!(b.memory.peak_in_use <= limit, "{:?}", b.memory);
}

#[test]
fn a_row_that_cannot_fit_is_refused_before_anything_is_written() {
    let (tmp, model) = model();
    let out = tmp.path().join("out");
    let output = Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .args([
            "compress",
            "--recipe",
            "w8a16",
            "--memory-limit",
            "16KiB",
            "--quiet",
        ])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shardpress: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("raise --memory-limit"), "{stderr}");
    assert!(stderr.contains("16384 bytes"), "{stderr}");
    assert!(stderr.contains(".weight"), "names the tensor: {stderr}");
    assert!(!out.exists(), "no output directory");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n != "model")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let bad = Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .args(["compress", "--recipe", "w8a16", "--memory-limit", "0"])
        .arg(&model)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shardpress: {e}"));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("more than 0 bytes"));
}
