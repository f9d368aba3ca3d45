//! The coordinator's API against real Postgres and a real S3 server, with the test playing the
//! worker over gRPC so every lease transition can be driven exactly.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shardpress_coordinator::{serve, CoordinatorConfig};
use shardpress_engine::safetensors::TensorSpec;
use shardpress_engine::DType;
use shardpress_proto::v1::job_service_client::JobServiceClient;
use shardpress_proto::v1::worker_service_client::WorkerServiceClient;
use shardpress_proto::v1::*;
use shardpress_testkit::{PgCluster, S3Server};
use tonic::transport::Channel;
use tonic::Code;

struct Env {
    _pg: PgCluster,
    s3: S3Server,
    db: sqlx::PgPool,
    jobs: JobServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    config: CoordinatorConfig,
}

impl Env {
    async fn start(lease_seconds: u32, max_attempts: u32) -> Env {
        shardpress_testkit::use_test_credentials();
        let pg = PgCluster::start();
        let url = pg.create_database("coord");
        let s3 = S3Server::start();
        s3.create_bucket("src-models").await;
        s3.create_bucket("dst-models").await;
        let dir = tempfile::tempdir().expect("tempdir");
        write_tiny_checkpoint(dir.path(), 3);
        s3.upload_dir("src-models", "model/", dir.path()).await;
        let mut config = CoordinatorConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            url.clone(),
            s3.settings(),
        );
        config.lease_seconds = lease_seconds;
        config.max_attempts = max_attempts;
        let db = sqlx::PgPool::connect(&url).await.expect("db");
        let mut env = Env {
            _pg: pg,
            s3,
            db,
            jobs: dummy_client().0,
            workers: dummy_client().1,
            stop: None,
            server: None,
            config,
        };
        env.restart_coordinator().await;
        env
    }

    async fn restart_coordinator(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.expect("join").expect("coordinator exited cleanly");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = self.config.clone();
        self.server = Some(tokio::spawn(serve(listener, config, async move {
            let _ = rx.await;
        })));
        self.stop = Some(tx);
        let endpoint = format!("http://{addr}");
        let channel = loop {
            match Channel::from_shared(endpoint.clone())
                .expect("uri")
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.jobs = JobServiceClient::new(channel.clone());
        self.workers = WorkerServiceClient::new(channel);
        // Migrations run before serving; wait until the API answers.
        for _ in 0..200 {
            if self
                .jobs
                .list_jobs(ListJobsRequest::default())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("coordinator did not come up");
    }

    async fn submit(
        &mut self,
        source: &str,
        recipe: Recipe,
        key: &str,
    ) -> Result<SubmitJobResponse, tonic::Status> {
        self.jobs
            .submit_job(SubmitJobRequest {
                source_uri: source.into(),
                destination_uri: "s3://dst-models/model-w8/".into(),
                recipe: Some(recipe),
                idempotency_key: key.into(),
                labels: Default::default(),
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn job(&mut self, id: &str) -> Job {
        self.jobs
            .get_job(GetJobRequest { job_id: id.into() })
            .await
            .expect("get job")
            .into_inner()
    }

    async fn lease(&mut self, worker: &str, n: u32) -> Vec<TaskLease> {
        self.workers
            .lease_tasks(LeaseTasksRequest {
                worker_id: worker.into(),
                max_tasks: n,
            })
            .await
            .expect("lease")
            .into_inner()
            .leases
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db)
            .await
            .expect("count")
    }
}

fn dummy_client() -> (JobServiceClient<Channel>, WorkerServiceClient<Channel>) {
    let ch = Channel::from_static("http://127.0.0.1:9").connect_lazy();
    (
        JobServiceClient::new(ch.clone()),
        WorkerServiceClient::new(ch),
    )
}

fn preset(name: &str) -> Recipe {
    Recipe {
        source: Some(recipe::Source::Preset(name.into())),
    }
}

/// A Llama-shaped checkpoint with `layers` blocks of small random matrices.
fn write_tiny_checkpoint(dir: &Path, layers: usize) {
    let mut specs = vec![TensorSpec::new(
        "model.embed_tokens.weight",
        DType::F32,
        vec![16, 8],
    )];
    for l in 0..layers {
        specs.push(TensorSpec::new(
            format!("model.layers.{l}.input_layernorm.weight"),
            DType::F32,
            vec![8],
        ));
        specs.push(TensorSpec::new(
            format!("model.layers.{l}.mlp.up_proj.weight"),
            DType::F32,
            vec![12, 8],
        ));
        specs.push(TensorSpec::new(
            format!("model.layers.{l}.mlp.down_proj.weight"),
            DType::F32,
            vec![8, 12],
        ));
    }
    specs.push(TensorSpec::new("model.norm.weight", DType::F32, vec![8]));
    shardpress_testkit::write_f32_checkpoint(dir, &specs);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","num_hidden_layers":3}"#,
    )
    .expect("config");
    std::fs::write(dir.join("tokenizer.json"), r#"{"version":"1.0"}"#).expect("tokenizer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_is_idempotent_and_plans_one_task_per_layer_group() {
    let mut env = Env::start(30, 3).await;
    let a = env
        .submit("s3://src-models/model/", preset("w8a16"), "key-1")
        .await
        .expect("submit");
    let b = env
        .submit("s3://src-models/model/", preset("w8a16"), "key-1")
        .await
        .expect("submit again");
    assert!(a.created);
    assert!(!b.created);
    assert_eq!(a.job_id, b.job_id);
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 1);
    let job = env.job(&a.job_id).await;
    assert_eq!(job.state, JobState::Queued as i32);
    // embeddings, 3 layers, final norm
    assert_eq!(job.tasks_total, 5);
    assert_eq!(
        env.count("SELECT count(*) FROM tasks WHERE state = 'queued'")
            .await,
        5
    );
    let expected_in: i64 = (16 * 8 + 3 * (8 + 96 + 96) + 8) * 4;
    assert_eq!(job.bytes_in as i64, expected_in);
    let c = env
        .submit("s3://src-models/model/", preset("w8a16"), "key-2")
        .await
        .expect("other key");
    assert_ne!(c.job_id, a.job_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_with_nothing_stored() {
    let mut env = Env::start(30, 3).await;
    let bad_recipe = Recipe {
        source: Some(recipe::Source::Toml(
            "[[rules]]\ntargets = [\"*.weight\"]\naction = \"quantize\"\nbits = 9\n".into(),
        )),
    };
    let cases: Vec<(&str, &str, Recipe, &str)> = vec![
        (
            "s3://src-models/model/",
            "s3://dst-models/x/",
            bad_recipe,
            "bits must be 2 to 8, got 9",
        ),
        (
            "s3://src-models/model/",
            "s3://dst-models/x/",
            preset("w3a16"),
            "unknown preset \"w3a16\"",
        ),
        (
            "http://in/model/",
            "s3://dst-models/x/",
            preset("w8a16"),
            "source_uri",
        ),
        (
            "s3://src-models/model/",
            "s3://src-models/model/out/",
            preset("w8a16"),
            "overlaps",
        ),
        (
            "s3://src-models/model/",
            "",
            preset("w8a16"),
            "destination_uri",
        ),
    ];
    for (src, dst, recipe, want) in cases {
        let err = env
            .jobs
            .submit_job(SubmitJobRequest {
                source_uri: src.into(),
                destination_uri: dst.into(),
                recipe: Some(recipe),
                idempotency_key: String::new(),
                labels: Default::default(),
            })
            .await
            .expect_err("must be refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().contains(want),
            "{} should mention {want}",
            err.message()
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM jobs").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM tasks").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_source_fails_the_job_naming_the_location() {
    let mut env = Env::start(30, 3).await;
    let r = env
        .submit("s3://src-models/nothing-here/", preset("w8a16"), "k")
        .await
        .expect("submit");
    let job = env.job(&r.job_id).await;
    assert_eq!(job.state, JobState::Failed as i32);
    assert!(
        job.error.contains("s3://src-models/nothing-here"),
        "{}",
        job.error
    );
    assert_eq!(env.count("SELECT count(*) FROM tasks").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_requeued_and_the_stale_worker_is_fenced_out() {
    let mut env = Env::start(1, 3).await;
    let r = env
        .submit("s3://src-models/model/", preset("w8a16"), "k")
        .await
        .expect("submit");
    let first = env.lease("w1", 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempt, 1);
    assert_eq!(env.job(&r.job_id).await.state, JobState::Running as i32);
    // No heartbeat: the lease lapses and the task comes back (after its backoff).
    let mut again = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = env
            .lease("w2", 10)
            .await
            .into_iter()
            .filter(|l| l.task_seq == first[0].task_seq)
            .collect();
        if !again.is_empty() {
            break;
        }
    }
    assert_eq!(again.len(), 1, "task was not requeued");
    assert_eq!(again[0].attempt, 2);
    assert_ne!(again[0].lease_token, first[0].lease_token);
    let stale = env
        .workers
        .complete_task(CompleteTaskRequest {
            job_id: r.job_id.clone(),
            task_seq: first[0].task_seq,
            lease_token: first[0].lease_token.clone(),
            output_key: "x".into(),
            output_bytes: 1,
            sha256: "0".repeat(64),
            tensors_json: "[]".into(),
            layer_json: String::new(),
            memory: None,
            output_etag: String::new(),
        })
        .await
        .expect_err("stale completion");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let hb = env
        .workers
        .heartbeat(HeartbeatRequest {
            job_id: r.job_id.clone(),
            task_seq: first[0].task_seq,
            lease_token: first[0].lease_token.clone(),
            bytes_done: 0,
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(!hb.keep_going);
    assert!(hb.reason.contains("another worker"), "{}", hb.reason);
    let events = env
        .count("SELECT count(*) FROM job_events WHERE kind = 'requeued'")
        .await;
    assert!(events >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_limit_and_fatal_errors_fail_the_job() {
    let mut env = Env::start(30, 2).await;
    let r = env
        .submit("s3://src-models/model/", preset("w8a16"), "k")
        .await
        .expect("submit");
    let mut attempts = 0;
    for _ in 0..200 {
        let leases = env.lease("w", 1).await;
        if let Some(l) = leases.into_iter().find(|l| l.task_seq == 0) {
            attempts += 1;
            env.workers
                .fail_task(FailTaskRequest {
                    job_id: r.job_id.clone(),
                    task_seq: 0,
                    lease_token: l.lease_token,
                    error: "s3://src-models/model/model.safetensors: connection reset".into(),
                    retryable: true,
                })
                .await
                .expect("fail");
            if attempts == 2 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attempts, 2);
    let job = env.job(&r.job_id).await;
    assert_eq!(job.state, JobState::Failed as i32);
    assert!(job.error.contains("after 2 of 2 attempts"), "{}", job.error);
    assert!(job.error.contains("connection reset"), "{}", job.error);
    // The failed job hands out no more work.
    assert!(env.lease("w", 10).await.is_empty());

    let r2 = env
        .submit("s3://src-models/model/", preset("w8a16"), "k2")
        .await
        .expect("submit");
    let l = env.lease("w", 1).await.remove(0);
    env.workers
        .fail_task(FailTaskRequest {
            job_id: r2.job_id.clone(),
            task_seq: l.task_seq,
            lease_token: l.lease_token,
            error: "tensor \"x\": non-finite weight NaN at row 0, column 1".into(),
            retryable: false,
        })
        .await
        .expect("fail");
    let job = env.job(&r2.job_id).await;
    assert_eq!(job.state, JobState::Failed as i32);
    assert!(job.error.contains("non-finite weight"), "{}", job.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_leasing_and_tells_workers() {
    let mut env = Env::start(30, 3).await;
    let r = env
        .submit("s3://src-models/model/", preset("w8a16"), "k")
        .await
        .expect("submit");
    let l = env.lease("w", 1).await.remove(0);
    let job = env
        .jobs
        .cancel_job(CancelJobRequest {
            job_id: r.job_id.clone(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(job.state, JobState::Cancelled as i32);
    assert!(env.lease("w", 10).await.is_empty());
    let hb = env
        .workers
        .heartbeat(HeartbeatRequest {
            job_id: r.job_id.clone(),
            task_seq: l.task_seq,
            lease_token: l.lease_token,
            bytes_done: 0,
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(!hb.keep_going);
    assert!(hb.reason.contains("cancelled"), "{}", hb.reason);
    assert_eq!(
        env.count("SELECT count(*) FROM tasks WHERE state = 'cancelled'")
            .await,
        4
    );
    // Cancelling again is harmless.
    env.jobs
        .cancel_job(CancelJobRequest {
            job_id: r.job_id.clone(),
        })
        .await
        .expect("cancel twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_keeps_jobs_and_leases() {
    let mut env = Env::start(30, 3).await;
    let r = env
        .submit("s3://src-models/model/", preset("w8a16"), "k")
        .await
        .expect("submit");
    let l = env.lease("w", 2).await;
    assert_eq!(l.len(), 2);
    env.restart_coordinator().await;
    let job = env.job(&r.job_id).await;
    assert_eq!(job.state, JobState::Running as i32);
    assert_eq!(job.tasks.expect("counts").leased, 2);
    // Leases granted before the restart are still valid.
    let hb = env
        .workers
        .heartbeat(HeartbeatRequest {
            job_id: r.job_id.clone(),
            task_seq: l[0].task_seq,
            lease_token: l[0].lease_token.clone(),
            bytes_done: 10,
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(hb.keep_going, "{}", hb.reason);
    assert_eq!(env.lease("w", 10).await.len(), 3);
    let listed = env
        .jobs
        .list_jobs(ListJobsRequest {
            states: vec![JobState::Running as i32],
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.jobs.len(), 1);
    let _ = &env.s3;
}

/// Completes every leased task with a small object uploaded at its output key; the task
/// whose sequence number is `tamper` reports another entity tag than its object has.
async fn complete_all_with_uploads(env: &mut Env, job: &str, tamper: Option<u32>) {
    let store = env.s3.store().await;
    let mut done = 0;
    for _ in 0..300 {
        if done == 5 {
            break;
        }
        let leases = env.lease("w1", 16).await;
        if leases.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for l in leases {
            let spec: serde_json::Value = serde_json::from_str(&l.spec_json).expect("spec");
            let file = spec["file_name"].as_str().expect("file_name");
            let key = format!("model-w8/{file}");
            let body = format!("shard {file}").into_bytes();
            let len = body.len() as u64;
            store
                .put("dst-models", &key, body.into())
                .await
                .expect("upload");
            let mut etag = store
                .head("dst-models", &key)
                .await
                .expect("head")
                .and_then(|m| m.etag)
                .expect("etag");
            if tamper == Some(l.task_seq) {
                etag = "0123456789abcdef0123456789abcdef".into();
            }
            env.workers
                .complete_task(CompleteTaskRequest {
                    job_id: job.into(),
                    task_seq: l.task_seq,
                    lease_token: l.lease_token.clone(),
                    output_key: key,
                    output_bytes: len,
                    sha256: "ab".repeat(32),
                    tensors_json: "[]".into(),
                    layer_json: String::new(),
                    memory: None,
                    output_etag: etag,
                })
                .await
                .expect("complete");
            done += 1;
        }
    }
    assert_eq!(done, 5, "every task completed");
}

async fn wait_terminal(env: &mut Env, id: &str) -> Job {
    for _ in 0..300 {
        let job = env.job(id).await;
        if job.state == JobState::Succeeded as i32 || job.state == JobState::Failed as i32 {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} did not end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_versions_are_pinned_and_shards_checked_at_finalize() {
    let mut env = Env::start(30, 3).await;
    let store = env.s3.store().await;
    let r = env
        .submit("s3://src-models/model/", preset("w8a16"), "versions")
        .await
        .expect("submit");
    // Each task's inputs carry the entity tag their object had at planning.
    let leases = env.lease("w0", 1).await;
    let spec: serde_json::Value = serde_json::from_str(&leases[0].spec_json).expect("spec");
    let input = &spec["inputs"][0];
    let key = format!("model/{}", input["file"].as_str().expect("file"));
    let etag = store
        .head("src-models", &key)
        .await
        .expect("head")
        .and_then(|m| m.etag)
        .expect("etag");
    assert_eq!(input["etag"], serde_json::json!(etag), "{spec}");
    env.workers
        .fail_task(FailTaskRequest {
            job_id: r.job_id.clone(),
            task_seq: leases[0].task_seq,
            lease_token: leases[0].lease_token.clone(),
            error: "handing it back".into(),
            retryable: true,
        })
        .await
        .expect("fail");
    // A shard whose entity tag differs from the one its worker reported fails the job at
    // finalize, naming the object; untouched shards pass the same check.
    complete_all_with_uploads(&mut env, &r.job_id, Some(2)).await;
    let job = wait_terminal(&mut env, &r.job_id).await;
    assert_eq!(job.state, JobState::Failed as i32, "{job:?}");
    assert!(
        job.error.contains("changed after its task uploaded it"),
        "{}",
        job.error
    );
    assert!(
        job.error.contains("s3://dst-models/model-w8/"),
        "{}",
        job.error
    );

    let ok = env
        .submit("s3://src-models/model/", preset("w8a16"), "versions-ok")
        .await
        .expect("submit");
    complete_all_with_uploads(&mut env, &ok.job_id, None).await;
    let job = wait_terminal(&mut env, &ok.job_id).await;
    assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
}
