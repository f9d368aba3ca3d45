//! Structured pruning of Llama-style decoders: whole MLP neurons, whole attention heads and
//! whole layers.
//!
//! A neuron `i` of layer `L` is row `i` of `mlp.gate_proj` and `mlp.up_proj` and column `i`
//! of `mlp.down_proj`. Heads are removed in whole key/value groups, so grouped-query
//! attention stays consistent: key/value head `h` owns its `head_dim` rows of `k_proj` and
//! `v_proj`, the rows of its `n_rep = heads / kv_heads` query heads in `q_proj` and the
//! matching columns of `o_proj`. Units are ranked by the squared L2 norm of all their weights
//! together; the same number is kept in every layer (so one config describes the model), the
//! highest scores win and ties go to the lower index. All tensors of one unit live in one
//! layer, which is one task.
//!
//! Planning fixes names and shapes from the headers and `config.json`; which units survive is
//! decided by the task from the weights.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::checkpoint::Checkpoint;
use crate::kernels::convert::decode_f32;
use crate::recipe::StructuredSpec;
use crate::safetensors::TensorInfo;

/// The layer stack this pruning understands.
pub const STACK: &str = "model.layers";

/// Which coupled unit a slice follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// MLP neurons.
    Mlp,
    /// Key/value head groups.
    Heads,
}

/// Part of a tensor kept by structured pruning: `keep` units of `unit_len` rows (axis 0) or
/// columns (axis 1) each, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// 0 for rows, 1 for columns.
    pub axis: u8,
    /// The unit followed.
    pub unit: Unit,
    /// Rows or columns per unit.
    pub unit_len: u64,
    /// Units kept.
    pub keep: u64,
}

/// A tensor whose weights rank units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scorer {
    /// Index into the task's tensors.
    pub tensor: usize,
    /// 0 for rows, 1 for columns.
    pub axis: u8,
    /// Rows or columns per unit.
    pub unit_len: u64,
}

/// Units of one kind in one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitCut {
    /// Units in the input.
    pub units: u64,
    /// Units kept.
    pub keep: u64,
    /// Tensors that rank them.
    pub scorers: Vec<Scorer>,
}

/// Structured pruning of one layer task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerCut {
    /// Index in the input.
    pub source_layer: u64,
    /// Index in the output.
    pub output_layer: u64,
    /// MLP neurons, when pruned.
    pub mlp: Option<UnitCut>,
    /// Key/value head groups, when pruned.
    pub heads: Option<UnitCut>,
}

/// What happens to one tensor under structured pruning.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Its layer is dropped.
    Drop,
    /// Written under `name`, sliced when `slice` is set.
    Keep {
        /// Output name.
        name: String,
        /// Slice, if the tensor belongs to a pruned unit.
        slice: Option<Slice>,
    },
}

/// Model dimensions read from `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// `num_hidden_layers`.
    pub layers: u64,
    /// `num_attention_heads`.
    pub heads: u64,
    /// `num_key_value_heads` (defaults to the head count).
    pub kv_heads: u64,
    /// `head_dim` (defaults to `hidden_size / heads`).
    pub head_dim: u64,
    /// `intermediate_size`.
    pub intermediate: u64,
    /// `hidden_size`.
    pub hidden: u64,
}

/// Units kept out of `units` when removing `ratio` of them: never more than asked is removed,
/// and at least one unit stays.
pub fn kept_units(units: u64, ratio: f64) -> u64 {
    let removed = (ratio * units as f64 + 1e-9).floor() as u64;
    units.saturating_sub(removed).max(1)
}

fn config_u64(config: &Value, key: &str) -> Option<u64> {
    config.get(key).and_then(Value::as_u64)
}

/// A checkpoint's structured pruning plan.
#[derive(Debug, Clone)]
pub struct Structure {
    /// Dimensions of the input.
    pub dims: Dims,
    /// The settings.
    pub spec: StructuredSpec,
    /// Neurons kept per layer.
    pub keep_neurons: u64,
    /// Key/value heads kept per layer.
    pub keep_kv: u64,
}

impl Structure {
    /// Validates `spec` against the checkpoint's config and tensor shapes.
    pub fn plan(ckpt: &Checkpoint, spec: &StructuredSpec) -> Result<Self, String> {
        let config = ckpt.config.as_ref().ok_or(
            "structured pruning needs config.json (num_hidden_layers, num_attention_heads, intermediate_size, hidden_size)",
        )?;
        let s = Self::from_config(config, spec)?;
        s.check_shapes(ckpt)?;
        Ok(s)
    }

    /// Reads the dimensions from `config.json` and validates `spec` against them.
    pub fn from_config(config: &Value, spec: &StructuredSpec) -> Result<Self, String> {
        let need = |key: &str| {
            config_u64(config, key)
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("structured pruning: config.json has no positive {key}"))
        };
        let layers = need("num_hidden_layers")?;
        let heads = need("num_attention_heads")?;
        let hidden = need("hidden_size")?;
        let intermediate = need("intermediate_size")?;
        let kv_heads = config_u64(config, "num_key_value_heads").unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "structured pruning: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            ));
        }
        let head_dim = match config_u64(config, "head_dim") {
            Some(d) if d > 0 => d,
            _ if hidden % heads == 0 => hidden / heads,
            _ => {
                return Err(format!(
                    "structured pruning: hidden_size {hidden} is not a multiple of num_attention_heads {heads} and config.json has no head_dim"
                ))
            }
        };
        let dims = Dims {
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            hidden,
        };
        if let Some(bad) = spec.drop_layers.iter().find(|l| **l >= layers) {
            return Err(format!(
                "drop_layers names layer {bad}, but the model has {layers} layers (0 to {})",
                layers - 1
            ));
        }
        if spec.drop_layers.len() as u64 >= layers {
            return Err("drop_layers would remove every layer".into());
        }
        let keep = |name: &str, what: &str, units: u64, ratio: f64| -> Result<u64, String> {
            if ratio == 0.0 {
                return Ok(units);
            }
            let kept = kept_units(units, ratio);
            if kept == units {
                return Err(format!(
                    "{name} {ratio} of {units} {what} removes none; use at least {}",
                    1.0 / units as f64
                ));
            }
            Ok(kept)
        };
        Ok(Self {
            dims,
            spec: spec.clone(),
            keep_neurons: keep("mlp_ratio", "MLP neurons", intermediate, spec.mlp_ratio)?,
            keep_kv: keep(
                "head_ratio",
                "key/value head groups",
                kv_heads,
                spec.head_ratio,
            )?,
        })
    }

    /// Checks that every layer kept has the tensors the pruning needs, in the config's shapes.
    fn check_shapes(&self, ckpt: &Checkpoint) -> Result<(), String> {
        let Dims {
            layers,
            heads,
            kv_heads,
            head_dim,
            intermediate,
            hidden,
        } = self.dims;
        let spec = &self.spec;
        if let Some((name, layer)) = ckpt
            .tensors
            .keys()
            .filter_map(|n| Self::split(n).map(|(l, _)| (n, l)))
            .find(|(_, l)| *l >= layers)
        {
            return Err(format!(
                "structured pruning: tensor {name:?} belongs to layer {layer}, but config.json has num_hidden_layers {layers}"
            ));
        }
        let q_rows = heads * head_dim;
        let kv_rows = kv_heads * head_dim;
        for layer in (0..layers).filter(|l| !spec.drop_layers.contains(l)) {
            let mut expect = Vec::new();
            if spec.mlp_ratio > 0.0 {
                expect.extend([
                    ("mlp.gate_proj.weight", [intermediate, hidden]),
                    ("mlp.up_proj.weight", [intermediate, hidden]),
                    ("mlp.down_proj.weight", [hidden, intermediate]),
                ]);
            }
            if spec.head_ratio > 0.0 {
                expect.extend([
                    ("self_attn.q_proj.weight", [q_rows, hidden]),
                    ("self_attn.k_proj.weight", [kv_rows, hidden]),
                    ("self_attn.v_proj.weight", [kv_rows, hidden]),
                    ("self_attn.o_proj.weight", [hidden, q_rows]),
                ]);
            }
            for (suffix, shape) in expect {
                let name = format!("{STACK}.{layer}.{suffix}");
                match ckpt.info(&name) {
                    None => {
                        return Err(format!(
                            "structured pruning needs a Llama-style checkpoint: tensor {name:?} is missing"
                        ))
                    }
                    Some((_, info)) if info.shape != shape => {
                        return Err(format!(
                            "structured pruning: tensor {name:?} has shape {:?}, config.json implies {shape:?}",
                            info.shape
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// The layer index of a tensor name, and the rest of the name after it.
    fn split(name: &str) -> Option<(u64, &str)> {
        let rest = name.strip_prefix(STACK)?.strip_prefix('.')?;
        let (num, tail) = rest.split_once('.')?;
        Some((num.parse().ok()?, tail))
    }

    /// The output index of input layer `layer` (which must not be dropped).
    pub fn output_layer(&self, layer: u64) -> u64 {
        layer - self.spec.drop_layers.iter().filter(|d| **d < layer).count() as u64
    }

    /// What happens to the tensor `name`.
    pub fn fate(&self, name: &str) -> Fate {
        let Some((layer, tail)) = Self::split(name) else {
            return Fate::Keep {
                name: name.to_string(),
                slice: None,
            };
        };
        if self.spec.drop_layers.contains(&layer) {
            return Fate::Drop;
        }
        let out = format!("{STACK}.{}.{tail}", self.output_layer(layer));
        let d = &self.dims;
        let n_rep = d.heads / d.kv_heads;
        let mlp = |axis| {
            (self.spec.mlp_ratio > 0.0).then_some(Slice {
                axis,
                unit: Unit::Mlp,
                unit_len: 1,
                keep: self.keep_neurons,
            })
        };
        let heads = |axis, unit_len| {
            (self.spec.head_ratio > 0.0).then_some(Slice {
                axis,
                unit: Unit::Heads,
                unit_len,
                keep: self.keep_kv,
            })
        };
        let slice = match tail {
            "mlp.gate_proj.weight"
            | "mlp.up_proj.weight"
            | "mlp.gate_proj.bias"
            | "mlp.up_proj.bias" => mlp(0),
            "mlp.down_proj.weight" => mlp(1),
            "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => heads(0, n_rep * d.head_dim),
            "self_attn.k_proj.weight"
            | "self_attn.k_proj.bias"
            | "self_attn.v_proj.weight"
            | "self_attn.v_proj.bias" => heads(0, d.head_dim),
            "self_attn.o_proj.weight" => heads(1, n_rep * d.head_dim),
            _ => None,
        };
        Fate::Keep { name: out, slice }
    }

    /// The layer cut of a task holding `names` (in task order), if it is a layer.
    pub fn layer_cut(&self, names: &[&str]) -> Option<LayerCut> {
        let layer = names.iter().find_map(|n| Self::split(n).map(|(l, _)| l))?;
        let d = &self.dims;
        let n_rep = d.heads / d.kv_heads;
        let find = |suffix: &str| {
            let want = format!("{STACK}.{layer}.{suffix}");
            names.iter().position(|n| *n == want)
        };
        let scorers = |list: &[(&str, u8, u64)]| -> Vec<Scorer> {
            list.iter()
                .filter_map(|(s, axis, unit_len)| {
                    find(s).map(|tensor| Scorer {
                        tensor,
                        axis: *axis,
                        unit_len: *unit_len,
                    })
                })
                .collect()
        };
        let mlp = (self.spec.mlp_ratio > 0.0).then(|| UnitCut {
            units: d.intermediate,
            keep: self.keep_neurons,
            scorers: scorers(&[
                ("mlp.down_proj.weight", 1, 1),
                ("mlp.gate_proj.weight", 0, 1),
                ("mlp.up_proj.weight", 0, 1),
            ]),
        });
        let heads = (self.spec.head_ratio > 0.0).then(|| UnitCut {
            units: d.kv_heads,
            keep: self.keep_kv,
            scorers: scorers(&[
                ("self_attn.k_proj.weight", 0, d.head_dim),
                ("self_attn.o_proj.weight", 1, n_rep * d.head_dim),
                ("self_attn.q_proj.weight", 0, n_rep * d.head_dim),
                ("self_attn.v_proj.weight", 0, d.head_dim),
            ]),
        });
        Some(LayerCut {
            source_layer: layer,
            output_layer: self.output_layer(layer),
            mlp,
            heads,
        })
    }

    /// `config.json` with the pruned dimensions.
    pub fn rewrite_config(&self, config: &Value) -> Value {
        let mut out = config.clone();
        let Some(obj) = out.as_object_mut() else {
            return out;
        };
        let d = &self.dims;
        let n_rep = d.heads / d.kv_heads;
        obj.insert("intermediate_size".into(), json!(self.keep_neurons));
        obj.insert("num_attention_heads".into(), json!(self.keep_kv * n_rep));
        obj.insert("num_key_value_heads".into(), json!(self.keep_kv));
        // Explicit, since loaders otherwise derive it from hidden_size / heads.
        obj.insert("head_dim".into(), json!(d.head_dim));
        let kept_layers = d.layers - self.spec.drop_layers.len() as u64;
        obj.insert("num_hidden_layers".into(), json!(kept_layers));
        if let Some(Value::Array(types)) = obj.get_mut("layer_types") {
            let dropped: BTreeSet<usize> =
                self.spec.drop_layers.iter().map(|l| *l as usize).collect();
            let kept: Vec<Value> = types
                .iter()
                .enumerate()
                .filter(|(i, _)| !dropped.contains(i))
                .map(|(_, v)| v.clone())
                .collect();
            *types = kept;
        }
        out
    }
}

/// The output header entry of a sliced tensor.
pub fn sliced_info(info: &TensorInfo, name: &str, slice: Option<&Slice>) -> TensorInfo {
    let mut out = info.clone();
    out.name = name.to_string();
    if let Some(s) = slice {
        if let Some(dim) = out.shape.get_mut(s.axis as usize) {
            *dim = s.keep * s.unit_len;
        }
    }
    out
}

/// Adds the squared L2 norm of every unit's weights in `bytes` (rows from `row0` of a 2-D
/// tensor) to `scores`. Rows must come in order for the sums not to depend on the split.
/// `Err` gives the row and column of a NaN or infinite weight, which cannot be ranked.
pub fn add_scores(
    info: &TensorInfo,
    bytes: &[u8],
    scorer: &Scorer,
    scores: &mut [f64],
    row0: u64,
) -> Result<(), (u64, u64)> {
    let (rows, cols) = info.rows_cols();
    let (rows, cols) = (rows as usize, cols as usize);
    let width = (info.dtype.bits() / 8) as usize;
    let len = scorer.unit_len.max(1) as usize;
    let mut row = vec![0f32; cols];
    for (r, raw) in bytes.chunks_exact(cols * width).take(rows).enumerate() {
        decode_f32(info.dtype, raw, &mut row);
        if let Some(c) = row.iter().position(|x| !x.is_finite()) {
            return Err((row0 + r as u64, c as u64));
        }
        if scorer.axis == 0 {
            if let Some(s) = scores.get_mut((row0 as usize + r) / len) {
                *s += row
                    .iter()
                    .map(|x| f64::from(*x) * f64::from(*x))
                    .sum::<f64>();
            }
        } else {
            for (c, x) in row.iter().enumerate() {
                if let Some(s) = scores.get_mut(c / len) {
                    *s += f64::from(*x) * f64::from(*x);
                }
            }
        }
    }
    Ok(())
}

/// The `keep` highest-scoring units (ties to the lower index), ascending. Non-finite scores
/// rank lowest.
pub fn choose_units(scores: &[f64], keep: u64) -> Vec<u64> {
    let mut idx: Vec<u64> = (0..scores.len() as u64).collect();
    let score = |i: u64| {
        let s = scores[i as usize];
        if s.is_finite() {
            s
        } else {
            f64::NEG_INFINITY
        }
    };
    idx.sort_by(|a, b| score(*b).total_cmp(&score(*a)).then(a.cmp(b)));
    idx.truncate(keep as usize);
    idx.sort_unstable();
    idx
}

/// Gathers the kept units of a tensor's raw bytes along the slice's axis.
pub fn gather(info: &TensorInfo, bytes: &[u8], slice: &Slice, units: &[u64]) -> Vec<u8> {
    let width = (info.dtype.bits() / 8) as usize;
    let len = slice.unit_len as usize;
    if slice.axis == 0 {
        // Rows (or elements of a 1-D tensor) are contiguous.
        let row_bytes = info.shape.iter().skip(1).product::<u64>() as usize * width;
        let mut out = Vec::with_capacity(units.len() * len * row_bytes);
        for u in units {
            let start = *u as usize * len * row_bytes;
            out.extend_from_slice(&bytes[start..start + len * row_bytes]);
        }
        out
    } else {
        let (rows, cols) = info.rows_cols();
        let row_bytes = cols as usize * width;
        let mut out = Vec::with_capacity(rows as usize * units.len() * len * width);
        for row in bytes.chunks_exact(row_bytes) {
            for u in units {
                let start = *u as usize * len * width;
                out.extend_from_slice(&row[start..start + len * width]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn info(shape: Vec<u64>) -> TensorInfo {
        TensorInfo {
            name: "t".into(),
            dtype: DType::F32,
            end: shape.iter().product::<u64>() * 4,
            shape,
            start: 0,
        }
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn gather_rows_and_columns() {
        let t = info(vec![3, 4]);
        let w: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let rows = gather(
            &t,
            &f32s(&w),
            &Slice {
                axis: 0,
                unit: Unit::Mlp,
                unit_len: 1,
                keep: 2,
            },
            &[0, 2],
        );
        assert_eq!(rows, f32s(&[0., 1., 2., 3., 8., 9., 10., 11.]));
        let cols = gather(
            &t,
            &f32s(&w),
            &Slice {
                axis: 1,
                unit: Unit::Heads,
                unit_len: 2,
                keep: 1,
            },
            &[1],
        );
        assert_eq!(cols, f32s(&[2., 3., 6., 7., 10., 11.]));
    }

    #[test]
    fn units_rank_by_norm_with_index_ties() {
        let t = info(vec![4, 2]);
        let w = [1.0f32, 1.0, 3.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut scores = vec![0.0; 4];
        add_scores(
            &t,
            &f32s(&w),
            &Scorer {
                tensor: 0,
                axis: 0,
                unit_len: 1,
            },
            &mut scores,
            0,
        )
        .expect("finite");
        assert_eq!(scores, vec![2.0, 9.0, 1.0, 2.0]);
        assert_eq!(choose_units(&scores, 2), vec![0, 1]);
        assert_eq!(kept_units(11, 0.25), 9);
        assert_eq!(kept_units(100, 0.29), 71);
        assert_eq!(kept_units(2, 0.9), 1);
    }
}
