//! Small generated checkpoints for tests.

use std::path::Path;

use shardpress_engine::safetensors::{ShardWriter, TensorSpec};

/// Writes `dir/model.safetensors` holding `specs` (F32) filled with seeded pseudo-random
/// values in [-0.5, 0.5), the same bytes on every run.
pub fn write_f32_checkpoint(dir: &Path, specs: &[TensorSpec]) {
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let mut w = ShardWriter::new(file, specs.to_vec(), &Default::default())
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for s in specs {
        let n: u64 = s.shape.iter().product();
        let mut bytes = Vec::with_capacity(n as usize * 4);
        for _ in 0..n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let v = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        w.write_tensor(&s.name, &bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", s.name));
    }
    w.finish()
        .unwrap_or_else(|e| panic!("cannot finish {}: {e}", path.display()));
}
