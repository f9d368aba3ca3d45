//! Numeric kernels: element conversion and quantization.

pub mod convert;
pub mod int_quant;
