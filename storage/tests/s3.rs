//! The storage crate against a real S3-compatible server (s3s-fs, started per test by the
//! testkit). These tests fail, not skip, when the server binary is missing.

// Helpers outside `#[test]` functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use shardpress_engine::source::ByteSource;
use shardpress_engine::Checkpoint;
use shardpress_storage::{
    open_checkpoint, ObjectStore, OpenCheckpointError, S3Uri, StorageError, PART_SIZE, READ_CHUNK,
};
use shardpress_testkit::pseudo_random_bytes;
use shardpress_testkit::S3Server;

const BUCKET: &str = "shardpress-test";

async fn server_with_bucket() -> (S3Server, ObjectStore) {
    let server = S3Server::start();
    server.create_bucket(BUCKET).await;
    let store = server.store().await;
    (server, store)
}

/// Files of s3s-fs's in-progress multipart uploads in its data directory.
fn upload_files(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".upload"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_follows_pagination_and_is_relative_and_sorted() {
    let (_server, store) = server_with_bucket().await;
    let mut expected = Vec::new();
    let puts = (0..23).map(|i| {
        let store = store.clone();
        // Mixed depths and an order that differs from upload order.
        let rel = if i % 3 == 0 {
            format!("sub/file-{:02}.bin", 22 - i)
        } else {
            format!("file-{:02}.bin", 22 - i)
        };
        expected.push((rel.clone(), i as u64 * 10));
        async move {
            store
                .put(
                    BUCKET,
                    &format!("ckpt/{rel}"),
                    Bytes::from(pseudo_random_bytes(i * 10, i as u64)),
                )
                .await
        }
    });
    for result in futures::future::join_all(puts).await {
        result.unwrap();
    }
    // Outside the prefix, or sharing only a string prefix with it.
    store
        .put(BUCKET, "other/x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .put(BUCKET, "ckpt-2/y", Bytes::from_static(b"y"))
        .await
        .unwrap();
    expected.sort();

    let uri = S3Uri::parse(&format!("s3://{BUCKET}/ckpt")).unwrap();
    for page_size in [Some(5), Some(1), None] {
        let listing = store.list_with_page_size(&uri, page_size).await.unwrap();
        let got: Vec<(String, u64)> = listing.iter().map(|m| (m.rel.clone(), m.size)).collect();
        assert_eq!(got, expected, "page size {page_size:?}");
        // s3s-fs leaves ETags out of listings; where present they come without quotes.
        assert!(listing
            .iter()
            .all(|m| m.etag.as_deref().is_none_or(|e| !e.contains('"'))));
    }
    assert_eq!(store.list(&uri).await.unwrap().len(), 23);

    let sub = uri.join("sub").unwrap();
    let rels: Vec<String> = store
        .list(&sub)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.rel)
        .collect();
    assert_eq!(rels.len(), 8);
    assert!(rels.iter().all(|r| r.starts_with("file-")), "{rels:?}");

    let empty = S3Uri::parse(&format!("s3://{BUCKET}/nothing/here/")).unwrap();
    assert!(store.list(&empty).await.unwrap().is_empty());

    let err = store
        .list(&S3Uri::parse("s3://no-such-bucket/x").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NoSuchBucket { .. }), "{err:?}");
    assert!(err.to_string().contains("s3://no-such-bucket/x/"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_reads_return_exact_bytes() {
    let (_server, store) = server_with_bucket().await;
    let bytes = pseudo_random_bytes(100_003, 7);
    store
        .put(BUCKET, "r/obj", Bytes::from(bytes.clone()))
        .await
        .unwrap();

    for (start, len) in [
        (0, 8),
        (8, 1000),
        (4095, 4097),
        (99_000, 1003),
        (100_002, 1),
        (0, 100_003),
    ] {
        let got = store.get_range(BUCKET, "r/obj", start, len).await.unwrap();
        assert_eq!(
            &got[..],
            &bytes[start as usize..(start + len) as usize],
            "{start}+{len}"
        );
    }
    assert!(store
        .get_range(BUCKET, "r/obj", 5, 0)
        .await
        .unwrap()
        .is_empty());

    let head = store.head(BUCKET, "r/obj").await.unwrap().unwrap();
    assert_eq!(head.size, 100_003);
    assert_eq!(head.rel, "r/obj");
    assert!(head
        .etag
        .as_deref()
        .is_some_and(|e| !e.is_empty() && !e.contains('"')));

    assert_eq!(
        &store.get_small(BUCKET, "r/obj", 100_003).await.unwrap()[..],
        &bytes[..]
    );
    let err = store.get_small(BUCKET, "r/obj", 1000).await.unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::TooLarge {
                size: 100_003,
                max: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("s3://shardpress-test/r/obj"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_past_the_end_is_an_error_naming_key_and_range() {
    let (_server, store) = server_with_bucket().await;
    store
        .put(BUCKET, "r/short", Bytes::from(pseudo_random_bytes(50, 1)))
        .await
        .unwrap();

    // Starts inside the object, ends past it: the server sends 10 bytes, not 20.
    let err = store
        .get_range(BUCKET, "r/short", 40, 20)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::RangeNotSatisfiable {
                start: 40,
                end: 60,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("s3://shardpress-test/r/short"), "{msg}");
    assert!(msg.contains("bytes 40..60"), "{msg}");
    assert!(msg.contains("50 bytes"), "{msg}");
    assert!(!err.is_retryable());

    // Starts past the end: the server refuses (416).
    let err = store.get_range(BUCKET, "r/short", 50, 1).await.unwrap_err();
    assert!(
        matches!(err, StorageError::RangeNotSatisfiable { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("s3://shardpress-test/r/short: bytes 50..51"),
        "{msg}"
    );
    assert!(msg.contains("(50 bytes)"), "{msg}");

    // Through the engine's trait, a source whose recorded length is wrong.
    let source = store.byte_source(BUCKET, "r/short", 80, "s3://shardpress-test/r/short");
    let err = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 30];
        source.read_exact_at(40, &mut buf).unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("bytes 40..70"), "{err}");
    assert!(StorageError::find_in(&err).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_not_found_naming_the_object() {
    let (_server, store) = server_with_bucket().await;
    let err = store
        .get_range(BUCKET, "missing/key", 0, 10)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(
        err.to_string(),
        "s3://shardpress-test/missing/key: no such object"
    );

    let err = store
        .get_small(BUCKET, "missing/key", 10)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(store.head(BUCKET, "missing/key").await.unwrap().is_none());

    let err = store
        .copy(BUCKET, "missing/key", BUCKET, "dst/key")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("s3://shardpress-test/missing/key:"),
        "{err}"
    );

    // The engine sees an io::Error of kind NotFound that still carries the storage error.
    let source = store.byte_source(
        BUCKET,
        "missing/key",
        10,
        "s3://shardpress-test/missing/key",
    );
    let err = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 4];
        source.read_exact_at(0, &mut buf).unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(StorageError::find_in(&err).unwrap().is_not_found());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_writer_round_trips_and_hashes() {
    let (server, store) = server_with_bucket().await;
    // Two full parts and a tail.
    let bytes = pseudo_random_bytes(2 * PART_SIZE + 123_457, 3);
    let expected_sha = hex::encode(Sha256::digest(&bytes));

    let (writer_store, input) = (store.clone(), bytes.clone());
    let (len, sha) = tokio::task::spawn_blocking(move || {
        let mut writer = writer_store.multipart_writer(BUCKET, "out/big.safetensors");
        // Odd-sized writes that straddle part boundaries.
        for chunk in input.chunks(1_000_003) {
            writer.write_all(chunk).unwrap();
        }
        writer.flush().unwrap();
        assert_eq!(writer.bytes_written(), input.len() as u64);
        writer.finish().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(len, bytes.len() as u64);
    assert_eq!(sha, expected_sha);

    let head = store
        .head(BUCKET, "out/big.safetensors")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head.size, bytes.len() as u64);

    // Read back through the engine's trait: one read larger than READ_CHUNK (split into
    // concurrent ranges) and one small read.
    assert!(bytes.len() > READ_CHUNK);
    let source = store.byte_source(BUCKET, "out/big.safetensors", len, "out");
    let expected = bytes.clone();
    tokio::task::spawn_blocking(move || {
        let mut all = vec![0u8; expected.len()];
        source.read_exact_at(0, &mut all).unwrap();
        assert!(all == expected, "whole-object read differs");
        let mut some = vec![0u8; 777];
        source
            .read_exact_at(PART_SIZE as u64 - 100, &mut some)
            .unwrap();
        assert_eq!(some, expected[PART_SIZE - 100..PART_SIZE + 677]);
    })
    .await
    .unwrap();
    assert!(upload_files(&server.data_dir()).is_empty());

    // Smaller than one part (single PutObject), and empty.
    for (key, size) in [("out/small", 1000usize), ("out/empty", 0)] {
        let bytes = pseudo_random_bytes(size, 9);
        let (writer_store, input) = (store.clone(), bytes.clone());
        let (len, sha) = tokio::task::spawn_blocking(move || {
            let mut writer = writer_store.multipart_writer(BUCKET, key);
            writer.write_all(&input).unwrap();
            writer.finish().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(len, size as u64);
        assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(
            &store.get_small(BUCKET, key, 1 << 20).await.unwrap()[..],
            &bytes[..]
        );
    }

    // Server-side copies, in one request and in parts.
    store
        .copy(BUCKET, "out/small", BUCKET, "copies/a b+c.bin")
        .await
        .unwrap();
    assert_eq!(
        store
            .get_small(BUCKET, "copies/a b+c.bin", 1 << 20)
            .await
            .unwrap()
            .len(),
        1000
    );
    store
        .copy_multipart(BUCKET, "out/big.safetensors", BUCKET, "copies/big", 5 << 20)
        .await
        .unwrap();
    let copied = store.get_range(BUCKET, "copies/big", 0, len).await.unwrap();
    assert!(copied[..] == bytes[..], "multipart copy differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_writer_leaves_no_object_and_no_upload() {
    let (server, store) = server_with_bucket().await;
    assert!(upload_files(&server.data_dir()).is_empty());

    // Dropped after one full part was sent: the abort runs in the background.
    let writer_store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut writer = writer_store.multipart_writer(BUCKET, "out/dropped");
        writer
            .write_all(&pseudo_random_bytes(PART_SIZE + 10, 4))
            .unwrap();
        drop(writer);
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !upload_files(&server.data_dir()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "upload left behind: {:?}",
            upload_files(&server.data_dir())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.head(BUCKET, "out/dropped").await.unwrap().is_none());

    // Explicit abort waits for the server; the upload existed before it.
    let (writer_store, data_dir) = (store.clone(), server.data_dir());
    let during = tokio::task::spawn_blocking(move || {
        let mut writer = writer_store.multipart_writer(BUCKET, "out/aborted");
        writer
            .write_all(&pseudo_random_bytes(3 * PART_SIZE, 5))
            .unwrap();
        let during = upload_files(&data_dir).len();
        writer.abort().unwrap();
        during
    })
    .await
    .unwrap();
    assert!(during > 0, "no multipart upload was in progress");
    assert!(
        upload_files(&server.data_dir()).is_empty(),
        "{:?}",
        upload_files(&server.data_dir())
    );
    assert!(store.head(BUCKET, "out/aborted").await.unwrap().is_none());

    // Dropped before a part was full: nothing was ever sent.
    let writer_store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut writer = writer_store.multipart_writer(BUCKET, "out/tiny");
        writer.write_all(b"partial").unwrap();
    })
    .await
    .unwrap();
    assert!(store.head(BUCKET, "out/tiny").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_poisons_the_writer() {
    let (server, store) = server_with_bucket().await;
    let err = tokio::task::spawn_blocking(move || {
        let mut writer = store.multipart_writer(BUCKET, "out/poisoned");
        writer
            .write_all(&pseudo_random_bytes(PART_SIZE + 1, 1))
            .unwrap();
        // The server goes away in the middle of the upload.
        drop(server);
        let part = pseudo_random_bytes(PART_SIZE, 2);
        let err = (0..8)
            .find_map(|_| writer.write_all(&part).err())
            .expect("writes kept succeeding without a server");
        let again = writer.write_all(b"more").unwrap_err();
        assert!(
            again
                .to_string()
                .contains("an earlier failure aborted this upload"),
            "{again}"
        );
        let finish = writer.finish().unwrap_err();
        assert!(matches!(finish, StorageError::Upload { .. }), "{finish:?}");
        err
    })
    .await
    .unwrap();
    let inner = StorageError::find_in(&err).unwrap();
    assert!(inner.is_retryable(), "{inner:?}");
    assert!(
        err.to_string()
            .contains("s3://shardpress-test/out/poisoned"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_retryable_error() {
    let server = S3Server::start();
    let store = server.store().await;
    drop(server);
    let err = store.get_range(BUCKET, "k", 0, 1).await.unwrap_err();
    assert!(matches!(err, StorageError::Transport { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        err.to_string()
            .starts_with("s3://shardpress-test/k: GetObject failed"),
        "{err}"
    );
}

/// A safetensors file: 8-byte little-endian header length, JSON header (padded with spaces
/// to a multiple of 8), data.
fn safetensors(tensors: &[(&str, &str, &[u64], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut body = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = body.len();
        body.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, body.len()]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&body);
    out
}

fn f32_bytes(n: usize, seed: u64) -> Vec<u8> {
    pseudo_random_bytes(n, seed)
        .iter()
        .flat_map(|b| (f32::from(*b) / 255.0 - 0.5).to_le_bytes())
        .collect()
}

/// A two-shard checkpoint with an index, a config and a tokenizer in a subfolder.
fn write_checkpoint(dir: &Path) {
    let shard1 = safetensors(&[
        (
            "model.layers.0.mlp.up_proj.weight",
            "F32",
            &[4, 8],
            f32_bytes(32, 1),
        ),
        (
            "model.layers.0.input_layernorm.weight",
            "F32",
            &[8],
            f32_bytes(8, 2),
        ),
    ]);
    let shard2 = safetensors(&[
        (
            "model.layers.1.mlp.up_proj.weight",
            "F32",
            &[4, 8],
            f32_bytes(32, 3),
        ),
        (
            "position_ids",
            "I64",
            &[1, 3],
            [0i64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    ]);
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), shard1).unwrap();
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), shard2).unwrap();
    let index = serde_json::json!({
        "metadata": {"total_size": 0},
        "weight_map": {
            "model.layers.0.mlp.up_proj.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.input_layernorm.weight": "model-00001-of-00002.safetensors",
            "model.layers.1.mlp.up_proj.weight": "model-00002-of-00002.safetensors",
            "position_ids": "model-00002-of-00002.safetensors",
        }
    });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        br#"{"model_type": "llama", "hidden_size": 8}"#,
    )
    .unwrap();
    std::fs::create_dir(dir.join("1_Pooling")).unwrap();
    std::fs::write(dir.join("1_Pooling/config.json"), b"{}").unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not used").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_checkpoint_matches_the_local_checkpoint() {
    let (server, store) = server_with_bucket().await;
    let local_dir = tempfile::tempdir().unwrap();
    write_checkpoint(local_dir.path());
    let keys = server
        .upload_dir(BUCKET, "models/tiny", local_dir.path())
        .await;
    assert_eq!(keys.len(), 6);

    let uri = S3Uri::parse(&format!("s3://{BUCKET}/models/tiny")).unwrap();
    let remote = open_checkpoint(&store, &uri).await.unwrap();
    let local = Checkpoint::open_local(local_dir.path()).unwrap();

    assert_eq!(remote.root, "s3://shardpress-test/models/tiny/");
    assert_eq!(remote.tensors, local.tensors);
    assert_eq!(remote.other_files, local.other_files);
    assert_eq!(remote.skipped_files, local.skipped_files);
    assert_eq!(remote.config, local.config);
    assert_eq!(remote.tensor_bytes(), local.tensor_bytes());
    assert_eq!(remote.shards.len(), 2);
    for (r, l) in remote.shards.iter().zip(&local.shards) {
        assert_eq!(r.file_name, l.file_name);
        assert_eq!(r.header.tensors, l.header.tensors);
        assert_eq!(r.header.header_len, l.header.header_len);
        assert_eq!(r.source.len(), l.source.len());
        assert_eq!(
            r.source.name(),
            format!("s3://shardpress-test/models/tiny/{}", r.file_name)
        );
    }

    // Tensor bytes read through the S3 sources equal the local ones.
    tokio::task::spawn_blocking(move || {
        for name in local.tensors.keys() {
            let (ls, li) = local.info(name).unwrap();
            let (rs, ri) = remote.info(name).unwrap();
            let mut lb = vec![0u8; li.byte_len() as usize];
            let mut rb = vec![0u8; ri.byte_len() as usize];
            ls.source
                .read_exact_at(ls.header.data_start() + li.start, &mut lb)
                .unwrap();
            rs.source
                .read_exact_at(rs.header.data_start() + ri.start, &mut rb)
                .unwrap();
            assert_eq!(lb, rb, "{name}");
        }
    })
    .await
    .unwrap();

    // Round trip of the testkit's download helper.
    let back = tempfile::tempdir().unwrap();
    let rels = server
        .download_prefix(BUCKET, "models/tiny", back.path())
        .await;
    assert_eq!(rels.len(), 6);
    for rel in rels {
        assert_eq!(
            std::fs::read(back.path().join(&rel)).unwrap(),
            std::fs::read(local_dir.path().join(&rel)).unwrap(),
            "{rel}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_checkpoint_reports_problems_with_s3_names() {
    let (_server, store) = server_with_bucket().await;

    let empty = S3Uri::parse(&format!("s3://{BUCKET}/nothing")).unwrap();
    let err = open_checkpoint(&store, &empty).await.unwrap_err();
    assert!(matches!(err, OpenCheckpointError::Empty { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "s3://shardpress-test/nothing/: no objects under this prefix"
    );

    // A truncated shard: the header says more bytes than there are.
    let mut broken = safetensors(&[("w", "F32", &[2, 2], f32_bytes(4, 1))]);
    broken.truncate(broken.len() - 4);
    store
        .put(BUCKET, "bad/model.safetensors", Bytes::from(broken))
        .await
        .unwrap();
    let uri = S3Uri::parse(&format!("s3://{BUCKET}/bad")).unwrap();
    let err = open_checkpoint(&store, &uri).await.unwrap_err();
    assert!(matches!(err, OpenCheckpointError::Checkpoint(_)), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("s3://shardpress-test/bad/model.safetensors: "),
        "{err}"
    );
    assert!(!err.is_retryable());

    let missing_bucket = S3Uri::parse("s3://no-such-bucket/m").unwrap();
    let err = open_checkpoint(&store, &missing_bucket).await.unwrap_err();
    assert!(
        matches!(
            err,
            OpenCheckpointError::Storage(StorageError::NoSuchBucket { .. })
        ),
        "{err:?}"
    );
}
