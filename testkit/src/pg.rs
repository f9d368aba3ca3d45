//! A throwaway PostgreSQL cluster.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

/// Where the PostgreSQL 15 binaries live unless `SHARDPRESS_TEST_PG_BIN` says otherwise.
const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// OS user that runs the server when the tests run as root (initdb refuses root).
const PG_OS_USER: &str = "postgres";

/// Attempts at starting on a fresh port when another process took the chosen one.
const START_ATTEMPTS: usize = 5;

/// Settings for a disposable cluster: loopback only, no durability.
const CONF: &str = "
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 100
log_min_messages = warning
";

/// A PostgreSQL cluster in a temporary directory, listening on a free 127.0.0.1 port with
/// trust authentication for the `postgres` role. Its Unix socket also lives in the
/// temporary directory. Dropping it stops the server (immediate mode) and deletes
/// everything.
///
/// When the tests run as root, `initdb`, `pg_ctl` and the server run as the `postgres` OS
/// user (through `runuser`), which owns the temporary directory.
#[derive(Debug)]
pub struct PgCluster {
    dir: TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    port: u16,
    running: bool,
}

impl PgCluster {
    /// Creates and starts a cluster. Uses the binaries in `SHARDPRESS_TEST_PG_BIN` when set,
    /// else `/usr/lib/postgresql/15/bin`.
    ///
    /// # Panics
    /// When the binaries are missing or the cluster cannot be created or started; the
    /// message includes the tool's output or the server log.
    pub fn start() -> PgCluster {
        let bin: PathBuf = match std::env::var_os("SHARDPRESS_TEST_PG_BIN") {
            Some(dir) if !dir.is_empty() => dir.into(),
            _ => DEFAULT_PG_BIN.into(),
        };
        if !bin.join("initdb").is_file() || !bin.join("pg_ctl").is_file() {
            panic!(
                "PostgreSQL binaries not found in {} (need initdb and pg_ctl); install \
                 PostgreSQL 15 or set SHARDPRESS_TEST_PG_BIN to its bin directory",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("shardpress-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let run_as = if running_as_root() {
            let (uid, gid) = os_user_ids(PG_OS_USER);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap_or_else(|e| {
                panic!("cannot hand {} to {PG_OS_USER}: {e}", dir.path().display())
            });
            Some(PG_OS_USER.to_string())
        } else {
            None
        };
        let mut cluster = PgCluster {
            dir,
            bin,
            run_as,
            port: 0,
            running: false,
        };
        cluster.init();
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = crate::free_port();
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(problem) if attempt < START_ATTEMPTS && problem.contains("in use") => {}
                Err(problem) => panic!("{problem}"),
            }
        }
        unreachable!("the last start attempt returns or panics")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this cluster (which may not exist yet).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the server is running (between a start and a [`PgCluster::stop`]).
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Creates database `name` (letters, digits and `_`) and returns its URL.
    ///
    /// # Panics
    /// On an invalid name or when `psql` fails.
    pub fn create_database(&self, name: &str) -> String {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            panic!("database name {name:?} must be letters, digits and '_'");
        }
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.database_url(name)
    }

    /// Runs `sql` with `psql` in `database` and returns its unaligned, tuples-only output.
    ///
    /// # Panics
    /// When `psql` fails; the message includes its error output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", database, "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        if !output.status.success() {
            panic!(
                "psql -c {sql:?} on port {} failed: {}",
                self.port,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Stops the server (fast mode: connections are closed, shutdown is clean). The data
    /// directory and port stay reserved for [`PgCluster::start_again`].
    ///
    /// # Panics
    /// When `pg_ctl stop` fails.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let output = self.pg_ctl(["stop", "-w", "-t", "60", "-m", "fast"]);
        if !output.status.success() {
            panic!(
                "pg_ctl stop failed: {}\nserver log:\n{}",
                String::from_utf8_lossy(&output.stderr).trim(),
                self.log()
            );
        }
        self.running = false;
    }

    /// Starts the server again after [`PgCluster::stop`], on the same port with the same
    /// data.
    ///
    /// # Panics
    /// When the server does not start (for example because the port was taken meanwhile).
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        if let Err(problem) = self.pg_ctl_start() {
            panic!("{problem}");
        }
    }

    /// [`PgCluster::stop`] then [`PgCluster::start_again`].
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// Runs `initdb` and appends the disposable-cluster settings.
    fn init(&self) {
        let data = self.data_dir();
        let output = self.run(
            &self.bin.join("initdb"),
            [
                OsStr::new("--no-sync"),
                OsStr::new("-A"),
                OsStr::new("trust"),
                OsStr::new("-U"),
                OsStr::new("postgres"),
                OsStr::new("-E"),
                OsStr::new("UTF8"),
                OsStr::new("--locale=C"),
                OsStr::new("-D"),
                data.as_os_str(),
            ],
        );
        if !output.status.success() {
            panic!(
                "initdb -D {} failed: {}{}",
                data.display(),
                String::from_utf8_lossy(&output.stderr).trim(),
                String::from_utf8_lossy(&output.stdout).trim()
            );
        }
        let socket_dir = self.socket_dir();
        let conf = format!(
            "{CONF}unix_socket_directories = '{}'\n",
            socket_dir.display()
        );
        let mut file = OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap_or_else(|e| panic!("cannot open postgresql.conf in {}: {e}", data.display()));
        file.write_all(conf.as_bytes())
            .unwrap_or_else(|e| panic!("cannot write postgresql.conf: {e}"));
        // The socket directory must belong to the server's user; initdb made `data` as that
        // user, so copy its owner.
        std::fs::create_dir(&socket_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", socket_dir.display()));
        if self.run_as.is_some() {
            let meta = std::fs::metadata(&data)
                .unwrap_or_else(|e| panic!("cannot stat {}: {e}", data.display()));
            std::os::unix::fs::chown(&socket_dir, Some(meta.uid()), Some(meta.gid()))
                .unwrap_or_else(|e| panic!("cannot chown {}: {e}", socket_dir.display()));
        }
    }

    /// `pg_ctl start` on `self.port`, waiting until the server accepts connections.
    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let options = format!("-p {}", self.port);
        let log = self.log_path();
        let output = self.pg_ctl([
            OsStr::new("start"),
            OsStr::new("-w"),
            OsStr::new("-t"),
            OsStr::new("60"),
            OsStr::new("-l"),
            log.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(&options),
        ]);
        if output.status.success() {
            self.running = true;
            return Ok(());
        }
        let log = self.log();
        let in_use = if log.contains("already in use") {
            " (port in use)"
        } else {
            ""
        };
        Err(format!(
            "pg_ctl start on port {}{in_use} failed: {}\nserver log:\n{log}",
            self.port,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }

    fn pg_ctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let data = self.data_dir();
        let mut all: Vec<&OsStr> = vec![OsStr::new("-D"), data.as_os_str()];
        let args: Vec<S> = args.into_iter().collect();
        all.extend(args.iter().map(AsRef::as_ref));
        self.run(&self.bin.join("pg_ctl"), all)
    }

    /// Runs a PostgreSQL tool, as the `postgres` OS user when we are root, from inside the
    /// temporary directory (the server's user may not be able to enter the current one).
    fn run<I, S>(&self, program: &Path, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST");
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let output = self.pg_ctl(["stop", "-w", "-t", "30", "-m", "immediate"]);
            if !output.status.success() {
                eprintln!(
                    "warning: pg_ctl stop failed for the test cluster in {}: {}",
                    self.dir.path().display(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
    }
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of OS user `name`, from /etc/passwd.
fn os_user_ids(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd")
        .unwrap_or_else(|e| panic!("cannot read /etc/passwd: {e}"));
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if let [user, _, uid, gid, ..] = fields.as_slice() {
            if *user == name {
                if let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) {
                    return (uid, gid);
                }
            }
        }
    }
    panic!(
        "running as root, but there is no {name:?} OS user to run PostgreSQL as (initdb \
         refuses root); create one or run the tests as an ordinary user"
    )
}
