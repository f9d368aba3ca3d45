//! A Hugging Face checkpoint: one `model.safetensors`, or shards named by
//! `model.safetensors.index.json`, plus the other files of the model directory.
//!
//! Opening validates everything that can be known from headers before any work starts.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::safetensors::{read_header, HeaderError, ShardHeader, TensorInfo};
use crate::source::{ByteSource, LocalFile};

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// File suffixes of weights in other formats, never copied next to compressed safetensors.
const OTHER_WEIGHT_SUFFIXES: [&str; 9] = [
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
];

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A shard's header is invalid.
    #[error("{file}: {source}")]
    Shard {
        /// Shard path.
        file: String,
        /// The problem.
        #[source]
        source: HeaderError,
    },
    /// The index is invalid or disagrees with the shards.
    #[error("{file}: {problem}")]
    Index {
        /// Index path.
        file: String,
        /// The problem.
        problem: String,
    },
    /// The layout is not a checkpoint.
    #[error("{path}: {problem}")]
    Layout {
        /// Path.
        path: String,
        /// The problem.
        problem: String,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Opens a file of the checkpoint by its relative name.
pub type OpenFn<'a> = dyn Fn(&str) -> Result<Arc<dyn ByteSource>, CheckpointError> + 'a;

/// One safetensors file of the checkpoint.
pub struct Shard {
    /// File name relative to the checkpoint root.
    pub file_name: String,
    /// Where its bytes come from.
    pub source: Arc<dyn ByteSource>,
    /// Its validated header.
    pub header: ShardHeader,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("file_name", &self.file_name)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

/// Where a tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLoc {
    /// Index into [`Checkpoint::shards`].
    pub shard: usize,
    /// Index into that shard's header tensors.
    pub index: usize,
}

/// A validated checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Display name of the root (directory or file).
    pub root: String,
    /// Shards in file-name order.
    pub shards: Vec<Shard>,
    /// Every tensor by name.
    pub tensors: BTreeMap<String, TensorLoc>,
    /// Files to carry over unchanged, relative to the root (sorted).
    pub other_files: Vec<String>,
    /// Files neither used nor carried over (weights in other formats, unreferenced shards).
    pub skipped_files: Vec<String>,
    /// Parsed `config.json`, when present.
    pub config: Option<Value>,
}

impl Checkpoint {
    /// Looks up a tensor's header entry.
    pub fn info(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        let loc = self.tensors.get(name)?;
        let shard = self.shards.get(loc.shard)?;
        Some((shard, shard.header.tensors.get(loc.index)?))
    }

    /// Total bytes of tensor data.
    pub fn tensor_bytes(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| s.header.tensors.iter())
            .map(TensorInfo::byte_len)
            .sum()
    }

    /// Opens a local directory, or a single `.safetensors` file.
    pub fn open_local(path: &Path) -> Result<Self, CheckpointError> {
        let meta = std::fs::metadata(path).map_err(|source| CheckpointError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if meta.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let root = path.display().to_string();
            return Self::from_listing(&root, vec![name.clone()], Some(name), &|rel| {
                open_local_file(&dir.join(rel))
            });
        }
        let files = list_dir(path)?;
        let dir = path.to_path_buf();
        Self::from_listing(&path.display().to_string(), files, None, &|rel| {
            open_local_file(&dir.join(rel))
        })
    }

    /// Builds a checkpoint from a list of relative file names and a way to open them.
    /// `only` restricts the checkpoint to one named safetensors file.
    pub fn from_listing(
        root: &str,
        files: Vec<String>,
        only: Option<String>,
        open: &OpenFn<'_>,
    ) -> Result<Self, CheckpointError> {
        let joined = |f: &str| join_display(root, f, only.is_some());
        let file_set: BTreeSet<&str> = files.iter().map(String::as_str).collect();
        let mut index_map: Option<BTreeMap<String, String>> = None;
        let shard_names: Vec<String> = if let Some(one) = &only {
            vec![one.clone()]
        } else if file_set.contains(INDEX_FILE) {
            let src = open(INDEX_FILE)?;
            let map = parse_index(src.as_ref(), &joined(INDEX_FILE))?;
            let names: BTreeSet<String> = map.values().cloned().collect();
            for n in &names {
                if !file_set.contains(n.as_str()) {
                    return Err(CheckpointError::Index {
                        file: joined(INDEX_FILE),
                        problem: format!("names shard {n:?}, which does not exist"),
                    });
                }
            }
            index_map = Some(map);
            names.into_iter().collect()
        } else if file_set.contains(SINGLE_FILE) {
            vec![SINGLE_FILE.to_string()]
        } else {
            let found: Vec<&str> = files
                .iter()
                .map(String::as_str)
                .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
                .collect();
            match found.as_slice() {
                [one] => vec![one.to_string()],
                [] => {
                    return Err(CheckpointError::Layout {
                        path: root.to_string(),
                        problem: format!(
                            "no {SINGLE_FILE}, {INDEX_FILE} or other .safetensors file"
                        ),
                    })
                }
                many => {
                    return Err(CheckpointError::Layout {
                        path: root.to_string(),
                        problem: format!(
                        "{} .safetensors files but no {INDEX_FILE} to say how they fit together",
                        many.len()
                    ),
                    })
                }
            }
        };

        let mut shards = Vec::with_capacity(shard_names.len());
        for name in &shard_names {
            let source = open(name)?;
            let header = read_header(source.as_ref()).map_err(|e| CheckpointError::Shard {
                file: joined(name),
                source: e,
            })?;
            shards.push(Shard {
                file_name: name.clone(),
                source,
                header,
            });
        }

        let mut tensors: BTreeMap<String, TensorLoc> = BTreeMap::new();
        for (si, shard) in shards.iter().enumerate() {
            for (ti, t) in shard.header.tensors.iter().enumerate() {
                if let Some(prev) = tensors.insert(
                    t.name.clone(),
                    TensorLoc {
                        shard: si,
                        index: ti,
                    },
                ) {
                    return Err(CheckpointError::Layout {
                        path: joined(&shard.file_name),
                        problem: format!(
                            "tensor {:?} appears in both {} and {}",
                            t.name, shards[prev.shard].file_name, shard.file_name
                        ),
                    });
                }
            }
        }
        if let Some(map) = &index_map {
            for (tensor, file) in map {
                match tensors.get(tensor) {
                    None => {
                        return Err(CheckpointError::Index {
                            file: joined(INDEX_FILE),
                            problem: format!("tensor {tensor:?} is listed in shard {file:?} but that shard does not contain it"),
                        })
                    }
                    Some(loc) if shards[loc.shard].file_name != *file => {
                        return Err(CheckpointError::Index {
                            file: joined(INDEX_FILE),
                            problem: format!(
                                "tensor {tensor:?} is listed in shard {file:?} but found in {:?}",
                                shards[loc.shard].file_name
                            ),
                        })
                    }
                    Some(_) => {}
                }
            }
            for (name, loc) in &tensors {
                if !map.contains_key(name) {
                    return Err(CheckpointError::Index {
                        file: joined(INDEX_FILE),
                        problem: format!(
                            "shard {:?} holds tensor {name:?}, which the index does not list",
                            shards[loc.shard].file_name
                        ),
                    });
                }
            }
        }

        let used: BTreeSet<&str> = shard_names.iter().map(String::as_str).collect();
        let mut other_files = Vec::new();
        let mut skipped_files = Vec::new();
        if only.is_none() {
            for f in &files {
                if used.contains(f.as_str()) || f == INDEX_FILE {
                    continue;
                }
                let other_weights = f.ends_with(".safetensors")
                    || f.ends_with(".safetensors.index.json")
                    || OTHER_WEIGHT_SUFFIXES.iter().any(|s| f.ends_with(s));
                if other_weights {
                    skipped_files.push(f.clone());
                } else {
                    other_files.push(f.clone());
                }
            }
        }
        other_files.sort();
        skipped_files.sort();

        let config = if other_files.iter().any(|f| f == "config.json") {
            let src = open("config.json")?;
            let bytes = read_small(src.as_ref(), &joined("config.json"))?;
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Layout {
                path: joined("config.json"),
                problem: format!("not valid JSON: {e}"),
            })?;
            if !v.is_object() {
                return Err(CheckpointError::Layout {
                    path: joined("config.json"),
                    problem: "must be a JSON object".into(),
                });
            }
            Some(v)
        } else {
            None
        };

        Ok(Self {
            root: root.to_string(),
            shards,
            tensors,
            other_files,
            skipped_files,
            config,
        })
    }
}

fn join_display(root: &str, file: &str, root_is_file: bool) -> String {
    if root_is_file {
        root.to_string()
    } else {
        format!("{}/{file}", root.trim_end_matches('/'))
    }
}

/// Largest index or config file read whole.
const MAX_SMALL_FILE: u64 = 64 << 20;

fn read_small(src: &dyn ByteSource, display: &str) -> Result<Vec<u8>, CheckpointError> {
    if src.len() > MAX_SMALL_FILE {
        return Err(CheckpointError::Layout {
            path: display.to_string(),
            problem: format!(
                "{} bytes is larger than the {MAX_SMALL_FILE}-byte limit for JSON files",
                src.len()
            ),
        });
    }
    let mut buf = vec![0u8; src.len() as usize];
    src.read_exact_at(0, &mut buf)
        .map_err(|source| CheckpointError::Io {
            path: display.to_string(),
            source,
        })?;
    Ok(buf)
}

fn parse_index(
    src: &dyn ByteSource,
    display: &str,
) -> Result<BTreeMap<String, String>, CheckpointError> {
    let bytes = read_small(src, display)?;
    let bad = |problem: String| CheckpointError::Index {
        file: display.to_string(),
        problem,
    };
    if bytes.starts_with(b"version https://git-lfs") {
        return Err(bad(
            "this is a Git LFS pointer file, not the index; fetch the real file (`git lfs pull`)"
                .into(),
        ));
    }
    let v: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("has no \"weight_map\" object".into()))?;
    let mut out = BTreeMap::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry {tensor:?} is not a string")))?;
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file == ".."
            || file == "."
            || !file.ends_with(".safetensors")
        {
            return Err(bad(format!(
                "weight_map entry {tensor:?} names {file:?}, which is not a plain .safetensors file name"
            )));
        }
        out.insert(tensor.clone(), file.to_string());
    }
    Ok(out)
}

fn open_local_file(path: &Path) -> Result<Arc<dyn ByteSource>, CheckpointError> {
    LocalFile::open(path)
        .map(|f| Arc::new(f) as Arc<dyn ByteSource>)
        .map_err(|source| CheckpointError::Io {
            path: path.display().to_string(),
            source,
        })
}

/// Lists regular files below `root` (following links), skipping hidden directories such as
/// `.git` and `.cache`. Paths are relative with `/` separators, sorted.
pub fn list_dir(root: &Path) -> Result<Vec<String>, CheckpointError> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir).map_err(|source| CheckpointError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| CheckpointError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = rel.join(&name);
            let meta = std::fs::metadata(entry.path()).map_err(|source| CheckpointError::Io {
                path: entry.path().display().to_string(),
                source,
            })?;
            if meta.is_dir() {
                if !name.starts_with('.') {
                    stack.push(child);
                }
            } else if meta.is_file() {
                out.push(child.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}
