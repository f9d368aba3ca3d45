//! Element types of the safetensors format.

use std::fmt;
use std::str::FromStr;

/// An element type as named in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// Boolean, one byte per element.
    Bool,
    /// 4-bit float (e2m1), two elements per byte.
    F4,
    /// 6-bit float e2m3.
    F6E2M3,
    /// 6-bit float e3m2.
    F6E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float e5m2.
    F8E5M2,
    /// 8-bit float e4m3 (finite, no infinities).
    F8E4M3,
    /// 8-bit exponent-only scale (e8m0).
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex of two f32.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

const ALL: [(DType, &str, u32); 20] = [
    (DType::Bool, "BOOL", 8),
    (DType::F4, "F4", 4),
    (DType::F6E2M3, "F6_E2M3", 6),
    (DType::F6E3M2, "F6_E3M2", 6),
    (DType::U8, "U8", 8),
    (DType::I8, "I8", 8),
    (DType::F8E5M2, "F8_E5M2", 8),
    (DType::F8E4M3, "F8_E4M3", 8),
    (DType::F8E8M0, "F8_E8M0", 8),
    (DType::I16, "I16", 16),
    (DType::U16, "U16", 16),
    (DType::F16, "F16", 16),
    (DType::BF16, "BF16", 16),
    (DType::I32, "I32", 32),
    (DType::U32, "U32", 32),
    (DType::F32, "F32", 32),
    (DType::C64, "C64", 64),
    (DType::F64, "F64", 64),
    (DType::I64, "I64", 64),
    (DType::U64, "U64", 64),
];

impl DType {
    /// The name used in safetensors headers, e.g. `BF16`.
    pub fn name(self) -> &'static str {
        ALL.iter()
            .find(|(d, _, _)| *d == self)
            .map_or("?", |(_, n, _)| n)
    }

    /// Size of one element in bits.
    pub fn bits(self) -> u32 {
        ALL.iter()
            .find(|(d, _, _)| *d == self)
            .map_or(0, |(_, _, b)| *b)
    }

    /// Byte size of `numel` elements, or `None` on overflow or when the elements do not fill
    /// whole bytes.
    pub fn byte_size(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(u64::from(self.bits()))?;
        if bits % 8 != 0 {
            return None;
        }
        Some(bits / 8)
    }

    /// Whether the engine can decode this type to f32 and transform it.
    pub fn is_transformable_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A dtype name that the safetensors format does not define.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown dtype {0:?}")]
pub struct UnknownDType(pub String);

impl serde::Serialize for DType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for DType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for DType {
    type Err = UnknownDType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL.iter()
            .find(|(_, n, _)| *n == s)
            .map(|(d, _, _)| *d)
            .ok_or_else(|| UnknownDType(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (d, n, _) in ALL {
            assert_eq!(d.name(), n);
            assert_eq!(n.parse::<DType>(), Ok(d));
        }
        assert_eq!(
            "Q4_K".parse::<DType>(),
            Err(UnknownDType("Q4_K".to_string()))
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(DType::BF16.byte_size(3), Some(6));
        assert_eq!(DType::F4.byte_size(4), Some(2));
        assert_eq!(DType::F4.byte_size(3), None);
        assert_eq!(DType::F6E2M3.byte_size(4), Some(3));
        assert_eq!(DType::I64.byte_size(u64::MAX / 4), None);
        assert_eq!(DType::F32.byte_size(0), Some(0));
    }
}
