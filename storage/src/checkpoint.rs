//! Opening a checkpoint stored under an S3 prefix with the engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use shardpress_engine::source::ByteSource;
use shardpress_engine::{Checkpoint, CheckpointError};

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::error::StorageError;
use crate::store::ObjectStore;
use crate::uri::S3Uri;

/// Why a checkpoint in the object store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenCheckpointError {
    /// Listing the prefix failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The objects do not form a valid checkpoint, or reading a header failed (the engine's
    /// message names the object; a storage failure is its source).
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// Nothing is stored under the prefix.
    #[error("{uri}: no objects under this prefix")]
    Empty {
        /// The prefix.
        uri: String,
    },
    /// The blocking task reading the headers did not finish (runtime shutting down, panic).
    #[error("{uri}: reading the checkpoint headers stopped: {message}")]
    Interrupted {
        /// The prefix.
        uri: String,
        /// What happened to the task.
        message: String,
    },
}

impl OpenCheckpointError {
    /// Whether trying again may succeed: a transient storage failure, directly or behind the
    /// engine's error.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Storage(err) => err.is_retryable(),
            Self::Checkpoint(err) => {
                StorageError::find_in(err).is_some_and(StorageError::is_retryable)
            }
            Self::Empty { .. } | Self::Interrupted { .. } => false,
        }
    }
}

/// HEAD requests in flight at once when a listing lacks entity tags.
const HEAD_CONCURRENCY: usize = 16;

/// Lists `uri` and opens the checkpoint stored there: the engine validates every header
/// (read with two ranged GETs per shard: the 8-byte length, then the JSON) and the index,
/// on a blocking thread of the store's runtime. The shards' sources are
/// [`crate::S3Source`]s, so later tensor reads must also happen on blocking threads.
pub async fn open_checkpoint(
    store: &ObjectStore,
    uri: &S3Uri,
) -> Result<Checkpoint, OpenCheckpointError> {
    open_checkpoint_versions(store, uri).await.map(|(c, _)| c)
}

/// [`open_checkpoint`], also returning each file's entity tag from the listing (relative
/// name to ETag). Headers are read with `If-Match` on those tags, so the headers and the
/// tags describe the same versions; later reads pinned to the tags see the same bytes.
pub async fn open_checkpoint_versions(
    store: &ObjectStore,
    uri: &S3Uri,
) -> Result<(Checkpoint, BTreeMap<String, String>), OpenCheckpointError> {
    let listing = store.list(uri).await?;
    if listing.is_empty() {
        return Err(OpenCheckpointError::Empty {
            uri: uri.to_string(),
        });
    }
    let root = uri.to_string();
    let sizes: BTreeMap<String, u64> = listing.iter().map(|m| (m.rel.clone(), m.size)).collect();
    let mut etags: BTreeMap<String, String> = listing
        .iter()
        .filter_map(|m| Some((m.rel.clone(), m.etag.clone()?)))
        .collect();
    // Some servers list without entity tags; ask for those one by one.
    let untagged: Vec<String> = listing
        .iter()
        .filter(|m| m.etag.is_none())
        .map(|m| m.rel.clone())
        .collect();
    let heads: Vec<(String, Option<String>)> = stream::iter(untagged)
        .map(|rel| async move {
            let key = uri.key(&rel);
            let meta = store.head(&uri.bucket, &key).await?;
            Ok::<_, StorageError>((rel, meta.and_then(|m| m.etag)))
        })
        .buffer_unordered(HEAD_CONCURRENCY)
        .try_collect()
        .await?;
    etags.extend(heads.into_iter().filter_map(|(rel, e)| Some((rel, e?))));
    let task_etags = etags.clone();
    let files: Vec<String> = listing.into_iter().map(|m| m.rel).collect();
    let (task_store, task_uri, task_root) = (store.clone(), uri.clone(), root.clone());
    let task = store.handle().spawn_blocking(move || {
        let open = |rel: &str| -> Result<Arc<dyn ByteSource>, CheckpointError> {
            let display = format!("{task_root}{rel}");
            let Some(&size) = sizes.get(rel) else {
                return Err(CheckpointError::Layout {
                    path: display,
                    problem: "not in the listing of the prefix".into(),
                });
            };
            Ok(Arc::new(task_store.versioned_source(
                &task_uri.bucket,
                &task_uri.key(rel),
                task_etags.get(rel).map(String::as_str),
                size,
                &display,
            )))
        };
        Checkpoint::from_listing(&task_root, files, None, &open)
    });
    match task.await {
        Ok(result) => Ok((result?, etags)),
        Err(err) => Err(OpenCheckpointError::Interrupted {
            uri: root,
            message: err.to_string(),
        }),
    }
}
