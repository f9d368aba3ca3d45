//! The job report written as `report.json`: what happened to every tensor, sizes and error.

use serde::{Deserialize, Serialize};

use crate::metrics::ErrorSummary;
use crate::recipe::RecipeFile;

/// Version of the report layout.
pub const REPORT_VERSION: u32 = 1;

/// Totals over the whole checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Input tensors.
    pub tensors: u64,
    /// Input tensor bytes.
    pub bytes_in: u64,
    /// Output tensor bytes.
    pub bytes_out: u64,
    /// `bytes_in / bytes_out`.
    pub ratio: f64,
    /// Tensors quantized.
    pub quantized: u64,
    /// Tensors cast.
    pub cast: u64,
    /// Tensors copied unchanged.
    pub kept: u64,
    /// Tensors pruned (alone or before quantization).
    #[serde(default)]
    pub pruned: u64,
    /// Zeros over the elements of pruned tensors; 0 when nothing was pruned.
    #[serde(default)]
    pub global_sparsity: f64,
}

/// One output shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    /// File name.
    pub file: String,
    /// Layer group key.
    pub group: String,
    /// Output tensors.
    pub tensors: u64,
    /// File length.
    pub file_bytes: u64,
}

/// One input tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorReport {
    /// Input name.
    pub name: String,
    /// Output shard file.
    pub shard: String,
    /// `quantize`, `cast` or `keep`.
    pub action: String,
    /// Details: format (`int8 sym channel`), target dtype, or why it was kept.
    pub detail: String,
    /// Input dtype.
    pub dtype: String,
    /// Input shape.
    pub shape: Vec<u64>,
    /// Input bytes.
    pub bytes_in: u64,
    /// Output bytes (all output tensors).
    pub bytes_out: u64,
    /// Output tensor names.
    pub outputs: Vec<String>,
    /// Elements removed by pruning, when pruned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<u64>,
    /// Reconstruction error.
    #[serde(flatten)]
    pub error: ErrorSummary,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Layout version.
    pub report_version: u32,
    /// Version of the program that wrote it.
    pub shardpress_version: String,
    /// Recipe name.
    pub recipe_name: String,
    /// Recipe as given.
    pub recipe: RecipeFile,
    /// Totals.
    pub totals: Totals,
    /// Output shards.
    pub shards: Vec<ShardReport>,
    /// Per input tensor, in output order.
    pub tensors: Vec<TensorReport>,
    /// Files carried over unchanged.
    pub copied_files: Vec<String>,
    /// Files left out (weights in other formats, unreferenced shards).
    pub skipped_files: Vec<String>,
    /// Structured pruning: what each layer kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<StructuredReport>,
}

/// What structured pruning removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StructuredReport {
    /// Input layer indices dropped.
    pub dropped_layers: Vec<u64>,
    /// Per kept layer, in output order.
    pub layers: Vec<LayerReport>,
}

/// The neurons and heads one layer kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Index in the input.
    pub source_layer: u64,
    /// Index in the output.
    pub output_layer: u64,
    /// MLP neurons kept (input indices, ascending); empty when MLPs were not pruned.
    pub mlp_kept: Vec<u64>,
    /// Key/value heads kept (input indices, ascending); empty when heads were not pruned.
    pub kv_heads_kept: Vec<u64>,
}

impl Report {
    /// Recomputes totals from the tensor rows.
    pub fn compute_totals(&mut self) {
        let mut t = Totals::default();
        let (mut zeros, mut elements) = (0u64, 0u64);
        for r in &self.tensors {
            if let Some(z) = r.pruned {
                t.pruned += 1;
                zeros += z;
                elements += r.shape.iter().product::<u64>();
            }
            t.tensors += 1;
            t.bytes_in += r.bytes_in;
            t.bytes_out += r.bytes_out;
            match r.action.as_str() {
                "quantize" => t.quantized += 1,
                "cast" => t.cast += 1,
                "prune" => {}
                _ => t.kept += 1,
            }
        }
        if elements > 0 {
            t.global_sparsity = zeros as f64 / elements as f64;
        }
        t.ratio = if t.bytes_out == 0 {
            0.0
        } else {
            t.bytes_in as f64 / t.bytes_out as f64
        };
        self.totals = t;
    }
}
