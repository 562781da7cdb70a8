//! Shared by integration tests: building test-only policy components for wasm32-wasip2.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The cargo target dir the tests were built in.
pub fn target_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// A cargo command for a wasm32-wasip2 build: the host's flags and target dir must not leak in.
pub fn cargo_wasm() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for v in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// The hostile test guest (tests/hostile-policy) built with `features`, cached per process.
/// Its `mode` parameter picks the misbehaviour per call (see its source).
pub fn hostile(features: &str) -> Vec<u8> {
    static CACHE: Mutex<BTreeMap<String, Vec<u8>>> = Mutex::new(BTreeMap::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = cache.get(features) {
        return w.clone();
    }
    // Same target dir and profile as build.rs: the SDK and wit-bindgen are already built there.
    let dir = target_root().join("wasm-plugins");
    let mut cmd = cargo_wasm();
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--target",
            "wasm32-wasip2",
            "--profile",
            "wasm-plugin",
        ])
        .arg("--target-dir")
        .arg(&dir)
        .args(["-p", "verdict-test-hostile-policy"]);
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    let out = cmd.output().expect("cannot run cargo");
    assert!(
        out.status.success(),
        "building the hostile guest ({features}) failed (is the wasm32-wasip2 target installed? \
         `rustup target add wasm32-wasip2`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wasm =
        std::fs::read(dir.join("wasm32-wasip2/wasm-plugin/verdict_test_hostile_policy.wasm"))
            .expect("hostile wasm");
    cache.insert(features.to_string(), wasm.clone());
    wasm
}
