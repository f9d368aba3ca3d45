//! Rewriting `config.json` so loaders know how the weights are stored.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::codec::module_name;
use crate::dtype::DType;
use crate::kernels::int_quant::{IntParams, Strategy};
use crate::recipe::TensorAction;
use crate::safetensors::TensorInfo;

/// The `quantization_config` entry for quantized weights, or `None` when nothing is quantized.
///
/// One config group per distinct parameter set; a single group targets `Linear` layers and
/// lists the unquantized 2-D weights' modules in `ignore`, several groups name their modules.
pub fn quantization_config(plan: &[(&TensorInfo, TensorAction)]) -> Option<Value> {
    let mut groups: BTreeMap<String, (IntParams, Vec<String>)> = BTreeMap::new();
    let mut ignore = Vec::new();
    for (info, action) in plan {
        match action {
            TensorAction::Quantize(p) => {
                let key = format!("{p:?}");
                groups
                    .entry(key)
                    .or_insert_with(|| (*p, Vec::new()))
                    .1
                    .push(module_name(&info.name).to_string());
            }
            _ if info.shape.len() == 2 && info.name.ends_with(".weight") => {
                ignore.push(module_name(&info.name).to_string());
            }
            _ => {}
        }
    }
    if groups.is_empty() {
        return None;
    }
    let single = groups.len() == 1;
    let mut config_groups = Map::new();
    for (i, (_, (p, modules))) in groups.into_iter().enumerate() {
        let targets = if single {
            json!(["Linear"])
        } else {
            json!(modules)
        };
        config_groups.insert(
            format!("group_{i}"),
            json!({
                "targets": targets,
                "weights": weight_args(&p),
                "input_activations": null,
                "output_activations": null,
                "format": "pack-quantized",
            }),
        );
    }
    ignore.sort();
    Some(json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
    }))
}

fn weight_args(p: &IntParams) -> Value {
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
        "observer": "minmax",
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

/// `config` with `quantization_config` added for quantized weights and `torch_dtype` updated
/// when every float tensor was cast to one type.
pub fn rewrite(config: &Value, plan: &[(&TensorInfo, TensorAction)]) -> Value {
    let mut out = config.clone();
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    if let Some(q) = quantization_config(plan) {
        obj.insert("quantization_config".into(), q);
    }
    // torch_dtype describes the float tensors; update it when a cast left them all one type.
    let any_cast = plan.iter().any(|(_, a)| matches!(a, TensorAction::Cast(_)));
    let float_out: Vec<DType> = plan
        .iter()
        .filter(|(i, _)| i.dtype.is_transformable_float())
        .filter_map(|(i, a)| match a {
            TensorAction::Cast(d) => Some(*d),
            TensorAction::Keep(_) => Some(i.dtype),
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
