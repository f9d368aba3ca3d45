//! A corpus of broken checkpoints and recipes, and of valid edge cases, built byte by byte.
//!
//! Each [`Case`] is a set of files relative to a checkpoint root plus the recipe to run, so the
//! same corpus can be written to a local directory or uploaded to an object store prefix. A
//! malformed case lists the fragments its error must contain: the file (relative name, which
//! every error message includes as the end of its path or object key), the tensor where there
//! is one, and the offset or range where there is one.

use serde_json::{json, Value};

/// A checkpoint (files relative to its root) and the recipe to run on it.
#[derive(Debug, Clone)]
pub struct Case {
    /// Short name, also usable as a directory or key prefix.
    pub name: &'static str,
    /// Files of the checkpoint: relative name and bytes.
    pub files: Vec<(String, Vec<u8>)>,
    /// A preset name, or the text of a recipe file when it starts with `[` or contains `=`.
    pub recipe: String,
    /// Fragments the error must contain (empty for a valid case).
    pub needles: Vec<String>,
}

impl Case {
    fn new(
        name: &'static str,
        files: Vec<(&str, Vec<u8>)>,
        recipe: &str,
        needles: &[&str],
    ) -> Self {
        Self {
            name,
            files: files.into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
            recipe: recipe.to_string(),
            needles: needles.iter().map(|n| n.to_string()).collect(),
        }
    }

    /// Whether [`Case::recipe`] is recipe text rather than a preset name.
    pub fn recipe_is_text(&self) -> bool {
        self.recipe.contains('=') || self.recipe.starts_with('[')
    }
}

/// The 8-byte little-endian header length, the header text, then the data section.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A tensor of a well-formed file: name, dtype name, shape and raw bytes.
#[derive(Debug, Clone)]
pub struct T {
    /// Tensor name.
    pub name: &'static str,
    /// Safetensors dtype name.
    pub dtype: &'static str,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Raw little-endian bytes.
    pub data: Vec<u8>,
}

/// Shorthand for a [`T`].
pub fn t(name: &'static str, dtype: &'static str, shape: &[u64], data: Vec<u8>) -> T {
    T {
        name,
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

/// Little-endian bytes of `values`.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `n` distinct, non-zero f32 values derived from `seed`.
pub fn f32_ramp(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.37 + seed).sin() + 0.01) * 2.0)
        .collect()
}

/// The header JSON of `tensors` laid out back to back, without padding.
pub fn header_json(tensors: &[T]) -> String {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!({ "format": "pt" }));
    let mut offset = 0usize;
    for x in tensors {
        let end = offset + x.data.len();
        map.insert(
            x.name.into(),
            json!({ "dtype": x.dtype, "shape": x.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    Value::Object(map).to_string()
}

/// A well-formed safetensors file; `pad` spaces follow the header JSON.
pub fn st_file_padded(tensors: &[T], pad: usize) -> Vec<u8> {
    let header = header_json(tensors) + &" ".repeat(pad);
    let data: Vec<u8> = tensors.iter().flat_map(|x| x.data.clone()).collect();
    raw_file(&header, &data)
}

/// A well-formed safetensors file without padding.
pub fn st_file(tensors: &[T]) -> Vec<u8> {
    st_file_padded(tensors, 0)
}

/// A `model.safetensors.index.json` mapping tensors to shard files.
pub fn index_json(entries: &[(&str, &str)]) -> Vec<u8> {
    let map: serde_json::Map<String, Value> = entries
        .iter()
        .map(|(t, f)| (t.to_string(), json!(f)))
        .collect();
    json!({ "metadata": { "total_size": 0 }, "weight_map": map })
        .to_string()
        .into_bytes()
}

/// A query projection of layer 0.
pub const Q: &str = "model.layers.0.self_attn.q_proj.weight";
/// An MLP projection of layer 0.
pub const UP: &str = "model.layers.0.mlp.up_proj.weight";
/// A norm of layer 0.
pub const NORM: &str = "model.layers.0.input_layernorm.weight";
/// The token embedding.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The output head.
pub const HEAD: &str = "lm_head.weight";
/// First of two shards.
pub const SHARD1: &str = "model-00001-of-00002.safetensors";
/// Second of two shards.
pub const SHARD2: &str = "model-00002-of-00002.safetensors";
/// The single-file checkpoint name.
pub const SINGLE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";

/// A small valid model: one quantizable 4×8 weight and a 1-D norm.
pub fn small_model() -> Vec<T> {
    vec![
        t(Q, "F32", &[4, 8], f32_bytes(&f32_ramp(32, 0.0))),
        t(NORM, "F32", &[8], f32_bytes(&[1.0; 8])),
    ]
}

fn quoted(name: &str) -> String {
    format!("{name:?}")
}

fn one_file(name: &'static str, bytes: Vec<u8>, needles: &[&str]) -> Case {
    let mut all = vec![SINGLE];
    all.extend_from_slice(needles);
    Case::new(name, vec![(SINGLE, bytes)], "w8a16", &all)
}

fn two_shards(
    name: &'static str,
    second: Vec<u8>,
    index: &[(&str, &str)],
    needles: &[&str],
) -> Case {
    Case::new(
        name,
        vec![
            (SHARD1, st_file(&small_model())),
            (SHARD2, second),
            (INDEX, index_json(index)),
        ],
        "w8a16",
        needles,
    )
}

/// Broken checkpoints: each must be refused with an error naming what and where.
pub fn malformed_checkpoints() -> Vec<Case> {
    let (q, up, norm) = (quoted(Q), quoted(UP), quoted(NORM));
    let mut lfs = b"version https://git-lfs.github.com/spec/v1\n".to_vec();
    lfs.extend_from_slice(
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n",
    );
    let mut nan = f32_ramp(32, 0.0);
    nan[8 + 5] = f32::NAN;
    let mut inf_bf16: Vec<u8> = f32_ramp(16, 0.5)
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    inf_bf16[2 * 11..2 * 11 + 2].copy_from_slice(&0x7f80u16.to_le_bytes());
    let head = || st_file(&[t(HEAD, "F32", &[2, 2], f32_bytes(&[1.0; 4]))]);
    vec![
        one_file(
            "truncated-data",
            raw_file(
                &format!(r#"{{"{Q}":{{"dtype":"F32","shape":[4,8],"data_offsets":[0,128]}}}}"#),
                &[0u8; 100],
            ),
            &[&q, "truncated"],
        ),
        one_file(
            "header-length-past-eof",
            {
                let mut b = 500u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{\"a\":{}}");
                b
            },
            &["past the end"],
        ),
        one_file(
            "huge-header-length",
            {
                let mut b = (1u64 << 40).to_le_bytes().to_vec();
                b.extend_from_slice(&[b' '; 64]);
                b
            },
            &["1099511627776"],
        ),
        one_file("shorter-than-prefix", vec![1, 0, 0, 0, 0], &["5 bytes"]),
        one_file("empty-file", vec![], &["0 bytes"]),
        one_file(
            "invalid-json",
            raw_file(r#"{"a":{"dtype":"F32","shape":[1],"#, &[0; 4]),
            &["JSON"],
        ),
        one_file(
            "overlapping-offsets",
            raw_file(
                &format!(
                    r#"{{"{Q}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}},"{UP}":{{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}}}"#
                ),
                &[0; 24],
            ),
            &[&q, &up, "overlap"],
        ),
        one_file(
            "hole-between-tensors",
            raw_file(
                &format!(
                    r#"{{"{Q}":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}},"{UP}":{{"dtype":"F32","shape":[2,2],"data_offsets":[20,36]}}}}"#
                ),
                &[0; 36],
            ),
            &[&up, "hole", "16..20"],
        ),
        one_file(
            "wrong-byte-size",
            raw_file(
                &format!(r#"{{"{Q}":{{"dtype":"BF16","shape":[2,3],"data_offsets":[0,16]}}}}"#),
                &[0; 16],
            ),
            &[&q, "needs 12"],
        ),
        one_file(
            "unknown-dtype",
            raw_file(
                &format!(r#"{{"{Q}":{{"dtype":"Q4_K","shape":[2,2],"data_offsets":[0,16]}}}}"#),
                &[0; 16],
            ),
            &[&q, "Q4_K"],
        ),
        one_file(
            "duplicate-name",
            raw_file(
                &format!(
                    r#"{{"{Q}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}},"{Q}":{{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}}}"#
                ),
                &[0; 8],
            ),
            &[&q, "twice"],
        ),
        one_file("lfs-pointer", lfs, &["Git LFS"]),
        one_file(
            "nan-weight",
            st_file(&[
                t(Q, "F32", &[4, 8], f32_bytes(&nan)),
                t(NORM, "F32", &[8], f32_bytes(&[1.0; 8])),
            ]),
            &[&q, "row 1", "column 5"],
        ),
        two_shards(
            "inf-weight-second-shard",
            st_file(&[t(UP, "BF16", &[4, 4], inf_bf16)]),
            &[(Q, SHARD1), (NORM, SHARD1), (UP, SHARD2)],
            &[SHARD2, &up, "row 2", "column 3"],
        ),
        Case::new(
            "index-names-missing-shard",
            vec![
                (SHARD1, st_file(&small_model())),
                (
                    INDEX,
                    index_json(&[(Q, SHARD1), (NORM, SHARD1), (UP, SHARD2)]),
                ),
            ],
            "w8a16",
            &[INDEX, SHARD2],
        ),
        two_shards(
            "index-names-missing-tensor",
            head(),
            &[(Q, SHARD1), (NORM, SHARD1), (UP, SHARD2), (HEAD, SHARD2)],
            &[INDEX, &up, SHARD2],
        ),
        two_shards(
            "index-omits-a-tensor",
            head(),
            &[(Q, SHARD1), (HEAD, SHARD2)],
            &[INDEX, &norm],
        ),
        two_shards(
            "index-path-traversal",
            head(),
            &[(Q, SHARD1), (NORM, SHARD1), (HEAD, "../x.safetensors")],
            &[INDEX, "../x.safetensors"],
        ),
        Case::new(
            "index-not-json",
            vec![
                (SHARD1, st_file(&small_model())),
                (INDEX, b"{\"weight_map\": {".to_vec()),
            ],
            "w8a16",
            &[INDEX, "JSON"],
        ),
        two_shards(
            "broken-second-shard",
            raw_file("{", &[]),
            &[(Q, SHARD1), (NORM, SHARD1), (UP, SHARD2)],
            &[SHARD2],
        ),
    ]
}

/// Broken recipes for [`small_model`]: recipe text and the fragment its error must contain.
pub fn malformed_recipes() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 9\n",
            "bits must be 2 to 8, got 9",
        ),
        (
            // Q has 8 columns: 3:7 pruning cannot tile them.
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"prune\"\nprune = \"3:7\"\n",
            "needs a column count divisible by 7",
        ),
        (
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"prune\"\nprune = \"magnitude\"\nsparsity = -0.5\n",
            "sparsity must be at least 0 and below 1, got -0.5",
        ),
        (
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 4\nstrategy = \"group\"\ngroup_size = 0\n",
            "group_size must be at least 1",
        ),
        (
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"sparsify\"\n",
            "unknown action \"sparsify\"",
        ),
        ("[[rules]\n", "recipe"),
    ]
}

/// Valid but unusual checkpoints that must compress correctly.
pub fn valid_edge_cases() -> Vec<Case> {
    let ids: Vec<u8> = [7i64, -1, i64::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let odd = vec![
        t(Q, "F32", &[2, 8], f32_bytes(&f32_ramp(16, 1.0))),
        t(NORM, "F32", &[8], f32_bytes(&f32_ramp(8, 9.0))),
        t("model.layers.0.attn.ids", "U8", &[3], vec![1, 2, 3]),
    ];
    let first = vec![
        t(EMBED, "F32", &[6, 8], f32_bytes(&f32_ramp(48, 3.1))),
        t(Q, "F32", &[4, 8], f32_bytes(&f32_ramp(32, 0.7))),
    ];
    let second = vec![
        t(NORM, "F32", &[8], f32_bytes(&f32_ramp(8, 0.2))),
        t(UP, "F32", &[6, 8], f32_bytes(&f32_ramp(48, 1.9))),
        t("model.norm.weight", "F32", &[8], f32_bytes(&[1.0; 8])),
    ];
    let entries: Vec<(&str, &str)> = first
        .iter()
        .map(|x| (x.name, SHARD1))
        .chain(second.iter().map(|x| (x.name, SHARD2)))
        .collect();
    vec![
        Case::new(
            "scalar-zero-sized-integer",
            vec![(
                SINGLE,
                st_file(&[
                    t("model.layers.0.attn.scale", "F32", &[], f32_bytes(&[0.125])),
                    t("model.layers.0.attn.empty.weight", "F32", &[0, 4], vec![]),
                    t("model.layers.0.mlp.gate.weight", "BF16", &[4, 0], vec![]),
                    t("model.layers.0.attn.position_ids", "I64", &[1, 3], ids),
                    t("model.layers.0.attn.flag", "BOOL", &[], vec![1]),
                    t(Q, "F32", &[3, 8], f32_bytes(&f32_ramp(24, 0.3))),
                ]),
            )],
            "w8a16",
            &[],
        ),
        // 3 spaces after the JSON put the data section at an offset that is not 8-aligned.
        Case::new(
            "space-padded-odd-offset",
            vec![(SINGLE, st_file_padded(&odd, 3))],
            "w4a16",
            &[],
        ),
        // Tied embeddings: no lm_head tensor, the config says the head reuses the embedding.
        Case::new(
            "tied-embeddings-sharded",
            vec![
                (SHARD1, st_file(&first)),
                (SHARD2, st_file(&second)),
                (INDEX, index_json(&entries)),
                (
                    "config.json",
                    br#"{"model_type": "llama", "tie_word_embeddings": true, "hidden_size": 8}"#
                        .to_vec(),
                ),
                ("tokenizer.json", b"{\"version\": \"1.0\"}".to_vec()),
            ],
            "w8a16",
            &[],
        ),
    ]
}
