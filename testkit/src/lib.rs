//! Real services for Shardpress tests: a throwaway PostgreSQL cluster ([`PgCluster`]) and an
//! S3-compatible server ([`S3Server`], the `s3s-fs` binary installed by
//! `scripts/s3-server.sh`).
//!
//! Both start synchronously, listen on 127.0.0.1 only, keep all their files in a temporary
//! directory, and stop when dropped. Helpers that talk S3 are async, for `#[tokio::test]`
//! (use `flavor = "multi_thread"` when the code under test blocks on the runtime, as the
//! storage crate's synchronous adapters do). Setup failures panic with a message saying
//! what to fix: this crate is only for tests. [`FaultProxy`] sits between a client and an
//! [`S3Server`] and injects storage faults.

mod pg;
mod proxy;
mod s3;

mod checkpoint;
pub use checkpoint::write_f32_checkpoint;
pub mod hostile;
pub mod llama;
pub use pg::PgCluster;
pub use proxy::{Fault, FaultProxy, RequestKind};
pub use s3::{S3Server, ACCESS_KEY, REGION, SECRET_KEY};

use std::net::TcpListener;

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .unwrap_or_else(|e| panic!("cannot bind a loopback port to find a free one: {e}"));
    match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(e) => panic!("cannot read the address of a loopback listener: {e}"),
    }
}

/// The cache root shared with the scripts: `$SHARDPRESS_CACHE`, else
/// `$HOME/.cache/shardpress`.
fn cache_dir() -> std::path::PathBuf {
    match std::env::var_os("SHARDPRESS_CACHE") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
            std::path::Path::new(&home).join(".cache/shardpress")
        }
    }
}

/// Puts the fixed test credentials and region into this process's environment, once, for code
/// under test that reads the standard AWS variables. Call it first in a test, before starting
/// anything: the environment must not change while other threads may be reading it, and the
/// `Once` makes every later caller wait until it is set.
pub fn use_test_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_REGION", REGION),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ] {
            std::env::set_var(k, v);
        }
    });
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each `seed`.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}
