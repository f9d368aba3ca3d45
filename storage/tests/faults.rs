//! Storage faults: the storage crate talks to a real S3 server (s3s-fs) through the testkit's
//! fault-injecting proxy, which answers chosen requests with 500 InternalError, 503
//! SlowDown, connection resets, stalls, bodies cut short and ranged answers shorter than
//! asked. Transient faults must be retried (the proxy's request counts show the retries),
//! short data must never be returned, and failed multipart uploads must be aborted.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use shardpress_engine::pipeline::{
    compress_local, plan_job, run_task, task_reservation, LocalOptions, NoProgress,
};
use shardpress_engine::source::ByteSource;
use shardpress_engine::{MemoryPool, Recipe};
use shardpress_storage::{
    open_checkpoint, s3_client_with_static_credentials, ObjectStore, S3Settings, S3Uri,
    StorageError, PART_SIZE, UPLOAD_MEMORY,
};
use shardpress_testkit::pseudo_random_bytes;
use shardpress_testkit::{Fault, FaultProxy, RequestKind, S3Server};

const BUCKET: &str = "shardpress-test";

/// Attempts per request (and per ranged read) of the clients under test.
const ATTEMPTS: u32 = 4;

/// Read timeout of the clients under test, except where stalls are tested: long enough that
/// an 8 MiB part on a busy machine never times out, so request counts are exact.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Read timeout where stalls are tested: far above what a loopback request takes.
const SHORT_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a stalling proxy keeps quiet: for good (the proxy's runtime ends its stalls
/// when the proxy is dropped).
const STALL: Duration = Duration::from_secs(3600);

/// Bound on an operation facing a stall; only reached if the stall were waited out.
const HANG: Duration = Duration::from_secs(60);

/// A server, the proxy in front of it, a store that talks to the server directly (to set
/// up and check) and one that goes through the proxy (under test).
struct Rig {
    server: S3Server,
    proxy: FaultProxy,
    direct: ObjectStore,
    store: ObjectStore,
}

impl Rig {
    /// From now on every `kind` request meets `fault`; earlier faults and counts are cleared.
    fn always(&self, kind: RequestKind, fault: Fault) {
        self.proxy.clear_faults();
        self.proxy.reset_counts();
        self.proxy.fail_every(kind, 1, fault);
    }
}

async fn rig() -> Rig {
    rig_with_timeout(READ_TIMEOUT).await
}

async fn rig_with_timeout(read_timeout: Duration) -> Rig {
    let server = S3Server::start();
    server.create_bucket(BUCKET).await;
    let direct = server.store().await;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], server.port())));
    let settings = S3Settings {
        endpoint: Some(proxy.endpoint()),
        read_timeout: Some(read_timeout),
        max_attempts: Some(ATTEMPTS),
        initial_backoff: Some(Duration::from_millis(20)),
        ..server.settings()
    };
    let client =
        s3_client_with_static_credentials(&settings, server.access_key(), server.secret_key())
            .await;
    Rig {
        server,
        proxy,
        direct,
        store: ObjectStore::new(client),
    }
}

/// Files of s3s-fs's in-progress multipart uploads (it has no ListMultipartUploads).
fn upload_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".upload"))
        .collect()
}

/// Stores `len` bytes at `key` directly and returns them.
async fn object(rig: &Rig, key: &str, len: usize, seed: u64) -> Vec<u8> {
    let bytes = pseudo_random_bytes(len, seed);
    rig.direct
        .put(BUCKET, key, Bytes::from(bytes.clone()))
        .await
        .unwrap();
    bytes
}

/// Uploads `bytes` through the proxied store's multipart writer in odd-sized writes and
/// returns (length, SHA-256) from `finish`.
async fn upload(store: &ObjectStore, key: &'static str, bytes: Vec<u8>) -> (u64, String) {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut writer = store.multipart_writer(BUCKET, key);
        for chunk in bytes.chunks(3_000_017) {
            writer.write_all(chunk).unwrap();
        }
        writer.finish().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_slowdown_on_reads_are_retried() {
    let rig = rig().await;
    let bytes = object(&rig, "in/a", 300_000, 1).await;

    rig.proxy
        .fail_next(RequestKind::RangedGet, 2, Fault::InternalError);
    let got = rig.store.get_range(BUCKET, "in/a", 1000, 200_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[1000..201_000]);
    assert_eq!(rig.proxy.injected(RequestKind::RangedGet), 2);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 3);

    rig.proxy.reset_counts();
    rig.proxy
        .fail_next(RequestKind::RangedGet, 3, Fault::SlowDown);
    let got = rig.store.get_range(BUCKET, "in/a", 0, 300_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[..]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 4);

    // Whole-object reads and HEAD go through the same retries.
    rig.proxy.reset_counts();
    rig.proxy.fail_next(RequestKind::Get, 1, Fault::SlowDown);
    rig.proxy
        .fail_next(RequestKind::Head, 2, Fault::InternalError);
    let got = rig.store.get_small(BUCKET, "in/a", 1 << 20).await.unwrap();
    assert_eq!(&got[..], &bytes[..]);
    let head = rig.store.head(BUCKET, "in/a").await.unwrap().unwrap();
    assert_eq!(head.size, 300_000);
    assert_eq!(rig.proxy.requests(RequestKind::Get), 2);
    assert_eq!(rig.proxy.requests(RequestKind::Head), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_slowdown_on_uploads_are_retried() {
    let rig = rig().await;
    // Two full parts and a tail: three UploadPart requests without faults.
    let bytes = pseudo_random_bytes(2 * PART_SIZE + 4321, 2);
    let expected_sha = hex::encode(Sha256::digest(&bytes));
    rig.proxy
        .fail_next(RequestKind::CreateUpload, 1, Fault::SlowDown);
    rig.proxy
        .fail_next(RequestKind::UploadPart, 1, Fault::InternalError);
    rig.proxy
        .fail_next(RequestKind::UploadPart, 1, Fault::SlowDown);
    rig.proxy
        .fail_next(RequestKind::CompleteUpload, 1, Fault::InternalError);

    let (len, sha) = upload(&rig.store, "out/parts", bytes.clone()).await;
    assert_eq!(len, bytes.len() as u64);
    assert_eq!(sha, expected_sha);
    assert_eq!(rig.proxy.requests(RequestKind::CreateUpload), 2);
    assert_eq!(rig.proxy.requests(RequestKind::UploadPart), 5);
    assert_eq!(rig.proxy.injected(RequestKind::UploadPart), 2);
    assert_eq!(rig.proxy.requests(RequestKind::CompleteUpload), 2);
    assert_eq!(rig.proxy.requests(RequestKind::AbortUpload), 0);

    let stored = rig
        .direct
        .get_range(BUCKET, "out/parts", 0, len)
        .await
        .unwrap();
    assert!(stored[..] == bytes[..], "stored object differs");
    assert!(upload_files(&rig.server.data_dir()).is_empty());

    // A small output goes up as one PutObject, retried the same way.
    rig.proxy.fail_next(RequestKind::Put, 2, Fault::SlowDown);
    let small = pseudo_random_bytes(5000, 3);
    let (len, _) = upload(&rig.store, "out/small", small.clone()).await;
    assert_eq!(len, 5000);
    assert_eq!(rig.proxy.requests(RequestKind::Put), 3);
    let stored = rig.direct.get_small(BUCKET, "out/small", 1 << 20).await;
    assert_eq!(&stored.unwrap()[..], &small[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_are_retried() {
    let rig = rig().await;
    let bytes = object(&rig, "in/r", 200_000, 4).await;

    // Closed before any answer: the SDK retries the request.
    rig.proxy.fail_next(RequestKind::RangedGet, 2, Fault::Reset);
    let got = rig.store.get_range(BUCKET, "in/r", 5, 150_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[5..150_005]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 3);

    // Closed after the headers: the read resumes.
    rig.proxy.reset_counts();
    rig.proxy
        .fail_next(RequestKind::RangedGet, 1, Fault::ResetAfterHeaders);
    let got = rig.store.get_range(BUCKET, "in/r", 0, 200_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[..]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 2);

    // Parts and the completion survive resets too.
    rig.proxy
        .fail_next(RequestKind::UploadPart, 2, Fault::Reset);
    rig.proxy
        .fail_next(RequestKind::CompleteUpload, 1, Fault::Reset);
    let big = pseudo_random_bytes(PART_SIZE + 777, 5);
    let (len, sha) = upload(&rig.store, "out/reset", big.clone()).await;
    assert_eq!(len, big.len() as u64);
    assert_eq!(sha, hex::encode(Sha256::digest(&big)));
    assert_eq!(rig.proxy.requests(RequestKind::UploadPart), 4);
    assert_eq!(rig.proxy.requests(RequestKind::CompleteUpload), 2);
    let stored = rig.direct.get_range(BUCKET, "out/reset", 0, len).await;
    assert!(stored.unwrap()[..] == big[..], "stored object differs");
    assert!(upload_files(&rig.server.data_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_past_the_read_timeout_are_retried() {
    let rig = rig_with_timeout(SHORT_READ_TIMEOUT).await;
    let bytes = object(&rig, "in/s", 100_000, 6).await;

    // No answer at all: the SDK's read timeout ends the attempt.
    rig.proxy
        .fail_next(RequestKind::RangedGet, 1, Fault::Stall(STALL));
    let got = tokio::time::timeout(HANG, rig.store.get_range(BUCKET, "in/s", 10, 90_000))
        .await
        .expect("the read waited out the stall");
    assert_eq!(&got.unwrap()[..], &bytes[10..90_010]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 2);

    // Headers and half the body, then silence: the body's stall timeout ends the attempt
    // and the read resumes.
    rig.proxy.reset_counts();
    rig.proxy
        .fail_next(RequestKind::RangedGet, 1, Fault::StallBody(STALL));
    let got = tokio::time::timeout(HANG, rig.store.get_range(BUCKET, "in/s", 0, 100_000))
        .await
        .expect("the read waited out the stall");
    assert_eq!(&got.unwrap()[..], &bytes[..]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 2);

    // A part upload that gets no answer is sent again.
    rig.proxy
        .fail_next(RequestKind::UploadPart, 1, Fault::Stall(STALL));
    let big = pseudo_random_bytes(PART_SIZE + 1, 7);
    let (len, sha) = tokio::time::timeout(HANG, upload(&rig.store, "out/stalled", big.clone()))
        .await
        .expect("the upload waited out the stall");
    assert_eq!(len, big.len() as u64);
    assert_eq!(sha, hex::encode(Sha256::digest(&big)));
    assert_eq!(rig.proxy.requests(RequestKind::UploadPart), 3);
    assert!(upload_files(&rig.server.data_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_cut_short_are_detected_and_resumed() {
    let rig = rig().await;
    let bytes = object(&rig, "in/t", 250_000, 8).await;

    // Full Content-Length, half the body, then the connection closes.
    rig.proxy
        .fail_next(RequestKind::RangedGet, 2, Fault::Truncate);
    let got = rig.store.get_range(BUCKET, "in/t", 1, 240_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[1..240_001]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 3);

    // A well-formed 206 with half the range asked for.
    rig.proxy.reset_counts();
    rig.proxy
        .fail_next(RequestKind::RangedGet, 2, Fault::ShortRange);
    let got = rig.store.get_range(BUCKET, "in/t", 1000, 200_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[1000..201_000]);
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 3);

    // Whole-object reads are checked against Content-Length and read again.
    rig.proxy.reset_counts();
    rig.proxy.fail_next(RequestKind::Get, 1, Fault::Truncate);
    let got = rig.store.get_small(BUCKET, "in/t", 1 << 20).await.unwrap();
    assert_eq!(&got[..], &bytes[..]);
    assert_eq!(rig.proxy.requests(RequestKind::Get), 2);

    // Through the engine's ByteSource: a large read split into concurrent ranges.
    rig.proxy.reset_counts();
    rig.proxy
        .fail_next(RequestKind::RangedGet, 2, Fault::ShortRange);
    let source = rig.store.byte_source(BUCKET, "in/t", 250_000, "in/t");
    let expected = bytes.clone();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 250_000];
        source.read_exact_at(0, &mut buf).unwrap();
        assert!(buf == expected, "read through the source differs");
    })
    .await
    .unwrap();
    assert_eq!(rig.proxy.requests(RequestKind::RangedGet), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_faults_fail_retryable_without_short_data() {
    let rig = rig().await;
    let bytes = object(&rig, "in/p", 64_000, 9).await;

    // Every answer holds half of what was asked: each attempt makes progress, but the
    // range is never complete.
    rig.always(RequestKind::RangedGet, Fault::ShortRange);
    let err = rig
        .store
        .get_range(BUCKET, "in/p", 1000, 32_000)
        .await
        .unwrap_err();
    let StorageError::ShortBody {
        start, end, got, ..
    } = &err
    else {
        panic!("expected ShortBody, got {err:?}");
    };
    assert_eq!((*start, *end), (1000, 33_000));
    // 1/2 + 1/4 + 1/8 + 1/16 of the range.
    assert_eq!(*got, 30_000);
    assert!(err.is_retryable());
    assert_eq!(
        err.to_string(),
        "s3://shardpress-test/in/p: bytes 1000..33000: the server sent 30000 bytes, \
         expected 32000 (body cut short)"
    );
    assert_eq!(
        rig.proxy.requests(RequestKind::RangedGet),
        u64::from(ATTEMPTS)
    );

    // Bodies that always break off.
    rig.always(RequestKind::RangedGet, Fault::Truncate);
    let err = rig
        .store
        .get_range(BUCKET, "in/p", 0, 64_000)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::BodyRead {
                start: 0,
                end: 64_000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(
        err.to_string().starts_with(
            "s3://shardpress-test/in/p: bytes 0..64000: reading the response body failed"
        ),
        "{err}"
    );
    assert_eq!(
        rig.proxy.requests(RequestKind::RangedGet),
        u64::from(ATTEMPTS)
    );

    // Throttled past the retry budget.
    rig.always(RequestKind::RangedGet, Fault::SlowDown);
    let err = rig
        .store
        .get_range(BUCKET, "in/p", 0, 10)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::Service { status: 503, code: Some(code), .. } if code == "SlowDown"),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(
        rig.proxy.requests(RequestKind::RangedGet),
        u64::from(ATTEMPTS)
    );

    // Through the engine's ByteSource the buffer is never handed back as if complete: the
    // read fails with the storage error inside.
    rig.proxy.clear_faults();
    rig.proxy
        .fail_every(RequestKind::RangedGet, 1, Fault::ShortRange);
    let source = rig.store.byte_source(BUCKET, "in/p", 64_000, "in/p");
    let io_err = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 64_000];
        source.read_exact_at(0, &mut buf).unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(io_err.kind(), std::io::ErrorKind::UnexpectedEof);
    let inner = StorageError::find_in(&io_err).unwrap();
    assert!(inner.is_retryable(), "{inner:?}");
    assert!(
        io_err
            .to_string()
            .starts_with("s3://shardpress-test/in/p: bytes 0..64000"),
        "{io_err}"
    );

    // Once the faults stop, the same read succeeds.
    rig.proxy.clear_faults();
    let got = rig.store.get_range(BUCKET, "in/p", 0, 64_000).await;
    assert_eq!(&got.unwrap()[..], &bytes[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_keeps_failing_aborts_the_upload() {
    let rig = rig().await;
    for (key, fault) in [
        ("out/failing-500", Fault::InternalError),
        ("out/failing-reset", Fault::Reset),
    ] {
        rig.proxy.clear_faults();
        rig.proxy.reset_counts();
        // The first part goes through; every later one fails.
        rig.proxy.fail_after(RequestKind::UploadPart, 1, 1, fault);
        // The abort itself is throttled once and retried.
        rig.proxy
            .fail_next(RequestKind::AbortUpload, 1, Fault::SlowDown);
        let (store, data_dir) = (rig.store.clone(), rig.server.data_dir());
        let (err, during) = tokio::task::spawn_blocking(move || {
            let mut writer = store.multipart_writer(BUCKET, key);
            let part = pseudo_random_bytes(PART_SIZE, 10);
            let mut during = 0;
            let mut failed = None;
            for _ in 0..4 {
                if let Err(e) = writer.write_all(&part) {
                    failed = Some(StorageError::find_in(&e).map(ToString::to_string));
                    break;
                }
                during = during.max(upload_files(&data_dir).len());
            }
            let err = match failed {
                Some(message) => message.unwrap_or_default(),
                None => writer.finish().unwrap_err().to_string(),
            };
            (err, during)
        })
        .await
        .unwrap();
        assert!(
            err.contains(&format!("s3://shardpress-test/{key}")),
            "{err}"
        );
        assert!(during > 0, "no multipart upload was in progress");
        assert!(
            rig.proxy.injected(RequestKind::UploadPart) >= u64::from(ATTEMPTS),
            "a part was not retried"
        );
        assert_eq!(rig.proxy.requests(RequestKind::AbortUpload), 2);
        assert_eq!(rig.proxy.requests(RequestKind::CompleteUpload), 0);
        assert!(
            upload_files(&rig.server.data_dir()).is_empty(),
            "upload left behind: {:?}",
            upload_files(&rig.server.data_dir())
        );
        assert!(rig.direct.head(BUCKET, key).await.unwrap().is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_read_through_intermittent_faults_compresses_identically() {
    let rig = rig().await;
    let input = tempfile::tempdir().unwrap();
    shardpress_testkit::llama::write_llama_checkpoint(input.path());
    let recipe = Recipe::load("w8a16").unwrap();

    // The fault-free run: the engine on local files.
    let out_parent = tempfile::tempdir().unwrap();
    let local_out = out_parent.path().join("out");
    compress_local(
        input.path(),
        &recipe,
        &local_out,
        &LocalOptions::default(),
        &NoProgress,
    )
    .unwrap();

    rig.server
        .upload_dir(BUCKET, "models/llama", input.path())
        .await;
    // About half the reads are faulted, never so many in a row that a retry budget runs
    // out.
    rig.proxy
        .fail_every(RequestKind::RangedGet, 5, Fault::Truncate);
    rig.proxy
        .fail_every(RequestKind::RangedGet, 6, Fault::ShortRange);
    rig.proxy
        .fail_every(RequestKind::RangedGet, 7, Fault::InternalError);
    rig.proxy
        .fail_every(RequestKind::RangedGet, 11, Fault::Reset);
    rig.proxy.fail_every(RequestKind::Put, 2, Fault::SlowDown);

    let uri = S3Uri::parse(&format!("s3://{BUCKET}/models/llama")).unwrap();
    let ckpt = open_checkpoint(&rig.store, &uri).await.unwrap();
    let plan = plan_job(&ckpt, &recipe).unwrap();
    assert!(plan.tasks.len() > 1);
    let store = rig.store.clone();
    let files = tokio::task::spawn_blocking(move || {
        let pool = MemoryPool::new(None);
        let mut files = Vec::new();
        for task in &plan.tasks {
            let sources: Vec<Arc<dyn ByteSource>> = task
                .inputs
                .iter()
                .map(|input| {
                    let shard = ckpt
                        .shards
                        .iter()
                        .find(|s| s.file_name == input.file)
                        .unwrap();
                    shard.source.clone()
                })
                .collect();
            let need = task_reservation(task, None, UPLOAD_MEMORY, 1).unwrap();
            let reservation = pool.reserve(need).unwrap();
            let key = format!("out/llama/{}", task.file_name);
            let mut writer = store.multipart_writer(BUCKET, &key);
            let output = run_task(task, &sources, &mut writer, &NoProgress, &reservation).unwrap();
            let (len, _) = writer.finish().unwrap();
            assert_eq!(len, output.file_bytes);
            files.push((key, task.file_name.clone()));
        }
        files
    })
    .await
    .unwrap();

    assert!(
        rig.proxy.injected(RequestKind::RangedGet) > 0,
        "no read was faulted"
    );
    for (key, file_name) in files {
        let expected = std::fs::read(local_out.join(&file_name)).unwrap();
        let stored = rig.direct.get_small(BUCKET, &key, 1 << 30).await.unwrap();
        assert!(
            stored[..] == expected[..],
            "{file_name} differs from the local run"
        );
    }
    assert!(upload_files(&rig.server.data_dir()).is_empty());
}
