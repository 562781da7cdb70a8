//! HumanEval problems, the prompt verdict asks with, code extraction from a chat reply, and the
//! sandboxed test run (a python subprocess in an empty directory, isolated mode, resource limits,
//! a wall-clock timeout that kills its whole process group).

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::models::chat::{ChatTemplate, Message};
use crate::models::tokenizer::Tokenizer;

/// Problems 0..82 train the judge; 82..164 are held out for evaluation (never mined).
pub const HELD_OUT_FROM: usize = 82;

#[derive(Debug, Clone, Deserialize)]
pub struct Problem {
    pub task_id: String,
    /// The function signature and docstring.
    pub prompt: String,
    /// Python defining `check(candidate)`.
    pub test: String,
    pub entry_point: String,
}

/// Reads `path` (`.jsonl` or `.jsonl.gz`, HumanEval's fields) and returns lines `range`.
pub fn load(path: &Path, range: std::ops::Range<usize>) -> Result<Vec<Problem>> {
    let f = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {} (run scripts/fetch-models humaneval)",
            path.display()
        )
    })?;
    let r: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    let mut out = Vec::new();
    for (i, line) in r.lines().enumerate() {
        let line =
            line.with_context(|| format!("{}: cannot read line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        if range.contains(&i) {
            let p: Problem = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{}: line {} is not a problem (task_id, prompt, test, entry_point)",
                    path.display(),
                    i + 1
                )
            })?;
            out.push(p);
        }
    }
    Ok(out)
}

/// The user message every verdict HumanEval run sends (bench, mining, evaluation).
pub fn user_message(prompt: &str) -> String {
    format!("Complete this Python function. Reply with code only.\n```python\n{prompt}```")
}

/// The problem as chat-templated token ids.
pub fn prompt_ids(p: &Problem, template: &ChatTemplate, tok: &Tokenizer) -> Result<Vec<u32>> {
    let text = template.render(&[Message::user(user_message(&p.prompt))], true)?;
    tok.encode(&text, true)
}

/// The program to test: the prompt, then the reply's first fenced code block (or the whole
/// reply: a full definition or only a body), then the tests and `check(entry_point)`.
pub fn program(p: &Problem, reply: &str) -> String {
    // Python refuses NUL bytes in source; a reply holding one is still judged on the rest.
    let reply = reply.replace('\0', "");
    let code = fenced_block(&reply).unwrap_or(&reply);
    // The prompt stays in front either way: its docstring-only stub is valid Python that a full
    // definition in the reply overrides, and it carries the imports and helper functions.
    let body = if code.contains(&format!("def {}", p.entry_point)) {
        format!("{}\n{code}", p.prompt)
    } else {
        format!("{}{code}", p.prompt)
    };
    format!("{body}\n\n{}\n\ncheck({})\n", p.test, p.entry_point)
}

/// The contents of the first ``` block (an unclosed block runs to the end).
fn fenced_block(s: &str) -> Option<&str> {
    let start = s.find("```")?;
    let rest = &s[start + 3..];
    let body = &rest[rest.find('\n')? + 1..];
    Some(match body.find("```") {
        Some(end) => &body[..end],
        None => body,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// The tests failed or the program did not run (the last lines of stderr).
    Fail(String),
    /// Killed at the time limit.
    Timeout,
}

/// The sandbox's limits.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    pub timeout: Duration,
    /// Address-space cap, bytes.
    pub memory: u64,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            timeout: Duration::from_secs(10),
            memory: 1 << 30,
        }
    }
}

/// Sets the limits, then runs the program read from stdin (so it never touches the filesystem).
const RUNNER: &str = r#"
import resource, sys
mem, cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
# Inherited by forks: a child that leaves the process group still dies.
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
src = sys.stdin.read()
g = {"__name__": "__main__"}
exec(compile(src, "<candidate>", "exec"), g)
"#;

impl Sandbox {
    /// Runs `program` with `python3` in a fresh empty directory and a cleared environment.
    pub fn run(&self, program: &str) -> Result<Outcome> {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().context("cannot create the sandbox directory")?;
        let mut child = Command::new("python3")
            .args([
                "-I",
                "-c",
                RUNNER,
                &self.memory.to_string(),
                &(self.timeout.as_secs() + 1).to_string(),
            ])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("cannot start python3 for the HumanEval tests (is python3 installed?)")?;
        if let Some(mut stdin) = child.stdin.take() {
            // A program that exits early closes the pipe: not an error of ours.
            let _ = stdin.write_all(program.as_bytes());
        }
        let mut stderr = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.take() {
                let _ = std::io::Read::read_to_string(&mut std::io::Read::take(e, 1 << 16), &mut s);
            }
            s
        });
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().context("waiting for the sandbox")? {
                break Some(s);
            }
            if start.elapsed() >= self.timeout {
                // The whole group: the candidate may have forked.
                // SAFETY: kill(2) with a negative pid signals the process group we created.
                unsafe {
                    libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let err = reader.join().unwrap_or_default();
        Ok(match status {
            None => Outcome::Timeout,
            Some(s) if s.success() => Outcome::Pass,
            Some(s) => {
                let tail: Vec<&str> = err.lines().rev().take(3).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Outcome::Fail(format!("{s}: {}", tail.join(" | ")))
            }
        })
    }
}

/// Checks that python3 runs at all (a clear error before a long run).
pub fn check_python() -> Result<()> {
    let ok = Command::new("python3")
        .args(["-I", "-c", "import resource"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        bail!("python3 with the `resource` module is needed to run the HumanEval tests");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            task_id: "t/0".into(),
            prompt:
                "from typing import List\n\ndef add(a: int, b: int) -> int:\n    \"\"\"Sum.\"\"\"\n"
                    .into(),
            test: "def check(candidate):\n    assert candidate(2, 3) == 5\n".into(),
            entry_point: "add".into(),
        }
    }

    #[test]
    fn extracts_code_and_runs_the_tests() {
        let p = problem();
        let sb = Sandbox::default();
        let good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n";
        assert_eq!(sb.run(&program(&p, good)).unwrap(), Outcome::Pass);
        // A body only: the prompt's signature is prepended.
        assert_eq!(
            sb.run(&program(&p, "    return a + b\n")).unwrap(),
            Outcome::Pass
        );
        let bad = "```python\ndef add(a, b):\n    return a - b\n```";
        assert!(
            matches!(sb.run(&program(&p, bad)).unwrap(), Outcome::Fail(m) if m.contains("AssertionError"))
        );
    }

    #[test]
    fn helpers_defined_by_the_prompt_stay_available() {
        let p = Problem {
            prompt:
                "def helper(x):\n    return x * 2\n\n\ndef twice(x):\n    \"\"\"Use helper.\"\"\"\n"
                    .into(),
            test: "def check(c):\n    assert c(4) == 8\n".into(),
            entry_point: "twice".into(),
            ..problem()
        };
        let reply = "```python\ndef twice(x):\n    return helper(x)\n```";
        assert_eq!(
            Sandbox::default().run(&program(&p, reply)).unwrap(),
            Outcome::Pass
        );
    }

    #[test]
    fn a_program_that_hangs_is_killed_at_the_timeout() {
        let p = problem();
        let sb = Sandbox {
            timeout: Duration::from_millis(500),
            ..Sandbox::default()
        };
        let hang = "```python\nimport os\nos.fork()\ndef add(a, b):\n    while True: pass\n```";
        let t = Instant::now();
        assert_eq!(sb.run(&program(&p, hang)).unwrap(), Outcome::Timeout);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_memory_bomb_fails_instead_of_taking_the_machine() {
        let p = problem();
        let bomb = "```python\nx = bytearray(1 << 34)\ndef add(a, b):\n    return a + b\n```";
        assert!(matches!(
            Sandbox::default().run(&program(&p, bomb)).unwrap(),
            Outcome::Fail(m) if m.contains("MemoryError")
        ));
    }
}
