//! A whole service for tests: a throwaway Postgres cluster, an s3s-fs server holding the real
//! checkpoint, a coordinator process and worker processes, driven with the CLI.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shardpress_testkit::{PgCluster, S3Server};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_shardpress");
pub(crate) const SRC: &str = "s3://models-in/minilm/";
pub(crate) const DST: &str = "s3://models-out/minilm-w8a16/";

pub(crate) fn model_dir() -> PathBuf {
    let dir = std::env::var("SHARDPRESS_MODEL_DIR")
        .expect("SHARDPRESS_MODEL_DIR is not set: run the suite with scripts/test.sh");
    PathBuf::from(dir)
}

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.0.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub(crate) struct Cluster {
    pub(crate) pg: PgCluster,
    pub(crate) s3: S3Server,
    pub(crate) db_url: String,
    pub(crate) port: u16,
    /// Port of the coordinator's Prometheus endpoint.
    pub(crate) metrics_port: u16,
    pub(crate) coordinator: Option<Proc>,
    pub(crate) workers: Vec<Proc>,
}

impl Cluster {
    pub(crate) async fn start() -> Cluster {
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
            metrics_port: free_port(),
            coordinator: None,
            workers: Vec::new(),
        };
        c.start_coordinator();
        c
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .envs(self.s3.env())
            .env("SHARDPRESS_LOG", "info");
        cmd
    }

    pub(crate) fn start_coordinator(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let metrics = format!("127.0.0.1:{}", self.metrics_port);
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
                "--metrics-listen",
                &metrics,
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

    pub(crate) fn start_worker(&mut self, concurrency: &str) {
        self.start_worker_with(concurrency, &[]);
    }

    pub(crate) fn start_worker_with(&mut self, concurrency: &str, extra: &[&str]) {
        self.spawn_worker(concurrency, extra, Stdio::null());
    }

    /// Starts a worker whose log goes to `log`.
    pub(crate) fn start_worker_logging(&mut self, concurrency: &str, log: &Path) {
        let file = std::fs::File::create(log).expect("worker log");
        self.spawn_worker(concurrency, &[], Stdio::from(file));
    }

    fn spawn_worker(&mut self, concurrency: &str, extra: &[&str], stderr: Stdio) {
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
            .stderr(stderr)
            .spawn()
            .expect("spawn worker");
        self.workers.push(Proc(child));
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        let url = self.url();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--coordinator", &url]);
        self.command(&full).output().expect("run cli")
    }

    pub(crate) fn submit(&self) -> String {
        self.submit_job(SRC, "w8a16", DST)
    }

    pub(crate) fn submit_job(&self, src: &str, recipe: &str, dst: &str) -> String {
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

    pub(crate) fn status(&self, id: &str) -> serde_json::Value {
        let out = self.cli(&["status", id, "--output", "json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub(crate) async fn db(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.db_url).await.expect("db")
    }
}

/// The samples of a Prometheus text exposition at `127.0.0.1:port/metrics`, keyed by name
/// with labels (`shardpress_jobs{state="succeeded"}`).
pub(crate) fn scrape(port: u16) -> BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read /metrics");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample line");
            (name.to_string(), value.parse::<f64>().expect("a number"))
        })
        .collect()
}

pub(crate) fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
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
pub(crate) fn tensor_bytes(file: &Path) -> u64 {
    let bytes = std::fs::read(file).expect("read model");
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    bytes.len() as u64 - 8 - u64::from_le_bytes(n)
}

pub(crate) async fn assert_matches_local(c: &Cluster) {
    assert_same_as_local(c, &model_dir(), "w8a16", "minilm-w8a16/").await;
}

/// The files `shardpress compress` writes for `model` with `recipe`, by relative path.
pub(crate) fn local_output(model: &Path, recipe: &str) -> BTreeMap<String, Vec<u8>> {
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
    files(&local_out)
}

impl Cluster {
    /// The objects under `models-out/<prefix>`, by path relative to the prefix.
    pub(crate) async fn remote_output(&self, prefix: &str) -> BTreeMap<String, Vec<u8>> {
        let remote = tempfile::tempdir().expect("tmp");
        self.s3
            .download_prefix("models-out", prefix, remote.path())
            .await;
        files(remote.path())
    }
}

/// Panics unless `remote` holds exactly the files of `local` with the same bytes.
pub(crate) fn assert_same_files(
    local: &BTreeMap<String, Vec<u8>>,
    remote: &BTreeMap<String, Vec<u8>>,
) {
    assert_eq!(
        local.keys().collect::<Vec<_>>(),
        remote.keys().collect::<Vec<_>>(),
        "service output has other files than the local run"
    );
    for (name, bytes) in local {
        assert!(
            remote[name] == *bytes,
            "{name} differs between service and local output"
        );
    }
}

/// The job's output under `models-out/<prefix>` equals `shardpress compress` of `model`.
pub(crate) async fn assert_same_as_local(c: &Cluster, model: &Path, recipe: &str, prefix: &str) {
    let local = local_output(model, recipe);
    assert_same_files(&local, &c.remote_output(prefix).await);
}
