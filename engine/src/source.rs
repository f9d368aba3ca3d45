//! Random-access byte sources: the only way the engine reads checkpoint bytes.
//!
//! Readers never assume a file fits in memory; they ask for exact byte ranges. The local file
//! implementation uses positioned reads; object stores implement the same trait with ranged GETs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A read-only, random-access sequence of bytes with a known length.
pub trait ByteSource: Send + Sync {
    /// Total length in bytes.
    fn len(&self) -> u64;

    /// Whether the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes starting at `offset`; fails if the range runs past the end.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// A name for error messages (path or object key).
    fn name(&self) -> &str;
}

/// A local file read with positioned reads.
#[derive(Debug)]
pub struct LocalFile {
    file: File,
    len: u64,
    display: String,
    path: PathBuf,
}

impl LocalFile {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            display: path.display().to_string(),
            path: path.to_path_buf(),
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl ByteSource for LocalFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "range {offset}..{end} runs past the end of the file ({} bytes)",
                    self.len
                ),
            ));
        }
        self.file.read_exact_at(buf, offset)
    }

    fn name(&self) -> &str {
        &self.display
    }
}

/// An in-memory source, used by tests and for small objects.
#[derive(Debug, Clone)]
pub struct MemSource {
    bytes: Vec<u8>,
    name: String,
}

impl MemSource {
    /// Wraps `bytes` under the display name `name`.
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            name: name.into(),
        }
    }
}

impl ByteSource for MemSource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.bytes.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "range runs past the end")
}
