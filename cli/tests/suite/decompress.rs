//! `shardpress decompress` on damaged compressed checkpoints: every inconsistency is an error
//! naming the module or tensor, nothing is written, and the input is left alone.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;
use shardpress_testkit::llama::write_llama_checkpoint;

const MODULE: &str = "model.layers.0.mlp.up_proj";

fn run(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardpress"))
        .args(args)
        .output()
        .expect("run shardpress")
}

/// A compressed copy of the small Llama checkpoint.
fn compressed(dir: &Path, recipe: &str) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    write_llama_checkpoint(&model);
    let out = dir.join(recipe);
    let o = run(&[
        "compress".as_ref(),
        model.as_os_str(),
        "--recipe".as_ref(),
        recipe.as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--quiet".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The shard holding `tensor`, per the index.
fn shard_of(dir: &Path, tensor: &str) -> PathBuf {
    let index: Value = serde_json::from_slice(
        &std::fs::read(dir.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("index json");
    dir.join(
        index["weight_map"][tensor]
            .as_str()
            .expect("tensor in index"),
    )
}

/// Rewrites the shard holding `anchor` after `edit` changes its tensors.
fn edit_shard(
    dir: &Path,
    anchor: &str,
    edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = shard_of(dir, anchor);
    let bytes = std::fs::read(&path).expect("read shard");
    let st = SafeTensors::deserialize(&bytes).expect("parse shard");
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
        .collect();
    let out = safetensors::serialize(views, None).expect("serialize");
    std::fs::write(&path, out).expect("write shard");
    // Keep the index in step with the shard.
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("json");
    let file = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let map = index["weight_map"].as_object_mut().expect("weight_map");
    map.retain(|_, v| v.as_str() != Some(file.as_str()));
    for name in tensors.keys() {
        map.insert(name.clone(), Value::from(file.clone()));
    }
    std::fs::write(&index_path, index.to_string()).expect("write index");
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("json");
    edit(&mut config);
    std::fs::write(&path, config.to_string()).expect("write config");
}

/// Decompressing `dir` fails with a message containing every `want`, and writes nothing.
fn refused(dir: &Path, want: &[&str]) {
    let out = dir.with_extension("dense");
    let o = run(&[
        "decompress".as_ref(),
        dir.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for w in want {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
    assert!(!out.exists(), "output written despite the error");
    let parent = dir.parent().expect("parent");
    let staging = std::fs::read_dir(parent)
        .expect("list")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".partial-"));
    assert!(!staging, "staging directory left behind");
}

#[test]
fn a_dense_weight_beside_packed_parts_is_ambiguous() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = compressed(tmp.path(), "w4a16-asym");
    let weight = format!("{MODULE}.weight");
    edit_shard(&out, &format!("{MODULE}.weight_packed"), |t| {
        t.insert(weight, (Dtype::F32, vec![2, 2], vec![0; 16]));
    });
    refused(&out, &[MODULE, "also has a weight tensor"]);
}

#[test]
fn missing_parts_are_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = compressed(tmp.path(), "w4a16-asym");
    edit_shard(&out, &format!("{MODULE}.weight_packed"), |t| {
        t.remove(&format!("{MODULE}.weight_packed"));
    });
    refused(
        &out,
        &[
            &format!("{MODULE}.weight_scale"),
            "no complete compressed weight",
        ],
    );

    let out = compressed(&tmp.path().join("b"), "w8a8");
    edit_shard(&out, &format!("{MODULE}.weight_scale"), |t| {
        t.remove(&format!("{MODULE}.weight_scale"));
    });
    refused(&out, &[&format!("{MODULE}.weight"), "without weight_scale"]);

    let out = compressed(&tmp.path().join("c"), "w4a16-asym");
    edit_shard(&out, &format!("{MODULE}.weight_packed"), |t| {
        t.remove(&format!("{MODULE}.weight_zero_point"));
    });
    refused(&out, &[MODULE, "asymmetric, but no weight_zero_point"]);
}

#[test]
fn config_contradicting_the_tensors_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = compressed(tmp.path(), "w8a8");
    edit_config(&out, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] =
            Value::from(4);
    });
    refused(
        &out,
        &["8-bit values but quantization_config says num_bits 4"],
    );

    let out = compressed(&tmp.path().join("b"), "w4a16");
    edit_config(&out, |c| {
        c["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] =
            Value::from(12);
    });
    refused(&out, &["num_bits 12; pack-quantized needs 2 to 8"]);
}

#[test]
fn bad_scales_and_offsets_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = compressed(tmp.path(), "fp8");
    let scale = format!("{MODULE}.weight_scale");
    edit_shard(&out, &scale, |t| {
        let entry = t.get_mut(&scale).expect("scale");
        // Scales are stored in the tensor's own dtype, F32 here.
        entry.2[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    refused(&out, &[&scale, "scale #0 is NaN"]);

    let out = compressed(&tmp.path().join("b"), "sparse50");
    let offsets = format!("{MODULE}.row_offsets");
    edit_shard(&out, &offsets, |t| {
        let entry = t.get_mut(&offsets).expect("offsets");
        entry.2[8..16].copy_from_slice(&7i64.to_le_bytes());
    });
    refused(&out, &[&offsets, "row offsets disagree with the bitmask"]);
}

#[test]
fn a_shard_missing_from_the_index_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = compressed(tmp.path(), "w8a16");
    let index_path = out.join("model.safetensors.index.json");
    let mut index: Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("json");
    let map = index["weight_map"].as_object_mut().expect("map");
    map.retain(|_, v| v.as_str() != Some("model-00002-of-00006.safetensors"));
    std::fs::write(&index_path, index.to_string()).expect("write");
    refused(&out, &["model-00002-of-00006.safetensors", "not named by"]);
}

#[test]
fn an_already_compressed_input_is_not_compressed_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = compressed(tmp.path(), "sparse50");
    let again = tmp.path().join("again");
    let o = run(&[
        "compress".as_ref(),
        out.as_os_str(),
        "--recipe".as_ref(),
        "w4a16".as_ref(),
        "--out".as_ref(),
        again.as_os_str(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("already compressed"), "{err}");
    assert!(!again.exists());
}

#[test]
fn a_single_file_input_gets_a_config_that_decompress_reads() {
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    shardpress_testkit::write_f32_checkpoint(
        &model,
        &[shardpress_engine::safetensors::TensorSpec::new(
            "model.layers.0.mlp.up_proj.weight",
            shardpress_engine::DType::F32,
            vec![8, 16],
        )],
    );
    let file = model.join("model.safetensors");
    let out = tmp.path().join("out");
    let o = run(&[
        "compress".as_ref(),
        file.as_os_str(),
        "--recipe".as_ref(),
        "w4a16-asym".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
        "--quiet".as_ref(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["quantization_config"]["format"], "pack-quantized");
    let dense = tmp.path().join("dense");
    let o = run(&[
        "decompress".as_ref(),
        out.as_os_str(),
        "--out".as_ref(),
        dense.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shard = shard_of(&dense, "model.layers.0.mlp.up_proj.weight");
    let bytes = std::fs::read(shard).expect("dense shard");
    let st = SafeTensors::deserialize(&bytes).expect("parse");
    let w = st
        .tensor("model.layers.0.mlp.up_proj.weight")
        .expect("weight");
    assert_eq!(w.shape(), &[8, 16]);
    assert_eq!(w.dtype(), Dtype::F32);
}
