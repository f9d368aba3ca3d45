//! The safetensors file format: validated header reading and streaming writing.

pub mod header;
pub mod writer;

pub use header::{read_header, HeaderError, ShardHeader, TensorInfo, MAX_HEADER_LEN};
pub use writer::{encode_header, ShardWriter, TensorSpec, WriteError};
