//! Shardpress engine: checkpoint formats, recipes, planning and compression kernels.
//!
//! Pure and synchronous: byte ranges come in through [`source::ByteSource`], safetensors
//! files go out through any `std::io::Write`. The CLI, coordinator and workers build on it.

pub mod checkpoint;
pub mod codec;
pub mod decompress;
pub mod dtype;
pub mod estimate;
pub mod hf_config;
pub mod kernels;
pub mod memory;
pub mod metrics;
pub mod pipeline;
pub mod plan;
pub mod recipe;
pub mod report;
pub mod report_render;
pub mod safetensors;
pub mod source;
pub mod stream;
pub mod structured;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use dtype::DType;
pub use memory::{MemoryPool, PoolStats};
pub use pipeline::{compress_local, CompressError, LocalOptions, LocalRun, Progress};
pub use recipe::Recipe;
pub use report::Report;
