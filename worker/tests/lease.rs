//! The worker against a fake coordinator (an in-process `WorkerService` that records every
//! call) and a real S3 server from the testkit: leased tasks are read from and written to S3,
//! reported with the right key, size and checksum, and stopped when the lease is withdrawn.

// Test helpers outside `#[test]` functions fail loudly on broken setup.
#![allow(clippy::expect_used)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shardpress_engine::pipeline::{
    plan_job, run_task, task_reservation, NoProgress, TaskOutput, TaskSpec,
};
use shardpress_engine::report::TensorReport;
use shardpress_engine::safetensors::TensorSpec;
use shardpress_engine::source::{ByteSource, LocalFile};
use shardpress_engine::{Checkpoint, DType, MemoryPool, Recipe};
use shardpress_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use shardpress_proto::v1::*;
use shardpress_testkit::S3Server;
use shardpress_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// Everything the fake coordinator was asked, and what it answers.
#[derive(Debug, Default)]
struct Calls {
    /// Leases still to hand out.
    pending: VecDeque<TaskLease>,
    /// `max_tasks` of every LeaseTasks call.
    lease_calls: Vec<u32>,
    heartbeats: Vec<HeartbeatRequest>,
    completed: Vec<CompleteTaskRequest>,
    failed: Vec<FailTaskRequest>,
    /// Heartbeat answer.
    withdraw: bool,
}

#[derive(Debug, Clone, Default)]
struct FakeCoordinator(Arc<Mutex<Calls>>);

impl FakeCoordinator {
    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.0.lock().expect("lock")
    }

    /// Polls until `done` holds, panicking with `what` after `limit`.
    async fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&Calls) -> bool) {
        let start = Instant::now();
        loop {
            if done(&self.calls()) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "timed out waiting for {what}: {:#?}",
                summary(&self.calls())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn summary(c: &Calls) -> String {
    format!(
        "pending {}, lease calls {:?}, heartbeats {}, completed {:?}, failed {:?}",
        c.pending.len(),
        c.lease_calls,
        c.heartbeats.len(),
        c.completed
            .iter()
            .map(|r| (&r.output_key, r.output_bytes))
            .collect::<Vec<_>>(),
        c.failed
            .iter()
            .map(|r| (&r.error, r.retryable))
            .collect::<Vec<_>>()
    )
}

#[tonic::async_trait]
impl WorkerService for FakeCoordinator {
    async fn lease_tasks(
        &self,
        request: Request<LeaseTasksRequest>,
    ) -> Result<Response<LeaseTasksResponse>, Status> {
        let r = request.into_inner();
        assert!(!r.worker_id.is_empty());
        let mut c = self.calls();
        c.lease_calls.push(r.max_tasks);
        let n = (r.max_tasks as usize).min(c.pending.len());
        let leases = c.pending.drain(..n).collect();
        Ok(Response::new(LeaseTasksResponse { leases }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let mut c = self.calls();
        c.heartbeats.push(request.into_inner());
        Ok(Response::new(HeartbeatResponse {
            keep_going: !c.withdraw,
            reason: if c.withdraw {
                "job cancelled".into()
            } else {
                String::new()
            },
        }))
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<CompleteTaskResponse>, Status> {
        self.calls().completed.push(request.into_inner());
        Ok(Response::new(CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        request: Request<FailTaskRequest>,
    ) -> Result<Response<FailTaskResponse>, Status> {
        self.calls().failed.push(request.into_inner());
        Ok(Response::new(FailTaskResponse {}))
    }
}

/// Serves the fake on `listener`.
fn serve(fake: FakeCoordinator, listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(fake))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .expect("fake coordinator");
    })
}

/// A running worker and the means to stop it.
struct Worker {
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    fn start(config: WorkerConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(shardpress_worker::run(config, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            handle,
        }
    }

    /// Requests shutdown and waits (bounded) for `run` to return.
    async fn stop(mut self, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(limit, &mut self.handle)
            .await
            .expect("worker stops in time")
            .expect("join")
            .expect("worker returns Ok");
    }
}

fn config(s3: &S3Server, addr: SocketAddr, concurrency: usize) -> WorkerConfig {
    let mut c = WorkerConfig::new(format!("http://{addr}"), s3.settings());
    c.concurrency = concurrency;
    c.poll_interval = Duration::from_millis(50);
    c
}

/// Writes `model.safetensors` with the given f32 tensors and a config.json.
fn write_checkpoint(dir: &Path, specs: Vec<TensorSpec>) {
    shardpress_testkit::write_f32_checkpoint(dir, &specs);
    std::fs::write(dir.join("config.json"), r#"{"model_type":"llama"}"#).expect("config");
}

/// A small llama-like checkpoint: embeddings, `layers` blocks, final norm.
fn tiny_llama(dir: &Path, layers: usize) {
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
            vec![24, 16],
        ));
        specs.push(TensorSpec::new(
            format!("model.layers.{l}.mlp.down_proj.weight"),
            DType::F32,
            vec![16, 24],
        ));
    }
    specs.push(TensorSpec::new("model.norm.weight", DType::F32, vec![8]));
    write_checkpoint(dir, specs);
}

/// One layer with many large weights: a task that takes far longer than a heartbeat round
/// trip (each tensor is a separate ranged read and quantization).
fn slow_layer(dir: &Path) {
    let specs = (0..64)
        .map(|i| {
            TensorSpec::new(
                format!("model.layers.0.mlp.w{i:02}.weight"),
                DType::F32,
                vec![128, 1024],
            )
        })
        .collect();
    write_checkpoint(dir, specs);
}

/// The plan of a local checkpoint under `recipe`.
fn plan(dir: &Path, recipe: &str) -> Vec<TaskSpec> {
    let ckpt = Checkpoint::open_local(dir).expect("checkpoint");
    let recipe = Recipe::load(recipe).expect("recipe");
    plan_job(&ckpt, &recipe).expect("plan").tasks
}

fn lease(seq: u32, spec: &TaskSpec) -> TaskLease {
    TaskLease {
        job_id: "job-1".into(),
        task_seq: seq,
        lease_token: format!("token-{seq}"),
        attempt: 1,
        lease_seconds: 30,
        spec_json: serde_json::to_string(spec).expect("spec json"),
        source_uri: "s3://input/model/".into(),
        destination_uri: "s3://output/model-w8/".into(),
    }
}

/// Runs a task on the local files: the bytes and report a worker must produce.
fn local_output(dir: &Path, spec: &TaskSpec) -> (Vec<u8>, TaskOutput) {
    let sources: Vec<Arc<dyn ByteSource>> = spec
        .inputs
        .iter()
        .map(|i| {
            Arc::new(LocalFile::open(&dir.join(&i.file)).expect("open")) as Arc<dyn ByteSource>
        })
        .collect();
    let mut out = Vec::new();
    let memory = MemoryPool::unlimited()
        .reserve(task_reservation(spec, None, 0, rayon::current_num_threads()).expect("need"))
        .expect("reserve");
    let report = run_task(spec, &sources, &mut out, &NoProgress, &memory).expect("local run");
    (out, report)
}

/// An S3 server with buckets `input` and `output` and the checkpoint in `dir` under
/// `input/model/` (bucket names need at least three characters).
async fn s3_with(dir: &Path) -> S3Server {
    shardpress_testkit::use_test_credentials();
    let s3 = S3Server::start();
    s3.create_bucket("input").await;
    s3.create_bucket("output").await;
    s3.upload_dir("input", "model/", dir).await;
    s3
}

async fn bound() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_tasks_are_uploaded_and_reported_with_size_and_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_llama(dir.path(), 3);
    let tasks = plan(dir.path(), "w8a16");
    assert_eq!(tasks.len(), 5, "embeddings, 3 layers, norm");
    let s3 = s3_with(dir.path()).await;
    let fake = FakeCoordinator::default();
    fake.calls().pending = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| lease(i as u32, t))
        .collect();
    let (listener, addr) = bound().await;
    let _server = serve(fake.clone(), listener);
    let worker = Worker::start(config(&s3, addr, 2));

    fake.wait_for("every task completed", Duration::from_secs(60), |c| {
        c.completed.len() + c.failed.len() == tasks.len()
    })
    .await;
    worker.stop(Duration::from_secs(10)).await;

    let store = s3.store().await;
    let calls = std::mem::take(&mut *fake.calls());
    assert!(calls.failed.is_empty(), "{}", summary(&calls));
    assert_eq!(
        calls.lease_calls[0], 2,
        "asks for as many tasks as free slots"
    );
    assert!(calls.lease_calls.iter().all(|&n| (1..=2).contains(&n)));
    for (seq, spec) in tasks.iter().enumerate() {
        let done = calls
            .completed
            .iter()
            .find(|r| r.task_seq == seq as u32)
            .expect("completed");
        assert_eq!(done.job_id, "job-1");
        assert_eq!(done.lease_token, format!("token-{seq}"));
        assert_eq!(done.output_key, format!("model-w8/{}", spec.file_name));
        let object = store
            .get_small("output", &done.output_key, u64::MAX)
            .await
            .expect("output object");
        assert_eq!(object.len() as u64, done.output_bytes);
        assert_eq!(done.sha256, hex::encode(Sha256::digest(&object)));
        let etag = store
            .head("output", &done.output_key)
            .await
            .expect("head")
            .and_then(|m| m.etag)
            .expect("etag");
        assert_eq!(
            done.output_etag, etag,
            "the reported entity tag is the object's"
        );
        let (expected, report) = local_output(dir.path(), spec);
        assert!(
            object == expected,
            "{} differs from a local run",
            spec.file_name
        );
        let rows: Vec<TensorReport> = serde_json::from_str(&done.tensors_json).expect("rows");
        assert_eq!(rows, report.tensors);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_lease_stops_the_task_without_reporting() {
    let dir = tempfile::tempdir().expect("tempdir");
    slow_layer(dir.path());
    let tasks = plan(dir.path(), "w8a16");
    assert_eq!(tasks.len(), 1);
    let s3 = s3_with(dir.path()).await;
    let fake = FakeCoordinator::default();
    {
        let mut c = fake.calls();
        c.pending.push_back(lease(0, &tasks[0]));
        c.withdraw = true;
    }
    let (listener, addr) = bound().await;
    let _server = serve(fake.clone(), listener);
    let worker = Worker::start(config(&s3, addr, 1));

    // With one slot, the next lease request means the task has ended and freed it.
    fake.wait_for("the slot to come free", Duration::from_secs(60), |c| {
        c.lease_calls.len() >= 2
    })
    .await;
    worker.stop(Duration::from_secs(10)).await;

    let calls = std::mem::take(&mut *fake.calls());
    assert!(!calls.heartbeats.is_empty(), "{}", summary(&calls));
    let hb = &calls.heartbeats[0];
    assert_eq!((hb.job_id.as_str(), hb.task_seq), ("job-1", 0));
    assert_eq!(hb.lease_token, "token-0");
    assert!(calls.completed.is_empty(), "{}", summary(&calls));
    assert!(calls.failed.is_empty(), "{}", summary(&calls));
    let key = format!("model-w8/{}", tasks[0].file_name);
    let store = s3.store().await;
    assert!(
        store.head("output", &key).await.expect("head").is_none(),
        "an abandoned upload must not leave an object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_and_missing_inputs_fail_the_task_for_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_llama(dir.path(), 1);
    let tasks = plan(dir.path(), "w8a16");
    let s3 = s3_with(dir.path()).await;
    let fake = FakeCoordinator::default();
    let mut missing = tasks[1].clone();
    missing.inputs[0].file = "gone.safetensors".into();
    {
        let mut c = fake.calls();
        let mut garbage = lease(0, &tasks[0]);
        garbage.spec_json = "{\"key\": 3".into();
        c.pending.push_back(garbage);
        c.pending.push_back(lease(1, &missing));
    }
    let (listener, addr) = bound().await;
    let _server = serve(fake.clone(), listener);
    let worker = Worker::start(config(&s3, addr, 2));
    fake.wait_for("both failures", Duration::from_secs(60), |c| {
        c.failed.len() == 2
    })
    .await;
    worker.stop(Duration::from_secs(10)).await;

    let calls = std::mem::take(&mut *fake.calls());
    assert!(calls.completed.is_empty(), "{}", summary(&calls));
    let by_seq = |seq| {
        calls
            .failed
            .iter()
            .find(|f| f.task_seq == seq)
            .expect("failure")
    };
    let spec = by_seq(0);
    assert!(!spec.retryable);
    assert!(spec.error.contains("task spec"), "{}", spec.error);
    let read = by_seq(1);
    assert!(
        !read.retryable,
        "a missing object stays missing: {}",
        read.error
    );
    assert!(
        read.error.contains("s3://input/model/gone.safetensors"),
        "{}",
        read.error
    );
    assert!(read.error.contains("model.layers.0."), "{}", read.error);
    assert!(read.error.contains("bytes "), "{}", read.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_replaced_after_planning_fails_the_task_instead_of_mixing_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_llama(dir.path(), 1);
    let mut tasks = plan(dir.path(), "w8a16");
    let s3 = s3_with(dir.path()).await;
    let store = s3.store().await;
    // Pin the task to the version planned, as the coordinator does.
    let file = tasks[1].inputs[0].file.clone();
    let key = format!("model/{file}");
    let planned = store
        .head("input", &key)
        .await
        .expect("head")
        .expect("object")
        .etag
        .expect("s3s-fs gives entity tags");
    tasks[1].inputs[0].etag = Some(planned.clone());
    // Then the object is replaced by one of the same size with other bytes.
    let mut bytes = std::fs::read(dir.path().join(&file)).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    store
        .put("input", &key, bytes.into())
        .await
        .expect("replace input");
    let fake = FakeCoordinator::default();
    fake.calls().pending.push_back(lease(1, &tasks[1]));
    let (listener, addr) = bound().await;
    let _server = serve(fake.clone(), listener);
    let worker = Worker::start(config(&s3, addr, 1));
    fake.wait_for("the failure", Duration::from_secs(60), |c| {
        c.failed.len() == 1
    })
    .await;
    worker.stop(Duration::from_secs(10)).await;
    let calls = std::mem::take(&mut *fake.calls());
    assert!(calls.completed.is_empty(), "{}", summary(&calls));
    let f = &calls.failed[0];
    assert!(!f.retryable, "a replaced input stays replaced: {}", f.error);
    assert!(
        f.error.contains("changed after the job was planned"),
        "{}",
        f.error
    );
    assert!(
        f.error.contains(&format!("s3://input/{key}")),
        "{}",
        f.error
    );
    assert!(f.error.contains(&planned), "{}", f.error);
    // Nothing was written for the task.
    assert!(store
        .head("output", &format!("model-w8/{}", tasks[1].file_name))
        .await
        .expect("head")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_waits_out_a_coordinator_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_llama(dir.path(), 1);
    let tasks = plan(dir.path(), "bf16");
    let s3 = s3_with(dir.path()).await;
    // Reserve a port, then leave it closed while the worker starts.
    let (listener, addr) = bound().await;
    drop(listener);
    let worker = Worker::start(config(&s3, addr, 1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !worker.handle.is_finished(),
        "an outage must not stop the worker"
    );

    let fake = FakeCoordinator::default();
    fake.calls().pending.push_back(lease(0, &tasks[0]));
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let _server = serve(fake.clone(), listener);
    fake.wait_for(
        "the task after reconnecting",
        Duration::from_secs(60),
        |c| c.completed.len() == 1,
    )
    .await;
    worker.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_abandons_running_tasks_after_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    slow_layer(dir.path());
    let tasks = plan(dir.path(), "w8a16");
    let s3 = s3_with(dir.path()).await;
    let fake = FakeCoordinator::default();
    fake.calls().pending.push_back(lease(0, &tasks[0]));
    let (listener, addr) = bound().await;
    let _server = serve(fake.clone(), listener);
    let mut config = config(&s3, addr, 1);
    config.shutdown_grace = Duration::ZERO;
    let worker = Worker::start(config);
    // The first heartbeat goes out as the task starts.
    fake.wait_for("the task to start", Duration::from_secs(60), |c| {
        !c.heartbeats.is_empty()
    })
    .await;
    let leases_before = fake.calls().lease_calls.len();
    worker.stop(Duration::from_secs(10)).await;

    let calls = std::mem::take(&mut *fake.calls());
    assert!(calls.completed.is_empty(), "{}", summary(&calls));
    assert!(calls.failed.is_empty(), "{}", summary(&calls));
    assert_eq!(
        calls.lease_calls.len(),
        leases_before,
        "no leasing after shutdown"
    );
}
