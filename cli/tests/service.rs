//! The whole service end to end: real Postgres, a real S3 server, a coordinator process and
//! two worker processes compress the real checkpoint submitted with the CLI; the result must
//! equal `shardpress compress` of the same input byte for byte.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shardpress_testkit::{PgCluster, S3Server};

const BIN: &str = env!("CARGO_BIN_EXE_shardpress");
const SRC: &str = "s3://models-in/minilm/";
const DST: &str = "s3://models-out/minilm-w8a16/";

fn model_dir() -> PathBuf {
    let dir = std::env::var("SHARDPRESS_MODEL_DIR")
        .expect("SHARDPRESS_MODEL_DIR is not set: run the suite with scripts/test.sh");
    PathBuf::from(dir)
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Cluster {
    pg: PgCluster,
    s3: S3Server,
    db_url: String,
    port: u16,
    coordinator: Option<Proc>,
    workers: Vec<Proc>,
}

impl Cluster {
    async fn start() -> Cluster {
        let pg = PgCluster::start();
        let db_url = pg.create_database("service");
        let s3 = S3Server::start();
        s3.create_bucket("models-in").await;
        s3.create_bucket("models-out").await;
        s3.upload_dir("models-in", "minilm/", &model_dir()).await;
        let mut c = Cluster {
            pg,
            s3,
            db_url,
            port: free_port(),
            coordinator: None,
            workers: Vec::new(),
        };
        c.start_coordinator();
        c
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .envs(self.s3.env())
            .env("SHARDPRESS_LOG", "info");
        cmd
    }

    fn start_coordinator(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let endpoint = self.s3.endpoint();
        let child = self
            .command(&[
                "coordinator",
                "--listen",
                &listen,
                "--database-url",
                &self.db_url,
                "--s3-endpoint",
                &endpoint,
                "--s3-path-style",
                "--lease-seconds",
                "4",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        self.coordinator = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.cli(&["list", "--output", "json"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("coordinator did not answer within 60s");
    }

    fn start_worker(&mut self, concurrency: &str) {
        self.start_worker_with(concurrency, &[]);
    }

    fn start_worker_with(&mut self, concurrency: &str, extra: &[&str]) {
        let url = self.url();
        let endpoint = self.s3.endpoint();
        let mut args = vec![
            "worker",
            "--coordinator",
            &url,
            "--concurrency",
            concurrency,
            "--s3-endpoint",
            &endpoint,
            "--s3-path-style",
        ];
        args.extend_from_slice(extra);
        let child = self
            .command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn worker");
        self.workers.push(Proc(child));
    }

    fn cli(&self, args: &[&str]) -> Output {
        let url = self.url();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--coordinator", &url]);
        self.command(&full).output().expect("run cli")
    }

    fn submit(&self) -> String {
        self.submit_job(SRC, "w8a16", DST)
    }

    fn submit_job(&self, src: &str, recipe: &str, dst: &str) -> String {
        let out = self.cli(&[
            "submit", src, "--recipe", recipe, "--out", dst, "--output", "json",
        ]);
        assert!(
            out.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("submit json");
        v["job_id"].as_str().expect("job_id").to_string()
    }

    fn status(&self, id: &str) -> serde_json::Value {
        let out = self.cli(&["status", id, "--output", "json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    async fn db(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.db_url).await.expect("db")
    }
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .expect("rel")
                    .to_string_lossy()
                    .into_owned();
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// Data-section length of a safetensors file: its length less the 8-byte prefix and header.
fn tensor_bytes(file: &Path) -> u64 {
    let bytes = std::fs::read(file).expect("read model");
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    bytes.len() as u64 - 8 - u64::from_le_bytes(n)
}

async fn assert_matches_local(c: &Cluster) {
    assert_same_as_local(c, &model_dir(), "w8a16", "minilm-w8a16/").await;
}

/// The job's output under `models-out/<prefix>` equals `shardpress compress` of `model`.
async fn assert_same_as_local(c: &Cluster, model: &Path, recipe: &str, prefix: &str) {
    let local = tempfile::tempdir().expect("tmp");
    let local_out = local.path().join("out");
    let out = Command::new(BIN)
        .args([
            "compress",
            &model.to_string_lossy(),
            "--recipe",
            recipe,
            "--quiet",
            "--out",
        ])
        .arg(&local_out)
        .output()
        .expect("compress");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote = tempfile::tempdir().expect("tmp");
    c.s3.download_prefix("models-out", prefix, remote.path())
        .await;
    let a = files(&local_out);
    let b = files(remote.path());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "service output has other files than the local run"
    );
    for (name, bytes) in &a {
        assert!(
            b[name] == *bytes,
            "{name} differs between service and local output"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_compress_the_real_checkpoint_like_the_local_command() {
    let mut c = Cluster::start().await;
    // 64 MiB is less than the embedding (45 MiB of f32) plus a task's upload buffers, so it
    // is read and written in row blocks; the output must still match the unlimited local run.
    c.start_worker_with("2", &["--memory-limit", "64MiB"]);
    c.start_worker_with("2", &["--memory-limit", "64MiB"]);
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
