//! Structured pruning of a small Llama-shaped checkpoint: shapes and config stay consistent,
//! and a decompressed layer computes what the original layer computes with the removed
//! neurons and heads zeroed (checked by `tests/python/llama_forward.py`, a numpy forward
//! pass). Needs `SHARDPRESS_PYTHON`, set by `scripts/test.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};
use shardpress_engine::safetensors::TensorSpec;
use shardpress_engine::DType;
use shardpress_testkit::llama::{write_llama_checkpoint as llama, HEAD_DIM, HIDDEN, INTERMEDIATE};
use shardpress_testkit::write_f32_checkpoint;

fn python() -> PathBuf {
    match std::env::var_os("SHARDPRESS_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!("SHARDPRESS_PYTHON is not set; run `scripts/test.sh`"),
    }
}

fn describe(output: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn shardpress(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run shardpress: {e}"))
}

/// `shardpress compress MODEL --recipe RECIPE --out OUT --quiet`.
fn compress(model: &Path, recipe: &Path, out: &Path) -> Output {
    shardpress(&[
        "compress".as_ref(),
        model.as_os_str(),
        "--recipe".as_ref(),
        recipe.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--quiet".as_ref(),
    ])
}

/// A temporary directory holding the small Llama checkpoint in `model/`.
fn llama_in_tempdir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).unwrap_or_else(|e| panic!("mkdir: {e}"));
    llama(&model);
    (tmp, model)
}

fn read_json(path: &Path) -> Value {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn write_recipe(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write the recipe: {e}"));
    path
}

/// Shapes of every tensor in a dense output directory, by name.
fn shapes(dir: &Path) -> std::collections::BTreeMap<String, Vec<u64>> {
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let mut out = std::collections::BTreeMap::new();
    let files: std::collections::BTreeSet<String> = index["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for f in files {
        let bytes = std::fs::read(dir.join(&f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).unwrap_or_else(|e| panic!("{f}: {e}"));
        for (name, info) in meta.tensors() {
            out.insert(name, info.shape.iter().map(|d| *d as u64).collect());
        }
    }
    out
}

#[test]
fn pruned_layers_match_the_original_with_removed_units_zeroed() {
    let (tmp, model) = llama_in_tempdir();
    let recipe = write_recipe(
        tmp.path(),
        "name = \"slim\"\n[structured]\nmlp_ratio = 0.25\nhead_ratio = 0.5\ndrop_layers = [1]\n",
    );
    let out = tmp.path().join("out");
    let o = compress(&model, &recipe, &out);
    assert!(o.status.success(), "{}", describe(&o));

    let config = read_json(&out.join("config.json"));
    assert_eq!(config["intermediate_size"], 18);
    assert_eq!(config["num_key_value_heads"], 1);
    assert_eq!(config["num_attention_heads"], 2);
    assert_eq!(config["head_dim"], HEAD_DIM);
    assert_eq!(config["num_hidden_layers"], 2);
    assert_eq!(config["hidden_size"], HIDDEN);

    let got = shapes(&out);
    assert!(
        !got.keys().any(|n| n.starts_with("model.layers.2.")),
        "{got:?}"
    );
    for l in 0..2 {
        let s = |t: &str| got.get(&format!("model.layers.{l}.{t}")).cloned();
        assert_eq!(s("mlp.gate_proj.weight"), Some(vec![18, HIDDEN]));
        assert_eq!(s("mlp.up_proj.weight"), Some(vec![18, HIDDEN]));
        assert_eq!(s("mlp.down_proj.weight"), Some(vec![HIDDEN, 18]));
        assert_eq!(
            s("self_attn.q_proj.weight"),
            Some(vec![2 * HEAD_DIM, HIDDEN])
        );
        assert_eq!(s("self_attn.k_proj.weight"), Some(vec![HEAD_DIM, HIDDEN]));
        assert_eq!(s("self_attn.v_proj.weight"), Some(vec![HEAD_DIM, HIDDEN]));
        assert_eq!(
            s("self_attn.o_proj.weight"),
            Some(vec![HIDDEN, 2 * HEAD_DIM])
        );
    }
    let report = read_json(&out.join("report.json"));
    let structured = &report["structured"];
    assert_eq!(structured["dropped_layers"], json!([1]));
    let layers = structured["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(layers.len(), 2, "{structured}");
    assert_eq!(layers[1]["source_layer"], 2);
    assert_eq!(layers[1]["output_layer"], 1);
    for l in &layers {
        assert_eq!(l["mlp_kept"].as_array().map(Vec::len), Some(18), "{l}");
        assert_eq!(l["kv_heads_kept"].as_array().map(Vec::len), Some(1), "{l}");
    }

    // Plain dense copy, then the forward pass of each kept layer against the original.
    let dense = tmp.path().join("dense");
    let o = shardpress(&[
        "decompress".as_ref(),
        out.as_os_str(),
        "--out".as_ref(),
        dense.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", describe(&o));
    for layer in ["0", "1"] {
        let o = Command::new(python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/llama_forward.py"))
            .arg("--original")
            .arg(&model)
            .arg("--pruned")
            .arg(&dense)
            .args(["--layer", layer])
            .output()
            .unwrap_or_else(|e| panic!("cannot run python: {e}"));
        assert!(o.status.success(), "layer {layer}: {}", describe(&o));
    }
}

#[test]
fn structured_pruning_combines_with_quantization() {
    let (tmp, model) = llama_in_tempdir();
    let recipe = write_recipe(
        tmp.path(),
        "[structured]\nmlp_ratio = 0.5\n[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 4\nstrategy = \"group\"\ngroup_size = 8\n",
    );
    let out = tmp.path().join("out");
    let o = compress(&model, &recipe, &out);
    assert!(o.status.success(), "{}", describe(&o));
    let got = shapes(&out);
    // down_proj keeps 12 of 24 columns: 12 int4 values pack into 2 words per row.
    assert_eq!(
        got.get("model.layers.0.mlp.down_proj.weight_packed"),
        Some(&vec![HIDDEN, 2])
    );
    assert_eq!(
        got.get("model.layers.0.mlp.down_proj.weight_scale"),
        Some(&vec![HIDDEN, 2])
    );
    assert_eq!(
        got.get("model.layers.2.mlp.gate_proj.weight_packed"),
        Some(&vec![12, 4])
    );
    let dense = tmp.path().join("dense");
    let o = shardpress(&[
        "decompress".as_ref(),
        out.as_os_str(),
        "--out".as_ref(),
        dense.as_os_str(),
        "--dtype".as_ref(),
        "bf16".as_ref(),
    ]);
    assert!(o.status.success(), "{}", describe(&o));
    let dense_shapes = shapes(&dense);
    assert_eq!(
        dense_shapes.get("model.layers.1.mlp.down_proj.weight"),
        Some(&vec![HIDDEN, 12])
    );
    let config = read_json(&dense.join("config.json"));
    assert!(config.get("quantization_config").is_none(), "{config}");
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["intermediate_size"], 12);
}

#[test]
fn structured_pruning_refuses_what_it_cannot_apply() {
    let (tmp, model) = llama_in_tempdir();
    let cases = [
        (
            "[structured]\ndrop_layers = [3]\n",
            "drop_layers names layer 3, but the model has 3 layers",
        ),
        (
            "[structured]\ndrop_layers = [0, 1, 2]\n",
            "would remove every layer",
        ),
        (
            "[structured]\nmlp_ratio = 1.0\n",
            "mlp_ratio must be at least 0 and below 1",
        ),
    ];
    for (text, want) in cases {
        let recipe = write_recipe(tmp.path(), text);
        let out = tmp.path().join("out");
        let o = compress(&model, &recipe, &out);
        assert!(!o.status.success(), "{text}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{text}: {err}");
        assert!(!out.exists(), "{text}: output left behind");
    }
    // A config that undercounts the layers.
    let config_path = model.join("config.json");
    let mut config = read_json(&config_path);
    config["num_hidden_layers"] = json!(2);
    std::fs::write(&config_path, config.to_string()).unwrap_or_else(|e| panic!("{e}"));
    let recipe = write_recipe(tmp.path(), "[structured]\nmlp_ratio = 0.5\n");
    let o = compress(&model, &recipe, &tmp.path().join("out3"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("belongs to layer 2, but config.json has num_hidden_layers 2"),
        "{err}"
    );
    config["num_hidden_layers"] = json!(3);
    std::fs::write(&config_path, config.to_string()).unwrap_or_else(|e| panic!("{e}"));

    // A checkpoint without the tensors structured pruning needs.
    std::fs::remove_file(model.join("model.safetensors")).unwrap_or_else(|e| panic!("{e}"));
    write_f32_checkpoint(
        &model,
        &[TensorSpec::new(
            "model.layers.0.mlp.up_proj.weight",
            DType::F32,
            vec![INTERMEDIATE, HIDDEN],
        )],
    );
    let recipe = write_recipe(tmp.path(), "[structured]\nmlp_ratio = 0.5\n");
    let o = compress(&model, &recipe, &tmp.path().join("out2"));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tensor \"model.layers.0.mlp.gate_proj.weight\" is missing"),
        "{err}"
    );
}
