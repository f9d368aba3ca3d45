//! [`MultipartWriter`]: a synchronous `std::io::Write` that streams into an S3 multipart
//! upload, hashing what it writes.

use std::collections::VecDeque;
use std::fmt;
use std::io;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::CompletedPart;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::error::StorageError;
use crate::store::ObjectStore;

/// Size of every part but the last (S3 requires at least 5 MiB).
pub const PART_SIZE: usize = 8 << 20;

/// Most parts an S3 multipart upload may have; with [`PART_SIZE`] that caps one object at
/// 80 000 MiB.
pub const MAX_PARTS: i32 = 10_000;

/// Part uploads running in the background while the writer fills the next part.
const MAX_IN_FLIGHT: usize = 2;

/// Most bytes a writer holds: the part being filled and the parts in flight.
pub const UPLOAD_MEMORY: u64 = ((MAX_IN_FLIGHT + 1) * PART_SIZE) as u64;

type PartUpload = JoinHandle<Result<CompletedPart, StorageError>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Accepting writes.
    Open,
    /// A failure aborted the upload; every further call fails.
    Failed,
    /// Completed or explicitly aborted; nothing left to clean up.
    Closed,
}

/// Uploads everything written to it as one object, in [`PART_SIZE`] parts, while computing
/// the SHA-256 and byte count of the data.
///
/// Nothing is visible at the key until [`MultipartWriter::finish`] succeeds. An output
/// smaller than one part is stored with a single PutObject; larger ones use a multipart
/// upload whose full parts are sent in the background (up to two at a time) while the
/// next part fills. `flush` does nothing: parts can only be sent once full.
///
/// If a part fails, the writer aborts the multipart upload and fails every later call. If
/// it is dropped without `finish` (an error elsewhere, a panic), the abort is started as a
/// task on the store's runtime without blocking the dropping thread; call
/// [`MultipartWriter::abort`] to abort and wait. Either way no upload is left behind as
/// long as the runtime keeps running long enough to send the abort.
///
/// Like [`crate::S3Source`], `write`, `finish` and `abort` block on the store's Tokio runtime:
/// use the writer only inside `tokio::task::spawn_blocking` or on a plain thread.
pub struct MultipartWriter {
    store: ObjectStore,
    bucket: String,
    key: String,
    buf: Vec<u8>,
    hasher: Sha256,
    written: u64,
    upload_id: Option<String>,
    next_part: i32,
    in_flight: VecDeque<PartUpload>,
    done: Vec<CompletedPart>,
    state: State,
}

impl fmt::Debug for MultipartWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultipartWriter")
            .field("bucket", &self.bucket)
            .field("key", &self.key)
            .field("written", &self.written)
            .field("upload_id", &self.upload_id)
            .field("parts_sent", &(self.next_part - 1))
            .field("state", &self.state)
            .finish()
    }
}

impl MultipartWriter {
    pub(crate) fn new(store: ObjectStore, bucket: &str, key: &str) -> Self {
        Self {
            store,
            bucket: bucket.to_string(),
            key: key.to_string(),
            buf: Vec::new(),
            hasher: Sha256::new(),
            written: 0,
            upload_id: None,
            next_part: 1,
            in_flight: VecDeque::new(),
            done: Vec::new(),
            state: State::Open,
        }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Uploads what is buffered, completes the upload and returns the number of bytes and
    /// the SHA-256 (lowercase hex) of everything written. On failure the upload is aborted.
    /// The stored object's size is checked against the bytes written.
    pub fn finish(mut self) -> Result<(u64, String), StorageError> {
        self.check_open()?;
        let handle = self.store.handle().clone();
        match handle.block_on(self.complete()) {
            Ok(()) => {
                self.state = State::Closed;
                let digest = std::mem::take(&mut self.hasher).finalize();
                Ok((self.written, hex::encode(digest)))
            }
            Err(err) => {
                self.fail();
                Err(err)
            }
        }
    }

    /// Abandons the upload: waits for part uploads still running, then aborts the
    /// multipart upload, waiting for the server to confirm.
    pub fn abort(mut self) -> Result<(), StorageError> {
        let Some(upload_id) = self.upload_id.take() else {
            self.state = State::Closed;
            return Ok(());
        };
        self.state = State::Closed;
        let in_flight = std::mem::take(&mut self.in_flight);
        let store = self.store.clone();
        store.handle().block_on(abort_upload(
            store.clone(),
            self.bucket.clone(),
            self.key.clone(),
            upload_id,
            in_flight,
        ))
    }

    fn check_open(&self) -> Result<(), StorageError> {
        match self.state {
            State::Open => Ok(()),
            State::Failed | State::Closed => Err(StorageError::Upload {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                problem: "an earlier failure aborted this upload".into(),
            }),
        }
    }

    /// Marks the writer failed and aborts the upload, blocking until the server answers.
    fn fail(&mut self) {
        self.state = State::Failed;
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let in_flight = std::mem::take(&mut self.in_flight);
        let store = self.store.clone();
        let result = store.handle().block_on(abort_upload(
            store.clone(),
            self.bucket.clone(),
            self.key.clone(),
            upload_id,
            in_flight,
        ));
        if let Err(err) = result {
            tracing::warn!(error = %err, "could not abort a failed multipart upload");
        }
    }

    /// Sends the buffered bytes as the next part in the background, starting the multipart
    /// upload first if needed, and waits for the oldest part when too many are running.
    async fn send_part(&mut self) -> Result<(), StorageError> {
        if self.next_part > MAX_PARTS {
            return Err(StorageError::Upload {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                problem: format!(
                    "more than {MAX_PARTS} parts of {PART_SIZE} bytes; the object is too large"
                ),
            });
        }
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self
                    .store
                    .create_multipart_upload(&self.bucket, &self.key)
                    .await?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        let data = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(PART_SIZE),
        ));
        let number = self.next_part;
        self.next_part += 1;
        let client = self.store.client().clone();
        let (bucket, key) = (self.bucket.clone(), self.key.clone());
        self.in_flight
            .push_back(self.store.handle().spawn(async move {
                let len = data.len() as i64;
                let output = client
                    .upload_part()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(len)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|e| StorageError::from_sdk("UploadPart", &bucket, &key, e))?;
                Ok(CompletedPart::builder()
                    .set_e_tag(output.e_tag().map(str::to_string))
                    .part_number(number)
                    .build())
            }));
        while self.in_flight.len() > MAX_IN_FLIGHT {
            self.wait_oldest().await?;
        }
        Ok(())
    }

    async fn wait_oldest(&mut self) -> Result<(), StorageError> {
        let Some(task) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let part = task.await.map_err(|e| StorageError::Upload {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            problem: format!("a part upload task stopped: {e}"),
        })??;
        self.done.push(part);
        Ok(())
    }

    /// Stores the data: one PutObject when no part was sent, else the last part and
    /// CompleteMultipartUpload. Then checks the stored size.
    async fn complete(&mut self) -> Result<(), StorageError> {
        if self.upload_id.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buf));
            self.store.put(&self.bucket, &self.key, data).await?;
        } else {
            if !self.buf.is_empty() {
                self.send_part().await?;
            }
            while !self.in_flight.is_empty() {
                self.wait_oldest().await?;
            }
            let parts = std::mem::take(&mut self.done);
            let upload_id = self.upload_id.clone().unwrap_or_default();
            self.store
                .complete_multipart_upload(&self.bucket, &self.key, &upload_id, parts)
                .await?;
            // Completed: there is no upload left to abort.
            self.upload_id = None;
        }
        let stored = self.store.head(&self.bucket, &self.key).await?;
        match stored {
            Some(meta) if meta.size == self.written => Ok(()),
            other => Err(StorageError::Upload {
                bucket: self.bucket.clone(),
                key: self.key.clone(),
                problem: match other {
                    Some(meta) => format!(
                        "the stored object is {} bytes but {} were written",
                        meta.size, self.written
                    ),
                    None => "the object is missing after the upload completed".into(),
                },
            }),
        }
    }
}

impl io::Write for MultipartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check_open()?;
        let mut rest = data;
        while !rest.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(PART_SIZE);
            }
            let take = (PART_SIZE - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == PART_SIZE {
                let handle = self.store.handle().clone();
                if let Err(err) = handle.block_on(self.send_part()) {
                    self.fail();
                    return Err(err.into_io());
                }
            }
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.check_open()?;
        Ok(())
    }
}

impl Drop for MultipartWriter {
    fn drop(&mut self) {
        if self.state != State::Open {
            return;
        }
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        // Dropping may happen anywhere, even in async code or while unwinding, so the abort
        // runs as a task instead of blocking here.
        let in_flight = std::mem::take(&mut self.in_flight);
        let store = self.store.clone();
        let (bucket, key) = (self.bucket.clone(), self.key.clone());
        tracing::debug!(bucket = %bucket, key = %key, "aborting an unfinished multipart upload");
        self.store.handle().spawn(async move {
            if let Err(err) = abort_upload(store, bucket, key, upload_id, in_flight).await {
                tracing::warn!(error = %err, "could not abort an unfinished multipart upload");
            }
        });
    }
}

/// Waits for the part uploads still running (a part arriving after the abort could
/// otherwise survive it), then aborts the multipart upload.
async fn abort_upload(
    store: ObjectStore,
    bucket: String,
    key: String,
    upload_id: String,
    in_flight: VecDeque<PartUpload>,
) -> Result<(), StorageError> {
    // Parts still being sent are allowed to finish rather than cancelled: a cancelled
    // request may still be stored by the server after the abort, leaving a stray part.
    for task in in_flight {
        // Failed or finished: all that matters is that it no longer runs.
        let _ = task.await;
    }
    store
        .abort_multipart_upload(&bucket, &key, &upload_id)
        .await
}
