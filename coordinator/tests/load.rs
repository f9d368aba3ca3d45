//! Lease load test: 16 concurrent lease loops, each with its own gRPC connection, drain a
//! 5,000-task job from an in-process coordinator on real Postgres and the real S3 server.
//!
//! Each loop behaves like a worker with 1, 2 or 4 task slots: it asks for as many tasks as it
//! has free slots, heartbeats every lease from the start (a third of the lease, as workers
//! do), runs the engine on the task's tiny tensor, uploads the shard and completes the task.
//! A fixed subset of tasks, chosen by task number and attempt, is abandoned without heartbeat
//! (the lease lapses and the coordinator requeues it) or failed retryably, some twice, and a
//! few are held past the lease length on heartbeats alone; all of them sit in the first half
//! of the queue so their retries compete with the bulk of the leasing.
//!
//! Every grant is recorded with its token, attempt and the window in which it was certainly
//! live, and the test asserts that no task was held by two live leases at once, that every
//! task was completed exactly once (stale tokens are refused, in flight and at the end), that
//! none was lost (the job finalizes and its index names every layer), and that the database's
//! attempts, results and events match what the loops saw.
//!
//! Run it (it prints leases and completions per second; the figures are not asserted):
//!
//! ```sh
//! eval "$(bash scripts/services.sh 2>/dev/null | sed 's/^/export /')"
//! cargo test -p shardpress-coordinator --test load -- --nocapture
//! ```
//!
//! Debug build, 2 cores shared with other builds (load average near 10), two runs:
//!
//! ```text
//! load: 5140 leases in 26.0s: 198 leases/s; 5000 completions in 26.4s: 190 completions/s
//! load: 5140 leases in 28.5s: 180 leases/s; 5000 completions in 28.6s: 175 completions/s
//! ```
//!
//! The whole test took 40 to 95 s; up to half of it can be deleting the S3 server's 15,000
//! files when it stops.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardpress_coordinator::{serve, CoordinatorConfig};
use shardpress_engine::memory::MemoryPool;
use shardpress_engine::pipeline::{run_task, task_reservation, NoProgress, TaskOutput, TaskSpec};
use shardpress_engine::plan::shard_file_name;
use shardpress_engine::safetensors::TensorSpec;
use shardpress_engine::source::{ByteSource, MemSource};
use shardpress_engine::DType;
use shardpress_proto::v1::job_service_client::JobServiceClient;
use shardpress_proto::v1::worker_service_client::WorkerServiceClient;
use shardpress_proto::v1::*;
use shardpress_storage::{ObjectStore, S3Uri};
use shardpress_testkit::{PgCluster, S3Server};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Code;

/// Tasks in the job: one per transformer layer.
const TASKS: u32 = 5_000;
/// Concurrent lease loops, each with its own connection.
const LOOPS: usize = 16;
/// Task slots of loop `i` are `SLOTS[i % 3]`, so loops ask for 1, 2 or 4 tasks at a time.
const SLOTS: [usize; 3] = [1, 2, 4];
/// Short enough that lapsed leases come back within seconds, long enough that a loaded
/// machine does not miss three heartbeats in a row.
const LEASE_SECONDS: u32 = 4;
const MAX_ATTEMPTS: u32 = 5;
/// Pause after an empty lease answer.
const EMPTY_POLL: Duration = Duration::from_millis(50);
/// Guards against a hang when tasks are lost; not a performance bound.
const HANG_GUARD: Duration = Duration::from_secs(300);

const SOURCE: &str = "s3://src-models/layers/";
const DESTINATION: &str = "s3://dst-models/layers-w8/";

/// What a loop does with one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Heartbeat, run the task, upload, complete.
    Complete,
    /// Like `Complete`, but hold the lease for 1.5 lease lengths on heartbeats first.
    Hold,
    /// Drop the lease without a heartbeat: it lapses and is requeued.
    Abandon,
    /// Report a retryable failure at once.
    Fail,
}

/// The fixed behaviour for attempt `attempt` of task `seq`. Only the first half of the queue
/// is disturbed, so requeued tasks are leased again while the bulk is still being leased.
fn plan(seq: u32, attempt: u32) -> Plan {
    if seq >= TASKS / 2 {
        return Plan::Complete;
    }
    match attempt {
        1 if seq % 40 == 3 => Plan::Abandon,
        2 if seq % 400 == 3 => Plan::Abandon,
        1 if seq % 40 == 17 => Plan::Fail,
        2 if seq % 400 == 17 => Plan::Abandon,
        1 if seq % 250 == 100 => Plan::Hold,
        _ => Plan::Complete,
    }
}

/// Grants, abandons and failures the plan leads to.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    grants: usize,
    abandoned: usize,
    failed: usize,
    held: usize,
}

fn expected() -> Expected {
    let mut e = Expected::default();
    for seq in 0..TASKS {
        for attempt in 1..=MAX_ATTEMPTS {
            e.grants += 1;
            match plan(seq, attempt) {
                Plan::Abandon => e.abandoned += 1,
                Plan::Fail => e.failed += 1,
                Plan::Hold => {
                    e.held += 1;
                    break;
                }
                Plan::Complete => break,
            }
        }
    }
    e
}

/// How a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    Completed {
        key: String,
        sha256: String,
    },
    Failed,
    Abandoned,
    /// The coordinator refused the completion as stale.
    Refused(String),
}

/// One lease grant as a loop saw it.
#[derive(Debug, Clone)]
struct Grant {
    seq: u32,
    attempt: u32,
    token: String,
    worker: String,
    /// When the lease request went out: the grant happened after this.
    asked: Instant,
    /// When the answer arrived: the grant happened before this.
    granted: Instant,
    /// Until when the lease was certainly live: the sending of the call that ended it, or the
    /// lease length after the last renewal that was sent (a lease request or a heartbeat the
    /// coordinator acknowledged), whichever is earlier. The coordinator stamps a renewal after
    /// its request is sent, and expires a lease only once `now()` is past the stamp plus the
    /// lease length.
    live_until: Instant,
    end: End,
    heartbeats: usize,
}

/// What the lease loops share.
struct Shared {
    objects: ObjectStore,
    input: Arc<dyn ByteSource>,
    memory: MemoryPool,
    /// Successful completions so far; the loops stop at `TASKS`.
    completed: AtomicUsize,
    /// Lease token of every (task, attempt) granted so far.
    tokens: Mutex<HashMap<(u32, u32), String>>,
    /// Stale tokens a later lease probed while it held the task.
    fenced_in_flight: AtomicUsize,
    heartbeats: AtomicUsize,
}

/// What one loop did.
#[derive(Debug, Default)]
struct LoopReport {
    grants: Vec<Grant>,
    calls: usize,
    empty: usize,
}

fn lease_length() -> Duration {
    Duration::from_secs(u64::from(LEASE_SECONDS))
}

/// A checkpoint with `layers` blocks of one small matrix each: planning makes one task per
/// block, and each task quantizes 64 bytes.
fn checkpoint_bytes(layers: u32) -> Vec<u8> {
    let specs: Vec<TensorSpec> = (0..layers)
        .map(|l| TensorSpec::new(layer_weight(l), DType::F32, vec![2, 8]))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    shardpress_testkit::write_f32_checkpoint(dir.path(), &specs);
    std::fs::read(dir.path().join("model.safetensors")).expect("read checkpoint")
}

fn layer_weight(layer: u32) -> String {
    format!("model.layers.{layer}.mlp.down_proj.weight")
}

async fn connect(endpoint: &str) -> Channel {
    for _ in 0..200 {
        if let Ok(c) = Channel::from_shared(endpoint.to_string())
            .expect("uri")
            .connect()
            .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {endpoint}");
}

/// Leases like a worker with `slots` task slots until every task is completed.
async fn lease_loop(id: usize, endpoint: String, shared: Arc<Shared>) -> LoopReport {
    let mut client = WorkerServiceClient::new(connect(&endpoint).await);
    let worker = format!("load-{id}");
    let slots = Arc::new(Semaphore::new(SLOTS[id % SLOTS.len()]));
    let mut running: JoinSet<Grant> = JoinSet::new();
    let mut report = LoopReport::default();
    while shared.completed.load(Ordering::SeqCst) < TASKS as usize {
        while let Some(done) = running.try_join_next() {
            report.grants.push(done.expect("lease task"));
        }
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("slots stay open"),
            // Wake up now and then to notice that the job is done.
            () = tokio::time::sleep(EMPTY_POLL) => continue,
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let asked = Instant::now();
        let leases = client
            .lease_tasks(LeaseTasksRequest {
                worker_id: worker.clone(),
                max_tasks: u32::try_from(permits.len()).expect("few slots"),
            })
            .await
            .expect("lease tasks")
            .into_inner()
            .leases;
        let granted = Instant::now();
        report.calls += 1;
        assert!(
            leases.len() <= permits.len(),
            "{worker} asked for {} tasks and got {}",
            permits.len(),
            leases.len()
        );
        if leases.is_empty() {
            report.empty += 1;
            drop(permits);
            tokio::time::sleep(EMPTY_POLL).await;
            continue;
        }
        for (lease, permit) in leases.into_iter().zip(permits) {
            // Registered before anything else happens to the lease, so a later attempt of the
            // same task finds this token.
            let previous = {
                let mut tokens = shared.tokens.lock().expect("tokens");
                let clash =
                    tokens.insert((lease.task_seq, lease.attempt), lease.lease_token.clone());
                assert!(
                    clash.is_none(),
                    "task {} attempt {} was granted twice",
                    lease.task_seq,
                    lease.attempt
                );
                match lease.attempt {
                    1 => None,
                    a => Some(
                        tokens
                            .get(&(lease.task_seq, a - 1))
                            .cloned()
                            .unwrap_or_else(|| {
                                panic!(
                                    "task {} attempt {a} was granted before attempt {} was seen",
                                    lease.task_seq,
                                    a - 1
                                )
                            }),
                    ),
                }
            };
            let started = Started {
                worker: worker.clone(),
                asked,
                granted,
                previous,
            };
            running.spawn(run_lease(
                client.clone(),
                shared.clone(),
                lease,
                started,
                permit,
            ));
        }
    }
    while let Some(done) = running.join_next().await {
        report.grants.push(done.expect("lease task"));
    }
    report
}

struct Started {
    worker: String,
    asked: Instant,
    granted: Instant,
    /// Token of the task's previous attempt.
    previous: Option<String>,
}

/// Handles one lease according to its plan and returns what happened.
async fn run_lease(
    mut client: WorkerServiceClient<Channel>,
    shared: Arc<Shared>,
    lease: TaskLease,
    started: Started,
    _slot: OwnedSemaphorePermit,
) -> Grant {
    let seq = lease.task_seq;
    if let Some(old) = &started.previous {
        // This loop holds the task now: the previous attempt's token must be refused.
        expect_fenced(&mut client, &lease.job_id, seq, old).await;
        shared.fenced_in_flight.fetch_add(1, Ordering::SeqCst);
    }
    let mut grant = Grant {
        seq,
        attempt: lease.attempt,
        token: lease.lease_token.clone(),
        worker: started.worker,
        asked: started.asked,
        granted: started.granted,
        live_until: started.asked + lease_length(),
        end: End::Abandoned,
        heartbeats: 0,
    };
    let plan = plan(seq, lease.attempt);
    match plan {
        Plan::Abandon => return grant,
        Plan::Fail => {
            let sent = Instant::now();
            client
                .fail_task(FailTaskRequest {
                    job_id: lease.job_id.clone(),
                    task_seq: seq,
                    lease_token: lease.lease_token.clone(),
                    error: format!("simulated connection reset on attempt {}", lease.attempt),
                    retryable: true,
                })
                .await
                .expect("fail task");
            grant.live_until = grant.live_until.min(sent);
            grant.end = End::Failed;
            return grant;
        }
        Plan::Complete | Plan::Hold => {}
    }
    let beat = Arc::new(Beat {
        renewed: Mutex::new(started.asked),
        count: AtomicUsize::new(0),
        revoked: AtomicBool::new(false),
    });
    let heartbeat = tokio::spawn(heartbeat_loop(
        client.clone(),
        lease.clone(),
        beat.clone(),
        shared.clone(),
    ));
    if plan == Plan::Hold {
        tokio::time::sleep(lease_length() * 3 / 2).await;
    }
    let done = produce(&shared, &lease).await;
    heartbeat.abort();
    let _ = heartbeat.await;
    let renewed = *beat.renewed.lock().expect("renewed");
    grant.heartbeats = beat.count.load(Ordering::SeqCst);
    let sent = Instant::now();
    let result = client
        .complete_task(CompleteTaskRequest {
            job_id: lease.job_id.clone(),
            task_seq: seq,
            lease_token: lease.lease_token.clone(),
            output_key: done.key.clone(),
            output_bytes: done.bytes,
            sha256: done.sha256.clone(),
            tensors_json: serde_json::to_string(&done.output.tensors).expect("tensors json"),
            layer_json: String::new(),
            memory: Some(done.memory),
            output_etag: String::new(),
        })
        .await;
    grant.live_until = sent.min(renewed + lease_length());
    grant.end = match result {
        Ok(_) => {
            shared.completed.fetch_add(1, Ordering::SeqCst);
            End::Completed {
                key: done.key,
                sha256: done.sha256,
            }
        }
        Err(status) if status.code() == Code::FailedPrecondition => {
            End::Refused(status.message().to_string())
        }
        Err(status) => panic!("completing task {seq}: {status}"),
    };
    if beat.revoked.load(Ordering::SeqCst) && matches!(grant.end, End::Completed { .. }) {
        panic!("task {seq}: a heartbeat was refused but the completion was accepted");
    }
    grant
}

/// A heartbeat loop's findings.
struct Beat {
    /// When the last acknowledged renewal was sent.
    renewed: Mutex<Instant>,
    count: AtomicUsize,
    revoked: AtomicBool,
}

/// Renews the lease at once and then every third of the lease, as workers do.
async fn heartbeat_loop(
    mut client: WorkerServiceClient<Channel>,
    lease: TaskLease,
    beat: Arc<Beat>,
    shared: Arc<Shared>,
) {
    let mut ticks = tokio::time::interval(lease_length() / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let sent = Instant::now();
        let response = client
            .heartbeat(HeartbeatRequest {
                job_id: lease.job_id.clone(),
                task_seq: lease.task_seq,
                lease_token: lease.lease_token.clone(),
                bytes_done: 0,
            })
            .await;
        beat.count.fetch_add(1, Ordering::SeqCst);
        shared.heartbeats.fetch_add(1, Ordering::SeqCst);
        match response {
            Ok(r) if r.get_ref().keep_going => {
                *beat.renewed.lock().expect("renewed") = sent;
            }
            Ok(_) | Err(_) => {
                beat.revoked.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// An uploaded output shard.
struct Done {
    key: String,
    bytes: u64,
    sha256: String,
    output: TaskOutput,
    memory: TaskMemory,
}

/// Runs the engine on the task and uploads its shard the way a worker does.
async fn produce(shared: &Arc<Shared>, lease: &TaskLease) -> Done {
    let spec: TaskSpec = serde_json::from_str(&lease.spec_json).expect("task spec");
    let destination = S3Uri::parse(&lease.destination_uri).expect("destination uri");
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let need = task_reservation(&spec, None, 0, engine_threads()).expect("reservation size");
        let reservation = shared.memory.reserve(need).expect("reserve");
        let key = destination.key(&spec.file_name);
        let mut writer = shared.objects.multipart_writer(&destination.bucket, &key);
        let output = run_task(
            &spec,
            std::slice::from_ref(&shared.input),
            &mut writer,
            &NoProgress,
            &reservation,
        )
        .expect("run task");
        let (bytes, sha256) = writer.finish().expect("upload shard");
        assert_eq!(bytes, output.file_bytes, "uploaded bytes of {key}");
        let used = reservation.stats();
        Done {
            key,
            bytes,
            sha256,
            output,
            memory: TaskMemory {
                reserved_bytes: used.reserved,
                peak_bytes: used.peak,
                wait_ms: used.wait_ms,
                buffers: used.buffers,
                reused: used.reused,
                limit_bytes: 0,
            },
        }
    })
    .await
    .expect("produce shard")
}

/// Threads of the engine's kernels: rayon's default, which the reservation must cover.
fn engine_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
}

/// The coordinator refuses `token` for task `seq`: heartbeats say stop, completions fail.
async fn expect_fenced(
    client: &mut WorkerServiceClient<Channel>,
    job: &str,
    seq: u32,
    token: &str,
) {
    let hb = client
        .heartbeat(HeartbeatRequest {
            job_id: job.into(),
            task_seq: seq,
            lease_token: token.into(),
            bytes_done: 0,
        })
        .await
        .expect("heartbeat")
        .into_inner();
    assert!(!hb.keep_going, "task {seq}: a superseded lease was renewed");
    let err = client
        .complete_task(CompleteTaskRequest {
            job_id: job.into(),
            task_seq: seq,
            lease_token: token.into(),
            output_key: "stale".into(),
            output_bytes: 1,
            sha256: "0".repeat(64),
            tensors_json: "[]".into(),
            layer_json: String::new(),
            memory: None,
            output_etag: String::new(),
        })
        .await
        .expect_err("a superseded lease must not complete");
    assert_eq!(err.code(), Code::FailedPrecondition, "task {seq}: {err:?}");
    assert!(err.message().contains("stale lease"), "{}", err.message());
}

/// A task's row after the run.
#[derive(Debug, sqlx::FromRow)]
struct TaskRow {
    seq: i32,
    state: String,
    attempts: i32,
    output_key: Option<String>,
    output_sha256: Option<String>,
    lease_token: Option<uuid::Uuid>,
}

async fn unfinished(db: &sqlx::PgPool) -> Vec<(i32, String, i32)> {
    sqlx::query_as("SELECT seq, state, attempts FROM tasks WHERE state <> 'succeeded' ORDER BY seq")
        .fetch_all(db)
        .await
        .expect("unfinished tasks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_tasks_sixteen_lease_loops_no_double_lease_none_lost() {
    shardpress_testkit::use_test_credentials();
    let setup = Instant::now();
    let pg = PgCluster::start();
    let url = pg.create_database("load");
    let s3 = S3Server::start();
    s3.create_bucket("src-models").await;
    s3.create_bucket("dst-models").await;
    let objects = s3.store().await;
    let model = checkpoint_bytes(TASKS);
    objects
        .put(
            "src-models",
            "layers/model.safetensors",
            bytes::Bytes::from(model.clone()),
        )
        .await
        .expect("upload checkpoint");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        {
            let mut c = CoordinatorConfig::new(addr, url.clone(), s3.settings());
            c.lease_seconds = LEASE_SECONDS;
            c.max_attempts = MAX_ATTEMPTS;
            c
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let endpoint = format!("http://{addr}");
    let mut jobs = JobServiceClient::new(connect(&endpoint).await);
    // Migrations run before serving; wait until the API answers.
    for _ in 0..400 {
        if jobs.list_jobs(ListJobsRequest::default()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = sqlx::PgPool::connect(&url).await.expect("db");

    let submitted = Instant::now();
    let job_id = jobs
        .submit_job(SubmitJobRequest {
            source_uri: SOURCE.into(),
            destination_uri: DESTINATION.into(),
            recipe: Some(Recipe {
                source: Some(recipe::Source::Preset("w8a16".into())),
            }),
            idempotency_key: "load".into(),
            labels: Default::default(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
    let planned = submitted.elapsed();
    let job = jobs
        .get_job(GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .expect("job")
        .into_inner();
    assert_eq!(job.state, JobState::Queued as i32, "{}", job.error);
    assert_eq!(job.tasks_total, TASKS);

    let shared = Arc::new(Shared {
        objects,
        input: Arc::new(MemSource::new("model.safetensors", model)),
        memory: MemoryPool::unlimited(),
        completed: AtomicUsize::new(0),
        tokens: Mutex::new(HashMap::new()),
        fenced_in_flight: AtomicUsize::new(0),
        heartbeats: AtomicUsize::new(0),
    });
    let started = Instant::now();
    let mut loops = JoinSet::new();
    for id in 0..LOOPS {
        loops.spawn(lease_loop(id, endpoint.clone(), shared.clone()));
    }
    let mut reports = Vec::with_capacity(LOOPS);
    let drained = tokio::time::timeout(HANG_GUARD, async {
        while let Some(r) = loops.join_next().await {
            reports.push(r.expect("lease loop"));
        }
    })
    .await;
    if drained.is_err() {
        panic!(
            "the loops did not finish; tasks not succeeded (seq, state, attempts): {:?}",
            unfinished(&db).await
        );
    }
    let drained_at = Instant::now();

    // The last completion (or the sweeper) finalizes the job.
    let mut job = Job::default();
    for _ in 0..(HANG_GUARD.as_millis() / 100) {
        job = jobs
            .get_job(GetJobRequest {
                job_id: job_id.clone(),
            })
            .await
            .expect("job")
            .into_inner();
        if job.state != JobState::Running as i32 && job.state != JobState::Finalizing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finalized = drained_at.elapsed();
    assert_eq!(job.state, JobState::Succeeded as i32, "{}", job.error);
    let counts = job.tasks.expect("task counts");
    assert_eq!(
        (
            counts.queued,
            counts.leased,
            counts.succeeded,
            counts.failed,
            counts.cancelled
        ),
        (0, 0, TASKS, 0, 0)
    );
    assert_eq!(job.progress, 1.0);

    // ---- what the loops saw
    let grants: Vec<Grant> = reports.iter().flat_map(|r| r.grants.clone()).collect();
    let want = expected();
    let seen = Expected {
        grants: grants.len(),
        abandoned: grants.iter().filter(|g| g.end == End::Abandoned).count(),
        failed: grants.iter().filter(|g| g.end == End::Failed).count(),
        held: grants
            .iter()
            .filter(|g| plan(g.seq, g.attempt) == Plan::Hold)
            .count(),
    };
    let refused: Vec<&Grant> = grants
        .iter()
        .filter(|g| matches!(g.end, End::Refused(_)))
        .collect();
    assert!(
        refused.is_empty(),
        "completions refused although the lease was heartbeated: {refused:?}"
    );
    assert_eq!(seen, want);
    // 63 + 7 + 7 lapses, 63 failures, 10 held leases, all in the first half of the queue.
    assert_eq!(
        want,
        Expected {
            grants: 5_140,
            abandoned: 77,
            failed: 63,
            held: 10
        }
    );
    let tokens: HashSet<&str> = grants.iter().map(|g| g.token.as_str()).collect();
    assert_eq!(tokens.len(), grants.len(), "a lease token was reused");
    let held_beats = grants
        .iter()
        .filter(|g| plan(g.seq, g.attempt) == Plan::Hold)
        .map(|g| g.heartbeats)
        .min()
        .expect("held leases");
    assert!(
        held_beats >= 2,
        "held leases were renewed {held_beats} times"
    );
    for g in grants
        .iter()
        .filter(|g| plan(g.seq, g.attempt) == Plan::Hold)
    {
        // Completed after more than a lease length: only an acknowledged renewal makes that
        // possible, and it is what `live_until` records.
        assert!(
            g.live_until > g.asked + lease_length(),
            "task {}: the held lease was never renewed",
            g.seq
        );
    }

    let mut by_task: BTreeMap<u32, Vec<&Grant>> = BTreeMap::new();
    for g in &grants {
        by_task.entry(g.seq).or_default().push(g);
    }
    assert_eq!(by_task.len(), TASKS as usize, "tasks never leased");
    for (seq, task) in by_task.iter_mut() {
        task.sort_by_key(|g| g.attempt);
        let attempts: Vec<u32> = task.iter().map(|g| g.attempt).collect();
        let want: Vec<u32> = (1..=task.len() as u32).collect();
        assert_eq!(attempts, want, "task {seq}: attempts granted");
        let completions = task
            .iter()
            .filter(|g| matches!(g.end, End::Completed { .. }))
            .count();
        assert_eq!(completions, 1, "task {seq} completed {completions} times");
        assert!(
            matches!(task.last().map(|g| &g.end), Some(End::Completed { .. })),
            "task {seq} was leased again after it was completed: {task:?}"
        );
        // No two leases of the task were live at the same time: each grant arrived after the
        // moment until which every earlier lease was certainly live.
        for (i, later) in task.iter().enumerate() {
            for earlier in &task[..i] {
                assert!(
                    later.granted > earlier.live_until,
                    "task {seq}: attempt {} ({}) was granted {:?} before attempt {} ({}) \
                     could have ended",
                    later.attempt,
                    later.worker,
                    earlier.live_until.saturating_duration_since(later.granted),
                    earlier.attempt,
                    earlier.worker,
                );
            }
        }
    }
    let superseded: Vec<&Grant> = by_task
        .values()
        .flat_map(|t| t[..t.len() - 1].iter().copied())
        .collect();
    assert_eq!(superseded.len(), want.abandoned + want.failed);
    assert_eq!(
        shared.fenced_in_flight.load(Ordering::SeqCst),
        superseded.len(),
        "every later attempt probes its predecessor's token"
    );

    // ---- what the database holds
    let rows: Vec<TaskRow> = sqlx::query_as(
        "SELECT seq, state, attempts, output_key, output_sha256, lease_token FROM tasks
         WHERE job_id = $1 ORDER BY seq",
    )
    .bind(uuid::Uuid::parse_str(&job_id).expect("job id"))
    .fetch_all(&db)
    .await
    .expect("tasks");
    assert_eq!(rows.len(), TASKS as usize);
    for row in &rows {
        let seq = u32::try_from(row.seq).expect("seq");
        let task = &by_task[&seq];
        let Some(End::Completed { key, sha256 }) = task.last().map(|g| &g.end) else {
            unreachable!("checked above");
        };
        assert_eq!(row.state, "succeeded", "task {seq}");
        assert_eq!(row.attempts as usize, task.len(), "task {seq}: attempts");
        assert_eq!(row.output_key.as_deref(), Some(key.as_str()), "task {seq}");
        assert_eq!(
            row.output_sha256.as_deref(),
            Some(sha256.as_str()),
            "task {seq}"
        );
        assert_eq!(row.lease_token, None, "task {seq}");
    }
    let events: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, count(*) FROM job_events WHERE kind IN ('requeued', 'retry') GROUP BY kind
         ORDER BY kind",
    )
    .fetch_all(&db)
    .await
    .expect("events");
    assert_eq!(
        events,
        [
            ("requeued".to_string(), want.abandoned as i64),
            ("retry".to_string(), want.failed as i64)
        ]
    );
    let results: i64 = sqlx::query_scalar("SELECT count(*) FROM tensor_results")
        .fetch_one(&db)
        .await
        .expect("tensor results");
    assert_eq!(results, i64::from(TASKS));

    // Every superseded token is still refused now that the job is over.
    let mut client = WorkerServiceClient::new(connect(&endpoint).await);
    for g in &superseded {
        expect_fenced(&mut client, &job_id, g.seq, &g.token).await;
    }

    // ---- the output names every layer's shard
    let index: serde_json::Value = serde_json::from_slice(
        &shared
            .objects
            .get_small(
                "dst-models",
                "layers-w8/model.safetensors.index.json",
                64 << 20,
            )
            .await
            .expect("index"),
    )
    .expect("index json");
    let map = index["weight_map"].as_object().expect("weight map");
    // pack-quantized int8: packed words, scales and the original shape per weight.
    const PARTS: [&str; 3] = ["weight_packed", "weight_scale", "weight_shape"];
    assert_eq!(map.len(), PARTS.len() * TASKS as usize);
    for l in 0..TASKS {
        let file = serde_json::json!(shard_file_name(l as usize + 1, TASKS as usize));
        for part in PARTS {
            let name = format!("model.layers.{l}.mlp.down_proj.{part}");
            assert_eq!(map.get(&name), Some(&file), "{name}");
        }
    }

    // ---- figures (printed, never asserted)
    let last_grant = grants.iter().map(|g| g.granted).max().expect("grants");
    let lease_phase = last_grant.duration_since(started).as_secs_f64();
    let run = drained_at.duration_since(started).as_secs_f64();
    let calls: usize = reports.iter().map(|r| r.calls).sum();
    let empty: usize = reports.iter().map(|r| r.empty).sum();
    eprintln!(
        "load: {TASKS} tasks, {LOOPS} loops (slots {SLOTS:?}), lease {LEASE_SECONDS}s; \
         planned in {:.1}s",
        planned.as_secs_f64()
    );
    eprintln!(
        "load: {} leases in {lease_phase:.1}s: {:.0} leases/s; {TASKS} completions in \
         {run:.1}s: {:.0} completions/s",
        grants.len(),
        grants.len() as f64 / lease_phase,
        f64::from(TASKS) / run,
    );
    eprintln!(
        "load: {calls} lease calls ({empty} empty), {} heartbeats, {} abandoned, {} failed, \
         {} stale tokens refused in flight; finalized {:.1}s after the last completion; \
         {:.1}s in all",
        shared.heartbeats.load(Ordering::SeqCst),
        want.abandoned,
        want.failed,
        shared.fenced_in_flight.load(Ordering::SeqCst),
        finalized.as_secs_f64(),
        setup.elapsed().as_secs_f64(),
    );

    let _ = stop.send(());
    server
        .await
        .expect("join")
        .expect("coordinator exited cleanly");
}
