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
}

impl Report {
    /// Recomputes totals from the tensor rows.
    pub fn compute_totals(&mut self) {
        let mut t = Totals::default();
        for r in &self.tensors {
            t.tensors += 1;
            t.bytes_in += r.bytes_in;
            t.bytes_out += r.bytes_out;
            match r.action.as_str() {
                "quantize" => t.quantized += 1,
                "cast" => t.cast += 1,
                _ => t.kept += 1,
            }
        }
        t.ratio = if t.bytes_out == 0 {
            0.0
        } else {
            t.bytes_in as f64 / t.bytes_out as f64
        };
        self.totals = t;
    }
}
