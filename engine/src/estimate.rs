//! Output size predicted from a plan alone: every output tensor's dtype and shape follow from
//! the input header and the recipe (pruning keeps an exact count per row or tensor), so the
//! predicted tensor bytes are the bytes the writer will produce, before any weight is read.

use serde::Serialize;

use crate::codec::output_specs;
use crate::pipeline::{JobPlan, TaskSpec};
use crate::recipe::TensorAction;
use crate::safetensors::TensorSpec;

/// Predicted sizes of one layer group (one output shard) or of a whole job.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SizeEstimate {
    /// Layer group key (`model.layers.3`, `embeddings`, …); `total` for the job.
    pub layer: String,
    /// Weights (elements) of the input tensors.
    pub params: u64,
    /// Input tensor bytes.
    pub input_bytes: u64,
    /// Output tensor bytes (headers excluded).
    pub predicted_bytes: u64,
    /// Of `predicted_bytes`, what is not weight values: scales, zero points, bitmasks, row
    /// offsets and shape tensors.
    pub overhead_bytes: u64,
    /// Input tensors transformed (quantized, pruned or cast).
    pub transformed: u64,
}

impl SizeEstimate {
    /// `input_bytes / predicted_bytes` (0 when nothing is written).
    pub fn ratio(&self) -> f64 {
        if self.predicted_bytes == 0 {
            0.0
        } else {
            self.input_bytes as f64 / self.predicted_bytes as f64
        }
    }

    /// Output bits per input weight, overheads included.
    pub fn bits_per_weight(&self) -> f64 {
        if self.params == 0 {
            0.0
        } else {
            self.predicted_bytes as f64 * 8.0 / self.params as f64
        }
    }

    fn add(&mut self, other: &SizeEstimate) {
        self.params += other.params;
        self.input_bytes += other.input_bytes;
        self.predicted_bytes += other.predicted_bytes;
        self.overhead_bytes += other.overhead_bytes;
        self.transformed += other.transformed;
    }
}

/// Whether an output tensor holds weight values rather than their parameters.
fn is_values(spec: &TensorSpec, action: &TensorAction) -> bool {
    match action {
        TensorAction::Keep(_) | TensorAction::Cast(_) => true,
        _ => [".weight", ".weight_packed", ".compressed"]
            .iter()
            .any(|suffix| spec.name.ends_with(suffix)),
    }
}

/// The predicted sizes of one task.
pub fn estimate_task(task: &TaskSpec) -> SizeEstimate {
    let mut e = SizeEstimate {
        layer: task.key.clone(),
        ..SizeEstimate::default()
    };
    for t in &task.tensors {
        e.params += t.info.numel();
        e.input_bytes += t.info.byte_len();
        if !matches!(t.action, TensorAction::Keep(_)) {
            e.transformed += 1;
        }
        for spec in output_specs(&t.out_info(), &t.action) {
            // Specs come from validated headers; an overflow cannot be written either.
            let bytes = spec.byte_len().unwrap_or(u64::MAX);
            e.predicted_bytes = e.predicted_bytes.saturating_add(bytes);
            if !is_values(&spec, &t.action) {
                e.overhead_bytes = e.overhead_bytes.saturating_add(bytes);
            }
        }
    }
    e
}

/// Per-layer predictions in output order, and their total.
pub fn estimate_plan(plan: &JobPlan) -> (Vec<SizeEstimate>, SizeEstimate) {
    let layers: Vec<SizeEstimate> = plan.tasks.iter().map(estimate_task).collect();
    let mut total = SizeEstimate {
        layer: "total".into(),
        ..SizeEstimate::default()
    };
    for l in &layers {
        total.add(l);
    }
    (layers, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use crate::pipeline::plan_job;
    use crate::recipe::Recipe;
    use crate::safetensors::ShardWriter;

    fn checkpoint(dir: &std::path::Path) -> Checkpoint {
        // Two layers of a small Llama-shaped model: 64 x 256 projections, a 256 x 64
        // down projection, norms and an embedding.
        let mut specs = vec![TensorSpec::new(
            "model.embed_tokens.weight",
            crate::DType::BF16,
            vec![32, 64],
        )];
        for l in 0..2 {
            for (name, shape) in [
                ("self_attn.q_proj.weight", vec![64, 64]),
                ("mlp.up_proj.weight", vec![256, 64]),
                ("mlp.down_proj.weight", vec![64, 256]),
                ("input_layernorm.weight", vec![64]),
            ] {
                specs.push(TensorSpec::new(
                    format!("model.layers.{l}.{name}"),
                    crate::DType::BF16,
                    shape,
                ));
            }
        }
        let path = dir.join("model.safetensors");
        let file = std::fs::File::create(&path).expect("create");
        let mut w = ShardWriter::new(file, specs.clone(), &Default::default()).expect("writer");
        for s in &specs {
            let n = s.byte_len().expect("size") as usize;
            let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8 & 0x3f).collect();
            w.write_tensor(&s.name, &bytes).expect("write");
        }
        w.finish().expect("finish");
        Checkpoint::open_local(dir).expect("open")
    }

    #[test]
    fn int8_per_channel_is_one_byte_a_weight_plus_a_scale_per_row() {
        let dir = tempfile::tempdir().expect("tmp");
        let ckpt = checkpoint(dir.path());
        let recipe = Recipe::load("w8a16").expect("preset");
        let plan = plan_job(&ckpt, &recipe).expect("plan");
        let (layers, total) = estimate_plan(&plan);
        let layer0 = layers
            .iter()
            .find(|l| l.layer == "model.layers.0")
            .expect("layer 0");
        // Three linear weights: q 64x64, up 256x64, down 64x256 -> 36864 int8 values; one
        // bf16 scale per output row (64 + 256 + 64 rows) and an i64 pair of shape each in
        // the compressed-tensors layout, plus the bf16 norm (64 values) kept.
        let values = 64 * 64 + 256 * 64 + 64 * 256;
        let scale_dtype_bytes = recipe_scale_bytes(&plan).expect("a scale tensor in the plan");
        let overhead = (64 + 256 + 64) * scale_dtype_bytes;
        assert_eq!(layer0.params, (values + 64) as u64);
        assert_eq!(layer0.input_bytes, 2 * (values + 64) as u64);
        assert!(layer0.overhead_bytes >= overhead as u64, "{layer0:?}");
        assert_eq!(
            layer0.predicted_bytes - layer0.overhead_bytes,
            (values + 2 * 64) as u64,
            "{layer0:?}"
        );
        assert_eq!(
            total.predicted_bytes,
            layers.iter().map(|l| l.predicted_bytes).sum::<u64>()
        );
        assert!(
            total.ratio() > 1.5 && total.bits_per_weight() < 12.0,
            "{total:?}"
        );
    }

    fn recipe_scale_bytes(plan: &JobPlan) -> Option<usize> {
        plan.tasks
            .iter()
            .flat_map(|t| &t.tensors)
            .flat_map(|t| output_specs(&t.out_info(), &t.action))
            .find(|s| s.name.ends_with(".weight_scale"))
            .map(|s| (s.dtype.bits() / 8) as usize)
    }

    #[test]
    fn keeping_everything_predicts_the_input_size() {
        let dir = tempfile::tempdir().expect("tmp");
        let ckpt = checkpoint(dir.path());
        let recipe = Recipe::load("bf16").expect("preset");
        let plan = plan_job(&ckpt, &recipe).expect("plan");
        let (_, total) = estimate_plan(&plan);
        assert_eq!(total.predicted_bytes, total.input_bytes);
        assert_eq!(total.overhead_bytes, 0);
        assert_eq!(total.bits_per_weight(), 16.0);
    }
}
