//! An S3-compatible server: `s3s-fs` serving a temporary directory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use bytes::Bytes;
use shardpress_storage::{
    s3_client_with_static_credentials, ObjectStore, S3Settings, S3Uri, StorageError,
};
use tempfile::TempDir;

/// Access key of every test server.
pub const ACCESS_KEY: &str = "shardpress-test-access";
/// Secret key of every test server.
pub const SECRET_KEY: &str = "shardpress-test-secret-key";
/// Region the test clients use (the server ignores it, but SigV4 signs it).
pub const REGION: &str = "us-east-1";

/// How long the server may take to start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The line s3s-fs logs (at info level) once it listens.
const READY_MARKER: &str = "server is running at http://";

/// A running `s3s-fs` on 127.0.0.1 with fixed test credentials ([`ACCESS_KEY`],
/// [`SECRET_KEY`]) and path-style addressing, storing objects under a temporary directory
/// (bucket `b`, key `k/x` is the file `data/b/k/x`). Dropping it kills the server and deletes
/// the data.
///
/// The binary comes from `SHARDPRESS_S3FS_BIN`, else
/// `${SHARDPRESS_CACHE:-$HOME/.cache/shardpress}/tools/bin/s3s-fs`, where
/// `scripts/s3-server.sh` installs it.
///
/// s3s-fs lacks ListMultipartUploads and ignores conditional GET headers; in-progress
/// multipart uploads appear as `.upload*` files in [`S3Server::data_dir`].
#[derive(Debug)]
pub struct S3Server {
    dir: TempDir,
    child: Child,
    port: u16,
}

impl S3Server {
    /// Starts a server on a port the OS picks and waits until it accepts connections.
    ///
    /// # Panics
    /// When the binary is missing (with instructions to run `scripts/s3-server.sh`) or the
    /// server does not come up (with its log).
    pub fn start() -> S3Server {
        let bin = binary();
        let dir = tempfile::Builder::new()
            .prefix("shardpress-s3-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let data = dir.path().join("data");
        std::fs::create_dir(&data)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", data.display()));
        let log_path = dir.path().join("s3s-fs.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot duplicate a file handle: {e}"));
        // Port 0: the server binds a free port and logs it, so no other process can take it
        // between choosing and binding.
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .env("RUST_LOG", "info")
            .env_remove("RUST_LOG_STYLE")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let port = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(port) = listening_port(&text) {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited during startup ({status}); its log:\n{text}",
                    bin.display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not start listening within {} s; its log:\n{text}",
                    bin.display(),
                    STARTUP_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let server = S3Server { dir, child, port };
        server.wait_accepting(deadline);
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The access key clients must use.
    pub fn access_key(&self) -> &'static str {
        ACCESS_KEY
    }

    /// The secret key clients must use.
    pub fn secret_key(&self) -> &'static str {
        SECRET_KEY
    }

    /// Where the server keeps its files: one directory per bucket, plus its own dot-files.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3s-fs.log")).unwrap_or_default()
    }

    /// Endpoint, region and path-style addressing for this server. Credentials are not
    /// part of [`S3Settings`]: use [`S3Server::client`] in-process, or [`S3Server::env`] for
    /// child processes.
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_string()),
            path_style: true,
            ..S3Settings::default()
        }
    }

    /// Environment variables that point the standard AWS chain of a child process at this
    /// server (credentials, region, endpoint; instance metadata lookups off). Path-style
    /// addressing is not expressible here and must be configured separately.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// An SDK client with this server's settings and credentials.
    pub async fn client(&self) -> Client {
        s3_client_with_static_credentials(&self.settings(), ACCESS_KEY, SECRET_KEY).await
    }

    /// An [`ObjectStore`] on this server, bound to the current Tokio runtime.
    pub async fn store(&self) -> ObjectStore {
        ObjectStore::new(self.client().await)
    }

    /// Creates bucket `name`.
    ///
    /// # Panics
    /// When the server refuses.
    pub async fn create_bucket(&self, name: &str) {
        if let Err(e) = self
            .client()
            .await
            .create_bucket()
            .bucket(name)
            .send()
            .await
        {
            panic!(
                "creating bucket {name:?} failed: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            );
        }
    }

    /// Uploads every file below `local_dir` (recursively, following symbolic links) to
    /// `bucket` under `prefix` (a `/` is added when missing). Returns the keys, sorted.
    ///
    /// # Panics
    /// When a file cannot be read or an upload fails.
    pub async fn upload_dir(&self, bucket: &str, prefix: &str, local_dir: &Path) -> Vec<String> {
        let uri = uri_for(bucket, prefix);
        let store = self.store().await;
        let mut keys = Vec::new();
        for rel in files_below(local_dir) {
            let path = local_dir.join(&rel);
            let data = tokio::fs::read(&path)
                .await
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let key = uri.key(&rel);
            if let Err(e) = store.put(bucket, &key, Bytes::from(data)).await {
                panic!("uploading {} failed: {e}", path.display());
            }
            keys.push(key);
        }
        keys.sort();
        keys
    }

    /// Downloads every object of `bucket` under `prefix` into `local_dir`, keeping the
    /// relative paths. Returns the relative paths, sorted.
    ///
    /// # Panics
    /// When listing or a download fails, or a key would escape `local_dir`.
    pub async fn download_prefix(
        &self,
        bucket: &str,
        prefix: &str,
        local_dir: &Path,
    ) -> Vec<String> {
        let uri = uri_for(bucket, prefix);
        let store = self.store().await;
        let listing = store
            .list(&uri)
            .await
            .unwrap_or_else(|e| panic!("listing {uri} failed: {e}"));
        let mut rels = Vec::new();
        for object in listing {
            let rel = object.rel;
            if rel
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == "..")
            {
                panic!("{uri}{rel}: key cannot be mapped to a local path");
            }
            let data = store
                .get_small(bucket, &uri.key(&rel), u64::MAX)
                .await
                .unwrap_or_else(|e: StorageError| panic!("downloading failed: {e}"));
            let path = local_dir.join(&rel);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
            }
            tokio::fs::write(&path, &data)
                .await
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            rels.push(rel);
        }
        rels
    }

    /// Waits until the port accepts TCP connections.
    fn wait_accepting(&self, deadline: Instant) {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "s3s-fs logged port {} but does not accept connections; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The s3s-fs binary to run.
///
/// # Panics
/// When it is not installed.
fn binary() -> PathBuf {
    let (bin, origin) = match std::env::var_os("SHARDPRESS_S3FS_BIN") {
        Some(path) if !path.is_empty() => (PathBuf::from(path), "SHARDPRESS_S3FS_BIN"),
        _ => (
            crate::cache_dir().join("tools/bin/s3s-fs"),
            "the default location",
        ),
    };
    if !bin.is_file() {
        panic!(
            "the S3 test server s3s-fs is not installed: {} ({origin}) does not exist; run \
             scripts/s3-server.sh to install it, or set SHARDPRESS_S3FS_BIN to its path",
            bin.display()
        );
    }
    bin
}

/// Finds the port in s3s-fs's "server is running at http://127.0.0.1:PORT" line.
fn listening_port(log: &str) -> Option<u16> {
    let at = log.find(READY_MARKER)? + READY_MARKER.len();
    let rest = &log[at..];
    let addr_end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    let addr = &rest[..addr_end];
    // Only a complete line counts: the log may be read mid-write.
    if addr_end == rest.len() {
        return None;
    }
    addr.rsplit_once(':')?.1.parse().ok()
}

fn uri_for(bucket: &str, prefix: &str) -> S3Uri {
    S3Uri::new(bucket, prefix).unwrap_or_else(|e| panic!("{e}"))
}

/// Regular files below `root`, relative, with `/` separators, sorted.
fn files_below(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
            let child = rel.join(entry.file_name());
            let meta = std::fs::metadata(entry.path())
                .unwrap_or_else(|e| panic!("cannot stat {}: {e}", entry.path().display()));
            if meta.is_dir() {
                stack.push(child);
            } else if meta.is_file() {
                out.push(child.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_in_the_log() {
        let log = "  2026-01-01T00:00:00Z  INFO s3s_fs: server is running at http://127.0.0.1:41234\n    at src/main.rs:120\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(
            listening_port("INFO s3s_fs: server is running at http://127.0.0.1:412"),
            None
        );
        assert_eq!(
            listening_port("INFO s3s_fs: authentication is enabled\n"),
            None
        );
    }
}
