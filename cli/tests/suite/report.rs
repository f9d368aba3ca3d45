//! The human reports of a real run: `shardpress report` prints what `compress` wrote, and
//! `report.html` renders in a real headless browser with its charts and no console errors.

// Test helpers outside #[test] functions fail loudly on broken fixtures.
#![allow(clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::cluster::{model_dir, BIN};

fn shardpress(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run shardpress")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chromium() -> String {
    std::env::var("SHARDPRESS_CHROMIUM")
        .ok()
        .filter(|v| !v.is_empty())
        .expect("SHARDPRESS_CHROMIUM is not set: run the suite with scripts/test.sh")
}

/// Runs headless Chromium on `page` with `args`; returns its stdout and stderr.
fn browse(profile: &Path, page: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium exited {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_report_of_a_real_run_prints_and_renders_in_chromium() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    ok(&shardpress(&[
        "compress".as_ref(),
        model_dir().as_os_str(),
        "--recipe".as_ref(),
        "w4a16".as_ref(),
        "--quiet".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]));
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("json");
    let transformed = report["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .filter(|t| t["action"] != "keep")
        .count();
    assert_eq!(transformed, 37, "the 37 linear weights of MiniLM");
    let groups = report["shards"].as_array().expect("shards").len();

    // `report DIR` prints the files the run wrote.
    let md = ok(&shardpress(&["report".as_ref(), out.as_os_str()]));
    assert_eq!(
        md,
        std::fs::read_to_string(out.join("report.md")).expect("md")
    );
    assert_eq!(md.matches("| quantize |").count(), 37, "{md}");
    let json = ok(&shardpress(&[
        "report".as_ref(),
        out.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]));
    assert_eq!(
        json.trim_end(),
        std::fs::read_to_string(out.join("report.json"))
            .expect("json")
            .trim_end()
    );
    let missing = shardpress(&["report".as_ref(), tmp.path().as_os_str()]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("report.json") && err.contains("finished compression"),
        "{err}"
    );

    // The page as the browser built it: three charts with a bar per layer group and series,
    // a bar and a point per transformed tensor, and no console messages.
    let page = out.join("report.html");
    let profile = tmp.path().join("profile");
    let (dom, log) = browse(&profile, &page, &["--dump-dom"]);
    for id in ["size-per-layer", "error-per-tensor", "error-vs-bits"] {
        assert!(
            dom.contains(&format!("<figure id=\"{id}\"")),
            "{id} missing"
        );
    }
    assert_eq!(
        dom.matches("class=\"bar\"").count(),
        2 * groups + transformed
    );
    assert_eq!(dom.matches("class=\"point\"").count(), transformed);
    assert_eq!(dom.matches("<tr>").count(), transformed + 1, "table rows");
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");

    // A screenshot of the rendered page: a PNG of the window's size.
    let shot = tmp.path().join("report.png");
    let (_, log) = browse(
        &profile,
        &page,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1000,2600",
            "--hide-scrollbars",
        ],
    );
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let png = std::fs::read(&shot).expect("screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!((be(16), be(20)), (1000, 2600), "IHDR width and height");
    assert!(
        png.len() > 50_000,
        "a page with charts, not a blank one: {} bytes",
        png.len()
    );
}
