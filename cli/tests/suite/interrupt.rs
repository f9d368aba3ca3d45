//! Ctrl-C during `shardpress compress`: the run stops, removes its hidden staging directory and
//! leaves the output path as it was.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardpress_testkit::llama::{write_llama, Dims};

const BIN: &str = env!("CARGO_BIN_EXE_shardpress");

/// Enough matrices that one thread with the mse observer runs for seconds.
const DIMS: Dims = Dims {
    hidden: 512,
    heads: 16,
    kv_heads: 8,
    head_dim: 32,
    intermediate: 2048,
    layers: 24,
    vocab: 4096,
};

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect()
}

#[test]
fn an_interrupted_compress_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).expect("mkdir");
    write_llama(&model, &DIMS);
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    // An earlier output that an --overwrite run must keep when interrupted.
    let out = work.join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("keep.txt"), "earlier output").expect("write");
    let mut child = Command::new(BIN)
        .args([
            "compress",
            &model.to_string_lossy(),
            "--recipe",
            "w8a16-mse",
        ])
        .args(["--out", &out.to_string_lossy(), "--overwrite", "--quiet"])
        .args(["--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the staging directory exists, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(60);
    while partials(&work).is_empty() {
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "compress ended before it started writing"
        );
        assert!(Instant::now() < deadline, "no staging directory appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        partials(&work).is_empty(),
        "staging left: {:?}",
        partials(&work)
    );
    let left: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["keep.txt".to_string()], "the old output changed");
}
