//! Parsing and validation of untrusted safetensors headers.
//!
//! Layout: an 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON, then the data
//! section. Every tensor's `data_offsets` are relative to the data section and, sorted, must
//! tile it exactly: no overlap, no hole, no trailing bytes.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::dtype::DType;
use crate::source::ByteSource;

/// Largest header accepted, checked before any allocation.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Bytes before the JSON header.
pub const LEN_PREFIX: u64 = 8;

/// What is wrong with one safetensors file (the caller adds the file name).
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 8 bytes.
    #[error("file is {len} bytes, too short to hold the 8-byte header length (truncated?)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// A Git LFS pointer stands where the data should be.
    #[error(
        "this is a Git LFS pointer file, not tensor data; fetch the real file (`git lfs pull`)"
    )]
    LfsPointer,
    /// Header length above the cap.
    #[error(
        "header length {len} bytes exceeds the {MAX_HEADER_LEN}-byte cap (corrupt or not a safetensors file)"
    )]
    HeaderTooLarge {
        /// Declared length.
        len: u64,
    },
    /// Header runs past the end of the file.
    #[error(
        "header length {len} bytes runs past the end of the file ({file_len} bytes; truncated?)"
    )]
    HeaderPastEof {
        /// Declared length.
        len: u64,
        /// File length.
        file_len: u64,
    },
    /// Header bytes are not UTF-8.
    #[error("header is not valid UTF-8 (at header byte {offset})")]
    NotUtf8 {
        /// Position of the first bad byte within the header.
        offset: usize,
    },
    /// Header is not a JSON object of the expected shape.
    #[error("header is not valid JSON: {0}")]
    Json(String),
    /// Two entries share a name.
    #[error("tensor {0:?} appears twice in the header")]
    Duplicate(String),
    /// `__metadata__` is not a map of strings.
    #[error("__metadata__ must be an object mapping strings to strings: {0}")]
    Metadata(String),
    /// A tensor entry is malformed.
    #[error("tensor {name:?}: {problem}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// Two tensors claim the same bytes.
    #[error(
        "tensors {first:?} (bytes {first_start}..{first_end}) and {second:?} (bytes {second_start}..{second_end}) overlap in the data section"
    )]
    Overlap {
        /// Earlier tensor.
        first: String,
        /// Its start.
        first_start: u64,
        /// Its end.
        first_end: u64,
        /// Later tensor.
        second: String,
        /// Its start.
        second_start: u64,
        /// Its end.
        second_end: u64,
    },
    /// Bytes that no tensor owns between two tensors.
    #[error("data section has a hole: bytes {start}..{end} belong to no tensor (before {next:?})")]
    Hole {
        /// Hole start (data-relative).
        start: u64,
        /// Hole end.
        end: u64,
        /// Tensor after the hole.
        next: String,
    },
    /// Data section longer than the tensors.
    #[error(
        "{count} trailing bytes after the last tensor (data section is {data_len} bytes, tensors end at {end})"
    )]
    Trailing {
        /// Extra bytes.
        count: u64,
        /// Data section length.
        data_len: u64,
        /// Where tensors end.
        end: u64,
    },
    /// A tensor runs past the end of the file.
    #[error(
        "tensor {name:?} ends at data byte {end} but the data section is only {data_len} bytes (truncated file?)"
    )]
    PastEof {
        /// Tensor name.
        name: String,
        /// Its end.
        end: u64,
        /// Data section length.
        data_len: u64,
    },
    /// Reading the file failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

/// One tensor's entry in a header, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// Start of the bytes, relative to the data section.
    pub start: u64,
    /// End (exclusive), relative to the data section.
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Number of bytes of data.
    pub fn byte_len(&self) -> u64 {
        self.end - self.start
    }

    /// Rows and columns when viewed as a matrix: the last dimension is the columns.
    pub fn rows_cols(&self) -> (u64, u64) {
        match self.shape.split_last() {
            None => (1, 1),
            Some((cols, rest)) => (rest.iter().product(), *cols),
        }
    }
}

/// A validated safetensors header.
#[derive(Debug, Clone)]
pub struct ShardHeader {
    /// Length of the JSON header.
    pub header_len: u64,
    /// `__metadata__`, if present.
    pub metadata: BTreeMap<String, String>,
    /// Tensors in data order.
    pub tensors: Vec<TensorInfo>,
}

impl ShardHeader {
    /// Absolute file offset where the data section begins.
    pub fn data_start(&self) -> u64 {
        LEN_PREFIX + self.header_len
    }

    /// Looks a tensor up by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

const LFS_PREFIX: &[u8] = b"version https://git-lfs";

/// Reads and validates the header of a safetensors file from `src`: two reads, the length and
/// the JSON, never the tensor data.
pub fn read_header(src: &dyn ByteSource) -> Result<ShardHeader, HeaderError> {
    let file_len = src.len();
    let mut prefix = [0u8; LEN_PREFIX as usize];
    if file_len < LEN_PREFIX {
        let mut head = vec![0u8; file_len as usize];
        src.read_exact_at(0, &mut head)?;
        if LFS_PREFIX.starts_with(&head) && !head.is_empty() {
            return Err(HeaderError::LfsPointer);
        }
        return Err(HeaderError::TooShort { len: file_len });
    }
    src.read_exact_at(0, &mut prefix)?;
    if prefix == LFS_PREFIX[..8] {
        let mut head = vec![0u8; LFS_PREFIX.len().min(file_len as usize)];
        src.read_exact_at(0, &mut head)?;
        if head == LFS_PREFIX {
            return Err(HeaderError::LfsPointer);
        }
    }
    let header_len = header_len_from_prefix(prefix, file_len)?;
    // Bounded by MAX_HEADER_LEN above, so the allocation is safe.
    let mut json = vec![0u8; header_len as usize];
    src.read_exact_at(LEN_PREFIX, &mut json)?;
    let data_len = file_len - LEN_PREFIX - header_len;
    parse_header_json(&json, data_len)
}

/// Checks the declared header length against the cap and the file length.
pub fn header_len_from_prefix(prefix: [u8; 8], file_len: u64) -> Result<u64, HeaderError> {
    let len = u64::from_le_bytes(prefix);
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { len });
    }
    if LEN_PREFIX + len > file_len {
        return Err(HeaderError::HeaderPastEof { len, file_len });
    }
    Ok(len)
}

/// Parses header JSON and validates it against a data section of `data_len` bytes.
pub fn parse_header_json(json: &[u8], data_len: u64) -> Result<ShardHeader, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        match msg.strip_prefix(DUP_MARK) {
            Some(name) => HeaderError::Duplicate(strip_serde_position(name)),
            None => HeaderError::Json(msg),
        }
    })?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(raw.entries.len());
    for (name, value) in raw.entries {
        if name == "__metadata__" {
            metadata = parse_metadata(value)?;
        } else {
            tensors.push(parse_tensor(name, value)?);
        }
    }
    check_tiling(&mut tensors, data_len)?;
    Ok(ShardHeader {
        header_len: json.len() as u64,
        metadata,
        tensors,
    })
}

fn parse_metadata(value: Value) -> Result<BTreeMap<String, String>, HeaderError> {
    match value {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                other => Err(HeaderError::Metadata(format!(
                    "key {k:?} has a {} value",
                    json_kind(&other)
                ))),
            })
            .collect(),
        other => Err(HeaderError::Metadata(format!(
            "got a {}",
            json_kind(&other)
        ))),
    }
}

fn parse_tensor(name: String, value: Value) -> Result<TensorInfo, HeaderError> {
    let bad = |problem: String| HeaderError::Tensor {
        name: name.clone(),
        problem,
    };
    let Value::Object(map) = value else {
        return Err(bad(format!(
            "entry must be an object, got a {}",
            json_kind(&value)
        )));
    };
    let dtype_name = match map.get("dtype") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(bad(format!("dtype must be a string, got {other}"))),
        None => return Err(bad("missing \"dtype\"".into())),
    };
    let dtype: DType = dtype_name.parse().map_err(|_| {
        bad(format!(
            "unknown dtype {dtype_name:?} (safetensors defines BOOL, U8..U64, I8..I64, F16, BF16, F32, F64, F8_E4M3, F8_E5M2, F8_E8M0, F4, F6_E2M3, F6_E3M2, C64)"
        ))
    })?;
    let shape = match map.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| d.as_u64())
            .collect::<Option<Vec<u64>>>()
            .ok_or_else(|| {
                bad(format!(
                    "shape must be non-negative integers, got {}",
                    Value::Array(dims.clone())
                ))
            })?,
        Some(other) => return Err(bad(format!("shape must be an array, got {other}"))),
        None => return Err(bad("missing \"shape\"".into())),
    };
    let (start, end) = match map.get("data_offsets") {
        Some(Value::Array(o)) if o.len() == 2 => match (o[0].as_u64(), o[1].as_u64()) {
            (Some(s), Some(e)) => (s, e),
            _ => return Err(bad("data_offsets must be two non-negative integers".into())),
        },
        Some(other) => {
            return Err(bad(format!(
                "data_offsets must be [begin, end], got {other}"
            )))
        }
        None => return Err(bad("missing \"data_offsets\"".into())),
    };
    if end < start {
        return Err(bad(format!(
            "data_offsets [{start}, {end}] end before they begin"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows the element count")))?;
    let expected = dtype.byte_size(numel).ok_or_else(|| {
        bad(format!(
            "shape {shape:?} of {dtype} does not make a whole number of bytes"
        ))
    })?;
    if end - start != expected {
        return Err(bad(format!(
            "data_offsets [{start}, {end}] hold {} bytes but shape {shape:?} of {dtype} needs {expected}",
            end - start
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

fn check_tiling(tensors: &mut [TensorInfo], data_len: u64) -> Result<(), HeaderError> {
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    let mut pos = 0u64;
    let mut last: Option<&TensorInfo> = None;
    for t in tensors.iter() {
        if t.start < pos {
            // `last` is set whenever pos > 0.
            if let Some(prev) = last {
                return Err(HeaderError::Overlap {
                    first: prev.name.clone(),
                    first_start: prev.start,
                    first_end: prev.end,
                    second: t.name.clone(),
                    second_start: t.start,
                    second_end: t.end,
                });
            }
        }
        if t.start > pos {
            if t.start > data_len {
                return Err(HeaderError::PastEof {
                    name: t.name.clone(),
                    end: t.end,
                    data_len,
                });
            }
            return Err(HeaderError::Hole {
                start: pos,
                end: t.start,
                next: t.name.clone(),
            });
        }
        if t.end > data_len {
            return Err(HeaderError::PastEof {
                name: t.name.clone(),
                end: t.end,
                data_len,
            });
        }
        if t.end > pos {
            pos = t.end;
            last = Some(t);
        } else if last.is_none() {
            last = Some(t);
        }
    }
    if pos < data_len {
        return Err(HeaderError::Trailing {
            count: data_len - pos,
            data_len,
            end: pos,
        });
    }
    Ok(())
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

const DUP_MARK: &str = "duplicate entry ";

fn strip_serde_position(msg: &str) -> String {
    let name = msg.split(" at line ").next().unwrap_or(msg);
    serde_json::from_str::<String>(name).unwrap_or_else(|_| name.to_string())
}

/// Header entries in file order, refusing duplicate keys (which `serde_json::Map` would
/// silently merge).
struct RawHeader {
    entries: Vec<(String, Value)>,
}

impl<'de> de::Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RawHeaderVisitor)
    }
}

struct RawHeaderVisitor;

impl<'de> Visitor<'de> for RawHeaderVisitor {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let quoted = serde_json::to_string(&key).unwrap_or_default();
                return Err(de::Error::custom(format!("{DUP_MARK}{quoted}")));
            }
            let value: Value = map.next_value()?;
            entries.push((key, value));
        }
        Ok(RawHeader { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, data_len: u64) -> Result<ShardHeader, HeaderError> {
        parse_header_json(json.as_bytes(), data_len)
    }

    #[test]
    fn valid_header_sorted_by_offset() {
        let h = parse(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}}"#,
            16,
        )
        .expect("valid");
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        assert_eq!(h.tensors[0].name, "b");
        assert_eq!(h.tensors[1].name, "a");
        assert_eq!(h.tensors[1].rows_cols(), (2, 2));
    }

    #[test]
    fn scalar_and_empty_tensors_are_valid() {
        let h = parse(
            r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"z":{"dtype":"F16","shape":[0,7],"data_offsets":[4,4]}}"#,
            4,
        )
        .expect("valid");
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensor("s").map(TensorInfo::numel), Some(1));
        assert_eq!(h.tensor("z").map(TensorInfo::byte_len), Some(0));
    }

    #[test]
    fn duplicate_names_are_refused() {
        let e = parse(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        )
        .expect_err("duplicate");
        assert_eq!(e.to_string(), "tensor \"a\" appears twice in the header");
    }

    #[test]
    fn overlap_hole_trailing_and_eof() {
        let overlap = parse(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            8,
        );
        assert!(
            matches!(overlap, Err(HeaderError::Overlap { .. })),
            "{overlap:?}"
        );
        let hole = parse(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
        );
        assert!(
            matches!(
                hole,
                Err(HeaderError::Hole {
                    start: 4,
                    end: 8,
                    ..
                })
            ),
            "{hole:?}"
        );
        let trailing = parse(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            6,
        );
        assert!(
            matches!(trailing, Err(HeaderError::Trailing { count: 2, .. })),
            "{trailing:?}"
        );
        let eof = parse(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            4,
        );
        assert!(matches!(eof, Err(HeaderError::PastEof { .. })), "{eof:?}");
    }

    #[test]
    fn wrong_sizes_and_dtypes() {
        let e = parse(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        )
        .expect_err("size");
        assert!(e.to_string().contains("needs 12"), "{e}");
        let e = parse(
            r#"{"a":{"dtype":"Q4","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        )
        .expect_err("dtype");
        assert!(
            e.to_string()
                .starts_with("tensor \"a\": unknown dtype \"Q4\""),
            "{e}"
        );
        let e = parse(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
            8,
        )
        .expect_err("overflow");
        assert!(e.to_string().contains("overflows"), "{e}");
    }

    #[test]
    fn not_an_object() {
        assert!(matches!(parse("[1,2]", 0), Err(HeaderError::Json(_))));
        assert!(matches!(parse("{", 0), Err(HeaderError::Json(_))));
        assert!(matches!(
            parse_header_json(&[b'{', 0xff, b'}'], 0),
            Err(HeaderError::NotUtf8 { offset: 1 })
        ));
    }

    #[test]
    fn space_padded_header_is_valid() {
        let h = parse(
            "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}     ",
            1,
        )
        .expect("valid");
        assert_eq!(h.header_len, 58);
    }

    #[test]
    fn header_length_checks() {
        let huge = (1u64 << 40).to_le_bytes();
        assert!(matches!(
            header_len_from_prefix(huge, 100),
            Err(HeaderError::HeaderTooLarge { .. })
        ));
        assert!(matches!(
            header_len_from_prefix(50u64.to_le_bytes(), 40),
            Err(HeaderError::HeaderPastEof { .. })
        ));
    }
}
