//! [`S3Source`]: an object read with ranged GETs through the engine's synchronous
//! [`ByteSource`] trait.

use std::io;

use futures::stream::{self, TryStreamExt};
use shardpress_engine::source::ByteSource;

use crate::error::StorageError;
use crate::store::ObjectStore;

/// Reads larger than this are split into ranges of this size fetched concurrently.
pub const READ_CHUNK: usize = 16 << 20;

/// Ranges of one large read in flight at once.
const READ_CONCURRENCY: usize = 4;

/// One object as a random-access byte source. Each `read_exact_at` is one ranged GET (or a
/// few concurrent ones for reads above [`READ_CHUNK`]); nothing is cached.
///
/// `read_exact_at` blocks the calling thread on the store's Tokio runtime
/// (`Handle::block_on`). Call it only where blocking is allowed — inside
/// `tokio::task::spawn_blocking` or on a plain thread — never from async code, where Tokio
/// panics ("Cannot start a runtime from within a runtime").
#[derive(Debug, Clone)]
pub struct S3Source {
    store: ObjectStore,
    bucket: String,
    key: String,
    len: u64,
    display: String,
    etag: Option<String>,
}

impl S3Source {
    /// A source for `bucket`/`key` of `len` bytes (known from a listing or HEAD).
    pub fn new(store: ObjectStore, bucket: &str, key: &str, len: u64, display_name: &str) -> Self {
        Self {
            store,
            bucket: bucket.to_string(),
            key: key.to_string(),
            len,
            display: display_name.to_string(),
            etag: None,
        }
    }

    /// Reads only the version with entity tag `etag` (none: whatever is current).
    pub fn pinned(mut self, etag: Option<&str>) -> Self {
        self.etag = etag.map(str::to_string);
        self
    }

    /// Bucket of the object.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Key of the object.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Fills `buf` from `offset`, splitting large reads into concurrent ranges.
    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        if buf.len() <= READ_CHUNK {
            return self
                .store
                .read_version_range_into(&self.bucket, &self.key, self.etag.as_deref(), offset, buf)
                .await;
        }
        let pieces = buf
            .chunks_mut(READ_CHUNK)
            .enumerate()
            .map(|(i, piece)| Ok::<_, StorageError>((offset + (i * READ_CHUNK) as u64, piece)));
        stream::iter(pieces)
            .try_for_each_concurrent(READ_CONCURRENCY, |(start, piece)| async move {
                self.store
                    .read_version_range_into(
                        &self.bucket,
                        &self.key,
                        self.etag.as_deref(),
                        start,
                        piece,
                    )
                    .await
            })
            .await
    }
}

impl ByteSource for S3Source {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(StorageError::RangeNotSatisfiable {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                start: offset,
                end: end.unwrap_or(u64::MAX),
                size: Some(self.len),
            }
            .into_io());
        }
        self.store
            .handle()
            .block_on(self.read_into(offset, buf))
            .map_err(StorageError::into_io)
    }

    fn name(&self) -> &str {
        &self.display
    }
}
