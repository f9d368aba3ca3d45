//! Building an S3 client from settings, the environment and the AWS credential chain.

use std::time::Duration;

use aws_config::meta::region::RegionProviderChain;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::Client;

/// Region used when neither the settings nor the environment name one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Attempts per request in the SDK's standard retry mode (the first try included).
pub const MAX_ATTEMPTS: u32 = 4;

/// How long establishing a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long may pass from starting a request (sending its body included) to the first byte
/// of the response, and between two pieces of a response body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound of the pause before the first retry; each further retry doubles it, up to
/// [`MAX_BACKOFF`]. The pause itself is drawn at random below the bound (full jitter), so
/// clients that failed together do not retry together.
pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);

/// Largest bound of a pause between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(20);

/// Where and how to reach the object store. Credentials are not part of the settings: they
/// come from the standard AWS chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, profiles,
/// SSO, instance roles, …).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint URL such as `http://127.0.0.1:9000`; overrides `AWS_ENDPOINT_URL`. `None`
    /// uses the environment, then AWS itself.
    pub endpoint: Option<String>,
    /// Region; `None` uses `AWS_REGION` or the profile, then [`DEFAULT_REGION`].
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket/key` rather than `bucket.endpoint/key`; most
    /// S3-compatible servers need this.
    pub path_style: bool,
    /// How long a request may wait for the first byte of its response, and a response body
    /// for its next piece, before the attempt fails and is retried; `None` uses
    /// [`READ_TIMEOUT`]. The commands take it as `--s3-read-timeout` seconds
    /// (`SHARDPRESS_S3_READ_TIMEOUT`).
    pub read_timeout: Option<Duration>,
    /// Attempts per request, the first included (also the attempts at a ranged read whose
    /// body breaks off); `None` uses [`MAX_ATTEMPTS`].
    pub max_attempts: Option<u32>,
    /// Bound of the first retry's jittered pause; `None` uses [`INITIAL_BACKOFF`].
    pub initial_backoff: Option<Duration>,
}

/// Builds a client with credentials from the standard AWS chain.
///
/// Request checksums are sent, and response checksums checked, only where the operation
/// requires them: several S3-compatible servers reject the streaming (aws-chunked) checksum
/// trailers the SDK otherwise adds to uploads. Requests use the standard retry mode
/// (exponential backoff with full jitter) with the attempts, backoff and read timeout of
/// `settings` ([`MAX_ATTEMPTS`], [`INITIAL_BACKOFF`] and [`READ_TIMEOUT`] by default) and the
/// [`CONNECT_TIMEOUT`] limit. [`crate::ObjectStore`] resumes broken response bodies with the
/// same limits.
pub async fn s3_client(settings: &S3Settings) -> Client {
    build_client(settings, None).await
}

/// Like [`s3_client`] but with fixed credentials instead of the AWS chain (tests, or
/// deployments that pass keys explicitly).
pub async fn s3_client_with_static_credentials(
    settings: &S3Settings,
    access_key: &str,
    secret_key: &str,
) -> Client {
    let credentials = Credentials::new(access_key, secret_key, None, None, "shardpress-static");
    build_client(settings, Some(credentials)).await
}

async fn build_client(settings: &S3Settings, credentials: Option<Credentials>) -> Client {
    let explicit_region = settings
        .region
        .as_deref()
        .filter(|r| !r.is_empty())
        .map(|r| Region::new(r.to_string()));
    let region = RegionProviderChain::first_try(explicit_region)
        .or_default_provider()
        .or_else(Region::from_static(DEFAULT_REGION));
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).region(region);
    if let Some(endpoint) = settings.endpoint.as_deref().filter(|e| !e.is_empty()) {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(credentials) = credentials {
        loader = loader.credentials_provider(credentials);
    }
    let shared = loader.load().await;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(settings.path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(settings.max_attempts.unwrap_or(MAX_ATTEMPTS).max(1))
                .with_initial_backoff(settings.initial_backoff.unwrap_or(INITIAL_BACKOFF))
                .with_max_backoff(MAX_BACKOFF),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .read_timeout(settings.read_timeout.unwrap_or(READ_TIMEOUT))
                .build(),
        )
        .build();
    Client::from_conf(config)
}
