//! The corpus of broken checkpoints and recipes, and the valid edge cases, through the
//! service: a coordinator and a worker (in this process) on real Postgres and a real S3
//! server. Every broken input fails its submit or its job with an error naming the object and
//! the place; nothing is marked succeeded or indexed; the worker keeps running; the inputs are
//! unchanged. Valid edge cases compress to exactly what `shardpress compress` writes.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use shardpress_coordinator::CoordinatorConfig;
use shardpress_proto::v1::job_service_client::JobServiceClient;
use shardpress_proto::v1::{recipe, GetJobRequest, Job, JobState, Recipe, SubmitJobRequest};
use shardpress_storage::{ObjectStore, S3Uri};
use shardpress_testkit::hostile::{
    malformed_checkpoints, malformed_recipes, small_model, st_file, valid_edge_cases, Case,
};
use shardpress_testkit::{PgCluster, S3Server};
use shardpress_worker::WorkerConfig;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_shardpress");
const IN: &str = "hostile-in";
const OUT: &str = "hostile-out";

struct Service {
    _pg: PgCluster,
    _s3: S3Server,
    store: ObjectStore,
    jobs: JobServiceClient<Channel>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    coordinator: tokio::task::JoinHandle<anyhow::Result<()>>,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Service {
    async fn start() -> Service {
        shardpress_testkit::use_test_credentials();
        let pg = PgCluster::start();
        let url = pg.create_database("hostile");
        let s3 = S3Server::start();
        s3.create_bucket(IN).await;
        s3.create_bucket(OUT).await;
        let store = s3.store().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config =
            CoordinatorConfig::new("127.0.0.1:0".parse().expect("addr"), url, s3.settings());
        config.lease_seconds = 30;
        config.max_attempts = 2;
        let (stop_c, rx_c) = tokio::sync::oneshot::channel::<()>();
        let coordinator = tokio::spawn(shardpress_coordinator::serve(
            listener,
            config,
            async move {
                let _ = rx_c.await;
            },
        ));
        let url = format!("http://{addr}");
        let mut worker_config = WorkerConfig::new(url.clone(), s3.settings());
        worker_config.poll_interval = Duration::from_millis(100);
        worker_config.worker_id = "hostile-worker".into();
        let (stop_w, rx_w) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(shardpress_worker::run(worker_config, async move {
            let _ = rx_w.await;
        }));
        let channel = loop {
            match Channel::from_shared(url.clone())
                .expect("uri")
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        Service {
            _pg: pg,
            _s3: s3,
            store,
            jobs: JobServiceClient::new(channel),
            stop: vec![stop_c, stop_w],
            coordinator,
            worker,
        }
    }

    async fn upload(&self, prefix: &str, files: &[(String, Vec<u8>)]) {
        for (name, bytes) in files {
            self.store
                .put(IN, &format!("{prefix}{name}"), bytes.clone().into())
                .await
                .expect("upload");
        }
    }

    async fn objects(&self, bucket: &str, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        let uri = S3Uri::parse(&format!("s3://{bucket}/{prefix}")).expect("uri");
        let mut out = BTreeMap::new();
        for m in self.store.list(&uri).await.expect("list") {
            let bytes = self
                .store
                .get_small(bucket, &uri.key(&m.rel), u64::MAX)
                .await
                .expect("get");
            out.insert(m.rel, bytes.to_vec());
        }
        out
    }

    /// Submits; `Err` is the refusal message.
    async fn submit(&mut self, name: &str, recipe: &str, text: bool) -> Result<String, String> {
        let source = if text {
            recipe::Source::Toml(recipe.into())
        } else {
            recipe::Source::Preset(recipe.into())
        };
        // The API waits for the database to be migrated: retry while it is unavailable.
        for _ in 0..200 {
            let r = self
                .jobs
                .submit_job(SubmitJobRequest {
                    source_uri: format!("s3://{IN}/{name}/"),
                    destination_uri: format!("s3://{OUT}/{name}/"),
                    recipe: Some(Recipe {
                        source: Some(source.clone()),
                    }),
                    idempotency_key: String::new(),
                    labels: Default::default(),
                })
                .await;
            match r {
                Ok(r) => return Ok(r.into_inner().job_id),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(s.message().to_string()),
            }
        }
        panic!("the coordinator never accepted {name}");
    }

    async fn wait(&mut self, id: &str, deadline: Instant) -> Job {
        loop {
            let job = self
                .jobs
                .get_job(GetJobRequest { job_id: id.into() })
                .await
                .expect("get job")
                .into_inner();
            let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
            if matches!(
                state,
                JobState::Succeeded | JobState::Failed | JobState::Cancelled
            ) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} did not end: {job:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        assert!(
            !self.worker.is_finished(),
            "the worker stopped while handling broken inputs"
        );
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
        self.worker
            .await
            .expect("worker task did not panic")
            .expect("worker ended cleanly");
        self.coordinator
            .await
            .expect("coordinator task did not panic")
            .expect("coordinator ended cleanly");
    }
}

/// `shardpress compress` of `files` with `recipe`: the output files.
fn local_output(case: &Case) -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    for (name, bytes) in &case.files {
        let p = model.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, bytes).expect("write");
    }
    let recipe = if case.recipe_is_text() {
        let p = dir.path().join("recipe.toml");
        std::fs::write(&p, &case.recipe).expect("recipe");
        p.to_string_lossy().into_owned()
    } else {
        case.recipe.clone()
    };
    let out = dir.path().join("out");
    let run = Command::new(BIN)
        .args(["compress", &model.to_string_lossy(), "--recipe", &recipe])
        .args(["--out", &out.to_string_lossy(), "--quiet"])
        .output()
        .expect("run compress");
    assert!(
        run.status.success(),
        "local compress of {}: {}",
        case.name,
        String::from_utf8_lossy(&run.stderr)
    );
    read_dir(&out)
}

fn read_dir(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(root).expect("read_dir") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        out.insert(name, std::fs::read(&p).expect("read"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_through_the_service() {
    let mut svc = Service::start().await;
    let deadline = Instant::now() + Duration::from_secs(300);

    // Broken checkpoints: the job (or the submit) fails naming object and place.
    let mut submitted = Vec::new();
    for case in malformed_checkpoints() {
        let prefix = format!("{}/", case.name);
        svc.upload(&prefix, &case.files).await;
        let result = svc
            .submit(case.name, &case.recipe, case.recipe_is_text())
            .await;
        submitted.push((case, result));
    }
    // Broken recipes on a good checkpoint.
    let good = vec![("model.safetensors".to_string(), st_file(&small_model()))];
    let mut recipes = Vec::new();
    for (i, (text, want)) in malformed_recipes().into_iter().enumerate() {
        let name = format!("recipe-{i}");
        svc.upload(&format!("{name}/"), &good).await;
        let result = svc.submit(&name, text, true).await;
        recipes.push((name, want, result));
    }
    // Valid edge cases.
    let mut valid = Vec::new();
    for case in valid_edge_cases() {
        svc.upload(&format!("{}/", case.name), &case.files).await;
        let id = svc
            .submit(case.name, &case.recipe, case.recipe_is_text())
            .await
            .unwrap_or_else(|e| panic!("{} was refused: {e}", case.name));
        valid.push((case, id));
    }

    for (case, result) in &submitted {
        let message = match result {
            Err(refused) => refused.clone(),
            Ok(id) => {
                let job = svc.wait(id, deadline).await;
                assert_eq!(job.state, JobState::Failed as i32, "{}: {job:?}", case.name);
                job.error
            }
        };
        for n in &case.needles {
            assert!(
                message.contains(n.as_str()),
                "{}: the error should mention {n:?}: {message}",
                case.name
            );
        }
        assert!(
            message.contains(&format!("s3://{IN}/{}/", case.name)),
            "{}: the error should name the object: {message}",
            case.name
        );
        assert!(!message.contains("panicked"), "{}: {message}", case.name);
        // Nothing indexed as a finished checkpoint; inputs as uploaded.
        let out = svc.objects(OUT, &format!("{}/", case.name)).await;
        assert!(
            !out.contains_key("model.safetensors.index.json"),
            "{}: an index was written for a failed job",
            case.name
        );
        let inputs = svc.objects(IN, &format!("{}/", case.name)).await;
        let uploaded: BTreeMap<String, Vec<u8>> = case.files.iter().cloned().collect();
        assert_eq!(inputs, uploaded, "{}: inputs changed", case.name);
    }
    for (name, want, result) in &recipes {
        let message = match result {
            Err(refused) => refused.clone(),
            Ok(id) => {
                let job = svc.wait(id, deadline).await;
                assert_eq!(job.state, JobState::Failed as i32, "{name}: {job:?}");
                job.error
            }
        };
        assert!(message.contains(want), "{name}: want {want:?} in {message}");
    }
    for (case, id) in &valid {
        let job = svc.wait(id, deadline).await;
        assert_eq!(
            job.state,
            JobState::Succeeded as i32,
            "{}: {job:?}",
            case.name
        );
        let mut service = svc.objects(OUT, &format!("{}/", case.name)).await;
        let mut local = local_output(case);
        // The reports differ in timings and locations; everything else is byte for byte.
        for report in ["report.json", "report.md", "report.html"] {
            service.remove(report);
            local.remove(report);
        }
        assert_eq!(
            service.keys().collect::<Vec<_>>(),
            local.keys().collect::<Vec<_>>(),
            "{}",
            case.name
        );
        for (name, bytes) in &local {
            assert!(
                service.get(name) == Some(bytes),
                "{}: {name} differs from the local run",
                case.name
            );
        }
    }
    // The worker is still running and stops cleanly when told to.
    svc.stop().await;
}
