//! Splitting a checkpoint into layer groups: the unit of work and of output shards.
//!
//! Tensors of one transformer block (`model.layers.N.`, `encoder.layer.N.`, `transformer.h.N.`,
//! `blocks.N.`, …) form one group whichever input shard they live in; embeddings, the head and
//! everything else (final norm, pooler) form their own groups.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

/// The role of a group, which also orders the output shards.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum GroupKind {
    /// Token and position embeddings.
    Embeddings,
    /// One numbered block of a stack such as `model.layers`.
    Layer {
        /// Name prefix of the stack, e.g. `model.layers`.
        stack: String,
        /// Block number.
        index: u64,
    },
    /// Everything else: final norms, poolers, buffers.
    Other,
    /// Output head (`lm_head`, classifiers).
    Head,
}

/// A set of tensors processed together and written as one output shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// Stable key, e.g. `model.layers.3` or `embeddings`.
    pub key: String,
    /// Role and order.
    pub kind: GroupKind,
    /// Tensor names, sorted.
    pub tensors: Vec<String>,
}

fn layer_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        #[allow(clippy::unwrap_used)] // a constant pattern, covered by tests
        Regex::new(r"(?:^|\.)(layers|layer|h|blocks|block)\.(\d+)(?:\.|$)").unwrap()
    })
}

/// Classifies one tensor name.
pub fn classify(name: &str) -> GroupKind {
    if let Some(c) = layer_re().captures(name) {
        if let (Some(word), Some(num)) = (c.get(1), c.get(2)) {
            if let Ok(index) = num.as_str().parse::<u64>() {
                return GroupKind::Layer {
                    stack: name[..word.end()].to_string(),
                    index,
                };
            }
        }
    }
    let lower = name.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split('.').collect();
    if parts
        .iter()
        .any(|p| *p == "lm_head" || *p == "score" || *p == "classifier")
    {
        return GroupKind::Head;
    }
    if lower.contains("embed") || parts.iter().any(|p| *p == "wte" || *p == "wpe") {
        return GroupKind::Embeddings;
    }
    GroupKind::Other
}

/// Groups tensor names by layer, in output order.
pub fn group_tensors<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Group> {
    let mut by_kind: BTreeMap<GroupKind, Vec<String>> = BTreeMap::new();
    for n in names {
        by_kind.entry(classify(n)).or_default().push(n.to_string());
    }
    by_kind
        .into_iter()
        .map(|(kind, mut tensors)| {
            tensors.sort();
            let key = match &kind {
                GroupKind::Embeddings => "embeddings".to_string(),
                GroupKind::Layer { stack, index } => format!("{stack}.{index}"),
                GroupKind::Other => "other".to_string(),
                GroupKind::Head => "head".to_string(),
            };
            Group { key, kind, tensors }
        })
        .collect()
}

/// Output shard file name `model-0000i-of-0000n.safetensors` (1-based `i`).
pub fn shard_file_name(i: usize, n: usize) -> String {
    format!("model-{i:05}-of-{n:05}.safetensors")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_names_group_by_layer_in_numeric_order() {
        let names = [
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
        ];
        let g = group_tensors(names);
        let keys: Vec<&str> = g.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "embeddings",
                "model.layers.2",
                "model.layers.10",
                "other",
                "head"
            ]
        );
        assert_eq!(g[1].tensors.len(), 2);
    }

    #[test]
    fn other_architectures() {
        assert_eq!(
            classify("encoder.layer.5.attention.self.query.weight"),
            GroupKind::Layer {
                stack: "encoder.layer".into(),
                index: 5
            }
        );
        assert_eq!(
            classify("transformer.h.0.attn.c_attn.weight"),
            GroupKind::Layer {
                stack: "transformer.h".into(),
                index: 0
            }
        );
        assert_eq!(
            classify("blocks.7.norm1.weight"),
            GroupKind::Layer {
                stack: "blocks".into(),
                index: 7
            }
        );
        assert_eq!(classify("transformer.wte.weight"), GroupKind::Embeddings);
        assert_eq!(classify("embeddings.position_ids"), GroupKind::Embeddings);
        assert_eq!(classify("pooler.dense.weight"), GroupKind::Other);
        assert_eq!(classify("score.weight"), GroupKind::Head);
        assert_eq!(shard_file_name(3, 12), "model-00003-of-00012.safetensors");
    }
}
