//! Object-store access shared by the Shardpress coordinator and workers: S3 client setup,
//! `s3://` locations, listing, exact ranged reads, uploads, and adapters to the engine's
//! synchronous I/O — [`S3Source`] (a [`shardpress_engine::source::ByteSource`]) and
//! [`MultipartWriter`] (a `std::io::Write`).
//!
//! The async API runs on any Tokio runtime. The synchronous adapters block on the runtime
//! captured by [`ObjectStore`] and so belong on blocking threads
//! (`tokio::task::spawn_blocking`), never in async code.

mod checkpoint;
mod error;
mod multipart;
mod settings;
mod source;
mod store;
mod uri;

pub use checkpoint::{open_checkpoint, open_checkpoint_versions, OpenCheckpointError};
pub use error::StorageError;
pub use multipart::{MultipartWriter, MAX_PARTS, PART_SIZE, UPLOAD_MEMORY};
pub use settings::{
    s3_client, s3_client_with_static_credentials, S3Settings, CONNECT_TIMEOUT, DEFAULT_REGION,
    INITIAL_BACKOFF, MAX_ATTEMPTS, MAX_BACKOFF, READ_TIMEOUT,
};
pub use source::{S3Source, READ_CHUNK};
pub use store::{ObjectMeta, ObjectStore, MAX_SINGLE_COPY};
pub use uri::S3Uri;
