//! The whole service end to end: real Postgres, a real S3 server, a coordinator process and
//! two worker processes compress the real checkpoint submitted with the CLI; the result must
//! equal `shardpress compress` of the same input byte for byte.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cluster::{
    assert_matches_local, assert_same_as_local, free_port, model_dir, scrape, signal, tensor_bytes,
    Cluster,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_compress_the_real_checkpoint_like_the_local_command() {
    let mut c = Cluster::start().await;
    // 64 MiB is less than the embedding (45 MiB of f32) plus a task's upload buffers, so it
    // is read and written in row blocks; the output must still match the unlimited local run.
    let worker_metrics = [free_port(), free_port()];
    for port in worker_metrics {
        let listen = format!("127.0.0.1:{port}");
        c.start_worker_with(
            "2",
            &["--memory-limit", "64MiB", "--metrics-listen", &listen],
        );
    }
    let id = c.submit();
    let watch = c.cli(&["watch", &id]);
    assert!(
        watch.status.success(),
        "watch exited {:?}: {}",
        watch.status.code(),
        String::from_utf8_lossy(&watch.stderr)
    );
    let st = c.status(&id);
    assert_eq!(st["state"], "succeeded", "{st}");
    assert_eq!(st["tasks_total"], 8, "{st}");
    assert_eq!(st["tasks"]["succeeded"], 8, "{st}");
    let memory = &st["memory"];
    let reserved = memory["largest_reservation_bytes"].as_u64().unwrap_or(0);
    let peak = memory["peak_task_bytes"].as_u64().unwrap_or(0);
    assert_eq!(
        reserved,
        64 << 20,
        "the embedding's task takes the whole budget: {st}"
    );
    assert!(peak > 24 << 20 && peak <= reserved, "{st}");
    assert!(memory["reuse_rate"].as_f64().unwrap_or(0.0) > 0.0, "{st}");
    assert_matches_local(&c).await;

    let db = c.db().await;
    let (succeeded, total_out): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'succeeded'), coalesce(sum(output_bytes), 0)::bigint FROM tasks",
    )
    .fetch_one(&db)
    .await
    .expect("tasks");
    assert_eq!(succeeded, 8);
    let (state, bytes_in, bytes_out, ratio): (String, i64, i64, Option<f64>) =
        sqlx::query_as("SELECT state, bytes_in, bytes_out, ratio FROM job_status")
            .fetch_one(&db)
            .await
            .expect("job_status");
    assert_eq!(state, "succeeded");
    assert_eq!(bytes_out, total_out);
    assert_eq!(
        bytes_in as u64,
        tensor_bytes(&model_dir().join("model.safetensors"))
    );
    assert!(ratio.expect("ratio") > 1.5, "{ratio:?}");
    let tensors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tensor_results WHERE action = 'quantize'")
            .fetch_one(&db)
            .await
            .expect("tensor_results");
    assert_eq!(tensors, 37);
    // Both workers took part or one did everything; either way each task ran exactly once.
    let attempts: i64 = sqlx::query_scalar("SELECT sum(attempts)::bigint FROM tasks")
        .fetch_one(&db)
        .await
        .expect("attempts");
    assert_eq!(attempts, 8);
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE (memory ->> 'reserved')::bigint BETWEEN 1 AND 67108864",
    )
    .fetch_one(&db)
    .await
    .expect("memory");
    assert_eq!(recorded, 8, "every task reports its memory");
    let tensors_run: i64 = sqlx::query_scalar("SELECT count(*) FROM tensor_results")
        .fetch_one(&db)
        .await
        .expect("tensor_results");

    // The coordinator's counters match the job; its gauges follow the database within a
    // sweep (a second with 4 s leases).
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = scrape(c.metrics_port);
        let settled = m.get("shardpress_jobs{state=\"succeeded\"}") == Some(&1.0);
        if settled || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let metric = |name: &str| m.get(name).copied().unwrap_or(-1.0);
    assert_eq!(metric("shardpress_jobs{state=\"succeeded\"}"), 1.0, "{m:?}");
    assert_eq!(metric("shardpress_jobs{state=\"running\"}"), 0.0, "{m:?}");
    assert_eq!(metric("shardpress_tasks{state=\"queued\"}"), 0.0, "{m:?}");
    assert_eq!(metric("shardpress_tasks_leased_total"), 8.0, "{m:?}");
    assert_eq!(metric("shardpress_tasks_completed_total"), 8.0, "{m:?}");
    assert_eq!(metric("shardpress_tasks_failed_total"), 0.0, "{m:?}");
    assert_eq!(metric("shardpress_tasks_retried_total"), 0.0, "{m:?}");
    assert_eq!(metric("shardpress_lease_expiries_total"), 0.0, "{m:?}");
    assert_eq!(metric("shardpress_reports_refused_total"), 0.0, "{m:?}");
    assert_eq!(metric("shardpress_bytes_written_total"), total_out as f64);
    assert_eq!(metric("shardpress_bytes_read_total"), bytes_in as f64);
    assert_eq!(metric("shardpress_task_duration_seconds_count"), 8.0);
    assert!(
        metric("shardpress_task_duration_seconds_sum") > 0.0,
        "{m:?}"
    );

    // Each worker counts what it did; together they did the job once. A worker counts a
    // task after the coordinator accepted it, so the last one may land just after the job.
    let deadline = Instant::now() + Duration::from_secs(10);
    let sum = |scrapes: &[BTreeMap<String, f64>], name: &str| -> f64 {
        scrapes
            .iter()
            .map(|m| m.get(name).copied().unwrap_or(0.0))
            .sum()
    };
    let scrapes = loop {
        let scrapes: Vec<_> = worker_metrics.iter().map(|p| scrape(*p)).collect();
        let done = sum(
            &scrapes,
            "shardpress_worker_tasks_total{outcome=\"completed\"}",
        );
        if done >= 8.0 || Instant::now() > deadline {
            break scrapes;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let completed = "shardpress_worker_tasks_total{outcome=\"completed\"}";
    assert_eq!(sum(&scrapes, completed), 8.0, "{scrapes:?}");
    assert_eq!(
        sum(
            &scrapes,
            "shardpress_worker_tasks_total{outcome=\"failed\"}"
        ),
        0.0
    );
    assert_eq!(
        sum(&scrapes, "shardpress_worker_bytes_written_total"),
        total_out as f64
    );
    assert_eq!(
        sum(&scrapes, "shardpress_worker_bytes_read_total"),
        bytes_in as f64
    );
    assert_eq!(
        sum(&scrapes, "shardpress_worker_task_duration_seconds_count"),
        8.0
    );
    assert_eq!(
        sum(&scrapes, "shardpress_worker_tensor_duration_seconds_count"),
        tensors_run as f64
    );
    for m in &scrapes {
        assert_eq!(
            m.get("shardpress_worker_tasks_running"),
            Some(&0.0),
            "{m:?}"
        );
        assert_eq!(
            m.get("shardpress_worker_pool_limit_bytes"),
            Some(&f64::from(64u32 << 20)),
            "{m:?}"
        );
    }
    let _ = &c.pg;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipe_file_with_structured_pruning_runs_like_the_local_command() {
    let mut c = Cluster::start().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let model = tmp.path().join("llama");
    std::fs::create_dir_all(&model).expect("mkdir");
    shardpress_testkit::llama::write_llama_checkpoint(&model);
    c.s3.upload_dir("models-in", "llama/", &model).await;
    // Every family at once: structured pruning, N:M then int4 (with a tensor N:M cannot
    // divide left unpruned), magnitude pruning stored as a bitmask.
    let recipe = tmp.path().join("mixed.toml");
    std::fs::write(
        &recipe,
        r#"name = "mixed"
[structured]
mlp_ratio = 0.25
head_ratio = 0.5
drop_layers = [1]

[[rules]]
targets = ["re:.*mlp.*"]
action = "quantize"
bits = 4
strategy = "group"
group_size = 8
prune = "2:4"
indivisible = "dense"

[[rules]]
targets = ["re:.*self_attn.*"]
action = "prune"
prune = "magnitude"
sparsity = 0.5
"#,
    )
    .expect("recipe");
    c.start_worker("2");
    let id = c.submit_job(
        "s3://models-in/llama/",
        &recipe.to_string_lossy(),
        "s3://models-out/llama-mixed/",
    );
    let watch = c.cli(&["watch", &id]);
    assert!(
        watch.status.success(),
        "watch: {}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let st = c.status(&id);
    assert_eq!(st["state"], "succeeded", "{st}");
    // embeddings, layers 0 and 2 (renumbered 1), final norm, head.
    assert_eq!(st["tasks_total"], 5, "{st}");
    assert_same_as_local(&c, &model, &recipe.to_string_lossy(), "llama-mixed/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_job_loses_nothing() {
    let mut c = Cluster::start().await;
    let id = c.submit();
    c.start_worker("1");
    let db = c.db().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .expect("count");
        if done >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no task finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Freeze the worker so the job cannot finish while the coordinator is gone.
    signal(&c.workers[0], "-STOP");
    let done_before: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
            .fetch_one(&db)
            .await
            .expect("count");
    assert!(
        done_before < 8,
        "job finished before the coordinator was killed"
    );
    if let Some(coord) = c.coordinator.take() {
        signal(&coord, "-KILL");
    }
    c.start_coordinator();
    signal(&c.workers[0], "-CONT");
    let watch = c.cli(&["watch", &id]);
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    assert_eq!(c.status(&id)["state"], "succeeded");
    assert_matches_local(&c).await;
}
