//! [`ObjectStore`]: the async object operations Shardpress needs, with checked lengths and
//! classified errors.

use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use tokio::runtime::Handle;

use crate::error::{error_chain, StorageError};
use crate::multipart::MultipartWriter;
use crate::settings::{
    s3_client, S3Settings, INITIAL_BACKOFF, MAX_ATTEMPTS, MAX_BACKOFF, READ_TIMEOUT,
};
use crate::source::S3Source;
use crate::uri::S3Uri;

/// Largest object CopyObject copies in one request (an S3 limit).
pub const MAX_SINGLE_COPY: u64 = 5 << 30;

/// Part size of copies larger than [`MAX_SINGLE_COPY`].
const COPY_PART_SIZE: u64 = 512 << 20;

/// Parts copied at once in a multipart copy.
const COPY_CONCURRENCY: usize = 4;

/// One object of a listing, or the answer to a HEAD request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the listed prefix (the full key for [`ObjectStore::head`]).
    pub rel: String,
    /// Size in bytes.
    pub size: u64,
    /// Entity tag without the surrounding quotes, when the server sent one.
    pub etag: Option<String>,
}

/// Access to an S3-compatible object store. Cheap to clone (the SDK client is reference
/// counted).
///
/// The async methods may run on any Tokio runtime. The synchronous adapters —
/// [`ObjectStore::byte_source`] and [`ObjectStore::multipart_writer`] — drive requests with
/// `Handle::block_on` on the runtime captured here, so they may only be used from threads
/// that are allowed to block, such as `tokio::task::spawn_blocking` tasks or plain threads,
/// never from async code.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    client: Client,
    handle: Handle,
    body_retry: BodyRetry,
}

/// How reads retry response bodies that break off or stall after the response started
/// (the SDK retries only failed requests, not bodies): with the client's own attempts,
/// backoff and read timeout, resuming from the first byte not yet received.
#[derive(Debug, Clone, Copy)]
struct BodyRetry {
    /// Attempts at one read, the first included.
    attempts: u32,
    /// Bound of the first pause.
    initial_backoff: Duration,
    /// Largest bound of a pause.
    max_backoff: Duration,
    /// Longest wait for the next piece of a body.
    stall_timeout: Duration,
}

impl BodyRetry {
    fn of(client: &Client) -> Self {
        let config = client.config();
        let retry = config.retry_config();
        Self {
            attempts: retry.map_or(MAX_ATTEMPTS, |r| r.max_attempts()).max(1),
            initial_backoff: retry.map_or(INITIAL_BACKOFF, |r| r.initial_backoff()),
            max_backoff: retry.map_or(MAX_BACKOFF, |r| r.max_backoff()),
            stall_timeout: config
                .timeout_config()
                .and_then(|t| t.read_timeout())
                .unwrap_or(READ_TIMEOUT),
        }
    }

    /// The pause after failed attempt `attempt` (1 = the first): drawn uniformly below
    /// `initial_backoff × 2^(attempt-1)`, capped at `max_backoff` (full jitter, as the SDK
    /// does), so readers that failed together do not come back together.
    fn pause(&self, attempt: u32) -> Duration {
        let bound = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max_backoff);
        bound.mul_f64(rand::random::<f64>())
    }
}

impl ObjectStore {
    /// Wraps `client`, capturing the current Tokio runtime for the synchronous adapters.
    ///
    /// # Panics
    /// When called outside a Tokio runtime; use [`ObjectStore::with_handle`] there.
    pub fn new(client: Client) -> Self {
        Self::with_handle(client, Handle::current())
    }

    /// Wraps `client`; the synchronous adapters run their requests on `handle`.
    pub fn with_handle(client: Client, handle: Handle) -> Self {
        let body_retry = BodyRetry::of(&client);
        Self {
            client,
            handle,
            body_retry,
        }
    }

    /// Builds a client from `settings` and the AWS credential chain (see
    /// [`crate::s3_client`]) and wraps it.
    pub async fn connect(settings: &S3Settings) -> Self {
        Self::new(s3_client(settings).await)
    }

    /// The SDK client, for operations this type does not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The runtime the synchronous adapters use.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Lists every object below `uri`, following continuation tokens, sorted by key.
    /// Keys ending in `/` (folder markers) are left out.
    pub async fn list(&self, uri: &S3Uri) -> Result<Vec<ObjectMeta>, StorageError> {
        self.list_with_page_size(uri, None).await
    }

    /// Like [`ObjectStore::list`] with at most `page_size` keys per ListObjectsV2 request
    /// (the server's default, usually 1000, when `None`).
    pub async fn list_with_page_size(
        &self,
        uri: &S3Uri,
        page_size: Option<i32>,
    ) -> Result<Vec<ObjectMeta>, StorageError> {
        let bucket = uri.bucket.as_str();
        let prefix = uri.prefix.as_str();
        let broken = |message: String| StorageError::Transport {
            op: "ListObjectsV2",
            bucket: bucket.to_string(),
            key: prefix.to_string(),
            message,
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.clone())
                .set_max_keys(page_size)
                .send()
                .await
                .map_err(|e| StorageError::from_sdk("ListObjectsV2", bucket, prefix, e))?;
            for object in page.contents() {
                let Some(rel) = object.key().and_then(|k| k.strip_prefix(prefix)) else {
                    continue;
                };
                if rel.is_empty() || rel.ends_with('/') {
                    continue;
                }
                out.push(ObjectMeta {
                    rel: rel.to_string(),
                    size: object
                        .size()
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(0),
                    etag: object.e_tag().map(unquote),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            // A truncated page without a usable token would silently end the listing early.
            match page.next_continuation_token() {
                Some(next) if !next.is_empty() && token.as_deref() != Some(next) => {
                    token = Some(next.to_string());
                }
                Some(_) => {
                    return Err(broken(
                        "the server repeated a continuation token; the listing would not end"
                            .into(),
                    ))
                }
                None => {
                    return Err(broken(
                        "the server truncated the listing without a continuation token".into(),
                    ))
                }
            }
        }
        out.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(out)
    }

    /// Reads exactly `len` bytes of `bucket`/`key` starting at `start`.
    ///
    /// Fewer bytes than asked for is always an error: [`StorageError::RangeNotSatisfiable`]
    /// when the object ends before the range does, [`StorageError::ShortBody`] (retryable)
    /// when the body broke off. A body that breaks off is resumed where it stopped, a few
    /// times, before giving up. `len == 0` returns no bytes without a request.
    pub async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Bytes, StorageError> {
        let len_usize = usize::try_from(len).map_err(|_| StorageError::Request {
            op: "GetObject",
            bucket: bucket.to_string(),
            key: key.to_string(),
            message: format!("a {len}-byte range does not fit in memory"),
        })?;
        let mut buf = vec![0u8; len_usize];
        self.read_range_into(bucket, key, start, &mut buf).await?;
        Ok(Bytes::from(buf))
    }

    /// Fills `dst` with the bytes of `bucket`/`key` starting at `start`, with the checks and
    /// resumption of [`ObjectStore::get_range`].
    pub async fn read_range_into(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), StorageError> {
        self.read_version_range_into(bucket, key, None, start, dst)
            .await
    }

    /// [`ObjectStore::read_range_into`] of one version of the object: with `etag`, every
    /// request carries `If-Match`, and an object replaced since is
    /// [`StorageError::Changed`] instead of a mix of old and new bytes.
    pub async fn read_version_range_into(
        &self,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), StorageError> {
        if dst.is_empty() {
            return Ok(());
        }
        if start.checked_add(dst.len() as u64).is_none() {
            return Err(StorageError::Request {
                op: "GetObject",
                bucket: bucket.to_string(),
                key: key.to_string(),
                message: format!("range starting at {start} overflows"),
            });
        }
        let mut filled = 0usize;
        let mut attempt = 1;
        loop {
            let offset = start + filled as u64;
            let (got, result) = self
                .fetch_range_once(bucket, key, etag, offset, &mut dst[filled..])
                .await;
            filled += got;
            match result {
                Ok(()) => return Ok(()),
                Err(err @ (StorageError::ShortBody { .. } | StorageError::BodyRead { .. }))
                    if attempt < self.body_retry.attempts =>
                {
                    tracing::warn!(error = %err, attempt, "resuming a ranged read");
                    tokio::time::sleep(self.body_retry.pause(attempt)).await;
                    attempt += 1;
                }
                Err(err) => return Err(whole_range(err, start, dst.len() as u64, filled)),
            }
        }
    }

    /// One ranged GET into `dst`. Returns how many bytes landed in `dst` (counted even when
    /// the body then broke off) and whether the whole range arrived.
    async fn fetch_range_once(
        &self,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        start: u64,
        dst: &mut [u8],
    ) -> (usize, Result<(), StorageError>) {
        let len = dst.len() as u64;
        let end = start + len;
        let response = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes={start}-{}", end - 1))
            .set_if_match(etag.map(|e| format!("\"{e}\"")))
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) => {
                let err = StorageError::from_sdk("GetObject", bucket, key, e);
                let err = match (etag, &err) {
                    (Some(expected), StorageError::Service { status: 412, .. }) => {
                        StorageError::Changed {
                            bucket: bucket.to_string(),
                            key: key.to_string(),
                            expected: expected.to_string(),
                        }
                    }
                    _ => err,
                };
                return (0, Err(self.explain_range_error(err, start, end).await));
            }
        };
        // Servers that ignore If-Match still say which version they sent.
        if let (Some(expected), Some(got)) = (etag, response.e_tag().map(unquote)) {
            if got != expected {
                return (
                    0,
                    Err(StorageError::Changed {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        expected: expected.to_string(),
                    }),
                );
            }
        }
        // A server may answer with less than asked when the object is shorter than the
        // range; the total in Content-Range tells that apart from a broken body.
        let total = response.content_range().and_then(parse_content_range);
        if let Some((first, _, size)) = total {
            if first != start {
                return (
                    0,
                    Err(StorageError::Service {
                        op: "GetObject",
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        status: 206,
                        code: None,
                        message: format!(
                            "asked for bytes {start}..{end}, the server sent Content-Range {:?}",
                            response.content_range().unwrap_or_default()
                        ),
                    }),
                );
            }
            if size.is_some_and(|size| size < end) {
                return (
                    0,
                    Err(StorageError::RangeNotSatisfiable {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        start,
                        end,
                        size,
                    }),
                );
            }
        }
        if let Some(announced) = response
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
        {
            if announced > len {
                return (
                    0,
                    Err(StorageError::LongBody {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        start,
                        end,
                        got: announced,
                    }),
                );
            }
        }
        let mut body = response.body;
        let body_error = |message: String| StorageError::BodyRead {
            bucket: bucket.to_string(),
            key: key.to_string(),
            start,
            end,
            message,
        };
        let mut n = 0usize;
        loop {
            let stall = self.body_retry.stall_timeout;
            let chunk = match tokio::time::timeout(stall, body.try_next()).await {
                Err(_) => return (n, Err(body_error(stalled(stall)))),
                Ok(Err(e)) => return (n, Err(body_error(error_chain(&e)))),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            let Some(slot) = dst.get_mut(n..n + chunk.len()) else {
                return (
                    n,
                    Err(StorageError::LongBody {
                        bucket: bucket.to_string(),
                        key: key.to_string(),
                        start,
                        end,
                        got: (n + chunk.len()) as u64,
                    }),
                );
            };
            slot.copy_from_slice(&chunk);
            n += chunk.len();
        }
        if n < dst.len() {
            return (
                n,
                Err(StorageError::ShortBody {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    start,
                    end,
                    got: n as u64,
                }),
            );
        }
        (n, Ok(()))
    }

    /// Turns a "range not satisfiable" answer into [`StorageError::RangeNotSatisfiable`],
    /// with the object's size when a HEAD request can tell it.
    async fn explain_range_error(&self, err: StorageError, start: u64, end: u64) -> StorageError {
        let StorageError::Service {
            status,
            code,
            bucket,
            key,
            ..
        } = &err
        else {
            return err;
        };
        if *status != 416 && code.as_deref() != Some("InvalidRange") {
            return err;
        }
        let size = match self.head(bucket, key).await {
            Ok(Some(meta)) => Some(meta.size),
            _ => None,
        };
        StorageError::RangeNotSatisfiable {
            bucket: bucket.clone(),
            key: key.clone(),
            start,
            end,
            size,
        }
    }

    /// Reads a whole object of at most `max_len` bytes (configuration, indexes, reports).
    /// A larger object is [`StorageError::TooLarge`].
    pub async fn get_small(
        &self,
        bucket: &str,
        key: &str,
        max_len: u64,
    ) -> Result<Bytes, StorageError> {
        let mut attempt = 1;
        loop {
            match self.get_small_once(bucket, key, max_len).await {
                Err(err @ (StorageError::ShortBody { .. } | StorageError::BodyRead { .. }))
                    if attempt < self.body_retry.attempts =>
                {
                    tracing::warn!(error = %err, attempt, "retrying a read");
                    tokio::time::sleep(self.body_retry.pause(attempt)).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn get_small_once(
        &self,
        bucket: &str,
        key: &str,
        max_len: u64,
    ) -> Result<Bytes, StorageError> {
        let response = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| StorageError::from_sdk("GetObject", bucket, key, e))?;
        let too_large = |size: u64| StorageError::TooLarge {
            bucket: bucket.to_string(),
            key: key.to_string(),
            size,
            max: max_len,
        };
        let announced = response
            .content_length()
            .and_then(|n| u64::try_from(n).ok());
        if let Some(size) = announced.filter(|&size| size > max_len) {
            return Err(too_large(size));
        }
        let expected = announced.unwrap_or(0);
        let body_error = |message: String| StorageError::BodyRead {
            bucket: bucket.to_string(),
            key: key.to_string(),
            start: 0,
            end: expected,
            message,
        };
        let mut body = response.body;
        let mut out: Vec<u8> = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
        loop {
            let stall = self.body_retry.stall_timeout;
            let chunk = match tokio::time::timeout(stall, body.try_next()).await {
                Err(_) => return Err(body_error(stalled(stall))),
                Ok(Err(e)) => return Err(body_error(error_chain(&e))),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            let size = (out.len() + chunk.len()) as u64;
            if size > max_len {
                return Err(too_large(size));
            }
            out.extend_from_slice(&chunk);
        }
        if let Some(expected) = announced {
            if (out.len() as u64) < expected {
                return Err(StorageError::ShortBody {
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    start: 0,
                    end: expected,
                    got: out.len() as u64,
                });
            }
        }
        Ok(Bytes::from(out))
    }

    /// Stores `data` as `bucket`/`key` in one PutObject request, replacing any object there.
    pub async fn put(&self, bucket: &str, key: &str, data: Bytes) -> Result<(), StorageError> {
        let len = data.len() as i64;
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_length(len)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| StorageError::from_sdk("PutObject", bucket, key, e))?;
        Ok(())
    }

    /// Copies an object inside the store (server side; the bytes do not pass through this
    /// process). Objects above [`MAX_SINGLE_COPY`] are copied in parts.
    pub async fn copy(
        &self,
        src_bucket: &str,
        src_key: &str,
        dst_bucket: &str,
        dst_key: &str,
    ) -> Result<(), StorageError> {
        let size = self
            .head(src_bucket, src_key)
            .await?
            .ok_or_else(|| StorageError::NotFound {
                bucket: src_bucket.to_string(),
                key: src_key.to_string(),
            })?
            .size;
        if size > MAX_SINGLE_COPY {
            return self
                .copy_multipart(src_bucket, src_key, dst_bucket, dst_key, COPY_PART_SIZE)
                .await;
        }
        self.client
            .copy_object()
            .copy_source(copy_source(src_bucket, src_key))
            .bucket(dst_bucket)
            .key(dst_key)
            .send()
            .await
            .map_err(|e| copy_error("CopyObject", src_bucket, src_key, dst_bucket, dst_key, e))?;
        Ok(())
    }

    /// Copies an object server side as a multipart upload of `part_size`-byte parts
    /// (UploadPartCopy). [`ObjectStore::copy`] uses this above [`MAX_SINGLE_COPY`]; S3 wants
    /// parts of at least 5 MiB except the last. The upload is aborted if a part fails.
    pub async fn copy_multipart(
        &self,
        src_bucket: &str,
        src_key: &str,
        dst_bucket: &str,
        dst_key: &str,
        part_size: u64,
    ) -> Result<(), StorageError> {
        let size = self
            .head(src_bucket, src_key)
            .await?
            .ok_or_else(|| StorageError::NotFound {
                bucket: src_bucket.to_string(),
                key: src_key.to_string(),
            })?
            .size;
        let part_size = part_size.max(1);
        let upload_id = self.create_multipart_upload(dst_bucket, dst_key).await?;
        let source = copy_source(src_bucket, src_key);
        let ranges: Vec<(i32, u64, u64)> = (0..size.div_ceil(part_size).max(1))
            .map(|i| {
                let first = i * part_size;
                let last = (first + part_size).min(size).saturating_sub(1);
                (i as i32 + 1, first, last)
            })
            .collect();
        let copied: Result<Vec<CompletedPart>, StorageError> = stream::iter(ranges)
            .map(|(number, first, last)| {
                let upload_id = upload_id.as_str();
                let source = source.as_str();
                async move {
                    let mut request = self
                        .client
                        .upload_part_copy()
                        .bucket(dst_bucket)
                        .key(dst_key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .copy_source(source);
                    // An empty source is copied as one part without a range.
                    if size > 0 {
                        request = request.copy_source_range(format!("bytes={first}-{last}"));
                    }
                    let output = request.send().await.map_err(|e| {
                        copy_error(
                            "UploadPartCopy",
                            src_bucket,
                            src_key,
                            dst_bucket,
                            dst_key,
                            e,
                        )
                    })?;
                    let e_tag = output
                        .copy_part_result()
                        .and_then(|r| r.e_tag())
                        .map(str::to_string);
                    Ok(CompletedPart::builder()
                        .set_e_tag(e_tag)
                        .part_number(number)
                        .build())
                }
            })
            .buffered(COPY_CONCURRENCY)
            .try_collect()
            .await;
        let result = match copied {
            Ok(parts) => {
                self.complete_multipart_upload(dst_bucket, dst_key, &upload_id, parts)
                    .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Err(abort) = self
                .abort_multipart_upload(dst_bucket, dst_key, &upload_id)
                .await
            {
                tracing::warn!(error = %abort, "could not abort a failed multipart copy");
            }
        }
        result
    }

    /// Size and entity tag of `bucket`/`key`, or `None` when it does not exist.
    pub async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(output) => Ok(Some(ObjectMeta {
                rel: key.to_string(),
                size: output
                    .content_length()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
                etag: output.e_tag().map(unquote),
            })),
            Err(e) => match StorageError::from_sdk("HeadObject", bucket, key, e) {
                StorageError::NotFound { .. } => Ok(None),
                err => Err(err),
            },
        }
    }

    /// Deletes `bucket`/`key`; deleting a missing object succeeds.
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        match self
            .client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match StorageError::from_sdk("DeleteObject", bucket, key, e) {
                StorageError::NotFound { .. } => Ok(()),
                err => Err(err),
            },
        }
    }

    /// A [`shardpress_engine::source::ByteSource`] reading `bucket`/`key`, whose length the
    /// caller already knows (from a listing). `display_name` appears in the engine's error
    /// messages. Only for blocking threads; see [`S3Source`].
    pub fn byte_source(&self, bucket: &str, key: &str, len: u64, display_name: &str) -> S3Source {
        S3Source::new(self.clone(), bucket, key, len, display_name)
    }

    /// [`ObjectStore::byte_source`] pinned to the version with entity tag `etag` (when
    /// known): reads of a replaced object fail with [`StorageError::Changed`].
    pub fn versioned_source(
        &self,
        bucket: &str,
        key: &str,
        etag: Option<&str>,
        len: u64,
        display_name: &str,
    ) -> S3Source {
        S3Source::new(self.clone(), bucket, key, len, display_name).pinned(etag)
    }

    /// A `std::io::Write` that uploads to `bucket`/`key`. Only for blocking threads; see
    /// [`MultipartWriter`].
    pub fn multipart_writer(&self, bucket: &str, key: &str) -> MultipartWriter {
        MultipartWriter::new(self.clone(), bucket, key)
    }

    pub(crate) async fn create_multipart_upload(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<String, StorageError> {
        let output = self
            .client
            .create_multipart_upload()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| StorageError::from_sdk("CreateMultipartUpload", bucket, key, e))?;
        output
            .upload_id()
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| StorageError::Transport {
                op: "CreateMultipartUpload",
                bucket: bucket.to_string(),
                key: key.to_string(),
                message: "the response has no upload id".into(),
            })
    }

    pub(crate) async fn complete_multipart_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        mut parts: Vec<CompletedPart>,
    ) -> Result<(), StorageError> {
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| StorageError::from_sdk("CompleteMultipartUpload", bucket, key, e))?;
        Ok(())
    }

    pub(crate) async fn abort_multipart_upload(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), StorageError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: nothing is left to clean up.
            Err(e) => match StorageError::from_sdk("AbortMultipartUpload", bucket, key, e) {
                StorageError::Service { code, .. } if code.as_deref() == Some("NoSuchUpload") => {
                    Ok(())
                }
                err => Err(err),
            },
        }
    }
}

/// Classifies a failed copy: a missing source names the source, anything else the
/// destination.
fn copy_error<E>(
    op: &'static str,
    src_bucket: &str,
    src_key: &str,
    dst_bucket: &str,
    dst_key: &str,
    err: aws_sdk_s3::error::SdkError<E>,
) -> StorageError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match StorageError::from_sdk(op, dst_bucket, dst_key, err) {
        StorageError::NotFound { .. } => StorageError::NotFound {
            bucket: src_bucket.to_string(),
            key: src_key.to_string(),
        },
        other => other,
    }
}

/// The `x-amz-copy-source` value: `bucket/key` with the key percent-encoded (`/` kept).
fn copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + 1 + key.len());
    out.push_str(bucket);
    out.push('/');
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Restates a body failure of a resumed read for the whole range the caller asked for
/// (`len` bytes from `start`, `filled` of them received), not just its last attempt.
fn whole_range(err: StorageError, start: u64, len: u64, filled: usize) -> StorageError {
    match err {
        StorageError::ShortBody { bucket, key, .. } => StorageError::ShortBody {
            bucket,
            key,
            start,
            end: start + len,
            got: filled as u64,
        },
        StorageError::BodyRead {
            bucket,
            key,
            message,
            ..
        } => StorageError::BodyRead {
            bucket,
            key,
            start,
            end: start + len,
            message: format!("{message} ({filled} of {len} bytes received)"),
        },
        other => other,
    }
}

/// The message of a body that stopped arriving.
fn stalled(timeout: Duration) -> String {
    format!("no data for {:.1} s", timeout.as_secs_f64())
}

/// Strips the quotes S3 puts around entity tags.
fn unquote(etag: &str) -> String {
    etag.trim_matches('"').to_string()
}

/// Parses `bytes FIRST-LAST/SIZE` (SIZE may be `*`) into (first, last, size).
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let size = match size.trim() {
        "*" => None,
        s => Some(s.parse().ok()?),
    };
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-9/100"),
            Some((0, 9, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("items 0-9/100"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }

    #[test]
    fn copy_source_encoding() {
        assert_eq!(copy_source("b", "a/b c+d.json"), "b/a/b%20c%2Bd.json");
        assert_eq!(copy_source("b", "x/ü"), "b/x/%C3%BC");
    }

    #[test]
    fn body_retry_pauses_are_jittered_and_capped() {
        let retry = BodyRetry {
            attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            stall_timeout: Duration::from_secs(1),
        };
        for (attempt, bound_ms) in [(1, 100), (2, 200), (3, 300), (4, 300), (40, 300)] {
            let pauses: Vec<Duration> = (0..200).map(|_| retry.pause(attempt)).collect();
            let bound = Duration::from_millis(bound_ms);
            assert!(pauses.iter().all(|p| *p <= bound), "{attempt}: {pauses:?}");
            // Spread over the whole interval, not one fixed delay.
            assert!(
                pauses.iter().any(|p| *p < bound / 4),
                "{attempt}: {pauses:?}"
            );
            assert!(
                pauses.iter().any(|p| *p > bound * 3 / 4),
                "{attempt}: {pauses:?}"
            );
        }
    }

    #[test]
    fn resumed_failures_name_the_whole_range() {
        let short = StorageError::ShortBody {
            bucket: "b".into(),
            key: "k".into(),
            start: 150,
            end: 200,
            got: 10,
        };
        let err = whole_range(short, 100, 100, 60);
        assert_eq!(
            err.to_string(),
            "s3://b/k: bytes 100..200: the server sent 60 bytes, expected 100 (body cut short)"
        );
        let broken = StorageError::BodyRead {
            bucket: "b".into(),
            key: "k".into(),
            start: 150,
            end: 200,
            message: "connection reset".into(),
        };
        assert_eq!(
            whole_range(broken, 100, 100, 50).to_string(),
            "s3://b/k: bytes 100..200: reading the response body failed: connection reset \
             (50 of 100 bytes received)"
        );
    }

    #[test]
    fn etag_quotes() {
        assert_eq!(unquote("\"abc\""), "abc");
        assert_eq!(unquote("abc"), "abc");
    }
}
