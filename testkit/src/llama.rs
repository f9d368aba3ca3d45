//! A tiny Llama-shaped checkpoint (grouped-query attention, SwiGLU MLP) for structured
//! pruning tests.

use std::path::Path;

use serde_json::json;
use shardpress_engine::safetensors::TensorSpec;
use shardpress_engine::DType;

use crate::write_f32_checkpoint;

/// `hidden_size`.
pub const HIDDEN: u64 = 32;
/// `num_attention_heads`.
pub const HEADS: u64 = 4;
/// `num_key_value_heads`.
pub const KV_HEADS: u64 = 2;
/// `head_dim`.
pub const HEAD_DIM: u64 = 8;
/// `intermediate_size`.
pub const INTERMEDIATE: u64 = 24;
/// `num_hidden_layers`.
pub const LAYERS: u64 = 3;
/// `vocab_size`.
pub const VOCAB: u64 = 50;

/// Sizes of a generated Llama-shaped checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// `hidden_size`.
    pub hidden: u64,
    /// `num_attention_heads`.
    pub heads: u64,
    /// `num_key_value_heads`.
    pub kv_heads: u64,
    /// `head_dim`.
    pub head_dim: u64,
    /// `intermediate_size`.
    pub intermediate: u64,
    /// `num_hidden_layers`.
    pub layers: u64,
    /// `vocab_size`.
    pub vocab: u64,
}

/// The tiny default: 3 layers, hidden size 32.
pub const TINY: Dims = Dims {
    hidden: HIDDEN,
    heads: HEADS,
    kv_heads: KV_HEADS,
    head_dim: HEAD_DIM,
    intermediate: INTERMEDIATE,
    layers: LAYERS,
    vocab: VOCAB,
};

/// Writes `dir/model.safetensors` and `dir/config.json`: a 3-layer Llama-shaped checkpoint
/// with grouped-query attention, seeded weights.
pub fn write_llama_checkpoint(dir: &Path) {
    write_llama(dir, &TINY);
}

/// Writes a Llama-shaped F32 checkpoint of the given sizes with seeded weights, and its
/// `config.json`.
pub fn write_llama(dir: &Path, d: &Dims) {
    let (hidden, heads, kv_heads, head_dim, intermediate) =
        (d.hidden, d.heads, d.kv_heads, d.head_dim, d.intermediate);
    let mut specs = vec![
        TensorSpec::new("lm_head.weight", DType::F32, vec![d.vocab, hidden]),
        TensorSpec::new(
            "model.embed_tokens.weight",
            DType::F32,
            vec![d.vocab, hidden],
        ),
        TensorSpec::new("model.norm.weight", DType::F32, vec![hidden]),
    ];
    for l in 0..d.layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        specs.extend([
            TensorSpec::new(p("input_layernorm.weight"), DType::F32, vec![hidden]),
            TensorSpec::new(
                p("mlp.down_proj.weight"),
                DType::F32,
                vec![hidden, intermediate],
            ),
            TensorSpec::new(
                p("mlp.gate_proj.weight"),
                DType::F32,
                vec![intermediate, hidden],
            ),
            TensorSpec::new(
                p("mlp.up_proj.weight"),
                DType::F32,
                vec![intermediate, hidden],
            ),
            TensorSpec::new(
                p("post_attention_layernorm.weight"),
                DType::F32,
                vec![hidden],
            ),
            TensorSpec::new(
                p("self_attn.k_proj.weight"),
                DType::F32,
                vec![kv_heads * head_dim, hidden],
            ),
            TensorSpec::new(
                p("self_attn.o_proj.weight"),
                DType::F32,
                vec![hidden, heads * head_dim],
            ),
            TensorSpec::new(
                p("self_attn.q_proj.weight"),
                DType::F32,
                vec![heads * head_dim, hidden],
            ),
            TensorSpec::new(
                p("self_attn.v_proj.weight"),
                DType::F32,
                vec![kv_heads * head_dim, hidden],
            ),
        ]);
    }
    write_f32_checkpoint(dir, &specs);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": d.layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": d.vocab,
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string())
        .unwrap_or_else(|e| panic!("cannot write config.json: {e}"));
}
