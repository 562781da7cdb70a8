//! OpenAI's Batch API and `verdict run-batch`: a JSONL file of requests, each line
//! `{"custom_id", "method": "POST", "url", "body"}`, every line run through the route a
//! client's request would take, the answers written as JSONL lines of `{"id", "custom_id",
//! "response": {"status_code", "request_id", "body"}, "error"}` (OpenAI's output format;
//! `error` names why a line failed, or why it never got an answer: cancelled, expired).
//!
//! The server keeps uploaded files (`/v1/files`) and batches (`/v1/batches`) in memory, bounded
//! by `--max-file-store-bytes`, and with `--batch-dir` on disk too ([`Disk`]): a restart lists
//! them again and goes on with the batches still running. Batch lines' generations hold at
//! most `workers` slots at once across all batches ([`Gate`]), so interactive requests keep
//! their share of the workers; a line the queue refuses (429) waits and tries again.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use hyper::StatusCode;
use serde_json::{Map, Value, json};

use super::error::ApiError;

/// The routes a batch may call: OpenAI's batchable ones that verdict serves, and vLLM's
/// `/v1/score` and `/v1/rerank` (its `run_batch` takes them).
pub const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/score",
    "/v1/rerank",
    // vLLM's other names for them.
    "/score",
    "/rerank",
    "/v2/rerank",
];

/// The route of an Anthropic message batch's requests (`/v1/messages/batches`); a batch file's
/// line may name it too (`verdict run-batch`).
pub const MESSAGES: &str = "/v1/messages";

/// Requests per file (OpenAI's limit).
pub const MAX_REQUESTS: usize = 50_000;

/// Line errors a failed validation reports (the first ones).
const MAX_ERRORS: usize = 100;

/// The only `completion_window` (OpenAI's too); a batch unfinished by then expires.
pub const COMPLETION_WINDOW: &str = "24h";
const WINDOW_SECS: u64 = 24 * 3600;

/// A file's purpose for batch input; outputs are `batch_output`.
pub const PURPOSE: &str = "batch";

/// One request of a batch file.
#[derive(Debug, Clone)]
pub struct Line {
    pub custom_id: String,
    pub url: String,
    /// The generations it asks for (prompts times `n` or `best_of`): the share of the workers
    /// it takes.
    pub jobs: usize,
    /// The line as the file holds it (a slice of the file's bytes, shared by every batch of
    /// that file).
    raw: Bytes,
}

impl Line {
    /// The request body, as JSON (read again from the line, which parsed when it was checked).
    pub fn body(&self) -> Bytes {
        let v: Value = serde_json::from_slice(&self.raw).unwrap_or_default();
        Bytes::from(serde_json::to_vec(&v["body"]).unwrap_or_default())
    }
}

/// Why a batch file was refused, in OpenAI's `errors.data` shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based; `None` for the whole file.
    pub line: Option<usize>,
    pub code: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
}

impl LineError {
    fn file(code: &'static str, message: impl Into<String>) -> Self {
        LineError {
            line: None,
            code,
            param: None,
            message: message.into(),
        }
    }

    pub fn json(&self) -> Value {
        json!({"code": self.code, "message": self.message, "param": self.param, "line": self.line})
    }
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Reads a batch file: every line a request (blank lines skipped), `custom_id`s distinct, every
/// `url` a batchable route (`endpoint`'s when given), no streaming. All or nothing: any bad line
/// refuses the file, with the first errors.
pub fn parse_input(data: &Bytes, endpoint: Option<&str>) -> Result<Vec<Line>, Vec<LineError>> {
    parse_at_most(data, endpoint, MAX_REQUESTS)
}

/// [`parse_input`] with another limit on requests (`verdict run-batch` has none).
pub fn parse_at_most(
    data: &Bytes,
    endpoint: Option<&str>,
    max_requests: usize,
) -> Result<Vec<Line>, Vec<LineError>> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Err(vec![LineError::file(
            "invalid_file",
            "the file is not UTF-8 text",
        )]);
    };
    // A byte-order mark (Windows editors write one) is not part of the first line.
    let bom = if text.starts_with('\u{feff}') { 3 } else { 0 };
    let (mut lines, mut errors, mut ids) = (Vec::new(), Vec::new(), HashSet::new());
    let mut start = bom;
    for (i, piece) in text[bom..].split('\n').enumerate() {
        let at = start;
        start += piece.len() + 1;
        let raw = piece.trim();
        if raw.is_empty() {
            continue;
        }
        let lead = piece.len() - piece.trim_start().len();
        let raw_bytes = data.slice(at + lead..at + lead + raw.len());
        if errors.len() == MAX_ERRORS {
            break;
        }
        if lines.len() == max_requests {
            errors.push(LineError::file(
                "too_many_requests",
                format!("the file holds more than {max_requests} requests"),
            ));
            break;
        }
        match parse_line(raw, endpoint, &mut ids) {
            Ok((custom_id, url, jobs)) => lines.push(Line {
                custom_id,
                url,
                jobs,
                raw: raw_bytes,
            }),
            Err((code, param, message)) => errors.push(LineError {
                line: Some(i + 1),
                code,
                param,
                message,
            }),
        }
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push(LineError::file("empty_file", "the file holds no requests"));
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

type Refusal = (&'static str, Option<&'static str>, String);

/// Every `code` and `param` a [`LineError`] holds (a batch read back from disk takes them from
/// here).
const CODES: &[&str] = &[
    "invalid_file",
    "lines_lost",
    "too_many_requests",
    "empty_file",
    "invalid_json_line",
    "invalid_request",
    "invalid_custom_id",
    "missing_required_parameter",
    "invalid_method",
    "invalid_url",
    "mismatched_url",
    "invalid_body",
    "duplicate_custom_id",
];
const PARAMS: &[&str] = &["custom_id", "method", "url", "body", "body.stream"];

/// A line's `custom_id`, `url` and generations.
fn parse_line(
    raw: &str,
    endpoint: Option<&str>,
    ids: &mut HashSet<String>,
) -> Result<(String, String, usize), Refusal> {
    let v: Value = serde_json::from_str(raw)
        .map_err(|e| ("invalid_json_line", None, format!("not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(("invalid_json_line", None, "not a JSON object".into()));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !["custom_id", "method", "url", "body"].contains(&k.as_str()))
    {
        return Err((
            "invalid_request",
            None,
            format!("unknown field {k:?} (a line holds custom_id, method, url and body)"),
        ));
    }
    let custom_id = match o.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err((
                "invalid_custom_id",
                Some("custom_id"),
                "custom_id is empty".into(),
            ));
        }
        Some(_) => {
            return Err((
                "invalid_custom_id",
                Some("custom_id"),
                "custom_id must be a string".into(),
            ));
        }
        None => {
            return Err((
                "missing_required_parameter",
                Some("custom_id"),
                "custom_id is missing".into(),
            ));
        }
    };
    match o.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        Some(m) => {
            return Err((
                "invalid_method",
                Some("method"),
                format!("method must be \"POST\", got {m}"),
            ));
        }
        None => {
            return Err((
                "missing_required_parameter",
                Some("method"),
                "method is missing (\"POST\")".into(),
            ));
        }
    }
    let url = match o.get("url") {
        Some(Value::String(u)) => u.clone(),
        Some(_) => return Err(("invalid_url", Some("url"), "url must be a string".into())),
        None => {
            return Err((
                "missing_required_parameter",
                Some("url"),
                "url is missing".into(),
            ));
        }
    };
    if !ENDPOINTS.contains(&url.as_str()) && url != MESSAGES {
        return Err((
            "invalid_url",
            Some("url"),
            format!(
                "url {url:?} cannot be batched (one of {})",
                ENDPOINTS.join(", ")
            ),
        ));
    }
    if let Some(ep) = endpoint.filter(|ep| *ep != url) {
        return Err((
            "mismatched_url",
            Some("url"),
            format!("url is {url:?} but the batch's endpoint is {ep:?}"),
        ));
    }
    let jobs = match o.get("body") {
        Some(Value::Object(m)) => {
            if m.get("stream") == Some(&Value::Bool(true)) {
                return Err((
                    "invalid_body",
                    Some("body.stream"),
                    "body.stream must be false: a batch answers each request whole".into(),
                ));
            }
            jobs(&url, m)
        }
        Some(_) => {
            return Err((
                "invalid_body",
                Some("body"),
                "body must be a JSON object (the request)".into(),
            ));
        }
        None => {
            return Err((
                "missing_required_parameter",
                Some("body"),
                "body is missing".into(),
            ));
        }
    };
    if !ids.insert(custom_id.clone()) {
        return Err((
            "duplicate_custom_id",
            Some("custom_id"),
            format!("custom_id {custom_id:?} is used by an earlier line"),
        ));
    }
    Ok((custom_id, url, jobs))
}

/// The generations a request starts: each prompt's `n` (or `best_of`) for completions, `n` for
/// chat, one otherwise. (The route checks the values; this only sizes the line's share.)
fn jobs(url: &str, body: &Map<String, Value>) -> usize {
    // (Clamped: the route refuses such values; the share only needs to be "all of them".)
    let count = |k: &str| {
        body.get(k)
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .clamp(1, 1 << 20) as usize
    };
    match url {
        "/v1/completions" => {
            let prompts = match body.get("prompt") {
                // Several prompts: strings or token arrays (an array of ids is one prompt).
                Some(Value::Array(a)) if a.iter().any(|p| !p.is_number()) => a.len().max(1),
                _ => 1,
            };
            prompts.saturating_mul(count("n").max(count("best_of")))
        }
        "/v1/chat/completions" => count("n"),
        _ => 1,
    }
}

/// Whose Batch API a batch belongs to: it decides the batch's object, its ids and how its
/// results read (OpenAI's output and error files; Anthropic's one results file,
/// [`super::message_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
}

impl Api {
    /// Requests a batch may hold.
    pub fn max_requests(self) -> usize {
        match self {
            Api::OpenAi => MAX_REQUESTS,
            Api::Anthropic => super::message_batch::MAX_REQUESTS,
        }
    }

    /// The outcome of a line its route answered.
    pub fn answered(self, custom_id: &str, a: Answer) -> Outcome {
        match self {
            Api::OpenAi => answered(custom_id, a),
            Api::Anthropic => super::message_batch::answered(custom_id, a),
        }
    }

    /// The outcome of a line that got no answer.
    fn stopped(self, custom_id: &str, why: Stop) -> Outcome {
        match self {
            Api::OpenAi => stopped(custom_id, why),
            Api::Anthropic => super::message_batch::stopped(custom_id, why),
        }
    }
}

/// A route's answer to one line.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

/// Why lines stopped being run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancelled,
    Expired,
    /// The server is stopping: the batch does not end (with `--batch-dir` it goes on at the
    /// next start).
    ShuttingDown,
}

impl Stop {
    fn error(self) -> Value {
        let (code, message) = match self {
            Stop::Cancelled => (
                "batch_cancelled",
                "the batch was cancelled before this request finished",
            ),
            Stop::Expired => (
                "batch_expired",
                "this request could not be executed before the completion window expired",
            ),
            Stop::ShuttingDown => (
                "server_shutting_down",
                "the server stopped before this request ran",
            ),
        };
        json!({"code": code, "message": message})
    }
}

fn suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A line's outcome, as its JSONL output line.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Its request was answered with a 2xx (the line belongs in the output file, not the
    /// error file).
    pub ok: bool,
    /// Its request got no answer: why.
    pub stopped: Option<Stop>,
    /// The output line, without its newline.
    pub json: Bytes,
}

/// The output line of a request its route answered (any status). A failure also carries
/// `error` (its code and message), as vLLM's `run_batch` writes them.
pub fn answered(custom_id: &str, a: Answer) -> Outcome {
    let s = suffix();
    let ok = (200..300).contains(&a.status);
    let error = (!ok).then(|| {
        let e = &a.body["error"];
        let code = e["code"].as_str().or(e["type"].as_str()).unwrap_or("error");
        json!({"code": code, "message": e["message"]})
    });
    let v = json!({
        "id": format!("batch_req_{s}"),
        "custom_id": custom_id,
        "response": {"status_code": a.status, "request_id": format!("req_{s}"), "body": a.body},
        "error": error,
    });
    Outcome {
        ok,
        stopped: None,
        json: Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
    }
}

/// The output line of a request that got no answer.
fn stopped(custom_id: &str, why: Stop) -> Outcome {
    let v = json!({
        "id": format!("batch_req_{}", suffix()),
        "custom_id": custom_id,
        "response": null,
        "error": why.error(),
    });
    Outcome {
        ok: false,
        stopped: Some(why),
        json: Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
    }
}

/// Lines as a JSONL file.
pub fn jsonl<'a>(lines: impl IntoIterator<Item = &'a Outcome>) -> Bytes {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(&l.json);
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// How many worker slots batch lines may hold at once, across batches: a line takes one per
/// generation it starts (`Line::jobs`, at most all of them).
#[derive(Debug, Clone)]
pub struct Gate {
    slots: Arc<tokio::sync::Semaphore>,
    size: u32,
}

impl Gate {
    pub fn new(size: usize) -> Self {
        let size = size.clamp(1, tokio::sync::Semaphore::MAX_PERMITS) as u32;
        Gate {
            slots: Arc::new(tokio::sync::Semaphore::new(size as usize)),
            size,
        }
    }

    async fn enter(&self, jobs: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let n = (jobs.min(self.size as usize) as u32).max(1);
        self.slots.clone().acquire_many_owned(n).await.ok()
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.slots.available_permits()
    }
}

/// Tries of a line the queue keeps refusing (429) before its 429 is the answer: about five
/// minutes (a request larger than the queue is refused even by an idle server).
const MAX_TRIES: u32 = 64;

/// The waits between tries of a refused line: doubling from the first to the longest.
const FIRST_WAIT: Duration = Duration::from_millis(200);
#[cfg(not(test))]
const LONGEST_WAIT: Duration = Duration::from_secs(5);
#[cfg(test)]
const LONGEST_WAIT: Duration = Duration::from_millis(2);

/// Runs lines, at most `concurrency` at once and as many as `gate` lets in across batches;
/// returns each line's outcome (as `api` writes it) with its index, in any order, and what stopped the
/// run, if anything did. `call` runs a request (its route in this server); `stop` is asked
/// before each line starts; `cancelled` ends lines waiting or running when it turns true;
/// `done` hears of each line answered.
#[allow(clippy::too_many_arguments)]
pub async fn run<C, F>(
    api: Api,
    lines: Vec<(usize, Line)>,
    concurrency: usize,
    gate: &Gate,
    call: C,
    stop: impl Fn() -> Option<Stop>,
    cancelled: tokio::sync::watch::Receiver<bool>,
    done: impl Fn(usize, &Outcome),
) -> (Vec<(usize, Outcome)>, Option<Stop>)
where
    C: Fn(String, Bytes) -> F,
    F: Future<Output = Answer>,
{
    let first_stop: Mutex<Option<Stop>> = Mutex::new(None);
    let note = |line: &Line, why: Stop| {
        let mut s = first_stop.lock().unwrap_or_else(|e| e.into_inner());
        s.get_or_insert(why);
        api.stopped(&line.custom_id, why)
    };
    let (call, stop, note, done) = (&call, &stop, &note, &done);
    let run_line = |line: Line, mut cancelled: tokio::sync::watch::Receiver<bool>| async move {
        // A cancel is heard while the line waits for a slot, sleeps on a 429 or runs.
        // (A dropped sender: never.)
        let mut ended = std::pin::pin!(async move {
            if cancelled.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        });
        if let Some(why) = stop() {
            return note(&line, why);
        }
        let _slots = tokio::select! {
            p = gate.enter(line.jobs) => match p {
                Some(p) => p,
                None => return note(&line, Stop::ShuttingDown),
            },
            _ = &mut ended => return note(&line, Stop::Cancelled),
        };
        let body = line.body();
        let mut wait = FIRST_WAIT.min(LONGEST_WAIT);
        let mut tries = 0;
        loop {
            tries += 1;
            if let Some(why) = stop() {
                return note(&line, why);
            }
            let answer = tokio::select! {
                // Dropping the call ends its generation.
                a = call(line.url.clone(), body.clone()) => a,
                _ = &mut ended => return note(&line, Stop::Cancelled),
            };
            // Refused because the server is stopping (503, or the closed queue's 429): no
            // answer, so that a restart runs the line again.
            if !(200..300).contains(&answer.status) && stop() == Some(Stop::ShuttingDown) {
                return note(&line, Stop::ShuttingDown);
            }
            if answer.status == StatusCode::TOO_MANY_REQUESTS.as_u16() && tries < MAX_TRIES {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut ended => return note(&line, Stop::Cancelled),
                }
                wait = (wait * 2).min(LONGEST_WAIT);
                continue;
            }
            return api.answered(&line.custom_id, answer);
        }
    };
    let out = futures_util::stream::iter(lines)
        .map(|(i, line)| {
            let f = run_line(line, cancelled.clone());
            async move {
                let o = f.await;
                done(i, &o);
                (i, o)
            }
        })
        // Unordered: a long line holds up no other.
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let why = *first_stop.lock().unwrap_or_else(|e| e.into_inner());
    (out, why)
}

/// A stored file: an upload, or a batch's output or errors.
#[derive(Debug)]
pub struct File {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub created_at: u64,
    pub data: Bytes,
}

impl File {
    pub fn new(filename: String, purpose: &str, created_at: u64, data: Bytes) -> Self {
        File::with_id(
            format!("file-{}", suffix()),
            filename,
            purpose,
            created_at,
            data,
        )
    }

    /// A file whose id is given: a batch's outputs are named after it, so that finalizing
    /// again (after a restart) replaces them instead of adding more.
    pub fn with_id(
        id: String,
        filename: String,
        purpose: &str,
        created_at: u64,
        data: Bytes,
    ) -> Self {
        File {
            id,
            filename,
            purpose: purpose.into(),
            created_at,
            data,
        }
    }

    /// An Anthropic batch's results: reached through its batch, never the Files API.
    fn internal(&self) -> bool {
        self.purpose == super::message_batch::RESULTS_PURPOSE
    }

    pub fn json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.data.len(),
            "created_at": self.created_at,
            "expires_at": null,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

/// A batch's state, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn parse(s: &str) -> Option<Status> {
        [
            Status::Failed,
            Status::InProgress,
            Status::Finalizing,
            Status::Completed,
            Status::Expired,
            Status::Cancelling,
            Status::Cancelled,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

/// What `POST /v1/batches` asks for.
#[derive(Debug, Clone)]
pub struct Create {
    pub input_file_id: String,
    pub endpoint: String,
    pub metadata: Option<Map<String, Value>>,
}

/// Parses `POST /v1/batches`' body; errors name the field.
pub fn parse_create(body: &[u8]) -> Result<Create, ApiError> {
    let o = super::api::json_object(body)?;
    if let Some(k) = o.keys().find(|k| {
        !["input_file_id", "endpoint", "completion_window", "metadata"].contains(&k.as_str())
    }) {
        return Err(
            ApiError::invalid(k.as_str(), format!("unknown parameter {k:?}"))
                .with_code("unknown_parameter"),
        );
    }
    let string = |k: &str| match o.get(k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::invalid(k, format!("{k} must be a string"))),
        None => Err(ApiError::invalid(k, format!("{k} is required"))
            .with_code("missing_required_parameter")),
    };
    let input_file_id = string("input_file_id")?;
    let endpoint = string("endpoint")?;
    if !ENDPOINTS.contains(&endpoint.as_str()) {
        return Err(ApiError::invalid(
            "endpoint",
            format!(
                "endpoint {endpoint:?} cannot be batched (one of {})",
                ENDPOINTS.join(", ")
            ),
        ));
    }
    let window = string("completion_window")?;
    if window != COMPLETION_WINDOW {
        return Err(ApiError::invalid(
            "completion_window",
            format!("completion_window must be \"{COMPLETION_WINDOW}\", got {window:?}"),
        ));
    }
    let metadata = super::api::metadata(o.get("metadata").unwrap_or(&Value::Null))?;
    Ok(Create {
        input_file_id,
        endpoint,
        metadata,
    })
}

/// A batch: what was asked, and where it stands.
#[derive(Debug)]
pub struct Batch {
    pub id: String,
    pub api: Api,
    /// (An Anthropic batch's: its requests' route, [`MESSAGES`], and no input file.)
    pub create: Create,
    pub created_at: u64,
    state: Mutex<State>,
    cancel: tokio::sync::watch::Sender<bool>,
    /// Held while the batch's record is written: a later state never loses to an earlier one.
    saving: Mutex<()>,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) status: Status,
    errors: Vec<LineError>,
    pub(super) total: usize,
    /// Lines answered with a 2xx.
    pub(super) completed: usize,
    /// Lines answered otherwise.
    pub(super) failed: usize,
    /// Lines never answered: cancelled, expired.
    pub(super) cancelled: usize,
    pub(super) expired: usize,
    /// (An Anthropic batch's results file.)
    pub(super) output_file_id: Option<String>,
    error_file_id: Option<String>,
    in_progress_at: Option<u64>,
    finalizing_at: Option<u64>,
    pub(super) completed_at: Option<u64>,
    pub(super) failed_at: Option<u64>,
    pub(super) expired_at: Option<u64>,
    pub(super) cancelling_at: Option<u64>,
    pub(super) cancelled_at: Option<u64>,
}

impl Batch {
    /// A batch of `lines` (the input's check passed) or one failed by the check's errors.
    pub fn new(create: Create, now: u64, lines: Result<usize, Vec<LineError>>) -> Self {
        Batch::of(Api::OpenAi, create, now, lines)
    }

    /// An Anthropic message batch of `n` requests (checked whole when it was created).
    pub fn messages(n: usize, now: u64) -> Self {
        let create = Create {
            input_file_id: String::new(),
            endpoint: MESSAGES.into(),
            metadata: None,
        };
        Batch::of(Api::Anthropic, create, now, Ok(n))
    }

    fn of(api: Api, create: Create, now: u64, lines: Result<usize, Vec<LineError>>) -> Self {
        let (status, total, errors) = match lines {
            Ok(n) => (Status::InProgress, n, Vec::new()),
            Err(e) => (Status::Failed, 0, e),
        };
        let prefix = match api {
            Api::OpenAi => "batch_",
            Api::Anthropic => "msgbatch_",
        };
        Batch {
            id: format!("{prefix}{}", suffix()),
            api,
            create,
            created_at: now,
            state: Mutex::new(State {
                status,
                errors,
                total,
                completed: 0,
                failed: 0,
                cancelled: 0,
                expired: 0,
                output_file_id: None,
                error_file_id: None,
                in_progress_at: (status == Status::InProgress).then_some(now),
                finalizing_at: None,
                completed_at: None,
                failed_at: (status == Status::Failed).then_some(now),
                expired_at: None,
                cancelling_at: None,
                cancelled_at: None,
            }),
            cancel: tokio::sync::watch::channel(false).0,
            saving: Mutex::new(()),
        }
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch as [`Batch::json`] wrote it (its record in `--batch-dir`); `answers` (the lines
    /// answered so far, for one still running) recount its requests.
    pub fn from_json(v: &Value, answers: &[(usize, Outcome)]) -> Option<Batch> {
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        let time = |k: &str| v[k].as_u64();
        let status = Status::parse(v["status"].as_str()?)?;
        let errors = (v["errors"]["data"].as_array().into_iter().flatten())
            .map(|e| LineError {
                line: e["line"].as_u64().map(|n| n as usize),
                // A code from the set this server writes (they are static).
                code: CODES
                    .iter()
                    .find(|c| e["code"] == **c)
                    .copied()
                    .unwrap_or("invalid_request"),
                param: PARAMS.iter().find(|p| e["param"] == **p).copied(),
                message: e["message"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        let counts = &v["request_counts"];
        let count = |k: &str| counts[k].as_u64().unwrap_or(0) as usize;
        let running = matches!(
            status,
            Status::InProgress | Status::Finalizing | Status::Cancelling
        );
        // (Lines never answered are not kept: a restart runs them again.)
        let (completed, failed, cancelled, expired) = if running {
            let done = answers.iter().filter(|(_, o)| o.stopped.is_none());
            let ok = done.clone().filter(|(_, o)| o.ok).count();
            (ok, done.count() - ok, 0, 0)
        } else {
            (
                count("completed"),
                count("failed"),
                count("cancelled"),
                count("expired"),
            )
        };
        let api = match v["api"].as_str() {
            Some("anthropic") => Api::Anthropic,
            _ => Api::OpenAi,
        };
        let b = Batch {
            id: text("id")?,
            api,
            create: Create {
                input_file_id: text("input_file_id")?,
                endpoint: text("endpoint")?,
                metadata: v["metadata"].as_object().cloned(),
            },
            created_at: time("created_at")?,
            state: Mutex::new(State {
                // Finalizing again from the answers.
                status: if status == Status::Finalizing {
                    Status::InProgress
                } else {
                    status
                },
                errors,
                total: count("total"),
                completed,
                failed,
                cancelled,
                expired,
                output_file_id: text("output_file_id"),
                error_file_id: text("error_file_id"),
                in_progress_at: time("in_progress_at"),
                finalizing_at: None,
                completed_at: time("completed_at"),
                failed_at: time("failed_at"),
                expired_at: time("expired_at"),
                cancelling_at: time("cancelling_at"),
                cancelled_at: time("cancelled_at"),
            }),
            cancel: tokio::sync::watch::channel(status == Status::Cancelling).0,
            saving: Mutex::new(()),
        };
        Some(b)
    }

    pub fn expires_at(&self) -> u64 {
        self.created_at + WINDOW_SECS
    }

    pub fn json(&self) -> Value {
        let s = self.state();
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.create.endpoint,
            "errors": (!s.errors.is_empty()).then(|| json!({
                "object": "list",
                "data": s.errors.iter().map(LineError::json).collect::<Vec<_>>(),
            })),
            "input_file_id": self.create.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": s.status.as_str(),
            "output_file_id": s.output_file_id,
            "error_file_id": s.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": s.in_progress_at,
            "expires_at": self.expires_at(),
            "finalizing_at": s.finalizing_at,
            "completed_at": s.completed_at,
            "failed_at": s.failed_at,
            "expired_at": s.expired_at,
            "cancelling_at": s.cancelling_at,
            "cancelled_at": s.cancelled_at,
            "request_counts": {"total": s.total, "completed": s.completed, "failed": s.failed},
            "metadata": self.create.metadata,
        })
    }

    /// The batch as `--batch-dir` keeps it: OpenAI's object, with whose batch it is and the
    /// lines never answered (Anthropic's object is made from it, [`Batch::from_json`] reads it).
    pub fn record(&self) -> Value {
        let mut v = self.json();
        if self.api == Api::Anthropic {
            v["api"] = json!("anthropic");
        }
        let s = self.state();
        v["request_counts"]["cancelled"] = json!(s.cancelled);
        v["request_counts"]["expired"] = json!(s.expired);
        v
    }

    /// Counts a line's outcome: answered with a 2xx (completed) or not (failed), or never
    /// answered (cancelled, expired; OpenAI's counts leave those out).
    pub fn count(&self, o: &Outcome) {
        let mut s = self.state();
        match (o.ok, o.stopped) {
            (true, _) => s.completed += 1,
            (false, None) => s.failed += 1,
            (false, Some(Stop::Cancelled)) => s.cancelled += 1,
            (false, Some(Stop::Expired)) => s.expired += 1,
            (false, Some(Stop::ShuttingDown)) => {}
        }
    }

    /// Whether the batch has ended.
    pub fn ended(&self) -> bool {
        matches!(
            self.state().status,
            Status::Failed | Status::Completed | Status::Expired | Status::Cancelled
        )
    }

    /// Asks a batch still running to stop: lines not started are not run, running ones end.
    pub fn cancel(&self, now: u64) -> Result<(), ApiError> {
        let mut s = self.state();
        match s.status {
            Status::InProgress => {
                s.status = Status::Cancelling;
                s.cancelling_at = Some(now);
                self.cancel.send_replace(true);
                Ok(())
            }
            Status::Cancelling => Ok(()),
            other => Err(ApiError::bad_request(format!(
                "batch {} is {} and can no longer be cancelled",
                self.id,
                other.as_str()
            ))
            .with_status(StatusCode::CONFLICT)),
        }
    }

    /// Trips when the batch is cancelled ([`run`]'s `cancelled`).
    pub fn cancelled(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cancel.subscribe()
    }

    /// Whether lines may still start at `now`.
    pub fn stop(&self, now: u64) -> Option<Stop> {
        if *self.cancel.borrow() {
            Some(Stop::Cancelled)
        } else if now >= self.expires_at() {
            Some(Stop::Expired)
        } else {
            None
        }
    }

    /// A batch still running that cannot go on (its lines were lost): it fails with `why`.
    pub fn lost(&self, why: &str, now: u64) {
        let mut s = self.state();
        s.status = Status::Failed;
        s.failed_at = Some(now);
        s.errors = vec![LineError::file("lines_lost", why)];
    }

    /// Every line has its output: writing the files.
    pub fn finalizing(&self, now: u64) {
        let mut s = self.state();
        if s.status == Status::InProgress {
            s.status = Status::Finalizing;
            s.finalizing_at = Some(now);
        }
    }

    /// The outputs are stored: the batch ends as `why` says (nothing: completed; a shutdown is
    /// not an end and never comes here).
    pub fn finish(
        &self,
        why: Option<Stop>,
        output: Option<String>,
        errors: Option<String>,
        now: u64,
    ) {
        let mut s = self.state();
        s.output_file_id = output;
        s.error_file_id = errors;
        // A cancel that came after the last line finished still cancels (as OpenAI's does).
        let why = if s.status == Status::Cancelling {
            Some(Stop::Cancelled)
        } else {
            why
        };
        match why {
            None | Some(Stop::ShuttingDown) => {
                s.status = Status::Completed;
                s.completed_at = Some(now);
            }
            Some(Stop::Cancelled) => {
                s.status = Status::Cancelled;
                s.cancelled_at = Some(now);
            }
            Some(Stop::Expired) => {
                s.status = Status::Expired;
                s.expired_at = Some(now);
            }
        }
    }
}

/// How a list route pages (`limit`, `after`, `order`, and for files `purpose`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub limit: usize,
    pub after: Option<String>,
    pub ascending: bool,
    pub purpose: Option<String>,
}

/// Parses a list route's query string; `files`: `order` and `purpose` are taken too (OpenAI's
/// files list has them, its batches list does not). Errors name the parameter.
pub fn parse_query(
    query: Option<&str>,
    files: bool,
    decode: impl Fn(&str) -> String,
) -> Result<ListQuery, ApiError> {
    let mut purpose = None;
    let rules = ListRules {
        limit: if files { 10_000 } else { 20 },
        order: files.then_some(false),
    };
    let mut q = parse_list(
        query,
        rules,
        |k, v| {
            let take = files && k == "purpose";
            if take {
                purpose = Some(v);
            }
            take
        },
        decode,
    )?;
    q.purpose = purpose;
    Ok(q)
}

/// What a list route's query takes besides `after`.
#[derive(Debug, Clone, Copy)]
pub struct ListRules {
    /// `limit`'s default; it may be up to this or 100, whichever is more.
    pub limit: usize,
    /// `Some(ascending by default)` where `order` (`asc`, `desc`) is taken.
    pub order: Option<bool>,
}

/// Parses a list route's query string: `limit`, `after`, `order` as `rules` say, and the keys
/// `extra` takes (it is given each decoded key and value and says whether it took them); any
/// other key is an error. Errors name the parameter.
pub fn parse_list(
    query: Option<&str>,
    rules: ListRules,
    mut extra: impl FnMut(&str, String) -> bool,
    decode: impl Fn(&str) -> String,
) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: rules.limit,
        after: None,
        ascending: rules.order.unwrap_or(false),
        purpose: None,
    };
    let max = rules.limit.max(100);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k), decode(&v.replace('+', " ")));
        match k.as_str() {
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("limit must be in 1..={max}, got {v:?}"))
                    })?
            }
            "after" => q.after = Some(v),
            "order" if rules.order.is_some() => {
                q.ascending = match v.as_str() {
                    "asc" => true,
                    "desc" => false,
                    _ => {
                        return Err(ApiError::invalid(
                            "order",
                            format!("order must be \"asc\" or \"desc\", got {v:?}"),
                        ));
                    }
                }
            }
            other => {
                if !extra(other, v) {
                    return Err(ApiError::invalid(
                        other,
                        format!("unknown query parameter {other:?}"),
                    )
                    .with_code("unknown_parameter"));
                }
            }
        }
    }
    Ok(q)
}

/// A page of a list, newest first unless `ascending`, starting after the `after` id.
pub fn page(items: Vec<(String, Value)>, q: &ListQuery) -> Result<Value, ApiError> {
    let mut items = items;
    if !q.ascending {
        items.reverse();
    }
    let start = match &q.after {
        None => 0,
        Some(a) => {
            1 + items.iter().position(|(id, _)| id == a).ok_or_else(|| {
                ApiError::invalid("after", format!("after names {a:?}, which is not listed"))
            })?
        }
    };
    let rest = &items[start..];
    let data: Vec<&(String, Value)> = rest.iter().take(q.limit).collect();
    Ok(json!({
        "object": "list",
        "data": data.iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "first_id": data.first().map(|(id, _)| id),
        "last_id": data.last().map(|(id, _)| id),
        "has_more": rest.len() > q.limit,
    }))
}

/// Ended batches the store keeps listing.
pub const KEPT_BATCHES: usize = 1000;

/// The files and batches of a server, in creation order.
#[derive(Debug, Default)]
pub struct Store {
    files: Vec<Arc<File>>,
    batches: Vec<Arc<Batch>>,
    /// The stored files' bytes.
    bytes: usize,
}

impl Store {
    /// Stores an upload unless the store would then hold more than `limit` bytes.
    pub fn upload(&mut self, f: File, limit: usize) -> Result<Arc<File>, ApiError> {
        if self.bytes + f.data.len() > limit {
            return Err(ApiError::too_large(
                "file",
                format!(
                    "the file store holds {} of its {limit} bytes and the file has {}: delete files first (DELETE /v1/files/{{id}})",
                    self.bytes,
                    f.data.len()
                ),
            ));
        }
        Ok(self.keep(f))
    }

    /// Stores a batch's output, whatever the limit: its results are not thrown away.
    pub fn keep(&mut self, f: File) -> Arc<File> {
        if let Some(i) = self.files.iter().position(|old| old.id == f.id) {
            self.bytes -= self.files.remove(i).data.len();
        }
        self.bytes += f.data.len();
        let f = Arc::new(f);
        self.files.push(f.clone());
        f
    }

    /// The stored files' bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A file of the Files API (not an Anthropic batch's results, which are its batch's).
    pub fn file(&self, id: &str) -> Result<Arc<File>, ApiError> {
        self.files
            .iter()
            .find(|f| f.id == id && !f.internal())
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no file {id:?}")))
    }

    /// An Anthropic batch's results.
    pub fn results(&self, batch: &str) -> Option<Arc<File>> {
        let id = super::message_batch::results_id(batch);
        self.files.iter().find(|f| f.id == id).cloned()
    }

    pub fn delete_file(&mut self, id: &str) -> Result<Value, ApiError> {
        let i = (self.files.iter())
            .position(|f| f.id == id && !f.internal())
            .ok_or_else(|| ApiError::not_found(format!("no file {id:?}")))?;
        let f = self.files.remove(i);
        self.bytes -= f.data.len();
        Ok(json!({"id": f.id, "object": "file", "deleted": true}))
    }

    pub fn files(&self, q: &ListQuery) -> Result<Value, ApiError> {
        let items = (self.files.iter())
            .filter(|f| !f.internal() && q.purpose.as_ref().is_none_or(|p| *p == f.purpose))
            .map(|f| (f.id.clone(), f.json()))
            .collect();
        page(items, q)
    }

    /// Keeps a batch, forgetting the oldest ended ones beyond [`KEPT_BATCHES`] (an OpenAI
    /// batch's files stay until deleted; an Anthropic batch's results go with it).
    /// Returns the ids of the batches forgotten.
    pub fn add_batch(&mut self, b: Arc<Batch>) -> Vec<String> {
        self.batches.push(b);
        let ended = self.batches.iter().filter(|b| b.ended()).count();
        let mut forgotten = Vec::new();
        if ended > KEPT_BATCHES {
            let mut extra = ended - KEPT_BATCHES;
            self.batches.retain(|b| {
                let drop = extra > 0 && b.ended();
                extra -= drop as usize;
                if drop {
                    forgotten.push(b.id.clone());
                }
                !drop
            });
        }
        for id in &forgotten {
            self.drop_results(id);
        }
        forgotten
    }

    fn drop_results(&mut self, batch: &str) {
        let id = super::message_batch::results_id(batch);
        if let Some(i) = self.files.iter().position(|f| f.id == id) {
            self.bytes -= self.files.remove(i).data.len();
        }
    }

    /// One of `api`'s batches.
    pub fn batch(&self, api: Api, id: &str) -> Result<Arc<Batch>, ApiError> {
        self.batches
            .iter()
            .find(|b| b.id == id && b.api == api)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no batch {id:?}")))
    }

    /// Forgets an ended batch and, for an Anthropic one, its results.
    pub fn delete_batch(&mut self, api: Api, id: &str) -> Result<Arc<Batch>, ApiError> {
        let b = self.batch(api, id)?;
        if !b.ended() {
            return Err(ApiError::bad_request(format!(
                "batch {id} is still running: cancel it first, and delete it once it has ended"
            )));
        }
        self.batches.retain(|x| x.id != id);
        self.drop_results(id);
        Ok(b)
    }

    /// `api`'s batches, oldest first.
    pub fn batches_of(&self, api: Api) -> impl Iterator<Item = &Arc<Batch>> {
        self.batches.iter().filter(move |b| b.api == api)
    }

    pub fn batches(&self, q: &ListQuery) -> Result<Value, ApiError> {
        let items = (self.batches_of(Api::OpenAi))
            .map(|b| (b.id.clone(), b.json()))
            .collect();
        page(items, q)
    }
}

/// Where files and batches outlive the server (`--batch-dir`): `files/ID` (the bytes) and
/// `files/ID.json` (the file's object), `batches/ID.json` (the batch's object, rewritten as it
/// changes), and for a batch still running `batches/ID.input` (its lines, whatever becomes of
/// the input file) and `batches/ID.answers` (each answered line as it comes, `{"index",
/// "ok", "line"}`). A server that starts on the directory lists them again and goes on with
/// the batches still running, skipping the lines already answered.
#[derive(Debug, Clone)]
pub struct Disk {
    files: PathBuf,
    batches: PathBuf,
    /// The directory's lock, held while the server runs: two servers on one directory would
    /// both go on with its batches.
    _lock: Arc<std::fs::File>,
}

/// A batch to go on with: its remaining lines (with their indices) and the answers so far.
pub type Resume = (Arc<Batch>, Vec<(usize, Line)>, Vec<(usize, Outcome)>);

impl Disk {
    pub fn open(root: &Path) -> anyhow::Result<Disk> {
        let (files, batches) = (root.join("files"), root.join("batches"));
        for dir in [&files, &batches] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let path = root.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                anyhow::bail!(
                    "{} is in use by another server (its lock file is held)",
                    root.display()
                );
            }
        }
        Ok(Disk {
            files,
            batches,
            _lock: Arc::new(lock),
        })
    }

    /// An id as a file name: ids are made here (`file-HEX`, `batch_HEX`), but one read from a
    /// request names nothing outside the directory.
    fn name(id: &str) -> Option<&str> {
        (!id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .then_some(id)
    }

    pub fn save_file(&self, f: &File) -> anyhow::Result<()> {
        let id = Disk::name(&f.id).context("a file id that names no file")?;
        crate::files::write_atomic(&self.files.join(id), &f.data)?;
        let meta = serde_json::to_vec(&f.json())?;
        crate::files::write_atomic(&self.files.join(format!("{id}.json")), &meta)
    }

    pub fn delete_file(&self, id: &str) {
        if let Some(id) = Disk::name(id) {
            let _ = std::fs::remove_file(self.files.join(format!("{id}.json")));
            let _ = std::fs::remove_file(self.files.join(id));
        }
    }

    /// Writes the batch's object; `input`: its lines' file, for a batch that starts now (a
    /// hard link to the stored file, which is never changed in place; a copy where links fail).
    pub fn save_batch(&self, b: &Batch, input: Option<&File>) -> anyhow::Result<()> {
        let id = Disk::name(&b.id).context("a batch id that names no file")?;
        let _saving = b.saving.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = input {
            let to = self.batches.join(format!("{id}.input"));
            let linked = Disk::name(&f.id)
                .is_some_and(|from| std::fs::hard_link(self.files.join(from), &to).is_ok());
            if !linked {
                crate::files::write_atomic(&to, &f.data)?;
            }
        }
        let record = serde_json::to_vec(&b.record())?;
        crate::files::write_atomic(&self.batches.join(format!("{id}.json")), &record)?;
        if b.ended() {
            // What a restart would need to go on: not needed any more.
            for ext in ["input", "answers"] {
                let _ = std::fs::remove_file(self.batches.join(format!("{id}.{ext}")));
            }
        }
        Ok(())
    }

    /// Removes a batch, and an Anthropic batch's results.
    pub fn forget_batch(&self, id: &str) {
        if let Some(id) = Disk::name(id) {
            for ext in ["json", "input", "answers"] {
                let _ = std::fs::remove_file(self.batches.join(format!("{id}.{ext}")));
            }
            self.delete_file(&super::message_batch::results_id(id));
        }
    }

    /// Appends an answered line of a running batch (one write: a crash leaves at most a torn
    /// last line, which a restart skips).
    pub fn save_answer(&self, batch: &str, index: usize, o: &Outcome) -> std::io::Result<()> {
        use std::io::Write;
        let Some(id) = Disk::name(batch) else {
            return Ok(());
        };
        let line: Value = serde_json::from_slice(&o.json).unwrap_or_default();
        let mut rec = serde_json::to_vec(&json!({"index": index, "ok": o.ok, "line": line}))?;
        rec.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.batches.join(format!("{id}.answers")))?
            .write_all(&rec)
    }

    /// Everything stored: the files, the batches (oldest first) and those to go on with.
    /// Entries that do not read are skipped with a warning, never fatal.
    pub fn load(&self) -> (Vec<File>, Vec<Arc<Batch>>, Vec<Resume>) {
        let records = |dir: &Path| -> Vec<(String, Value)> {
            let mut out = Vec::new();
            let Ok(entries) = std::fs::read_dir(dir) else {
                return out;
            };
            for e in entries.flatten() {
                let path = e.path();
                let Some(id) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".json"))
                else {
                    continue;
                };
                match std::fs::read(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| Ok(serde_json::from_slice::<Value>(&b)?))
                {
                    Ok(v) => out.push((id.to_string(), v)),
                    Err(e) => tracing::warn!("--batch-dir: skipping {}: {e}", path.display()),
                }
            }
            out.sort_by_key(|(id, v)| (v["created_at"].as_u64().unwrap_or(0), id.clone()));
            out
        };
        let mut files = Vec::new();
        for (id, v) in records(&self.files) {
            let Ok(data) = std::fs::read(self.files.join(&id)) else {
                tracing::warn!("--batch-dir: file {id} has no data; skipped");
                continue;
            };
            files.push(File {
                id,
                filename: v["filename"].as_str().unwrap_or("file").to_string(),
                purpose: v["purpose"].as_str().unwrap_or(PURPOSE).to_string(),
                created_at: v["created_at"].as_u64().unwrap_or(0),
                data: Bytes::from(data),
            });
        }
        let (mut batches, mut resumes) = (Vec::new(), Vec::new());
        for (id, v) in records(&self.batches) {
            let answers = self.answers(&id);
            let Some(b) = Batch::from_json(&v, &answers) else {
                tracing::warn!("--batch-dir: batch {id} does not read; skipped");
                continue;
            };
            let b = Arc::new(b);
            if !b.ended() {
                let input = std::fs::read(self.batches.join(format!("{id}.input")));
                let lines = input.ok().and_then(|d| {
                    let max = b.api.max_requests();
                    parse_at_most(&Bytes::from(d), Some(&b.create.endpoint), max).ok()
                });
                match lines {
                    Some(lines) => {
                        let done: HashSet<usize> = answers.iter().map(|(i, _)| *i).collect();
                        let rest = (lines.into_iter().enumerate())
                            .filter(|(i, _)| !done.contains(i))
                            .collect();
                        resumes.push((b.clone(), rest, answers));
                    }
                    None => {
                        tracing::warn!("--batch-dir: batch {id} has lost its lines; it fails");
                        b.lost(
                            "the batch's lines were lost (its input copy in --batch-dir is missing or unreadable)",
                            super::http::unix_now(),
                        );
                        if let Err(e) = self.save_batch(&b, None) {
                            tracing::warn!("--batch-dir: cannot save batch {id}: {e:#}");
                        }
                    }
                }
            }
            batches.push(b);
        }
        (files, batches, resumes)
    }

    /// A running batch's answers so far. A torn record (a crash mid-write) is dropped, and the
    /// file rewritten without it, so that later answers do not join it.
    fn answers(&self, id: &str) -> Vec<(usize, Outcome)> {
        let path = self.batches.join(format!("{id}.answers"));
        let Ok(data) = std::fs::read(&path) else {
            return Vec::new();
        };
        let (mut seen, mut out, mut good, mut torn) =
            (HashSet::new(), Vec::new(), Vec::new(), false);
        for piece in data.split(|&b| b == b'\n').filter(|p| !p.is_empty()) {
            let Some(v) = serde_json::from_slice::<Value>(piece).ok() else {
                torn = true;
                continue;
            };
            let Some(i) = v["index"].as_u64().map(|i| i as usize) else {
                torn = true;
                continue;
            };
            if !seen.insert(i) {
                continue;
            }
            good.extend_from_slice(piece);
            good.push(b'\n');
            let o = Outcome {
                ok: v["ok"].as_bool().unwrap_or(false),
                stopped: None,
                json: Bytes::from(serde_json::to_vec(&v["line"]).unwrap_or_default()),
            };
            out.push((i, o));
        }
        if (torn || !data.ends_with(b"\n"))
            && let Err(e) = crate::files::write_atomic(&path, &good)
        {
            tracing::warn!("--batch-dir: cannot rewrite {}: {e:#}", path.display());
        }
        out
    }
}

impl Store {
    /// A store holding what a `--batch-dir` kept.
    pub fn with(files: Vec<File>, batches: Vec<Arc<Batch>>) -> Store {
        let bytes = files.iter().map(|f| f.data.len()).sum();
        Store {
            files: files.into_iter().map(Arc::new).collect(),
            batches,
            bytes,
        }
    }
}

/// An upload: `multipart/form-data` with `file` (the bytes, and their file name) and `purpose`.
#[derive(Debug)]
pub struct Upload {
    pub filename: String,
    pub purpose: String,
    pub data: Bytes,
}

/// Reads `POST /v1/files`' form; errors name the field.
pub async fn parse_upload(content_type: Option<&str>, body: Bytes) -> Result<Upload, ApiError> {
    let ct = content_type.unwrap_or("");
    let boundary = multer::parse_boundary(ct).map_err(|_| {
        ApiError::bad_request(format!(
            "the body must be multipart/form-data with a boundary (the fields file and purpose), got content-type {ct:?}"
        ))
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
    })?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let bad = |e: multer::Error| ApiError::bad_request(format!("cannot read the form: {e}"));
    let (mut file, mut purpose) = (None, None);
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("file") => {
                let name = field
                    .file_name()
                    .filter(|n| !n.is_empty())
                    .unwrap_or("upload.jsonl")
                    .to_string();
                file = Some((name, field.bytes().await.map_err(bad)?));
            }
            Some("purpose") => purpose = Some(field.text().await.map_err(bad)?),
            Some(other) => {
                return Err(
                    ApiError::invalid(other, format!("unknown form field {other:?}"))
                        .with_code("unknown_parameter"),
                );
            }
            None => return Err(ApiError::bad_request("a form field has no name")),
        }
    }
    let Some((filename, data)) = file else {
        return Err(ApiError::invalid("file", "the form has no file field")
            .with_code("missing_required_parameter"));
    };
    let purpose = match purpose {
        Some(p) if p == PURPOSE => p,
        Some(p) => {
            return Err(ApiError::invalid(
                "purpose",
                format!("purpose must be \"{PURPOSE}\" (files here are batch input), got {p:?}"),
            ));
        }
        None => {
            return Err(
                ApiError::invalid("purpose", "the form has no purpose field")
                    .with_code("missing_required_parameter"),
            );
        }
    };
    if data.is_empty() {
        return Err(ApiError::invalid("file", "the file is empty"));
    }
    Ok(Upload {
        filename,
        purpose,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, url: &str, body: &str) -> String {
        format!(r#"{{"custom_id": "{id}", "method": "POST", "url": "{url}", "body": {body}}}"#)
    }

    #[test]
    fn input_lines_parse_and_bad_ones_are_named() {
        let ok = [
            line("a", "/v1/completions", r#"{"prompt": "x"}"#),
            String::new(),
            line(
                "b",
                "/v1/completions",
                r#"{"prompt": "y", "stream": false}"#,
            ),
        ]
        .join("\r\n");
        let lines = parse_input(&Bytes::from(ok), Some("/v1/completions")).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].custom_id, "b");
        let body: Value = serde_json::from_slice(&lines[0].body()).unwrap();
        assert_eq!(body, json!({"prompt": "x"}));

        let bad = [
            line("a", "/v1/completions", "{}"),
            line("a", "/v1/completions", "{}"),
            line("c", "/v1/chat/completions", "{}"),
            line("d", "/v1/policies", "{}"),
            r#"{"custom_id": "e", "method": "GET", "url": "/v1/completions", "body": {}}"#.into(),
            line("f", "/v1/completions", r#"{"stream": true}"#),
            line("g", "/v1/completions", "[1]"),
            "not json".into(),
            r#"{"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}}"#.into(),
            r#"{"custom_id": "h", "method": "POST", "url": "/v1/completions"}"#.into(),
            r#"{"custom_id": "i", "method": "POST", "url": "/v1/completions", "body": {}, "x": 1}"#
                .into(),
        ]
        .join("\n");
        let errors = parse_input(&Bytes::from(bad), Some("/v1/completions")).unwrap_err();
        let got: Vec<(Option<usize>, &str)> = errors.iter().map(|e| (e.line, e.code)).collect();
        assert_eq!(
            got,
            [
                (Some(2), "duplicate_custom_id"),
                (Some(3), "mismatched_url"),
                (Some(4), "invalid_url"),
                (Some(5), "invalid_method"),
                (Some(6), "invalid_body"),
                (Some(7), "invalid_body"),
                (Some(8), "invalid_json_line"),
                (Some(9), "invalid_custom_id"),
                (Some(10), "missing_required_parameter"),
                (Some(11), "invalid_request"),
            ]
        );
        assert_eq!(errors[4].param, Some("body.stream"));
        assert!(errors[0].to_string().starts_with("line 2: custom_id \"a\""));
        // Without an endpoint (run-batch) any batchable route goes.
        let mixed = [
            line("a", "/v1/completions", "{}"),
            line("b", "/v1/embeddings", "{}"),
        ]
        .join("\n");
        assert_eq!(parse_input(&Bytes::from(mixed), None).unwrap().len(), 2);
        let empty = parse_input(&Bytes::from_static(b"\n \n"), None).unwrap_err();
        assert_eq!((empty[0].line, empty[0].code), (None, "empty_file"));
        assert_eq!(
            parse_input(&Bytes::from_static(&[0xff, 0xfe]), None).unwrap_err()[0].code,
            "invalid_file"
        );
        // Errors stop at the first MAX_ERRORS.
        let many = vec!["{"; 500].join("\n");
        assert_eq!(
            parse_input(&Bytes::from(many), None).unwrap_err().len(),
            MAX_ERRORS
        );
    }

    #[test]
    fn create_requests_are_checked() {
        let ok = parse_create(
            br#"{"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"k": "v"}}"#,
        )
        .unwrap();
        assert_eq!(ok.endpoint, "/v1/chat/completions");
        for (body, param) in [
            (
                r#"{"endpoint": "/v1/completions", "completion_window": "24h"}"#,
                "input_file_id",
            ),
            (
                r#"{"input_file_id": "f", "endpoint": "/v1/models", "completion_window": "24h"}"#,
                "endpoint",
            ),
            (
                r#"{"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": "1h"}"#,
                "completion_window",
            ),
            (
                r#"{"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": "24h", "metadata": {"k": 1}}"#,
                "metadata.k",
            ),
            (
                r#"{"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": "24h", "metadata": []}"#,
                "metadata",
            ),
            (
                r#"{"input_file_id": "f", "endpoint": "/v1/completions", "completion_window": "24h", "extra": 1}"#,
                "extra",
            ),
        ] {
            let e = parse_create(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e}");
        }
    }

    #[test]
    fn batches_count_cancel_and_finish() {
        let create = Create {
            input_file_id: "file-1".into(),
            endpoint: "/v1/completions".into(),
            metadata: None,
        };
        let b = Batch::new(create.clone(), 100, Ok(3));
        assert_eq!(b.json()["status"], "in_progress");
        assert_eq!(b.stop(101), None);
        assert_eq!(b.stop(100 + WINDOW_SECS), Some(Stop::Expired));
        let answer = |status| {
            answered(
                "x",
                Answer {
                    status,
                    body: json!({}),
                },
            )
        };
        b.count(&answer(200));
        b.count(&answer(500));
        b.count(&stopped("y", Stop::Cancelled));
        let rx = b.cancelled();
        b.cancel(105).unwrap();
        assert!(*rx.borrow());
        assert_eq!(b.stop(106), Some(Stop::Cancelled));
        assert_eq!(b.json()["status"], "cancelling");
        b.finalizing(107);
        b.finish(None, Some("file-o".into()), None, 108);
        let j = b.json();
        assert_eq!(j["status"], "cancelled");
        assert_eq!(j["cancelled_at"], 108);
        assert_eq!(
            j["request_counts"],
            json!({"total": 3, "completed": 1, "failed": 1})
        );
        assert_eq!(j["output_file_id"], "file-o");
        assert_eq!(b.cancel(109).unwrap_err().status, StatusCode::CONFLICT);

        let failed = Batch::new(create, 100, Err(vec![LineError::file("empty_file", "no")]));
        let j = failed.json();
        assert_eq!(j["status"], "failed");
        assert_eq!(j["errors"]["data"][0]["code"], "empty_file");
        assert!(failed.cancel(101).is_err());
    }

    #[test]
    fn lists_page_newest_first() {
        let mut s = Store::default();
        let ids: Vec<String> = (0..5)
            .map(|i| {
                let f = File::new(format!("f{i}"), PURPOSE, i, Bytes::from_static(b"x"));
                s.upload(f, 100).unwrap().id.clone()
            })
            .collect();
        let q = |query: &str| parse_query(Some(query), true, |s| s.to_string()).unwrap();
        let page = s.files(&q("limit=2")).unwrap();
        let got: Vec<&str> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap())
            .collect();
        assert_eq!(got, [ids[4].as_str(), ids[3].as_str()]);
        assert_eq!(page["has_more"], true);
        let next = s.files(&q(&format!("limit=2&after={}", ids[3]))).unwrap();
        assert_eq!(next["first_id"], ids[2].as_str());
        let asc = s.files(&q("order=asc&limit=10")).unwrap();
        assert_eq!(asc["data"][0]["id"], ids[0].as_str());
        assert_eq!(asc["has_more"], false);
        assert_eq!(
            s.files(&q("purpose=batch_output")).unwrap()["data"],
            json!([])
        );
        for bad in ["limit=0", "order=up", "colour=red"] {
            assert!(
                parse_query(Some(bad), true, |s| s.to_string()).is_err(),
                "{bad}"
            );
        }
        assert!(parse_query(Some("order=asc"), false, |s| s.to_string()).is_err());
        // The store's bytes bound uploads, not outputs.
        assert_eq!(
            s.upload(
                File::new("big".into(), PURPOSE, 9, Bytes::from(vec![0; 96])),
                100
            )
            .unwrap_err()
            .status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        s.keep(File::new(
            "out".into(),
            "batch_output",
            9,
            Bytes::from(vec![0; 96]),
        ));
        s.delete_file(&ids[0]).unwrap();
        assert!(s.file(&ids[0]).is_err());
        assert_eq!(s.bytes, 4 + 96);
    }

    #[test]
    fn a_batch_dir_keeps_files_batches_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path()).unwrap();
        let input = Bytes::from(
            [
                line("a", "/v1/completions", r#"{"prompt": "x"}"#),
                line("b", "/v1/completions", r#"{"prompt": "y"}"#),
                line("c", "/v1/completions", r#"{"prompt": "z"}"#),
            ]
            .join("\n"),
        );
        let f = File::new("in.jsonl".into(), PURPOSE, 7, input.clone());
        disk.save_file(&f).unwrap();
        let gone = File::new("gone.jsonl".into(), PURPOSE, 8, input.clone());
        disk.save_file(&gone).unwrap();
        disk.delete_file(&gone.id);
        let create = Create {
            input_file_id: f.id.clone(),
            endpoint: "/v1/completions".into(),
            metadata: Some(json!({"k": "v"}).as_object().unwrap().clone()),
        };
        let running = Batch::new(create.clone(), 10, Ok(3));
        disk.save_batch(&running, Some(&f)).unwrap();
        let answer = |status| {
            answered(
                "x",
                Answer {
                    status,
                    body: json!({"n": status}),
                },
            )
        };
        running.count(&answer(200));
        disk.save_answer(&running.id, 1, &answer(200)).unwrap();
        disk.save_answer(&running.id, 2, &answer(400)).unwrap();
        // A crash mid-write leaves a torn last line.
        {
            use std::io::Write;
            let path = dir.path().join(format!("batches/{}.answers", running.id));
            let mut a = std::fs::OpenOptions::new().append(true).open(path).unwrap();
            // Torn inside a character: the file is not UTF-8 any more.
            let torn = "{\"index\": 0, \"ok\": true, \"line\": \"\u{e9}";
            // Cut inside the last character.
            a.write_all(&torn.as_bytes()[..torn.len() - 1]).unwrap();
        }
        let failed = Batch::new(
            create.clone(),
            11,
            Err(vec![LineError::file("empty_file", "no")]),
        );
        disk.save_batch(&failed, None).unwrap();
        let cancelling = Batch::new(create.clone(), 20, Ok(3));
        disk.save_batch(&cancelling, Some(&f)).unwrap();
        cancelling.cancel(21).unwrap();
        disk.save_batch(&cancelling, None).unwrap();
        let ended = Batch::new(create, 12, Ok(1));
        disk.save_batch(&ended, Some(&f)).unwrap();
        ended.finish(None, Some("file-o".into()), None, 13);
        disk.save_batch(&ended, None).unwrap();
        assert!(
            !dir.path()
                .join(format!("batches/{}.input", ended.id))
                .exists()
        );

        let (files, batches, resumes) = disk.load();
        assert_eq!(files.len(), 1);
        assert_eq!(
            (files[0].id.as_str(), &files[0].data),
            (f.id.as_str(), &input)
        );
        let ids: Vec<&str> = batches.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                running.id.as_str(),
                failed.id.as_str(),
                ended.id.as_str(),
                cancelling.id.as_str()
            ]
        );
        assert_eq!(batches[0].json()["metadata"], json!({"k": "v"}));
        assert_eq!(batches[1].json()["errors"]["data"][0]["code"], "empty_file");
        assert_eq!(batches[2].json()["status"], "completed");
        assert_eq!(batches[2].json()["output_file_id"], "file-o");
        // The running batch goes on with line 0 (its torn answer skipped), its counts from
        // the answers kept.
        assert_eq!(resumes.len(), 2);
        // A cancel saved before the stop still holds: its lines end at once.
        assert_eq!(resumes[1].0.id, cancelling.id);
        assert_eq!(resumes[1].0.stop(22), Some(Stop::Cancelled));
        assert_eq!(resumes[1].0.json()["status"], "cancelling");
        let (b, rest, done) = &resumes[0];
        assert_eq!(b.id, running.id);
        assert_eq!(
            b.json()["request_counts"],
            json!({"total": 3, "completed": 1, "failed": 1})
        );
        let rest: Vec<(usize, &str)> = rest
            .iter()
            .map(|(i, l)| (*i, l.custom_id.as_str()))
            .collect();
        assert_eq!(rest, [(0, "a")]);
        let mut done: Vec<(usize, bool)> = done.iter().map(|(i, o)| (*i, o.ok)).collect();
        done.sort();
        assert_eq!(done, [(1, true), (2, false)]);
        // The torn record is gone from the file: a later answer starts a line of its own.
        disk.save_answer(&running.id, 0, &answer(200)).unwrap();
        assert_eq!(disk.answers(&running.id).len(), 3);
        // A second server on the directory is refused while the first holds it.
        let e = Disk::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(disk);
        let disk = Disk::open(dir.path()).unwrap();
        // A running batch whose lines are gone fails, saying so.
        std::fs::remove_file(dir.path().join(format!("batches/{}.input", running.id))).unwrap();
        let (_, batches, resumes) = disk.load();
        assert_eq!(resumes.len(), 1);
        assert_eq!(batches[0].json()["status"], "failed");
        assert_eq!(batches[0].json()["errors"]["data"][0]["code"], "lines_lost");
        // Ids from elsewhere name no file outside the directory.
        assert_eq!(Disk::name("../x"), None);
        disk.delete_file("../../etc");
    }

    #[tokio::test]
    async fn uploads_read_the_form() {
        let form = "--XX\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\nContent-Type: application/octet-stream\r\n\r\n{}\n\r\n--XX--\r\n";
        let ct = Some("multipart/form-data; boundary=XX");
        let u = parse_upload(ct, Bytes::from(form)).await.unwrap();
        assert_eq!(
            (u.filename.as_str(), u.purpose.as_str()),
            ("in.jsonl", "batch")
        );
        assert_eq!(&u.data[..], b"{}\n");
        let e = parse_upload(Some("application/json"), Bytes::from(form))
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let other = form.replace("\r\nbatch\r\n", "\r\nfine-tune\r\n");
        let e = parse_upload(ct, Bytes::from(other)).await.unwrap_err();
        assert_eq!(e.param.as_deref(), Some("purpose"));
    }

    fn outcome(o: &Outcome) -> Value {
        serde_json::from_slice(&o.json).unwrap()
    }

    #[test]
    fn lines_keep_their_bytes_and_size_their_share() {
        // A byte-order mark, CRLF, indentation: each body is its line's.
        let text = format!(
            "\u{feff}{}\r\n  {}\n{}",
            line("a", "/v1/completions", r#"{"prompt": ["x", "y"], "n": 3}"#),
            line("b", "/v1/chat/completions", r#"{"messages": [], "n": 2}"#),
            line(
                "c",
                "/v1/completions",
                r#"{"prompt": [1, 2, 3], "best_of": 4, "n": 2}"#
            ),
        );
        let lines = parse_input(&Bytes::from(text), None).unwrap();
        let jobs: Vec<usize> = lines.iter().map(|l| l.jobs).collect();
        assert_eq!(jobs, [6, 2, 4]);
        let body: Value = serde_json::from_slice(&lines[1].body()).unwrap();
        assert_eq!(body, json!({"messages": [], "n": 2}));
        // A failed request's line says why in `error` too (as vLLM's run_batch writes it).
        let bad = answered(
            "x",
            Answer {
                status: 400,
                body: json!({"error": {"message": "no", "type": "invalid_request_error", "code": null}}),
            },
        );
        let v = outcome(&bad);
        assert!(!bad.ok);
        assert_eq!(
            v["error"],
            json!({"code": "invalid_request_error", "message": "no"})
        );
        assert_eq!(v["response"]["status_code"], 400);
        let good = answered(
            "y",
            Answer {
                status: 200,
                body: json!({}),
            },
        );
        assert!(good.ok && outcome(&good)["error"].is_null());
    }

    #[tokio::test]
    async fn run_keeps_order_retries_429_and_stops() {
        let lines: Vec<(usize, Line)> = (0..6)
            .map(|i| {
                let line = Line {
                    custom_id: format!("r{i}"),
                    url: "/v1/completions".into(),
                    jobs: 1,
                    raw: Bytes::from(format!(r#"{{"body": {i}}}"#)),
                };
                (i, line)
            })
            .collect();
        let gate = Gate::new(2);
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let call = |_url: String, body: Bytes| {
            let first = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            async move {
                let i: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(30 - 5 * i)).await;
                let status = if first {
                    429
                } else if i == 3 {
                    400
                } else {
                    200
                };
                Answer {
                    status,
                    body: json!({"i": i}),
                }
            }
        };
        let ok = std::sync::atomic::AtomicUsize::new(0);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (mut out, why) = run(
            Api::OpenAi,
            lines.clone(),
            3,
            &gate,
            call,
            || None,
            rx,
            |_, o| {
                if o.ok {
                    ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            },
        )
        .await;
        assert_eq!(why, None);
        out.sort_by_key(|(i, _)| *i);
        let got: Vec<Value> = out.iter().map(|(_, o)| outcome(o)).collect();
        let ids: Vec<&str> = got
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4", "r5"]);
        // The first try's 429 was tried again: seven calls, the line answered 200.
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 7);
        assert_eq!(got[0]["response"]["status_code"], 200, "{}", got[0]);
        assert_eq!(ok.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert_eq!(got[3]["response"]["status_code"], 400);
        assert_eq!(gate.free(), 2);

        // A 429 that never clears is, in the end, the answer.
        let busy = |_: String, _: Bytes| async {
            Answer {
                status: 429,
                body: json!({"error": {"message": "full"}}),
            }
        };
        let (out, _) = run(
            Api::OpenAi,
            lines[..1].to_vec(),
            1,
            &gate,
            busy,
            || None,
            tx.subscribe(),
            |_, _| {},
        )
        .await;
        assert_eq!(outcome(&out[0].1)["response"]["status_code"], 429);

        // A stop before line 2 leaves the rest unanswered, each line saying why.
        // (Expired once two lines have run.)
        let ran = std::sync::atomic::AtomicUsize::new(0);
        let stop = || (ran.load(std::sync::atomic::Ordering::SeqCst) >= 2).then_some(Stop::Expired);
        let quick = |_: String, _: Bytes| {
            ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                Answer {
                    status: 200,
                    body: json!({}),
                }
            }
        };
        let (out, why) = run(
            Api::OpenAi,
            lines.clone(),
            1,
            &gate,
            quick,
            stop,
            tx.subscribe(),
            |_, _| {},
        )
        .await;
        assert_eq!(why, Some(Stop::Expired));
        assert_eq!(out.iter().filter(|(_, o)| o.ok).count(), 2);
        let last = out.iter().find(|(i, _)| *i == 5).unwrap();
        assert_eq!(last.1.stopped, Some(Stop::Expired));
        assert_eq!(outcome(&last.1)["error"]["code"], "batch_expired");
        assert_eq!(outcome(&last.1)["response"], Value::Null);

        // A cancel ends lines that are running and lines waiting for a slot.
        let slow = |_: String, _: Bytes| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Answer {
                status: 200,
                body: json!({}),
            }
        };
        // One slot taken: one line runs, the others wait for a slot.
        let held = gate.enter(1).await.unwrap();
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(true);
        };
        let t0 = std::time::Instant::now();
        let ((out, why), ()) = tokio::join!(
            run(
                Api::OpenAi,
                lines,
                2,
                &gate,
                slow,
                || None,
                tx.subscribe(),
                |_, _| {}
            ),
            cancel
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(why, Some(Stop::Cancelled));
        assert!(
            out.iter()
                .all(|(_, o)| outcome(o)["error"]["code"] == "batch_cancelled")
        );
        drop(held);
        assert_eq!(gate.free(), 2);
    }
}
