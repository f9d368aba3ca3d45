//! Faults against the whole service (real Postgres, real s3s-fs, coordinator and worker
//! processes): a worker killed mid-task, a worker frozen past its lease and then resumed, and
//! Postgres restarted mid-job. Every job must still succeed with output byte-identical to
//! `shardpress compress` of the same checkpoint. `soak_workers_killed_at_random_moments`
//! repeats the kill at random moments; `scripts/soak.sh` runs it.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cluster::{assert_same_files, local_output, model_dir, signal, Cluster, Proc, SRC};

const TASKS: i64 = 8;

async fn count(db: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.expect(sql)
}

/// Waits until `sql` (a count) reaches `at_least`.
async fn wait_count(db: &sqlx::PgPool, sql: &str, at_least: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(db, sql).await < at_least {
        assert!(Instant::now() < deadline, "timed out waiting for {sql}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Freezes `worker` while it holds a lease and returns the seq of a leased task; the worker
/// stays stopped. Retries (resuming the worker) when the freeze fell between two tasks.
async fn freeze_holding_a_lease(db: &sqlx::PgPool, worker: &Proc) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "the worker never held a lease");
        wait_count(
            db,
            "SELECT count(*) FROM tasks WHERE state = 'leased' AND started_at IS NOT NULL",
            1,
        )
        .await;
        signal(worker, "-STOP");
        // A report already on the wire when the worker stopped lands within this pause.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let leased: Option<i32> =
            sqlx::query_scalar("SELECT min(seq) FROM tasks WHERE state = 'leased'")
                .fetch_one(db)
                .await
                .expect("leased");
        if let Some(seq) = leased {
            return seq;
        }
        signal(worker, "-CONT");
    }
}

async fn attempts(db: &sqlx::PgPool, seq: i32) -> i32 {
    sqlx::query_scalar("SELECT attempts FROM tasks WHERE seq = $1")
        .bind(seq)
        .fetch_one(db)
        .await
        .expect("attempts")
}

/// Watches `id` to the end and checks that it succeeded with every task done once.
fn assert_succeeded(c: &Cluster, id: &str) {
    let watch = c.cli(&["watch", id]);
    assert!(
        watch.status.success(),
        "watch exited {:?}: {}",
        watch.status.code(),
        String::from_utf8_lossy(&watch.stderr)
    );
    let st = c.status(id);
    assert_eq!(st["state"], "succeeded", "{st}");
    assert_eq!(st["tasks"]["succeeded"], TASKS, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_costs_nothing() {
    let mut c = Cluster::start().await;
    let local = local_output(&model_dir(), "w8a16");
    let db = c.db().await;
    let id = c.submit();
    c.start_worker("1");
    let victim = c.workers.pop().expect("worker");
    let seq = freeze_holding_a_lease(&db, &victim).await;
    signal(&victim, "-KILL");
    drop(victim);
    assert_eq!(attempts(&db, seq).await, 1);
    // Another worker picks the task up once the dead worker's lease runs out.
    c.start_worker("2");
    assert_succeeded(&c, &id);
    assert_eq!(attempts(&db, seq).await, 2, "the killed task ran once more");
    let total: i64 = count(&db, "SELECT sum(attempts)::bigint FROM tasks").await;
    assert_eq!(total, TASKS + 1, "only the killed task ran twice");
    assert_same_files(&local, &c.remote_output("minilm-w8a16/").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumed_after_its_lease_ran_out_is_refused() {
    let mut c = Cluster::start().await;
    let local = local_output(&model_dir(), "w8a16");
    let db = c.db().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let zombie_log = tmp.path().join("zombie.log");
    let id = c.submit();
    c.start_worker_logging("1", &zombie_log);
    let zombie = c.workers.pop().expect("worker");
    let seq = freeze_holding_a_lease(&db, &zombie).await;
    // The job finishes without the frozen worker: its lease expires and the task reruns.
    c.start_worker("2");
    assert_succeeded(&c, &id);
    assert_eq!(attempts(&db, seq).await, 2);
    let before = c.remote_output("minilm-w8a16/").await;
    assert_same_files(&local, &before);
    let etags_before: Vec<Option<String>> =
        sqlx::query_scalar("SELECT output_etag FROM tasks ORDER BY seq")
            .fetch_all(&db)
            .await
            .expect("etags");

    signal(&zombie, "-CONT");
    let refusals = [
        "coordinator no longer knows this lease",
        "coordinator withdrew the lease",
        "coordinator refused the result, the lease is stale",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(&zombie_log).unwrap_or_default();
        if refusals.iter().any(|r| log.contains(r)) {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed worker was never refused:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Give a resumed task time to stop (or to try its upload) before looking again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !log.contains("panicked"),
        "the resumed worker panicked:\n{log}"
    );
    assert_eq!(c.status(&id)["state"], "succeeded");
    assert_eq!(
        attempts(&db, seq).await,
        2,
        "the refused attempt counts for nothing"
    );
    let etags_after: Vec<Option<String>> =
        sqlx::query_scalar("SELECT output_etag FROM tasks ORDER BY seq")
            .fetch_all(&db)
            .await
            .expect("etags");
    assert_eq!(
        etags_before, etags_after,
        "the refused worker changed a record"
    );
    assert_same_files(&local, &c.remote_output("minilm-w8a16/").await);
    // The resumed worker is still running (it did not crash on the refusal).
    let mut zombie = zombie;
    assert!(
        zombie.0.try_wait().expect("try_wait").is_none(),
        "the resumed worker exited:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_job_the_job_completes() {
    let mut c = Cluster::start().await;
    let local = local_output(&model_dir(), "w8a16");
    let id = c.submit();
    c.start_worker("1");
    let db = c.db().await;
    wait_count(
        &db,
        "SELECT count(*) FROM tasks WHERE state = 'succeeded'",
        1,
    )
    .await;
    let done_before = count(&db, "SELECT count(*) FROM tasks WHERE state = 'succeeded'").await;
    db.close().await;
    assert!(done_before < TASKS, "the job finished before the restart");
    // Down for longer than a heartbeat period, so worker calls fail meanwhile.
    c.pg.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.pg.start_again();
    assert_succeeded(&c, &id);
    // Neither side exited: the same coordinator and worker processes served the whole job.
    let coordinator = c.coordinator.as_mut().expect("coordinator");
    assert!(coordinator.0.try_wait().expect("try_wait").is_none());
    assert!(c.workers[0].0.try_wait().expect("try_wait").is_none());
    assert_same_files(&local, &c.remote_output("minilm-w8a16/").await);
}

/// xorshift64*: the soak's random kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// One soak trial: a job whose only worker is killed `delay` after submission, finished by a
/// second worker. Returns whether the killed worker held a lease, or why the trial failed.
async fn soak_trial(
    c: &mut Cluster,
    local: &BTreeMap<String, Vec<u8>>,
    trial: u64,
    delay: Duration,
) -> Result<bool, String> {
    let prefix = format!("soak-{trial}/");
    let id = c.submit_job(SRC, "w8a16", &format!("s3://models-out/{prefix}"));
    c.start_worker("1");
    let victim = c.workers.pop().expect("worker");
    tokio::time::sleep(delay).await;
    signal(&victim, "-KILL");
    drop(victim);
    let db = c.db().await;
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE job_id = $1::uuid AND state = 'leased'",
    )
    .bind(&id)
    .fetch_one(&db)
    .await
    .map_err(|e| e.to_string())?;
    c.start_worker("2");
    let watch = c.cli(&["watch", &id]);
    c.workers.clear();
    if !watch.status.success() {
        return Err(format!(
            "watch exited {:?}: {}",
            watch.status.code(),
            String::from_utf8_lossy(&watch.stderr).trim()
        ));
    }
    let st = c.status(&id);
    if st["state"] != "succeeded" || st["tasks"]["succeeded"] != TASKS {
        return Err(format!("job ended as {st}"));
    }
    let remote = c.remote_output(&prefix).await;
    if &remote != local {
        return Err("output differs from the local run".into());
    }
    Ok(held > 0)
}

/// `SHARDPRESS_SOAK_TRIALS` (default 20) jobs, each with its worker killed at a random moment
/// (`SHARDPRESS_SOAK_SEED` repeats a run). Prints `trials passed: P/T`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with scripts/soak.sh"]
async fn soak_workers_killed_at_random_moments() {
    let trials: u64 = std::env::var("SHARDPRESS_SOAK_TRIALS")
        .ok()
        .map_or(20, |v| v.parse().expect("SHARDPRESS_SOAK_TRIALS"));
    let seed: u64 = std::env::var("SHARDPRESS_SOAK_SEED").ok().map_or_else(
        || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        },
        |v| v.parse().expect("SHARDPRESS_SOAK_SEED"),
    );
    println!("soak: {trials} trials, seed {seed}");
    let mut rng = Rng(seed | 1);
    let mut c = Cluster::start().await;
    let local = local_output(&model_dir(), "w8a16");
    let (mut passed, mut mid_task) = (0, 0);
    for trial in 0..trials {
        let delay = Duration::from_millis(rng.below(4000));
        let started = Instant::now();
        match soak_trial(&mut c, &local, trial, delay).await {
            Ok(held) => {
                passed += 1;
                mid_task += u64::from(held);
                println!(
                    "trial {trial}: killed after {} ms{}, passed in {:.1}s",
                    delay.as_millis(),
                    if held { " holding a lease" } else { "" },
                    started.elapsed().as_secs_f64()
                );
            }
            Err(why) => println!(
                "trial {trial}: killed after {} ms, FAILED: {why}",
                delay.as_millis()
            ),
        }
    }
    println!("soak: {mid_task} of {trials} kills hit a worker holding a lease");
    println!("trials passed: {passed}/{trials}");
    assert_eq!(passed, trials, "seed {seed}");
}
