//! The S3 test server: credentials, settings and environment for clients, cleanup.

use shardpress_testkit::{S3Server, ACCESS_KEY, SECRET_KEY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_accepts_the_test_credentials_only() {
    let server = S3Server::start();
    server.create_bucket("tk-bucket").await;
    let store = server.store().await;
    store
        .put("tk-bucket", "a/b.txt", bytes::Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(
        &store.get_small("tk-bucket", "a/b.txt", 100).await.unwrap()[..],
        b"hello"
    );
    assert!(server.data_dir().join("tk-bucket/a/b.txt").is_file());

    let env = server.env();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("AWS_ACCESS_KEY_ID").as_deref(), Some(ACCESS_KEY));
    assert_eq!(get("AWS_SECRET_ACCESS_KEY").as_deref(), Some(SECRET_KEY));
    assert_eq!(get("AWS_ENDPOINT_URL"), Some(server.endpoint()));
    assert_eq!(server.settings().endpoint, Some(server.endpoint()));
    assert!(server.settings().path_style);

    // Wrong keys are refused, so the server really checks signatures.
    let wrong = shardpress_storage::s3_client_with_static_credentials(
        &server.settings(),
        ACCESS_KEY,
        "not-the-secret",
    )
    .await;
    let store = shardpress_storage::ObjectStore::new(wrong);
    let err = store
        .get_small("tk-bucket", "a/b.txt", 100)
        .await
        .unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");

    let (port, data) = (server.port(), server.data_dir());
    drop(server);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    assert!(!data.exists());
}
