//! Writes a synthetic Llama-shaped bf16 checkpoint of any size, streaming, for benchmarks:
//! `synth-llama OUT_DIR [vocab=131072] [hidden=4096] [intermediate=11008] [layers=2]
//! [heads=32] [kv_heads=8]`. Weights are seeded pseudo-random values in [-0.05, 0.05); the
//! same arguments always give the same bytes.

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use shardpress_engine::safetensors::{ShardWriter, TensorSpec};
use shardpress_engine::DType;

/// Elements generated per write.
const CHUNK: u64 = 1 << 20;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("synth-llama: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: synth-llama OUT_DIR [key=value ...]")?,
    );
    let mut dims = [
        ("vocab", 131_072u64),
        ("hidden", 4096),
        ("intermediate", 11_008),
        ("layers", 2),
        ("heads", 32),
        ("kv_heads", 8),
    ];
    for a in args {
        let (k, v) = a
            .split_once('=')
            .ok_or(format!("{a:?}: expected key=value"))?;
        let slot = dims
            .iter_mut()
            .find(|(name, _)| *name == k)
            .ok_or(format!("unknown key {k:?}"))?;
        slot.1 = v.parse().map_err(|e| format!("{k}: {e}"))?;
    }
    let get = |k: &str| dims.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
    let (vocab, hidden, inter, layers, heads, kv) = (
        get("vocab"),
        get("hidden"),
        get("intermediate"),
        get("layers"),
        get("heads"),
        get("kv_heads"),
    );
    if heads == 0 || hidden % heads != 0 {
        return Err("hidden must be a multiple of heads".into());
    }
    let head_dim = hidden / heads;
    let mut specs = vec![
        TensorSpec::new(
            "model.embed_tokens.weight",
            DType::BF16,
            vec![vocab, hidden],
        ),
        TensorSpec::new("model.norm.weight", DType::BF16, vec![hidden]),
    ];
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        specs.extend([
            TensorSpec::new(p("input_layernorm.weight"), DType::BF16, vec![hidden]),
            TensorSpec::new(p("mlp.down_proj.weight"), DType::BF16, vec![hidden, inter]),
            TensorSpec::new(p("mlp.gate_proj.weight"), DType::BF16, vec![inter, hidden]),
            TensorSpec::new(p("mlp.up_proj.weight"), DType::BF16, vec![inter, hidden]),
            TensorSpec::new(
                p("post_attention_layernorm.weight"),
                DType::BF16,
                vec![hidden],
            ),
            TensorSpec::new(
                p("self_attn.k_proj.weight"),
                DType::BF16,
                vec![kv * head_dim, hidden],
            ),
            TensorSpec::new(
                p("self_attn.o_proj.weight"),
                DType::BF16,
                vec![hidden, hidden],
            ),
            TensorSpec::new(
                p("self_attn.q_proj.weight"),
                DType::BF16,
                vec![hidden, hidden],
            ),
            TensorSpec::new(
                p("self_attn.v_proj.weight"),
                DType::BF16,
                vec![kv * head_dim, hidden],
            ),
        ]);
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let path = out.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    let mut w = ShardWriter::new(
        BufWriter::with_capacity(1 << 20, file),
        specs.clone(),
        &meta,
    )
    .map_err(|e| e.to_string())?;
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut buf = Vec::with_capacity((CHUNK * 2) as usize);
    for s in &specs {
        let norm = s.name.contains("norm");
        let mut left: u64 = s.shape.iter().product();
        while left > 0 {
            let n = left.min(CHUNK);
            buf.clear();
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let v = if norm {
                    1.0
                } else {
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                };
                let bits = (v.to_bits() >> 16) as u16;
                buf.extend_from_slice(&bits.to_le_bytes());
            }
            w.write_chunk(&s.name, &buf).map_err(|e| e.to_string())?;
            left -= n;
        }
    }
    w.finish().map_err(|e| e.to_string())?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(out.join("config.json"), config.to_string())
        .map_err(|e| format!("config.json: {e}"))?;
    println!("{}", path.display());
    Ok(())
}
