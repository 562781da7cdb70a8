//! Shared by the HTTP tests: start the real `verdict serve` binary on a free port, and talk to
//! it with raw HTTP/1.1 over std's TcpStream (so every byte the server sends is checked).

#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use serde_json::Value;
use tokio_rustls::rustls::{ClientConfig, ClientConnection, StreamOwned, pki_types::ServerName};
use verdict::models::testing::{TinySpec, write_tiny_gguf};

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
    /// A server started with `--ssl-certfile`: how requests reach it.
    pub tls: Option<Arc<ClientConfig>>,
    _dir: Option<tempfile::TempDir>,
}

/// The Python with the `openai` and `anthropic` packages: $VERDICT_TEST_PYTHON, default
/// ~/.cache/verdict/peer-venv/bin/python.
pub fn python() -> PathBuf {
    std::env::var_os("VERDICT_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/verdict/peer-venv/bin/python")
        })
}

/// A tiny random target (and, with `draft`, a tiny draft with the same tokenizer) in `dir`.
pub fn tiny_models(dir: &Path, context: usize) -> (PathBuf, PathBuf) {
    tiny_models_of(dir, context, TinySpec::default().dtype)
}

/// [`tiny_models`] with weights of `dtype` (Q8_0: every forward row-exact whatever the batch).
pub fn tiny_models_of(
    dir: &Path,
    context: usize,
    dtype: candle_core::quantized::GgmlDType,
) -> (PathBuf, PathBuf) {
    let target = dir.join("tiny-target.gguf");
    let draft = dir.join("tiny-draft.gguf");
    let spec = TinySpec {
        context_length: context,
        dtype,
        ..TinySpec::default()
    };
    write_tiny_gguf(&target, &spec).expect("write tiny target");
    let dspec = TinySpec {
        seed: 1,
        layers: 1,
        ..spec
    };
    write_tiny_gguf(&draft, &dspec).expect("write tiny draft");
    (target, draft)
}

impl Server {
    /// Starts `verdict serve --port 0 ARGS...` and waits until `/ready` answers 200.
    pub fn start(args: &[&str], dir: Option<tempfile::TempDir>, log_dir: &Path) -> Server {
        Server::start_with(args, dir, log_dir, None)
    }

    /// [`Server::start`] of a server that speaks HTTPS (its args set `--ssl-certfile`...);
    /// requests go through `tls`.
    pub fn start_with(
        args: &[&str],
        dir: Option<tempfile::TempDir>,
        log_dir: &Path,
        tls: Option<Arc<ClientConfig>>,
    ) -> Server {
        let log = log_dir.join(format!(
            "server-{}.log",
            std::process::id() as u64 * 1000 + rand_suffix()
        ));
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_verdict"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn verdict serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    let scheme = if tls.is_some() { "https" } else { "http" };
                    let line = format!("verdict: listening on {scheme}://");
                    if let Some(a) = l.strip_prefix(&line) {
                        break a.trim().to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!(
                        "verdict serve exited before listening:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let s = Server {
            child,
            addr,
            log,
            tls,
            _dir: dir,
        };
        let t0 = Instant::now();
        loop {
            if let Ok(r) = s.try_request("GET", "/ready", &[], b"")
                && r.status == 200
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "server not ready after 120 s:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        s
    }

    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        if let Some(config) = &self.tls {
            let name = ServerName::try_from("localhost").unwrap();
            let conn =
                ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
            let mut tls = StreamOwned::new(conn, s);
            write_request(&mut tls, method, path, headers, body)?;
            let mut raw = Vec::new();
            // A server that closes without TLS's close_notify still sent its whole answer.
            match tls.read_to_end(&mut raw) {
                Err(e) if raw.is_empty() => return Err(e),
                _ => return Ok(parse_response(&raw)),
            }
        }
        let mut w = s.try_clone()?;
        // The server may answer (413) and close before the whole body is sent: write on the
        // side, and keep whatever response arrived even if the connection is then reset.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let _ = write_request(&mut w, method, path, headers, body);
            });
            let mut raw = Vec::new();
            let mut buf = [0u8; 16384];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                    Err(e) if raw.windows(4).any(|w| w == b"\r\n\r\n") => {
                        let _ = e;
                        break;
                    }
                    Err(e) => {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                        return Err(e);
                    }
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Both);
            Ok(parse_response(&raw))
        })
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.try_request(method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nserver log:\n{}", self.log_text()))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// Opens a streaming request and returns the reader positioned after the headers.
    pub fn open_stream(&self, path: &str, body: &Value) -> SseStream {
        let mut s = self.connect();
        write_request(
            &mut s,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .expect("send");
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        r.read_line(&mut status_line).expect("status line");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).expect("header");
            let l = l.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        SseStream {
            status,
            headers,
            r,
            buf: String::new(),
        }
    }

    /// The value of a metric line `name{labels} value` (labels must match exactly as a
    /// substring), or 0 when absent.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == name_and_labels)
                    .then(|| v.parse::<f64>().ok())
                    .flatten()
            })
            .unwrap_or(0.0)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -TERM failed");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn write_request(
    s: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }
}

/// Parses a whole HTTP/1.1 response (Content-Length or chunked).
pub fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// A server-sent-event stream read incrementally (chunked transfer encoding).
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    r: BufReader<TcpStream>,
    buf: String,
}

impl SseStream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Reads one chunk of the chunked body; None at the end.
    fn read_chunk(&mut self) -> Option<String> {
        let mut size_line = String::new();
        if self.r.read_line(&mut size_line).ok()? == 0 {
            return None;
        }
        let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            return None;
        }
        let mut data = vec![0u8; size + 2];
        self.r.read_exact(&mut data).ok()?;
        data.truncate(size);
        Some(String::from_utf8_lossy(&data).into_owned())
    }

    /// The next event's data (`[DONE]` included); None when the stream ends.
    pub fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<Vec<_>>()
                    .join("\n");
                return Some(data);
            }
            let c = self.read_chunk()?;
            self.buf.push_str(&c);
        }
    }

    /// Every remaining event.
    pub fn collect(mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(e) = self.next_event() {
            v.push(e);
        }
        v
    }
}

/// Concatenated text of streamed chunks (completions `text` or chat `delta.content`), the final
/// chunk (with finish_reason), and whether `[DONE]` ended the stream.
pub fn stream_text(events: &[String]) -> (String, Option<Value>, bool) {
    let mut text = String::new();
    let mut last = None;
    let mut done = false;
    for e in events {
        if e == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("bad event {e}: {err}"));
        if let Some(c) = v["choices"].get(0) {
            if let Some(t) = c["text"].as_str() {
                text.push_str(t);
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if !c["finish_reason"].is_null() {
                last = Some(v.clone());
            }
        }
    }
    (text, last, done)
}

/// The policy tests' hostile guest (tests/hostile-policy) built with `features`. Versions:
/// 1.0.0, or 2.0.0 with `v2`; with mode 0 it accepts min(k, tag) drafts and corrects with token
/// `tag` (1, or 2 with v2).
#[allow(unused_imports)] // not every test binary that includes this module uses it
pub use common::hostile as hostile_guest;
