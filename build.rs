//! Builds the built-in policies (plugins/strict, judge, threshold) for wasm32-wasip2 with a
//! nested cargo and embeds them (host/decide/builtin.rs). Without the wasm target the server
//! still builds: it warns here and reports a clear error when a built-in is requested.

use std::path::{Path, PathBuf};
use std::process::Command;

const PLUGINS: [(&str, &str); 3] = [
    ("strict", "verdict-policy-strict"),
    ("judge", "verdict-policy-judge"),
    ("threshold", "verdict-policy-threshold"),
];
const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "wasm-plugin";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    println!("cargo:rerun-if-changed=plugins");
    println!("cargo:rerun-if-changed=wit");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-env-changed=VERDICT_SKIP_PLUGINS");
    // The scaffold of `verdict policy new` points at this checkout's SDK by default.
    println!(
        "cargo:rustc-env=VERDICT_SDK_DIR={}",
        manifest_dir.join("plugins/sdk").display()
    );
    println!(
        "cargo:rustc-env=VERDICT_WIT_DIR={}",
        manifest_dir.join("wit").display()
    );

    let result = if std::env::var_os("VERDICT_SKIP_PLUGINS").is_some() {
        Err("VERDICT_SKIP_PLUGINS is set".to_string())
    } else {
        build_plugins(&manifest_dir, &out_dir)
    };
    let generated = match result {
        Ok(files) => {
            let entries: String = files
                .iter()
                .map(|(name, path)| format!("    ({name:?}, include_bytes!({:?})),\n", path))
                .collect();
            format!(
                "/// (name, component) of each built-in policy.\n\
                 pub(crate) const BUILT: &[(&str, &[u8])] = &[\n{entries}];\n\
                 pub(crate) const MISSING_REASON: &str = \"\";\n"
            )
        }
        Err(reason) => {
            println!("cargo:warning=built-in policies not compiled in: {reason}");
            format!(
                "pub(crate) const BUILT: &[(&str, &[u8])] = &[];\n\
                 pub(crate) const MISSING_REASON: &str = {reason:?};\n"
            )
        }
    };
    let dest = out_dir.join("builtin_policies.rs");
    if std::fs::read_to_string(&dest).ok().as_deref() != Some(generated.as_str()) {
        std::fs::write(&dest, generated).expect("cannot write builtin_policies.rs in OUT_DIR");
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("cargo did not set {key}"))
}

fn build_plugins(manifest_dir: &Path, out_dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run {rustc}: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let target_lib = sysroot.join("lib/rustlib").join(TARGET);
    if !target_lib.exists() {
        // A path that does not exist makes cargo rerun this script on every build, so the
        // plugins get built as soon as the target is installed.
        println!("cargo:rerun-if-changed={}", target_lib.display());
        return Err(format!("the {TARGET} target is not installed"));
    }
    println!("cargo:rerun-if-changed={}", target_lib.display());

    let target_dir = wasm_target_dir(out_dir);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest_dir)
        .args([
            "build",
            "--target",
            TARGET,
            "--profile",
            PROFILE,
            "--target-dir",
        ])
        .arg(&target_dir);
    for (_, package) in PLUGINS {
        cmd.args(["-p", package]);
    }
    // The host's flags (target-cpu=native, coverage, clippy's wrapper...) are not for wasm.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_LLVM_COV",
        "RUSTC_BOOTSTRAP",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_FEATURE_") || k.starts_with("CARGO_CFG_") {
            cmd.env_remove(&key);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run the nested cargo build: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if std::env::var_os("VERDICT_REQUIRE_PLUGINS").is_some() {
            panic!(
                "building the built-in policies failed:\n{}",
                tail.join("\n")
            );
        }
        return Err(format!(
            "`cargo build --target {TARGET}` of plugins/ failed: {}",
            tail.join(" | ")
        ));
    }
    let dir = target_dir.join(TARGET).join(PROFILE);
    PLUGINS
        .iter()
        .map(|(name, package)| {
            let path = dir.join(format!("{}.wasm", package.replace('-', "_")));
            if path.exists() {
                Ok((name.to_string(), path))
            } else {
                Err(format!("{} was not produced", path.display()))
            }
        })
        .collect()
}

/// `<target dir>/wasm-plugins`, found from OUT_DIR = `<target dir>/<profile>/build/<pkg>/out`
/// (or `<target dir>/<triple>/<profile>/build/...`).
fn wasm_target_dir(out_dir: &Path) -> PathBuf {
    let mut dir = out_dir;
    while let Some(parent) = dir.parent() {
        if dir.file_name().is_some_and(|n| n == "build") {
            // parent = <profile>; its parent is the target dir (or <triple> under it).
            if let Some(profile_parent) = parent.parent() {
                let target = std::env::var("TARGET").unwrap_or_default();
                let is_triple_dir = profile_parent.file_name().is_some_and(|n| *n == *target);
                let base = if is_triple_dir {
                    profile_parent.parent().unwrap_or(profile_parent)
                } else {
                    profile_parent
                };
                return base.join("wasm-plugins");
            }
        }
        dir = parent;
    }
    out_dir.join("wasm-plugins")
}
