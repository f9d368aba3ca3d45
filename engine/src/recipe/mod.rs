//! Recipes: ordered rules that map tensor names to actions, plus an ignore list.
//!
//! A recipe is a TOML document (see `presets/` for examples). Each tensor takes the action of
//! the first rule whose `targets` match its name; tensors matching `ignore`, 1-D tensors (when
//! `ignore_1d`), non-float tensors and tensors no rule matches are copied byte for byte.

mod pattern;
mod presets;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::kernels::int_quant::{IntParams, Strategy};
use crate::safetensors::TensorInfo;

pub use pattern::Pattern;
pub use presets::{preset, preset_names, PRESETS};

/// Name patterns ignored when a recipe does not give its own `ignore` list: norms, biases,
/// embeddings and the output head, as quantization tools conventionally leave them.
pub const DEFAULT_IGNORE: [&str; 4] = [
    "re:(?i).*norm.*",
    "*.bias",
    "re:(?i).*(embed|wte|wpe).*",
    "re:(.*\\.)?lm_head(\\..*)?",
];

/// A recipe that cannot be used, with the place in it that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("recipe {origin}: {problem}")]
pub struct RecipeError {
    /// File name or preset name.
    pub origin: String,
    /// What is wrong, and where.
    pub problem: String,
}

/// The recipe file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Short name, recorded in the output.
    #[serde(default)]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Patterns of tensors left untouched; defaults to [`DEFAULT_IGNORE`].
    #[serde(default)]
    pub ignore: Option<Vec<String>>,
    /// Leave 1-D tensors untouched (default true).
    #[serde(default)]
    pub ignore_1d: Option<bool>,
    /// Ordered rules.
    #[serde(default)]
    pub rules: Vec<RuleFile>,
}

/// One rule as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Name patterns this rule applies to.
    pub targets: Vec<String>,
    /// `keep`, `cast` or `quantize`.
    pub action: String,
    /// Target dtype of `cast`: `bf16`, `f16` or `f32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Bit width of `quantize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// Symmetric quantization (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric: Option<bool>,
    /// `tensor`, `channel` (default) or `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// Columns per group with `strategy = "group"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u64>,
    /// `auto` (the tensor's own float type), `f32`, `f16` or `bf16`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_dtype: Option<String>,
    /// Range observer: `minmax`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observer: Option<String>,
}

/// Quantization settings of a rule, before the tensor's dtype fixes the scale dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantRule {
    /// Bit width.
    pub bits: u8,
    /// Symmetric or not.
    pub symmetric: bool,
    /// Parameter sharing.
    pub strategy: Strategy,
    /// Fixed scale dtype, or `None` for the tensor's own float type.
    pub scale_dtype: Option<DType>,
}

impl QuantRule {
    /// Parameters for a tensor stored as `dtype`.
    pub fn params_for(&self, dtype: DType) -> IntParams {
        let scale_dtype = self.scale_dtype.unwrap_or(match dtype {
            DType::BF16 => DType::BF16,
            DType::F16 => DType::F16,
            _ => DType::F32,
        });
        IntParams {
            bits: self.bits,
            symmetric: self.symmetric,
            strategy: self.strategy,
            scale_dtype,
        }
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    /// Copy bytes unchanged.
    Keep,
    /// Convert float elements.
    Cast(DType),
    /// Integer weight quantization.
    Quantize(QuantRule),
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Patterns.
    pub targets: Vec<Pattern>,
    /// Action.
    pub action: RuleAction,
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Name recorded in outputs.
    pub name: String,
    /// The recipe as written, for reports.
    pub source: RecipeFile,
    /// Ignore patterns in force.
    pub ignore: Vec<Pattern>,
    /// Whether 1-D tensors are left alone.
    pub ignore_1d: bool,
    /// Ordered rules.
    pub rules: Vec<Rule>,
}

/// Why a tensor is copied unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    /// Its dtype is not a float type the engine transforms.
    NotFloat,
    /// It matches the ignore list.
    Ignored,
    /// It is 1-D and `ignore_1d` is set.
    OneDimensional,
    /// No rule matches it.
    NoRule,
    /// A `keep` rule matches it.
    KeepRule,
    /// A quantize rule matches but the tensor is not a 2-D `.weight` matrix.
    NotAMatrix,
    /// It has no elements.
    Empty,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeepReason::NotFloat => "not a float dtype",
            KeepReason::Ignored => "ignored",
            KeepReason::OneDimensional => "1-D",
            KeepReason::NoRule => "no rule",
            KeepReason::KeepRule => "keep rule",
            KeepReason::NotAMatrix => "not a 2-D .weight",
            KeepReason::Empty => "empty",
        })
    }
}

/// What happens to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorAction {
    /// Bytes copied unchanged.
    Keep(KeepReason),
    /// Float elements converted to this dtype.
    Cast(DType),
    /// Quantized to packed integers.
    Quantize(IntParams),
}

impl Recipe {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, RecipeError> {
        let file: RecipeFile = toml::from_str(text).map_err(|e| RecipeError {
            origin: origin.to_string(),
            problem: e.to_string().trim_end().replace('\n', " "),
        })?;
        Self::from_file(file, origin)
    }

    /// Loads a preset by name, or else a TOML file at that path.
    pub fn load(spec: &str) -> Result<Self, RecipeError> {
        if let Some(text) = preset(spec) {
            return Self::from_toml(text, &format!("preset {spec:?}"));
        }
        let path = std::path::Path::new(spec);
        if !path.exists() {
            return Err(RecipeError {
                origin: format!("{spec:?}"),
                problem: format!(
                    "not a preset ({}) and no such file",
                    preset_names().join(", ")
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError {
            origin: spec.to_string(),
            problem: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, spec)
    }

    /// Validates a parsed recipe.
    pub fn from_file(file: RecipeFile, origin: &str) -> Result<Self, RecipeError> {
        let err = |problem: String| RecipeError {
            origin: origin.to_string(),
            problem,
        };
        let ignore_src: Vec<String> = match &file.ignore {
            Some(list) => list.clone(),
            None => DEFAULT_IGNORE.iter().map(|s| s.to_string()).collect(),
        };
        let ignore = ignore_src
            .iter()
            .map(|p| Pattern::parse(p).map_err(|e| err(format!("ignore: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if file.rules.is_empty() {
            return Err(err("no [[rules]]: a recipe needs at least one rule".into()));
        }
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.iter().enumerate() {
            let at = |problem: String| err(format!("rule {} ({:?}): {problem}", i + 1, r.targets));
            if r.targets.is_empty() {
                return Err(at("targets is empty".into()));
            }
            let targets = r
                .targets
                .iter()
                .map(|p| Pattern::parse(p).map_err(&at))
                .collect::<Result<Vec<_>, _>>()?;
            let action = parse_action(r).map_err(at)?;
            rules.push(Rule { targets, action });
        }
        Ok(Self {
            name: file.name.clone().unwrap_or_else(|| origin.to_string()),
            ignore,
            ignore_1d: file.ignore_1d.unwrap_or(true),
            rules,
            source: file,
        })
    }

    /// Decides what happens to `t`.
    pub fn resolve(&self, t: &TensorInfo) -> TensorAction {
        if !t.dtype.is_transformable_float() {
            return TensorAction::Keep(KeepReason::NotFloat);
        }
        if self.ignore.iter().any(|p| p.matches(&t.name)) {
            return TensorAction::Keep(KeepReason::Ignored);
        }
        if self.ignore_1d && t.shape.len() <= 1 {
            return TensorAction::Keep(KeepReason::OneDimensional);
        }
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.targets.iter().any(|p| p.matches(&t.name)))
        else {
            return TensorAction::Keep(KeepReason::NoRule);
        };
        if t.numel() == 0 {
            return TensorAction::Keep(KeepReason::Empty);
        }
        match rule.action {
            RuleAction::Keep => TensorAction::Keep(KeepReason::KeepRule),
            RuleAction::Cast(d) if d == t.dtype => TensorAction::Keep(KeepReason::KeepRule),
            RuleAction::Cast(d) => TensorAction::Cast(d),
            RuleAction::Quantize(q) => {
                if t.shape.len() != 2 || !t.name.ends_with(".weight") {
                    TensorAction::Keep(KeepReason::NotAMatrix)
                } else {
                    TensorAction::Quantize(q.params_for(t.dtype))
                }
            }
        }
    }
}

fn parse_action(r: &RuleFile) -> Result<RuleAction, String> {
    let unused = |field: &str, present: bool| {
        if present {
            Err(format!("{field} does not apply to action {:?}", r.action))
        } else {
            Ok(())
        }
    };
    let quant_fields = r.bits.is_some()
        || r.symmetric.is_some()
        || r.strategy.is_some()
        || r.group_size.is_some()
        || r.scale_dtype.is_some()
        || r.observer.is_some();
    match r.action.as_str() {
        "keep" => {
            unused("dtype", r.dtype.is_some())?;
            unused("quantization settings", quant_fields)?;
            Ok(RuleAction::Keep)
        }
        "cast" => {
            unused("quantization settings", quant_fields)?;
            let d = r
                .dtype
                .as_deref()
                .ok_or("cast needs dtype = \"bf16\", \"f16\" or \"f32\"")?;
            Ok(RuleAction::Cast(parse_float_dtype(d)?))
        }
        "quantize" => {
            unused("dtype", r.dtype.is_some())?;
            let bits = r.bits.ok_or("quantize needs bits (2, 4 or 8)")?;
            if ![2, 4, 8].contains(&bits) {
                return Err(format!("bits must be 2, 4 or 8, got {bits}"));
            }
            let strategy = match (r.strategy.as_deref().unwrap_or("channel"), r.group_size) {
                ("tensor", None) => Strategy::Tensor,
                ("channel", None) => Strategy::Channel,
                ("group", Some(0)) => return Err("group_size must be at least 1, got 0".into()),
                ("group", Some(g)) => Strategy::Group(g),
                ("group", None) => return Err("strategy \"group\" needs group_size".into()),
                ("tensor" | "channel", Some(_)) => {
                    return Err("group_size needs strategy = \"group\"".into())
                }
                (other, _) => {
                    return Err(format!(
                        "unknown strategy {other:?} (tensor, channel or group)"
                    ))
                }
            };
            let scale_dtype = match r.scale_dtype.as_deref() {
                None | Some("auto") => None,
                Some(d) => Some(parse_float_dtype(d)?),
            };
            match r.observer.as_deref() {
                None | Some("minmax") => {}
                Some(o) => return Err(format!("unknown observer {o:?} (minmax)")),
            }
            Ok(RuleAction::Quantize(QuantRule {
                bits,
                symmetric: r.symmetric.unwrap_or(true),
                strategy,
                scale_dtype,
            }))
        }
        other => Err(format!("unknown action {other:?} (keep, cast or quantize)")),
    }
}

fn parse_float_dtype(d: &str) -> Result<DType, String> {
    match d.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        _ => Err(format!("unknown float dtype {d:?} (bf16, f16 or f32)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, dtype: DType, shape: Vec<u64>) -> TensorInfo {
        let end = dtype.byte_size(shape.iter().product()).unwrap_or(0);
        TensorInfo {
            name: name.into(),
            dtype,
            shape,
            start: 0,
            end,
        }
    }

    #[test]
    fn presets_parse_and_resolve() {
        for name in preset_names() {
            Recipe::load(name).expect(name);
        }
        let r = Recipe::load("w8a16").expect("preset");
        let q = r.resolve(&info(
            "encoder.layer.0.attention.self.query.weight",
            DType::F32,
            vec![4, 8],
        ));
        assert!(
            matches!(q, TensorAction::Quantize(p) if p.bits == 8 && p.scale_dtype == DType::F32)
        );
        let bf = r.resolve(&info(
            "model.layers.0.mlp.up_proj.weight",
            DType::BF16,
            vec![4, 8],
        ));
        assert!(matches!(bf, TensorAction::Quantize(p) if p.scale_dtype == DType::BF16));
        for (name, reason) in [
            (
                "encoder.layer.0.attention.output.LayerNorm.weight",
                KeepReason::Ignored,
            ),
            ("embeddings.word_embeddings.weight", KeepReason::Ignored),
            ("lm_head.weight", KeepReason::Ignored),
            ("encoder.layer.0.output.dense.bias", KeepReason::Ignored),
        ] {
            assert_eq!(
                r.resolve(&info(name, DType::F32, vec![4, 8])),
                TensorAction::Keep(reason),
                "{name}"
            );
        }
        assert_eq!(
            r.resolve(&info("embeddings.position_ids", DType::I64, vec![1, 8])),
            TensorAction::Keep(KeepReason::NotFloat)
        );
        let cast = Recipe::load("bf16").expect("preset");
        assert_eq!(
            cast.resolve(&info("x.LayerNorm.bias", DType::F32, vec![8])),
            TensorAction::Cast(DType::BF16)
        );
    }

    #[test]
    fn bad_recipes_name_the_problem() {
        let cases = [
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=9\n", "rule 1 ([\"*\"]): bits must be 2, 4 or 8, got 9"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nstrategy=\"group\"\ngroup_size=0\n", "group_size must be at least 1"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"prune-ish\"\n", "unknown action \"prune-ish\""),
            ("[[rules]]\ntargets=[\"re:(\"]\naction=\"keep\"\n", "invalid regex"),
            ("name=\"x\"\n", "needs at least one rule"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"keep\"\nbitz=3\n", "unknown field `bitz`"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"cast\"\ndtype=\"int3\"\n", "unknown float dtype"),
        ];
        for (text, want) in cases {
            let e = Recipe::from_toml(text, "test.toml").expect_err(text);
            assert!(e.to_string().contains(want), "{e} should contain {want}");
            assert!(e.to_string().starts_with("recipe test.toml: "), "{e}");
        }
        let missing = Recipe::load("no-such-preset").expect_err("missing");
        assert!(
            missing.to_string().contains("not a preset (bf16"),
            "{missing}"
        );
    }

    #[test]
    fn rule_order_and_custom_ignore() {
        let r = Recipe::from_toml(
            "ignore = []\n[[rules]]\ntargets=[\"re:.*\\\\.0\\\\..*\"]\naction=\"keep\"\n[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nstrategy=\"group\"\ngroup_size=32\n",
            "t",
        )
        .expect("valid");
        assert_eq!(
            r.resolve(&info("l.0.w.weight", DType::F16, vec![2, 2])),
            TensorAction::Keep(KeepReason::KeepRule)
        );
        assert!(matches!(
            r.resolve(&info("embed.weight", DType::F16, vec![2, 2])),
            TensorAction::Quantize(p) if p.strategy == Strategy::Group(32)
        ));
        assert_eq!(
            r.resolve(&info("l.1.norm", DType::F16, vec![2])),
            TensorAction::Keep(KeepReason::OneDimensional)
        );
    }
}
