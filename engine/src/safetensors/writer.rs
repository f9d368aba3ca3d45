//! Streaming safetensors writer: the header is computed from the declared tensors up front,
//! then tensor bytes are appended in order, so no tensor is ever held whole by the writer.

use std::collections::BTreeMap;
use std::io::Write;

use crate::dtype::DType;

/// A tensor the writer will emit: its bytes must follow in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Creates a spec.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<u64>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Exact byte length of the data, or `None` if it overflows or is not whole bytes.
    pub fn byte_len(&self) -> Option<u64> {
        let numel = self
            .shape
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))?;
        self.dtype.byte_size(numel)
    }
}

/// Errors from writing a shard.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A spec cannot be written.
    #[error("tensor {name:?}: {problem}")]
    Spec {
        /// Tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// Bytes were written in the wrong amount or order.
    #[error("tensor {name:?}: {problem}")]
    Sequence {
        /// Tensor name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// The sink failed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The encoded header (length prefix plus JSON padded with spaces so the data section starts
/// on an 8-byte boundary) and each tensor's byte length.
pub fn encode_header(
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<u64>), WriteError> {
    let mut json = String::from("{");
    let mut first = true;
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":");
        json.push_str(
            &serde_json::to_string(metadata).map_err(|e| WriteError::Spec {
                name: "__metadata__".into(),
                problem: e.to_string(),
            })?,
        );
        first = false;
    }
    let mut offset = 0u64;
    let mut lens = Vec::with_capacity(specs.len());
    let mut seen = std::collections::HashSet::new();
    for spec in specs {
        if !seen.insert(spec.name.as_str()) || spec.name == "__metadata__" {
            return Err(WriteError::Spec {
                name: spec.name.clone(),
                problem: "name used twice".into(),
            });
        }
        let len = spec.byte_len().ok_or_else(|| WriteError::Spec {
            name: spec.name.clone(),
            problem: format!(
                "shape {:?} of {} has no whole byte size",
                spec.shape, spec.dtype
            ),
        })?;
        let end = offset.checked_add(len).ok_or_else(|| WriteError::Spec {
            name: spec.name.clone(),
            problem: "data offsets overflow".into(),
        })?;
        if !first {
            json.push(',');
        }
        first = false;
        let name = serde_json::to_string(&spec.name).map_err(|e| WriteError::Spec {
            name: spec.name.clone(),
            problem: e.to_string(),
        })?;
        let shape: Vec<String> = spec.shape.iter().map(u64::to_string).collect();
        json.push_str(&format!(
            "{name}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            spec.dtype,
            shape.join(",")
        ));
        lens.push(len);
        offset = end;
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Ok((out, lens))
}

/// Writes one safetensors file tensor by tensor.
#[derive(Debug)]
pub struct ShardWriter<W: Write> {
    sink: W,
    specs: Vec<TensorSpec>,
    lens: Vec<u64>,
    current: usize,
    written: u64,
    total: u64,
}

impl<W: Write> ShardWriter<W> {
    /// Writes the header for `specs` to `sink`; the tensors' bytes must follow in that order.
    pub fn new(
        mut sink: W,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self, WriteError> {
        let (header, lens) = encode_header(&specs, metadata)?;
        sink.write_all(&header)?;
        Ok(Self {
            sink,
            specs,
            lens,
            current: 0,
            written: 0,
            total: header.len() as u64,
        })
    }

    fn skip_empty(&mut self) {
        while self.current < self.specs.len() && self.lens[self.current] == self.written {
            self.current += 1;
            self.written = 0;
        }
    }

    /// Appends bytes of the current tensor; a chunk may not cross into the next tensor.
    pub fn write_chunk(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.skip_empty();
        let Some(spec) = self.specs.get(self.current) else {
            return Err(WriteError::Sequence {
                name: name.into(),
                problem: "bytes written after the last declared tensor".into(),
            });
        };
        if spec.name != name {
            return Err(WriteError::Sequence {
                name: name.into(),
                problem: format!("written out of order: expected bytes of {:?}", spec.name),
            });
        }
        let left = self.lens[self.current] - self.written;
        if bytes.len() as u64 > left {
            return Err(WriteError::Sequence {
                name: name.into(),
                problem: format!(
                    "{} bytes written but only {left} remain of its {} bytes",
                    bytes.len(),
                    self.lens[self.current]
                ),
            });
        }
        self.sink.write_all(bytes)?;
        self.written += bytes.len() as u64;
        self.total += bytes.len() as u64;
        Ok(())
    }

    /// Writes a whole tensor's bytes.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        self.skip_empty();
        let expected = self
            .specs
            .get(self.current)
            .filter(|s| s.name == name)
            .map(|_| self.lens[self.current] - self.written);
        if let Some(expected) = expected {
            if expected != bytes.len() as u64 {
                return Err(WriteError::Sequence {
                    name: name.into(),
                    problem: format!("{} bytes given, {expected} declared", bytes.len()),
                });
            }
        }
        self.write_chunk(name, bytes)
    }

    /// Checks every declared tensor was written in full and returns the sink and file length.
    pub fn finish(mut self) -> Result<(W, u64), WriteError> {
        self.skip_empty();
        if let Some(spec) = self.specs.get(self.current) {
            return Err(WriteError::Sequence {
                name: spec.name.clone(),
                problem: format!(
                    "only {} of {} bytes written before finish",
                    self.written, self.lens[self.current]
                ),
            });
        }
        self.sink.flush()?;
        Ok((self.sink, self.total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::header::parse_header_json;

    #[test]
    fn header_is_aligned_and_parses_back() {
        let specs = vec![
            TensorSpec::new("w", DType::F32, vec![2, 3]),
            TensorSpec::new("empty", DType::BF16, vec![0]),
            TensorSpec::new("s", DType::I64, vec![]),
        ];
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let (header, lens) = encode_header(&specs, &meta).expect("encode");
        assert_eq!(header.len() % 8, 0);
        assert_eq!(lens, vec![24, 0, 8]);
        let h = parse_header_json(&header[8..], 32).expect("parse");
        assert_eq!(h.tensor("s").map(|t| (t.start, t.end)), Some((24, 32)));
        assert_eq!(h.metadata, meta);
    }

    #[test]
    fn writer_enforces_order_and_sizes() {
        let specs = vec![
            TensorSpec::new("a", DType::U8, vec![3]),
            TensorSpec::new("b", DType::U8, vec![1]),
        ];
        let mut w = ShardWriter::new(Vec::new(), specs.clone(), &BTreeMap::new()).expect("new");
        assert!(w.write_chunk("b", &[1]).is_err());
        w.write_chunk("a", &[1, 2]).expect("chunk");
        assert!(w.write_chunk("a", &[3, 4]).is_err());
        w.write_chunk("a", &[3]).expect("chunk");
        let w2 = ShardWriter::new(Vec::new(), specs, &BTreeMap::new()).expect("new");
        assert!(w2.finish().is_err());
        w.write_tensor("b", &[9]).expect("b");
        let (bytes, len) = w.finish().expect("finish");
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(&bytes[bytes.len() - 4..], &[1, 2, 3, 9]);
    }
}
