//! The official `openai` Python package against a running `verdict serve` (tiny models written
//! by the test), behind an API key: completions, chat and responses, streamed and not, verdict's
//! fields via `extra_body`.
//! Python: $VERDICT_TEST_PYTHON, default ~/.cache/verdict/peer-venv/bin/python (has openai).

mod http_common;

use std::path::PathBuf;
use std::process::Command;

use http_common::{Server, tiny_models};

fn python() -> PathBuf {
    std::env::var_os("VERDICT_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/verdict/peer-venv/bin/python")
        })
}

#[test]
fn official_openai_client() {
    let dir = tempfile::tempdir().unwrap();
    let (target, draft) = tiny_models(dir.path(), 256);
    let log_dir = dir.path().to_path_buf();
    let (t, d) = (target.display().to_string(), draft.display().to_string());
    let s = Server::start(
        &["--model", &t, "--draft", &d, "--api-key", "sk-test-key"],
        Some(dir),
        &log_dir,
    );
    let py = python();
    let out = Command::new(&py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .arg(s.url())
        .arg("tiny-target")
        .arg("sk-test-key")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set VERDICT_TEST_PYTHON): {e}", py.display()));
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("all checks passed"));
}
