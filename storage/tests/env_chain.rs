//! `s3_client` takes credentials, region and endpoint from the standard AWS environment
//! variables, and explicit settings win over them. This file holds a single test because it
//! changes the process environment.

use bytes::Bytes;
use shardpress_storage::{s3_client, ObjectStore, S3Settings};
use shardpress_testkit::S3Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_uses_the_aws_environment_and_explicit_settings_override_it() {
    let server = S3Server::start();
    server.create_bucket("env-bucket").await;
    // Keep profile files on this machine out of the picture.
    std::env::set_var("AWS_CONFIG_FILE", "/nonexistent/aws-config");
    std::env::set_var(
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/aws-credentials",
    );
    for (name, value) in server.env() {
        std::env::set_var(name, value);
    }

    // Everything from the environment.
    let from_env = S3Settings {
        endpoint: None,
        region: None,
        path_style: true,
        ..S3Settings::default()
    };
    let store = ObjectStore::new(s3_client(&from_env).await);
    store
        .put("env-bucket", "k", Bytes::from_static(b"v"))
        .await
        .unwrap();
    assert_eq!(
        &store.get_small("env-bucket", "k", 10).await.unwrap()[..],
        b"v"
    );

    // The explicit endpoint wins over a wrong AWS_ENDPOINT_URL; without any region
    // configured the client still works (it falls back to us-east-1).
    std::env::set_var("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    std::env::remove_var("AWS_REGION");
    std::env::remove_var("AWS_DEFAULT_REGION");
    let explicit = S3Settings {
        endpoint: Some(server.endpoint()),
        region: None,
        path_style: true,
        ..S3Settings::default()
    };
    let client = s3_client(&explicit).await;
    assert_eq!(
        client.config().region().map(|r| r.as_ref().to_string()),
        Some("us-east-1".to_string())
    );
    let store = ObjectStore::new(client);
    assert_eq!(
        &store.get_small("env-bucket", "k", 10).await.unwrap()[..],
        b"v"
    );

    // And the wrong endpoint from the environment is used when nothing overrides it.
    let store = ObjectStore::new(s3_client(&from_env).await);
    let err = store.get_small("env-bucket", "k", 10).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}
