//! Turning a compressed checkpoint back into a plain dense one any tool loads.
//!
//! Every module stored in a compressed-tensors layout (`pack-quantized`, `int-quantized`,
//! `float-quantized`, `sparse-bitmask`) becomes one dense `<module>.weight`; dequantization is
//! `(q - zero_point) * scale` in f32 (`fp8(q) * scale` for FP8). All float tensors are then
//! written in one dtype (round to nearest even), other tensors unchanged. `config.json` loses
//! its `quantization_config` and names the dtype. Shards keep their grouping.

use std::collections::BTreeMap;
use std::fs;
use std::io::BufWriter;
use std::path::Path;

use serde_json::{json, Value};

use crate::checkpoint::{Checkpoint, INDEX_FILE};
use crate::codec::cast;
use crate::dtype::DType;
use crate::kernels::bitmask;
use crate::kernels::convert::decode_f32;
use crate::kernels::fp8::Fp8Format;
use crate::kernels::int_quant::{self, unpack_values};
use crate::pipeline::{check_output, json_bytes, publish, staging_dir, CompressError};
use crate::safetensors::{ShardWriter, TensorInfo, TensorSpec};

/// Suffixes of the tensors a compressed module is stored as.
const PARTS: [&str; 8] = [
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "shape",
    "compressed",
    "bitmask",
    "row_offsets",
];

/// How one module is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Packed,
    Int8,
    Fp8(Fp8Format),
    Bitmask,
}

/// What `decompress_local` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecompressSummary {
    /// Modules decoded, per layout name.
    pub modules: BTreeMap<String, u64>,
    /// Dense tensors written.
    pub tensors: u64,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// The dtype of every float tensor.
    pub dtype: Option<DType>,
}

fn bad(what: &str, problem: impl Into<String>) -> CompressError {
    CompressError::Plan(format!("{what}: {}", problem.into()))
}

/// The bit width of a pack-quantized module, from `quantization_config`.
fn packed_bits(qc: Option<&Value>, module: &str) -> Option<u64> {
    config_group(qc, module)?
        .get("weights")?
        .get("num_bits")?
        .as_u64()
}

/// The group size of a module's scales, from `quantization_config`.
fn config_group_size(qc: Option<&Value>, module: &str) -> Option<u64> {
    config_group(qc, module)?
        .get("weights")?
        .get("group_size")?
        .as_u64()
}

/// Reads a tensor's bytes.
fn read(ckpt: &Checkpoint, name: &str) -> Result<(TensorInfo, Vec<u8>), CompressError> {
    let (shard, info) = ckpt
        .info(name)
        .ok_or_else(|| bad(name, "tensor is missing"))?;
    let mut buf = vec![0u8; info.byte_len() as usize];
    let start = shard.header.data_start() + info.start;
    shard
        .source
        .read_exact_at(start, &mut buf)
        .map_err(|source| CompressError::Read {
            file: shard.file_name.clone(),
            tensor: name.to_string(),
            start,
            end: start + info.byte_len(),
            source,
        })?;
    Ok((info.clone(), buf))
}

fn to_f32(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<f32>, CompressError> {
    if !info.dtype.is_transformable_float() {
        return Err(bad(
            &info.name,
            format!("expected a float tensor, found {}", info.dtype),
        ));
    }
    let mut out = vec![0f32; info.numel() as usize];
    decode_f32(info.dtype, bytes, &mut out);
    Ok(out)
}

fn i64s(info: &TensorInfo, bytes: &[u8]) -> Result<Vec<i64>, CompressError> {
    if info.dtype != DType::I64 && info.dtype != DType::I32 {
        return Err(bad(
            &info.name,
            format!("expected I64 or I32, found {}", info.dtype),
        ));
    }
    Ok(match info.dtype {
        DType::I64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    })
}

fn shape2(module: &str, v: &[i64]) -> Result<(u64, u64), CompressError> {
    match v {
        [r, c] if *r >= 0 && *c >= 0 => Ok((*r as u64, *c as u64)),
        _ => Err(bad(
            module,
            format!("shape must hold two non-negative sizes, got {v:?}"),
        )),
    }
}

/// Per-element scale and zero point lookup for a `rows × cols` weight.
struct Params {
    scales: Vec<f32>,
    zeros: Vec<i32>,
    groups: u64,
    group_size: u64,
}

impl Params {
    fn new(
        module: &str,
        scale: (TensorInfo, Vec<u8>),
        zeros: Option<Vec<i32>>,
        rows: u64,
        cols: u64,
        group_size: Option<u64>,
    ) -> Result<Self, CompressError> {
        let (info, bytes) = scale;
        let scales = to_f32(&info, &bytes)?;
        if let Some(i) = scales.iter().position(|s| !s.is_finite() || *s == 0.0) {
            return Err(bad(
                &info.name,
                format!(
                    "scale #{i} is {}; scales must be finite and non-zero",
                    scales[i]
                ),
            ));
        }
        let (prow, groups) = match info.shape.as_slice() {
            [1] => (1, 1),
            [r, g] if *r == rows && *g >= 1 => (rows, *g),
            other => {
                return Err(bad(
                    &info.name,
                    format!("scale shape {other:?} does not fit a {rows} × {cols} weight"),
                ))
            }
        };
        let group_size = if groups == 1 {
            cols.max(1)
        } else {
            let gs = group_size.unwrap_or_else(|| cols.div_ceil(groups));
            if gs == 0 || cols.div_ceil(gs) != groups {
                return Err(bad(
                    &info.name,
                    format!("{groups} scale groups do not fit {cols} columns in groups of {gs}"),
                ));
            }
            gs
        };
        let zeros = zeros.unwrap_or_else(|| vec![0; (prow * groups) as usize]);
        if zeros.len() != scales.len() {
            return Err(bad(
                module,
                format!("{} zero points for {} scales", zeros.len(), scales.len()),
            ));
        }
        Ok(Self {
            scales,
            zeros,
            groups,
            group_size,
        })
    }

    fn at(&self, r: u64, c: u64) -> (f32, i32) {
        let i = if self.scales.len() == 1 {
            0
        } else {
            (r * self.groups + c / self.group_size) as usize
        };
        (self.scales[i], self.zeros[i])
    }
}

/// Dequantizes `rows × cols` signed values.
fn dequantize_ints(q: &[i32], rows: u64, cols: u64, p: &Params) -> Vec<f32> {
    let mut out = Vec::with_capacity(q.len());
    for r in 0..rows {
        for c in 0..cols {
            let (s, z) = p.at(r, c);
            out.push((q[(r * cols + c) as usize] - z) as f32 * s);
        }
    }
    out
}

/// Decodes one compressed module to dense f32 values and its shape.
fn decode_module(
    ckpt: &Checkpoint,
    module: &str,
    layout: Layout,
    qc: Option<&Value>,
) -> Result<(Vec<f32>, DType, Vec<u64>), CompressError> {
    let name = |s: &str| format!("{module}.{s}");
    match layout {
        Layout::Packed => {
            let bits = match (qc, packed_bits(qc, module)) {
                (None, _) => {
                    return Err(bad(
                        module,
                        "pack-quantized weights need config.json with a quantization_config giving num_bits; none found",
                    ))
                }
                (Some(_), Some(b)) if (2..=8).contains(&b) => b as u8,
                (Some(_), Some(b)) => {
                    return Err(bad(
                        module,
                        format!("quantization_config gives num_bits {b}; pack-quantized needs 2 to 8"),
                    ))
                }
                (Some(_), None) => {
                    return Err(bad(
                        module,
                        "no config group of quantization_config covers this module with an integer num_bits",
                    ))
                }
            };
            let (si, sb) = read(ckpt, &name("weight_shape"))?;
            let (rows, cols) = shape2(module, &i64s(&si, &sb)?)?;
            let (pi, pb) = read(ckpt, &name("weight_packed"))?;
            let pf = 32 / u64::from(bits);
            if pi.dtype != DType::I32 || pi.shape != [rows, cols.div_ceil(pf)] {
                return Err(bad(
                    &pi.name,
                    format!(
                        "expected I32 {:?} for a {rows} × {cols} weight at {bits} bits, found {} {:?}",
                        [rows, cols.div_ceil(pf)],
                        pi.dtype,
                        pi.shape
                    ),
                ));
            }
            let words: Vec<u32> = pb
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let q: Vec<i32> = unpack_values(&words, rows, cols, bits)
                .into_iter()
                .map(i32::from)
                .collect();
            let scale = read(ckpt, &name("weight_scale"))?;
            let zeros = if ckpt.info(&name("weight_zero_point")).is_some() {
                let (zi, zb) = read(ckpt, &name("weight_zero_point"))?;
                let (prow, groups) = match scale.0.shape.as_slice() {
                    [r, g] => (*r, *g),
                    _ => (1, 1),
                };
                let want = [prow.div_ceil(pf), groups];
                let ok = zi.dtype == DType::I32
                    && (zi.shape == want || (prow == 1 && groups == 1 && zi.shape == [1]));
                if !ok {
                    return Err(bad(
                        &zi.name,
                        format!("expected I32 {want:?}, found {} {:?}", zi.dtype, zi.shape),
                    ));
                }
                let zw: Vec<u32> = zb
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let z = zero_points_from_words(&zw, prow, groups, bits);
                Some(z)
            } else {
                None
            };
            int_module(module, &q, scale, zeros, rows, cols, qc)
        }
        Layout::Int8 | Layout::Fp8(_) => {
            let (wi, wb) = read(ckpt, &name("weight"))?;
            let (rows, cols) = match wi.shape.as_slice() {
                [r, c] => (*r, *c),
                other => return Err(bad(&wi.name, format!("expected 2-D, found {other:?}"))),
            };
            let scale = read(ckpt, &name("weight_scale"))?;
            let dtype = scale.0.dtype;
            if let Layout::Fp8(format) = layout {
                let params = Params::new(module, scale, None, rows, cols, None)?;
                let mut out = Vec::with_capacity(wb.len());
                for (i, b) in wb.iter().enumerate() {
                    let (r, c) = (i as u64 / cols.max(1), i as u64 % cols.max(1));
                    out.push(format.decode(*b) * params.at(r, c).0);
                }
                return Ok((out, dtype, vec![rows, cols]));
            }
            let zeros = if ckpt.info(&name("weight_zero_point")).is_some() {
                let (zi, zb) = read(ckpt, &name("weight_zero_point"))?;
                if zi.dtype != DType::I8 || zi.shape != scale.0.shape {
                    return Err(bad(
                        &zi.name,
                        format!(
                            "expected I8 {:?}, found {} {:?}",
                            scale.0.shape, zi.dtype, zi.shape
                        ),
                    ));
                }
                Some(zb.iter().map(|b| i32::from(*b as i8)).collect())
            } else {
                None
            };
            let q: Vec<i32> = wb.iter().map(|b| i32::from(*b as i8)).collect();
            int_module(module, &q, scale, zeros, rows, cols, qc)
        }
        Layout::Bitmask => {
            let (si, sb) = read(ckpt, &name("shape"))?;
            let (rows, cols) = shape2(module, &i64s(&si, &sb)?)?;
            let (vi, vb) = read(ckpt, &name("compressed"))?;
            let (mi, mb) = read(ckpt, &name("bitmask"))?;
            if mi.dtype != DType::U8 && mi.dtype != DType::I8 {
                return Err(bad(&mi.name, format!("expected U8, found {}", mi.dtype)));
            }
            if !vi.dtype.is_transformable_float() {
                return Err(bad(
                    &vi.name,
                    format!("expected floats, found {}", vi.dtype),
                ));
            }
            let width = (vi.dtype.bits() / 8) as usize;
            let dense = bitmask::expand(&vb, &mb, rows, cols, width)
                .map_err(|e| bad(module, e.to_string()))?;
            let (oi, ob) = read(ckpt, &name("row_offsets"))?;
            let offsets = i64s(&oi, &ob)?;
            let mrow = bitmask::mask_row_bytes(cols) as usize;
            let mut expected = Vec::with_capacity(rows as usize);
            let mut next = 0i64;
            for row in mb.chunks(mrow.max(1)).take(rows as usize) {
                expected.push(next);
                next += row.iter().map(|b| i64::from(b.count_ones())).sum::<i64>();
            }
            if offsets != expected {
                return Err(bad(
                    &oi.name,
                    "row offsets disagree with the bitmask (each row must start after the set bits of the rows before it)",
                ));
            }
            let info = TensorInfo {
                name: name("weight"),
                dtype: vi.dtype,
                shape: vec![rows, cols],
                start: 0,
                end: dense.len() as u64,
            };
            Ok((to_f32(&info, &dense)?, vi.dtype, vec![rows, cols]))
        }
    }
}

/// The dense shape of a compressed module, from its small shape tensors.
fn module_shape(
    ckpt: &Checkpoint,
    module: &str,
    layout: Layout,
) -> Result<Vec<u64>, CompressError> {
    let part = match layout {
        Layout::Packed => "weight_shape",
        Layout::Bitmask => "shape",
        Layout::Int8 | Layout::Fp8(_) => {
            let name = format!("{module}.weight");
            let (_, info) = ckpt
                .info(&name)
                .ok_or_else(|| bad(&name, "tensor is missing"))?;
            return Ok(info.shape.clone());
        }
    };
    let name = format!("{module}.{part}");
    let (_, info) = ckpt
        .info(&name)
        .ok_or_else(|| bad(&name, "tensor is missing"))?;
    if info.numel() != 2 {
        return Err(bad(
            &name,
            format!("expected 2 sizes, found shape {:?}", info.shape),
        ));
    }
    let (info, bytes) = read(ckpt, &name)?;
    let (r, c) = shape2(module, &i64s(&info, &bytes)?)?;
    Ok(vec![r, c])
}

/// Dequantizes signed integer weights with their scales and zero points; returns the values,
/// the scale dtype and the shape.
fn int_module(
    module: &str,
    q: &[i32],
    scale: (TensorInfo, Vec<u8>),
    zeros: Option<Vec<i32>>,
    rows: u64,
    cols: u64,
    qc: Option<&Value>,
) -> Result<(Vec<f32>, DType, Vec<u64>), CompressError> {
    let dtype = scale.0.dtype;
    let params = Params::new(
        module,
        scale,
        zeros,
        rows,
        cols,
        config_group_size(qc, module),
    )?;
    Ok((
        dequantize_ints(q, rows, cols, &params),
        dtype,
        vec![rows, cols],
    ))
}

/// Zero points packed along the rows (`[ceil(rows / pf), cols]` words), as signed values.
fn zero_points_from_words(words: &[u32], rows: u64, cols: u64, bits: u8) -> Vec<i32> {
    int_quant::unpack_along_rows(words, rows, cols, bits)
        .into_iter()
        .map(i32::from)
        .collect()
}

/// The layout of each compressed module, found from tensor names and dtypes, with every
/// module checked for conflicting, missing and orphaned parts.
fn find_modules(ckpt: &Checkpoint) -> Result<BTreeMap<String, Layout>, CompressError> {
    let mut out: BTreeMap<String, Layout> = BTreeMap::new();
    let has = |module: &str, part: &str| ckpt.info(&format!("{module}.{part}")).is_some();
    for (name, _) in ckpt.tensors.iter() {
        let Some((module, part)) = name.rsplit_once('.') else {
            continue;
        };
        let layout = match part {
            "weight_packed" => Layout::Packed,
            "bitmask" => Layout::Bitmask,
            "weight_scale" => match ckpt.info(&format!("{module}.weight")).map(|(_, i)| i.dtype) {
                Some(DType::I8) => Layout::Int8,
                Some(DType::F8E4M3) => Layout::Fp8(Fp8Format::E4m3),
                Some(DType::F8E5M2) => Layout::Fp8(Fp8Format::E5m2),
                Some(other) => {
                    if has(module, "weight_packed") {
                        continue;
                    }
                    return Err(bad(
                        name,
                        format!("a weight scale next to a {other} weight; quantized weights are I8, F8_E4M3 or F8_E5M2"),
                    ));
                }
                None => continue,
            },
            _ => continue,
        };
        if let Some(prev) = out.insert(module.to_string(), layout) {
            return Err(bad(
                module,
                format!(
                    "stored both as {} and as {}",
                    layout_name(prev),
                    layout_name(layout)
                ),
            ));
        }
    }
    for (module, layout) in &out {
        let (required, forbidden): (&[&str], &[&str]) = match layout {
            Layout::Packed => (
                &["weight_packed", "weight_scale", "weight_shape"],
                &["weight", "bitmask", "compressed"],
            ),
            Layout::Bitmask => (
                &["shape", "compressed", "bitmask", "row_offsets"],
                &["weight", "weight_packed", "weight_scale"],
            ),
            Layout::Int8 | Layout::Fp8(_) => (
                &["weight", "weight_scale"],
                &["weight_packed", "weight_shape", "bitmask", "compressed"],
            ),
        };
        if let Some(missing) = required.iter().find(|p| !has(module, p)) {
            return Err(bad(
                module,
                format!(
                    "{} module without its {missing} tensor",
                    layout_name(*layout)
                ),
            ));
        }
        if let Some(extra) = forbidden.iter().find(|p| has(module, p)) {
            return Err(bad(
                module,
                format!(
                    "{} module also has a {extra} tensor; which one holds the weight is ambiguous",
                    layout_name(*layout)
                ),
            ));
        }
    }
    // Parts whose module is not compressed, and quantized weights without a scale.
    for (name, _) in ckpt.tensors.iter() {
        let Some((module, part)) = name.rsplit_once('.') else {
            continue;
        };
        if out.contains_key(module) {
            continue;
        }
        let orphan = matches!(
            part,
            "weight_packed"
                | "weight_scale"
                | "weight_zero_point"
                | "weight_shape"
                | "bitmask"
                | "row_offsets"
        );
        if orphan {
            return Err(bad(
                name,
                "a compressed-weight part whose module has no complete compressed weight",
            ));
        }
        if let Some((_, info)) = ckpt.info(name) {
            if part == "weight" && matches!(info.dtype, DType::I8 | DType::F8E4M3 | DType::F8E5M2) {
                return Err(bad(
                    name,
                    format!(
                        "a {} weight without weight_scale cannot be dequantized",
                        info.dtype
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// The config group of a module, if `quantization_config` names one.
fn config_group<'a>(qc: Option<&'a Value>, module: &str) -> Option<&'a Value> {
    let groups = qc?.get("config_groups")?.as_object()?;
    let ignored = qc?
        .get("ignore")
        .and_then(Value::as_array)
        .is_some_and(|l| l.iter().any(|v| v.as_str() == Some(module)));
    groups.values().find(|g| {
        g.get("targets").and_then(Value::as_array).is_some_and(|t| {
            t.iter().any(|t| match t.as_str() {
                Some("Linear") => !ignored,
                Some(name) => name == module,
                None => false,
            })
        })
    })
}

/// Checks what the config says of a module's weights against how they are stored.
fn check_against_config(
    ckpt: &Checkpoint,
    module: &str,
    layout: Layout,
    qc: Option<&Value>,
) -> Result<(), CompressError> {
    if layout == Layout::Bitmask {
        return Ok(());
    }
    let Some(weights) = config_group(qc, module).and_then(|g| g.get("weights")) else {
        return Ok(());
    };
    let kind = weights.get("type").and_then(Value::as_str);
    let bits = weights.get("num_bits").and_then(Value::as_u64);
    let want_kind = match layout {
        Layout::Fp8(_) => "float",
        _ => "int",
    };
    if kind.is_some_and(|k| k != want_kind) {
        return Err(bad(
            module,
            format!(
                "stored as {} but quantization_config says type {:?}",
                layout_name(layout),
                kind.unwrap_or_default()
            ),
        ));
    }
    if matches!(layout, Layout::Int8 | Layout::Fp8(_)) && bits.is_some_and(|b| b != 8) {
        return Err(bad(
            module,
            format!(
                "stored with 8-bit values but quantization_config says num_bits {}",
                bits.unwrap_or(0)
            ),
        ));
    }
    if let Some(symmetric) = weights.get("symmetric").and_then(Value::as_bool) {
        let has_zero = ckpt.info(&format!("{module}.weight_zero_point")).is_some();
        if symmetric == has_zero {
            return Err(bad(
                module,
                if symmetric {
                    "quantization_config says symmetric, but a weight_zero_point is stored"
                } else {
                    "quantization_config says asymmetric, but no weight_zero_point is stored"
                },
            ));
        }
    }
    Ok(())
}

fn layout_name(l: Layout) -> &'static str {
    match l {
        Layout::Packed => "pack-quantized",
        Layout::Int8 => "int-quantized",
        Layout::Fp8(_) => "float-quantized",
        Layout::Bitmask => "sparse-bitmask",
    }
}

fn encode(name: &str, values: &[f32], dtype: DType) -> Result<Vec<u8>, CompressError> {
    let src: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    cast(DType::F32, dtype, &src, values.len())
        .map(|(out, _)| out)
        .map_err(|e| bad(name, e))
}

/// Decompresses the checkpoint at `input` into `out`, every float tensor as `dtype` (default:
/// the config's `torch_dtype` when it is bf16, f16 or f32, else f32).
pub fn decompress_local(
    input: &Path,
    out: &Path,
    dtype: Option<DType>,
    overwrite: bool,
) -> Result<DecompressSummary, CompressError> {
    let ckpt = Checkpoint::open_local(input)?;
    let out_abs = check_output(input, out, overwrite)?;
    let qc = ckpt
        .config
        .as_ref()
        .and_then(|c| c.get("quantization_config"));
    let dtype = dtype.unwrap_or_else(|| {
        match ckpt
            .config
            .as_ref()
            .and_then(|c| c.get("torch_dtype"))
            .and_then(Value::as_str)
        {
            Some("bfloat16") => DType::BF16,
            Some("float16") => DType::F16,
            _ => DType::F32,
        }
    });
    if let Some(unlisted) = ckpt
        .skipped_files
        .iter()
        .find(|f| f.ends_with(".safetensors"))
    {
        return Err(bad(
            unlisted,
            format!("not named by {INDEX_FILE}; a decompressed checkpoint would miss its tensors"),
        ));
    }
    if ckpt.tensors.is_empty() {
        return Err(bad(&ckpt.root, "the checkpoint holds no tensors"));
    }
    let modules = find_modules(&ckpt)?;
    for (module, layout) in &modules {
        check_against_config(&ckpt, module, *layout, qc)?;
    }
    let staging = staging_dir(&out_abs)?;
    let result = write_dense(&ckpt, &modules, qc, dtype, &staging);
    match result {
        Ok(mut summary) => {
            publish(&staging, &out_abs)?;
            summary.dtype = Some(dtype);
            Ok(summary)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn write_dense(
    ckpt: &Checkpoint,
    modules: &BTreeMap<String, Layout>,
    qc: Option<&Value>,
    dtype: DType,
    staging: &Path,
) -> Result<DecompressSummary, CompressError> {
    let io = |path: &Path| {
        let p = path.display().to_string();
        move |e: std::io::Error| CompressError::Output {
            path: p.clone(),
            problem: e.to_string(),
        }
    };
    let mut summary = DecompressSummary::default();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let out_dtype = |d: DType| {
        if d.is_transformable_float() {
            dtype
        } else {
            d
        }
    };
    for shard in &ckpt.shards {
        // Output entries of this shard: plain tensors and one weight per compressed module.
        let mut entries: BTreeMap<String, (Option<Layout>, TensorSpec)> = BTreeMap::new();
        for info in &shard.header.tensors {
            if let Some((module, part)) = info.name.rsplit_once('.') {
                if let Some(layout) = modules.get(module) {
                    if part == "weight_g_idx" {
                        return Err(bad(
                            &info.name,
                            "activation reordering (weight_g_idx) is not supported",
                        ));
                    }
                    let is_part = PARTS.contains(&part)
                        || (part == "weight" && matches!(layout, Layout::Int8 | Layout::Fp8(_)));
                    let anchor = match layout {
                        Layout::Packed => "weight_packed",
                        Layout::Bitmask => "bitmask",
                        _ => "weight",
                    };
                    if part == anchor {
                        let weight = format!("{module}.weight");
                        let shape = module_shape(ckpt, module, *layout)?;
                        entries.insert(
                            weight.clone(),
                            (Some(*layout), TensorSpec::new(weight, dtype, shape)),
                        );
                    }
                    if is_part {
                        continue;
                    }
                }
            }
            entries.insert(
                info.name.clone(),
                (
                    None,
                    TensorSpec::new(&info.name, out_dtype(info.dtype), info.shape.clone()),
                ),
            );
        }
        if entries.is_empty() {
            continue;
        }
        let path = staging.join(&shard.file_name);
        if let Some(p) = path.parent() {
            fs::create_dir_all(p).map_err(io(p))?;
        }
        let file = fs::File::create(&path).map_err(io(&path))?;
        let specs: Vec<TensorSpec> = entries.values().map(|(_, s)| s.clone()).collect();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let wrap = |source| CompressError::Write {
            file: shard.file_name.clone(),
            source,
        };
        let mut writer = ShardWriter::new(BufWriter::new(file), specs, &metadata).map_err(wrap)?;
        for (name, (layout, spec)) in &entries {
            let bytes = match layout {
                Some(l) => {
                    let module = name.strip_suffix(".weight").unwrap_or(name);
                    let (values, _, _) = decode_module(ckpt, module, *l, qc)?;
                    *summary.modules.entry(layout_name(*l).into()).or_default() += 1;
                    encode(name, &values, dtype)?
                }
                None => {
                    let (info, raw) = read(ckpt, name)?;
                    if info.dtype.is_transformable_float() && info.dtype != dtype {
                        cast(info.dtype, dtype, &raw, info.numel() as usize)
                            .map(|(out, _)| out)
                            .map_err(|e| bad(name, e))?
                    } else {
                        raw
                    }
                }
            };
            writer.write_tensor(&spec.name, &bytes).map_err(wrap)?;
            summary.tensors += 1;
            summary.bytes += bytes.len() as u64;
            total += bytes.len() as u64;
            weight_map.insert(name.clone(), json!(shard.file_name));
        }
        writer.finish().map_err(wrap)?;
    }
    let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    fs::write(staging.join(INDEX_FILE), json_bytes(&index)).map_err(io(staging))?;
    for rel in &ckpt.other_files {
        let from = Path::new(&ckpt.root).join(rel);
        let to = staging.join(rel);
        if let Some(p) = to.parent() {
            fs::create_dir_all(p).map_err(io(p))?;
        }
        if rel == "config.json" {
            if let Some(mut config) = ckpt.config.clone() {
                if let Some(obj) = config.as_object_mut() {
                    obj.remove("quantization_config");
                    let name = match dtype {
                        DType::BF16 => "bfloat16",
                        DType::F16 => "float16",
                        _ => "float32",
                    };
                    obj.insert("torch_dtype".into(), json!(name));
                    if obj.contains_key("dtype") {
                        obj.insert("dtype".into(), json!(name));
                    }
                }
                fs::write(&to, json_bytes(&config)).map_err(io(&to))?;
                continue;
            }
        }
        fs::copy(&from, &to).map_err(io(&from))?;
    }
    Ok(summary)
}
