//! Authentication and TLS of the coordinator's gRPC services, against real Postgres and a real
//! S3 server: each API takes only its own token, unauthenticated calls get `Unauthenticated`,
//! and a TLS coordinator is reachable only over TLS with a trusted certificate.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use shardpress_coordinator::{serve, CoordinatorConfig};
use shardpress_proto::auth::{endpoint, server_tls, Bearer, ClientTls, Token};
use shardpress_proto::v1::job_service_client::JobServiceClient;
use shardpress_proto::v1::worker_service_client::WorkerServiceClient;
use shardpress_proto::v1::{LeaseTasksRequest, ListJobsRequest};
use shardpress_testkit::{PgCluster, S3Server};
use tonic::Code;

const CLIENT: &str = "client-token-0123456789abcdef";
const WORKER: &str = "worker-token-0123456789abcdef";

struct Running {
    _pg: PgCluster,
    _s3: S3Server,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn start(configure: impl FnOnce(&mut CoordinatorConfig)) -> Running {
        shardpress_testkit::use_test_credentials();
        let pg = PgCluster::start();
        let url = pg.create_database("auth");
        let s3 = S3Server::start();
        let mut config =
            CoordinatorConfig::new("127.0.0.1:0".parse().expect("addr"), url, s3.settings());
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, config, async move {
            let _ = rx.await;
        }));
        Running {
            _pg: pg,
            _s3: s3,
            port,
            stop: Some(tx),
            server,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.server
            .await
            .expect("join")
            .expect("coordinator exited cleanly");
    }
}

fn token(s: &str) -> Option<Token> {
    Some(Token::new(s, "test token").expect("token"))
}

/// Connects to `url` (retrying while the server starts) with `token`.
async fn clients(
    url: &str,
    tls: &ClientTls,
    token: Option<Token>,
) -> Result<
    (
        JobServiceClient<shardpress_proto::auth::AuthChannel>,
        WorkerServiceClient<shardpress_proto::auth::AuthChannel>,
    ),
    String,
> {
    let ep = endpoint(url, tls).map_err(|e| e.to_string())?;
    let mut last = String::new();
    for _ in 0..100 {
        match ep.connect().await {
            Ok(ch) => {
                return Ok((
                    JobServiceClient::with_interceptor(ch.clone(), Bearer::new(token.clone())),
                    WorkerServiceClient::with_interceptor(ch, Bearer::new(token)),
                ))
            }
            Err(e) => last = format!("{e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last)
}

/// Calls both APIs and returns their status codes (`Ok` as `Code::Ok`).
async fn codes(url: &str, tls: &ClientTls, token: Option<Token>) -> (Code, Code) {
    let (mut jobs, mut workers) = clients(url, tls, token).await.expect("connect");
    // The coordinator migrates before serving: wait until the job API answers at all.
    let mut job = Code::Unavailable;
    for _ in 0..200 {
        job = match jobs.list_jobs(ListJobsRequest::default()).await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        if job != Code::Unavailable {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker = match workers
        .lease_tasks(LeaseTasksRequest {
            worker_id: "auth-test".into(),
            max_tasks: 1,
        })
        .await
    {
        Ok(r) => {
            assert!(r.into_inner().leases.is_empty(), "nothing to lease");
            Code::Ok
        }
        Err(s) => s.code(),
    };
    (job, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_api_takes_only_its_own_token() {
    let c = Running::start(|c| {
        c.client_token = token(CLIENT);
        c.worker_token = token(WORKER);
    })
    .await;
    let url = format!("http://127.0.0.1:{}", c.port);
    let plain = ClientTls::default();
    assert_eq!(
        codes(&url, &plain, token(CLIENT)).await,
        (Code::Ok, Code::Unauthenticated),
        "client token"
    );
    assert_eq!(
        codes(&url, &plain, token(WORKER)).await,
        (Code::Unauthenticated, Code::Ok),
        "worker token"
    );
    assert_eq!(
        codes(&url, &plain, None).await,
        (Code::Unauthenticated, Code::Unauthenticated),
        "no token"
    );
    assert_eq!(
        codes(&url, &plain, token("wrong-token-0123456789abcdef")).await,
        (Code::Unauthenticated, Code::Unauthenticated),
        "wrong token"
    );
    // The message says what is missing, never what was expected.
    let (mut jobs, _) = clients(&url, &plain, None).await.expect("connect");
    let err = jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .expect_err("refused");
    assert!(err.message().contains("client token"), "{err:?}");
    assert!(!err.message().contains(CLIENT), "{err:?}");
    // Health checks need no token (probes carry none).
    let ch = endpoint(&url, &plain)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health");
    assert_eq!(health.into_inner().status, 1, "SERVING");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_client_and_worker_tokens_are_refused() {
    let c = Running::start(|c| {
        c.client_token = token(CLIENT);
        c.worker_token = token(CLIENT);
    })
    .await;
    let err = c
        .server
        .await
        .expect("join")
        .expect_err("same tokens must not serve");
    assert!(err.to_string().contains("must differ"), "{err:#}");
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_only_trusted_tls_clients() {
    let dir = tempfile::tempdir().expect("dir");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = write(dir.path(), "cert.pem", &made.cert.pem());
    let key = write(dir.path(), "key.pem", &made.signing_key.serialize_pem());
    let tls = server_tls(&cert, &key).expect("tls config");
    let c = Running::start(move |c| {
        c.tls = Some(tls);
        c.client_token = token(CLIENT);
        c.worker_token = token(WORKER);
    })
    .await;
    let https = format!("https://localhost:{}", c.port);
    let trusted = ClientTls {
        ca: Some(cert.clone()),
    };
    assert_eq!(
        codes(&https, &trusted, token(CLIENT)).await,
        (Code::Ok, Code::Unauthenticated),
        "over TLS"
    );
    // Plain HTTP/2 to a TLS port gets no answer.
    let http = format!("http://127.0.0.1:{}", c.port);
    let (mut jobs, _) = clients(&http, &ClientTls::default(), token(CLIENT))
        .await
        .expect("tcp connects");
    let err = jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .expect_err("plain call to TLS port");
    assert_ne!(err.code(), Code::Ok);
    // A certificate the client does not trust: the handshake fails.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let untrusted = ClientTls {
        ca: Some(write(dir.path(), "other.pem", &other.cert.pem())),
    };
    let refused = endpoint(&https, &untrusted)
        .expect("endpoint")
        .connect()
        .await;
    assert!(refused.is_err(), "untrusted certificate accepted");
    c.stop().await;
}
