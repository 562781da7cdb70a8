//! Builds the built-in policies (plugins/strict, judge, threshold) for wasm32-wasip2 with a
//! nested cargo and embeds them (host/decide/builtin.rs). Without the wasm target the server
//! still builds: it warns here and reports a clear error when a built-in is requested.
//!
//! With the `cuda` feature only (scripts/build-cuda sets the environment): compiles kernels/*.cu
//! to PTX with nvcc and links the CUDA runtime statically (see `cuda_build`).

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

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_build(&manifest_dir, &out_dir);
    }

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
    // scripts/build-cuda builds with a patched candle-core (`--config patch...`): the nested
    // cargo resolves the same workspace, so it gets the same patch, or it would rewrite
    // Cargo.lock back under the outer build.
    println!("cargo:rerun-if-env-changed=VERDICT_NESTED_CARGO_CONFIG");
    if let Some(config) = std::env::var_os("VERDICT_NESTED_CARGO_CONFIG") {
        cmd.arg("--config").arg(config);
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

/// The `cuda` feature's build steps.
///
/// 1. kernels/*.cu -> `$OUT_DIR/<name>.ptx` with nvcc (warnings are errors), embedded by
///    host/verify/cuda.rs and loaded with cudarc at run time. PTX for compute_$CUDA_COMPUTE_CAP
///    (default 90: H100/H200); the driver JIT-compiles it for the GPU it runs on.
/// 2. candle-kernels' quantized-matmul objects ask the linker for `cudart`; the CUDA runtime from
///    pip ships only `libcudart.so.13`. A one-line linker script named `libcudart.so` in OUT_DIR
///    pulls in `libcudart_static.a` instead, so the binary needs no CUDA library to start (cudarc
///    dlopens the driver and the rest where it runs).
fn cuda_build(manifest_dir: &Path, out_dir: &Path) {
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP", "NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let cuda_home = std::env::var_os("CUDA_HOME")
        .or_else(|| std::env::var_os("CUDA_PATH"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "the cuda feature needs CUDA_HOME (the CUDA toolkit root); \
                 scripts/build-cuda installs one from pip and sets it"
            )
        });

    // 1. kernels -> PTX
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .unwrap_or_else(|| cuda_home.join("bin/nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.trim().replace('.', "");
    assert!(
        !cap.is_empty() && cap.chars().all(|c| c.is_ascii_digit()),
        "CUDA_COMPUTE_CAP must be like 90 or 8.9, got {cap:?}"
    );
    let kernels = manifest_dir.join("kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", kernels.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        let stem = src.file_stem().expect("a .cu file has a name");
        let ptx = out_dir.join(stem).with_extension("ptx");
        let out = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=compute_{cap}"))
            .args(["-O3", "-std=c++17", "-Werror", "all-warnings", "-o"])
            .arg(&ptx)
            .arg(src)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nvcc ({}): {e}; scripts/build-cuda installs it",
                    nvcc.display()
                )
            });
        assert!(
            out.status.success(),
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // 2. the static CUDA runtime behind the name `cudart`
    let static_rt = ["lib", "lib64"]
        .iter()
        .map(|d| cuda_home.join(d).join("libcudart_static.a"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "libcudart_static.a is not in {}/lib or lib64 (pip package nvidia-cuda-runtime)",
                cuda_home.display()
            )
        });
    let dir = out_dir.join("cudart-link");
    std::fs::create_dir_all(&dir).expect("cannot create OUT_DIR/cudart-link");
    let script = format!("INPUT ( {} )\n", static_rt.display());
    let so = dir.join("libcudart.so");
    if std::fs::read_to_string(&so).ok().as_deref() != Some(script.as_str()) {
        std::fs::write(&so, script).expect("cannot write OUT_DIR/cudart-link/libcudart.so");
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
    for lib in ["rt", "dl", "pthread"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
