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
use crate::kernels::fp8::{FloatParams, Fp8Format};
use crate::kernels::int_quant::{IntParams, Observer, Strategy, MAX_BITS, MIN_BITS};
use crate::kernels::prune::{PruneMethod, PruneScope};
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
    /// Structured pruning of whole neurons, heads and layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<StructuredFile>,
}

/// The `[structured]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredFile {
    /// Fraction of MLP neurons removed from every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_ratio: Option<f64>,
    /// Fraction of attention heads removed from every layer, in whole key/value groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_ratio: Option<f64>,
    /// Layer indices removed from the model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop_layers: Vec<u64>,
}

/// One rule as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Name patterns this rule applies to.
    pub targets: Vec<String>,
    /// `keep`, `cast`, `prune` or `quantize`.
    pub action: String,
    /// Target dtype of `cast`: `bf16`, `f16` or `f32`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Weight number type of `quantize`: `int` (default) or `float`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Bit width of `quantize`: 2 to 8 for `int`, 8 for `float`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// FP8 encoding of `type = "float"`: `e4m3` (default) or `e5m2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
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
    /// Range observer: `minmax` (default) or `mse`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observer: Option<String>,
    /// Dynamic 8-bit activation quantization: `none` (default), `token` or `tensor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activations: Option<String>,
    /// Pruning before storage or quantization: `magnitude` or `N:M` (e.g. `2:4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<String>,
    /// Fraction removed by `prune = "magnitude"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// Where magnitude pruning counts: `tensor` (default) or `row`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_scope: Option<String>,
    /// N:M pruning of a tensor whose columns are not a multiple of M: `error` (default) or
    /// `dense` (that tensor is not pruned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indivisible: Option<String>,
    /// Storage of `action = "prune"` tensors: `bitmask` (default) or `dense` (zeros kept in
    /// place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

impl RuleFile {
    /// A rule with only targets and action set.
    pub fn new(targets: Vec<String>, action: &str) -> Self {
        Self {
            targets,
            action: action.to_string(),
            dtype: None,
            kind: None,
            bits: None,
            format: None,
            symmetric: None,
            strategy: None,
            group_size: None,
            scale_dtype: None,
            observer: None,
            activations: None,
            prune: None,
            sparsity: None,
            prune_scope: None,
            indivisible: None,
            storage: None,
        }
    }
}

/// Integer quantization settings of a rule, before the tensor's dtype fixes the scale dtype.
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
    /// Range observer.
    pub observer: Observer,
}

/// The scale dtype for a tensor stored as `dtype` when the rule does not fix one.
fn auto_scale_dtype(fixed: Option<DType>, dtype: DType) -> DType {
    fixed.unwrap_or(match dtype {
        DType::BF16 => DType::BF16,
        DType::F16 => DType::F16,
        _ => DType::F32,
    })
}

impl QuantRule {
    /// Parameters for a tensor stored as `dtype`.
    pub fn params_for(&self, dtype: DType) -> IntParams {
        IntParams {
            bits: self.bits,
            symmetric: self.symmetric,
            strategy: self.strategy,
            scale_dtype: auto_scale_dtype(self.scale_dtype, dtype),
            observer: self.observer,
        }
    }
}

/// Weight quantization of a rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightRule {
    /// Integer weights.
    Int(QuantRule),
    /// FP8 weights.
    Float {
        /// Encoding.
        format: Fp8Format,
        /// One scale per output channel.
        per_channel: bool,
        /// Fixed scale dtype.
        scale_dtype: Option<DType>,
    },
}

/// Pruning settings of a rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PruneRule {
    /// Method.
    pub method: PruneMethod,
    /// Leave tensors whose columns N:M cannot divide unpruned instead of failing.
    pub indivisible_dense: bool,
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RuleAction {
    /// Copy bytes unchanged.
    Keep,
    /// Convert float elements.
    Cast(DType),
    /// Prune, keeping the tensor's float type.
    Prune {
        /// Pruning.
        prune: PruneRule,
        /// Storage of the pruned tensor.
        storage: SparseStorage,
    },
    /// Weight quantization, optionally after pruning.
    Quantize {
        /// Weights.
        weights: WeightRule,
        /// Dynamic activation quantization recorded for the serving engine.
        activations: Option<ActStrategy>,
        /// Pruning first.
        prune: Option<PruneRule>,
    },
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
    /// Structured pruning, when the recipe asks for it.
    pub structured: Option<StructuredSpec>,
}

/// Validated structured pruning settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StructuredSpec {
    /// Fraction of MLP neurons removed per layer.
    pub mlp_ratio: f64,
    /// Fraction of key/value head groups removed per layer.
    pub head_ratio: f64,
    /// Layers removed, ascending.
    pub drop_layers: Vec<u64>,
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
    /// A quantize or prune rule matches but the tensor is not a 2-D `.weight` matrix.
    NotAMatrix,
    /// It has no elements.
    Empty,
    /// N:M pruning does not divide its columns and the rule says to leave it dense.
    Indivisible,
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
            KeepReason::Indivisible => "columns not divisible by M",
        })
    }
}

/// Storage of a pruned, unquantized tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SparseStorage {
    /// compressed-tensors `sparse-bitmask`.
    Bitmask,
    /// The dense tensor with zeros in place.
    Dense,
}

impl SparseStorage {
    /// The `sparsity_config.format` name.
    pub fn format_name(self) -> &'static str {
        match self {
            SparseStorage::Bitmask => "sparse-bitmask",
            SparseStorage::Dense => "dense",
        }
    }
}

/// Granularity of dynamic activation quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActStrategy {
    /// One scale per token, computed at run time.
    Token,
    /// One scale per tensor, computed at run time.
    Tensor,
}

/// Weight quantization of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightQuant {
    /// Integer.
    Int(IntParams),
    /// FP8.
    Float(FloatParams),
}

/// The compressed-tensors layout a quantized weight is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuantFormat {
    /// `weight_packed` int32 words (weight-only integer schemes).
    PackQuantized,
    /// `weight` as I8 (integer weights with activation quantization).
    IntQuantized,
    /// `weight` as FP8.
    FloatQuantized,
}

impl QuantFormat {
    /// The compressed-tensors format name.
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::PackQuantized => "pack-quantized",
            QuantFormat::IntQuantized => "int-quantized",
            QuantFormat::FloatQuantized => "float-quantized",
        }
    }
}

/// Quantization of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantAction {
    /// Weights.
    pub weights: WeightQuant,
    /// Dynamic activation quantization recorded in the config.
    pub activations: Option<ActStrategy>,
    /// Pruning applied before quantizing.
    pub prune: Option<PruneMethod>,
}

impl QuantAction {
    /// The layout the weight is written in.
    pub fn format(&self) -> QuantFormat {
        match (self.weights, self.activations) {
            (WeightQuant::Float(_), _) => QuantFormat::FloatQuantized,
            (WeightQuant::Int(_), Some(_)) => QuantFormat::IntQuantized,
            (WeightQuant::Int(_), None) => QuantFormat::PackQuantized,
        }
    }
}

/// Pruning of one unquantized tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PruneAction {
    /// Method.
    pub method: PruneMethod,
    /// Storage.
    pub storage: SparseStorage,
}

/// What happens to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorAction {
    /// Bytes copied unchanged.
    Keep(KeepReason),
    /// Float elements converted to this dtype.
    Cast(DType),
    /// Pruned, same float type.
    Prune(PruneAction),
    /// Quantized.
    Quantize(QuantAction),
}

impl TensorAction {
    /// The pruning applied, if any.
    pub fn prune_method(&self) -> Option<PruneMethod> {
        match self {
            TensorAction::Prune(p) => Some(p.method),
            TensorAction::Quantize(q) => q.prune,
            _ => None,
        }
    }
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

    /// The recipe as TOML text, as it travels to the coordinator.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.source).unwrap_or_default()
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
        let structured = match &file.structured {
            None => None,
            Some(s) => Some(parse_structured(s).map_err(|e| err(format!("[structured]: {e}")))?),
        };
        if file.rules.is_empty() && structured.is_none() {
            return Err(err(
                "no [[rules]] and no [structured] section: a recipe needs at least one".into(),
            ));
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
            structured,
            source: file,
        })
    }

    /// Decides what happens to `t`; `Err` explains why the recipe cannot apply to it.
    pub fn resolve(&self, t: &TensorInfo) -> Result<TensorAction, String> {
        if !t.dtype.is_transformable_float() {
            return Ok(TensorAction::Keep(KeepReason::NotFloat));
        }
        if self.ignore.iter().any(|p| p.matches(&t.name)) {
            return Ok(TensorAction::Keep(KeepReason::Ignored));
        }
        if self.ignore_1d && t.shape.len() <= 1 {
            return Ok(TensorAction::Keep(KeepReason::OneDimensional));
        }
        let Some(rule) = self
            .rules
            .iter()
            .find(|r| r.targets.iter().any(|p| p.matches(&t.name)))
        else {
            return Ok(TensorAction::Keep(KeepReason::NoRule));
        };
        if t.numel() == 0 {
            return Ok(TensorAction::Keep(KeepReason::Empty));
        }
        let is_matrix = t.shape.len() == 2 && t.name.ends_with(".weight");
        // N:M pruning needs whole groups in every row.
        let prune_for = |p: &PruneRule| -> Result<Option<PruneMethod>, String> {
            if let PruneMethod::NOfM { n, m } = p.method {
                let cols = t.shape.get(1).copied().unwrap_or(0);
                if cols % u64::from(m) != 0 {
                    if p.indivisible_dense {
                        return Ok(None);
                    }
                    return Err(format!(
                        "{n}:{m} pruning needs a column count divisible by {m}, but {:?} has {cols} columns; set indivisible = \"dense\" in the rule to leave such tensors unpruned",
                        t.name
                    ));
                }
            }
            Ok(Some(p.method))
        };
        Ok(match rule.action {
            RuleAction::Keep => TensorAction::Keep(KeepReason::KeepRule),
            RuleAction::Cast(d) if d == t.dtype => TensorAction::Keep(KeepReason::KeepRule),
            RuleAction::Cast(d) => TensorAction::Cast(d),
            RuleAction::Prune { .. } | RuleAction::Quantize { .. } if !is_matrix => {
                TensorAction::Keep(KeepReason::NotAMatrix)
            }
            RuleAction::Prune { prune, storage } => match prune_for(&prune)? {
                Some(method) => TensorAction::Prune(PruneAction { method, storage }),
                None => TensorAction::Keep(KeepReason::Indivisible),
            },
            RuleAction::Quantize {
                weights,
                activations,
                prune,
            } => {
                let prune = match &prune {
                    Some(p) => prune_for(p)?,
                    None => None,
                };
                let weights = match weights {
                    WeightRule::Int(q) => WeightQuant::Int(q.params_for(t.dtype)),
                    WeightRule::Float {
                        format,
                        per_channel,
                        scale_dtype,
                    } => WeightQuant::Float(FloatParams {
                        format,
                        per_channel,
                        scale_dtype: auto_scale_dtype(scale_dtype, t.dtype),
                    }),
                };
                TensorAction::Quantize(QuantAction {
                    weights,
                    activations,
                    prune,
                })
            }
        })
    }
}

fn parse_structured(s: &StructuredFile) -> Result<StructuredSpec, String> {
    let ratio = |name: &str, v: Option<f64>| -> Result<f64, String> {
        match v {
            None => Ok(0.0),
            Some(r) if (0.0..1.0).contains(&r) => Ok(r),
            Some(r) => Err(format!("{name} must be at least 0 and below 1, got {r}")),
        }
    };
    let mut drop_layers = s.drop_layers.clone();
    drop_layers.sort_unstable();
    if let Some(w) = drop_layers.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("drop_layers names layer {} twice", w[0]));
    }
    let spec = StructuredSpec {
        mlp_ratio: ratio("mlp_ratio", s.mlp_ratio)?,
        head_ratio: ratio("head_ratio", s.head_ratio)?,
        drop_layers,
    };
    if spec.mlp_ratio == 0.0 && spec.head_ratio == 0.0 && spec.drop_layers.is_empty() {
        return Err("nothing to do: set mlp_ratio, head_ratio or drop_layers".into());
    }
    Ok(spec)
}

fn parse_prune(r: &RuleFile) -> Result<Option<PruneRule>, String> {
    let Some(method) = r.prune.as_deref() else {
        if r.sparsity.is_some() || r.prune_scope.is_some() || r.indivisible.is_some() {
            return Err(
                "sparsity, prune_scope and indivisible need prune = \"magnitude\" or \"N:M\""
                    .into(),
            );
        }
        return Ok(None);
    };
    let method = if method == "magnitude" {
        if r.indivisible.is_some() {
            return Err("indivisible applies to N:M pruning only".into());
        }
        let sparsity = r
            .sparsity
            .ok_or("prune = \"magnitude\" needs sparsity (a fraction such as 0.5)")?;
        if !(0.0..1.0).contains(&sparsity) || sparsity.is_nan() {
            return Err(format!(
                "sparsity must be at least 0 and below 1, got {sparsity}"
            ));
        }
        let scope = match r.prune_scope.as_deref().unwrap_or("tensor") {
            "tensor" => PruneScope::Tensor,
            "row" => PruneScope::Row,
            other => return Err(format!("unknown prune_scope {other:?} (tensor or row)")),
        };
        PruneMethod::Magnitude { sparsity, scope }
    } else if let Some((n, m)) = method.split_once(':') {
        if r.sparsity.is_some() || r.prune_scope.is_some() {
            return Err("sparsity and prune_scope apply to magnitude pruning only".into());
        }
        let parse = |v: &str| v.trim().parse::<u32>().ok();
        let (Some(n), Some(m)) = (parse(n), parse(m)) else {
            return Err(format!(
                "prune {method:?}: N:M needs two whole numbers, e.g. \"2:4\""
            ));
        };
        if n == 0 || n >= m || m > 1024 {
            return Err(format!("prune {method:?}: N:M needs 0 < N < M <= 1024"));
        }
        PruneMethod::NOfM { n, m }
    } else {
        return Err(format!(
            "unknown prune method {method:?} (\"magnitude\" or \"N:M\" such as \"2:4\")"
        ));
    };
    let indivisible_dense = match r.indivisible.as_deref() {
        None | Some("error") => false,
        Some("dense") => true,
        Some(other) => return Err(format!("unknown indivisible {other:?} (error or dense)")),
    };
    Ok(Some(PruneRule {
        method,
        indivisible_dense,
    }))
}

fn parse_action(r: &RuleFile) -> Result<RuleAction, String> {
    let unused = |field: &str, present: bool| {
        if present {
            Err(format!("{field} does not apply to action {:?}", r.action))
        } else {
            Ok(())
        }
    };
    let quant_fields = r.kind.is_some()
        || r.bits.is_some()
        || r.format.is_some()
        || r.symmetric.is_some()
        || r.strategy.is_some()
        || r.group_size.is_some()
        || r.scale_dtype.is_some()
        || r.observer.is_some()
        || r.activations.is_some();
    let prune_fields = r.prune.is_some()
        || r.sparsity.is_some()
        || r.prune_scope.is_some()
        || r.indivisible.is_some();
    match r.action.as_str() {
        "keep" => {
            unused("dtype", r.dtype.is_some())?;
            unused("quantization settings", quant_fields)?;
            unused("pruning settings", prune_fields)?;
            unused("storage", r.storage.is_some())?;
            Ok(RuleAction::Keep)
        }
        "cast" => {
            unused("quantization settings", quant_fields)?;
            unused("pruning settings", prune_fields)?;
            unused("storage", r.storage.is_some())?;
            let d = r
                .dtype
                .as_deref()
                .ok_or("cast needs dtype = \"bf16\", \"f16\" or \"f32\"")?;
            Ok(RuleAction::Cast(parse_float_dtype(d)?))
        }
        "prune" => {
            unused("dtype", r.dtype.is_some())?;
            unused("quantization settings", quant_fields)?;
            let prune = parse_prune(r)?
                .ok_or("prune needs prune = \"magnitude\" (with sparsity) or \"N:M\"")?;
            let storage = match r.storage.as_deref().unwrap_or("bitmask") {
                "bitmask" => SparseStorage::Bitmask,
                "dense" => SparseStorage::Dense,
                other => return Err(format!("unknown storage {other:?} (bitmask or dense)")),
            };
            Ok(RuleAction::Prune { prune, storage })
        }
        "quantize" => {
            unused("dtype", r.dtype.is_some())?;
            unused(
                "storage (quantized tensors keep pruned zeros in place)",
                r.storage.is_some(),
            )?;
            let prune = parse_prune(r)?;
            let scale_dtype = match r.scale_dtype.as_deref() {
                None | Some("auto") => None,
                Some(d) => Some(parse_float_dtype(d)?),
            };
            let activations = match r.activations.as_deref().unwrap_or("none") {
                "none" => None,
                "token" => Some(ActStrategy::Token),
                "tensor" => Some(ActStrategy::Tensor),
                other => {
                    return Err(format!(
                        "unknown activations {other:?} (none, token or tensor)"
                    ))
                }
            };
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
            let observer = match r.observer.as_deref() {
                None | Some("minmax") => Observer::Minmax,
                Some("mse") => Observer::Mse,
                Some(o) => return Err(format!("unknown observer {o:?} (minmax or mse)")),
            };
            let weights = match r.kind.as_deref().unwrap_or("int") {
                "int" => {
                    let bits = r.bits.ok_or("quantize needs bits (2 to 8)")?;
                    if !(MIN_BITS..=MAX_BITS).contains(&bits) {
                        return Err(format!("bits must be 2 to 8, got {bits}"));
                    }
                    if r.format.is_some() {
                        return Err("format applies to type = \"float\" only".into());
                    }
                    if activations.is_some() {
                        if bits != 8 {
                            return Err(format!(
                                "activation quantization needs 8-bit weights (int-quantized), got bits = {bits}"
                            ));
                        }
                        if matches!(strategy, Strategy::Group(_)) {
                            return Err(
                                "activation quantization needs strategy \"channel\" or \"tensor\""
                                    .into(),
                            );
                        }
                    }
                    WeightRule::Int(QuantRule {
                        bits,
                        symmetric: r.symmetric.unwrap_or(true),
                        strategy,
                        scale_dtype,
                        observer,
                    })
                }
                "float" => {
                    if r.bits.is_some_and(|b| b != 8) {
                        return Err(format!(
                            "type = \"float\" is 8-bit only, got bits = {}",
                            r.bits.unwrap_or(0)
                        ));
                    }
                    if r.symmetric == Some(false) {
                        return Err("type = \"float\" is symmetric only".into());
                    }
                    if observer != Observer::Minmax {
                        return Err("type = \"float\" supports observer = \"minmax\" only".into());
                    }
                    let format = match r.format.as_deref().unwrap_or("e4m3") {
                        "e4m3" => Fp8Format::E4m3,
                        "e5m2" => Fp8Format::E5m2,
                        other => {
                            return Err(format!("unknown float format {other:?} (e4m3 or e5m2)"))
                        }
                    };
                    let per_channel = match strategy {
                        Strategy::Channel => true,
                        Strategy::Tensor => false,
                        Strategy::Group(_) => {
                            return Err(
                                "type = \"float\" supports strategy \"channel\" or \"tensor\""
                                    .into(),
                            )
                        }
                    };
                    WeightRule::Float {
                        format,
                        per_channel,
                        scale_dtype,
                    }
                }
                other => return Err(format!("unknown type {other:?} (int or float)")),
            };
            Ok(RuleAction::Quantize {
                weights,
                activations,
                prune,
            })
        }
        other => Err(format!(
            "unknown action {other:?} (keep, cast, prune or quantize)"
        )),
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
        let q = r
            .resolve(&info(
                "encoder.layer.0.attention.self.query.weight",
                DType::F32,
                vec![4, 8],
            ))
            .expect("resolves");
        assert!(
            matches!(q, TensorAction::Quantize(QuantAction { weights: WeightQuant::Int(p), .. }) if p.bits == 8 && p.scale_dtype == DType::F32)
        );
        let bf = r
            .resolve(&info(
                "model.layers.0.mlp.up_proj.weight",
                DType::BF16,
                vec![4, 8],
            ))
            .expect("resolves");
        assert!(
            matches!(bf, TensorAction::Quantize(QuantAction { weights: WeightQuant::Int(p), .. }) if p.scale_dtype == DType::BF16)
        );
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
                r.resolve(&info(name, DType::F32, vec![4, 8]))
                    .expect("resolves"),
                TensorAction::Keep(reason),
                "{name}"
            );
        }
        assert_eq!(
            r.resolve(&info("embeddings.position_ids", DType::I64, vec![1, 8]))
                .expect("resolves"),
            TensorAction::Keep(KeepReason::NotFloat)
        );
        let cast = Recipe::load("bf16").expect("preset");
        assert_eq!(
            cast.resolve(&info("x.LayerNorm.bias", DType::F32, vec![8]))
                .expect("resolves"),
            TensorAction::Cast(DType::BF16)
        );
    }

    #[test]
    fn bad_recipes_name_the_problem() {
        let cases = [
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=9\n", "rule 1 ([\"*\"]): bits must be 2 to 8, got 9"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nstrategy=\"group\"\ngroup_size=0\n", "group_size must be at least 1"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"prune-ish\"\n", "unknown action \"prune-ish\""),
            ("[[rules]]\ntargets=[\"re:(\"]\naction=\"keep\"\n", "invalid regex"),
            ("name=\"x\"\n", "a recipe needs at least one"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"keep\"\nbitz=3\n", "unknown field `bitz`"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"cast\"\ndtype=\"int3\"\n", "unknown float dtype"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"prune\"\nprune=\"magnitude\"\n", "needs sparsity"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"prune\"\nprune=\"magnitude\"\nsparsity=1.0\n", "below 1, got 1"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"prune\"\nprune=\"4:4\"\n", "0 < N < M"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nactivations=\"token\"\n", "needs 8-bit weights"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\ntype=\"float\"\nstrategy=\"group\"\ngroup_size=8\n", "channel\" or \"tensor"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nobserver=\"percentile\"\n", "unknown observer"),
            ("[[rules]]\ntargets=[\"*\"]\naction=\"cast\"\ndtype=\"bf16\"\nsparsity=0.5\n", "pruning settings does not apply"),
            ("[structured]\nmlp_ratio=1.5\n", "mlp_ratio must be"),
            ("[structured]\ndrop_layers=[1,1]\n", "names layer 1 twice"),
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
    fn n_of_m_with_indivisible_columns() {
        let strict = Recipe::from_toml(
            "[[rules]]\ntargets=[\"*\"]\naction=\"prune\"\nprune=\"2:4\"\n",
            "t",
        )
        .expect("valid");
        let odd = info("l.0.w.weight", DType::F32, vec![4, 6]);
        let e = strict.resolve(&odd).expect_err("6 columns");
        assert!(
            e.contains("divisible by 4") && e.contains("l.0.w.weight"),
            "{e}"
        );
        let even = info("l.0.w.weight", DType::F32, vec![4, 8]);
        assert!(matches!(
            strict.resolve(&even),
            Ok(TensorAction::Prune(PruneAction {
                method: PruneMethod::NOfM { n: 2, m: 4 },
                storage: SparseStorage::Bitmask
            }))
        ));
        let lenient = Recipe::from_toml(
            "[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nprune=\"2:4\"\nindivisible=\"dense\"\n",
            "t",
        )
        .expect("valid");
        assert!(matches!(
            lenient.resolve(&odd),
            Ok(TensorAction::Quantize(QuantAction { prune: None, .. }))
        ));
    }

    #[test]
    fn rule_order_and_custom_ignore() {
        let r = Recipe::from_toml(
            "ignore = []\n[[rules]]\ntargets=[\"re:.*\\\\.0\\\\..*\"]\naction=\"keep\"\n[[rules]]\ntargets=[\"*\"]\naction=\"quantize\"\nbits=4\nstrategy=\"group\"\ngroup_size=32\n",
            "t",
        )
        .expect("valid");
        assert_eq!(
            r.resolve(&info("l.0.w.weight", DType::F16, vec![2, 2]))
                .expect("resolves"),
            TensorAction::Keep(KeepReason::KeepRule)
        );
        assert!(matches!(
            r.resolve(&info("embed.weight", DType::F16, vec![2, 2])).expect("resolves"),
            TensorAction::Quantize(QuantAction { weights: WeightQuant::Int(p), .. }) if p.strategy == Strategy::Group(32)
        ));
        assert_eq!(
            r.resolve(&info("l.1.norm", DType::F16, vec![2]))
                .expect("resolves"),
            TensorAction::Keep(KeepReason::OneDimensional)
        );
    }
}
