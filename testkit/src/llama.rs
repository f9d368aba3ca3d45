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

/// Writes `dir/model.safetensors` and `dir/config.json`: a 3-layer Llama-shaped checkpoint
/// with grouped-query attention, seeded weights.
pub fn write_llama_checkpoint(dir: &Path) {
    let mut specs = vec![
        TensorSpec::new("lm_head.weight", DType::F32, vec![VOCAB, HIDDEN]),
        TensorSpec::new("model.embed_tokens.weight", DType::F32, vec![VOCAB, HIDDEN]),
        TensorSpec::new("model.norm.weight", DType::F32, vec![HIDDEN]),
    ];
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        specs.extend([
            TensorSpec::new(p("input_layernorm.weight"), DType::F32, vec![HIDDEN]),
            TensorSpec::new(
                p("mlp.down_proj.weight"),
                DType::F32,
                vec![HIDDEN, INTERMEDIATE],
            ),
            TensorSpec::new(
                p("mlp.gate_proj.weight"),
                DType::F32,
                vec![INTERMEDIATE, HIDDEN],
            ),
            TensorSpec::new(
                p("mlp.up_proj.weight"),
                DType::F32,
                vec![INTERMEDIATE, HIDDEN],
            ),
            TensorSpec::new(
                p("post_attention_layernorm.weight"),
                DType::F32,
                vec![HIDDEN],
            ),
            TensorSpec::new(
                p("self_attn.k_proj.weight"),
                DType::F32,
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
            ),
            TensorSpec::new(
                p("self_attn.o_proj.weight"),
                DType::F32,
                vec![HIDDEN, HEADS * HEAD_DIM],
            ),
            TensorSpec::new(
                p("self_attn.q_proj.weight"),
                DType::F32,
                vec![HEADS * HEAD_DIM, HIDDEN],
            ),
            TensorSpec::new(
                p("self_attn.v_proj.weight"),
                DType::F32,
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
            ),
        ]);
    }
    write_f32_checkpoint(dir, &specs);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": VOCAB,
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string())
        .unwrap_or_else(|e| panic!("cannot write config.json: {e}"));
}
