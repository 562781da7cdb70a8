//! OpenAI's Batch API and `verdict run-batch`: a JSONL file of requests, each line
//! `{"custom_id", "method": "POST", "url", "body"}`, every line run through the route a
//! client's request would take, the answers written as JSONL lines of `{"id", "custom_id",
//! "response": {"status_code", "request_id", "body"}, "error"}` (OpenAI's output format; `error`
//! is for lines that never got an answer: cancelled or expired).
//!
//! The server keeps uploaded files (`/v1/files`) and batches (`/v1/batches`) in memory, bounded
//! by `--max-file-store-bytes`: they are gone when it stops. Batch lines run at most `workers`
//! at once across all batches, so interactive requests keep their share of the workers; a line
//! the queue refuses (429) waits and tries again.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
];

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
    /// The request body, as JSON.
    pub body: Bytes,
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
pub fn parse_input(data: &[u8], endpoint: Option<&str>) -> Result<Vec<Line>, Vec<LineError>> {
    let Ok(text) = std::str::from_utf8(data) else {
        return Err(vec![LineError::file(
            "invalid_file",
            "the file is not UTF-8 text",
        )]);
    };
    let (mut lines, mut errors, mut ids) = (Vec::new(), Vec::new(), HashSet::new());
    for (i, raw) in text.lines().enumerate() {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        if errors.len() == MAX_ERRORS {
            break;
        }
        if lines.len() == MAX_REQUESTS {
            errors.push(LineError::file(
                "too_many_requests",
                format!("the file holds more than {MAX_REQUESTS} requests"),
            ));
            break;
        }
        match parse_line(raw, endpoint, &mut ids) {
            Ok(l) => lines.push(l),
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

fn parse_line(
    raw: &str,
    endpoint: Option<&str>,
    ids: &mut HashSet<String>,
) -> Result<Line, Refusal> {
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
    if !ENDPOINTS.contains(&url.as_str()) {
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
    let body = match o.get("body") {
        Some(b @ Value::Object(m)) => {
            if m.get("stream") == Some(&Value::Bool(true)) {
                return Err((
                    "invalid_body",
                    Some("body.stream"),
                    "body.stream must be false: a batch answers each request whole".into(),
                ));
            }
            Bytes::from(serde_json::to_vec(b).unwrap_or_default())
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
    Ok(Line {
        custom_id,
        url,
        body,
    })
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

/// An output line for a request its route answered (any status).
pub fn response_line(custom_id: &str, a: Answer) -> Value {
    let s = suffix();
    json!({
        "id": format!("batch_req_{s}"),
        "custom_id": custom_id,
        "response": {"status_code": a.status, "request_id": format!("req_{s}"), "body": a.body},
        "error": null,
    })
}

/// An output line for a request that got no answer.
fn stopped_line(custom_id: &str, why: Stop) -> Value {
    json!({
        "id": format!("batch_req_{}", suffix()),
        "custom_id": custom_id,
        "response": null,
        "error": why.error(),
    })
}

/// The line's request was answered with a 2xx (it belongs in the output file, not the error
/// file).
pub fn succeeded(line: &Value) -> bool {
    line["response"]["status_code"]
        .as_u64()
        .is_some_and(|s| (200..300).contains(&s))
}

/// Lines as a JSONL file.
pub fn jsonl(lines: &[&Value]) -> Bytes {
    let mut out = Vec::new();
    for l in lines {
        // A Value always serialises.
        let _ = serde_json::to_writer(&mut out, l);
        out.push(b'\n');
    }
    Bytes::from(out)
}

/// Runs a batch's lines, at most `concurrency` at once and, across batches, as many as `gate`
/// has permits; returns each line's output in input order and what stopped the run, if
/// anything did. `call` runs a request (its route in this server); `stop` is asked before each
/// line starts; `cancelled` ends lines still running when it turns true; `done` hears of each
/// line answered (true: 2xx). A 429 (the queue is full) waits and tries again.
pub async fn run<C, F>(
    lines: Vec<Line>,
    concurrency: usize,
    gate: Arc<tokio::sync::Semaphore>,
    call: C,
    stop: impl Fn() -> Option<Stop>,
    cancelled: tokio::sync::watch::Receiver<bool>,
    done: impl Fn(bool),
) -> (Vec<Value>, Option<Stop>)
where
    C: Fn(String, Bytes) -> F,
    F: Future<Output = Answer>,
{
    let stopped: Mutex<Option<Stop>> = Mutex::new(None);
    let note = |why: Stop| {
        let mut s = stopped.lock().unwrap_or_else(|e| e.into_inner());
        s.get_or_insert(why);
    };
    let (call, stop, done, note) = (&call, &stop, &done, &note);
    let out = futures_util::stream::iter(lines)
        .map(|line| {
            let gate = gate.clone();
            let mut cancelled = cancelled.clone();
            async move {
                let Ok(_permit) = gate.acquire_owned().await else {
                    note(Stop::ShuttingDown);
                    return stopped_line(&line.custom_id, Stop::ShuttingDown);
                };
                let mut wait = Duration::from_millis(200);
                loop {
                    if let Some(why) = stop() {
                        note(why);
                        done(false);
                        return stopped_line(&line.custom_id, why);
                    }
                    let answer = tokio::select! {
                        a = call(line.url.clone(), line.body.clone()) => a,
                        // Dropping the call ends its generation. (A dropped sender: never.)
                        Ok(_) = cancelled.wait_for(|c| *c) => {
                            note(Stop::Cancelled);
                            done(false);
                            return stopped_line(&line.custom_id, Stop::Cancelled);
                        }
                    };
                    if answer.status == StatusCode::TOO_MANY_REQUESTS.as_u16() {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    done((200..300).contains(&answer.status));
                    return response_line(&line.custom_id, answer);
                }
            }
        })
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let why = *stopped.lock().unwrap_or_else(|e| e.into_inner());
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
        File {
            id: format!("file-{}", suffix()),
            filename,
            purpose: purpose.into(),
            created_at,
            data,
        }
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
pub enum Status {
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
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
    let metadata = match o.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(ApiError::invalid(
                    "metadata",
                    format!("metadata holds {} keys; at most 16", m.len()),
                ));
            }
            for (k, v) in m {
                let ok =
                    k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512);
                if !ok {
                    return Err(ApiError::invalid(
                        format!("metadata.{k}"),
                        "metadata keys are at most 64 characters and values strings of at most 512",
                    ));
                }
            }
            Some(m.clone())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "metadata must be an object of strings",
            ));
        }
    };
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
    pub create: Create,
    pub created_at: u64,
    state: Mutex<State>,
    cancel: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug)]
struct State {
    status: Status,
    errors: Vec<LineError>,
    total: usize,
    completed: usize,
    failed: usize,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    in_progress_at: Option<u64>,
    finalizing_at: Option<u64>,
    completed_at: Option<u64>,
    failed_at: Option<u64>,
    expired_at: Option<u64>,
    cancelling_at: Option<u64>,
    cancelled_at: Option<u64>,
}

impl Batch {
    /// A batch of `lines` (the input's check passed) or one failed by the check's errors.
    pub fn new(create: Create, now: u64, lines: Result<usize, Vec<LineError>>) -> Self {
        let (status, total, errors) = match lines {
            Ok(n) => (Status::InProgress, n, Vec::new()),
            Err(e) => (Status::Failed, 0, e),
        };
        Batch {
            id: format!("batch_{}", suffix()),
            create,
            created_at: now,
            state: Mutex::new(State {
                status,
                errors,
                total,
                completed: 0,
                failed: 0,
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
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Counts an answered line (`ok`: 2xx) or one that failed.
    pub fn count(&self, ok: bool) {
        let mut s = self.state();
        if ok {
            s.completed += 1;
        } else {
            s.failed += 1;
        }
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

    /// Every line has its output: writing the files.
    pub fn finalizing(&self, now: u64) {
        let mut s = self.state();
        if s.status == Status::InProgress {
            s.status = Status::Finalizing;
            s.finalizing_at = Some(now);
        }
    }

    /// The outputs are stored: the batch ends as `why` says (nothing: completed).
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    let mut q = ListQuery {
        limit: if files { 10_000 } else { 20 },
        after: None,
        ascending: false,
        purpose: None,
    };
    let max = q.limit.max(100);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(&v.replace('+', " "));
        match k {
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
            "order" if files => {
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
            "purpose" if files => q.purpose = Some(v),
            other => {
                return Err(
                    ApiError::invalid(other, format!("unknown query parameter {other:?}"))
                        .with_code("unknown_parameter"),
                );
            }
        }
    }
    Ok(q)
}

/// A page of a list, newest first unless `ascending`, starting after the `after` id.
fn page(items: Vec<(String, Value)>, q: &ListQuery) -> Result<Value, ApiError> {
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
        self.bytes += f.data.len();
        let f = Arc::new(f);
        self.files.push(f.clone());
        f
    }

    pub fn file(&self, id: &str) -> Result<Arc<File>, ApiError> {
        self.files
            .iter()
            .find(|f| f.id == id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no file {id:?}")))
    }

    pub fn delete_file(&mut self, id: &str) -> Result<Value, ApiError> {
        let i = (self.files.iter())
            .position(|f| f.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no file {id:?}")))?;
        let f = self.files.remove(i);
        self.bytes -= f.data.len();
        Ok(json!({"id": f.id, "object": "file", "deleted": true}))
    }

    pub fn files(&self, q: &ListQuery) -> Result<Value, ApiError> {
        let items = (self.files.iter())
            .filter(|f| q.purpose.as_ref().is_none_or(|p| *p == f.purpose))
            .map(|f| (f.id.clone(), f.json()))
            .collect();
        page(items, q)
    }

    pub fn add_batch(&mut self, b: Arc<Batch>) {
        self.batches.push(b);
    }

    pub fn batch(&self, id: &str) -> Result<Arc<Batch>, ApiError> {
        self.batches
            .iter()
            .find(|b| b.id == id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no batch {id:?}")))
    }

    pub fn batches(&self, q: &ListQuery) -> Result<Value, ApiError> {
        let items = (self.batches.iter())
            .map(|b| (b.id.clone(), b.json()))
            .collect();
        page(items, q)
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
        let lines = parse_input(ok.as_bytes(), Some("/v1/completions")).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].custom_id, "b");
        let body: Value = serde_json::from_slice(&lines[0].body).unwrap();
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
        let errors = parse_input(bad.as_bytes(), Some("/v1/completions")).unwrap_err();
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
        assert_eq!(parse_input(mixed.as_bytes(), None).unwrap().len(), 2);
        let empty = parse_input(b"\n \n", None).unwrap_err();
        assert_eq!((empty[0].line, empty[0].code), (None, "empty_file"));
        assert_eq!(
            parse_input(&[0xff, 0xfe], None).unwrap_err()[0].code,
            "invalid_file"
        );
        // Errors stop at the first MAX_ERRORS.
        let many = vec!["{"; 500].join("\n");
        assert_eq!(
            parse_input(many.as_bytes(), None).unwrap_err().len(),
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
        b.count(true);
        b.count(false);
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

    #[tokio::test]
    async fn run_keeps_order_retries_429_and_stops() {
        let lines: Vec<Line> = (0..6)
            .map(|i| Line {
                custom_id: format!("r{i}"),
                url: "/v1/completions".into(),
                body: Bytes::from(format!("{i}")),
            })
            .collect();
        let gate = Arc::new(tokio::sync::Semaphore::new(2));
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let call = |_url: String, body: Bytes| {
            let first = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            async move {
                let i: u16 = std::str::from_utf8(&body).unwrap().parse().unwrap();
                // Later lines answer first: the output keeps input order anyway.
                tokio::time::sleep(Duration::from_millis(30 - 5 * i as u64)).await;
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
        let (out, why) = run(
            lines.clone(),
            3,
            gate.clone(),
            call,
            || None,
            rx,
            |g| {
                if g {
                    ok.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            },
        )
        .await;
        assert_eq!(why, None);
        let ids: Vec<&str> = out
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["r0", "r1", "r2", "r3", "r4", "r5"]);
        assert_eq!(
            out[0]["response"]["body"]["i"], 0,
            "the 429 was tried again"
        );
        assert_eq!(out.iter().filter(|l| succeeded(l)).count(), 5);
        assert_eq!(ok.load(std::sync::atomic::Ordering::SeqCst), 5);
        assert_eq!(out[3]["response"]["status_code"], 400);
        assert_eq!(gate.available_permits(), 2);

        // A stop before line 2 leaves the rest unanswered, each line saying why.
        let started = std::sync::atomic::AtomicUsize::new(0);
        let stop = || {
            (started.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 2)
                .then_some(Stop::Expired)
        };
        let quick = |_: String, _: Bytes| async {
            Answer {
                status: 200,
                body: json!({}),
            }
        };
        let (out, why) = run(
            lines.clone(),
            1,
            gate.clone(),
            quick,
            stop,
            tx.subscribe(),
            |_| {},
        )
        .await;
        assert_eq!(why, Some(Stop::Expired));
        assert_eq!(out.iter().filter(|l| succeeded(l)).count(), 2);
        assert_eq!(out[5]["error"]["code"], "batch_expired");
        assert_eq!(out[5]["response"], Value::Null);

        // A cancel ends lines that are running.
        let slow = |_: String, _: Bytes| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Answer {
                status: 200,
                body: json!({}),
            }
        };
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(true);
        };
        let ((out, why), ()) = tokio::join!(
            run(lines, 2, gate, slow, || None, tx.subscribe(), |_| {}),
            cancel
        );
        assert_eq!(why, Some(Stop::Cancelled));
        assert!(out.iter().all(|l| l["error"]["code"] == "batch_cancelled"));
    }
}
