//! The official `openai` and `anthropic` Python packages against a running `verdict serve` (tiny
//! models written by the test), behind an API key: completions, chat, responses and Anthropic's
//! messages, streamed and not, verdict's fields via `extra_body`, a reasoning model's thinking
//! (`--reasoning-parser`) as each client reads it; tool calls through the
//! `anthropic` client on the real Qwen2.5-Coder-0.5B (the tiny template has no tools).
//! Python: $VERDICT_TEST_PYTHON, default ~/.cache/verdict/peer-venv/bin/python (has openai).

mod http_common;

use std::path::PathBuf;
use std::process::Command;

use http_common::{Server, python, tiny_models};

#[test]
fn official_openai_client() {
    let dir = tempfile::tempdir().unwrap();
    let (target, draft) = tiny_models(dir.path(), 256);
    let log_dir = dir.path().to_path_buf();
    let (t, d) = (target.display().to_string(), draft.display().to_string());
    // A LoRA module the client chooses by name.
    let adapter = dir.path().join("adapter.gguf");
    let lora = verdict::models::testing::TinyLora::small(9);
    let spec = verdict::models::testing::TinySpec::default();
    verdict::models::testing::write_tiny_lora_gguf(&adapter, &spec, &lora).unwrap();
    let module = format!("tiny-ad={}", adapter.display());
    let s = Server::start(
        &[
            "--model",
            &t,
            "--draft",
            &d,
            "--api-key",
            "sk-test-key",
            "--reasoning-parser",
            "qwen3",
            "--lora-modules",
            &module,
        ],
        Some(dir),
        &log_dir,
    );
    run_client(
        &s,
        "openai_client.py",
        &["tiny-target", "sk-test-key", "tiny-ad"],
    );
    run_client(&s, "anthropic_client.py", &["tiny-target", "sk-test-key"]);
}

/// Runs `tests/SCRIPT URL ARGS...` with the test Python; it must print "all checks passed".
fn run_client(s: &Server, script: &str, args: &[&str]) {
    let py = python();
    let out = Command::new(&py)
        .arg(format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg(s.url())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set VERDICT_TEST_PYTHON): {e}", py.display()));
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}

#[test]
fn official_anthropic_client_calls_a_tool() {
    let models = std::env::var_os("VERDICT_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/verdict/models")
        });
    let m = models.join("qwen2.5-coder-0.5b.gguf").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().to_path_buf();
    let s = Server::start(
        &[
            "--model",
            &m,
            "--draft",
            "prompt-lookup",
            "--api-key",
            "sk-real",
        ],
        Some(dir),
        &log_dir,
    );
    run_client(
        &s,
        "anthropic_client.py",
        &["qwen2.5-coder-0.5b", "sk-real", "tools"],
    );
}
