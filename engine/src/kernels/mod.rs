//! Numeric kernels: element conversion, integer and FP8 quantization, pruning masks and
//! sparse bitmask storage.

pub mod bitmask;
pub mod convert;
pub mod fp8;
pub mod int_quant;
pub mod lanes;
pub mod prune;
