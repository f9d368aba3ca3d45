//! Errors of object-store access: every message names the object as `s3://bucket/key` and,
//! for ranged reads, the byte range; [`StorageError::is_retryable`] separates transient
//! failures from permanent ones.

use std::error::Error as StdError;
use std::io;

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// Error codes S3 and compatible servers use for conditions that go away on retry.
const RETRYABLE_CODES: [&str; 9] = [
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
];

/// `err` and its sources joined by ": ", leaving out a source whose text the message
/// already contains (wrappers often repeat their cause).
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// Displays an object (or a prefix) as `s3://bucket/key`.
pub(crate) fn obj(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

fn size_note(size: &Option<u64>) -> String {
    match size {
        Some(size) => format!(" ({size} bytes)"),
        None => String::new(),
    }
}

fn code_note(code: &Option<String>) -> String {
    match code {
        Some(code) => format!(" {code}"),
        None => String::new(),
    }
}

/// Why an object-store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The object does not exist.
    #[error("{}: no such object", obj(.bucket, .key))]
    NotFound {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
    },
    /// The bucket does not exist.
    #[error("{}: bucket {bucket:?} does not exist", obj(.bucket, .key))]
    NoSuchBucket {
        /// Bucket.
        bucket: String,
        /// Key (or prefix) that was being accessed.
        key: String,
    },
    /// The credentials may not perform the operation.
    #[error("{}: {op} was denied: {message}", obj(.bucket, .key))]
    AccessDenied {
        /// S3 operation name.
        op: &'static str,
        /// Bucket.
        bucket: String,
        /// Key or prefix.
        key: String,
        /// The server's message.
        message: String,
    },
    /// A ranged read asked for bytes past the end of the object.
    #[error(
        "{}: bytes {start}..{end} run past the end of the object{}",
        obj(.bucket, .key),
        size_note(.size)
    )]
    RangeNotSatisfiable {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// First byte requested.
        start: u64,
        /// End of the range requested (exclusive).
        end: u64,
        /// Object size, when the server said.
        size: Option<u64>,
    },
    /// The response body ended before the requested number of bytes arrived.
    #[error(
        "{}: bytes {start}..{end}: the server sent {got} bytes, expected {} (body cut short)",
        obj(.bucket, .key),
        .end - .start
    )]
    ShortBody {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// First byte requested.
        start: u64,
        /// End of the range requested (exclusive).
        end: u64,
        /// Bytes received.
        got: u64,
    },
    /// The response held more bytes than requested (a server that ignored the range).
    #[error(
        "{}: bytes {start}..{end}: the server sent {got} bytes, expected {} (range not honoured)",
        obj(.bucket, .key),
        .end - .start
    )]
    LongBody {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// First byte requested.
        start: u64,
        /// End of the range requested (exclusive).
        end: u64,
        /// Bytes announced or received.
        got: u64,
    },
    /// The connection failed or stalled while the body was streaming.
    #[error("{}: bytes {start}..{end}: reading the response body failed: {message}", obj(.bucket, .key))]
    BodyRead {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// First byte requested.
        start: u64,
        /// End of the range requested (exclusive).
        end: u64,
        /// What went wrong.
        message: String,
    },
    /// An object read whole is larger than the caller's limit.
    #[error("{}: object is {size} bytes, more than the {max}-byte limit", obj(.bucket, .key))]
    TooLarge {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// Object size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The server answered with an error status not covered by a more specific variant.
    #[error("{}: {op} failed: HTTP {status}{}: {message}", obj(.bucket, .key), code_note(.code))]
    Service {
        /// S3 operation name.
        op: &'static str,
        /// Bucket.
        bucket: String,
        /// Key or prefix.
        key: String,
        /// HTTP status.
        status: u16,
        /// S3 error code (`SlowDown`, `InvalidArgument`, …).
        code: Option<String>,
        /// The server's message.
        message: String,
    },
    /// No usable answer arrived: connection refused or reset, timeout, garbled response.
    #[error("{}: {op} failed: {message}", obj(.bucket, .key))]
    Transport {
        /// S3 operation name.
        op: &'static str,
        /// Bucket.
        bucket: String,
        /// Key or prefix.
        key: String,
        /// What went wrong, with its causes.
        message: String,
    },
    /// The request could not be built or sent as asked (bad input, missing credentials or
    /// region); retrying does not help.
    #[error("{}: {op} could not be sent: {message}", obj(.bucket, .key))]
    Request {
        /// S3 operation name.
        op: &'static str,
        /// Bucket.
        bucket: String,
        /// Key or prefix.
        key: String,
        /// What went wrong, with its causes.
        message: String,
    },
    /// A string is not a usable `s3://bucket/prefix` URI.
    #[error("{uri}: {problem}")]
    InvalidUri {
        /// The string as given.
        uri: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The object was replaced after its version was recorded (an `If-Match` failed).
    #[error(
        "{}: the object changed after the job was planned (its ETag is no longer {expected:?}); \
         submit a new job to compress the new version",
        obj(.bucket, .key)
    )]
    Changed {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// The entity tag recorded when the job was planned.
        expected: String,
    },
    /// A multipart upload cannot go on (an earlier failure, too many parts).
    #[error("{}: upload failed: {problem}", obj(.bucket, .key))]
    Upload {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// What is wrong.
        problem: String,
    },
}

impl StorageError {
    /// Whether the same operation may succeed if tried again: server errors (5xx),
    /// throttling, timeouts, connection failures and bodies cut short. Missing objects,
    /// denied access, bad requests and ranges past the end are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::ShortBody { .. } | Self::BodyRead { .. } | Self::Transport { .. } => true,
            Self::Service { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || code
                        .as_deref()
                        .is_some_and(|c| RETRYABLE_CODES.contains(&c))
            }
            Self::NotFound { .. }
            | Self::NoSuchBucket { .. }
            | Self::AccessDenied { .. }
            | Self::RangeNotSatisfiable { .. }
            | Self::LongBody { .. }
            | Self::TooLarge { .. }
            | Self::Request { .. }
            | Self::InvalidUri { .. }
            | Self::Changed { .. }
            | Self::Upload { .. } => false,
        }
    }

    /// Whether this is [`StorageError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }

    /// Finds a `StorageError` in the chain of `err`, looking inside `std::io::Error`s (the
    /// engine sees storage failures through [`shardpress_engine::source::ByteSource`], which
    /// wraps them in `io::Error`).
    pub fn find_in<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a StorageError> {
        let mut current: Option<&'a (dyn StdError + 'static)> = Some(err);
        while let Some(e) = current {
            if let Some(found) = e.downcast_ref::<StorageError>() {
                return Some(found);
            }
            // `io::Error::source` skips the wrapped error itself, so step into it directly.
            current = match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
                Some(inner) => Some(inner as &(dyn StdError + 'static)),
                None => e.source(),
            };
        }
        None
    }

    /// Converts to an `io::Error` for the `std::io` traits, keeping `self` as the inner error
    /// (recoverable with [`StorageError::find_in`]).
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            Self::NotFound { .. } | Self::NoSuchBucket { .. } => io::ErrorKind::NotFound,
            Self::AccessDenied { .. } => io::ErrorKind::PermissionDenied,
            Self::RangeNotSatisfiable { .. } | Self::ShortBody { .. } => {
                io::ErrorKind::UnexpectedEof
            }
            Self::InvalidUri { .. } | Self::Request { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// Classifies a failed SDK call of operation `op` on `bucket`/`key`.
    pub(crate) fn from_sdk<E>(op: &'static str, bucket: &str, key: &str, err: SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let bucket = bucket.to_string();
        let key = key.to_string();
        let message = error_chain(&err);
        match &err {
            SdkError::ConstructionFailure(_) => Self::Request {
                op,
                bucket,
                key,
                message,
            },
            SdkError::DispatchFailure(failure) if failure.is_user() => Self::Request {
                op,
                bucket,
                key,
                message,
            },
            SdkError::TimeoutError(_)
            | SdkError::DispatchFailure(_)
            | SdkError::ResponseError(_) => Self::Transport {
                op,
                bucket,
                key,
                message,
            },
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = err.code().map(str::to_string);
                let server_message = err
                    .message()
                    .map(str::to_string)
                    .unwrap_or_else(|| message.clone());
                match (status, code.as_deref()) {
                    (_, Some("NoSuchBucket")) => Self::NoSuchBucket { bucket, key },
                    (_, Some("NoSuchKey")) => Self::NotFound { bucket, key },
                    (404, code) if code != Some("NoSuchUpload") => Self::NotFound { bucket, key },
                    (403, _) | (_, Some("AccessDenied")) => Self::AccessDenied {
                        op,
                        bucket,
                        key,
                        message: server_message,
                    },
                    _ => Self::Service {
                        op,
                        bucket,
                        key,
                        status,
                        code,
                        message: server_message,
                    },
                }
            }
            // `SdkError` is non-exhaustive; anything new is treated as a transport problem.
            _ => Self::Transport {
                op,
                bucket,
                key,
                message,
            },
        }
    }
}

impl From<StorageError> for io::Error {
    fn from(err: StorageError) -> Self {
        err.into_io()
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;

    fn service(status: u16, code: Option<&str>) -> StorageError {
        StorageError::Service {
            op: "GetObject",
            bucket: "b".into(),
            key: "k".into(),
            status,
            code: code.map(str::to_string),
            message: "m".into(),
        }
    }

    #[test]
    fn retryable_classification() {
        assert!(service(500, None).is_retryable());
        assert!(service(503, Some("SlowDown")).is_retryable());
        assert!(service(429, None).is_retryable());
        assert!(service(400, Some("RequestTimeout")).is_retryable());
        assert!(!service(400, Some("InvalidArgument")).is_retryable());
        assert!(!service(409, None).is_retryable());
        let not_found = StorageError::NotFound {
            bucket: "b".into(),
            key: "a/k".into(),
        };
        assert!(!not_found.is_retryable());
        assert_eq!(not_found.to_string(), "s3://b/a/k: no such object");
        let short = StorageError::ShortBody {
            bucket: "b".into(),
            key: "k".into(),
            start: 10,
            end: 30,
            got: 5,
        };
        assert!(short.is_retryable());
        assert_eq!(
            short.to_string(),
            "s3://b/k: bytes 10..30: the server sent 5 bytes, expected 20 (body cut short)"
        );
    }

    #[test]
    fn found_through_io_and_engine_errors() {
        let io = service(503, None).into_io();
        assert_eq!(io.kind(), io::ErrorKind::Other);
        assert_eq!(io.to_string(), "s3://b/k: GetObject failed: HTTP 503: m");
        let engine = shardpress_engine::CheckpointError::Shard {
            file: "s3://b/k".into(),
            source: shardpress_engine::safetensors::HeaderError::Io(io),
        };
        let found = StorageError::find_in(&engine).unwrap();
        assert!(found.is_retryable());
        let plain = io::Error::other("disk on fire");
        assert!(StorageError::find_in(&plain).is_none());
    }

    #[test]
    fn chain_skips_repeated_causes() {
        #[derive(Debug)]
        struct Outer(io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "dispatch failure")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(io::Error::other("connection refused"));
        assert_eq!(error_chain(&err), "dispatch failure: connection refused");
    }
}
