//! Any bytes as a sharded checkpoint: the first half is `model.safetensors.index.json`, the
//! rest is split into two shards. Opening either fails cleanly or yields a checkpoint whose
//! every tensor lies inside its shard.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use shardpress_engine::checkpoint::{CheckpointError, INDEX_FILE};
use shardpress_engine::source::{ByteSource, MemSource};
use shardpress_engine::Checkpoint;

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

fuzz_target!(|data: &[u8]| {
    let (index, rest) = data.split_at(data.len() / 2);
    let (a, b) = rest.split_at(rest.len() / 2);
    let files: Vec<(&str, &[u8])> = vec![(INDEX_FILE, index), (SHARDS[0], a), (SHARDS[1], b)];
    let names = files.iter().map(|(n, _)| n.to_string()).collect();
    let open = |rel: &str| -> Result<Arc<dyn ByteSource>, CheckpointError> {
        let bytes = files
            .iter()
            .find(|(n, _)| *n == rel)
            .map(|(_, b)| b.to_vec())
            .unwrap_or_default();
        Ok(Arc::new(MemSource::new(rel, bytes)))
    };
    let Ok(ckpt) = Checkpoint::from_listing("fuzz", names, None, &open) else {
        return;
    };
    for shard in &ckpt.shards {
        for t in &shard.header.tensors {
            assert!(shard.header.data_start() + t.end <= shard.source.len(), "{}", t.name);
        }
    }
});
