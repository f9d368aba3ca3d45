//! Rewriting `config.json` so loaders know how the weights are stored.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::codec::module_name;
use crate::dtype::DType;
use crate::kernels::fp8::FloatParams;
use crate::kernels::int_quant::{IntParams, Strategy};
use crate::recipe::{
    ActStrategy, QuantAction, QuantFormat, SparseStorage, TensorAction, WeightQuant,
};
use crate::safetensors::TensorInfo;

fn is_matrix(info: &TensorInfo) -> bool {
    info.shape.len() == 2 && info.name.ends_with(".weight")
}

/// The compressed-tensors `quantization_config` for quantized or pruned weights, or `None`
/// when neither happened. `global_sparsity` is the fraction of zeros over pruned tensors.
///
/// One config group per distinct scheme; a single group targets `Linear` layers and lists the
/// unquantized 2-D weights' modules in `ignore`, several groups name their modules.
pub fn quantization_config(
    plan: &[(&TensorInfo, TensorAction)],
    global_sparsity: f64,
) -> Option<Value> {
    let mut groups: BTreeMap<String, (QuantAction, Vec<String>)> = BTreeMap::new();
    let mut ignore = Vec::new();
    for (info, action) in plan {
        match action {
            TensorAction::Quantize(q) => {
                // Pruning does not change the scheme.
                let scheme = QuantAction { prune: None, ..*q };
                groups
                    .entry(format!("{scheme:?}"))
                    .or_insert_with(|| (scheme, Vec::new()))
                    .1
                    .push(module_name(&info.name).to_string());
            }
            _ if is_matrix(info) => ignore.push(module_name(&info.name).to_string()),
            _ => {}
        }
    }
    let sparsity = sparsity_config(plan, global_sparsity);
    if groups.is_empty() && sparsity.is_none() {
        return None;
    }
    let mut out = Map::new();
    out.insert("quant_method".into(), json!("compressed-tensors"));
    if !groups.is_empty() {
        let single = groups.len() == 1;
        let formats: Vec<&str> = groups.values().map(|(q, _)| q.format().name()).collect();
        let format = if formats.iter().all(|f| *f == formats[0]) {
            formats[0]
        } else {
            "mixed-precision"
        };
        let mut config_groups = Map::new();
        for (i, (_, (q, modules))) in groups.into_iter().enumerate() {
            let targets = if single {
                json!(["Linear"])
            } else {
                json!(modules)
            };
            config_groups.insert(
                format!("group_{i}"),
                json!({
                    "targets": targets,
                    "weights": weight_args(&q.weights),
                    "input_activations": q.activations.map(|a| activation_args(&q, a)),
                    "output_activations": null,
                    "format": q.format().name(),
                }),
            );
        }
        ignore.sort();
        out.insert("format".into(), json!(format));
        out.insert("quantization_status".into(), json!("compressed"));
        out.insert("config_groups".into(), Value::Object(config_groups));
        out.insert("ignore".into(), json!(ignore));
        out.insert("kv_cache_scheme".into(), Value::Null);
    }
    out.insert(
        "sparsity_config".into(),
        sparsity.unwrap_or_else(|| json!({})),
    );
    Some(Value::Object(out))
}

/// The `sparsity_config` entry when any weight was pruned.
fn sparsity_config(plan: &[(&TensorInfo, TensorAction)], global_sparsity: f64) -> Option<Value> {
    let pruned: Vec<(&TensorInfo, &TensorAction)> = plan
        .iter()
        .filter(|(_, a)| a.prune_method().is_some())
        .map(|(i, a)| (*i, a))
        .collect();
    if pruned.is_empty() {
        return None;
    }
    let bitmask = |a: &TensorAction| matches!(a, TensorAction::Prune(p) if p.storage == SparseStorage::Bitmask);
    let any_bitmask = pruned.iter().any(|(_, a)| bitmask(a));
    let structures: Vec<String> = pruned
        .iter()
        .filter_map(|(_, a)| a.prune_method().map(|m| m.structure()))
        .collect();
    let structure = if structures.iter().all(|s| *s == structures[0]) {
        structures[0].clone()
    } else {
        "unstructured".to_string()
    };
    // With bitmask storage the targets are the modules stored that way; dense-stored pruned
    // modules need no decoding.
    let mut targets: Vec<String> = pruned
        .iter()
        .filter(|(_, a)| !any_bitmask || bitmask(a))
        .map(|(i, _)| module_name(&i.name).to_string())
        .collect();
    targets.sort();
    let mut ignore: Vec<String> = plan
        .iter()
        .filter(|(i, a)| is_matrix(i) && a.prune_method().is_none())
        .map(|(i, _)| module_name(&i.name).to_string())
        .collect();
    ignore.sort();
    let format = if any_bitmask {
        SparseStorage::Bitmask.format_name()
    } else {
        SparseStorage::Dense.format_name()
    };
    Some(json!({
        "format": format,
        "global_sparsity": global_sparsity,
        "sparsity_structure": structure,
        "targets": targets,
        "ignore": ignore,
        "registry_requires_subclass": false,
    }))
}

fn int_args(p: &IntParams) -> Value {
    let (strategy, group_size) = match p.strategy {
        Strategy::Tensor => ("tensor", Value::Null),
        Strategy::Channel => ("channel", Value::Null),
        Strategy::Group(g) => ("group", json!(g)),
    };
    json!({
        "num_bits": p.bits,
        "type": "int",
        "symmetric": p.symmetric,
        "strategy": strategy,
        "group_size": group_size,
        "block_structure": null,
        "dynamic": false,
        "actorder": null,
        "observer": p.observer.name(),
        "observer_kwargs": {},
    })
}

fn float_args(p: &FloatParams) -> Value {
    json!({
        "num_bits": 8,
        "type": "float",
        "symmetric": true,
        "strategy": if p.per_channel { "channel" } else { "tensor" },
        "group_size": null,
        "block_structure": null,
        "dynamic": false,
        "actorder": null,
        "observer": "minmax",
        "observer_kwargs": {},
    })
}

fn weight_args(w: &WeightQuant) -> Value {
    match w {
        WeightQuant::Int(p) => int_args(p),
        WeightQuant::Float(p) => float_args(p),
    }
}

fn activation_args(q: &QuantAction, a: ActStrategy) -> Value {
    let kind = match q.format() {
        QuantFormat::FloatQuantized => "float",
        _ => "int",
    };
    json!({
        "num_bits": 8,
        "type": kind,
        "symmetric": true,
        "strategy": match a {
            ActStrategy::Token => "token",
            ActStrategy::Tensor => "tensor",
        },
        "group_size": null,
        "block_structure": null,
        "dynamic": true,
        "actorder": null,
        "observer": null,
        "observer_kwargs": {},
    })
}

fn torch_dtype_name(d: DType) -> Option<&'static str> {
    match d {
        DType::BF16 => Some("bfloat16"),
        DType::F16 => Some("float16"),
        DType::F32 => Some("float32"),
        _ => None,
    }
}

/// `config` with `quantization_config` added for quantized or pruned weights and
/// `torch_dtype` updated when every float tensor was cast to one type.
pub fn rewrite(
    config: &Value,
    plan: &[(&TensorInfo, TensorAction)],
    global_sparsity: f64,
) -> Value {
    let mut out = config.clone();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    if let Some(q) = quantization_config(plan, global_sparsity) {
        obj.insert("quantization_config".into(), q);
    }
    // torch_dtype describes the float tensors; update it when a cast left them all one type.
    let any_cast = plan.iter().any(|(_, a)| matches!(a, TensorAction::Cast(_)));
    let float_out: Vec<DType> = plan
        .iter()
        .filter(|(i, _)| i.dtype.is_transformable_float())
        .filter_map(|(i, a)| match a {
            TensorAction::Cast(d) => Some(*d),
            TensorAction::Keep(_) | TensorAction::Prune(_) => Some(i.dtype),
            TensorAction::Quantize(_) => None,
        })
        .collect();
    if let (true, Some(first)) = (any_cast, float_out.first()) {
        if float_out.iter().all(|d| d == first) {
            if let Some(name) = torch_dtype_name(*first) {
                obj.insert("torch_dtype".into(), json!(name));
                if obj.contains_key("dtype") {
                    obj.insert("dtype".into(), json!(name));
                }
            }
        }
    }
    out
}
